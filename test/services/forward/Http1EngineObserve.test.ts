import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect, Exit, Scope } from "effect"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { setTimeout as sleep } from "node:timers/promises"
import type { Admission, Http1Exchange, Http1Request } from "../../../src/services/forward/http1/Admission.ts"
import { unixUpstream } from "../../../src/services/forward/Upstream.ts"
import { makeForwarder } from "../../../src/services/Forwarder.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../../support/leaks.ts"
import { listenUnix } from "../../support/listenUnix.ts"

const LIMITS = { maxHeaderSize: 8 * 1024, maxHeadersCount: 50, headersTimeoutMs: 10_000, requestTimeoutMs: 0, keepAliveTimeoutMs: 5_000, maxConnections: 64 }
const CHUNK = Buffer.alloc(64 * 1024, 0x62)

let before: HandleCounts
let dir: string
let upstreamPath: string
let closeUpstream: () => Promise<void>
let seenIds: Array<string | undefined>
let scope: Scope.Closeable | undefined

beforeEach(async () => {
  before = activeHandles()
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-engine-observe-"))
  upstreamPath = path.join(dir, "up.sock")
  seenIds = []
  const upstreamServer = http.createServer({ keepAliveTimeout: 60_000 }, (req, res) => {
    const url = new URL(req.url!, "http://up")
    seenIds.push(req.headers["x-request-id"] as string | undefined)
    switch (url.pathname) {
      case "/small":
        res.writeHead(200, { "content-length": "2", "x-request-id": "from-upstream" }).end("OK")
        return
      case "/echo": {
        const parts: Array<Buffer> = []
        req.on("data", (c: Buffer) => parts.push(c))
        req.on("end", () => {
          const body = Buffer.concat(parts)
          res.writeHead(201, { "content-length": String(body.length) }).end(body)
        })
        return
      }
      case "/big": {
        res.writeHead(200, { "content-length": String(512 * 1024 * 1024) })
        let open = true
        res.on("close", () => (open = false))
        const pump = () => {
          while (open) if (!res.write(CHUNK)) return void res.once("drain", pump)
        }
        pump()
        return
      }
      case "/silent":
        // never answers: the client gives up first
        return
      case "/ws":
        return void res.writeHead(426).end()
      default:
        res.writeHead(404, { "content-length": "0" }).end()
    }
  })
  upstreamServer.on("upgrade", (_req, socket: net.Socket) => {
    socket.write("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
    socket.pipe(socket)
  })
  closeUpstream = await listenUnix(upstreamServer, upstreamPath)
})

afterEach(async () => {
  if (scope) await Effect.runPromise(Scope.close(scope, Exit.void))
  scope = undefined
  await closeUpstream()
  fs.rmSync(dir, { recursive: true, force: true })
  await expectNoLeaks(before)
})

/** What the test's admissions saw: each exchange observed, and each `onEnd` with the observations before it. */
interface Seen {
  readonly exchanges: Array<Http1Exchange>
  /** For each `onEnd`, how many exchanges had been observed then. */
  readonly ends: Array<number>
}

/** The engine on 127.0.0.1:0, every request forwarded with an observer (and what `extra` adds). */
const serve = async (extra: (r: Http1Request) => Partial<Extract<Admission, { _tag: "Forward" }>> = () => ({})) => {
  scope = Effect.runSync(Scope.make())
  const seen: Seen = { exchanges: [], ends: [] }
  const forwarder = await Effect.runPromise(
    makeForwarder({ upstream: unixUpstream(upstreamPath, { maxSockets: 8, maxFreeSockets: 4 }), responseTimeoutMs: 10_000, idleTimeoutMs: 0 })
      .pipe(Scope.provide(scope))
  )
  const engine = forwarder.serveHttp1({
    limits: LIMITS,
    admit: (r) => ({
      _tag: "Forward",
      observe: (e) => void seen.exchanges.push(e),
      onEnd: () => void seen.ends.push(seen.exchanges.length),
      ...extra(r)
    })
  })
  const listener = net.createServer({ allowHalfOpen: true }, engine.accept)
  await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve))
  await Effect.runPromise(Scope.addFinalizer(
    scope,
    Effect.promise(() => Promise.all([new Promise<void>((resolve) => listener.close(() => resolve())), engine.close(0)]))
  ))
  return { port: (listener.address() as net.AddressInfo).port, seen }
}

const connect = (port: number) => {
  const socket = net.connect({ port, host: "127.0.0.1" })
  let received = Buffer.alloc(0)
  socket.on("data", (d: Buffer) => void (received = Buffer.concat([received, d])))
  socket.on("error", () => {})
  const closed = new Promise<void>((resolve) => socket.on("close", () => resolve()))
  return { socket, closed, text: () => received.toString("latin1"), bytes: () => received.length }
}

const waitFor = async (what: string, cond: () => boolean): Promise<void> => {
  for (let i = 0; i < 500; i++) {
    if (cond()) return
    await sleep(10)
  }
  throw new Error(`timed out waiting for ${what}`)
}

const count = (text: string, needle: string): number => text.split(needle).length - 1

describe("Http1Engine exchange observation", () => {
  it("observes each keep-alive and pipelined exchange once, before its onEnd, with its status and exact byte counts", async () => {
    const { port, seen } = await serve()
    const c = connect(port)
    const requests = [
      "GET /small HTTP/1.1\r\nHost: x\r\n\r\n",
      "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
      "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
      "GET /missing HTTP/1.1\r\nHost: x\r\n\r\n"
    ]
    // the first one alone (keep-alive), the other three pipelined in one write
    c.socket.write(requests[0]!)
    // observed once written: the client may read the bytes a moment later
    await waitFor("the first exchange, at the client", () => seen.exchanges.length === 1 && c.bytes() >= seen.exchanges[0]!.sentBytes)
    const firstSent = c.bytes()
    c.socket.write(requests.slice(1).join(""))
    await waitFor("four exchanges", () => seen.exchanges.length === 4 && count(c.text(), "HTTP/1.1 ") === 4)
    await waitFor("every byte at the client", () => c.bytes() === seen.exchanges.reduce((n, e) => n + e.sentBytes, 0))
    assert.deepStrictEqual(seen.exchanges.map((e) => [e.method, e.target, e.status, e.end]), [
      ["GET", "/small", 200, "Complete"],
      ["POST", "/echo", 201, "Complete"],
      ["POST", "/echo", 201, "Complete"],
      ["GET", "/missing", 404, "Complete"]
    ])
    assert.deepStrictEqual(seen.exchanges.map((e) => e.receivedBytes), requests.map((r) => Buffer.byteLength(r)))
    assert.strictEqual(seen.exchanges[0]!.sentBytes, firstSent)
    // each response as the client got it, split at its status line
    const responses = c.text().split(/(?=HTTP\/1\.1 \d{3} )/)
    assert.deepStrictEqual(seen.exchanges.map((e) => e.sentBytes), responses.map((r) => Buffer.byteLength(r, "latin1")))
    for (const e of seen.exchanges) assert.isAtLeast(e.durationMs, 0)
    assert.deepStrictEqual(seen.ends, [1, 2, 3, 4])
    c.socket.destroy()
  })

  it("observes a client leaving mid-download as aborted with the status sent, and one leaving before any answer with status 0", async () => {
    const { port, seen } = await serve()
    const c = connect(port)
    c.socket.write("GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("some body", () => c.bytes() > 256 * 1024)
    c.socket.destroy()
    await waitFor("the abort observed", () => seen.exchanges.length === 1)
    const cut = seen.exchanges[0]!
    assert.strictEqual(cut.end, "Aborted")
    assert.strictEqual(cut.status, 200)
    assert.isAtLeast(cut.sentBytes, 256 * 1024)
    assert.strictEqual(cut.receivedBytes, Buffer.byteLength("GET /big HTTP/1.1\r\nHost: x\r\n\r\n"))

    const s = connect(port)
    s.socket.write("GET /silent HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the request upstream", () => seenIds.length === 2)
    // a reset (a half-close alone still waits for the answer, as HTTP allows)
    s.socket.resetAndDestroy()
    await waitFor("the second abort observed", () => seen.exchanges.length === 2)
    assert.deepStrictEqual([seen.exchanges[1]!.status, seen.exchanges[1]!.sentBytes, seen.exchanges[1]!.end], [0, 0, "Aborted"])
    assert.deepStrictEqual(seen.ends, [1, 2])
  })

  it("observes an error the engine answers itself (upstream unreachable) as refused, with the answer's status and bytes", async () => {
    const missing = unixUpstream(path.join(os.tmpdir(), `switchyard-missing-${process.pid}.sock`), { maxSockets: 1, maxFreeSockets: 0 })
    const { port, seen } = await serve(() => ({ director: (out) => void (out.upstream = missing) }))
    const c = connect(port)
    c.socket.write("GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    await c.closed
    assert.match(c.text(), /^HTTP\/1\.1 502 /)
    assert.strictEqual(seen.exchanges.length, 1)
    const e = seen.exchanges[0]!
    assert.deepStrictEqual([e.status, e.end, e.sentBytes], [502, "Refused", c.bytes()])
    assert.deepStrictEqual(seen.ends, [1])
  })

  it("adds response headers in place of the upstream's, and forwards request headers a director sets", async () => {
    const { port, seen } = await serve((r) => ({
      responseHeaders: ["X-Request-Id", r.target === "/small" ? "chosen-1" : "chosen-2"],
      director: (out) => {
        for (let i = out.headers.length - 2; i >= 0; i -= 2) if (out.headers[i]!.toLowerCase() === "x-request-id") out.headers.splice(i, 2)
        out.headers.push("X-Request-Id", "chosen-1")
      }
    }))
    const c = connect(port)
    c.socket.write("GET /small HTTP/1.1\r\nHost: x\r\nX-Request-Id: bad id\r\n\r\n")
    await waitFor("the answer", () => seen.exchanges.length === 1 && c.text().endsWith("OK"))
    const head = c.text().split("\r\n\r\n")[0]!
    assert.strictEqual(count(head.toLowerCase(), "x-request-id:"), 1)
    assert.include(head, "X-Request-Id: chosen-1")
    assert.notInclude(head, "from-upstream")
    assert.deepStrictEqual(seenIds, ["chosen-1"])
    assert.strictEqual(seen.exchanges[0]!.sentBytes, c.bytes())
    c.socket.destroy()
  })

  it("observes an upgrade once, when the 101 is relayed; its onEnd waits for the tunnel to close", async () => {
    const { port, seen } = await serve()
    const c = connect(port)
    c.socket.write("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
    await waitFor("the 101", () => c.text().includes("\r\n\r\n"))
    assert.match(c.text(), /^HTTP\/1\.1 101 /)
    assert.deepStrictEqual(seen.exchanges.map((e) => [e.status, e.end, e.sentBytes]), [[101, "Upgraded", c.bytes()]])
    assert.deepStrictEqual(seen.ends, [])
    c.socket.write("ping")
    await waitFor("the echo", () => c.text().endsWith("ping"))
    c.socket.destroy()
    await waitFor("onEnd after the tunnel", () => seen.ends.length === 1)
    assert.strictEqual(seen.exchanges.length, 1)
  })
})
