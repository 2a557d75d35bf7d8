import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import { Context, Effect } from "effect"
import { listen, toRoute } from "../../../src/runtime/listen.ts"
import { ControlPort } from "../../../src/services/front/ControlPort.ts"
import { Registry } from "../../../src/services/Registry.ts"
import { gateway, grants, token } from "../../integration/tunnelHarness.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"
import { freePort, makeCertificate, request } from "../ListenersFixtures.ts"

describe("listen (plain Node)", () => {
  it("turns definitions into routes", () => {
    assert.deepStrictEqual(toRoute({ port: 8000 }), { _tag: "Http", port: 8000 })
    assert.deepStrictEqual(toRoute({ port: 8000, http: { pathPrefix: "/a", domainSuffix: "x.test" } }), {
      _tag: "Http",
      port: 8000,
      domainSuffix: "x.test",
      pathPrefix: "/a"
    })
    assert.deepStrictEqual(toRoute({ port: 22, tcp: true }), { _tag: "Tcp", port: 22 })
    assert.deepStrictEqual(toRoute({ port: 443, tls: { domainSuffix: "x.test", cert: "C", key: "K" } }), {
      _tag: "Tls",
      port: 443,
      domainSuffix: "x.test",
      cert: "C",
      key: "K",
      then: "http"
    })
  })

  it.live("serves http.Servers through one shared control connection, and closes cleanly", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.gen(function*() {
        const gw = yield* gateway()
        const control = Context.get(gw, ControlPort)
        const registry = Context.get(gw, Registry)
        const port = yield* Effect.promise(freePort)
        const server = `127.0.0.1:${control.address.port}`
        const a = yield* Effect.promise(() => listen({ port, http: { pathPrefix: "/a" } }, { server, token }))
        const b = yield* Effect.promise(() => listen({ port, http: { pathPrefix: "/b" } }, { server, token }))
        assert.isTrue(a.listening)
        assert.strictEqual(a.address().port, port)
        const serverA = a.serve(http.createServer((req, res) => res.end(`A ${req.socket.remoteAddress !== undefined}`)))
        const serverB = b.serve(http.createServer((_req, res) => res.end("B")))
        const replies = yield* Effect.promise(() => Promise.all([request(port, "/a"), request(port, "/b/1")]))
        assert.deepStrictEqual(replies.map((r) => r.body), ["A true", "B"])
        assert.strictEqual(control.sessions(), 1)
        yield* Effect.promise(() => new Promise<void>((resolve) => a.close(() => resolve())))
        assert.strictEqual(registry.match({ _tag: "Http", port, host: "", path: "/a" })?.backends.length, 0)
        assert.strictEqual(control.sessions(), 1)
        yield* Effect.promise(() => new Promise<void>((resolve) => b.close(() => resolve())))
        serverA.closeAllConnections()
        serverB.closeAllConnections()
        while (control.sessions() > 0) yield* Effect.sleep("5 millis")
      }).pipe(Effect.scoped)
      yield* Effect.promise(() => expectNoLeaks(before))
    }))

  it.live("reaches a control port served over TLS as tls://host:port, trusting its certificate with `tls.ca`", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.gen(function*() {
        const cert = makeCertificate("localhost")
        const control = Context.get(yield* gateway({ control: { address: { host: "127.0.0.1", port: 0 }, tokens: grants, tls: cert } }), ControlPort)
        const port = yield* Effect.promise(freePort)
        const server = `tls://localhost:${control.address.port}`
        const tunnel = yield* Effect.promise(() => listen({ port }, { server, token, tls: { ca: cert.cert } }))
        const served = tunnel.serve(http.createServer((_req, res) => res.end("over tls")))
        assert.strictEqual((yield* Effect.promise(() => request(port, "/"))).body, "over tls")
        yield* Effect.promise(() => new Promise<void>((resolve) => tunnel.close(() => resolve())))
        served.closeAllConnections()
        while (control.sessions() > 0) yield* Effect.sleep("5 millis")
        // the same server without `tls.ca` is not trusted: no listener, the reason in the rejection
        const untrusted = yield* Effect.promise(() =>
          listen({ port }, { server, token, timeoutMs: 2_000 }).then((t) => {
            t.close()
            return "listening"
          }, (e: Error) => e.message)
        )
        assert.match(untrusted, /self-signed certificate/)
      }).pipe(Effect.scoped)
      yield* Effect.promise(() => expectNoLeaks(before))
    }))

  it.live("rejects when the gateway refuses the listener", () =>
    Effect.gen(function*() {
      const gw = yield* gateway()
      const control = Context.get(gw, ControlPort)
      const error = yield* Effect.promise(() =>
        listen({ port: 80 }, { server: `127.0.0.1:${control.address.port}`, token }).then(() => "listening", (e: Error) => e.message)
      )
      assert.match(error, /PortNotAllowed/)
    }).pipe(Effect.scoped))
})
