import { assert, describe, it } from "@effect/vitest"
import * as http2 from "node:http2"
import { Effect } from "effect"
import { Listeners } from "../../src/services/Listeners.ts"
import { ReverseH2 } from "../../src/services/front/ReverseH2.ts"
import { closeServer, dialBackend, freePort, request, until, withGateway } from "./reverse-h2-harness.ts"

describe("reverse HTTP/2", () => {
  it.effect("a plain Node http2 backend that dials in serves public HTTP/1.1 requests", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const server = http2.createServer((req, res) => {
          res.setHeader("x-seen-authority", req.headers[":authority"] ?? "")
          res.setHeader("x-seen-xff", String(req.headers["x-forwarded-for"] ?? ""))
          res.end(`hello ${req.method} ${req.url}`)
        })
        yield* closeServer(server)
        yield* dialBackend(gateway.address.port, server)
        yield* until(() => gateway.connections() === 1, "the backend to register")
        assert.isTrue((yield* Listeners).openPorts().has(port))
        const reply = yield* Effect.promise(() => request(port, "/a?b=1"))
        assert.strictEqual(reply.status, 200)
        assert.strictEqual(reply.body, "hello GET /a?b=1")
        assert.strictEqual(reply.headers["x-seen-authority"], `127.0.0.1:${port}`)
        assert.strictEqual(reply.headers["x-seen-xff"], "127.0.0.1")
      }))
    }))
})
