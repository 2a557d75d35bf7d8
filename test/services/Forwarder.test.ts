import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Context, Effect, Exit, Layer, Scope } from "effect"
import * as http from "node:http"
import * as net from "node:net"
import { setTimeout as sleep } from "node:timers/promises"
import { WebSocket, WebSocketServer } from "ws"
import { headerValue } from "../../src/domain/HttpHeaders.ts"
import { streamUpstream, unixUpstream } from "../../src/services/forward/Upstream.ts"
import { Forwarder, type ForwarderConfig, type ForwarderShape, makeForwarder } from "../../src/services/Forwarder.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { type EngineUpstream, startEngineUpstream, stdoutFrame } from "./EngineUpstream.ts"

const LIMITS = { maxHeaderSize: 16 * 1024, maxHeadersCount: 100, headersTimeoutMs: 10_000, requestTimeoutMs: 0, keepAliveTimeoutMs: 5_000, maxConnections: 64 }

interface Harness {
  readonly port: number
  readonly forwarder: ForwarderShape
}

let before: HandleCounts
let engine: EngineUpstream
let scope: Scope.Closeable | undefined

beforeEach(async () => {
  before = activeHandles()
  engine = await startEngineUpstream()
})

afterEach(async () => {
  if (scope) await Effect.runPromise(Scope.close(scope, Exit.void))
  scope = undefined
  await engine.close()
  await expectNoLeaks(before)
})


/** The raw HTTP/1.1 engine on 127.0.0.1:0, every request going through one forwarder to the engine. */
const harness = async (overrides: Partial<ForwarderConfig> = {}, socketPath = engine.socketPath): Promise<Harness> => {
  scope = Effect.runSync(Scope.make())
  const forwarder = await Effect.runPromise(
    makeForwarder({
      upstream: unixUpstream(socketPath, { maxSockets: 16, maxFreeSockets: 4 }),
      responseTimeoutMs: 10_000,
      idleTimeoutMs: 0,
      ...overrides
    }).pipe(Scope.provide(scope))
  )
  const served = forwarder.serveHttp1({ limits: LIMITS, admit: () => ({ _tag: "Forward" }) })
  const listener = net.createServer({ allowHalfOpen: true }, served.accept)
  await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve))
  await Effect.runPromise(Scope.addFinalizer(
    scope,
    Effect.promise(() => Promise.all([new Promise<void>((resolve) => listener.close(() => resolve())), served.close(0)]))
  ))
  return { port: (listener.address() as net.AddressInfo).port, forwarder }
}

interface Reply {
  readonly status: number
  readonly headers: http.IncomingHttpHeaders
  readonly rawHeaders: ReadonlyArray<string>
  readonly trailers: NodeJS.Dict<string>
  readonly body: string
}

const request = (port: number, options: http.RequestOptions & { body?: string | ReadonlyArray<string> } = {}): Promise<Reply> =>
  new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, agent: false, ...options }, (res) => {
      const chunks: Array<Buffer> = []
      res.on("data", (c: Buffer) => chunks.push(c))
      res.on("end", () =>
        resolve({
          status: res.statusCode!,
          headers: res.headers,
          rawHeaders: res.rawHeaders,
          trailers: res.trailers,
          body: Buffer.concat(chunks).toString()
        }))
      res.on("error", reject)
    })
    req.on("error", reject)
    if (typeof options.body === "string") req.end(options.body)
    else if (options.body) {
      for (const part of options.body) req.write(part)
      req.end()
    } else req.end()
  })

/** Sends raw bytes and collects everything until the server closes. */
const raw = (port: number, bytes: string): Promise<string> =>
  new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1")
    let out = ""
    s.on("data", (d) => (out += d.toString()))
    s.on("error", () => {})
    s.on("close", () => resolve(out))
    s.end(bytes)
  })

const waitFor = async (what: string, cond: () => boolean): Promise<void> => {
  for (let i = 0; i < 500; i++) {
    if (cond()) return
    await sleep(10)
  }
  throw new Error(`timed out waiting for ${what}`)
}

{
  describe("front side: the raw HTTP/1.1 engine", () => {

    describe("Forwarder: ordinary requests", () => {
      it("forwards a small response and reuses pooled upstream connections", async () => {
        const { port } = await harness()
        for (let i = 0; i < 3; i++) {
          const r = await request(port, { path: "/small" })
          assert.strictEqual(r.status, 200)
          assert.strictEqual(r.body, "OK")
          assert.strictEqual(r.headers["api-version"], "1.41")
        }
        assert.strictEqual(engine.seen.length, 3)
      })

      it("strips hop-by-hop headers both ways and leaves X-Forwarded-* off toward a Unix socket", async () => {
        const { port } = await harness()
        const r = await request(port, {
          path: "/headers",
          headers: { connection: "keep-alive, x-client-hop", "x-client-hop": "1", "keep-alive": "timeout=1", te: "trailers", "x-kept": "yes" }
        })
        const sent = (JSON.parse(r.body) as Array<string>).filter((_, i) => i % 2 === 0).map((n) => n.toLowerCase())
        assert.notInclude(sent, "x-client-hop")
        assert.notInclude(sent, "keep-alive")
        assert.notInclude(sent, "te")
        assert.notInclude(sent, "x-forwarded-for")
        assert.include(sent, "x-kept")
        assert.strictEqual(r.headers["x-upstream-hop"], undefined)
        assert.notInclude(String(r.headers["keep-alive"]), "77")
      })

      it("writes X-Forwarded-For/-Proto/-Host when configured", async () => {
        const { port } = await harness({ forwardedHeaders: "replace" })
        const r = await request(port, { path: "/headers", headers: { host: "docker.example", "x-forwarded-for": "203.0.113.9" } })
        const sent = JSON.parse(r.body) as Array<string>
        assert.strictEqual(headerValue(sent, "x-forwarded-for"), "127.0.0.1")
        assert.strictEqual(headerValue(sent, "x-forwarded-proto"), "http")
        assert.strictEqual(headerValue(sent, "x-forwarded-host"), "docker.example")
      })

      it("streams chunked request bodies with trailers and relays response trailers", async () => {
        const { port } = await harness()
        const r = await new Promise<Reply>((resolve, reject) => {
          const req = http.request({ host: "127.0.0.1", port, agent: false, method: "POST", path: "/echo", headers: { "transfer-encoding": "chunked", trailer: "x-sum" } }, (res) => {
            let body = ""
            res.on("data", (c) => (body += c))
            res.on("end", () => resolve({ status: res.statusCode!, headers: res.headers, rawHeaders: res.rawHeaders, trailers: res.trailers, body }))
          })
          req.on("error", reject)
          req.write("hello ")
          req.write("world")
          req.addTrailers({ "x-sum": "42" })
          req.end()
        })
        assert.strictEqual(r.body, "hello world")
        assert.deepStrictEqual(JSON.parse(r.trailers["x-request-trailers"]!), { "x-sum": "42" })
        const t = await request(port, { path: "/trailers" })
        assert.strictEqual(t.body, "part one,part two")
        assert.strictEqual(t.trailers["x-checksum"], "abc123")
      })

      it("forwards Content-Length bodies unchanged", async () => {
        const { port } = await harness()
        const body = "x".repeat(100_000)
        const r = await request(port, { method: "POST", path: "/echo", headers: { "content-length": String(body.length) }, body })
        assert.strictEqual(r.body.length, body.length)
      })

      it("refuses a Transfer-Encoding other than chunked without reaching upstream", async () => {
        const { port } = await harness()
        const out = await raw(port, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
        assert.match(out, /^HTTP\/1\.1 501/)
        assert.strictEqual(engine.seen.length, 0)
      })
    })

    describe("Forwarder as a service", () => {
      it("Forwarder.layer provides the core; its engine servers and pooled connections close with the layer's scope", async () => {
        const layerScope = Effect.runSync(Scope.make())
        const upstream = unixUpstream(engine.socketPath, { maxSockets: 2, maxFreeSockets: 1 })
        const ctx = await Effect.runPromise(
          Layer.build(Forwarder.layer({ upstream, responseTimeoutMs: 1_000, idleTimeoutMs: 0 })).pipe(Scope.provide(layerScope))
        )
        const forwarder = Context.get(ctx, Forwarder)
        const served = forwarder.serveHttp1({ limits: LIMITS, admit: () => ({ _tag: "Forward" }) })
        const listener = net.createServer({ allowHalfOpen: true }, served.accept)
        await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve))
        const r = await request((listener.address() as net.AddressInfo).port, { path: "/small" })
        assert.strictEqual(r.status, 200)
        assert.strictEqual(served.connections(), 0)
        await Effect.runPromise(Scope.close(layerScope, Exit.void))
        // closed with the layer: nothing is taken any more, and the pooled connection is gone (leak check)
        assert.strictEqual(forwarder.active().requests, 0)
        await new Promise<void>((resolve) => listener.close(() => resolve()))
      })
    })

    describe("Forwarder: caller-made connections (tunnels)", () => {
      it("forwards and upgrades over connections the caller opens, pooled by the core", async () => {
        let opened = 0
        // Stands in for a tunnel: every connection is a stream the caller opens (here, to the engine's socket).
        const connect = () => {
          opened++
          return net.createConnection({ path: engine.socketPath, allowHalfOpen: true })
        }
        const { port } = await harness({ upstream: streamUpstream({ describe: "tunnel test-1", connect, limits: { maxSockets: 4, maxFreeSockets: 4 } }) })
        const r = await request(port, { path: "/headers" })
        assert.strictEqual(r.status, 200)
        assert.strictEqual(headerValue(JSON.parse(r.body) as Array<string>, "x-forwarded-for"), "127.0.0.1")
        const r2 = await request(port, { path: "/headers" })
        assert.strictEqual(r2.status, 200)
        // the second request reused the pooled connection
        assert.strictEqual(opened, 1)
        const out = await new Promise<string>((resolve) => {
          const s = net.connect(port, "127.0.0.1")
          let got = ""
          s.on("data", (d) => {
            got += d.toString("latin1")
            if (got.includes("HI")) s.destroy()
          })
          s.on("close", () => resolve(got))
          s.write("POST /containers/x/attach HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\nhi")
        })
        assert.match(out, /^HTTP\/1\.1 101 UPGRADED/)
        // an upgrade takes a connection of its own
        assert.strictEqual(opened, 2)
      })
    })

    describe("Forwarder: streams", () => {
      it("relays a stream that never ends and cancels upstream when the client leaves", async () => {
        const { port, forwarder } = await harness()
        const lines = await new Promise<number>((resolve, reject) => {
          const req = http.request({ host: "127.0.0.1", port, agent: false, path: "/forever" }, (res) => {
            let n = 0
            res.on("data", (c: Buffer) => {
              n += c.toString().split("\n").length - 1
              if (n >= 5) {
                req.destroy()
                resolve(n)
              }
            })
          })
          req.on("error", (e) => (e.message === "socket hang up" ? undefined : reject(e)))
          req.end()
        })
        assert.isAtLeast(lines, 5)
        await waitFor("upstream to see the abort", () => engine.aborted.includes("/forever"))
        await waitFor("the forwarder to settle", () => forwarder.active().requests === 0)
      })

      it("keeps memory bounded for a slow reader (upstream is paused by backpressure)", async () => {
        const { port } = await harness()
        const total = 1024 * 1024 * 1024
        let received = 0
        const res = await new Promise<http.IncomingMessage>((resolve) => {
          const req = http.request({ host: "127.0.0.1", port, agent: false, path: `/big?bytes=${total}` }, resolve)
          req.end()
        })
        res.pause()
        // Wait until upstream stops being able to write: sends stop growing while the client reads nothing.
        let last = -1
        for (let i = 0; i < 200 && engine.bigSent() !== last; i++) {
          last = engine.bigSent()
          await sleep(50)
        }
        const sentWhilePaused = engine.bigSent()
        assert.isBelow(sentWhilePaused, 32 * 1024 * 1024, "bytes in flight while the client reads nothing")
        // Now read a little and check data keeps flowing, then leave.
        res.on("data", (c: Buffer) => (received += c.length))
        res.resume()
        await waitFor("more data", () => received > sentWhilePaused)
        res.destroy()
        await waitFor("upstream to see the abort", () => engine.aborted.includes("/big"))
      })

      it("applies an idle limit to a response with no bytes flowing, and never to one that flows", async () => {
        // The limit is generous against a loaded machine's pauses; /forever writes every few milliseconds.
        const idleMs = 1_000
        const { port } = await harness({ idleTimeoutMs: idleMs })
        // A flowing stream is not idle: it keeps going well past the idle limit (three periods of lines).
        const lines = 3 * (idleMs / 5)
        const n = await new Promise<number>((resolve) => {
          let count = 0
          const req = http.request({ host: "127.0.0.1", port, agent: false, path: "/forever" }, (res) => {
            res.on("data", (c: Buffer) => {
              count += c.toString().split("\n").length - 1
              if (count >= lines) req.destroy()
            })
            res.on("error", () => {})
            res.on("close", () => resolve(count))
          })
          req.on("error", () => resolve(count))
          req.end()
        })
        assert.isAtLeast(n, lines)
        // /silent sends one line and stops: the idle limit closes it, and upstream sees the abort.
        const cut = await new Promise<{ complete: boolean; body: string }>((resolve) => {
          const req = http.request({ host: "127.0.0.1", port, agent: false, path: "/silent" }, (res) => {
            let body = ""
            res.on("data", (c) => (body += c))
            res.on("error", () => {})
            res.on("close", () => resolve({ complete: res.complete, body }))
          })
          req.on("error", () => {})
          req.end()
        })
        assert.isFalse(cut.complete)
        assert.strictEqual(cut.body, "{}\n")
        await waitFor("upstream to see the abort", () => engine.aborted.includes("/silent"))
      })
    })

    describe("Forwarder: errors", () => {
      it("retries a bodyless request once when a pooled connection turns out closed, never a request with a body", async () => {
        // An upstream that answers the first request on each connection and drops the connection on the second.
        const sock = `${engine.socketPath}.flaky`
        const flaky = net.createServer((c) => {
          let served = 0
          c.on("data", (d: Buffer) => {
            if (!d.includes("\r\n\r\n")) return
            if (served++ === 0) c.write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nOK")
            else c.destroy()
          })
          c.on("error", () => {})
        })
        await new Promise<void>((resolve) => flaky.listen(sock, resolve))
        try {
          const { port } = await harness({}, sock)
          assert.strictEqual((await request(port, { path: "/a" })).status, 200)
          assert.strictEqual((await request(port, { path: "/b" })).status, 200)
          const posted = await request(port, { method: "POST", path: "/c", headers: { "content-length": "1" }, body: "x" })
          assert.strictEqual(posted.status, 502)
        } finally {
          await Effect.runPromise(Scope.close(scope!, Exit.void))
          scope = undefined
          await new Promise<void>((resolve) => flaky.close(() => resolve()))
        }
      })

      it("answers 502 with a one-line body when the upstream is unreachable", async () => {
        const { port } = await harness({}, "/nonexistent/switchyard.sock")
        const r = await request(port, { path: "/small" })
        assert.strictEqual(r.status, 502)
        assert.match(r.body, /^switchyard: upstream unix:\/nonexistent\/switchyard\.sock unreachable \(ENOENT\)\n$/)
      })

      it("answers 504 when the upstream does not answer in time", async () => {
        const { port } = await harness({ responseTimeoutMs: 50 })
        const r = await request(port, { path: "/never" })
        assert.strictEqual(r.status, 504)
        assert.include(r.body, "timed out")
      })

      it("answers 400 to malformed requests without reaching upstream", async () => {
        const { port } = await harness()
        for (
          const bytes of [
            "GARBAGE\r\n\r\n",
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            "GET /small HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
            "GET /small HTTP/1.1\r\n\r\n"
          ]
        ) {
          const out = await raw(port, bytes)
          assert.match(out, /^HTTP\/1\.1 400/, JSON.stringify(bytes))
        }
        const big = await raw(port, `GET /small HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(20_000)}\r\n\r\n`)
        assert.match(big, /^HTTP\/1\.1 431/)
        const many = await raw(port, `GET /small HTTP/1.1\r\nHost: x\r\n${Array.from({ length: 120 }, (_, i) => `X-H${i}: v\r\n`).join("")}\r\n`)
        assert.match(many, /^HTTP\/1\.1 431/)
        assert.strictEqual(engine.seen.length, 0)
      })
    })

    describe("Forwarder: upgrades", () => {
      /** Opens a Docker-style hijack and returns the socket once the 101 head has arrived. */
      const hijack = (port: number, path: string, head = "") =>
        new Promise<{ socket: net.Socket; response: string; rest: Buffer }>((resolve, reject) => {
          const socket = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true })
          let buf = Buffer.alloc(0)
          const onData = (d: Buffer) => {
            buf = Buffer.concat([buf, d])
            const end = buf.indexOf("\r\n\r\n")
            if (end !== -1) {
              socket.off("data", onData)
              socket.pause()
              resolve({ socket, response: buf.subarray(0, end).toString(), rest: buf.subarray(end + 4) })
            }
          }
          socket.on("data", onData)
          socket.on("error", reject)
          socket.write(`POST ${path} HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Type: text/plain\r\n\r\n${head}`)
        })

      it("turns Docker's Upgrade: tcp into a raw pipe with half-close both ways", async () => {
        const { port, forwarder } = await harness()
        const { socket, response, rest } = await hijack(port, "/v1.41/containers/abc/attach?stream=1&stdin=1&stdout=1")
        assert.match(response, /^HTTP\/1\.1 101 UPGRADED/)
        assert.match(response, /Upgrade: tcp/i)
        const chunks: Array<Buffer> = [rest]
        const ended = new Promise<void>((resolve) => socket.on("end", resolve))
        socket.on("data", (d: Buffer) => chunks.push(d))
        socket.resume()
        socket.write("hello\n")
        await waitFor("the echo", () => Buffer.concat(chunks).includes("HELLO\n"))
        socket.end() // stdin closed; stdout keeps going until the process exits
        await ended
        const all = Buffer.concat(chunks)
        assert.deepStrictEqual(all, Buffer.concat([stdoutFrame(Buffer.from("HELLO\n")), stdoutFrame(Buffer.from("exit 0\n"))]))
        socket.destroy()
        await waitFor("the tunnel to close", () => forwarder.active().tunnels === 0)
        assert.include(engine.seen.at(-1)!.rawHeaders.map((h) => h.toLowerCase()), "upgrade")
      })

      it("carries a WebSocket end to end (handshake headers through, frames both ways, close)", async () => {
        const sock = `${engine.socketPath}.ws`
        const upstreamHttp = http.createServer()
        const wss = new WebSocketServer({ server: upstreamHttp })
        wss.on("connection", (ws, req) => {
          ws.send(`hello ${req.headers["sec-websocket-protocol"]}`)
          ws.on("message", (m) => ws.send(`echo ${m.toString()}`))
        })
        await new Promise<void>((resolve) => upstreamHttp.listen(sock, resolve))
        try {
          const { port } = await harness({}, sock)
          const ws = new WebSocket(`ws://127.0.0.1:${port}/socket`, "chat")
          const got: Array<string> = []
          await new Promise<void>((resolve, reject) => {
            ws.on("message", (m) => {
              got.push(m.toString())
              if (got.length === 1) ws.send("ping")
              if (got.length === 2) ws.close(1000, "done")
            })
            ws.on("close", () => resolve())
            ws.on("error", reject)
          })
          assert.deepStrictEqual(got, ["hello chat", "echo ping"])
        } finally {
          await Effect.runPromise(Scope.close(scope!, Exit.void))
          scope = undefined
          for (const c of wss.clients) c.terminate()
          await new Promise<void>((resolve) => wss.close(() => resolve()))
          await new Promise<void>((resolve) => upstreamHttp.close(() => resolve()))
        }
      })

      it("delivers everything the upstream wrote just before it closed, even to a slow client", async () => {
        const { port, forwarder } = await harness()
        const tail = 8 * 1024 * 1024
        const { socket, rest } = await hijack(port, `/containers/abc/attach?stdin=1&tail=${tail}`)
        let got = rest.length
        socket.end() // stdin closed: the upstream writes the tail and closes at once
        // Read slowly at first so the proxy has to hold the tail while the upstream is already gone.
        await sleep(200)
        const ended = new Promise<void>((resolve) => socket.on("end", resolve))
        socket.on("data", (d: Buffer) => (got += d.length))
        socket.resume()
        await ended
        assert.strictEqual(got, tail + 8)
        socket.destroy()
        await waitFor("the tunnel to close", () => forwarder.active().tunnels === 0)
      })

      it("sends an upgrade request's body before the 101 (docker exec start), even when it arrives late", async () => {
        const { port } = await harness()
        const json = `{"Detach":false,"Tty":false}`
        for (const split of [true, false]) {
          const socket = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true })
          const chunks: Array<Buffer> = []
          socket.on("data", (d: Buffer) => chunks.push(d))
          const ended = new Promise<void>((resolve) => socket.on("end", resolve))
          const headText = `POST /v1.41/exec/e1/start HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Type: application/json\r\nContent-Length: ${json.length}\r\n\r\n`
          if (split) {
            socket.write(headText)
            await sleep(50)
            socket.write(json.slice(0, 5))
            await sleep(20)
            socket.write(json.slice(5) + "ls\n")
          } else {
            socket.write(headText + json + "ls\n")
          }
          await waitFor("the body echo", () => Buffer.concat(chunks).includes("LS\n"))
          socket.end()
          await ended
          const all = Buffer.concat(chunks).toString("latin1")
          assert.match(all, /^HTTP\/1\.1 101 UPGRADED/)
          assert.include(all, `body ${json}\n`)
          assert.include(all, "exit 0")
          socket.destroy()
        }
      })

      it("survives a client that resets while its upgrade body is still arriving, or right after a refusal", async () => {
        const { port } = await harness()
        for (const bytes of [
          "POST /exec/e1/start HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 100\r\n\r\n{\"Det",
          "POST /exec/e1/start HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 99999999\r\n\r\n"
        ]) {
          await new Promise<void>((resolve) => {
            const s = net.connect(port, "127.0.0.1", () => {
              s.write(bytes, () => setTimeout(() => {
                s.resetAndDestroy()
                resolve()
              }, 20))
            })
            s.on("error", () => {})
          })
        }
        // Still serving.
        assert.strictEqual((await request(port, { path: "/small" })).status, 200)
      })

      it("refuses an upgrade body without a length, or one too large", async () => {
        const { port } = await harness()
        const chunked = await raw(port, "POST /exec/e1/start HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert.match(chunked, /^HTTP\/1\.1 400/)
        const big = await raw(port, "POST /exec/e1/start HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 99999999\r\n\r\n")
        assert.match(big, /^HTTP\/1\.1 413/)
        assert.strictEqual(engine.seen.length, 0)
      })

      it("passes bytes sent right after the request head", async () => {
        const { port } = await harness()
        const { socket, rest } = await hijack(port, "/containers/abc/attach?stdin=1", "early\n")
        const chunks: Array<Buffer> = [rest]
        socket.on("data", (d: Buffer) => chunks.push(d))
        socket.resume()
        await waitFor("the early bytes echoed", () => Buffer.concat(chunks).includes("EARLY"))
        socket.destroy()
      })

      it("relays an upstream's refusal to upgrade and closes", async () => {
        const { port } = await harness()
        const out = await raw(port, "POST /containers/abc/resize HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
        assert.match(out, /^HTTP\/1\.1 404/)
        assert.include(out, `{"message":"no such exec"}`)
      })

      it("answers 502 on a raw socket when the upstream is unreachable", async () => {
        const { port } = await harness({}, "/nonexistent/switchyard.sock")
        const out = await raw(port, "POST /containers/a/attach HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
        assert.match(out, /^HTTP\/1\.1 502/)
      })

      it("closing the forwarder's scope ends live tunnels", async () => {
        const { port, forwarder } = await harness()
        const { socket } = await hijack(port, "/containers/abc/attach")
        // The client is half-open capable: the proxy's side closing shows up as "end".
        const closed = new Promise<void>((resolve) => socket.on("end", () => resolve()))
        socket.resume()
        assert.strictEqual(forwarder.active().tunnels, 2)
        await Effect.runPromise(Scope.close(scope!, Exit.void))
        scope = undefined
        await closed
        socket.destroy()
      })
    })
  })
}
