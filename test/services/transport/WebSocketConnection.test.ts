/**
 * WebSocketConnection over real loopback WebSockets, switchyard's endpoint on both sides and against
 * `ws` (an independent implementation) on either: ordered bytes both ways, batches split into bounded
 * messages, read backpressure that stalls a sender, close codes as typed errors, refused text and
 * oversized messages, keepalive in virtual time, and nothing left open afterwards.
 */
import { assert, describe, it } from "@effect/vitest"
import { Duration, Effect, Exit, Schema, Scope } from "effect"
import { TestClock } from "effect/testing"
import { createHash } from "node:crypto"
import * as http from "node:http"
import * as net from "node:net"
import { WebSocket, WebSocketServer } from "ws"
import { type Connection, writeEffect } from "../../../src/services/Transport.ts"
import {
  DefaultKeepaliveInterval,
  DefaultKeepaliveTimeout,
  DefaultMaxPayload,
  fromEndpoint,
  MaxMessageBytes,
  packMessages,
  type WebSocketConnection
} from "../../../src/services/transport/WebSocketConnection.ts"
import { dialWebSocket, displayUrl } from "../../../src/services/transport/WebSocketDial.ts"
import type { WebSocketEndpoint } from "../../../src/services/transport/WebSocketEndpoint.ts"
import { acceptWebSocket } from "../../../src/services/transport/WebSocketOpen.ts"
import type { WebSocketError } from "../../../src/domain/WebSocketClose.ts"
import { noLeaks } from "../../support/leaks.ts"

interface Probe {
  readonly chunks: Array<Uint8Array>
  readonly bytes: () => number
  readonly events: Array<string>
  readonly closed: Promise<unknown>
}

const probe = (conn: Connection): Probe => {
  const chunks: Array<Uint8Array> = []
  const events: Array<string> = []
  let onClosed!: (e: unknown) => void
  const closed = new Promise<unknown>((resolve) => (onClosed = resolve))
  conn.start({
    onData: (c) => {
      chunks.push(c)
    },
    onEnd: () => events.push("end"),
    onClose: (e) => {
      events.push(e === undefined ? "close" : `close ${e.reason}`)
      onClosed(e)
    }
  })
  return { chunks, events, closed, bytes: () => chunks.reduce((n, c) => n + c.length, 0) }
}

/** A WebSocket server on loopback whose accepted sockets come out of `accepted`, closed with the scope. */
interface TestServer {
  readonly wss: WebSocketServer
  readonly port: number
  readonly next: () => Promise<WebSocket>
}

const server = (options: ConstructorParameters<typeof WebSocketServer>[0] = {}): Effect.Effect<TestServer, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<TestServer>((resolve) => {
        const waiting: Array<(ws: WebSocket) => void> = []
        const ready: Array<WebSocket> = []
        const wss: WebSocketServer = new WebSocketServer({ host: "127.0.0.1", port: 0, perMessageDeflate: false, ...options }, () =>
          resolve({
            wss,
            port: (wss.address() as net.AddressInfo).port,
            next: () => new Promise((r) => (ready.length > 0 ? r(ready.shift()!) : waiting.push(r)))
          }))
        wss.on("connection", (ws: WebSocket) => {
          ws.on("error", () => {})
          const w = waiting.shift()
          if (w) w(ws)
          else ready.push(ws)
        })
      })
    ),
    ({ wss }) =>
      Effect.promise(() =>
        new Promise<void>((resolve) => {
          for (const ws of wss.clients) ws.terminate()
          wss.close(() => resolve())
        })
      )
  )

/** A server whose upgrades switchyard accepts (as the gateway's control port does); endpoints come out of `next`. */
interface OwnServer {
  readonly port: number
  readonly next: () => Promise<WebSocketEndpoint>
}

const ownServer = (maxMessageBytes = DefaultMaxPayload): Effect.Effect<OwnServer, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<OwnServer & { readonly http: http.Server; readonly all: Set<WebSocketEndpoint> }>((resolve) => {
        const waiting: Array<(e: WebSocketEndpoint) => void> = []
        const ready: Array<WebSocketEndpoint> = []
        const all = new Set<WebSocketEndpoint>()
        const server = http.createServer((_req, res) => res.end())
        server.on("upgrade", (req, socket, head) => {
          socket.on("error", () => {})
          const endpoint = acceptWebSocket(req, socket, head, { maxMessageBytes, binaryOnly: true })
          if (endpoint === undefined) return
          all.add(endpoint)
          const w = waiting.shift()
          if (w) w(endpoint)
          else ready.push(endpoint)
        })
        server.listen(0, "127.0.0.1", () =>
          resolve({
            http: server,
            all,
            port: (server.address() as net.AddressInfo).port,
            next: () => new Promise((r) => (ready.length > 0 ? r(ready.shift()!) : waiting.push(r)))
          }))
      })
    ),
    ({ all, http: server }) =>
      Effect.promise(() =>
        new Promise<void>((resolve) => {
          for (const e of all) e.terminate()
          server.close(() => resolve())
          server.closeAllConnections()
        })
      )
  )

/** A dialed client Connection and the server's side of the same WebSocket, both switchyard's. */
const pair = (options: { maskFrames?: boolean } = {}) =>
  Effect.gen(function*() {
    const srv = yield* ownServer()
    const client = yield* dialWebSocket({ url: `ws://127.0.0.1:${srv.port}/x`, proxy: false, keepaliveInterval: 0, maskFrames: options.maskFrames })
    const raw = yield* Effect.promise(srv.next)
    const remote = yield* fromEndpoint(raw, { keepaliveInterval: 0 })
    return { client, remote, raw }
  })

const failureOf = <A>(exit: Exit.Exit<A, WebSocketError>): WebSocketError | undefined => {
  if (!Exit.isFailure(exit)) return undefined
  const reason = exit.cause.reasons.find((r) => r._tag === "Fail")
  return reason?._tag === "Fail" ? reason.error : undefined
}

/** Lets callbacks queued by socket events run (a macrotask turn). */
const settle = Effect.promise(() => new Promise<void>((resolve) => setImmediate(resolve)))

const pattern = (n: number, seed: number): Uint8Array => {
  const out = new Uint8Array(n)
  for (let i = 0; i < n; i++) out[i] = (i * 31 + seed) & 0xff
  return out
}

const concat = (chunks: ReadonlyArray<Uint8Array>): Buffer => Buffer.concat(chunks.map((c) => Buffer.from(c.buffer, c.byteOffset, c.length)))

const until = (check: () => boolean, what: string) =>
  Effect.promise(async () => {
    for (let i = 0; i < 500; i++) {
      if (check()) return
      await new Promise((r) => setTimeout(r, 10))
    }
    throw new Error(`timed out waiting for ${what}`)
  })

/**
 * `remote` paused: `client`'s writes stop completing well before 64 MiB and nothing is delivered;
 * resumed, every written byte arrives intact.
 */
const pausedReaderStallsSender = (client: Connection, remote: Connection) =>
  Effect.gen(function*() {
    const atServer = probe(remote)
    remote.pause()
    let written = 0
    let stop = false
    const chunk = pattern(256 * 1024, 7)
    const total = 64 * 1024 * 1024
    const writer = (async () => {
      while (!stop && written < total) {
        await new Promise<void>((resolve, reject) => client.write([chunk], (e) => (e ? reject(e) : resolve())))
        written += chunk.length
      }
    })()
    // the sender stops making progress well before the total: its done callbacks wait
    let last = -1
    for (let i = 0; i < 100 && last !== written; i++) {
      last = written
      yield* Effect.promise(() => new Promise((r) => setTimeout(r, 50)))
    }
    assert.strictEqual(last, written)
    assert.isBelow(written, total / 2)
    assert.strictEqual(atServer.bytes(), 0, "nothing delivered while paused")
    stop = true
    remote.resume()
    yield* Effect.promise(() => writer)
    yield* until(() => atServer.bytes() === written, "every written byte")
    const all = concat(atServer.chunks)
    for (let offset = 0; offset < all.length; offset += chunk.length) {
      assert.isTrue(all.subarray(offset, offset + chunk.length).equals(chunk))
    }
  })

describe("packMessages", () => {
  const between = (minimum: number, maximum: number) => Schema.Int.check(Schema.isBetween({ minimum, maximum }))
  it.effect.prop("keeps every byte in order and no message exceeds the limit", {
    sizes: Schema.Array(between(0, 300)).check(Schema.isBetweenLength(0, 20)),
    max: between(1, 200)
  }, ({ sizes, max }) => Effect.sync(() => {
    const chunks = sizes.map((n, i) => pattern(n, i))
    const messages = packMessages(chunks, max)
    assert.deepStrictEqual(concat(messages), concat(chunks))
    assert.isTrue(messages.every((m) => m.length > 0 && m.length <= max))
    // chunks of at least `joinBelow` bytes are sliced, never copied into a joined message
    const joinBelow = 100
    const packed = packMessages(chunks, max, joinBelow)
    assert.deepStrictEqual(concat(packed), concat(chunks))
    for (const c of chunks.filter((c) => c.length >= joinBelow)) {
      const parts = packed.filter((m) => m.buffer === c.buffer)
      assert.strictEqual(parts.reduce((n, m) => n + m.length, 0), c.length)
    }
  }))

  it("sends a single small chunk as is, without copying", () => {
    const chunk = pattern(100, 1)
    assert.strictEqual(packMessages([chunk], 1000)[0], chunk)
  })
})

describe("WebSocketConnection", () => {
  it.live("carries bytes both ways in order; big batches arrive as messages of at most MaxMessageBytes", () =>
    noLeaks(Effect.gen(function*() {
      const { client, remote } = yield* pair()
      const atServer = probe(remote)
      const atClient = probe(client)
      const batch = [pattern(12, 1), pattern(3 * MaxMessageBytes + 17, 2), pattern(5, 3)]
      yield* writeEffect(client, batch)
      yield* writeEffect(client, [pattern(1000, 4)])
      const expected = concat([...batch, pattern(1000, 4)])
      yield* until(() => atServer.bytes() === expected.length, "the batch")
      assert.isTrue(concat(atServer.chunks).equals(expected))
      assert.isTrue(atServer.chunks.every((c) => c.length <= MaxMessageBytes))
      yield* writeEffect(remote, [pattern(70_000, 5), pattern(1, 6)])
      yield* until(() => atClient.bytes() === 70_001, "the reply")
      assert.isTrue(concat(atClient.chunks).equals(concat([pattern(70_000, 5), pattern(1, 6)])))
    })))

  it.live("unmasked client frames carry the same bytes", () =>
    noLeaks(Effect.gen(function*() {
      const { client, remote } = yield* pair({ maskFrames: false })
      const atServer = probe(remote)
      const data = pattern(300_000, 9)
      yield* writeEffect(client, [data])
      yield* until(() => atServer.bytes() === data.length, "the data")
      assert.isTrue(concat(atServer.chunks).equals(Buffer.from(data)))
    })))

  it.live("a paused reader stalls the sender; resuming delivers everything intact", () =>
    noLeaks(Effect.gen(function*() {
      const { client, remote } = yield* pair()
      yield* pausedReaderStallsSender(client, remote)
    })))

  it.live("a clean close ends and closes without error; an error code closes with a typed reason", () =>
    noLeaks(Effect.gen(function*() {
      const first = yield* pair()
      const a = probe(first.client)
      probe(first.remote)
      first.remote.end()
      yield* Effect.promise(() => a.closed)
      assert.deepStrictEqual(a.events, ["end", "close"])
      assert.isUndefined(first.client.closeError())

      const second = yield* pair()
      const b = probe(second.client)
      probe(second.remote)
      second.raw.close(1011, "backend exploded")
      // (the server's side sent the close: its own end reports the code it chose)
      yield* Effect.promise(() => b.closed)
      assert.deepStrictEqual(b.events, ["close Io"])
      assert.strictEqual(second.client.closeError()?.reason, "InternalError")
      assert.match(second.client.closeError()!.message, /1011.*backend exploded/)
    })))

  it.live("a text message is refused with 1003; an oversized message with 1009", () =>
    noLeaks(Effect.gen(function*() {
      const srv = yield* server({ maxPayload: 4 * DefaultMaxPayload })
      const client = yield* dialWebSocket({ url: `ws://127.0.0.1:${srv.port}/`, proxy: false, keepaliveInterval: 0 })
      const raw = yield* Effect.promise(srv.next)
      const atClient = probe(client)
      const peerSaw = new Promise<number>((resolve) => raw.once("close", (code) => resolve(code)))
      raw.send("hello")
      yield* Effect.promise(() => atClient.closed)
      assert.strictEqual(client.closeError()?.reason, "UnsupportedData")
      assert.strictEqual(yield* Effect.promise(() => peerSaw), 1003)

      const big = yield* dialWebSocket({ url: `ws://127.0.0.1:${srv.port}/`, proxy: false, keepaliveInterval: 0 })
      const raw2 = yield* Effect.promise(srv.next)
      const atBig = probe(big)
      const peerSaw2 = new Promise<number>((resolve) => raw2.once("close", (code) => resolve(code)))
      raw2.send(Buffer.alloc(DefaultMaxPayload + 1))
      yield* Effect.promise(() => atBig.closed)
      assert.strictEqual(big.closeError()?.reason, "TooLarge")
      assert.strictEqual(yield* Effect.promise(() => peerSaw2), 1009)
      assert.strictEqual(atBig.bytes(), 0)
    })))

  it.live("a refused opening handshake names the status", () =>
    noLeaks(Effect.gen(function*() {
      const srv = yield* server({ verifyClient: (_info: unknown, done: (ok: boolean, code?: number) => void) => done(false, 403) } as never)
      const exit = yield* Effect.exit(Effect.scoped(dialWebSocket({ url: `ws://127.0.0.1:${srv.port}/`, proxy: false })))
      assert.isTrue(Exit.isFailure(exit))
      assert.strictEqual(failureOf(exit)?.reason, "Handshake")
      assert.match(failureOf(exit)!.message, /403/)
      const bad = yield* Effect.exit(Effect.scoped(dialWebSocket({ url: "http://127.0.0.1:1/", proxy: false })))
      assert.strictEqual(failureOf(bad)?.reason, "BadUrl")
    })))
})

describe("WebSocketConnection properties", () => {
  const between = (minimum: number, maximum: number) => Schema.Int.check(Schema.isBetween({ minimum, maximum }))
  it.live.prop(
    "every byte arrives once and in order, whatever the batches and the reader's pauses",
    {
      batches: Schema.Array(Schema.Array(between(0, 150_000)).check(Schema.isBetweenLength(1, 6))).check(Schema.isBetweenLength(1, 12)),
      pauses: Schema.Array(between(0, 3)).check(Schema.isBetweenLength(1, 16)),
      masked: Schema.Boolean
    },
    ({ batches, pauses, masked }) =>
      noLeaks(Effect.gen(function*() {
        const { client, remote } = yield* pair({ maskFrames: masked })
        const received: Array<Uint8Array> = []
        let events = 0
        remote.start({
          onData: (c) => {
            received.push(c)
            // the reader pauses now and then and comes back after 0-2 macrotasks
            const pause = pauses[events++ % pauses.length]!
            if (pause > 0) {
              remote.pause()
              let turns = pause
              const later = () => (--turns <= 0 ? remote.resume() : setImmediate(later))
              setImmediate(later)
            }
          },
          onEnd: () => {},
          onClose: () => {}
        })
        probe(client)
        const sent: Array<Uint8Array> = []
        let seed = 1
        for (const batch of batches) {
          const chunks = batch.map((n) => pattern(n, seed++))
          sent.push(...chunks)
          yield* writeEffect(client, chunks)
        }
        const expected = concat(sent)
        yield* until(() => received.reduce((n, c) => n + c.length, 0) >= expected.length, "every byte")
        assert.isTrue(concat(received).equals(expected))
      })),
    { timeout: 60_000, arbitrary: { runs: 15 } }
  )
})

describe("WebSocketConnection on the wire", () => {
  it.live("golden: a 6-byte write with the zero key is one binary message, 82 86 00 00 00 00 + payload", () =>
    noLeaks(Effect.gen(function*() {
      // a bare TCP server that completes the upgrade by hand and records what follows
      const received: Array<Buffer> = []
      const sockets = new Set<net.Socket>()
      const tcp = net.createServer((socket) => {
        sockets.add(socket)
        let head = Buffer.alloc(0)
        let upgraded = false
        socket.on("data", (chunk: Buffer) => {
          if (upgraded) return void received.push(chunk)
          head = Buffer.concat([head, chunk])
          const end = head.indexOf("\r\n\r\n")
          if (end < 0) return
          const key = /sec-websocket-key: *(\S+)/i.exec(head.subarray(0, end).toString("latin1"))![1]!
          const accept = createHash("sha1").update(`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest("base64")
          socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`)
          upgraded = true
          if (head.length > end + 4) received.push(head.subarray(end + 4))
        })
        socket.on("error", () => {})
      })
      const port = yield* Effect.acquireRelease(
        Effect.promise(() => new Promise<number>((resolve) => tcp.listen(0, "127.0.0.1", () => resolve((tcp.address() as net.AddressInfo).port)))),
        () => Effect.promise(() => new Promise<void>((resolve) => {
          for (const s of sockets) s.destroy()
          tcp.close(() => resolve())
        }))
      )
      const client = yield* dialWebSocket({ url: `ws://127.0.0.1:${port}/tunnel`, proxy: false, maskFrames: false, keepaliveInterval: 0 })
      probe(client)
      yield* writeEffect(client, [Uint8Array.from([0x00, 0x00, 0x00, 0x02, 0x7b, 0x7d])])
      yield* until(() => Buffer.concat(received).length >= 12, "the frame")
      assert.strictEqual(Buffer.concat(received).toString("hex"), "828600000000000000027b7d")
    })))
})

describe("WebSocketConnection keepalive", () => {
  it.effect("an answered ping keeps the connection; an unanswered one closes it with KeepaliveTimeout", () =>
    Effect.gen(function*() {
      const scope = yield* Scope.make()
      const srv = yield* server().pipe(Scope.provide(scope))
      // the dialing side keeps alive; the far side answers pings only while autoPong is on
      const client = yield* dialWebSocket({ url: `ws://127.0.0.1:${srv.port}/`, proxy: false }).pipe(Scope.provide(scope)) as Effect.Effect<WebSocketConnection>
      const raw = yield* Effect.promise(srv.next)
      const atClient = probe(client)
      const sinceLastPing = Duration.subtract(DefaultKeepaliveInterval, DefaultKeepaliveTimeout)
      for (let round = 0; round < 3; round++) {
        const pinged = new Promise<void>((resolve) => raw.once("ping", () => resolve()))
        // the pong is the next thing the client's socket reads
        const ponged = new Promise<void>((resolve) => client.endpoint.socket.once("data", () => resolve()))
        // pings go out every interval from the previous one: the clock is `timeout` past it
        yield* TestClock.adjust(round === 0 ? DefaultKeepaliveInterval : sinceLastPing)
        yield* Effect.promise(() => pinged)
        yield* Effect.promise(() => ponged)
        yield* settle
        yield* TestClock.adjust(DefaultKeepaliveTimeout)
        yield* settle
        assert.isUndefined(client.closeError(), `round ${round}`)
        assert.isFalse(client.closed())
      }
      // the far side stops reading: the next ping goes unanswered
      raw.pause()
      yield* TestClock.adjust(sinceLastPing)
      yield* settle
      assert.isFalse(client.closed())
      yield* TestClock.adjust(DefaultKeepaliveTimeout)
      yield* Effect.promise(() => atClient.closed)
      assert.strictEqual(client.closeError()?.reason, "KeepaliveTimeout")
      yield* Scope.close(scope, Exit.void)
    }))
})

/** A server side framed and read by switchyard (as the gateway's is), with its peer as given. */
const tappedServer = () =>
  Effect.gen(function*() {
    const srv = yield* ownServer()
    const accept = Effect.gen(function*() {
      const raw = yield* Effect.promise(srv.next)
      const conn = yield* fromEndpoint(raw, { keepaliveInterval: 0 })
      return { raw, conn }
    })
    return { port: srv.port, accept }
  })

/** A plain `ws` client (no switchyard code) to `port`. */
const plainClient = (port: number) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<WebSocket>((resolve, reject) => {
        const ws = new WebSocket(`ws://127.0.0.1:${port}/`, { perMessageDeflate: false })
        ws.once("open", () => resolve(ws))
        ws.once("error", reject)
      })
    ),
    (ws) => Effect.sync(() => ws.terminate())
  )

describe("WebSocketConnection read and written by switchyard on both sides", () => {
  it.live("bytes both ways in order through a dialed client and a switchyard server, pings answered between messages", () =>
    noLeaks(Effect.gen(function*() {
      const srv = yield* tappedServer()
      const client = yield* dialWebSocket({ url: `ws://127.0.0.1:${srv.port}/x`, proxy: false, keepaliveInterval: 0 })
      const { raw, conn: remote } = yield* srv.accept
      const atServer = probe(remote)
      const atClient = probe(client)
      const sent: Array<Uint8Array> = []
      for (let i = 0; i < 20; i++) {
        const batch = [pattern(12, i), pattern(1 + i * 37_123, i + 1)]
        sent.push(...batch)
        yield* writeEffect(client, batch)
        raw.ping()
      }
      const expected = concat(sent)
      yield* until(() => atServer.bytes() === expected.length, "every byte at the server")
      assert.isTrue(concat(atServer.chunks).equals(expected))
      const reply = [pattern(700_000, 3), pattern(5, 4)]
      yield* writeEffect(remote, reply)
      yield* until(() => atClient.bytes() === 700_005, "the reply")
      assert.isTrue(concat(atClient.chunks).equals(concat(reply)))
    })))

  it.live("a plain peer's fragmented messages, with a ping between fragments, arrive in order; text is refused with 1003", () =>
    noLeaks(Effect.gen(function*() {
      const srv = yield* tappedServer()
      const peer = yield* plainClient(srv.port)
      const { conn } = yield* srv.accept
      const at = probe(conn)
      const parts = [pattern(50_000, 1), pattern(90_000, 2), pattern(3, 3), pattern(200_000, 4)]
      const pong = new Promise<void>((resolve) => peer.once("pong", () => resolve()))
      peer.send(parts[0], { binary: true, fin: false })
      peer.send(parts[1], { binary: true, fin: false })
      peer.ping()
      peer.send(parts[2], { binary: true, fin: true })
      peer.send(parts[3], { binary: true })
      yield* Effect.promise(() => pong)
      const expected = concat(parts)
      yield* until(() => at.bytes() === expected.length, "every fragment")
      assert.isTrue(concat(at.chunks).equals(expected))

      const closedWith = new Promise<number>((resolve) => peer.once("close", (code) => resolve(code)))
      peer.send("hello")
      yield* Effect.promise(() => at.closed)
      assert.strictEqual(conn.closeError()?.reason, "UnsupportedData")
      assert.strictEqual(yield* Effect.promise(() => closedWith), 1003)
    })))

  it.live("a paused tapped reader stalls the sender; resuming delivers everything intact", () =>
    noLeaks(Effect.gen(function*() {
      const srv = yield* tappedServer()
      const client = yield* dialWebSocket({ url: `ws://127.0.0.1:${srv.port}/x`, proxy: false, keepaliveInterval: 0 })
      const { conn: remote } = yield* srv.accept
      yield* pausedReaderStallsSender(client, remote)
    })))
})

describe("displayUrl", () => {
  it("drops credentials from URLs shown in logs and errors", () => {
    assert.strictEqual(displayUrl("wss://user:pa%40ss@gw.example.com/tunnel"), "wss://gw.example.com/tunnel")
    assert.strictEqual(displayUrl("ws://gw:9998/tunnel"), "ws://gw:9998/tunnel")
    assert.strictEqual(displayUrl("ws://u:p@[bad"), "ws://[bad")
  })
})
