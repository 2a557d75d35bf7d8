import { assert, describe, it } from "@effect/vitest"
import { createHash } from "node:crypto"
import * as http from "node:http"
import * as http2 from "node:http2"
import * as https from "node:https"
import * as net from "node:net"
import { Effect } from "effect"
import * as Redacted from "effect/Redacted"
import { decodeHelloReply, encodeHello, FrameReader, makeHello } from "../../src/domain/ControlMessage.ts"
import { ErrorCode } from "../../src/domain/Http2Frame.ts"
import { Dispatcher } from "../../src/services/Dispatcher.ts"
import { Listeners } from "../../src/services/Listeners.ts"
import { MaxReplayBodyBytes } from "../../src/services/forward/Http2Upstream.ts"
import { ReverseH2 } from "../../src/services/front/ReverseH2.ts"
import { serveReverseHttp2 } from "../../src/runtime/serveReverseHttp2.ts"
import { makeCertificate } from "../services/ListenersFixtures.ts"
import { closeServer, dialBackend, dialScriptedBackend, freePort, rawExchange, request, scriptedResponse, until, withGateway } from "./reverse-h2-harness.ts"

/** Runs `total` calls of `f`, at most `concurrency` at once. */
const pool = async <A>(total: number, concurrency: number, f: (i: number) => Promise<A>): Promise<Array<A>> => {
  const out: Array<A> = []
  let next = 0
  const worker = async () => {
    while (next < total) {
      const i = next++
      out[i] = await f(i)
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker))
  return out
}

/** A backend answering its name, after `delayMs` when given. */
const namedBackend = (name: string, delayMs = 0) =>
  http2.createServer((req, res) => {
    req.resume()
    const answer = () => res.end(name)
    if (delayMs > 0) setTimeout(answer, delayMs)
    else answer()
  })

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

describe("reverse HTTP/2", () => {
  it.effect("a plain Node http2 backend that dials in serves public HTTP/1.1 requests", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const server = http2.createServer((req, res) => {
          res.setHeader("x-seen-authority", req.headers[":authority"] ?? "")
          res.setHeader("x-seen-xff", String(req.headers["x-forwarded-for"] ?? ""))
          res.setHeader("x-seen-connection", String(req.headers["x-hop"] ?? "absent"))
          res.end(`hello ${req.method} ${req.url}`)
        })
        yield* closeServer(server)
        yield* dialBackend(gateway.address.port, server)
        yield* until(() => gateway.connections() === 1, "the backend to register")
        assert.isTrue((yield* Listeners).openPorts().has(port))
        const reply = yield* Effect.promise(() => request(port, "/a?b=1", { headers: { connection: "x-hop", "x-hop": "1" } }))
        assert.strictEqual(reply.status, 200)
        assert.strictEqual(reply.body, "hello GET /a?b=1")
        assert.strictEqual(reply.headers["x-seen-authority"], `127.0.0.1:${port}`)
        assert.strictEqual(reply.headers["x-seen-xff"], "127.0.0.1")
        assert.strictEqual(reply.headers["x-seen-connection"], "absent")
      }))
    }))

  it.effect("several backends share the load", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        for (const name of ["a", "b", "c"]) {
          const server = namedBackend(name)
          yield* closeServer(server)
          yield* dialBackend(gateway.address.port, server)
        }
        yield* until(() => gateway.connections() === 3, "three backends")
        const sequential = yield* Effect.promise(() => pool(9, 1, () => request(port, "/")))
        const counts = new Map<string, number>()
        for (const r of sequential) counts.set(r.body, (counts.get(r.body) ?? 0) + 1)
        assert.deepStrictEqual([...counts.entries()].sort(), [["a", 3], ["b", 3], ["c", 3]])
        const parallel = yield* Effect.promise(() => pool(60, 12, () => request(port, "/")))
        assert.isTrue(parallel.every((r) => r.status === 200 && !r.aborted))
        assert.strictEqual(new Set(parallel.map((r) => r.body)).size, 3)
      }))
    }))

  it.effect("a backend killed mid-response: that response is aborted, a reset before the head is a 502, the dead connection is pruned", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const sockets: Array<net.Socket> = []
        const hits: Array<number> = []
        for (let i = 0; i < 3; i++) {
          const index = i
          // one stream each: a backend busy with /slow is skipped, so the other requests never meet it
          const server = http2.createServer({ settings: { maxConcurrentStreams: 1 } }, (req, res) => {
            req.resume()
            if (req.url === "/slow") {
              hits.push(index)
              res.writeHead(200, { "content-type": "text/plain" })
              res.write("part")
              // this backend dies once the first bytes are out
              setTimeout(() => sockets[index]!.destroy(), 50)
            } else if (req.url === "/die") {
              hits.push(index)
              sockets[index]!.destroy()
            } else {
              res.end(`ok ${index}`)
            }
          })
          yield* closeServer(server)
          sockets.push(yield* dialBackend(gateway.address.port, server))
        }
        yield* until(() => gateway.connections() === 3, "three backends")
        const slowReply = request(port, "/slow")
        yield* until(() => hits.length === 1, "a backend to take /slow")
        const [slow, others] = yield* Effect.promise(() => Promise.all([slowReply, pool(20, 4, () => request(port, "/"))]))
        assert.strictEqual(slow.status, 200)
        assert.isTrue(slow.aborted, "a broken response must not look complete")
        assert.strictEqual(slow.body, "part")
        assert.deepStrictEqual(others.filter((r) => r.status !== 200 || r.aborted), [])
        yield* until(() => gateway.connections() === 2, "the dead connection to be pruned")
        const died = yield* Effect.promise(() => request(port, "/die"))
        assert.strictEqual(died.status, 502)
        assert.match(died.body, /^switchyard: backend h2 .* unreachable/)
        yield* until(() => gateway.connections() === 1, "the second dead connection to be pruned")
        const after = yield* Effect.promise(() => pool(6, 3, () => request(port, "/")))
        const survivor = [0, 1, 2].find((i) => !hits.includes(i))!
        assert.deepStrictEqual(after.map((r) => r.body), Array(6).fill(`ok ${survivor}`))
      }))
    }))

  it.effect("a request for a route whose backend left waits for the next one (grace period)", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const dispatcher = yield* Dispatcher
        const first = namedBackend("first")
        yield* closeServer(first)
        const socket = yield* dialBackend(gateway.address.port, first)
        yield* until(() => gateway.connections() === 1, "the first backend")
        socket.destroy()
        yield* until(() => gateway.connections() === 0, "the first backend to leave")
        const pending = request(port, "/")
        yield* until(() => dispatcher.waiting() === 1, "the request to wait for a backend")
        const second = namedBackend("second")
        yield* closeServer(second)
        yield* dialBackend(gateway.address.port, second)
        const reply = yield* Effect.promise(() => pending)
        assert.deepInclude(reply, { status: 200, body: "second" })
      }))
    }))

  it.effect("GOAWAY from a backend drains it under load with no failed request", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const sessions: Array<http2.ServerHttp2Session> = []
        for (const name of ["a", "b"]) {
          const server = namedBackend(name, 2)
          server.on("session", (s) => sessions.push(s))
          yield* closeServer(server)
          yield* dialBackend(gateway.address.port, server)
        }
        yield* until(() => gateway.connections() === 2 && sessions.length === 2, "two backends")
        let done = 0
        // half the requests carry a body: one refused in the GOAWAY race is resent with it
        const load = pool(300, 24, async (i) => {
          const r = await request(port, "/", i % 2 === 0 ? {} : { method: "POST", body: `payload ${i}` })
          done++
          if (done === 60) sessions[0]!.close()
          return r
        })
        const replies = yield* Effect.promise(() => load)
        const failed = replies.filter((r) => r.status !== 200 || r.aborted)
        assert.deepStrictEqual(failed, [])
        const afterDrain = replies.slice(200).map((r) => r.body)
        assert.isTrue(afterDrain.every((b) => b === "b"), "once drained, requests go to the other backend")
        yield* until(() => gateway.connections() === 1, "the drained connection to close")
      }))
    }))

  it.effect("a request a backend refused unprocessed is resent elsewhere with its body; beyond the replay limit it is a 502", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const refusedOnce = new Set<number>()
        for (const index of [0, 1]) {
          const server = http2.createServer()
          server.on("stream", (stream) => {
            const parts: Array<Buffer> = []
            stream.on("error", () => {})
            stream.on("data", (c: Buffer) => parts.push(c))
            stream.on("end", () => {
              // each backend refuses the first request it sees (after reading its whole body)
              if (!refusedOnce.has(index)) {
                refusedOnce.add(index)
                return stream.close(http2.constants.NGHTTP2_REFUSED_STREAM)
              }
              stream.respond({ ":status": 200 })
              stream.end(`${index}:${Buffer.concat(parts).toString()}`)
            })
          })
          yield* closeServer(server)
          yield* dialBackend(gateway.address.port, server)
        }
        yield* until(() => gateway.connections() === 2, "two backends")
        const reply = yield* Effect.promise(() => request(port, "/post", { method: "POST", headers: { "content-type": "text/plain" }, body: "the request body" }))
        assert.strictEqual(reply.status, 200)
        assert.match(reply.body, /^[01]:the request body$/)
        refusedOnce.clear()
        const big = "x".repeat(MaxReplayBodyBytes + 1)
        const tooBig = yield* Effect.promise(() => request(port, "/post", { method: "POST", body: big }))
        assert.strictEqual(tooBig.status, 502)
        assert.match(tooBig.body, /unreachable/)
      }))
    }))

  it.effect("a slow public reader holds the backend back (the gateway does not buffer)", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      const total = 64 * 1024 * 1024
      const chunk = Buffer.alloc(64 * 1024, 120)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        let written = 0
        const server = http2.createServer((_req, res) => {
          res.writeHead(200, { "content-length": String(total) })
          const pump = () => {
            while (written < total) {
              written += chunk.length
              if (!res.write(chunk)) return void res.once("drain", pump)
            }
            res.end()
          }
          pump()
        })
        yield* closeServer(server)
        yield* dialBackend(gateway.address.port, server)
        yield* until(() => gateway.connections() === 1, "the backend")
        const received = yield* Effect.promise(() =>
          new Promise<{ paused: number; writtenWhilePaused: number; total: number }>((resolve, reject) => {
            const req = http.get({ host: "127.0.0.1", port, path: "/big", agent: false }, (res) => {
              res.pause()
              let got = 0
              // wait until the backend stops writing: it is held back by flow control
              let last = -1
              const settle = setInterval(() => {
                if (written !== last) {
                  last = written
                  return
                }
                clearInterval(settle)
                const writtenWhilePaused = written
                res.on("data", (c: Buffer) => void (got += c.length))
                res.on("end", () => resolve({ paused: 0, writtenWhilePaused, total: got }))
                res.resume()
              }, 100)
            })
            req.on("error", reject)
          })
        )
        assert.isBelow(received.writtenWhilePaused, 24 * 1024 * 1024, "bytes in flight are bounded by windows and socket buffers")
        assert.strictEqual(received.total, total)
      }))
    }))

  it.effect("large bodies cross both ways intact, each under its flow control, several at once, to fast and slow readers", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      const size = 6 * 1024 * 1024 + 123
      const body = Buffer.alloc(size)
      for (let i = 0; i < size; i += 4) body.writeUInt32BE((i * 2654435761) >>> 0, i - (i + 4 > size ? i + 4 - size : 0))
      const digest = (b: Buffer) => createHash("sha256").update(b).digest("hex")
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const server = http2.createServer((req, res) => {
          if (req.method === "POST") {
            // echo the upload's digest and length
            const hash = createHash("sha256")
            let n = 0
            req.on("data", (c: Buffer) => {
              hash.update(c)
              n += c.length
            })
            req.on("end", () => res.end(`${n} ${hash.digest("hex")}`))
            return
          }
          req.resume()
          res.writeHead(200, { "content-length": String(size) })
          // written with backpressure (a whole body at once would exceed the backend's session memory)
          let offset = 0
          const pump = () => {
            while (offset < size) {
              const end = Math.min(offset + 100_000, size)
              const ok = res.write(body.subarray(offset, end))
              offset = end
              if (!ok) return void res.once("drain", pump)
            }
            res.end()
          }
          pump()
        })
        yield* closeServer(server)
        yield* dialBackend(gateway.address.port, server)
        yield* until(() => gateway.connections() === 1, "the backend")
        // a slow reader pauses for a moment every 256 KiB, so the gateway's writes to it queue up
        const download = (slow: boolean) =>
          new Promise<Buffer>((resolve, reject) => {
            http.get({ host: "127.0.0.1", port, path: "/big", agent: false }, (res) => {
              const chunks: Array<Buffer> = []
              let sinceNap = 0
              res.on("data", (c: Buffer) => {
                chunks.push(c)
                sinceNap += c.length
                if (slow && sinceNap >= 256 * 1024) {
                  sinceNap = 0
                  res.pause()
                  setTimeout(() => res.resume(), 5)
                }
              })
              res.on("end", () => resolve(Buffer.concat(chunks)))
              res.on("error", reject)
            }).on("error", reject)
          })
        const downloads = yield* Effect.promise(() => Promise.all([download(false), download(true), download(false)]))
        for (const got of downloads) {
          assert.strictEqual(got.length, size, got.subarray(0, 200).toString())
          assert.strictEqual(digest(got), digest(body))
        }
        const uploads = yield* Effect.promise(() =>
          Promise.all([0, 1].map(() => request(port, "/up", { method: "POST", body, headers: { "content-type": "application/octet-stream" } })))
        )
        for (const up of uploads) assert.strictEqual(up.body, `${size} ${digest(body)}`)
        assert.strictEqual(gateway.activeStreams(), 0)
      }))
    }))

  it.effect("trailers travel both ways", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const server = http2.createServer((req, res) => {
          const parts: Array<Buffer> = []
          req.on("data", (c: Buffer) => parts.push(c))
          req.on("end", () => {
            res.writeHead(200, { "content-type": "text/plain" })
            res.write(`got ${Buffer.concat(parts).toString()} with ${req.trailers["x-request-sum"] ?? "no trailer"}`)
            res.addTrailers({ "x-response-sum": "42" })
            res.end()
          })
        })
        yield* closeServer(server)
        yield* dialBackend(gateway.address.port, server)
        yield* until(() => gateway.connections() === 1, "the backend")
        const reply = yield* Effect.promise(() =>
          new Promise<{ body: string; trailers: NodeJS.Dict<string> }>((resolve, reject) => {
            const req = http.request({ host: "127.0.0.1", port, path: "/t", method: "POST", agent: false, headers: { "transfer-encoding": "chunked", trailer: "x-request-sum" } })
            req.on("error", reject)
            req.on("response", (res) => {
              let body = ""
              res.setEncoding("utf8")
              res.on("data", (c: string) => void (body += c))
              res.on("end", () => resolve({ body, trailers: res.trailers }))
            })
            req.write("abc")
            req.addTrailers({ "x-request-sum": "7" })
            req.end()
          })
        )
        assert.strictEqual(reply.body, "got abc with 7")
        assert.strictEqual(reply.trailers["x-response-sum"], "42")
      }))
    }))

  it.effect("a gRPC-style bidirectional stream: each message is answered before the next is sent, status in trailers", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        let sawTe = ""
        const server = http2.createServer((req, res) => {
          sawTe = String(req.headers.te ?? "")
          res.writeHead(200, { "content-type": "application/grpc" })
          req.on("data", (c: Buffer) => res.write(Buffer.concat([Buffer.from("echo:"), c])))
          req.on("end", () => {
            res.addTrailers({ "grpc-status": "0", "grpc-message": "done" })
            res.end()
          })
        })
        yield* closeServer(server)
        yield* dialBackend(gateway.address.port, server)
        yield* until(() => gateway.connections() === 1, "the backend")
        const result = yield* Effect.promise(() =>
          new Promise<{ echoes: Array<string>; trailers: NodeJS.Dict<string> }>((resolve, reject) => {
            const req = http.request({
              host: "127.0.0.1",
              port,
              path: "/pkg.Service/Chat",
              method: "POST",
              agent: false,
              headers: { "content-type": "application/grpc", te: "trailers", "transfer-encoding": "chunked" }
            })
            req.on("error", reject)
            const echoes: Array<string> = []
            const messages = ["one", "two", "three"]
            req.on("response", (res) => {
              res.setEncoding("utf8")
              res.on("data", (c: string) => {
                echoes.push(c)
                const next = messages[echoes.length]
                if (next !== undefined) req.write(next)
                else req.end()
              })
              res.on("end", () => resolve({ echoes, trailers: res.trailers }))
            })
            req.flushHeaders()
            req.write(messages[0])
          })
        )
        assert.deepStrictEqual(result.echoes, ["echo:one", "echo:two", "echo:three"])
        assert.strictEqual(result.trailers["grpc-status"], "0")
        assert.strictEqual(sawTe, "trailers")
      }))
    }))

  it.effect("garbage instead of HTTP/2 closes that connection with a typed error; the port keeps serving", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const closed = yield* Effect.promise(() =>
          new Promise<boolean>((resolve) => {
            const socket = net.connect(gateway.address.port, "127.0.0.1", () => socket.write("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
            socket.on("error", () => {})
            socket.resume()
            socket.on("close", () => resolve(true))
          })
        )
        assert.isTrue(closed)
        yield* until(() => gateway.recentFailures().length === 1, "the failure to be recorded")
        assert.strictEqual(gateway.recentFailures()[0]!.reason, "BadPreface")
        assert.strictEqual(gateway.connections(), 0)
        const server = namedBackend("good")
        yield* closeServer(server)
        yield* dialBackend(gateway.address.port, server)
        yield* until(() => gateway.connections() === 1, "the good backend")
        const reply = yield* Effect.promise(() => request(port, "/"))
        assert.strictEqual(reply.body, "good")
      }))
    }))

  it.effect("WebSocket upgrade: extended CONNECT when the backend allows it, a one-line 501 when it does not", () =>
    Effect.gen(function*() {
      const withConnect = yield* Effect.promise(freePort)
      const without = yield* Effect.promise(freePort)
      yield* withGateway({ tokens: [{ name: "t", token: Redacted.make("secret"), ports: [withConnect, without] }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const connectServer = http2.createServer({ settings: { enableConnectProtocol: true } })
        let seen: http2.IncomingHttpHeaders | undefined
        connectServer.on("stream", (stream, headers) => {
          seen = headers
          stream.respond({ ":status": 200, "sec-websocket-protocol": "chat" })
          stream.pipe(stream)
        })
        const plainServer = http2.createServer((_req, res) => res.end("plain"))
        const a = yield* Effect.promise(() =>
          serveReverseHttp2(connectServer, { gateway: { host: "127.0.0.1", port: gateway.address.port }, token: "secret", routes: [{ _tag: "Http", port: withConnect }], connections: 1 })
        )
        const b = yield* Effect.promise(() =>
          serveReverseHttp2(plainServer, { gateway: { host: "127.0.0.1", port: gateway.address.port }, token: "secret", routes: [{ _tag: "Http", port: without }], connections: 1 })
        )
        yield* Effect.addFinalizer(() => Effect.promise(() => Promise.all([a.close(), b.close()]).then(() => {
          connectServer.close()
          plainServer.close()
        })))
        yield* until(() => gateway.connections() === 2, "two backends")
        const upgrade = (port: number) =>
          new Promise<string>((resolve) => {
            const socket = net.connect(port, "127.0.0.1", () =>
              socket.write(
                "GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
              ))
            let text = ""
            socket.setEncoding("latin1")
            socket.on("data", (d: string) => {
              text += d
              if (text.includes("\r\n\r\n") && text.startsWith("HTTP/1.1 101") && !text.endsWith("ping")) socket.write("ping")
              if (text.endsWith("ping")) socket.end()
            })
            socket.on("error", () => {})
            socket.on("close", () => resolve(text))
          })
        const switched = yield* Effect.promise(() => upgrade(withConnect))
        assert.match(switched, /^HTTP\/1\.1 101 Switching Protocols\r\n/)
        assert.include(switched, "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n")
        assert.include(switched, "sec-websocket-protocol: chat\r\n")
        assert.isTrue(switched.endsWith("\r\n\r\nping"))
        assert.strictEqual(seen?.[":method"], "CONNECT")
        assert.strictEqual(seen?.[":protocol"], "websocket")
        assert.strictEqual(seen?.[":path"], "/chat")
        assert.isUndefined(seen?.["sec-websocket-key"])
        const refused = yield* Effect.promise(() => upgrade(without))
        assert.match(refused, /^HTTP\/1\.1 501 Not Implemented\r\n/)
        assert.match(refused, /\r\n\r\nswitchyard: the route's HTTP\/2 backends cannot carry "Upgrade: websocket" \(no SETTINGS_ENABLE_CONNECT_PROTOCOL\)\n$/)
      }))
    }))

  it.effect("a TLS route: the gateway terminates TLS by SNI, the backend sees :scheme https, public clients may speak HTTP/1.1 or HTTP/2", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      const certificate = makeCertificate("secure.test")
      yield* withGateway({ tokens: [{ name: "svc", token: Redacted.make("t"), ports: [port] }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const handle = yield* Effect.promise(() =>
          serveReverseHttp2((req, res) => res.end(`${req.scheme} ${req.authority} ${req.url}`), {
            gateway: { host: "127.0.0.1", port: gateway.address.port },
            token: "t",
            routes: [{ _tag: "Tls", port, domainSuffix: "secure.test", cert: certificate.cert, key: certificate.key, then: "http" }],
            connections: 1
          })
        )
        yield* Effect.addFinalizer(() => Effect.promise(() => handle.close()))
        yield* until(() => gateway.connections() === 1, "the backend")
        const body = yield* Effect.promise(() =>
          new Promise<string>((resolve, reject) => {
            const req = https.request({ host: "127.0.0.1", port, path: "/s", servername: "api.secure.test", ca: certificate.cert, headers: { host: "api.secure.test" }, agent: false }, (res) => {
              let text = ""
              res.setEncoding("utf8")
              res.on("data", (c: string) => void (text += c))
              res.on("end", () => resolve(text))
            })
            req.on("error", reject)
            req.end()
          })
        )
        assert.strictEqual(body, "https api.secure.test /s")
        // a public client speaking HTTP/2 (ALPN h2) on the same port
        const overH2 = yield* Effect.promise(() =>
          new Promise<{ status: number | undefined; text: string }>((resolve, reject) => {
            const client = http2.connect(`https://127.0.0.1:${port}`, { servername: "api.secure.test", ca: certificate.cert })
            client.on("error", reject)
            const req = client.request({ ":path": "/over-h2?x=1", ":authority": "api.secure.test" })
            let status: number | undefined
            let text = ""
            req.setEncoding("utf8")
            req.on("response", (h) => void (status = Number(h[":status"])))
            req.on("data", (c: string) => void (text += c))
            req.on("end", () => {
              client.close()
              resolve({ status, text })
            })
            req.on("error", reject)
            req.end()
          })
        )
        assert.deepStrictEqual(overH2, { status: 200, text: "https api.secure.test /over-h2?x=1" })
      }))
    }))

  it.effect("authenticated mode: the right token binds the routes it asks for, a wrong one is refused", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ tokens: [{ name: "svc", token: Redacted.make("right"), ports: [port] }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const answer = yield* Effect.promise(() =>
          new Promise<unknown>((resolve) => {
            const socket = net.connect(gateway.address.port, "127.0.0.1", () =>
              socket.write(encodeHello(makeHello(Redacted.make("wrong"), [{ _tag: "Http", port }]))))
            const reader = new FrameReader(1 << 20)
            let reply: unknown
            socket.on("data", (c: Buffer) => {
              reader.push(c)
              const body = reader.next()
              if (body instanceof Uint8Array) reply = decodeHelloReply(body)
            })
            socket.on("error", () => {})
            socket.on("close", () => resolve(reply))
          })
        )
        assert.deepInclude(answer as object, { _tag: "Rejected", reason: "BadToken" })
        yield* until(() => gateway.recentFailures().length === 1, "the refusal to be recorded")
        assert.strictEqual(gateway.recentFailures()[0]!.reason, "Rejected")
        assert.isFalse((yield* Listeners).openPorts().has(port))
        const handle = yield* Effect.promise(() =>
          serveReverseHttp2((req, res) => res.end(`svc ${req.url}`), {
            gateway: { host: "127.0.0.1", port: gateway.address.port },
            token: "right",
            routes: [{ _tag: "Http", port, pathPrefix: "/svc" }],
            connections: 2
          })
        )
        yield* Effect.addFinalizer(() => Effect.promise(() => handle.close()))
        yield* until(() => gateway.connections() === 2 && handle.connected() === 2, "both connections")
        const ok = yield* Effect.promise(() => request(port, "/svc/x"))
        assert.strictEqual(ok.body, "svc /svc/x")
        const missing = yield* Effect.promise(() => request(port, "/other"))
        assert.strictEqual(missing.status, 404)
      }))
    }))
})

void sleep

describe("reverse HTTP/2: backends are not trusted with framing", () => {
  const forged = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
  /** Whether `bytes` is nothing, or `head` and a prefix of `body`: a response cut, never one too long. */
  const assertCut = (bytes: string, head: string, body: string) =>
    assert.isTrue(bytes === "" || (bytes.startsWith(head) && body.startsWith(bytes.slice(head.length))), JSON.stringify(bytes))

  for (const engine of [true]) {
    it.effect(`a body disagreeing with its content-length closes the public keep-alive connection; an invalid length is a 502 (${engine ? "engine" : "Node"} port)`, () =>
      Effect.gen(function*() {
        const port = yield* Effect.promise(freePort)
        const violations: Array<string> = []
        yield* withGateway({ routes: [{ _tag: "Http", port }], onStreamViolation: (m) => void violations.push(m) }, Effect.gen(function*() {
          const gateway = yield* ReverseH2
          const backend = yield* dialScriptedBackend(gateway.address.port, (id, { path }) => {
            switch (path) {
              case "/long":
                return scriptedResponse(id, [":status", "200", "content-length", "3"], "abc" + forged)
              case "/short":
                return scriptedResponse(id, [":status", "200", "content-length", "10"], "12345")
              case "/head":
                return scriptedResponse(id, [":status", "200", "content-length", "5"], "hello")
              case "/no-content":
                return scriptedResponse(id, [":status", "204"], forged)
              case "/abc":
                return scriptedResponse(id, [":status", "200", "content-length", "abc"], "abc")
              case "/list":
                return scriptedResponse(id, [":status", "200", "content-length", "3, 3"], "abc")
              case "/two":
                return scriptedResponse(id, [":status", "200", "content-length", "3", "content-length", "4"], "abc")
              default:
                return scriptedResponse(id, [":status", "200", "content-length", String(path.length)], path)
            }
          })
          yield* until(() => gateway.connections() === 1, "the backend to register")
          // two requests on one connection (pipelined), the second for another host on the same port
          const pair = (first: string, method = "GET") =>
            Effect.promise(() =>
              rawExchange(port, `${method} ${first} HTTP/1.1\r\nHost: a.test\r\n\r\nGET /second HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n`)
            )
          // Node's server writes a Date and says keep-alive; the engine writes only what it must
          const keptAlive = engine ? "" : "Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
          const closing = "Connection: close\r\n"
          const date = engine ? "" : "Date: -\r\n"
          const ok = (body: string, connection: string) =>
            `HTTP/1.1 200 OK\r\ncontent-length: ${body.length}\r\n${date}${connection}\r\n${body}`
          const badGateway = (body: string) =>
            engine
              ? `HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`
              : `HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ${body.length}\r\nconnection: close\r\nDate: -\r\n\r\n${body}`

          // a well-framed answer keeps the connection for the next request
          assert.strictEqual(yield* pair("/fine"), ok("/fine", keptAlive) + ok("/second", closing))
          // DATA past the length (carrying a forged response), END_STREAM before it, DATA on HEAD: the
          // response is cut and the connection closed; the second request is never answered
          assertCut(yield* pair("/long"), `HTTP/1.1 200 OK\r\ncontent-length: 3\r\n${date}${keptAlive}\r\n`, "abc")
          assertCut(yield* pair("/short"), `HTTP/1.1 200 OK\r\ncontent-length: 10\r\n${date}${keptAlive}\r\n`, "12345")
          assertCut(yield* pair("/head", "HEAD"), `HTTP/1.1 200 OK\r\ncontent-length: 5\r\n${date}${keptAlive}\r\n`, "")
          assert.strictEqual(yield* pair("/no-content"), `HTTP/1.1 204 No Content\r\n${date}${keptAlive}\r\n`)
          // a content-length that is not one decimal value: 502, and the connection closed after it
          for (const [path, why] of [["/abc", `invalid content-length "abc"`], ["/list", `invalid content-length "3, 3"`], ["/two", "2 content-length fields"]]) {
            const body = `switchyard: backend h2 127.0.0.1:${backend.localPort} sent an invalid response (a response head with ${why})\n`
            assert.strictEqual(yield* pair(path!), badGateway(body))
          }
          // (Node's server may already have forwarded the pipelined second request: its answer is dropped)
          assert.deepStrictEqual(backend.requests.filter((r) => r !== "GET /second"), ["GET /fine", "GET /long", "GET /short", "HEAD /head", "GET /no-content", "GET /abc", "GET /list", "GET /two"])
          // each broken stream was reset with PROTOCOL_ERROR
          // (a pipelined second request already forwarded is cancelled when its client connection closes)
          yield* until(() => backend.resets.filter(([, code]) => code === ErrorCode.PROTOCOL_ERROR).length === 7, "seven RST_STREAM(PROTOCOL_ERROR)")
          assert.deepStrictEqual(backend.resets.filter(([, code]) => code !== ErrorCode.PROTOCOL_ERROR && code !== ErrorCode.CANCEL), [])
          // each is reported (for the protocol-error count); the connection itself serves on
          assert.strictEqual(violations.length, 7, violations.join("\n"))
          assert.match(violations[0]!, /sent a malformed response: DATA beyond the response's content-length/)
          assert.strictEqual(gateway.connections(), 1)
          assert.strictEqual(yield* pair("/after"), ok("/after", keptAlive) + ok("/second", closing))
        }))
      }))
  }

  it.effect("an HTTP/2 public client on a TLS route: its stream is reset, never given bytes past the length; its other streams go on", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      const certificate = makeCertificate("secure.test")
      const route = { _tag: "Tls", port, domainSuffix: "secure.test", cert: certificate.cert, key: certificate.key, then: "http" } as const
      yield* withGateway({ routes: [route] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        yield* dialScriptedBackend(gateway.address.port, (id, { path }) =>
          path === "/long"
            ? scriptedResponse(id, [":status", "200", "content-length", "3"], "abc" + forged)
            : path === "/abc"
            ? scriptedResponse(id, [":status", "200", "content-length", "abc"], "abc")
            : scriptedResponse(id, [":status", "200", "content-length", String(path.length)], path))
        yield* until(() => gateway.connections() === 1, "the backend to register")
        const outcomes = yield* Effect.promise(() =>
          new Promise<Array<string>>((resolve, reject) => {
            const client = http2.connect(`https://127.0.0.1:${port}`, { servername: "api.secure.test", ca: certificate.cert })
            client.on("error", reject)
            const get = (path: string) =>
              new Promise<string>((done) => {
                const req = client.request({ ":path": path, ":authority": "api.secure.test" })
                let status = 0
                let text = ""
                req.setEncoding("latin1")
                req.on("response", (h) => void (status = Number(h[":status"])))
                req.on("data", (c: string) => void (text += c))
                req.on("error", () => undefined)
                req.on("close", () => done(`${status} ${req.rstCode === 0 ? "complete" : "reset"} ${JSON.stringify(text)}`))
                req.end()
              })
            // one after the other on one HTTP/2 connection
            void get("/long").then(async (long) => {
              const abc = await get("/abc")
              const fine = await get("/fine")
              client.close()
              resolve([long, abc, fine])
            })
          })
        )
        const [long, abc, fine] = outcomes
        // cut: a prefix of the declared three bytes at most, then the stream reset (or no head at all)
        assert.match(long!, /^(?:200|0) reset "(?:|a|ab|abc)"$/)
        assert.match(abc!, /^502 complete "switchyard: backend h2 [^"]* sent an invalid response \(a response head with invalid content-length \\"abc\\"\)\\n"$/)
        assert.strictEqual(fine, `200 complete "/fine"`)
      }))
    }))
})
