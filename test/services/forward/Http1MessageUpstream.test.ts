import { assert, describe, it } from "@effect/vitest"
import * as http2 from "node:http2"
import * as net from "node:net"
import { Effect } from "effect"
import { plainErrors } from "../../../src/services/forward/ErrorResponse.ts"
import { nodeExchangeFront } from "../../../src/services/forward/NodeExchangeFront.ts"
import { unixUpstream } from "../../../src/services/forward/Upstream.ts"
import { makeForwarder } from "../../../src/services/Forwarder.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"
import { startRawUnixUpstream } from "../../support/rawUpstream.ts"

interface Answer {
  readonly status: number | undefined
  readonly headers: http2.IncomingHttpHeaders
  readonly body: string
  readonly trailers: http2.IncomingHttpHeaders
  /** The stream was reset instead of ending. */
  readonly reset: boolean
}

/** One HTTP/2 request on `client`: the answer, or how it was cut. */
const ask = (client: http2.ClientHttp2Session, headers: http2.OutgoingHttpHeaders, body?: ReadonlyArray<string>): Promise<Answer> =>
  new Promise((resolve) => {
    const stream = client.request(headers, { endStream: body === undefined, waitForTrailers: false })
    let status: number | undefined
    let responseHeaders: http2.IncomingHttpHeaders = {}
    let trailers: http2.IncomingHttpHeaders = {}
    let text = ""
    stream.setEncoding("latin1")
    stream.on("response", (h) => {
      status = h[":status"]
      responseHeaders = h
    })
    stream.on("trailers", (t) => void (trailers = t))
    stream.on("data", (d: string) => (text += d))
    stream.on("error", () => {})
    stream.on("close", () => resolve({ status, headers: responseHeaders, body: text, trailers, reset: stream.rstCode !== http2.constants.NGHTTP2_NO_ERROR }))
    if (body !== undefined) {
      for (const part of body) stream.write(part)
      stream.end()
    }
  })

/**
 * An h2c front (Node's server) whose every request is carried by `Forwarder.exchange` onto a logging
 * Unix-socket upstream; an HTTP/2 client connected to it. All closed with the scope, then checked for leaks.
 */
const withRig = <A>(
  body: (rig: {
    readonly client: http2.ClientHttp2Session
    /** Another client connection (closed with the scope). */
    readonly connect: () => http2.ClientHttp2Session
    readonly upstream: Awaited<ReturnType<typeof startRawUnixUpstream>>
  }) => Effect.Effect<A>
) =>
  Effect.gen(function*() {
    const before = activeHandles()
    const result = yield* Effect.gen(function*() {
      const upstream = yield* Effect.acquireRelease(Effect.promise(startRawUnixUpstream), (u) => Effect.promise(u.close))
      const forwarder = yield* makeForwarder({
        upstream: unixUpstream(upstream.socketPath, { maxSockets: 4, maxFreeSockets: 4 }),
        forwardedHeaders: "off",
        responseTimeoutMs: 5_000,
        idleTimeoutMs: 5_000
      })
      const server = http2.createServer((req, res) => {
        forwarder.exchange(
          nodeExchangeFront(req, res, { forwardedMode: "off", errors: plainErrors, path: req.url }),
          forwarder.upstream,
          { maxHeaderSize: 16 * 1024, maxHeadersCount: 100 }
        )
      })
      const sessions = new Set<http2.ServerHttp2Session>()
      server.on("session", (s) => {
        sessions.add(s)
        s.once("close", () => sessions.delete(s))
      })
      const port = yield* Effect.acquireRelease(
        Effect.promise(() => new Promise<number>((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as net.AddressInfo).port)))),
        () =>
          Effect.promise(() =>
            new Promise<void>((resolve) => {
              for (const s of sessions) s.destroy()
              server.close(() => resolve())
            })
          )
      )
      const clients = new Set<http2.ClientHttp2Session>()
      yield* Effect.addFinalizer(() =>
        Effect.promise(() => Promise.all([...clients].map((c) => new Promise<void>((resolve) => c.destroyed ? resolve() : c.close(() => resolve())))))
      )
      const connect = () => {
        const c = http2.connect(`http://127.0.0.1:${port}`)
        c.on("error", () => {})
        clients.add(c)
        return c
      }
      return yield* body({ client: connect(), connect, upstream })
    }).pipe(Effect.scoped)
    yield* Effect.promise(() => expectNoLeaks(before))
    return result
  })

describe("Http1MessageUpstream: HTTP/2 requests on pooled HTTP/1.1 connections", () => {
  it.effect("a body without a length goes chunked; a length goes as it is; no body says Content-Length: 0", () =>
    withRig(({ client, upstream }) =>
      Effect.gen(function*() {
        const chunked = yield* Effect.promise(() => ask(client, { ":method": "POST", ":path": "/a", "x-one": "1" }, ["abc", "de"]))
        assert.strictEqual(chunked.status, 200)
        assert.strictEqual(chunked.body, "ok")
        const sized = yield* Effect.promise(() => ask(client, { ":method": "PUT", ":path": "/b", "content-length": "3" }, ["xyz"]))
        assert.strictEqual(sized.status, 200)
        const empty = yield* Effect.promise(() => ask(client, { ":method": "POST", ":path": "/c" }))
        assert.strictEqual(empty.status, 200)
        const text = upstream.log.text()
        assert.match(text, /^POST \/a HTTP\/1\.1\r\nHost: 127\.0\.0\.1:\d+\r\nx-one: 1\r\nTransfer-Encoding: chunked\r\n\r\n/)
        // chunks as the client's DATA frames came, then the last chunk
        assert.include(text, "\r\n0\r\n\r\n")
        assert.match(text, /PUT \/b HTTP\/1\.1\r\nHost: [^\r]+\r\ncontent-length: 3\r\n/)
        assert.include(text, "\r\n\r\nxyz")
        assert.match(text, /POST \/c HTTP\/1\.1\r\n(?:.*\r\n)*Content-Length: 0\r\n\r\n$/)
        // the Host a backend reads is the :authority, never a host field beside it
        const agreeing = yield* Effect.promise(() => ask(client, { ":method": "GET", ":path": "/d", ":authority": "a.test", host: "a.test" }))
        assert.strictEqual(agreeing.status, 200)
        assert.match(upstream.log.text(), /GET \/d HTTP\/1\.1\r\nHost: a\.test\r\n\r\n/)
        // one pooled connection carried them all in turn
        assert.strictEqual(upstream.log.connections.length, 1)
      })))

  it.effect("a request body longer or shorter than its content-length never reaches a connection as framing", () =>
    withRig(({ client, connect, upstream }) =>
      Effect.gen(function*() {
        const long = yield* Effect.promise(() => ask(client, { ":method": "POST", ":path": "/long", "content-length": "3" }, ["abc", "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"]))
        assert.isTrue(long.reset || long.status === 400, JSON.stringify(long))
        const short = yield* Effect.promise(() => ask(connect(), { ":method": "POST", ":path": "/short", "content-length": "9" }, ["abc"]))
        assert.isTrue(short.reset || short.status === 400, JSON.stringify(short))
        const after = yield* Effect.promise(() => ask(connect(), { ":method": "GET", ":path": "/after" }))
        assert.strictEqual(after.status, 200)
        assert.notInclude(upstream.log.text(), "/smuggled")
        // what reached a connection after a short or long body is never read as a request of its own
        assert.notMatch(upstream.log.text(), /abc(?:GET|POST)/)
        const invalid = yield* Effect.promise(() => ask(connect(), { ":method": "POST", ":path": "/x", "content-length": "1, 1" }, ["a"]))
        assert.isTrue(invalid.reset || invalid.status === 400, JSON.stringify(invalid))
        assert.notInclude(upstream.log.text(), "POST /x")
      })))

  it.effect("chunked responses arrive de-framed with their trailers; a coding beside a length drops the length and the connection", () =>
    withRig(({ client, upstream }) =>
      Effect.gen(function*() {
        upstream.setReply((head) =>
          head.startsWith("GET /chunked")
            ? "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n"
            : head.startsWith("GET /both")
            ? "HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            : "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        const chunked = yield* Effect.promise(() => ask(client, { ":method": "GET", ":path": "/chunked" }))
        assert.strictEqual(chunked.body, "abcde")
        assert.strictEqual(chunked.trailers["x-sum"], "5")
        assert.isFalse(chunked.reset)
        const both = yield* Effect.promise(() => ask(client, { ":method": "GET", ":path": "/both" }))
        assert.strictEqual(both.body, "hi")
        assert.isUndefined(both.headers["content-length"])
        const next = yield* Effect.promise(() => ask(client, { ":method": "GET", ":path": "/next" }))
        assert.strictEqual(next.body, "ok")
        // the connection that answered with a coding and a length is not reused
        assert.strictEqual(upstream.log.connections.length, 2)
      })))

  it.effect("a response cut by the upstream resets the client's stream; one that never came is a 502", () =>
    withRig(({ client, upstream }) =>
      Effect.gen(function*() {
        upstream.setReply((head) => head.startsWith("GET /cut") ? "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nabc" : "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        const cut = yield* Effect.promise(() => ask(client, { ":method": "GET", ":path": "/cut" }))
        assert.isTrue(cut.reset, JSON.stringify(cut))
        assert.strictEqual(cut.body.length < 10, true)
        upstream.setReply(() => "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n")
        upstream.setReply(() => "garbage\r\n\r\n")
        const bad = yield* Effect.promise(() => ask(client, { ":method": "GET", ":path": "/bad" }))
        assert.strictEqual(bad.status, 502)
      })))
})
