/**
 * The routing table: route → live backends. Registrations are scoped (closing the scope unregisters);
 * a route whose last backend left stays, empty, for a grace period so a restarting backend gets its
 * traffic back, then is removed. Every change bumps a version and wakes waiters.
 * It does not pick backends (the Dispatcher does) nor open ports (Listeners do).
 */
import { Context, Deferred, Duration, Effect, FiberMap, Layer, Schema, Scope } from "effect"
import {
  bestMatchBy,
  describeConflict,
  findConflict,
  type PortKind,
  portKind,
  type RouteConflict,
  type RouteDefinition,
  routeKey,
  type RouteQuery
} from "../domain/Route.ts"
import type { Backend, RouteOwner } from "./Backend.ts"

/** How long an empty route keeps its place (and its port) by default. */
export const DefaultGracePeriod: Duration.Duration = Duration.seconds(30)
/** Most routes the table holds by default. */
export const DefaultMaxRoutes = 10_000
/** Most backends one route holds by default. */
export const DefaultMaxBackendsPerRoute = 4_096

export interface RegistryConfig {
  readonly gracePeriod?: Duration.Input | undefined
  readonly maxRoutes?: number | undefined
  readonly maxBackendsPerRoute?: number | undefined
}

/** A registration was refused. */
export class RegistryError extends Schema.TaggedError<RegistryError>()("RegistryError", {
  reason: Schema.Literals(["Conflict", "Limit"]),
  message: Schema.String
}) {}

/** One route of the table and its live backends. Read-only outside the registry. */
export interface RouteEntry {
  readonly key: string
  /** The definition of the latest registration (for TLS: its certificate). */
  readonly route: RouteDefinition
  readonly backends: ReadonlyArray<Backend>
  /** Round-robin position among equally loaded backends; advanced by the dispatcher. */
  cursor: number
  /** Clock time (ms) at which the last backend left; `undefined` while it has backends. */
  readonly emptySince: number | undefined
  /** The token of the first backend that had one: it owns the route until the route is removed. */
  readonly owner: RouteOwner | undefined
}

interface MutableEntry extends RouteEntry {
  route: RouteDefinition
  backends: Array<Backend>
  emptySince: number | undefined
  owner: RouteOwner | undefined
}

/**
 * Why `joining` may not join a route owned by `owner`, or `undefined` when it may: another token's
 * route is joined only when both tokens share their routes. Backends without an owner are not checked.
 */
export const ownershipConflict = (owner: RouteOwner | undefined, joining: RouteOwner | undefined): string | undefined =>
  owner === undefined || joining === undefined || owner.name === joining.name || (owner.shares && joining.shares)
    ? undefined
    : "it belongs to another token (routes are shared between tokens only when both have share_routes)"

export interface RegistryShape {
  readonly gracePeriod: Duration.Duration
  /** Adds `backend` to `route`'s backends until the scope closes. Conflicting port use is refused. */
  readonly register: (route: RouteDefinition, backend: Backend) => Effect.Effect<void, RegistryError, Scope.Scope>
  /** The most specific route for a query (hot path, synchronous). */
  readonly match: (query: RouteQuery) => RouteEntry | undefined
  /** Routes on a port (synchronous). */
  readonly routesOnPort: (port: number) => ReadonlyArray<RouteEntry>
  /** Every port with at least one route, with its kind (synchronous). */
  readonly ports: () => ReadonlyMap<number, PortKind>
  /** Increases on every change of the table or of a route's backends. */
  readonly version: () => number
  /** Completes once `version()` is greater than `since`. */
  readonly awaitChange: (since: number) => Effect.Effect<void>
  /** Every route (a snapshot, for admin and metrics). */
  readonly snapshot: () => ReadonlyArray<RouteEntry>
  /**
   * Says that a registered backend can take work again (a cluster relay link that came back): bumps the
   * version, so requests waiting for a backend look again.
   */
  readonly touch: () => void
}

export class Registry extends Context.Service<Registry, RegistryShape>()("switchyard/Registry") {
  static readonly layer = (config: RegistryConfig = {}): Layer.Layer<Registry> => Layer.effect(Registry, make(config))
}

const make = Effect.fnUntraced(function*(config: RegistryConfig) {
  const gracePeriod = config.gracePeriod === undefined ? DefaultGracePeriod : Duration.fromInputUnsafe(config.gracePeriod)
  const maxRoutes = config.maxRoutes ?? DefaultMaxRoutes
  const maxBackendsPerRoute = config.maxBackendsPerRoute ?? DefaultMaxBackendsPerRoute
  const entries = new Map<string, MutableEntry>()
  const byPort = new Map<number, Array<MutableEntry>>()
  const expiries = yield* FiberMap.make<string>()
  // once the registry's scope is closing, late unregistrations only update the table
  let closing = false
  yield* Effect.addFinalizer(() => Effect.sync(() => void (closing = true)))
  let version = 0
  let changed = Deferred.makeUnsafe<void>()

  const bump = () => {
    version++
    const previous = changed
    changed = Deferred.makeUnsafe<void>()
    Deferred.doneUnsafe(previous, Effect.void)
  }

  const removeEntry = (entry: MutableEntry) => {
    entries.delete(entry.key)
    const onPort = byPort.get(entry.route.port)
    if (onPort !== undefined) {
      const rest = onPort.filter((e) => e !== entry)
      if (rest.length === 0) byPort.delete(entry.route.port)
      else byPort.set(entry.route.port, rest)
    }
    bump()
  }

  const expireLater = (entry: MutableEntry) =>
    closing ? Effect.void : FiberMap.run(
      expiries,
      entry.key,
      Effect.sleep(gracePeriod).pipe(
        Effect.andThen(Effect.sync(() => {
          if (entries.get(entry.key) === entry && entry.backends.length === 0) removeEntry(entry)
        }))
      )
    )

  const unregister = (entry: MutableEntry, backend: Backend) =>
    Effect.suspend(() => {
      const index = entry.backends.indexOf(backend)
      if (index === -1) return Effect.void
      entry.backends.splice(index, 1)
      if (entry.backends.length > 0) {
        bump()
        return Effect.void
      }
      return Effect.clockWith((clock) =>
        Effect.suspend(() => {
          entry.emptySince = clock.currentTimeMillisUnsafe()
          bump()
          return expireLater(entry)
        })
      )
    })

  const register = Effect.fnUntraced(function*(route: RouteDefinition, backend: Backend) {
    const key = routeKey(route)
    let entry = entries.get(key)
    if (entry === undefined) {
      const conflict: RouteConflict | undefined = findConflict((byPort.get(route.port) ?? []).map((e) => e.route), route)
      if (conflict !== undefined) {
        return yield* new RegistryError({ reason: "Conflict", message: describeConflict(conflict) })
      }
      if (entries.size >= maxRoutes) {
        return yield* new RegistryError({ reason: "Limit", message: `the gateway already holds ${maxRoutes} routes` })
      }
      entry = { key, route, backends: [], cursor: 0, emptySince: undefined, owner: undefined }
      entries.set(key, entry)
      const onPort = byPort.get(route.port)
      if (onPort === undefined) byPort.set(route.port, [entry])
      else onPort.push(entry)
    } else if (ownershipConflict(entry.owner, backend.owner) !== undefined) {
      return yield* new RegistryError({ reason: "Conflict", message: `route ${key}: ${ownershipConflict(entry.owner, backend.owner)}` })
    } else if (entry.backends.length >= maxBackendsPerRoute) {
      return yield* new RegistryError({
        reason: "Limit",
        message: `route ${key} already has ${maxBackendsPerRoute} backends`
      })
    }
    const target = entry
    if (target.backends.includes(backend)) return
    yield* Effect.uninterruptible(Effect.gen(function*() {
      if (target.backends.length === 0) {
        yield* FiberMap.remove(expiries, key)
        target.emptySince = undefined
      }
      // the latest registration brings the current definition: a backend deployed with a renewed
      // certificate serves it at once, even while the backend it replaces is still there; a relay
      // backend (which carries no TLS certificate) does not replace the definition of a local one
      if (backend.relayedVia === undefined || !target.backends.some((b) => b.relayedVia === undefined)) target.route = route
      target.owner ??= backend.owner
      target.backends.push(backend)
      bump()
      yield* Effect.addFinalizer(() => unregister(target, backend))
    }))
  })

  return Registry.of({
    gracePeriod,
    register,
    match: (query) => bestMatchBy(byPort.get(query.port) ?? emptyEntries, routeOfEntry, query),
    routesOnPort: (port) => byPort.get(port) ?? emptyEntries,
    ports: () => {
      const out = new Map<number, PortKind>()
      for (const [port, onPort] of byPort) out.set(port, portKind(onPort[0]!.route))
      return out
    },
    version: () => version,
    awaitChange: (since) => Effect.suspend(() => since < version ? Effect.void : Deferred.await(changed)),
    snapshot: () => [...entries.values()],
    touch: bump
  })
})

const emptyEntries: Array<MutableEntry> = []
const routeOfEntry = (entry: RouteEntry): RouteDefinition => entry.route
