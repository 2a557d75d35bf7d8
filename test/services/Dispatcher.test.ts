import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Fiber, Layer, Scope } from "effect"
import { TestClock } from "effect/testing"
import type { RouteQuery } from "../../src/domain/Route.ts"
import { DispatchError, Dispatcher, type DispatcherConfig } from "../../src/services/Dispatcher.ts"
import { Registry, type RegistryConfig } from "../../src/services/Registry.ts"
import { makeTestBackend } from "./RegistryBackends.ts"

const provide = <A, E>(
  self: Effect.Effect<A, E, Registry | Dispatcher>,
  config: { registry?: RegistryConfig; dispatcher?: DispatcherConfig } = {}
) => Effect.provide(self, Dispatcher.layer(config.dispatcher).pipe(Layer.provideMerge(Registry.layer(config.registry))))

const atA: RouteQuery = { _tag: "Http", port: 8000, host: "x.test", path: "/a/1" }

describe("Dispatcher", () => {
  it.effect("fails with NoRoute (404) when nothing matches", () =>
    provide(Effect.gen(function*() {
      const dispatcher = yield* Dispatcher
      const error = yield* Effect.flip(dispatcher.acquire(atA))
      assert.instanceOf(error, DispatchError)
      assert.strictEqual(error.reason, "NoRoute")
      assert.strictEqual(error.status, 404)
    })))

  it.effect("spreads load: least in flight, round-robin among equals", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const dispatcher = yield* Dispatcher
      const backends = ["a", "b", "c"].map(makeTestBackend)
      for (const b of backends) yield* registry.register({ _tag: "Http", port: 8000, pathPrefix: "/a" }, b)
      // released at once: strict rotation
      const order: Array<string> = []
      for (let i = 0; i < 6; i++) {
        const lease = yield* dispatcher.acquire(atA)
        order.push(lease.backend.id)
        lease.release()
        lease.release()
      }
      assert.deepStrictEqual(order, ["a", "b", "c", "a", "b", "c"])
      // held: each backend gets the same share, and a busy one is avoided
      const held = []
      for (let i = 0; i < 6; i++) held.push(yield* dispatcher.acquire(atA))
      assert.deepStrictEqual(backends.map((b) => b.inFlight), [2, 2, 2])
      held[0]!.release()
      const next = yield* dispatcher.acquire(atA)
      assert.strictEqual(next.backend.id, held[0]!.backend.id)
      for (const l of [...held, next]) l.release()
      assert.deepStrictEqual(backends.map((b) => b.inFlight), [0, 0, 0])
    }).pipe(Effect.scoped)))

  it.effect("capacity: a backend without room is passed over; all full, the least loaded; another() takes only room", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const dispatcher = yield* Dispatcher
      // each backend has room for `slots` leases, as an HTTP/2 connection has stream slots
      const slots = new Map<string, number>([["a", 1], ["b", 3], ["c", 3]])
      const backends = ["a", "b", "c"].map((id) => {
        const backend = makeTestBackend(id)
        return Object.assign(backend, { hasCapacity: () => backend.inFlight < slots.get(id)! })
      })
      for (const b of backends) yield* registry.register({ _tag: "Http", port: 8000, pathPrefix: "/a" }, b)
      const held = []
      for (let i = 0; i < 7; i++) held.push(yield* dispatcher.acquire(atA))
      // `a` is full after one lease: the others share the rest, every slot is used before any is exceeded
      assert.deepStrictEqual(backends.map((b) => b.inFlight), [1, 3, 3])
      // all full: the least loaded takes the request (its front door holds it until a slot frees)
      const overflow = yield* dispatcher.acquire(atA)
      assert.strictEqual(overflow.backend.id, "a")
      // a move to another backend goes through the same pick, and only to one with room
      assert.isUndefined(overflow.another())
      held.find((l) => l.backend.id === "c")!.release()
      const moved = overflow.another()
      assert.strictEqual(moved?.backend.id, "c")
      assert.isUndefined(moved!.another((b) => b.id !== "c"))
      for (const l of [...held, overflow, moved!]) l.release()
      assert.deepStrictEqual(backends.map((b) => b.inFlight), [0, 0, 0])
      // once free again, sequential leases rotate over all three
      const order: Array<string> = []
      for (let i = 0; i < 6; i++) {
        const lease = yield* dispatcher.acquire(atA)
        order.push(lease.backend.id)
        lease.release()
      }
      assert.deepStrictEqual([...order].sort(), ["a", "a", "b", "b", "c", "c"])
    }).pipe(Effect.scoped)))

  it.effect("skips backends that have closed", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const dispatcher = yield* Dispatcher
      const a = makeTestBackend("a")
      const b = makeTestBackend("b")
      yield* registry.register({ _tag: "Http", port: 8000 }, a)
      yield* registry.register({ _tag: "Http", port: 8000 }, b)
      a.close()
      for (let i = 0; i < 3; i++) {
        const lease = yield* dispatcher.acquire(atA)
        assert.strictEqual(lease.backend.id, "b")
        lease.release()
      }
    }).pipe(Effect.scoped)))

  it.effect("waits for a backend that returns within the grace period", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const dispatcher = yield* Dispatcher
      const old = yield* Scope.make()
      yield* registry.register({ _tag: "Http", port: 8000, pathPrefix: "/a" }, makeTestBackend("old")).pipe(Scope.provide(old))
      yield* Scope.close(old, Exit.void)
      const pending = yield* Effect.forkChild(dispatcher.acquire(atA))
      yield* TestClock.adjust("10 seconds")
      assert.strictEqual(dispatcher.waiting(), 1)
      yield* registry.register({ _tag: "Http", port: 8000, pathPrefix: "/a" }, makeTestBackend("new"))
      const lease = yield* Fiber.join(pending)
      assert.strictEqual(lease.backend.id, "new")
      assert.strictEqual(dispatcher.waiting(), 0)
    }).pipe(Effect.scoped)))

  it.effect("gives up with NoBackend (503) after the wait bound", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const dispatcher = yield* Dispatcher
      const old = yield* Scope.make()
      yield* registry.register({ _tag: "Tcp", port: 2222 }, makeTestBackend("old")).pipe(Scope.provide(old))
      yield* Scope.close(old, Exit.void)
      const pending = yield* Effect.forkChild(Effect.flip(dispatcher.acquire({ _tag: "Tcp", port: 2222 })))
      yield* TestClock.adjust("29 seconds")
      assert.isUndefined(pending.pollUnsafe())
      yield* TestClock.adjust("1 second")
      const error = yield* Fiber.join(pending)
      assert.strictEqual(error.reason, "NoBackend")
      assert.strictEqual(error.status, 503)
      assert.strictEqual(dispatcher.waiting(), 0)
      // the route expired with the grace period: now it is unknown
      assert.strictEqual((yield* Effect.flip(dispatcher.acquire({ _tag: "Tcp", port: 2222 }))).reason, "NoRoute")
    })))

  it.effect("bounds the number of waiters (QueueFull, 503)", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const dispatcher = yield* Dispatcher
      const old = yield* Scope.make()
      yield* registry.register({ _tag: "Tcp", port: 2222 }, makeTestBackend("old")).pipe(Scope.provide(old))
      yield* Scope.close(old, Exit.void)
      const q: RouteQuery = { _tag: "Tcp", port: 2222 }
      const w1 = yield* Effect.forkChild(dispatcher.acquire(q))
      const w2 = yield* Effect.forkChild(dispatcher.acquire(q))
      yield* Effect.yieldNow
      const full = yield* Effect.flip(dispatcher.acquire(q))
      assert.strictEqual(full.reason, "QueueFull")
      assert.strictEqual(full.status, 503)
      const b = makeTestBackend("b")
      yield* registry.register({ _tag: "Tcp", port: 2222 }, b)
      yield* Fiber.join(w1)
      yield* Fiber.join(w2)
      assert.strictEqual(b.inFlight, 2)
    }).pipe(Effect.scoped), { dispatcher: { maxWaiting: 2 } }))
})
