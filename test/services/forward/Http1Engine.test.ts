import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect, Exit, Scope } from "effect"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { setTimeout as sleep } from "node:timers/promises"
import { CLIENT_LIMIT_DEFAULTS, type ClientLimits } from "../../../src/domain/ClientLimits.ts"
import type { Admission, Http1Request, PendingAdmission } from "../../../src/services/forward/http1/Admission.ts"
import { MAX_INTERIM_RESPONSES, MAX_PIPELINED_BYTES, WRITE_QUEUE_PAUSE_BYTES } from "../../../src/services/forward/http1/Constants.ts"
import { UPSTREAM_READ_BUFFER_MAX_BYTES } from "../../../src/services/forward/UpstreamPool.ts"
import { unixUpstream } from "../../../src/services/forward/Upstream.ts"
import { type ForwarderConfig, type ForwarderShape, makeForwarder } from "../../../src/services/Forwarder.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../../support/leaks.ts"

const LIMITS = { maxHeaderSize: 8 * 1024, maxHeadersCount: 50, headersTimeoutMs: 10_000, requestTimeoutMs: 0, keepAliveTimeoutMs: 5_000, maxConnections: 64 }

/** An upstream on a Unix socket that counts its connections and the requests in flight. */
interface CountingUpstream {
  readonly socketPath: string
  readonly server: http.Server
  /** Connections accepted so far. */
  connections: number
  /** Requests being answered right now, and the most at once. */
  inFlight: number
  maxInFlight: number
  /** Paths whose response was cut before it finished. */
  readonly aborted: Array<string>
  readonly sockets: Set<net.Socket>
  /** Responses held open by `/hold` until released. */
  readonly held: Array<http.ServerResponse>
  bigSent: number
}

let before: HandleCounts
let dir: string
let upstream: CountingUpstream
let scope: Scope.Closeable | undefined

const CHUNK = Buffer.alloc(64 * 1024, 0x62)

/** The bytes of `/pattern` from `offset`. */
const patternBytes = (offset: number, n: number): Buffer => {
  const b = Buffer.allocUnsafe(n)
  for (let i = 0; i < n; i++) {
    const at = offset + i
    b[i] = (at * 7 + (at >>> 11)) & 0xff
  }
  return b
}

/** A complete response with a Content-Length. */
const send = (res: http.ServerResponse, body: string | Buffer): void => {
  res.writeHead(200, { "content-type": "text/plain", "content-length": String(Buffer.byteLength(body)) }).end(body)
}

const startUpstream = async (): Promise<CountingUpstream> => {
  const socketPath = path.join(dir, "up.sock")
  const state: CountingUpstream = {
    socketPath,
    server: undefined as unknown as http.Server,
    connections: 0,
    inFlight: 0,
    maxInFlight: 0,
    aborted: [],
    sockets: new Set(),
    held: [],
    bigSent: 0
  }
  const server = http.createServer({ keepAliveTimeout: 60_000 }, (req, res) => {
    const url = new URL(req.url!, "http://up")
    state.inFlight++
    state.maxInFlight = Math.max(state.maxInFlight, state.inFlight)
    res.on("close", () => {
      state.inFlight--
      if (!res.writableFinished) state.aborted.push(url.pathname)
    })
    switch (url.pathname) {
      case "/small":
        send(res, `OK ${url.search}`)
        return
      case "/echo": {
        const parts: Array<Buffer> = []
        req.on("data", (c: Buffer) => parts.push(c))
        req.on("end", () => send(res, Buffer.concat(parts)))
        return
      }
      case "/hold":
        state.held.push(res)
        res.writeHead(200, { "content-type": "text/plain" })
        return
      case "/close-after":
        // Answers with keep-alive, then closes the connection once it is idle (as a server's idle timeout does).
        res.writeHead(200, { "content-length": "2" }).end("OK")
        res.on("finish", () => setImmediate(() => req.socket.end()))
        return
      case "/early-hints":
        res.writeEarlyHints({ link: "</style.css>; rel=preload" })
        send(res, "after hints")
        return
      case "/pattern": {
        // Every byte depends on its offset, so a reordered, repeated or overwritten chunk shows.
        const total = Number(url.searchParams.get("bytes"))
        res.writeHead(200, { "content-length": String(total) })
        let offset = 0
        const pump = () => {
          while (offset < total) {
            const n = Math.min(total - offset, 50_000 + (offset % 30_011))
            if (!res.write(patternBytes(offset, n))) {
              offset += n
              res.once("drain", pump)
              return
            }
            offset += n
          }
          res.end()
        }
        res.on("close", () => (offset = total))
        pump()
        return
      }
      case "/big": {
        const total = Number(url.searchParams.get("bytes"))
        res.writeHead(200, { "content-length": String(total) })
        let left = total
        const pump = () => {
          while (left > 0) {
            const c = left >= CHUNK.length ? CHUNK : CHUNK.subarray(0, left)
            left -= c.length
            state.bigSent += c.length
            if (!res.write(c)) {
              res.once("drain", pump)
              return
            }
          }
          res.end()
        }
        res.on("close", () => (left = 0))
        pump()
        return
      }
      default:
        res.writeHead(404).end()
    }
  })
  server.on("connection", (s: net.Socket) => {
    state.connections++
    state.sockets.add(s)
    s.on("close", () => state.sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(socketPath, resolve))
  return Object.assign(state, { server })
}

beforeEach(async () => {
  before = activeHandles()
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-engine-test-"))
  upstream = await startUpstream()
})

afterEach(async () => {
  if (scope) await Effect.runPromise(Scope.close(scope, Exit.void))
  scope = undefined
  for (const r of upstream.held) r.destroy()
  for (const s of upstream.sockets) s.destroy()
  await new Promise<void>((resolve) => upstream.server.close(() => resolve()))
  fs.rmSync(dir, { recursive: true, force: true })
  await expectNoLeaks(before)
})

/** The engine on 127.0.0.1:0 in front of the counting upstream. */
const serve = async (
  options: {
    readonly maxSockets?: number
    readonly admit?: (r: Http1Request) => Admission | PendingAdmission
    readonly clientLimits?: ClientLimits
  } & Partial<ForwarderConfig> = {}
): Promise<{ readonly port: number; readonly forwarder: ForwarderShape }> => {
  scope = Effect.runSync(Scope.make())
  const forwarder = await Effect.runPromise(
    makeForwarder({
      upstream: unixUpstream(upstream.socketPath, { maxSockets: options.maxSockets ?? 16, maxFreeSockets: 4 }),
      responseTimeoutMs: 10_000,
      idleTimeoutMs: 0,
      ...options
    }).pipe(Scope.provide(scope))
  )
  const engine = forwarder.serveHttp1({ limits: LIMITS, admit: options.admit ?? (() => ({ _tag: "Forward" })), clientLimits: options.clientLimits })
  const listener = net.createServer({ allowHalfOpen: true }, engine.accept)
  await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve))
  await Effect.runPromise(Scope.addFinalizer(
    scope,
    Effect.promise(() => Promise.all([new Promise<void>((resolve) => listener.close(() => resolve())), engine.close(0)]))
  ))
  return { port: (listener.address() as net.AddressInfo).port, forwarder }
}

/** A client connection that collects what it receives. */
const connect = (port: number) => {
  const socket = net.connect({ port, host: "127.0.0.1" })
  let received = Buffer.alloc(0)
  const waiters: Array<() => void> = []
  socket.on("data", (d: Buffer) => {
    received = Buffer.concat([received, d])
    for (const w of waiters.splice(0)) w()
  })
  socket.on("error", () => {})
  const closed = new Promise<void>((resolve) => socket.on("close", () => resolve()))
  return {
    socket,
    closed,
    text: () => received.toString("latin1"),
    /** Waits until the received text satisfies `done` (bounded). */
    until: async (what: string, done: (text: string) => boolean): Promise<string> => {
      for (let i = 0; i < 500; i++) {
        const t = received.toString("latin1")
        if (done(t)) return t
        await Promise.race([new Promise<void>((resolve) => waiters.push(resolve)), sleep(20)])
      }
      throw new Error(`timed out waiting for ${what}; got ${JSON.stringify(received.toString("latin1").slice(0, 300))}`)
    }
  }
}

const count = (text: string, needle: string): number => text.split(needle).length - 1

const waitFor = async (what: string, cond: () => boolean): Promise<void> => {
  for (let i = 0; i < 500; i++) {
    if (cond()) return
    await sleep(10)
  }
  throw new Error(`timed out waiting for ${what}`)
}

describe("Http1Engine", () => {
  it("answers pipelined requests in order, bodies included, on one client connection", async () => {
    const { port } = await serve()
    const c = connect(port)
    c.socket.write(
      "GET /small?a=1 HTTP/1.1\r\nHost: x\r\n\r\n" +
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" +
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" +
        "GET /small?a=4 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    const text = await c.until("four responses", (t) => count(t, "HTTP/1.1 200") === 4 && t.endsWith("OK ?a=4"))
    const order = [...text.matchAll(/\r\n\r\n(OK \?a=1|hello|abc|OK \?a=4)/g)].map((m) => m[1])
    assert.deepStrictEqual(order, ["OK ?a=1", "hello", "abc", "OK ?a=4"])
    c.socket.destroy()
  })

  it("reuses connections on both sides: one client connection, one upstream connection", async () => {
    const { port } = await serve()
    const c = connect(port)
    for (let i = 1; i <= 5; i++) {
      c.socket.write(`GET /small?n=${i} HTTP/1.1\r\nHost: x\r\n\r\n`)
      await c.until(`response ${i}`, (t) => t.endsWith(`OK ?n=${i}`))
    }
    assert.strictEqual(upstream.connections, 1)
    // A second client takes the pooled connection too.
    const other = connect(port)
    other.socket.write("GET /small?n=6 HTTP/1.1\r\nHost: x\r\n\r\n")
    await other.until("response 6", (t) => t.endsWith("OK ?n=6"))
    assert.strictEqual(upstream.connections, 1)
    c.socket.destroy()
    other.socket.destroy()
  })

  it("keeps at most maxSockets upstream connections; the other requests wait and then complete", async () => {
    // one client address may use the whole pool here, and wait for it as long as it takes
    const { port } = await serve({ maxSockets: 2, clientLimits: { ...CLIENT_LIMIT_DEFAULTS, maxUpstreamSlotsPerClient: 0, upstreamSlotWaitMs: 0 } })
    const clients = Array.from({ length: 5 }, () => connect(port))
    for (const c of clients) c.socket.write("GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("two held requests", () => upstream.held.length === 2)
    await sleep(50)
    assert.strictEqual(upstream.held.length, 2)
    assert.strictEqual(upstream.connections, 2)
    // Release held responses one by one: each frees a pooled connection for a waiting request.
    let released = 0
    while (released < 5) {
      await waitFor("a held request", () => upstream.held.length > released)
      upstream.held[released]!.end("done")
      released++
    }
    for (const c of clients) await c.until("done", (t) => t.includes("done"))
    assert.strictEqual(upstream.maxInFlight, 2)
    assert.strictEqual(upstream.connections, 2)
    for (const c of clients) c.socket.destroy()
  })

  it("drops a pooled connection the upstream closed while idle and serves the next request on a new one", async () => {
    const { port } = await serve()
    const c = connect(port)
    c.socket.write("GET /close-after HTTP/1.1\r\nHost: x\r\n\r\n")
    await c.until("first", (t) => t.endsWith("OK"))
    await waitFor("the upstream to close its side", () => upstream.sockets.size === 0)
    c.socket.write("GET /small?n=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    await c.until("second", (t) => t.endsWith("OK ?n=2"))
    assert.strictEqual(upstream.connections, 2)
    assert.notInclude(c.text(), "502")
    c.socket.destroy()
  })

  it("destroys the upstream connection when the client leaves mid-download, never pooling it", async () => {
    const { port, forwarder } = await serve()
    const c = connect(port)
    c.socket.write(`GET /big?bytes=${512 * 1024 * 1024} HTTP/1.1\r\nHost: x\r\n\r\n`)
    await c.until("some body", (t) => t.length > 256 * 1024)
    c.socket.destroy()
    await waitFor("upstream to see the abort", () => upstream.aborted.includes("/big"))
    await waitFor("no upstream connection left", () => upstream.sockets.size === 0)
    await waitFor("the forwarder to settle", () => forwarder.active().requests === 0)
    assert.isBelow(upstream.bigSent, 512 * 1024 * 1024)
  })

  it("delivers a large body byte for byte to a reader that keeps stopping (read buffers are reused only when free)", async () => {
    const { port } = await serve()
    const total = 24 * 1024 * 1024
    const result = await new Promise<{ readonly length: number; readonly firstBad: number }>((resolve, reject) => {
      http.get({ host: "127.0.0.1", port, path: `/pattern?bytes=${total}`, agent: false }, (res) => {
        let at = 0
        let firstBad = -1
        let reads = 0
        res.on("data", (c: Buffer) => {
          if (firstBad === -1) {
            const want = patternBytes(at, c.length)
            if (!want.equals(c)) {
              let i = 0
              while (want[i] === c[i]) i++
              firstBad = at + i
            }
          }
          at += c.length
          // Stop now and then, long enough for the kernel's buffers to fill and the proxy's writes to queue.
          reads += c.length
          if (reads >= 2 * 1024 * 1024) {
            reads = 0
            res.pause()
            setTimeout(() => res.resume(), 25)
          }
        })
        res.on("end", () => resolve({ length: at, firstBad }))
        res.on("error", reject)
      }).on("error", reject)
    })
    assert.strictEqual(result.length, total)
    assert.strictEqual(result.firstBad, -1)
  })

  it("queues at most the pause mark plus one read for a client that reads nothing, then delivers every byte", async () => {
    // The client's socket on the engine side, to see what the engine queued on it.
    let served: net.Socket | undefined
    const { port } = await serve({
      admit: (r) => {
        served = r.socket as net.Socket
        return { _tag: "Forward" }
      }
    })
    const total = 64 * 1024 * 1024
    const c = net.connect({ port, host: "127.0.0.1" })
    c.on("error", () => {})
    c.write(`GET /pattern?bytes=${total} HTTP/1.1\r\nHost: x\r\n\r\n`)
    c.pause()
    // Kernel buffers fill, then the engine's queue grows until it stops reading the upstream.
    let last = -1
    for (let i = 0; i < 300; i++) {
      const queued = served?.writableLength ?? 0
      if (queued >= WRITE_QUEUE_PAUSE_BYTES && queued === last) break
      last = queued
      await sleep(50)
    }
    const queued = served!.writableLength
    // Past the socket's own 16 KiB mark (no pause for every partial write), below the engine's bound.
    assert.isAtLeast(queued, WRITE_QUEUE_PAUSE_BYTES)
    assert.isAtMost(queued, WRITE_QUEUE_PAUSE_BYTES + UPSTREAM_READ_BUFFER_MAX_BYTES)
    let received = Buffer.alloc(0)
    let bodyAt = -1
    let at = 0
    let firstBad = -1
    await new Promise<void>((resolve, reject) => {
      c.on("data", (d: Buffer) => {
        if (bodyAt === -1) {
          received = Buffer.concat([received, d])
          const end = received.indexOf("\r\n\r\n")
          if (end === -1) return
          bodyAt = end + 4
          d = received.subarray(bodyAt)
        }
        if (firstBad === -1 && !patternBytes(at, d.length).equals(d)) firstBad = at
        at += d.length
        if (at >= total) resolve()
      })
      c.on("close", () => (at >= total ? resolve() : reject(new Error(`closed after ${at} bytes`))))
      c.resume()
    })
    c.destroy()
    assert.strictEqual(at, total)
    assert.strictEqual(firstBad, -1)
  })

  it("relays interim responses and answers Expect: 100-continue itself", async () => {
    const { port } = await serve()
    const c = connect(port)
    c.socket.write("GET /early-hints HTTP/1.1\r\nHost: x\r\n\r\n")
    const hints = await c.until("hints and response", (t) => t.endsWith("after hints"))
    assert.match(hints, /^HTTP\/1\.1 103 Early Hints\r\n(?:.*\r\n)*?link: <\/style\.css>; rel=preload\r\n/i)
    assert.include(hints, "HTTP/1.1 200")
    const e = connect(port)
    e.socket.write("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    await e.until("100 Continue", (t) => t.startsWith("HTTP/1.1 100 Continue\r\n\r\n"))
    e.socket.write("data")
    await e.until("echo", (t) => t.endsWith("data"))
    c.socket.destroy()
    e.socket.destroy()
  })

  it("refuses with the caller's status and never reaches upstream", async () => {
    const { port } = await serve({
      admit: (r) => r.target.startsWith("/small") ? { _tag: "Forward" } : { _tag: "Refuse", status: 403, message: "no" }
    })
    const denied = connect(port)
    denied.socket.write("GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    await denied.closed
    assert.match(denied.text(), /^HTTP\/1\.1 403 Forbidden\r\n/)
    assert.include(denied.text(), "Connection: close")
    assert.strictEqual(upstream.connections, 0)
  })

  it("answers 502 when the upstream's response head is malformed, or it sends interim responses without end", async () => {
    for (
      const [name, answer] of [
        ["duplicate-length", "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"],
        ["interim-flood", "HTTP/1.1 103 Early Hints\r\n\r\n".repeat(40) + "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"]
      ] as const
    ) {
      const badPath = path.join(dir, `${name}.sock`)
      const bad = net.createServer((s) => {
        s.on("error", () => {})
        s.once("data", () => s.end(answer))
      })
      await new Promise<void>((resolve) => bad.listen(badPath, resolve))
      const s = Effect.runSync(Scope.make())
      try {
        const f = await Effect.runPromise(
          makeForwarder({ upstream: unixUpstream(badPath, { maxSockets: 1, maxFreeSockets: 1 }), responseTimeoutMs: 5_000, idleTimeoutMs: 0 })
            .pipe(Scope.provide(s))
        )
        const engine = f.serveHttp1({ limits: LIMITS, admit: () => ({ _tag: "Forward" }) })
        const listener = net.createServer({ allowHalfOpen: true }, engine.accept)
        await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve))
        await Effect.runPromise(Scope.addFinalizer(
          s,
          Effect.promise(() => Promise.all([new Promise<void>((resolve) => listener.close(() => resolve())), engine.close(0)]))
        ))
        const c = connect((listener.address() as net.AddressInfo).port)
        c.socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await c.closed
        assert.match(c.text(), /HTTP\/1\.1 502 Bad Gateway\r\n/, name)
        assert.notInclude(c.text(), "HTTP/1.1 200", name)
        assert.isAtMost(count(c.text(), "103 Early Hints"), MAX_INTERIM_RESPONSES, name)
      } finally {
        await Effect.runPromise(Scope.close(s, Exit.void))
        await new Promise<void>((resolve) => bad.close(() => resolve()))
      }
    }
  })

  it("never relays bytes past a response's framing, nor reuses the connection that sent them, and reports it", async () => {
    const forged = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
    const rawPath = path.join(dir, "raw.sock")
    let accepted = 0
    const raw = net.createServer((s) => {
      accepted++
      s.on("error", () => {})
      let buffered = ""
      s.on("data", (c: Buffer) => {
        buffered += c.toString("latin1")
        for (let end = buffered.indexOf("\r\n\r\n"); end !== -1; end = buffered.indexOf("\r\n\r\n")) {
          const target = buffered.slice(0, buffered.indexOf("\r\n")).split(" ")[1]!
          buffered = buffered.slice(end + 4)
          if (target === "/same-read") s.write("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc" + forged)
          else if (target === "/no-content") s.write("HTTP/1.1 204 No Content\r\n\r\n" + forged)
          else if (target === "/both") s.write("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")
          else if (target === "/later") s.write("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", () => setTimeout(() => s.write(forged), 20))
          else s.write(`HTTP/1.1 200 OK\r\nContent-Length: ${target.length}\r\n\r\n${target}`)
        }
      })
    })
    await new Promise<void>((resolve) => raw.listen(rawPath, resolve))
    const reports: Array<string> = []
    const s = Effect.runSync(Scope.make())
    try {
      const f = await Effect.runPromise(
        makeForwarder({
          upstream: unixUpstream(rawPath, { maxSockets: 1, maxFreeSockets: 1 }),
          responseTimeoutMs: 5_000,
          idleTimeoutMs: 0,
          onUpstreamError: (m) => void reports.push(m)
        }).pipe(Scope.provide(s))
      )
      const engine = f.serveHttp1({ limits: LIMITS, admit: () => ({ _tag: "Forward" }) })
      const listener = net.createServer({ allowHalfOpen: true }, engine.accept)
      await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve))
      await Effect.runPromise(Scope.addFinalizer(
        s,
        Effect.promise(() => Promise.all([new Promise<void>((resolve) => listener.close(() => resolve())), engine.close(0)]))
      ))
      const port = (listener.address() as net.AddressInfo).port
      const c = connect(port)
      // each answer ends at its framing; the connection that sent more is never asked again
      c.socket.write("GET /same-read HTTP/1.1\r\nHost: x\r\n\r\nGET /one HTTP/1.1\r\nHost: x\r\n\r\n")
      await c.until("two answers", (t) => t.endsWith("/one"))
      c.socket.write("GET /no-content HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n")
      await c.until("four answers", (t) => t.endsWith("/two"))
      // both framings: the coding wins, the length is not relayed, the connection is not reused
      c.socket.write("GET /both HTTP/1.1\r\nHost: x\r\n\r\n")
      await c.until("five answers", (t) => t.endsWith("0\r\n\r\n"))
      c.socket.write("GET /later HTTP/1.1\r\nHost: x\r\n\r\n")
      await c.until("six answers", (t) => t.endsWith("abc") && count(t, "HTTP/1.1") === 6)
      await waitFor("the idle connection that talked to be reported", () => reports.some((r) => r.includes("on an idle connection")))
      c.socket.write("GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      await c.closed
      assert.strictEqual(
        c.text(),
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc" + "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n/one" +
          "HTTP/1.1 204 No Content\r\n\r\n" + "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n/two" +
          "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n" +
          "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc" +
          "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\n/three"
      )
      // a fresh connection after each one that broke its framing: /same-read, /no-content, /both, /later
      assert.strictEqual(accepted, 5)
      assert.deepStrictEqual(reports.map((r) => r.replace(/^upstream \S+ /, "")), [
        `sent ${forged.length} bytes past the end of its response; the connection is dropped`,
        `sent ${forged.length} bytes past the end of its response; the connection is dropped`,
        `sent ${forged.length} bytes on an idle connection; the connection is dropped`
      ])
    } finally {
      await Effect.runPromise(Scope.close(s, Exit.void))
      await new Promise<void>((resolve) => raw.close(() => resolve()))
    }
  })

  it("keeps a client's HTTP/1.0 request off the keep-alive paths: answered, then closed", async () => {
    const { port } = await serve()
    const c = connect(port)
    c.socket.write("GET /small?v=10 HTTP/1.0\r\n\r\n")
    await c.closed
    assert.match(c.text(), /^HTTP\/1\.1 200 OK\r\n/)
    assert.include(c.text(), "Connection: close")
    assert.isTrue(c.text().endsWith("OK ?v=10"))
  })

  it("closes idle client connections when its server closes, and lets one in flight finish within the drain time", async () => {
    scope = Effect.runSync(Scope.make())
    const forwarder = await Effect.runPromise(
      makeForwarder({ upstream: unixUpstream(upstream.socketPath, { maxSockets: 4, maxFreeSockets: 4 }), responseTimeoutMs: 10_000, idleTimeoutMs: 0 })
        .pipe(Scope.provide(scope))
    )
    const engine = forwarder.serveHttp1({ limits: LIMITS, admit: () => ({ _tag: "Forward" }) })
    const listener = net.createServer({ allowHalfOpen: true }, engine.accept)
    await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve))
    const port = (listener.address() as net.AddressInfo).port
    const idle = connect(port)
    idle.socket.write("GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    await idle.until("answer", (t) => t.endsWith("OK "))
    const busy = connect(port)
    busy.socket.write("GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the held request", () => upstream.held.length === 1)
    // The listener's close completes only once its connections are gone: the engine's drain decides that.
    const stopped = new Promise<void>((resolve) => listener.close(() => resolve()))
    const closing = engine.close(5_000)
    await idle.closed
    upstream.held[0]!.end("finished")
    await closing
    await stopped
    await busy.closed
    assert.include(busy.text(), "finished")
    assert.strictEqual(engine.connections(), 0)
  })
})

/** Admissions that wait until the test decides them, as a route in its grace period does. */
const pendingAdmissions = () => {
  const waiting: Array<{ readonly target: string; readonly decide: (a: Admission) => void }> = []
  let cancelled = 0
  let ended = 0
  const admit = (r: Http1Request): PendingAdmission => ({
    _tag: "Pending",
    wait: (decide) => {
      const entry = { target: r.target, decide }
      waiting.push(entry)
      return () => {
        cancelled++
        const i = waiting.indexOf(entry)
        if (i !== -1) waiting.splice(i, 1)
      }
    }
  })
  const forward: Admission = { _tag: "Forward", onEnd: () => void ended++ }
  return { waiting, admit, forward, cancelled: () => cancelled, ended: () => ended }
}

describe("Http1Engine asynchronous admission", () => {
  it("holds a keep-alive request while its decision is pending, then forwards it; each request is decided on its own", async () => {
    const pending = pendingAdmissions()
    let decisions = 0
    const { port } = await serve({
      admit: (r) => {
        decisions++
        return r.target.startsWith("/small?now") ? pending.forward : pending.admit(r)
      }
    })
    const c = connect(port)
    c.socket.write("GET /small?now=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await c.until("the first answer", (t) => t.endsWith("OK ?now=1"))
    assert.strictEqual(pending.ended(), 1)
    c.socket.write("GET /small?later=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the pending decision", () => pending.waiting.length === 1)
    // Nothing reaches the upstream or the client while the decision waits.
    await sleep(50)
    assert.strictEqual(count(c.text(), "HTTP/1.1 200"), 1)
    const connectionsBefore = upstream.connections
    pending.waiting.shift()!.decide(pending.forward)
    await c.until("the second answer", (t) => t.endsWith("OK ?later=2"))
    assert.strictEqual(count(c.text(), "HTTP/1.1 200"), 2)
    assert.notInclude(c.text(), "Connection: close")
    assert.strictEqual(decisions, 2)
    assert.strictEqual(pending.ended(), 2)
    assert.strictEqual(pending.cancelled(), 0)
    // the pooled upstream connection carried both
    assert.strictEqual(upstream.connections, connectionsBefore)
    c.socket.destroy()
    await c.closed
  })

  it("forwards a body that arrived while the decision was pending, and a decision made at once", async () => {
    const pending = pendingAdmissions()
    const { port } = await serve({
      admit: (r) =>
        r.target === "/echo"
          ? pending.admit(r)
          : { _tag: "Pending", wait: (decide) => (decide(pending.forward), () => {}) }
    })
    const c = connect(port)
    c.socket.write("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello")
    await waitFor("the pending decision", () => pending.waiting.length === 1)
    c.socket.write(" world")
    await sleep(20)
    pending.waiting.shift()!.decide(pending.forward)
    await c.until("the echo", (t) => t.endsWith("hello world"))
    c.socket.write("GET /small?sync=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await c.until("the answer decided at once", (t) => t.endsWith("OK ?sync=1"))
    assert.strictEqual(pending.ended(), 2)
    c.socket.destroy()
    await c.closed
  })

  it("cancels the wait when the client leaves, and gives back a decision that comes too late", async () => {
    const pending = pendingAdmissions()
    const { port } = await serve({ admit: pending.admit })
    const c = connect(port)
    c.socket.write("GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the pending decision", () => pending.waiting.length === 1)
    const late = pending.waiting[0]!
    c.socket.destroy()
    await c.closed
    await waitFor("the cancellation", () => pending.cancelled() === 1)
    assert.strictEqual(pending.waiting.length, 0)
    late.decide(pending.forward)
    assert.strictEqual(pending.ended(), 1)
    assert.strictEqual(upstream.connections, 0)
  })

  it("answers a refusal that comes after waiting (a full wait queue, no backend in time) and closes", async () => {
    const pending = pendingAdmissions()
    const { port } = await serve({ admit: pending.admit })
    const c = connect(port)
    c.socket.write("GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the pending decision", () => pending.waiting.length === 1)
    pending.waiting.shift()!.decide({ _tag: "Refuse", status: 503, message: "switchyard: too many requests waiting" })
    await c.closed
    assert.match(c.text(), /^HTTP\/1\.1 503 Service Unavailable\r\n/)
    assert.include(c.text(), "too many requests waiting")
    assert.strictEqual(upstream.connections, 0)
    assert.strictEqual(pending.cancelled(), 0)
  })

  it("reads nothing more from a client whose request waits: what it sends stays in its own buffers", async () => {
    const pending = pendingAdmissions()
    const { port } = await serve({ admit: pending.admit })
    const c = connect(port)
    c.socket.write("GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the pending decision", () => pending.waiting.length === 1)
    const filler = Buffer.alloc(64 * 1024, 0x61)
    const offered = 64 * (MAX_PIPELINED_BYTES + LIMITS.maxHeaderSize)
    for (let sent = 0; sent < offered; sent += filler.length) c.socket.write(filler)
    await sleep(100)
    // The loopback buffers take some; the rest waits on the client side, and the connection stays up.
    assert.isAbove(c.socket.writableLength, 0)
    assert.isFalse(c.socket.destroyed)
    assert.strictEqual(pending.cancelled(), 0)
    pending.waiting.shift()!.decide({ _tag: "Refuse", status: 503, message: "switchyard: no backend in time" })
    await c.until("the refusal", (t) => t.includes("503 Service Unavailable"))
    c.socket.destroy()
    await c.closed
    assert.strictEqual(upstream.connections, 0)
  })
})
