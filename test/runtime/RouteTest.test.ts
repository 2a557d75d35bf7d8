/**
 * The gateway's route test against a live routing table (a real Registry): which route a URL reaches,
 * what its backend reads, who owns it, which backends serve it, and the verdict when none does.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Layer, Scope } from "effect"
import { TestClock } from "effect/testing"
import { renderRouteTest } from "../../src/runtime/commands/route.ts"
import { type RouteTestAnswer, routeTestQuery, testRoute } from "../../src/runtime/server/RouteTest.ts"
import { Registry } from "../../src/services/Registry.ts"
import { makeTestBackend } from "../services/RegistryBackends.ts"

const provide = <A, E>(self: Effect.Effect<A, E, Registry | Scope.Scope>) =>
  Effect.provide(Effect.scoped(self), Registry.layer({ gracePeriod: "10 seconds" }) as Layer.Layer<Registry>)

const answer = (result: ReturnType<typeof testRoute>): RouteTestAnswer => {
  assert.isFalse("error" in result, JSON.stringify(result))
  return result as RouteTestAnswer
}

describe("route test", () => {
  it.effect("names the route, the forwarded path, the owner and the backends of a URL", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const a = { ...makeTestBackend("a"), label: "s1 svc#1", owner: { name: "team-a", shares: false } }
      const b = { ...makeTestBackend("b"), label: "s2 svc#1", owner: { name: "team-a", shares: false }, inFlight: 2 }
      yield* registry.register({ _tag: "Http", port: 8000, domainSuffix: "a.example.com", pathPrefix: "/app", stripPrefix: true }, a)
      yield* registry.register({ _tag: "Http", port: 8000, domainSuffix: "a.example.com", pathPrefix: "/app", stripPrefix: true }, b)
      yield* registry.register({ _tag: "Http", port: 8000 }, makeTestBackend("root"))
      b.close()
      const hit = answer(testRoute(registry, "http://A.Example.com:8000/app/x/../users?id=1"))
      assert.deepStrictEqual(hit, {
        url: "http://A.Example.com:8000/app/x/../users?id=1",
        port: 8000,
        portKind: "http",
        route: "http:8000:a.example.com:/app",
        description: "http :8000 a.example.com/app (prefix stripped)",
        forwardedPath: "/users?id=1",
        owner: "team-a",
        backends: [{ backend: "s1 svc#1", inFlight: 0, draining: false }, { backend: "s2 svc#1", inFlight: 2, draining: true }],
        verdict: "served by its backend"
      })
      const text = renderRouteTest(hit)
      assert.match(text, /^URL {11}http:\/\/A\.Example\.com:8000\/app\/x\/\.\.\/users\?id=1\nROUTE {9}http :8000 a\.example\.com\/app \(prefix stripped\)\nFORWARDED AS {2}\/users\?id=1\nOWNER {9}token team-a\nVERDICT {7}served by its backend\n\nBACKEND/)
      assert.match(text, /s2 svc#1\s+2\s+draining$/)
      // another host falls to the catch-all route, whose path is forwarded whole
      const other = answer(testRoute(registry, "ws://b.example.com:8000/app/x"))
      assert.strictEqual(other.route, "http:8000::/")
      assert.strictEqual(other.forwardedPath, "/app/x")
      assert.isUndefined(other.owner)
    })))

  it.effect("says why nothing serves a URL", () =>
    provide(Effect.gen(function*() {
      const registry = yield* Registry
      const scope = yield* Scope.make()
      yield* registry.register({ _tag: "Http", port: 8000, pathPrefix: "/api" }, makeTestBackend("api")).pipe(Scope.provide(scope))
      yield* registry.register({ _tag: "Tcp", port: 5432 }, makeTestBackend("db"))
      assert.strictEqual(answer(testRoute(registry, "http://x:8000/web")).verdict, "no route matches: 404 (port 8000 serves http :8000 */api)")
      assert.strictEqual(answer(testRoute(registry, "http://x/")).verdict, "nothing is served on port 80: the connection is refused")
      assert.strictEqual(answer(testRoute(registry, "https://x:8000/api")).verdict, "port 8000 serves http, not tls: test it with http://")
      const tcp = answer(testRoute(registry, "tcp://db.internal:5432"))
      assert.strictEqual(tcp.route, "tcp:5432")
      assert.isUndefined(tcp.forwardedPath)
      // the route's last backend left: requests wait for the grace period
      yield* Scope.close(scope, Exit.void)
      const empty = answer(testRoute(registry, "http://x:8000/api/1"))
      assert.strictEqual(empty.verdict, "the route has no live backend: requests wait up to the grace period (10 s) for one, then get 503")
      assert.deepStrictEqual(empty.backends, [])
      yield* TestClock.adjust("10 seconds")
      assert.strictEqual(answer(testRoute(registry, "http://x:8000/api/1")).verdict, "nothing is served on port 8000: the connection is refused")
    })))

  it("refuses what it cannot test, with the reason", () => {
    const error = (url: string) => {
      const result = routeTestQuery(url)
      assert.isTrue("error" in result, url)
      return (result as { error: string }).error
    }
    assert.match(error("not a url"), /"not a url" is not an absolute URL/)
    assert.match(error("ftp://x/"), /scheme ftp is not one a gateway routes/)
    assert.match(error("tcp://x"), /a tcp:\/\/ URL names its port/)
    assert.match(error("http://x/a/%2F"), /refuses this request target with 400: an encoded path separator/)
    assert.match(error(`http://x/${"a".repeat(5000)}`), /longer than 4096/)
    assert.deepStrictEqual(routeTestQuery("https://App.test/a?b"), { query: { _tag: "Tls", port: 443, serverName: "app.test", host: "app.test", path: "/a" }, target: "/a?b" })
  })
})
