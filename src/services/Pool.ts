/**
 * The wsp server's connection pool: connections registered per client id, each idle, busy or gone;
 * `take` hands out an idle one (the dispatcher's pick among client ids: the fewest busy connections
 * among those with an idle one, round-robin among equals; that client's most recently used) or waits up
 * to the configured timeout; surplus idle connections are closed after the idle timeout.
 * It never sends anything on a connection and never gives a busy connection a second request.
 */
import { Clock, Context, Effect, Layer, Option, Schema } from "effect"
import type { Scope } from "effect"
import { type Pickable, pickAmong, type PickSet } from "./Dispatcher.ts"

/** Something the pool can hold: it only needs to be closable. */
export interface PoolMember {
  /** Closes the underlying connection; the owner then calls `remove`. */
  readonly close: (reason: string) => void
}

/** Why a connection could not be handed out or registered (messages are wsp's where wsp has one). */
export class PoolError extends Schema.TaggedError<PoolError>()("PoolError", {
  reason: Schema.Literals(["NoPool", "Timeout", "TooManyWaiters", "PoolFull", "TooManyPools", "Closed"]),
  message: Schema.String
}) {}

/** Pool settings; every bound is named here. */
export interface PoolOptions {
  /** How long `take` waits for an idle connection, ms; 0 means it does not wait. */
  readonly timeout: number
  /** How long a surplus idle connection (beyond the client's announced size) is kept, ms. */
  readonly idleTimeout: number
  /** How often idle connections and empty pools are swept, ms (wsp: 5 s). */
  readonly cleanInterval: number
  /** Most distinct client ids. */
  readonly maxPools: number
  /** Most connections per client id. */
  readonly maxConnectionsPerPool: number
  /** Most `take` calls waiting at once. */
  readonly maxWaiters: number
}

/** wsp's sweep period. */
export const defaultCleanInterval = 5_000

/** Counts per state across every client id. */
export interface PoolStats {
  readonly pools: number
  readonly idle: number
  readonly busy: number
}

/** The pool's operations, typed by the member kind. */
export interface PoolHandle<M extends PoolMember> {
  /** Adds a connection from client `id`, which asked to keep `size` idle; it starts idle. */
  readonly register: (id: string, size: number, member: M) => Effect.Effect<void, PoolError>
  /** Takes an idle connection, waiting up to `timeout`; the caller owns it until `release`/`remove`. */
  readonly take: Effect.Effect<M, PoolError>
  /** An idle connection right now, marked busy, or undefined (no waiting; for hot paths). */
  readonly tryTake: () => M | undefined
  /** Returns a busy connection to the idle set (or straight to a waiting `take`). */
  readonly release: (member: M) => Effect.Effect<void>
  /** `release` as a plain call, for hot paths (time comes from the pool's `Clock`). */
  readonly releaseNow: (member: M) => void
  /** Forgets a connection (closed or thrown away); safe to call more than once. */
  readonly remove: (member: M) => void
  /** Closes idle connections past the idle timeout and drops empty pools now. */
  readonly clean: Effect.Effect<void>
  /** Current counts. */
  readonly stats: () => PoolStats
  /** Every member currently held, idle or busy. */
  readonly members: () => ReadonlyArray<M>
}

interface Entry<M> {
  readonly member: M
  readonly pool: ClientPool<M>
  status: "idle" | "busy" | "closed"
  idleSince: number
}

/**
 * One client id's connections, as the dispatcher's pick sees a backend: its load is its busy
 * connections, and it has room while one is idle.
 */
class ClientPool<M> implements Pickable {
  readonly id: string
  size: number
  readonly entries = new Set<Entry<M>>()
  /** Idle entries, most recently released last. */
  readonly idle: Array<Entry<M>> = []
  constructor(id: string, size: number) {
    this.id = id
    this.size = size
  }
  get inFlight(): number {
    return this.entries.size - this.idle.length
  }
  readonly isClosed = (): boolean => false
  readonly hasCapacity = (): boolean => this.idle.length > 0
}

interface Waiter<M> {
  resume: ((result: Effect.Effect<M, PoolError>) => void) | undefined
  handed: M | undefined
}

const noPool = () => new PoolError({ reason: "NoPool", message: "No proxy available" })
const timedOut = () => new PoolError({ reason: "Timeout", message: "Unable to get a proxy connection" })

/** Builds a pool whose sweeper runs until the scope closes; closing it closes every member. */
export const makePool = <M extends PoolMember>(options: PoolOptions): Effect.Effect<PoolHandle<M>, never, Scope.Scope> =>
  Effect.gen(function*() {
    // the Clock in effect where the pool is made (TestClock in tests), read synchronously on hot paths
    const clock = yield* Clock.Clock
    const pools = new Map<string, ClientPool<M>>()
    // the client ids in registration order, with the round-robin cursor of the dispatcher's pick
    const order: PickSet<ClientPool<M>> & { backends: Array<ClientPool<M>> } = { backends: [], cursor: 0 }
    const entries = new Map<M, Entry<M>>()
    const waiters: Array<Waiter<M>> = []
    let closed = false

    /** The dispatcher's pick among client ids with an idle connection, then that client's latest. */
    const takeIdle = (): Entry<M> | undefined => {
      const pool = pickAmong(order, { whenFull: "none" })
      const entry = pool?.idle.pop()
      if (entry === undefined) return undefined
      entry.status = "busy"
      return entry
    }

    const dropPool = (pool: ClientPool<M>): void => {
      pools.delete(pool.id)
      const i = order.backends.indexOf(pool)
      if (i >= 0) order.backends.splice(i, 1)
      if (order.cursor >= order.backends.length) order.cursor = 0
    }

    const offer = (entry: Entry<M>, now: number): void => {
      entry.idleSince = now
      for (;;) {
        const waiter = waiters.shift()
        if (waiter === undefined) break
        if (waiter.resume === undefined) continue
        entry.status = "busy"
        waiter.handed = entry.member
        const resume = waiter.resume
        waiter.resume = undefined
        resume(Effect.succeed(entry.member))
        return
      }
      entry.status = "idle"
      entry.pool.idle.push(entry)
    }

    const remove = (member: M): void => {
      const entry = entries.get(member)
      if (entry === undefined) return
      entries.delete(member)
      entry.status = "closed"
      entry.pool.entries.delete(entry)
      const i = entry.pool.idle.indexOf(entry)
      if (i >= 0) entry.pool.idle.splice(i, 1)
    }

    const releaseNow = (member: M): void => {
      const entry = entries.get(member)
      if (entry === undefined || entry.status !== "busy") return
      offer(entry, clock.currentTimeMillisUnsafe())
    }

    const release = (member: M) => Effect.sync(() => releaseNow(member))

    const tryTake = (): M | undefined => (closed ? undefined : takeIdle()?.member)

    const register = (id: string, size: number, member: M) =>
      Effect.suspend(() => {
        const now = clock.currentTimeMillisUnsafe()
        if (closed) return Effect.fail(new PoolError({ reason: "Closed", message: "pool is shutting down" }))
        let pool = pools.get(id)
        if (pool === undefined) {
          if (pools.size >= options.maxPools) {
            return Effect.fail(new PoolError({ reason: "TooManyPools", message: `more than ${options.maxPools} client ids` }))
          }
          pool = new ClientPool<M>(id, size)
          pools.set(id, pool)
          order.backends.push(pool)
        }
        if (pool.entries.size >= options.maxConnectionsPerPool) {
          return Effect.fail(
            new PoolError({ reason: "PoolFull", message: `client ${id} already has ${options.maxConnectionsPerPool} connections` })
          )
        }
        pool.size = size
        const entry: Entry<M> = { member, pool, status: "busy", idleSince: now }
        pool.entries.add(entry)
        entries.set(member, entry)
        offer(entry, now)
        return Effect.void
      })

    const wait = Effect.suspend(() => {
      if (waiters.length >= options.maxWaiters) {
        return Effect.fail(new PoolError({ reason: "TooManyWaiters", message: `more than ${options.maxWaiters} requests waiting for a connection` }))
      }
      const waiter: Waiter<M> = { resume: undefined, handed: undefined }
      const handBack = Effect.suspend(() => {
        waiter.resume = undefined
        const handed = waiter.handed
        waiter.handed = undefined
        return handed === undefined ? Effect.void : release(handed)
      })
      return Effect.callback<M, PoolError>((resume) => {
        waiter.resume = resume
        waiters.push(waiter)
      }).pipe(
        Effect.timeoutOption(options.timeout),
        Effect.flatMap((got) => {
          waiter.resume = undefined
          // a connection handed over in the same instant the timer fired is used, not lost
          const handed = Option.isSome(got) ? got.value : waiter.handed
          waiter.handed = undefined
          return handed === undefined ? Effect.fail(timedOut()) : Effect.succeed(handed)
        }),
        Effect.onInterrupt(() => handBack)
      )
    })

    const take: Effect.Effect<M, PoolError> = Effect.suspend(() => {
      if (closed) return Effect.fail(new PoolError({ reason: "Closed", message: "pool is shutting down" }))
      if (pools.size === 0) return Effect.fail(noPool())
      const entry = takeIdle()
      if (entry !== undefined) return Effect.succeed(entry.member)
      if (options.timeout <= 0) return Effect.fail(timedOut())
      return wait
    })

    const clean = Effect.sync(() => {
      const now = clock.currentTimeMillisUnsafe()
      for (const pool of [...pools.values()]) {
        // keep the `size` most recently used idle connections; older surplus ones go after idleTimeout
        const surplus = pool.idle.length - pool.size
        const victims = pool.idle.slice(0, Math.max(0, surplus)).filter((e) => now - e.idleSince > options.idleTimeout)
        for (const entry of victims) {
          remove(entry.member)
          entry.member.close("idle timeout")
        }
        if (pool.entries.size === 0) dropPool(pool)
      }
    })

    const stats = (): PoolStats => {
      let idle = 0
      let busy = 0
      for (const entry of entries.values()) {
        if (entry.status === "idle") idle++
        else if (entry.status === "busy") busy++
      }
      return { pools: pools.size, idle, busy }
    }

    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        closed = true
        for (const waiter of waiters.splice(0)) {
          const resume = waiter.resume
          waiter.resume = undefined
          resume?.(Effect.fail(new PoolError({ reason: "Closed", message: "pool is shutting down" })))
        }
        for (const entry of [...entries.values()]) {
          remove(entry.member)
          entry.member.close("server shutting down")
        }
        pools.clear()
        order.backends.length = 0
      })
    )

    yield* Effect.forkScoped(Effect.forever(Effect.andThen(Effect.sleep(options.cleanInterval), clean)))

    return {
      register,
      take,
      tryTake,
      release,
      releaseNow,
      remove,
      clean,
      stats,
      members: () => [...entries.keys()]
    } satisfies PoolHandle<M>
  })

/** The pool as a service, for code that only needs `PoolMember`s. */
export class Pool extends Context.Service<Pool, PoolHandle<PoolMember>>()("switchyard/Pool") {
  static readonly layer = (options: PoolOptions): Layer.Layer<Pool> => Layer.effect(Pool, makePool<PoolMember>(options))
}
