/**
 * What the engine's per-request shortcuts must keep, on real sockets on loopback with a real HTTP
 * upstream and bounded waits. Deadlines (see `Deadline`): the head and keep-alive timeouts of a client
 * connection share one re-armed deadline, so a sooner timeout armed while a later one is pending fires
 * on time, and a later one does not fire early. Turn writes (see `TurnWrites`): small request heads and
 * complete small responses leave at the end of the event loop's turn, and whatever ends, closes or
 * answers a connection in the same turn must not lose them nor leave the connection open.
 */
import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect, Exit, Scope } from "effect"
import { Buffer } from "node:buffer"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { setTimeout as sleep } from "node:timers/promises"
import type { Http1Server } from "../../../src/services/forward/http1/Admission.ts"
import { unixUpstream } from "../../../src/services/forward/Upstream.ts"
import { makeForwarder } from "../../../src/services/Forwarder.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../../support/leaks.ts"
import { listenUnix } from "../../support/listenUnix.ts"

/** Long timeouts: a connection closed in these tests is closed by what they test, unless a test shortens one. */
const LIMITS = { maxHeaderSize: 8 * 1024, maxHeadersCount: 50, headersTimeoutMs: 60_000, requestTimeoutMs: 0, keepAliveTimeoutMs: 60_000, maxConnections: 64 }

let before: HandleCounts
let dir: string
let upstreamPath: string
let closeUpstream: () => Promise<void>
let scope: Scope.Closeable | undefined

beforeEach(async () => {
  before = activeHandles()
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-engine-shortcuts-"))
  upstreamPath = path.join(dir, "up.sock")
  const upstreamServer = http.createServer({ keepAliveTimeout: 60_000 }, (req, res) => {
    res.writeHead(200, { "content-length": "2" }).end("OK")
    req.resume()
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

/**
 * The engine on 127.0.0.1:0 with `limits` over `LIMITS`; `onObserve` is told each exchange as it
 * completes (before the connection reads on).
 */
const serve = async (limits: Partial<typeof LIMITS>, onObserve: (engine: Http1Server) => void = () => {}) => {
  scope = Effect.runSync(Scope.make())
  const forwarder = await Effect.runPromise(
    makeForwarder({ upstream: unixUpstream(upstreamPath, { maxSockets: 8, maxFreeSockets: 4 }), responseTimeoutMs: 10_000, idleTimeoutMs: 0 })
      .pipe(Scope.provide(scope))
  )
  let engine!: Http1Server
  engine = forwarder.serveHttp1({ limits: { ...LIMITS, ...limits }, admit: () => ({ _tag: "Forward", observe: () => onObserve(engine) }) })
  const listener = net.createServer({ allowHalfOpen: true }, engine.accept)
  await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve))
  await Effect.runPromise(Scope.addFinalizer(
    scope,
    Effect.promise(() => Promise.all([new Promise<void>((resolve) => listener.close(() => resolve())), engine.close(0)]))
  ))
  return { port: (listener.address() as net.AddressInfo).port, engine }
}

const connect = (port: number) => {
  const socket = net.connect({ port, host: "127.0.0.1" })
  let received = Buffer.alloc(0)
  socket.on("data", (d: Buffer) => void (received = Buffer.concat([received, d])))
  socket.on("error", () => {})
  let isClosed = false
  const closed = new Promise<void>((resolve) => socket.on("close", () => resolve((isClosed = true, undefined))))
  return { socket, closed, isClosed: () => isClosed, text: () => received.toString("latin1") }
}

const waitFor = async (what: string, cond: () => boolean): Promise<void> => {
  for (let i = 0; i < 300; i++) {
    if (cond()) return
    await sleep(10)
  }
  throw new Error(`timed out waiting for ${what}`)
}

describe("Http1Engine connection deadlines", () => {
  it("closes a keep-alive connection at its keep-alive timeout while the longer head timeout's timer is pending", async () => {
    const { port } = await serve({ headersTimeoutMs: 60_000, keepAliveTimeoutMs: 150 })
    const c = connect(port)
    c.socket.write("GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the keep-alive timeout to close the connection", () => c.isClosed())
    assert.match(c.text(), /^HTTP\/1\.1 200 [^]*\r\n\r\nOK$/)
  })

  it("answers 408 at the head timeout to a request started on a keep-alive connection whose keep-alive timeout is longer", async () => {
    const { port } = await serve({ headersTimeoutMs: 200, keepAliveTimeoutMs: 60_000 })
    const c = connect(port)
    c.socket.write("GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the first answer", () => c.text().endsWith("OK"))
    // past the first head timeout: the timer pending now is the keep-alive's
    await sleep(300)
    c.socket.write("GET /b HTTP/1.1\r\nHo")
    await waitFor("the head timeout to close the connection", () => c.isClosed())
    const responses = c.text().split(/(?=HTTP\/1\.1 \d{3} )/)
    assert.strictEqual(responses.length, 2)
    assert.match(responses[1]!, /^HTTP\/1\.1 408 /)
  })

  it("keeps a keep-alive connection whose requests each come within the keep-alive timeout, though the first was armed long ago", async () => {
    const { port } = await serve({ headersTimeoutMs: 60_000, keepAliveTimeoutMs: 800 })
    const c = connect(port)
    // past the first keep-alive deadline (armed after the first answer), each request well within its own
    for (let i = 0; i < 5; i++) {
      c.socket.write("GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
      await waitFor(`answer ${i + 1}`, () => c.text().split("\r\n\r\nOK").length - 1 === i + 1)
      await sleep(250)
    }
    assert.strictEqual(c.isClosed(), false)
    c.socket.destroy()
  })
})

describe("Http1Engine writes at the turn's end", () => {
  it("a drain in the turn that wrote a keep-alive connection's last answer sends that answer and closes the connection at once", async () => {
    let draining: Promise<void> | undefined
    // the drain starts right after the exchange completes, before the turn's writes leave
    const { port } = await serve({}, (engine) => void process.nextTick(() => (draining ??= engine.close(60_000))))
    const c = connect(port)
    c.socket.write("GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    await waitFor("the connection closed by the drain", () => c.isClosed())
    assert.match(c.text(), /^HTTP\/1\.1 200 [^]*\r\n\r\nOK$/)
    await waitFor("the drain finished", () => draining !== undefined)
    await draining
  })

  it("an error answered to a pipelined request in the turn that wrote the previous answer comes after it", async () => {
    const { port } = await serve({})
    const c = connect(port)
    c.socket.write("GET /small HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
    await waitFor("the connection closed after the error", () => c.isClosed())
    const responses = c.text().split(/(?=HTTP\/1\.1 \d{3} )/)
    assert.strictEqual(responses.length, 2)
    assert.match(responses[0]!, /^HTTP\/1\.1 200 [^]*\r\n\r\nOK$/)
    assert.match(responses[1]!, /^HTTP\/1\.1 400 /)
  })

  it("a pipelined request that ends the connection gets its answer after the previous one before the close", async () => {
    const { port } = await serve({})
    const c = connect(port)
    c.socket.write("GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await waitFor("the connection closed after the second answer", () => c.isClosed())
    const responses = c.text().split(/(?=HTTP\/1\.1 \d{3} )/)
    assert.strictEqual(responses.length, 2)
    for (const r of responses) assert.match(r, /^HTTP\/1\.1 200 [^]*\r\n\r\nOK$/)
  })
})
