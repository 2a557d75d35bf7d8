/**
 * The dispatcher in a cluster: local backends first, a relay backend only when the route has no live
 * local one, and never for a request that was itself relayed (`localOnly`), which waits for a local one.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Fiber, Layer, Scope } from "effect"
import { TestClock } from "effect/testing"
import type { RouteQuery } from "../../src/domain/Route.ts"
import type { Backend } from "../../src/services/Backend.ts"
import { DispatchError, Dispatcher } from "../../src/services/Dispatcher.ts"
import { Registry } from "../../src/services/Registry.ts"
import { makeTestBackend, type TestBackend } from "./RegistryBackends.ts"

const provide = <A, E>(self: Effect.Effect<A, E, Registry | Dispatcher>) =>
  Effect.provide(self, Dispatcher.layer({}).pipe(Layer.provideMerge(Registry.layer({ gracePeriod: 10_000 }))))

const query: RouteQuery = { _tag: "Http", port: 8000, host: "x.test", path: "/" }
const route = { _tag: "Http" as const, port: 8000 }
const relayBackend = (id: string): TestBackend & Backend => Object.assign(makeTestBackend(id), { relayedVia: "g2" })

describe("Dispatcher with relay backends", () => {
  it.effect("picks local backends while one is live, the relay backend only when none is, and never for a relayed request", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const dispatcher = yield* Dispatcher
      const relay = relayBackend("relay")
      const local = makeTestBackend("local")
      const scope = yield* Scope.make()
      yield* registry.register(route, relay).pipe(Scope.provide(scope))
      yield* registry.register(route, local).pipe(Scope.provide(scope))
      // even with the relay backend idle and the local one busy, the local one is picked
      const leases = []
      for (let i = 0; i < 4; i++) {
        const lease = dispatcher.tryAcquire(query)
        assert.isTrue(lease !== undefined && !(lease instanceof DispatchError))
        leases.push(lease as Exclude<typeof lease, undefined | DispatchError>)
      }
      assert.deepStrictEqual(leases.map((l) => l.backend.id), ["local", "local", "local", "local"])
      // `another` from a local lease does not fall over to the relay backend for a relayed request
      const relayed = dispatcher.tryAcquire(query, { localOnly: true })
      assert.strictEqual((relayed as { backend: Backend }).backend.id, "local")
      assert.isUndefined((relayed as { another: () => unknown }).another())
      leases.forEach((l) => l.release())
      ;(relayed as { release: () => void }).release()

      local.close()
      assert.strictEqual((dispatcher.tryAcquire(query) as { backend: Backend }).backend.id, "relay")
      // a relayed request never goes on to another gateway: it waits for a local backend
      assert.isUndefined(dispatcher.tryAcquire(query, { localOnly: true }))
      const waiting = yield* Effect.forkChild(dispatcher.acquire(query, { localOnly: true }))
      yield* Effect.yieldNow
      const back = makeTestBackend("back")
      yield* registry.register(route, back).pipe(Scope.provide(scope))
      const lease = yield* Fiber.join(waiting)
      assert.strictEqual(lease.backend.id, "back")
      yield* Scope.close(scope, Exit.void)
    })))

  it.effect("a relayed request with no local backend gets 503 after the grace period", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const dispatcher = yield* Dispatcher
      yield* registry.register(route, relayBackend("relay"))
      const waiting = yield* Effect.forkChild(Effect.flip(dispatcher.acquire(query, { localOnly: true })))
      yield* TestClock.adjust(10_000)
      const error = yield* Fiber.join(waiting)
      assert.strictEqual(error.status, 503)
    }).pipe(Effect.scoped)))
})
