/**
 * switchyard's WebSocket endpoint against `ws`, an independent implementation, on real loopback
 * sockets: random sequences of text and binary messages, fragmented with pings between fragments,
 * sent by `ws` must arrive at the endpoint exactly as `ws` sent them, and those the endpoint sends
 * must arrive at `ws` exactly; pings are answered both ways, close codes and reasons cross intact, and
 * a handshake `ws` would refuse is refused here too.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import * as http from "node:http"
import * as net from "node:net"
import { WebSocket, WebSocketServer } from "ws"
import type { WebSocketError } from "../../../src/domain/WebSocketClose.ts"
import { type EndpointHandlers, MaxQueuedPongBytes, type WebSocketEndpoint } from "../../../src/services/transport/WebSocketEndpoint.ts"
import { acceptWebSocket, openWebSocket } from "../../../src/services/transport/WebSocketOpen.ts"
import { noLeaks } from "../../support/leaks.ts"

/** Longest any exchange below may take on loopback before the test fails. */
const BoundMs = 10_000

const bounded = <A>(what: string, p: Promise<A>): Promise<A> =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what}: not done within ${BoundMs} ms`)), BoundMs)
    p.then((v) => (clearTimeout(timer), resolve(v)), (e) => (clearTimeout(timer), reject(e)))
  })

/** What an endpoint received, message by message (`t:` text, `b:` binary hex), and how it closed. */
interface Received {
  readonly messages: Array<string>
  readonly pings: Array<string>
  closed: WebSocketError | undefined | "open"
}

const recording = (r: Received, onMessage: () => void, onClosed: () => void): EndpointHandlers => {
  let binary: Array<Buffer> | undefined
  return {
    text: (t) => (r.messages.push(`t:${t}`), onMessage()),
    binaryStart: () => void (binary = []),
    binaryData: (p) => void binary!.push(Buffer.from(p)),
    binaryEnd: () => (r.messages.push(`b:${Buffer.concat(binary!).toString("hex")}`), onMessage()),
    ping: (p) => void r.pings.push(p.toString("hex")),
    closed: (e) => {
      r.closed = e
      onClosed()
    }
  }
}

/** An HTTP server whose upgrades switchyard accepts; each endpoint is handed to `next()`'s caller. */
const endpointServer = (maxMessageBytes = 1 << 20, maxTextBytes?: number) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ server: http.Server; port: number; next: () => Promise<WebSocketEndpoint> }>((resolve) => {
        const waiting: Array<(e: WebSocketEndpoint) => void> = []
        const ready: Array<WebSocketEndpoint> = []
        const server = http.createServer((_q, s) => s.end())
        server.on("upgrade", (req, socket, head) => {
          socket.on("error", () => {})
          const e = acceptWebSocket(req, socket, head, { maxMessageBytes, maxTextBytes })
          if (e === undefined) return
          const waiter = waiting.shift()
          if (waiter !== undefined) waiter(e)
          else ready.push(e)
        })
        server.listen(0, "127.0.0.1", () =>
          resolve({
            server,
            port: (server.address() as net.AddressInfo).port,
            next: () => new Promise((r) => (ready.length > 0 ? r(ready.shift()!) : waiting.push(r)))
          }))
      })
    ),
    ({ server }) => Effect.promise(() => new Promise<void>((resolve) => (server.close(() => resolve()), server.closeAllConnections())))
  )

/** A `ws` server; each accepted socket is handed to `next()`'s caller. */
const wsServer = Effect.acquireRelease(
  Effect.promise(() =>
    new Promise<{ wss: WebSocketServer; port: number; next: () => Promise<WebSocket> }>((resolve) => {
      const waiting: Array<(w: WebSocket) => void> = []
      const ready: Array<WebSocket> = []
      const wss: WebSocketServer = new WebSocketServer({ host: "127.0.0.1", port: 0, perMessageDeflate: false }, () =>
        resolve({
          wss,
          port: (wss.address() as net.AddressInfo).port,
          next: () => new Promise((r) => (ready.length > 0 ? r(ready.shift()!) : waiting.push(r)))
        }))
      wss.on("connection", (w) => {
        w.on("error", () => {})
        const waiter = waiting.shift()
        if (waiter !== undefined) waiter(w)
        else ready.push(w)
      })
    })
  ),
  ({ wss }) => Effect.promise(() => new Promise<void>((resolve) => (wss.clients.forEach((c) => c.terminate()), wss.close(() => resolve()))))
)

const openTo = (port: number, maskFrames = true): Promise<WebSocketEndpoint> =>
  new Promise((resolve, reject) =>
    void openWebSocket({ secure: false, host: "127.0.0.1", port, path: "/", maxMessageBytes: 1 << 20, maskFrames, timeoutMs: BoundMs }, (o) =>
      o._tag === "Open" ? resolve(o.endpoint) : reject(new Error(o.message))))

const Part = Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 70_000 }))
const Message = Schema.Struct({
  binary: Schema.Boolean,
  parts: Schema.Array(Part).check(Schema.isBetweenLength(1, 4)),
  pingBetween: Schema.Boolean
})

const payloadOf = (n: number, seed: number): Buffer => {
  const b = Buffer.allocUnsafe(n)
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed) & 0xff
  return b
}

/** Text as a string of `n` characters, some of them multi-byte. */
const textOf = (n: number, seed: number): string => Array.from({ length: Math.min(n, 3000) }, (_, i) => ((i + seed) % 17 === 0 ? "é" : String.fromCharCode(97 + ((i + seed) % 26)))).join("")

describe("WebSocketEndpoint against ws", () => {
  it.live.prop(
    "messages ws sends, fragmented with pings between, reach the endpoint exactly",
    { messages: Schema.Array(Message).check(Schema.isBetweenLength(1, 8)) },
    ({ messages }) =>
      noLeaks(Effect.gen(function*() {
        const srv = yield* endpointServer()
        const peer = new WebSocket(`ws://127.0.0.1:${srv.port}/`, { perMessageDeflate: false })
        peer.on("error", () => {})
        const endpoint = yield* Effect.promise(() => bounded("accept", srv.next()))
        yield* Effect.promise(() => bounded("open", new Promise((r) => peer.once("open", r))))
        const received: Received = { messages: [], pings: [], closed: "open" }
        let arrived!: () => void
        const all = new Promise<void>((r) => (arrived = r))
        endpoint.start(recording(received, () => received.messages.length === messages.length && arrived(), () => {}))
        const expected: Array<string> = []
        messages.forEach((m, k) => {
          const chunks = m.parts.map((n, i) => m.binary ? payloadOf(n, k + i) : Buffer.from(textOf(n, k + i)))
          expected.push(m.binary ? `b:${Buffer.concat(chunks).toString("hex")}` : `t:${Buffer.concat(chunks).toString("utf8")}`)
          // text fragments must each end on a character boundary for ws to send them: send text whole
          if (!m.binary) return void peer.send(Buffer.concat(chunks).toString("utf8"))
          chunks.forEach((c, i) => {
            peer.send(c, { binary: true, fin: i === chunks.length - 1 })
            if (m.pingBetween && i < chunks.length - 1) peer.ping(Buffer.from([k, i]))
          })
        })
        yield* Effect.promise(() => bounded("every message", all))
        assert.deepStrictEqual(received.messages, expected)
        peer.close(4001, "done here")
        const closed = new Promise<void>((r) => peer.once("close", () => r()))
        yield* Effect.promise(() => bounded("close", closed))
        peer.terminate()
      })),
    { timeout: 120_000, arbitrary: { runs: 12 } }
  )

  it.live.prop(
    "messages the endpoint sends (text, whole binary, fragments with pings between) reach ws exactly",
    { messages: Schema.Array(Message).check(Schema.isBetweenLength(1, 8)), masked: Schema.Boolean },
    ({ messages, masked }) =>
      noLeaks(Effect.gen(function*() {
        const srv = yield* wsServer
        const endpoint = yield* Effect.promise(() => bounded("open", openTo(srv.port, masked)))
        const peer = yield* Effect.promise(() => bounded("accept", srv.next()))
        const got: Array<string> = []
        const pings: Array<string> = []
        peer.on("ping", (p: Buffer) => pings.push(p.toString("hex")))
        let arrived!: () => void
        const all = new Promise<void>((r) => (arrived = r))
        peer.on("message", (data: Buffer, isBinary: boolean) => {
          got.push(isBinary ? `b:${data.toString("hex")}` : `t:${data.toString("utf8")}`)
          if (got.length === messages.length) arrived()
        })
        const noop = () => {}
        endpoint.start({ text: noop, binaryStart: noop, binaryData: noop, binaryEnd: noop, closed: noop })
        const expected: Array<string> = []
        const expectedPings: Array<string> = []
        messages.forEach((m, k) => {
          if (!m.binary) {
            const t = textOf(m.parts.reduce((a, b) => a + b, 0), k)
            expected.push(`t:${t}`)
            return void endpoint.sendText(t)
          }
          const chunks = m.parts.map((n, i) => payloadOf(n, k + i))
          expected.push(`b:${Buffer.concat(chunks).toString("hex")}`)
          if (chunks.length === 1) return void endpoint.sendBinary(chunks[0]!)
          chunks.forEach((c, i) => {
            // a masking client masks in place: hand it a copy
            endpoint.sendFragment(Buffer.from(c), i === chunks.length - 1)
            if (m.pingBetween && i < chunks.length - 1) {
              endpoint.ping(Buffer.from([k, i]))
              expectedPings.push(Buffer.from([k, i]).toString("hex"))
            }
          })
        })
        yield* Effect.promise(() => bounded("every message", all))
        assert.deepStrictEqual(got, expected)
        assert.deepStrictEqual(pings, expectedPings)
        endpoint.terminate()
      })),
    { timeout: 120_000, arbitrary: { runs: 12 } }
  )

  it.live.prop(
    "a consumer that retains reads keeps its views intact, across pauses, until it releases them; then the reads are given back",
    { messages: Schema.Array(Message).check(Schema.isBetweenLength(1, 8)), pauseEvery: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 5 })) },
    ({ messages, pauseEvery }) =>
      noLeaks(Effect.gen(function*() {
        const srv = yield* endpointServer()
        const peer = new WebSocket(`ws://127.0.0.1:${srv.port}/`, { perMessageDeflate: false })
        peer.on("error", () => {})
        const endpoint = yield* Effect.promise(() => bounded("accept", srv.next()))
        yield* Effect.promise(() => bounded("open", new Promise((r) => peer.once("open", r))))
        // views kept as handed over (never copied), each under a hold on its read
        const kept: Array<{ readonly view: Buffer; readonly memory: ArrayBufferLike }> = []
        const releases: Array<() => void> = []
        const got: Array<string> = []
        let current: Array<Buffer> = []
        let parts = 0
        let arrived!: () => void
        const all = new Promise<void>((r) => (arrived = r))
        endpoint.start({
          text: (t) => (got.push(`t:${t}`), got.length === messages.length && arrived()),
          binaryStart: () => void (current = []),
          binaryData: (p) => {
            releases.push(endpoint.retainRead())
            kept.push({ view: p, memory: p.buffer })
            current.push(p)
            // pausing mid-read leaves the rest of the read held by the endpoint
            if (++parts % pauseEvery === 0) {
              endpoint.pause()
              setTimeout(() => endpoint.resume(), 1)
            }
          },
          binaryEnd: () => {
            got.push(`b:${Buffer.concat(current).toString("hex")}`)
            if (got.length === messages.length) arrived()
          },
          closed: () => {},
          retainsReads: true
        })
        const expected = messages.map((m, k) => {
          const chunks = m.parts.map((n, i) => m.binary ? payloadOf(n, k + i) : Buffer.from(textOf(n, k + i)))
          if (!m.binary) {
            peer.send(Buffer.concat(chunks).toString("utf8"))
            return `t:${Buffer.concat(chunks).toString("utf8")}`
          }
          chunks.forEach((c, i) => peer.send(c, { binary: true, fin: i === chunks.length - 1 }))
          return `b:${Buffer.concat(chunks).toString("hex")}`
        })
        yield* Effect.promise(() => bounded("every message", all))
        assert.deepStrictEqual(got, expected)
        // nothing retained was given back, however many reads went by: every view still holds its bytes
        for (const { memory } of kept) assert.isFalse((memory as ArrayBuffer).detached)
        const binaryBytes = Buffer.concat(messages.flatMap((m, k) => m.binary ? m.parts.map((n, i) => payloadOf(n, k + i)) : []))
        assert.strictEqual(Buffer.concat(kept.map((k) => k.view)).toString("hex"), binaryBytes.toString("hex"))
        const bytesKept = binaryBytes.length
        for (const release of releases) release()
        // once released, reads that were memory of their own are freed (a concatenation of held
        // reads is not: it is left to the collector)
        const memories = new Set(kept.map((k) => k.memory as ArrayBuffer))
        if (bytesKept > 0) assert.isTrue([...memories].some((m) => m.detached), "some read was given back")
        peer.terminate()
      })),
    { timeout: 120_000, arbitrary: { runs: 12 } }
  )

  it.live("pings are answered both ways; close codes and reasons cross intact", () =>
    noLeaks(Effect.gen(function*() {
      const srv = yield* wsServer
      const endpoint = yield* Effect.promise(() => openTo(srv.port))
      const peer = yield* Effect.promise(() => srv.next())
      const received: Received = { messages: [], pings: [], closed: "open" }
      const pongs: Array<string> = []
      let closedNow!: () => void
      const closed = new Promise<void>((r) => (closedNow = r))
      endpoint.start({ ...recording(received, () => {}, () => closedNow()), pong: (p) => void pongs.push(p.toString("hex")) })
      const until = (what: string, check: () => boolean) =>
        Effect.promise(() => bounded(what, new Promise<void>((r) => {
          const poll = () => (check() ? r() : setTimeout(poll, 5))
          poll()
        })))
      // the endpoint pings; ws answers with the same payload
      endpoint.ping(Buffer.from("abc"))
      yield* until("pong from ws", () => pongs.length > 0)
      assert.deepStrictEqual(pongs, ["616263"])
      // ws pings; the endpoint answers with the same payload
      const peerPong = new Promise<string>((r) => peer.once("pong", (p: Buffer) => r(p.toString("hex"))))
      peer.ping(Buffer.from("xyz"))
      assert.strictEqual(yield* Effect.promise(() => bounded("pong from the endpoint", peerPong)), "78797a")
      assert.deepStrictEqual(received.pings, ["78797a"])
      const peerClosed = new Promise<[number, string]>((r) => peer.once("close", (code: number, reason: Buffer) => r([code, reason.toString()])))
      peer.close(4321, "going for lunch")
      yield* Effect.promise(() => bounded("close", closed))
      const error = received.closed as WebSocketError
      assert.strictEqual(error.code, 4321)
      assert.match(error.message, /going for lunch/)
      // the endpoint answered with the same code
      assert.deepStrictEqual((yield* Effect.promise(() => bounded("peer close", peerClosed)))[0], 4321)
    })))

  it.live("a text message over its own limit closes with 1009; a binary message of that size passes", () =>
    noLeaks(Effect.gen(function*() {
      const srv = yield* endpointServer(1 << 20, 1000)
      const peer = new WebSocket(`ws://127.0.0.1:${srv.port}/`, { perMessageDeflate: false })
      peer.on("error", () => {})
      const endpoint = yield* Effect.promise(() => bounded("accept", srv.next()))
      yield* Effect.promise(() => bounded("open", new Promise((r) => peer.once("open", r))))
      const received: Received = { messages: [], pings: [], closed: "open" }
      let got!: () => void
      const one = new Promise<void>((r) => (got = r))
      endpoint.start(recording(received, () => got(), () => {}))
      peer.send(Buffer.alloc(5000, 1), { binary: true })
      yield* Effect.promise(() => bounded("binary", one))
      assert.strictEqual(received.messages.length, 1)
      const code = new Promise<number>((r) => peer.once("close", (c: number) => r(c)))
      peer.send("x".repeat(1001))
      assert.strictEqual(yield* Effect.promise(() => bounded("close", code)), 1009)
      assert.strictEqual(received.messages.length, 1, "the text was never handed over")
    })))

  it.live("a peer that pings without reading gets no more than MaxQueuedPongBytes of pongs queued", () =>
    noLeaks(Effect.gen(function*() {
      const srv = yield* endpointServer()
      const socket = net.connect(srv.port, "127.0.0.1")
      socket.on("error", () => {})
      // after the 101, stop reading: pongs pile up in the kernel, then in the endpoint's socket
      const upgraded = new Promise<void>((r) => socket.once("data", () => (socket.pause(), r())))
      socket.write("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
      const endpoint = yield* Effect.promise(() => bounded("accept", srv.next()))
      const received: Received = { messages: [], pings: [], closed: "open" }
      endpoint.start(recording(received, () => {}, () => {}))
      yield* Effect.promise(() => bounded("101", upgraded))
      const ping = Buffer.concat([Buffer.from([0x89, 0x80 | 125, 0, 0, 0, 0]), Buffer.alloc(125, 7)])
      const batch = Buffer.concat(Array.from({ length: 1000 }, () => ping))
      let most = 0
      for (let i = 0; i < 200; i++) {
        if (!socket.write(batch)) yield* Effect.promise(() => bounded("drain", new Promise((r) => socket.once("drain", r))))
        most = Math.max(most, endpoint.bufferedAmount)
      }
      yield* Effect.promise(() => bounded("pings read", new Promise<void>((r) => {
        const poll = () => (received.pings.length >= 200_000 ? r() : setTimeout(poll, 10))
        poll()
      })))
      most = Math.max(most, endpoint.bufferedAmount)
      assert.isAtMost(most, MaxQueuedPongBytes, `bytes queued toward a peer that does not read: ${most}`)
      socket.destroy()
    })), { timeout: 60_000 })

  it.live("upgrade requests ws would refuse are refused: wrong version 426, bad key 400, not GET 400", () =>
    noLeaks(Effect.gen(function*() {
      const srv = yield* endpointServer()
      const ask = (head: string) =>
        bounded("answer", new Promise<string>((resolve) => {
          const s = net.connect(srv.port, "127.0.0.1", () => s.write(head))
          let got = ""
          s.on("data", (c: Buffer) => (got += c.toString("latin1")))
          s.on("error", () => {})
          s.once("close", () => resolve(got.split("\r\n")[0]!))
        }))
      const base = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
      const key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
      assert.strictEqual(yield* Effect.promise(() => ask(`GET / HTTP/1.1\r\n${base}${key}Sec-WebSocket-Version: 8\r\n\r\n`)), "HTTP/1.1 426 Upgrade Required")
      assert.strictEqual(yield* Effect.promise(() => ask(`GET / HTTP/1.1\r\n${base}Sec-WebSocket-Key: short==\r\nSec-WebSocket-Version: 13\r\n\r\n`)), "HTTP/1.1 400 Bad Request")
      assert.strictEqual(yield* Effect.promise(() => ask(`GET / HTTP/1.1\r\n${base}Sec-WebSocket-Version: 13\r\n\r\n`)), "HTTP/1.1 400 Bad Request")
    })))
})
