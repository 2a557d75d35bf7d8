import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Fiber, Layer, Scope } from "effect"
import { TestClock } from "effect/testing"
import { ownershipConflict, Registry, RegistryError } from "../../src/services/Registry.ts"
import { makeTestBackend } from "./RegistryBackends.ts"

const provide = <A, E>(self: Effect.Effect<A, E, Registry>, config?: Parameters<typeof Registry.layer>[0]) =>
  Effect.provide(self, Registry.layer(config) as Layer.Layer<Registry>)

const query = (path: string, host = "x.test", port = 8000) => ({ _tag: "Http" as const, port, host, path })

describe("Registry", () => {
  it.effect("touch wakes what waits for a change", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const since = registry.version()
      const waiting = yield* Effect.forkChild(registry.awaitChange(since))
      yield* Effect.yieldNow
      registry.touch()
      yield* Fiber.join(waiting)
      assert.isAbove(registry.version(), since)
    })))

  it.effect("registers routes, matches them, and reports their ports", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const scope = yield* Scope.make()
      const a = makeTestBackend("a")
      const b = makeTestBackend("b")
      yield* registry.register({ _tag: "Http", port: 8000, pathPrefix: "/a" }, a).pipe(Scope.provide(scope))
      yield* registry.register({ _tag: "Http", port: 8000, pathPrefix: "/b" }, b).pipe(Scope.provide(scope))
      yield* registry.register({ _tag: "Tcp", port: 2222 }, a).pipe(Scope.provide(scope))
      assert.deepStrictEqual(registry.match(query("/a/1"))?.backends, [a])
      assert.deepStrictEqual(registry.match(query("/b"))?.backends, [b])
      assert.isUndefined(registry.match(query("/c")))
      assert.deepStrictEqual([...registry.ports()].sort(), [[2222, "tcp"], [8000, "http"]])
      yield* Scope.close(scope, Exit.void)
    })))

  it.effect("shares one route between backends asking for the same key", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const a = makeTestBackend("a")
      const b = makeTestBackend("b")
      yield* registry.register({ _tag: "Http", port: 8000 }, a)
      yield* registry.register({ _tag: "Http", port: 8000, pathPrefix: "/" }, b)
      assert.deepStrictEqual(registry.match(query("/"))?.backends, [a, b])
      assert.strictEqual(registry.snapshot().length, 1)
    }).pipe(Effect.scoped)))

  it.effect("a TLS route takes the certificate of its latest registration, while earlier backends stay", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const a = makeTestBackend("a")
      const b = makeTestBackend("b")
      const route = (cert: string) => ({ _tag: "Tls" as const, port: 8443, domainSuffix: "app.test", cert, key: "key", then: "http" as const })
      const tls = { _tag: "Tls" as const, port: 8443, serverName: "app.test", host: "app.test", path: "/" }
      yield* registry.register(route("old certificate"), a)
      yield* registry.register(route("renewed certificate"), b)
      const entry = registry.match(tls)
      assert.deepStrictEqual(entry?.backends, [a, b])
      assert.strictEqual(entry?.route._tag === "Tls" ? entry.route.cert : undefined, "renewed certificate")
    }).pipe(Effect.scoped)))

  it.effect("a relay backend of a TLS route (no certificate here) keeps the certificate of the local backends", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const local = makeTestBackend("local")
      const relay = { ...makeTestBackend("relay"), relayedVia: "g1" }
      const other = { ...makeTestBackend("relay-2"), relayedVia: "g3" }
      const withCert = { _tag: "Tls" as const, port: 8443, domainSuffix: "app.test", cert: "local certificate", key: "key", then: "http" as const }
      const relayed = { _tag: "Tls" as const, port: 8443, domainSuffix: "app.test", acme: true as const, then: "http" as const }
      const tls = { _tag: "Tls" as const, port: 8443, serverName: "app.test" }
      // a relay backend first: its definition until a local backend comes
      yield* registry.register(relayed, relay)
      const first = registry.match(tls)?.route
      assert.strictEqual(first?._tag === "Tls" ? first.acme : undefined, true)
      yield* registry.register(withCert, local)
      yield* registry.register(relayed, other)
      const entry = registry.match(tls)
      assert.deepStrictEqual(entry?.backends, [relay, local, other])
      assert.strictEqual(entry?.route._tag === "Tls" ? entry.route.cert : undefined, "local certificate")
    }).pipe(Effect.scoped)))

  it.effect("refuses a port wanted as TCP and as HTTP, and a route beyond the limit", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const a = makeTestBackend("a")
      yield* registry.register({ _tag: "Http", port: 8000 }, a)
      const conflict = yield* Effect.flip(registry.register({ _tag: "Tcp", port: 8000 }, a))
      assert.instanceOf(conflict, RegistryError)
      assert.strictEqual(conflict.reason, "Conflict")
      yield* registry.register({ _tag: "Http", port: 8001 }, a)
      const limit = yield* Effect.flip(registry.register({ _tag: "Http", port: 8002 }, a))
      assert.strictEqual(limit.reason, "Limit")
    }).pipe(Effect.scoped), { maxRoutes: 2 }))

  it.effect("keeps an empty route for the grace period, then removes it", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const scope = yield* Scope.make()
      yield* registry.register({ _tag: "Http", port: 8000, pathPrefix: "/a" }, makeTestBackend("a")).pipe(Scope.provide(scope))
      yield* Scope.close(scope, Exit.void)
      const entry = registry.match(query("/a"))
      assert.isDefined(entry)
      assert.strictEqual(entry!.backends.length, 0)
      assert.strictEqual(entry!.emptySince, 0)
      yield* TestClock.adjust("29 seconds")
      assert.isDefined(registry.match(query("/a")))
      assert.isTrue(registry.ports().has(8000))
      yield* TestClock.adjust("1 second")
      assert.isUndefined(registry.match(query("/a")))
      assert.isFalse(registry.ports().has(8000))
    })))

  it.effect("a backend returning within the grace period keeps the route", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const first = yield* Scope.make()
      yield* registry.register({ _tag: "Tcp", port: 2222 }, makeTestBackend("a")).pipe(Scope.provide(first))
      yield* Scope.close(first, Exit.void)
      yield* TestClock.adjust("5 seconds")
      const b = makeTestBackend("b")
      yield* registry.register({ _tag: "Tcp", port: 2222 }, b)
      yield* TestClock.adjust("1 minute")
      assert.deepStrictEqual(registry.match({ _tag: "Tcp", port: 2222 })?.backends, [b])
      assert.isUndefined(registry.match({ _tag: "Tcp", port: 2222 })?.emptySince)
    }).pipe(Effect.scoped), { gracePeriod: "10 seconds" }))

  it.effect("wakes waiters on every change", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const since = registry.version()
      const waiter = yield* Effect.forkChild(registry.awaitChange(since))
      yield* Effect.yieldNow
      assert.isUndefined(waiter.pollUnsafe())
      yield* registry.register({ _tag: "Tcp", port: 2222 }, makeTestBackend("a"))
      yield* Fiber.join(waiter)
      assert.isTrue(registry.version() > since)
      // an already-passed version returns at once
      yield* registry.awaitChange(since)
    }).pipe(Effect.scoped)))
})

describe("Registry route ownership", () => {
  const owned = (id: string, name: string, shares = false) => ({ ...makeTestBackend(id), owner: { name, shares } })
  const route = { _tag: "Http" as const, port: 8000, domainSuffix: "a.example.com" }

  it("lets a token join its own routes, and another token only when both share", () => {
    const a = { name: "a", shares: false }
    const b = { name: "b", shares: false }
    assert.isUndefined(ownershipConflict(a, a))
    assert.isUndefined(ownershipConflict(undefined, b))
    assert.isUndefined(ownershipConflict(a, undefined))
    assert.match(ownershipConflict(a, b)!, /belongs to another token/)
    assert.match(ownershipConflict({ name: "a", shares: true }, b)!, /share_routes/)
    assert.match(ownershipConflict(a, { name: "b", shares: true })!, /share_routes/)
    assert.isUndefined(ownershipConflict({ name: "a", shares: true }, { name: "b", shares: true }))
  })

  it.effect("refuses another token's backend on an owned route, through the grace period, and takes it once the route is gone", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const first = yield* Scope.make()
      yield* registry.register(route, owned("a1", "team-a")).pipe(Scope.provide(first))
      // the same token joins; another one does not
      yield* registry.register(route, owned("a2", "team-a")).pipe(Scope.provide(first))
      const refused = yield* Effect.flip(registry.register(route, owned("b1", "team-b")))
      assert.strictEqual(refused.reason, "Conflict")
      assert.match(refused.message, /belongs to another token/)
      // a different route on the same port is not the owned one
      yield* registry.register({ _tag: "Http", port: 8000, domainSuffix: "b.example.com" }, owned("b2", "team-b"))
      yield* Scope.close(first, Exit.void)
      yield* TestClock.adjust("9 seconds")
      assert.strictEqual((yield* Effect.flip(registry.register(route, owned("b3", "team-b")))).reason, "Conflict")
      yield* TestClock.adjust("1 second")
      // the grace period is over: the route is gone, the next token owns it
      yield* registry.register(route, owned("b4", "team-b"))
      assert.strictEqual(registry.match({ _tag: "Http", port: 8000, host: "a.example.com", path: "/" })?.owner?.name, "team-b")
      assert.strictEqual((yield* Effect.flip(registry.register(route, owned("a3", "team-a")))).reason, "Conflict")
    }).pipe(Effect.scoped), { gracePeriod: "10 seconds" }))

  it.effect("tokens that both share join each other's routes; backends without an owner are not checked", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      yield* registry.register(route, owned("a", "team-a", true))
      yield* registry.register(route, owned("b", "team-b", true))
      yield* registry.register(route, makeTestBackend("embedded"))
      assert.strictEqual((yield* Effect.flip(registry.register(route, owned("c", "team-c")))).reason, "Conflict")
      assert.deepStrictEqual(registry.match({ _tag: "Http", port: 8000, host: "a.example.com", path: "/" })?.backends.map((b) => b.id), ["a", "b", "embedded"])
    }).pipe(Effect.scoped)))
})
