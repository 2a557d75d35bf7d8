/**
 * The engine's client limits on real loopback sockets, with small configured values: a trickling body
 * gets 408, time the engine holds a body back is not the client's, a slow reader is closed while a quiet
 * stream is not, and one client address cannot take every pooled connection.
 */
import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect, Exit, Scope } from "effect"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { setTimeout as sleep } from "node:timers/promises"
import { CLIENT_LIMIT_DEFAULTS, type ClientLimits } from "../../../src/domain/ClientLimits.ts"
import type { ClientLimitEvent } from "../../../src/services/forward/http1/Admission.ts"
import { unixUpstream } from "../../../src/services/forward/Upstream.ts"
import { makeForwarder } from "../../../src/services/Forwarder.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../../support/leaks.ts"
import { listenUnix } from "../../support/listenUnix.ts"

const LIMITS = { maxHeaderSize: 8 * 1024, maxHeadersCount: 50, headersTimeoutMs: 10_000, requestTimeoutMs: 0, keepAliveTimeoutMs: 5_000, maxConnections: 64 }

let before: HandleCounts
let dir: string
let scope: Scope.Closeable | undefined
let closeUpstream: () => Promise<void>
/** Responses held open by `/hold`. */
let held: Array<http.ServerResponse>
/** Request bodies the upstream received in full, by path. */
let completed: Array<string>
const clients = new Set<net.Socket>()

beforeEach(async () => {
  before = activeHandles()
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-limits-"))
  held = []
  completed = []
  const upstream = http.createServer((req, res) => {
    const url = new URL(req.url!, "http://up")
    switch (url.pathname) {
      case "/small":
        res.end("OK")
        return
      case "/consume": {
        let n = 0
        req.on("data", (c: Buffer) => (n += c.length))
        req.on("end", () => {
          completed.push(url.pathname)
          res.end(`got ${n}`)
        })
        return
      }
      case "/late-reader": {
        // Takes nothing of the body for a while (the engine must hold the client back), then all of it.
        req.pause()
        const timer = setTimeout(() => {
          let n = 0
          req.on("data", (c: Buffer) => (n += c.length))
          req.on("end", () => res.end(`got ${n}`))
          req.resume()
        }, Number(url.searchParams.get("ms")))
        res.on("close", () => clearTimeout(timer))
        return
      }
      case "/hold":
        held.push(res)
        res.writeHead(200, { "content-type": "text/plain" })
        res.flushHeaders()
        return
      case "/big": {
        let left = Number(url.searchParams.get("bytes"))
        const chunk = Buffer.alloc(64 * 1024, 0x61)
        res.writeHead(200, { "content-length": String(left) })
        const pump = () => {
          while (left > 0) {
            const c = left >= chunk.length ? chunk : chunk.subarray(0, left)
            left -= c.length
            if (!res.write(c)) return void res.once("drain", pump)
          }
          res.end()
        }
        res.on("close", () => (left = 0))
        pump()
        return
      }
    }
  })
  closeUpstream = await listenUnix(upstream, path.join(dir, "up.sock"))
})

afterEach(async () => {
  for (const c of clients) c.destroy()
  clients.clear()
  for (const r of held) r.destroy()
  if (scope !== undefined) await Effect.runPromise(Scope.close(scope, Exit.void))
  scope = undefined
  await closeUpstream()
  fs.rmSync(dir, { recursive: true, force: true })
  await expectNoLeaks(before)
})

/** Serves the engine on 127.0.0.1 with these client limits; records what they refused. */
const serve = async (
  limits: Partial<ClientLimits>,
  maxSockets = 16
): Promise<{ readonly port: number; readonly events: Array<ClientLimitEvent> }> => {
  scope = Effect.runSync(Scope.make())
  const forwarder = await Effect.runPromise(
    makeForwarder({
      upstream: unixUpstream(path.join(dir, "up.sock"), { maxSockets, maxFreeSockets: maxSockets }),
      responseTimeoutMs: 0,
      idleTimeoutMs: 0
    }).pipe(Scope.provide(scope))
  )
  const events: Array<ClientLimitEvent> = []
  const engine = forwarder.serveHttp1({
    limits: LIMITS,
    admit: () => ({ _tag: "Forward" }),
    clientLimits: { ...CLIENT_LIMIT_DEFAULTS, ...limits },
    onClientLimit: (e) => events.push(e)
  })
  const listener = net.createServer({ allowHalfOpen: true }, engine.accept)
  await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve))
  await Effect.runPromise(Scope.addFinalizer(
    scope,
    Effect.promise(() => Promise.all([new Promise<void>((resolve) => listener.close(() => resolve())), engine.close(0)]))
  ))
  return { port: (listener.address() as net.AddressInfo).port, events }
}

/** A raw client connection from `localAddress` that collects what it receives. */
const connect = (port: number, localAddress = "127.0.0.1") => {
  const socket = net.connect({ port, host: "127.0.0.1", localAddress })
  clients.add(socket)
  let received = ""
  socket.on("data", (d: Buffer) => (received += d.toString("latin1")))
  socket.on("error", () => {})
  const closed = new Promise<void>((resolve) => socket.on("close", () => resolve()))
  return { socket, closed, text: () => received }
}

/** Waits until `cond` holds, at most `ms`; fails naming `what` otherwise. */
const waitFor = async (what: string, ms: number, cond: () => boolean): Promise<void> => {
  const until = performance.now() + ms
  while (performance.now() < until) {
    if (cond()) return
    await sleep(10)
  }
  throw new Error(`not within ${ms} ms: ${what}`)
}

/** One GET from `localAddress` on a connection of its own; resolves with status and body, bounded. */
const get = (port: number, target: string, localAddress: string, ms = 5_000): Promise<{ status: number; body: string }> =>
  new Promise((resolve, reject) => {
    const req = http.get({ host: "127.0.0.1", port, path: target, localAddress, agent: false }, (res) => {
      let body = ""
      res.on("data", (c) => (body += c))
      res.on("end", () => resolve({ status: res.statusCode!, body }))
    })
    req.setTimeout(ms, () => req.destroy(new Error(`no answer within ${ms} ms`)))
    req.on("error", reject)
  })

/** Sends a body's bytes one at a time, every `everyMs`, until the socket closes. */
const trickle = (socket: net.Socket, everyMs: number): NodeJS.Timeout => {
  const timer = setInterval(() => {
    if (socket.destroyed || !socket.writable) clearInterval(timer)
    else socket.write("x")
  }, everyMs)
  socket.once("close", () => clearInterval(timer))
  return timer
}

describe("Http1Engine client limits", () => {
  it("answers 408 to a request body below the minimum rate after the grace period, and closes", async () => {
    const { events, port } = await serve({ minRequestBodyBytesPerSecond: 1_000, requestBodyGracePeriodMs: 300 })
    const c = connect(port)
    c.socket.write("POST /consume HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nxxxx")
    trickle(c.socket, 100)
    await waitFor("the 408 and the close", 5_000, () => c.socket.destroyed || c.text().includes("408"))
    await Promise.race([c.closed, sleep(3_000).then(() => assert.fail("still open after the 408"))])
    assert.match(c.text(), /^HTTP\/1\.1 408 /)
    assert.include(c.text(), "request body arrived slower than 1000 bytes/s")
    assert.deepStrictEqual(completed, [])
    assert.deepStrictEqual(events.map((e) => [e.limit, e.client, e.method, e.target]), [["request_body_rate", "127.0.0.1", "POST", "/consume"]])
  })

  it("a body sent at a good rate is forwarded whole, past the grace period", async () => {
    const { events, port } = await serve({ minRequestBodyBytesPerSecond: 100, requestBodyGracePeriodMs: 200 })
    const c = connect(port)
    c.socket.write("POST /consume HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n")
    // 50 bytes every 100 ms: 500 B/s for 600 ms
    for (let i = 0; i < 6; i++) {
      c.socket.write("y".repeat(50))
      await sleep(100)
    }
    await waitFor("the answer", 5_000, () => c.text().includes("got 300"))
    assert.match(c.text(), /^HTTP\/1\.1 200 /)
    assert.deepStrictEqual(events, [])
  })

  it("time the upstream does not take the body is not counted against the client", async () => {
    // 2 MB/s: what the engine read before the upstream stopped taking bytes (about a megabyte) would
    // fall below it at the first check if the held time counted
    const { events, port } = await serve({ minRequestBodyBytesPerSecond: 2_000_000, requestBodyGracePeriodMs: 200 })
    const size = 16 * 1024 * 1024
    const c = connect(port)
    c.socket.write(`POST /late-reader?ms=2500 HTTP/1.1\r\nHost: x\r\nContent-Length: ${size}\r\n\r\n`)
    c.socket.write(Buffer.alloc(size, 0x7a))
    await waitFor("the answer", 15_000, () => c.text().includes(`got ${size}`) || c.socket.destroyed)
    assert.match(c.text(), /^HTTP\/1\.1 200 /)
    assert.deepStrictEqual(events, [])
  })

  it("closes a client that does not take queued response bytes at the minimum rate", async () => {
    const { events, port } = await serve({ minResponseBytesPerSecond: 1_000_000, responseGracePeriodMs: 300 })
    const c = connect(port)
    c.socket.pause()
    c.socket.write(`GET /big?bytes=${64 * 1024 * 1024} HTTP/1.1\r\nHost: x\r\n\r\n`)
    await waitFor("the slow reader cut", 10_000, () => events.length > 0)
    assert.deepStrictEqual(events.map((e) => [e.limit, e.target]), [["response_rate", "/big?bytes=67108864"]])
    // reading again, the client finds the connection closed before the whole body
    c.socket.resume()
    await Promise.race([c.closed, sleep(10_000).then(() => assert.fail("the connection is still open"))])
    assert.isBelow(c.text().length, 64 * 1024 * 1024)
  })

  it("never cuts a quiet long-lived response (nothing queued for the client)", async () => {
    const { events, port } = await serve({
      minResponseBytesPerSecond: 1_000_000,
      responseGracePeriodMs: 100,
      minRequestBodyBytesPerSecond: 1_000_000,
      requestBodyGracePeriodMs: 100
    })
    const c = connect(port)
    c.socket.write("GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the head", 5_000, () => c.text().includes("200 OK") && held.length === 1)
    // several rate checks go by with nothing to send
    await sleep(2_500)
    assert.isFalse(c.socket.destroyed)
    held[0]!.write("tick")
    await waitFor("the event", 5_000, () => c.text().includes("tick"))
    assert.deepStrictEqual(events, [])
  })

  it("one client address holds at most its share of the pool; its other requests get 503 after the wait, others are served", async () => {
    const { events, port } = await serve({ maxUpstreamSlotsPerClient: 2, upstreamSlotWaitMs: 300 }, 4)
    const hogs = Array.from({ length: 5 }, () => connect(port))
    for (const h of hogs) h.socket.write("GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("two held requests", 5_000, () => held.length === 2)
    await waitFor("three 503s", 5_000, () => hogs.filter((h) => h.text().startsWith("HTTP/1.1 503")).length === 3)
    assert.strictEqual(held.length, 2)
    for (const h of hogs.filter((h) => h.text().startsWith("HTTP/1.1 503"))) assert.include(h.text(), "already holds 2 connections")
    // another address is served while the first holds its two
    for (let i = 0; i < 3; i++) assert.deepStrictEqual(await get(port, "/small", "127.0.0.2"), { status: 200, body: "OK" })
    assert.deepStrictEqual(events.map((e) => e.limit), ["client_slots", "client_slots", "client_slots"])
  })

  it("a request of a client below its cap waits for a free connection, bounded: 503 when none comes free", async () => {
    const { events, port } = await serve({ maxUpstreamSlotsPerClient: 1, upstreamSlotWaitMs: 300 }, 2)
    const a = connect(port, "127.0.0.2")
    const b = connect(port, "127.0.0.3")
    a.socket.write("GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    b.socket.write("GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("two held requests", 5_000, () => held.length === 2)
    const refused = await get(port, "/small", "127.0.0.4")
    assert.strictEqual(refused.status, 503)
    assert.include(refused.body, "came free within 300 ms")
    assert.deepStrictEqual(events.map((e) => [e.limit, e.client]), [["slot_wait", "127.0.0.4"]])
    // a connection given back goes to the next request
    held[0]!.end("done")
    assert.deepStrictEqual(await get(port, "/small", "127.0.0.4"), { status: 200, body: "OK" })
  })

  it("a client at its cap gets the connection it gives back, ahead of the bound", async () => {
    const { events, port } = await serve({ maxUpstreamSlotsPerClient: 1, upstreamSlotWaitMs: 3_000 }, 4)
    const first = connect(port)
    first.socket.write("GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the held request", 5_000, () => held.length === 1)
    const second = get(port, "/small", "127.0.0.1")
    await sleep(100)
    held[0]!.end("done")
    assert.deepStrictEqual(await second, { status: 200, body: "OK" })
    assert.deepStrictEqual(events, [])
  })
})
