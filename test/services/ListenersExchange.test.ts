import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import { Effect, Layer } from "effect"
import type { Lease } from "../../src/services/Dispatcher.ts"
import { Dispatcher } from "../../src/services/Dispatcher.ts"
import { Forwarder } from "../../src/services/Forwarder.ts"
import type { Http1Exchange, Http1Request } from "../../src/services/forward/http1/Admission.ts"
import { tcpUpstream } from "../../src/services/forward/Upstream.ts"
import { type ExchangeTap, Listeners } from "../../src/services/Listeners.ts"
import { Registry } from "../../src/services/Registry.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { directBackend, freePort, request, serve } from "./ListenersFixtures.ts"

interface Observed {
  readonly route: string
  readonly exchange: Http1Exchange
}

/** Engine ports whose exchanges go through `tap`, and what was dispatched and observed. */
const makeLayer = (tap: (request: Http1Request, lease: Lease) => ExchangeTap, dispatched: Array<number>) =>
  Layer.unwrap(Effect.gen(function*() {
    const forwarder = yield* Forwarder.make({
      upstream: tcpUpstream("127.0.0.1", 9, { maxSockets: 1, maxFreeSockets: 0 }),
      responseTimeoutMs: 0,
      idleTimeoutMs: 0
    })
    return Layer.effect(
      Listeners,
      Listeners.make({
        host: "127.0.0.1",
        forwarder,
        observeDispatch: (_waited, error) => void dispatched.push(error === undefined ? 0 : error.status),
        observeExchange: tap
      })
    )
  })).pipe(Layer.provideMerge(Dispatcher.layer({})), Layer.provideMerge(Registry.layer({ gracePeriod: "30 seconds" })))

/** A backend answering with the request id it received. */
const idServer = () =>
  serve(http.createServer((req, res) => {
    req.resume()
    req.on("end", () => {
      const body = `id=${req.headers["x-request-id"] ?? "none"} count=${req.rawHeaders.filter((h) => h.toLowerCase() === "x-request-id").length}`
      res.writeHead(200, { "content-type": "text/plain", "content-length": String(body.length), "x-request-id": "backend" })
      res.end(body)
    })
  }))

describe("Listeners: per-request instruments on engine ports", () => {
  it.effect("sets the tap's request and response headers, observes each forwarded exchange with its lease's route, and leaves refusals to observeDispatch", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      const observed: Array<Observed> = []
      const dispatched: Array<number> = []
      const tap = (request: Http1Request, lease: Lease): ExchangeTap => {
        const given = request.headers.find((_, i) => i % 2 === 0 && request.headers[i]!.toLowerCase() === "x-request-id")
        const kept = given === undefined ? undefined : request.headers[request.headers.indexOf(given) + 1]
        const id = kept === "client-id" ? kept : "generated-id"
        return {
          requestHeaders: kept === "client-id" ? undefined : ["X-Request-Id", id],
          responseHeaders: ["X-Request-Id", id],
          observe: (exchange) => void observed.push({ route: lease.route.key, exchange })
        }
      }
      yield* Effect.gen(function*() {
        const listeners = yield* Listeners
        const port = yield* Effect.promise(freePort)
        const backend = yield* directBackend("a", yield* idServer())
        yield* listeners.bind({ _tag: "Http", port, pathPrefix: "/a" }, backend)
        const generated = yield* Effect.promise(() => request(port, "/a/1"))
        assert.strictEqual(generated.body, "id=generated-id count=1")
        assert.strictEqual(generated.headers["x-request-id"], "generated-id")
        // a client's id that does not stand is replaced, not repeated
        const replaced = yield* Effect.promise(() => rawRequest(port, "/a/2", "bad id"))
        assert.include(replaced, "id=generated-id count=1")
        const kept = yield* Effect.promise(() => rawRequest(port, "/a/3", "client-id"))
        assert.include(kept, "id=client-id count=1")
        assert.match(kept, /\r\nX-Request-Id: client-id\r\n/)
        assert.notInclude(kept.toLowerCase(), "x-request-id: backend")
        const missing = yield* Effect.promise(() => request(port, "/b"))
        assert.strictEqual(missing.status, 404)
        while (observed.length < 3 || backend.inFlight > 0) yield* Effect.promise(() => new Promise((resolve) => setImmediate(resolve)))
        const key = (yield* Registry).snapshot()[0]!.key
        assert.deepStrictEqual(observed.map((o) => [o.route, o.exchange.target, o.exchange.status, o.exchange.end]), [
          [key, "/a/1", 200, "Complete"],
          [key, "/a/2", 200, "Complete"],
          [key, "/a/3", 200, "Complete"]
        ])
        for (const o of observed) assert.isAbove(o.exchange.sentBytes, 0)
        assert.deepStrictEqual(dispatched, [0, 0, 0, 404])
      }).pipe(Effect.scoped, Effect.provide(makeLayer(tap, dispatched)))
      yield* Effect.promise(() => expectNoLeaks(before))
    }))
})

/** One request with an `X-Request-Id` on a connection of its own; the raw response. */
const rawRequest = (port: number, path: string, id: string): Promise<string> =>
  new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, path, headers: { host: "localhost", "x-request-id": id }, agent: false }, (res) => {
      let body = ""
      res.setEncoding("latin1")
      res.on("data", (d: string) => (body += d))
      res.on("end", () => {
        let head = `HTTP/1.1 ${res.statusCode}\r\n`
        for (let i = 0; i < res.rawHeaders.length; i += 2) head += `${res.rawHeaders[i]}: ${res.rawHeaders[i + 1]}\r\n`
        resolve(`${head}\r\n${body}`)
      })
    })
    req.on("error", reject)
    req.end()
  })
