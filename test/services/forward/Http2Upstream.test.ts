import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as http2 from "node:http2"
import * as net from "node:net"
import { Effect } from "effect"
import { plainErrors, sendError } from "../../../src/services/forward/ErrorResponse.ts"
import { H2ClientConnection } from "../../../src/services/forward/H2ClientConnection.ts"
import { nodeExchangeFront, unsupportedCoding } from "../../../src/services/forward/NodeExchangeFront.ts"
import {
  forwardToH2,
  type H2ForwardOptions,
  h1ResponseHeaders,
  h2Trailers,
  webSocketAccept
} from "../../../src/services/forward/Http2Upstream.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"
import { request, until } from "../../integration/reverse-h2-harness.ts"

interface Rig {
  readonly publicPort: number
  /** switchyard's client connection the public requests go out on. */
  readonly session: H2ClientConnection
  readonly done: () => number
  readonly refused: () => number
}

/**
 * An h2 backend with `onStream`, switchyard's client connection to it, and a public HTTP/1.1 server
 * forwarding every request onto that connection; all closed with the scope, then checked for leaks.
 */
const withRig = <A>(
  onStream: (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders) => void,
  options: Partial<H2ForwardOptions>,
  body: (rig: Rig) => Effect.Effect<A>
) =>
  Effect.gen(function*() {
    const before = activeHandles()
    const result = yield* Effect.gen(function*() {
      const backend = http2.createServer()
      backend.on("stream", (stream, headers) => {
        // resets this backend sends itself are reported on its own streams
        stream.on("error", () => {})
        onStream(stream, headers)
      })
      const backendPort = yield* listen(backend)
      const session = yield* connectClient(backendPort)
      let done = 0
      let refused = 0
      const front = http.createServer((req, res) => {
        const unsupported = unsupportedCoding(req)
        if (unsupported !== undefined) return sendError(res, plainErrors, 501, unsupported)
        forwardToH2({ session, describe: "test backend" }, nodeExchangeFront(req, res, { forwardedMode: "replace", errors: plainErrors, path: req.url ?? "/" }), {
          responseTimeoutMs: 0,
          idleTimeoutMs: 0,
          errors: plainErrors,
          onError: () => {},
          onDone: () => void done++,
          onRefused: () => {
            refused++
            return false
          },
          ...options
        })
      })
      const publicPort = yield* listen(front)
      return yield* body({ publicPort, session, done: () => done, refused: () => refused })
    }).pipe(Effect.scoped)
    yield* Effect.promise(() => expectNoLeaks(before))
    return result
  })

/** switchyard's HTTP/2 client on a TCP connection to `port`, ready (SETTINGS exchanged); closed with the scope. */
export const connectClient = (port: number) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<H2ClientConnection>((resolve, reject) => {
        const socket = net.connect({ host: "127.0.0.1", port, noDelay: true }, () => {
          const client = new H2ClientConnection(socket, {
            maxFrameBytes: 256 * 1024,
            streamWindowBytes: 1024 * 1024,
            connectionWindowBytes: 16 * 1024 * 1024,
            maxHeaderListBytes: 64 * 1024,
            maxHeaderPairs: 256
          }, {
            settings: () => resolve(client),
            goaway: () => {},
            close: (error) => reject(error ?? new Error("closed before SETTINGS"))
          })
          client.start()
        })
        socket.once("error", reject)
      })
    ),
    (client) => Effect.sync(() => client.destroy())
  )

const listen = (server: net.Server) =>
  Effect.acquireRelease(
    Effect.promise(() => new Promise<number>((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as net.AddressInfo).port)))),
    () =>
      Effect.promise(() =>
        new Promise<void>((resolve) => {
          if (server instanceof http.Server) server.closeAllConnections()
          server.close(() => resolve())
        })
      )
  )

describe("Http2Upstream", () => {
  it("converts response headers and trailers between HTTP/2 and HTTP/1.1", () => {
    assert.deepStrictEqual(
      h1ResponseHeaders([":status", "200", "content-type", "text/plain", "connection", "x-drop", "x-drop", "1", "set-cookie", "a=1", "set-cookie", "b=2", "keep-alive", "5"]),
      ["content-type", "text/plain", "set-cookie", "a=1", "set-cookie", "b=2"]
    )
    const trailers = h2Trailers(["Grpc-Status", "0", "X-Many", "a", "x-many", "b", "Transfer-Encoding", "chunked"])
    assert.deepStrictEqual(trailers, ["grpc-status", "0", "x-many", "a", "x-many", "b"])
    // RFC 6455 §1.3's example
    assert.strictEqual(webSocketAccept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
  })

  it.effect("sends pseudo-headers, drops hop-by-hop headers and keeps TE: trailers", () => {
    let seen: http2.IncomingHttpHeaders | undefined
    return withRig((stream, headers) => {
      seen = headers
      stream.respond({ ":status": 204 })
      stream.end()
    }, {}, ({ publicPort }) =>
      Effect.gen(function*() {
        const reply = yield* Effect.promise(() =>
          request(publicPort, "/p?q=1", { method: "DELETE", headers: { host: "svc.test", connection: "keep-alive, x-conn", "x-conn": "1", te: "trailers, deflate", "proxy-authorization": "x", "x-keep": "yes" } })
        )
        assert.strictEqual(reply.status, 204)
        assert.strictEqual(seen?.[":method"], "DELETE")
        assert.strictEqual(seen?.[":path"], "/p?q=1")
        assert.strictEqual(seen?.[":authority"], "svc.test")
        assert.strictEqual(seen?.[":scheme"], "http")
        assert.strictEqual(seen?.te, "trailers")
        assert.strictEqual(seen?.["x-keep"], "yes")
        assert.strictEqual(seen?.["x-forwarded-host"], "svc.test")
        for (const gone of ["host", "connection", "x-conn", "proxy-authorization", "keep-alive"]) assert.isUndefined(seen?.[gone], gone)
      }))
  })

  it.effect("the public client leaving resets the stream with CANCEL", () => {
    let code: number | undefined
    return withRig((stream) => {
      stream.respond({ ":status": 200 })
      stream.write("first")
      stream.on("close", () => void (code = stream.rstCode))
    }, {}, ({ publicPort, done }) =>
      Effect.gen(function*() {
        yield* Effect.promise(() =>
          new Promise<void>((resolve) => {
            const req = http.get({ host: "127.0.0.1", port: publicPort, path: "/", agent: false }, (res) => {
              res.once("data", () => {
                req.destroy()
                resolve()
              })
            })
            req.on("error", () => {})
          })
        )
        yield* until(() => code !== undefined && done() === 1, "the backend stream to close")
        assert.strictEqual(code, http2.constants.NGHTTP2_CANCEL)
      }))
  })

  it.effect("a reset before the head is a 502; a refused stream is offered back first", () =>
    withRig((stream, headers) => {
      stream.close(headers[":path"] === "/refuse" ? http2.constants.NGHTTP2_REFUSED_STREAM : http2.constants.NGHTTP2_INTERNAL_ERROR)
    }, {}, ({ publicPort, refused, done }) =>
      Effect.gen(function*() {
        const reset = yield* Effect.promise(() => request(publicPort, "/reset"))
        assert.strictEqual(reset.status, 502)
        assert.match(reset.body, /^switchyard: backend test backend unreachable \(stream reset \(code 2\)\)\n$/)
        assert.strictEqual(refused(), 0)
        const refusedReply = yield* Effect.promise(() => request(publicPort, "/refuse"))
        assert.strictEqual(refusedReply.status, 502)
        assert.strictEqual(refused(), 1)
        yield* until(() => done() === 2, "both exchanges to finish")
      })))

  it.effect("a reset after the head aborts the public response; a short body with a length too", () =>
    withRig((stream, headers) => {
      if (headers[":path"] === "/short") {
        stream.respond({ ":status": 200, "content-length": "10" })
        stream.write("12345")
        // RST_STREAM(NO_ERROR) without END_STREAM (`close()` would end the stream first)
        setTimeout(() => stream.destroy(), 20)
      } else {
        stream.respond({ ":status": 200 })
        stream.write("partial")
        // RST_STREAM(INTERNAL_ERROR) mid-body
        setTimeout(() => stream.destroy(new Error("backend failure")), 20)
      }
    }, {}, ({ publicPort }) =>
      Effect.gen(function*() {
        const reset = yield* Effect.promise(() => request(publicPort, "/reset"))
        assert.strictEqual(reset.status, 200)
        assert.isTrue(reset.aborted, "reset after the head")
        const short = yield* Effect.promise(() => request(publicPort, "/short"))
        assert.isTrue(short.aborted, `short body: ${JSON.stringify(short)}`)
      })))

  it.effect("a response header with a control character never reaches the public client, nor breaks the gateway", () =>
    withRig((stream) => {
      stream.respond({ ":status": 200, "x-odd": "a\u0001b" })
      stream.end("body")
    }, {}, ({ publicPort }) =>
      Effect.gen(function*() {
        const reply = yield* Effect.promise(() => request(publicPort, "/"))
        // the field reaches the gateway, which cannot relay it over HTTP/1.1: the head is a 502
        assert.strictEqual(reply.status, 502)
        assert.isUndefined(reply.headers["x-odd"])
        assert.match(reply.body, /sent an invalid response head/)
        const again = yield* Effect.promise(() => request(publicPort, "/"))
        assert.strictEqual(again.status, 502)
      })))

  it.effect("no head within the response timeout is a 504; an unsupported coding a 501", () =>
    withRig(() => {}, { responseTimeoutMs: 50 }, ({ publicPort }) =>
      Effect.gen(function*() {
        const slow = yield* Effect.promise(() => request(publicPort, "/"))
        assert.strictEqual(slow.status, 504)
        assert.match(slow.body, /timed out before answering/)
        const gzip = yield* Effect.promise(() =>
          new Promise<number>((resolve, reject) => {
            const req = http.request({ host: "127.0.0.1", port: publicPort, method: "POST", path: "/", agent: false, headers: { "transfer-encoding": "gzip, chunked" } })
            req.on("response", (res) => {
              res.resume()
              resolve(res.statusCode ?? 0)
            })
            req.on("error", reject)
            req.end("x")
          })
        )
        assert.strictEqual(gzip, 501)
      })))
})
