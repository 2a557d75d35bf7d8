import { describe, expect, it } from "@effect/vitest"
import { Effect, Exit, Fiber, Option, Scope } from "effect"
import { TestClock } from "effect/testing"
import type { PoolMember, PoolOptions } from "../../src/services/Pool.ts"
import { makePool, PoolError } from "../../src/services/Pool.ts"

interface Member extends PoolMember {
  readonly name: string
  closed: Array<string>
}

const member = (name: string): Member => {
  const m: Member = { name, closed: [], close: (reason) => void m.closed.push(reason) }
  return m
}

const options: PoolOptions = {
  timeout: 1000,
  idleTimeout: 60_000,
  cleanInterval: 5_000,
  maxPools: 4,
  maxConnectionsPerPool: 3,
  maxWaiters: 2
}

const reason = <A>(exit: Exit.Exit<A, PoolError>) =>
  Exit.isFailure(exit) ? Option.getOrUndefined(Exit.findErrorOption(exit))?.reason : "success"

describe("Pool", () => {
  it.effect("fails at once with wsp's message when no client has registered", () =>
    Effect.gen(function*() {
      const pool = yield* makePool<Member>(options)
      const error = yield* Effect.flip(pool.take)
      expect(error).toBeInstanceOf(PoolError)
      expect([error.reason, error.message]).toEqual(["NoPool", "No proxy available"])
    }))

  it.effect("never hands out a busy connection, and a released one goes to the next taker", () =>
    Effect.gen(function*() {
      const pool = yield* makePool<Member>(options)
      const a = member("a")
      const b = member("b")
      yield* pool.register("client", 2, a)
      yield* pool.register("client", 2, b)
      const first = yield* pool.take
      const second = yield* pool.take
      expect(new Set([first, second])).toEqual(new Set([a, b]))
      expect(pool.stats()).toEqual({ pools: 1, idle: 0, busy: 2 })
      const waiting = yield* Effect.forkChild(pool.take)
      yield* Effect.yieldNow
      yield* pool.release(first)
      expect(yield* Fiber.join(waiting)).toBe(first)
      expect(pool.stats()).toEqual({ pools: 1, idle: 0, busy: 2 })
      // releasing twice (or releasing an idle one) changes nothing
      yield* pool.release(second)
      yield* pool.release(second)
      expect(pool.stats()).toEqual({ pools: 1, idle: 1, busy: 1 })
    }))

  it.effect("waits up to the timeout for an idle connection, in virtual time", () =>
    Effect.gen(function*() {
      const pool = yield* makePool<Member>(options)
      const a = member("a")
      yield* pool.register("client", 1, a)
      yield* pool.take
      const waiting = yield* Effect.forkChild(Effect.exit(pool.take))
      yield* TestClock.adjust(999)
      expect(waiting.pollUnsafe()).toBeUndefined()
      yield* TestClock.adjust(1)
      const exit = yield* Fiber.join(waiting)
      expect(reason(exit)).toBe("Timeout")
      expect(Option.getOrUndefined(Exit.findErrorOption(exit))?.message).toBe("Unable to get a proxy connection")
    }))

  it.effect("does not wait at all when the timeout is 0 (wsp's select default)", () =>
    Effect.gen(function*() {
      const pool = yield* makePool<Member>({ ...options, timeout: 0 })
      yield* pool.register("client", 1, member("a"))
      yield* pool.take
      expect(reason(yield* Effect.exit(pool.take))).toBe("Timeout")
    }))

  it.effect("bounds waiters, connections per client and client ids", () =>
    Effect.gen(function*() {
      const pool = yield* makePool<Member>(options)
      yield* pool.register("c", 1, member("a"))
      yield* pool.take
      yield* Effect.forkChild(pool.take)
      yield* Effect.forkChild(pool.take)
      yield* Effect.yieldNow
      expect(reason(yield* Effect.exit(pool.take))).toBe("TooManyWaiters")
      yield* pool.register("c", 1, member("b"))
      yield* pool.register("c", 1, member("c"))
      expect(reason(yield* Effect.exit(pool.register("c", 1, member("d"))))).toBe("PoolFull")
      for (const id of ["p2", "p3", "p4"]) yield* pool.register(id, 1, member(id))
      expect(reason(yield* Effect.exit(pool.register("p5", 1, member("p5"))))).toBe("TooManyPools")
    }))

  it.effect("closes surplus idle connections after the idle timeout and keeps the announced size", () =>
    Effect.gen(function*() {
      const pool = yield* makePool<Member>({ ...options, maxConnectionsPerPool: 10 })
      const members = ["a", "b", "c", "d"].map(member)
      for (const m of members) yield* pool.register("client", 2, m)
      yield* TestClock.adjust(59_000)
      expect(members.every((m) => m.closed.length === 0)).toBe(true)
      yield* TestClock.adjust(6_000)
      const closed = members.filter((m) => m.closed.length > 0)
      expect(closed.length).toBe(2)
      expect(closed[0]!.closed).toEqual(["idle timeout"])
      expect(pool.stats()).toEqual({ pools: 1, idle: 2, busy: 0 })
    }))

  it.effect("keeps an empty pool until the sweep, so requests wait for a reconnecting client", () =>
    Effect.gen(function*() {
      const pool = yield* makePool<Member>(options)
      const a = member("a")
      yield* pool.register("client", 1, a)
      pool.remove(a)
      const waiting = yield* Effect.forkChild(pool.take)
      yield* Effect.yieldNow
      const b = member("b")
      yield* pool.register("client", 1, b)
      expect(yield* Fiber.join(waiting)).toBe(b)
      pool.remove(b)
      yield* TestClock.adjust(5_000)
      expect(pool.stats().pools).toBe(0)
      expect(reason(yield* Effect.exit(pool.take))).toBe("NoPool")
    }))

  it.effect("round-robins across client ids", () =>
    Effect.gen(function*() {
      const pool = yield* makePool<Member>(options)
      const a = member("a")
      const b = member("b")
      yield* pool.register("one", 1, a)
      yield* pool.register("two", 1, b)
      const x = yield* pool.take
      yield* pool.release(x)
      const y = yield* pool.take
      expect(x).not.toBe(y)
    }))

  it.effect("closes every member and fails waiters when its scope closes", () =>
    Effect.gen(function*() {
      const scope = yield* Scope.make()
      const pool = yield* makePool<Member>(options).pipe(Scope.provide(scope))
      const a = member("a")
      yield* pool.register("client", 1, a)
      yield* pool.take
      const waiting = yield* Effect.forkChild(Effect.exit(pool.take))
      yield* Effect.yieldNow
      yield* Scope.close(scope, Exit.void)
      expect(reason(yield* Fiber.join(waiting))).toBe("Closed")
      expect(a.closed).toEqual(["server shutting down"])
      expect(pool.stats()).toEqual({ pools: 0, idle: 0, busy: 0 })
    }))

  it.effect("a taker interrupted after being handed a connection gives it back", () =>
    Effect.gen(function*() {
      const pool = yield* makePool<Member>(options)
      const a = member("a")
      yield* pool.register("client", 1, a)
      yield* pool.take
      const waiting = yield* Effect.forkChild(pool.take)
      yield* Effect.yieldNow
      yield* Fiber.interrupt(waiting)
      yield* pool.release(a)
      expect(pool.stats()).toEqual({ pools: 1, idle: 1, busy: 0 })
    }))

  it.effect("tryTake and releaseNow work without waiting and keep virtual time for the idle sweep", () =>
    Effect.gen(function*() {
      const pool = yield* makePool<Member>({ ...options, maxConnectionsPerPool: 10 })
      expect(pool.tryTake()).toBeUndefined()
      const a = member("a")
      const b = member("b")
      yield* pool.register("client", 1, a)
      yield* pool.register("client", 1, b)
      const x = pool.tryTake()!
      const y = pool.tryTake()!
      expect(new Set([x, y])).toEqual(new Set([a, b]))
      expect(pool.tryTake()).toBeUndefined()
      yield* TestClock.adjust(30_000)
      pool.releaseNow(x)
      yield* TestClock.adjust(30_000)
      pool.releaseNow(y)
      // x, idle since 30 s and surplus (size 1, y is the most recent), goes at the first sweep after
      // 90 s (the sweep at 90 s sees exactly 60 s, not more)
      yield* TestClock.adjust(30_000)
      expect(x.closed).toEqual([])
      yield* TestClock.adjust(5_000)
      expect(x.closed).toEqual(["idle timeout"])
      expect(y.closed).toEqual([])
    }))
})
