/**
 * Picks a backend for each public request or connection: the registry's most specific route, then the
 * least loaded of its live backends with room for one more (round-robin among equals); every pick of
 * every front door goes through here, including a front door's move of a request to another backend. When the route has no live backend it
 * waits for registry changes, bounded in time and in the number of waiters, then fails with a typed
 * error. It does not forward anything; callers hold the returned lease while they use the backend.
 */
import { Clock, Context, Duration, Effect, Layer, Option, Schema } from "effect"
import type { RouteQuery } from "../domain/Route.ts"
import type { Backend } from "./Backend.ts"
import { Registry, type RouteEntry } from "./Registry.ts"

/** Most requests/connections waiting for a backend at once, by default. */
export const DefaultMaxWaiting = 1_024

export interface DispatcherConfig {
  /** How long a request waits for a backend; defaults to the registry's grace period. */
  readonly maxWait?: Duration.Input | undefined
  /** Most requests waiting at once; beyond it requests fail at once with `QueueFull`. */
  readonly maxWaiting?: number | undefined
}

/** Why no backend was found; `status` is the HTTP status to answer with. */
export class DispatchError extends Schema.TaggedError<DispatchError>()("DispatchError", {
  reason: Schema.Literals(["NoRoute", "NoBackend", "QueueFull"]),
  message: Schema.String
}) {
  get status(): 404 | 503 {
    return this.reason === "NoRoute" ? 404 : 503
  }
}

/** A backend taken for one request or connection; `release` (idempotent) gives it back. */
export interface Lease {
  readonly backend: Backend
  readonly route: RouteEntry
  readonly release: () => void
  /**
   * A lease on another live backend of the same route that has room now (and that `accept` takes, when
   * given), picked like any other; `undefined` when there is none. This lease is kept: the caller
   * releases whichever it does not use.
   */
  readonly another: (accept?: (backend: Backend) => boolean) => Lease | undefined
}

export interface DispatcherShape {
  /** A lease on a live backend for `query`, waiting if its route is momentarily empty. */
  readonly acquire: (query: RouteQuery, options?: AcquireOptions) => Effect.Effect<Lease, DispatchError>
  /**
   * The synchronous fast path: a lease when a live backend is available now, a `DispatchError` with
   * reason `NoRoute` when nothing matches, `undefined` when the caller should `acquire` (and wait).
   */
  readonly tryAcquire: (query: RouteQuery, options?: AcquireOptions) => Lease | DispatchError | undefined
  /** Requests currently waiting for a backend. */
  readonly waiting: () => number
}

/**
 * What a pick reads of a backend: its load, whether it is gone, and whether it has room now. Every
 * `Backend` is one; so is each wsp client's set of registered connections (`Pool.ts`).
 */
export interface Pickable {
  readonly inFlight: number
  readonly isClosed: () => boolean
  readonly hasCapacity?: (() => boolean) | undefined
}

/** The candidates of one pick and the round-robin cursor among them (a `RouteEntry` is one). */
export interface PickSet<B extends Pickable> {
  readonly backends: ReadonlyArray<B>
  cursor: number
}

/** Whether a backend can take one more request now (one that does not say always can). */
const hasRoom = (backend: Pickable): boolean => backend.hasCapacity === undefined || backend.hasCapacity()

/** What a pick may take besides live backends with room. */
export interface PickOptions<B extends Pickable = Backend> {
  /** Only backends this takes. */
  readonly accept?: ((backend: B) => boolean) | undefined
  /** Never this backend. */
  readonly exclude?: B | undefined
  /** When every live backend is at capacity, the least loaded of them (the default) or none. */
  readonly whenFull?: "leastLoaded" | "none" | undefined
  /** Never a relay backend (for a request relayed from another gateway: one hop at most). */
  readonly localOnly?: boolean | undefined
}

/** How a request is dispatched: `localOnly` for one relayed from another gateway of the cluster. */
export interface AcquireOptions {
  readonly localOnly?: boolean | undefined
}

/**
 * Local backends first: a relay backend (reached through another gateway of the cluster) is picked only
 * when no local backend of the route can be, and never with `localOnly`.
 */
export const pickBackend = (entry: RouteEntry, options?: PickOptions): Backend | undefined => {
  const local = pickAmong(entry, options, isLocal)
  if (local !== undefined || options?.localOnly === true) return local
  return entry.backends.some(isRelay) ? pickAmong(entry, options, isRelay) : undefined
}

const isRelay = (backend: Backend): boolean => backend.relayedVia !== undefined
const isLocal = (backend: Backend): boolean => backend.relayedVia === undefined

/**
 * The least loaded live backend with room (among those `among` takes), starting the scan at the set's
 * round-robin cursor, which moves past the pick. When every live backend is at capacity, the least loaded of them: its front door
 * holds the request until it has room (unless `whenFull` is `none`).
 */
export const pickAmong = <B extends Pickable>(entry: PickSet<B>, options?: PickOptions<B>, among?: (backend: B) => boolean): B | undefined => {
  const backends = entry.backends
  const n = backends.length
  let chosen = -1
  let least = Infinity
  let full = -1
  let leastFull = Infinity
  for (let i = 0; i < n; i++) {
    const index = (entry.cursor + i) % n
    const backend = backends[index]!
    if (backend.isClosed() || backend === options?.exclude || (among !== undefined && !among(backend))) continue
    if (options?.accept !== undefined && !options.accept(backend)) continue
    if (!hasRoom(backend)) {
      if (backend.inFlight < leastFull) {
        leastFull = backend.inFlight
        full = index
      }
      continue
    }
    if (backend.inFlight < least) {
      least = backend.inFlight
      chosen = index
    }
  }
  if (chosen === -1 && options?.whenFull !== "none") chosen = full
  if (chosen === -1) return undefined
  entry.cursor = (chosen + 1) % n
  return backends[chosen]
}

const LocalOnly: PickOptions = { localOnly: true }

const lease = (backend: Backend, route: RouteEntry, localOnly?: boolean): Lease => {
  backend.inFlight++
  let released = false
  return {
    backend,
    route,
    release: () => {
      if (released) return
      released = true
      backend.inFlight--
    },
    another: (accept) => {
      const other = pickBackend(route, { accept, exclude: backend, whenFull: "none", localOnly })
      return other === undefined ? undefined : lease(other, route, localOnly)
    }
  }
}

const noRoute = (query: RouteQuery) =>
  new DispatchError({ reason: "NoRoute", message: `no route for ${describeQuery(query)}` })

const describeQuery = (query: RouteQuery): string => {
  switch (query._tag) {
    case "Http":
      return `http://${query.host || "*"}:${query.port}${query.path}`
    case "Tcp":
      return `tcp port ${query.port}`
    case "Tls":
      return `tls ${query.serverName}:${query.port}${query.path ?? ""}`
  }
}

export class Dispatcher extends Context.Service<Dispatcher, DispatcherShape>()("switchyard/Dispatcher") {
  static readonly layer = (config: DispatcherConfig = {}): Layer.Layer<Dispatcher, never, Registry> =>
    Layer.effect(Dispatcher, make(config))
}

const make = Effect.fnUntraced(function*(config: DispatcherConfig) {
  const registry = yield* Registry
  const maxWait = config.maxWait === undefined ? registry.gracePeriod : Duration.fromInputUnsafe(config.maxWait)
  const maxWaiting = config.maxWaiting ?? DefaultMaxWaiting
  let waiting = 0

  const tryAcquire = (query: RouteQuery, options?: AcquireOptions): Lease | DispatchError | undefined => {
    const entry = registry.match(query)
    if (entry === undefined) return noRoute(query)
    const localOnly = options?.localOnly === true
    const backend = pickBackend(entry, localOnly ? LocalOnly : undefined)
    return backend === undefined ? undefined : lease(backend, entry, localOnly)
  }

  // Waits for a change and retries until a backend appears; a route that disappears while waited for
  // (its grace period ended) means no backend.
  const waitForBackend = (query: RouteQuery, options: AcquireOptions | undefined): Effect.Effect<Lease, DispatchError> =>
    Effect.suspend(() => {
      const since = registry.version()
      const now = tryAcquire(query, options)
      if (now instanceof DispatchError) {
        return Effect.fail(
          new DispatchError({ reason: "NoBackend", message: `no backend for ${describeQuery(query)} within the grace period` })
        )
      }
      if (now !== undefined) return Effect.succeed(now)
      return Effect.andThen(registry.awaitChange(since), waitForBackend(query, options))
    })

  const acquire = Effect.fnUntraced(function*(query: RouteQuery, options?: AcquireOptions) {
    const now = tryAcquire(query, options)
    if (now instanceof DispatchError) return yield* now
    if (now !== undefined) return now
    if (waiting >= maxWaiting) {
      return yield* new DispatchError({
        reason: "QueueFull",
        message: `${maxWaiting} requests already wait for a backend; try again later`
      })
    }
    waiting++
    const started = yield* Clock.currentTimeMillis
    const found = yield* waitForBackend(query, options).pipe(
      Effect.timeoutOption(maxWait),
      Effect.ensuring(Effect.sync(() => waiting--))
    )
    if (Option.isSome(found)) return found.value
    const waited = (yield* Clock.currentTimeMillis) - started
    return yield* new DispatchError({
      reason: "NoBackend",
      message: `no backend for ${describeQuery(query)} after waiting ${waited} ms`
    })
  })

  return Dispatcher.of({ acquire, tryAcquire, waiting: () => waiting })
})
