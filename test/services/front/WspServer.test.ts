/**
 * The server against a hand-written wsp client: a raw `ws` peer that registers and answers requests
 * by hand, frame by frame, as the wsp protocol describes, so nothing of our own client is involved.
 */
import { describe, expect, it } from "@effect/vitest"
import { createHash } from "node:crypto"
import * as http from "node:http"
import * as net from "node:net"
import { Effect, Logger, Redacted } from "effect"
import { TestClock } from "effect/testing"
import { WebSocket } from "ws"
import { makeWspServer, maxPendingGreetings, secretMatches, WspServer } from "../../../src/services/front/WspServer.ts"
import { noLeaks } from "../../support/leaks.ts"
import { exchange } from "../../support/rawUpstream.ts"
import { call, MessageInbox, secret, serverConfig, waitFor } from "../../integration/wspSupport.ts"

/** One hand-driven wsp client connection. */
class Peer extends MessageInbox {
  readonly ws: WebSocket

  constructor(ws: WebSocket) {
    super()
    this.ws = ws
    ws.on("message", (data, isBinary) => this.received({ data: data as Buffer, isBinary }))
    ws.on("close", (code) => this.ended(code))
    ws.on("error", () => undefined)
  }

  send(data: string | Buffer): void {
    this.ws.send(data, { binary: typeof data !== "string" })
  }
}

const connectPeer = (port: number, greeting: string | undefined, key = secret, options: { autoPong?: boolean } = {}) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<Peer>((resolve, reject) => {
        const ws = new WebSocket(`ws://127.0.0.1:${port}/register`, { headers: { "X-SECRET-KEY": key }, ...options })
        const peer = new Peer(ws)
        ws.once("open", () => {
          if (greeting !== undefined) ws.send(greeting)
          resolve(peer)
        })
        ws.once("error", reject)
      })
    ),
    (peer) => Effect.sync(() => peer.ws.terminate())
  )

/** A peer and the socket under it (from the client's public `upgrade` event), to write frames by hand. */
const connectWithSocket = (port: number, greeting: string | undefined) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ peer: Peer; socket: net.Socket }>((resolve, reject) => {
        const ws = new WebSocket(`ws://127.0.0.1:${port}/register`, { headers: { "X-SECRET-KEY": secret } })
        const peer = new Peer(ws)
        let socket: net.Socket | undefined
        ws.once("upgrade", (res) => void (socket = res.socket as net.Socket))
        ws.once("open", () => {
          if (greeting !== undefined) ws.send(greeting)
          resolve({ peer, socket: socket! })
        })
        ws.once("error", reject)
      })
    ),
    ({ peer }) => Effect.sync(() => peer.ws.terminate())
  )

/** A server with the default config and one peer (`peer_1`) registered and idle. */
const oneRegisteredPeer = Effect.gen(function*() {
  const server = yield* makeWspServer(serverConfig())
  const port = server.address.port
  const peer = yield* connectPeer(port, "peer_1")
  yield* waitFor("registered", () => server.stats().idle === 1)
  return { server, port, peer }
})

const next = (peer: Peer) => Effect.promise(() => peer.next())

/** Answers the request `peer` was given: a 200 head announcing `length` bytes (the body's by default), then `body`. */
const respond = (peer: Peer, body: string, length = Buffer.byteLength(body)): void => {
  peer.send(`{"StatusCode":200,"Header":{},"ContentLength":${length}}`)
  peer.send(Buffer.from(body))
}

/** A caller's request to `destination` through the server, answered by `peer` with `answer`: the body the caller got. */
const answeredCall = (port: number, peer: Peer, destination: string, answer: string) =>
  Effect.gen(function*() {
    const reply = Effect.runPromise(Effect.promise(() => call(port, { destination })))
    yield* next(peer)
    yield* next(peer)
    respond(peer, answer)
    return (yield* Effect.promise(() => reply)).body.toString()
  })

/**
 * A caller's request through the server to `peer`, answered with a head announcing a streamed body:
 * the peer's raw socket (to write body frames by hand) and how the caller's response ended.
 */
const streamedCall = (port: number, peer: Peer) =>
  Effect.gen(function*() {
    const socket = (peer.ws as unknown as { readonly _socket: net.Socket })._socket
    let outcome: { bytes: number; complete: boolean } | undefined
    const req = http.get({ host: "127.0.0.1", port, path: "/request", agent: false, headers: { "X-Proxy-Destination": "http://dest.example/" } }, (res) => {
      let bytes = 0
      res.on("data", (c: Buffer) => (bytes += c.length))
      res.on("error", () => undefined)
      res.on("close", () => (outcome = { bytes, complete: res.complete }))
    })
    req.on("error", () => undefined)
    yield* next(peer)
    yield* next(peer)
    peer.send("{\"StatusCode\":200,\"Header\":{},\"ContentLength\":-1}")
    return { socket, outcome: () => outcome }
  })

/** A client frame written by hand (masked), for writing straight to a peer's socket. */
const maskedFrame = (fin: boolean, opcode: number, payload: Buffer): Buffer => {
  const key = Buffer.from([0x3c, 0x00, 0xa5, 0x17])
  const len = payload.length
  const ext = len < 126 ? 0 : len < 65536 ? 2 : 8
  const head = Buffer.alloc(2 + ext + 4)
  head[0] = (fin ? 0x80 : 0) | opcode
  head[1] = 0x80 | (ext === 0 ? len : ext === 2 ? 126 : 127)
  if (ext === 2) head.writeUInt16BE(len, 2)
  if (ext === 8) head.writeBigUInt64BE(BigInt(len), 2)
  key.copy(head, 2 + ext)
  const body = Buffer.from(payload)
  for (let i = 0; i < body.length; i++) body[i]! ^= key[i & 3]!
  return Buffer.concat([head, body])
}

describe("WspServer against a hand-written wsp client", () => {
  it.live("sends the request head in Go's JSON shape and the body as one binary message, and relays the answer", () =>
    noLeaks(Effect.gen(function*() {
      const { server, port, peer } = yield* oneRegisteredPeer
      const reply = Effect.runPromise(Effect.promise(() =>
        call(port, {
          method: "POST",
          destination: "http://dest.example/x?a=1&b=2",
          body: Buffer.from("hello"),
          headers: { "X-Custom": "a", "x-lower": "b" }
        })
      ))
      const head = yield* next(peer)
      expect(head.isBinary).toBe(false)
      expect(head.data.toString()).toBe(
        "{\"Method\":\"POST\",\"URL\":\"http://dest.example/x?a=1\\u0026b=2\"," +
          "\"Header\":{\"Content-Length\":[\"5\"],\"X-Custom\":[\"a\"],\"X-Lower\":[\"b\"]," +
          "\"X-Proxy-Destination\":[\"http://dest.example/x?a=1\\u0026b=2\"]},\"ContentLength\":5}"
      )
      const body = yield* next(peer)
      expect(body.isBinary).toBe(true)
      expect(body.data.toString()).toBe("hello")
      expect(server.stats().busy).toBe(1)
      peer.send("{\"StatusCode\":201,\"Header\":{\"X-Reply\":[\"yes\"],\"Connection\":[\"close\"]},\"ContentLength\":2}")
      peer.send(Buffer.from("ok"))
      const r = yield* Effect.promise(() => reply)
      expect(r.status).toBe(201)
      expect(r.headers["x-reply"]).toBe("yes")
      expect(r.body.toString()).toBe("ok")
      yield* waitFor("released", () => server.stats().idle === 1)
    })))

  it.live("passes a body frame's bytes to the caller before the frame has all arrived; pings between frames are answered; the connection is reused after", () =>
    noLeaks(Effect.gen(function*() {
      const { server, port, peer } = yield* oneRegisteredPeer
      const socket = (peer.ws as unknown as { readonly _socket: net.Socket })._socket
      let pongs = 0
      peer.ws.on("pong", (data) => {
        if (data.toString() === "hi") pongs++
      })
      const received: Array<Buffer> = []
      let complete: boolean | undefined
      const req = http.get({ host: "127.0.0.1", port, path: "/request", agent: false, headers: { "X-Proxy-Destination": "http://dest.example/big" } }, (res) => {
        res.on("data", (c: Buffer) => received.push(c))
        res.on("end", () => (complete = res.complete))
      })
      req.on("error", () => undefined)
      yield* next(peer)
      yield* next(peer)
      const body = Buffer.alloc(201_000)
      for (let i = 0; i < body.length; i++) body[i] = (i * 13 + 5) % 256
      peer.send(`{"StatusCode":200,"Header":{},"ContentLength":${body.length}}`)
      const big = maskedFrame(false, 2, body.subarray(0, 200_000))
      // the first 50,000 payload bytes of a 200,000-byte frame
      socket.write(big.subarray(0, 14 + 50_000))
      yield* waitFor("bytes of an unfinished frame delivered", () => received.reduce((n, c) => n + c.length, 0) === 50_000)
      socket.write(big.subarray(14 + 50_000))
      const ping = maskedFrame(true, 9, Buffer.from("hi"))
      const last = maskedFrame(true, 0, body.subarray(200_000))
      // the ping between frames, and the last frame's header split across writes
      socket.write(Buffer.concat([ping, last.subarray(0, 1)]))
      yield* waitFor("pong", () => pongs === 1)
      socket.write(last.subarray(1))
      yield* waitFor("response complete", () => complete !== undefined)
      expect(complete).toBe(true)
      expect(Buffer.compare(Buffer.concat(received), body)).toBe(0)
      yield* waitFor("released", () => server.stats().idle === 1)
      // the receiver was left as ws leaves it after a message: the next exchange goes through ws
      expect(yield* answeredCall(port, peer, "http://dest.example/again", "again")).toBe("again")
    })))

  it.live("hands a protocol violation inside a streamed body to ws, which closes the connection; the caller's response is cut", () =>
    noLeaks(Effect.gen(function*() {
      const { server, port, peer } = yield* oneRegisteredPeer
      const { socket, outcome } = yield* streamedCall(port, peer)
      socket.write(maskedFrame(false, 2, Buffer.alloc(1000, 1)))
      yield* Effect.sleep(20)
      // a new binary message where a continuation belongs
      socket.write(maskedFrame(true, 2, Buffer.alloc(10, 2)))
      yield* waitFor("connection closed", () => peer.closed)
      expect(peer.closeCode).toBe(1002)
      yield* waitFor("caller's response ended", () => outcome() !== undefined)
      expect(outcome()).toEqual({ bytes: 1000, complete: false })
      expect(server.stats().idle).toBe(0)
    })))

  it.live("a streamed response body beyond maxmessagesize closes the connection with 1009 and cuts the caller's response", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ maxMessageSize: 100_000 }))
      const port = server.address.port
      const peer = yield* connectPeer(port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 1)
      const { socket, outcome } = yield* streamedCall(port, peer)
      socket.write(maskedFrame(false, 2, Buffer.alloc(60_000, 1)))
      yield* waitFor("first frame delivered", () => server.stats().busy === 1 && peer.inbox.length === 0)
      yield* Effect.sleep(20)
      socket.write(maskedFrame(true, 0, Buffer.alloc(60_000, 2)))
      yield* waitFor("connection closed", () => peer.closed)
      expect(peer.closeCode).toBe(1009)
      yield* waitFor("caller's response ended", () => outcome() !== undefined)
      expect(outcome()!.complete).toBe(false)
      expect(outcome()!.bytes).toBeLessThanOrEqual(60_000)
    })))

  it.live("relays bodies on the fast path on this Node and ws (no slow-path warning), which a registered connection reports", () =>
    Effect.gen(function*() {
      const messages: Array<string> = []
      const capture = Logger.make((options) => void messages.push(String(options.message)))
      yield* noLeaks(Effect.gen(function*() {
        const server = yield* makeWspServer(serverConfig())
        yield* connectPeer(server.address.port, "peer_1")
        yield* waitFor("registered", () => server.stats().idle === 1)
      })).pipe(Effect.provide(Logger.layer([capture])))
      expect(messages.filter((m) => m.includes("fast body relay"))).toEqual([])
    }))

  it.live("relays bodies exactly however their frames are sized, split across writes and mixed with pings, to a caller that pauses", () =>
    noLeaks(Effect.gen(function*() {
      const { server, port, peer } = yield* oneRegisteredPeer
      const socket = (peer.ws as unknown as { readonly _socket: net.Socket })._socket
      // a small deterministic generator, so a failure can be replayed
      let seed = 0x2545f491
      const random = (n: number) => {
        seed ^= seed << 13
        seed ^= seed >>> 17
        seed ^= seed << 5
        return (seed >>> 0) % n
      }
      for (let round = 0; round < 4; round++) {
        const sizes = Array.from({ length: 1 + random(6) }, () => (random(4) === 0 ? random(200) : random(300_000)))
        const total = sizes.reduce((a, b) => a + b, 0)
        const body = Buffer.alloc(total)
        for (let i = 0; i < total; i++) body[i] = (i * 7 + round) % 256
        const received: Array<Buffer> = []
        let complete: boolean | undefined
        const req = http.get({ host: "127.0.0.1", port, path: "/request", agent: false, headers: { "X-Proxy-Destination": "http://dest.example/" } }, (res) => {
          let reads = 0
          res.on("data", (c: Buffer) => {
            received.push(c)
            if (++reads % 5 === 0) {
              res.pause()
              setTimeout(() => res.resume(), 2)
            }
          })
          res.on("end", () => (complete = res.complete))
        })
        req.on("error", () => undefined)
        yield* next(peer)
        yield* next(peer)
        peer.send(`{"StatusCode":200,"Header":{},"ContentLength":${round % 2 === 0 ? total : -1}}`)
        const parts: Array<Buffer> = []
        let at = 0
        sizes.forEach((n, i) => {
          parts.push(maskedFrame(i === sizes.length - 1, i === 0 ? 2 : 0, body.subarray(at, at + n)))
          at += n
          if (random(2) === 0 && i < sizes.length - 1) parts.push(maskedFrame(true, 9, Buffer.from("p")))
        })
        const wire = Buffer.concat(parts)
        let offset = 0
        while (offset < wire.length) {
          const n = 1 + random(random(2) === 0 ? 16 : 150_000)
          socket.write(wire.subarray(offset, Math.min(wire.length, offset + n)))
          offset += n
          if (random(3) === 0) yield* Effect.sleep(1)
        }
        yield* waitFor(`round ${round} complete`, () => complete !== undefined)
        expect(complete).toBe(true)
        expect(Buffer.compare(Buffer.concat(received), body)).toBe(0)
        yield* waitFor("released", () => server.stats().idle === 1)
      }
    })), { timeout: 30_000 })

  it.live("sends an empty body as an empty binary message", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const peer = yield* connectPeer(server.address.port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 1)
      const reply = Effect.runPromise(Effect.promise(() => call(server.address.port, { destination: "http://dest.example/" })))
      const head = JSON.parse((yield* next(peer)).data.toString())
      expect(head).toMatchObject({ Method: "GET", URL: "http://dest.example/", ContentLength: 0 })
      const body = yield* next(peer)
      expect([body.isBinary, body.data.length]).toEqual([true, 0])
      peer.send("{\"StatusCode\":204,\"Header\":null,\"ContentLength\":0}")
      peer.send(Buffer.alloc(0))
      expect((yield* Effect.promise(() => reply)).status).toBe(204)
    })))

  it.live("never gives a busy connection a second request", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ timeout: 5000 }))
      const port = server.address.port
      const peer = yield* connectPeer(port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 1)
      const replies = Effect.runPromise(Effect.promise(() =>
        Promise.all([1, 2, 3].map((i) => call(port, { destination: `http://dest.example/${i}` })))
      ))
      const seen: Array<string> = []
      for (let i = 0; i < 3; i++) {
        const head = JSON.parse((yield* next(peer)).data.toString()) as { URL: string }
        yield* next(peer)
        seen.push(head.URL)
        // nothing else may arrive while this request is unanswered
        yield* Effect.sleep(30)
        expect(peer.inbox.length).toBe(0)
        peer.send("{\"StatusCode\":200,\"Header\":{},\"ContentLength\":-1}")
        peer.send(Buffer.from(head.URL))
      }
      const rs = yield* Effect.promise(() => replies)
      expect(rs.map((r) => r.body.toString()).sort()).toEqual(seen.sort())
      expect(seen.sort()).toEqual([1, 2, 3].map((i) => `http://dest.example/${i}`))
    })))

  it.live("closes a connection that answers a malformed head, answers 526, and the pool keeps serving", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const port = server.address.port
      const bad = yield* connectPeer(port, "peer_2")
      yield* waitFor("registered", () => server.stats().idle === 1)
      const good = yield* connectPeer(port, "peer_2")
      yield* waitFor("registered", () => server.stats().idle === 2)
      // take the most recently registered connection first (LIFO), so make sure the bad one is picked
      const first = Effect.runPromise(Effect.promise(() => call(port, { destination: "http://dest.example/1" })))
      const target = yield* Effect.promise(() => Promise.race([good.next().then(() => good), bad.next().then(() => bad)]))
      yield* next(target)
      target.send("{this is not json")
      const r1 = yield* Effect.promise(() => first)
      expect(r1.status).toBe(526)
      expect(r1.body.toString()).toMatch(/^Unable to unserialize http response : head is not valid JSON/)
      yield* waitFor("bad connection closed", () => target.closed)
      const other = target === good ? bad : good
      expect(server.stats()).toMatchObject({ idle: 1, busy: 0 })
      expect(yield* answeredCall(port, other, "http://dest.example/2", "ok")).toBe("ok")
    })))

  it.live("treats a text message where the body belongs as a missing body", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const peer = yield* connectPeer(server.address.port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 1)
      const reply = Effect.runPromise(Effect.promise(() => call(server.address.port, { destination: "http://dest.example/" })))
      yield* next(peer)
      yield* next(peer)
      peer.send("{\"StatusCode\":200,\"Header\":{},\"ContentLength\":2}")
      peer.send("{\"StatusCode\":200,\"Header\":{},\"ContentLength\":2}")
      const r = yield* Effect.promise(() => reply)
      expect(r.status).toBe(526)
      expect(r.body.toString()).toMatch(/expected a binary body message/)
      yield* waitFor("connection closed", () => peer.closed)
      expect(server.stats()).toMatchObject({ idle: 0, busy: 0 })
    })))

  it.live("answers 526 when the connection drops before the response", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const peer = yield* connectPeer(server.address.port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 1)
      const reply = Effect.runPromise(Effect.promise(() => call(server.address.port, { destination: "http://dest.example/" })))
      yield* next(peer)
      yield* next(peer)
      peer.send("{\"StatusCode\":200,\"Header\":{},\"ContentLength\":2}")
      yield* Effect.sleep(20)
      peer.ws.terminate()
      const r = yield* Effect.promise(() => reply)
      expect(r.status).toBe(526)
    })))

  it.live("drops a connection that sends a message while idle, and refuses bad greetings", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const port = server.address.port
      const wild = yield* connectPeer(port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 1)
      wild.send("unexpected")
      yield* waitFor("wild connection closed", () => wild.closed)
      yield* waitFor("removed from the pool", () => server.stats().idle === 0)
      for (const greeting of ["no-separator", "peer_x", "peer_-3"]) {
        const p = yield* connectPeer(port, greeting)
        yield* waitFor("bad greeting closed", () => p.closed)
        expect(p.closeCode).toBe(1008)
      }
      expect(server.stats().idle).toBe(0)
    })))

  it.live("refuses a registration with the wrong secret before upgrading", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const error = yield* Effect.promise(() =>
        new Promise<string>((resolve) => {
          const ws = new WebSocket(`ws://127.0.0.1:${server.address.port}/register`, { headers: { "X-SECRET-KEY": "nope" } })
          ws.on("error", (e) => resolve(e.message))
          ws.on("open", () => resolve("opened"))
        })
      )
      expect(error).toBe("Unexpected server response: 526")
      expect(secretMatches("a", "a")).toBe(true)
      expect(secretMatches("a", "ab")).toBe(false)
    })))

  it.live("replaceCredentials: new registrations and requests need the new keys; registered connections stay", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const port = server.address.port
      yield* connectPeer(port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 1)
      const register = (key: string) =>
        Effect.promise(() =>
          new Promise<string>((resolve) => {
            const ws = new WebSocket(`ws://127.0.0.1:${port}/register`, { headers: { "X-SECRET-KEY": key } })
            ws.on("error", (e) => resolve(e.message))
            ws.on("open", () => {
              ws.terminate()
              resolve("opened")
            })
          })
        )
      yield* server.replaceCredentials({ secretKey: Redacted.make("rotated"), requestKey: Redacted.make("caller-key") })
      expect(yield* register(secret)).toBe("Unexpected server response: 526")
      expect(yield* register("rotated")).toBe("opened")
      expect(server.stats().idle).toBeGreaterThanOrEqual(1)
      expect(server.rejected().secretKey).toBe(1)
      const unauthorized = yield* Effect.promise(() => call(port, { destination: "http://dest.example/x" }))
      expect(unauthorized.status).toBe(401)
      expect(server.rejected().requestKey).toBe(1)
    })))

  it.live("refuses request bodies above the message limit with 413 before taking a connection", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ maxMessageSize: 1000 }))
      const peer = yield* connectPeer(server.address.port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 1)
      const r = yield* Effect.promise(() => call(server.address.port, { method: "POST", destination: "http://d/", body: Buffer.alloc(5000) }))
      expect(r.status).toBe(413)
      expect(peer.inbox.length).toBe(0)
      expect(server.stats().idle).toBe(1)
    })))

  it.live("refuses requests whose framing or checked fields are ambiguous (400) before taking a connection", () =>
    noLeaks(Effect.gen(function*() {
      const { server, port, peer } = yield* oneRegisteredPeer
      const head = "POST /request HTTP/1.1\r\nHost: h\r\nX-Proxy-Destination: http://dest.example/x\r\n"
      for (
        const fields of [
          "Connection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
          "Connection: host\r\nContent-Length: 0\r\n\r\n",
          "Content-Type: application/x-www-form-urlencoded\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n",
          "X-HTTP-Method-Override: GET\r\nX-HTTP-Method-Override: DELETE\r\nContent-Length: 0\r\n\r\n"
        ]
      ) {
        const response = yield* Effect.promise(() => exchange(port, head + fields))
        expect(response, fields).toMatch(/^HTTP\/1\.1 400 /)
      }
      expect(peer.inbox.length).toBe(0)
      expect(server.stats().idle).toBe(1)
    })))

  it.effect("pings every interval and drops a connection that misses a pong (virtual time)", () =>
    Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ pingInterval: 30_000 }))
      const silent = yield* connectPeer(server.address.port, "peer_1", secret, { autoPong: false })
      const live = yield* connectPeer(server.address.port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 2)
      let pings = 0
      silent.ws.on("ping", () => pings++)
      yield* TestClock.adjust(30_000)
      yield* waitFor("first ping", () => pings === 1)
      expect(silent.closed).toBe(false)
      yield* TestClock.adjust(30_000)
      yield* waitFor("silent connection dropped", () => silent.closed)
      expect(live.closed).toBe(false)
      expect(server.stats().idle).toBe(1)
    }))

  it.effect("closes surplus idle connections after idletimeout and keeps the announced pool size (virtual time)", () =>
    Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ idleTimeout: 60_000 }))
      const peers = [
        yield* connectPeer(server.address.port, "peer_1"),
        yield* connectPeer(server.address.port, "peer_1"),
        yield* connectPeer(server.address.port, "peer_1")
      ]
      yield* waitFor("registered", () => server.stats().idle === 3)
      yield* TestClock.adjust(60_000)
      expect(peers.some((p) => p.closed)).toBe(false)
      yield* TestClock.adjust(5_000)
      yield* waitFor("surplus closed", () => peers.filter((p) => p.closed).length === 2)
      expect(server.stats()).toMatchObject({ pools: 1, idle: 1 })
    }))

  it.live("a caller that leaves while waiting for a connection is never sent", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ timeout: 10_000 }))
      const port = server.address.port
      const peer = yield* connectPeer(port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 1)
      const first = Effect.runPromise(Effect.promise(() => call(port, { destination: "http://dest.example/first" })))
      yield* next(peer)
      yield* next(peer)
      // a second caller waits for the only connection, then gives up
      const leaving = http.request({ host: "127.0.0.1", port, path: "/request", headers: { "X-Proxy-Destination": "http://dest.example/second" }, agent: false })
      leaving.on("error", () => undefined)
      leaving.end()
      yield* Effect.sleep(50)
      leaving.destroy()
      yield* Effect.sleep(50)
      respond(peer, "1")
      expect((yield* Effect.promise(() => first)).status).toBe(200)
      yield* waitFor("released", () => server.stats().idle === 1)
      yield* Effect.sleep(50)
      expect(peer.inbox).toHaveLength(0)
    })))

  it.live("relays an answer that comes before the request body is all sent, then drops that connection", () =>
    noLeaks(Effect.gen(function*() {
      const { server, port, peer } = yield* oneRegisteredPeer
      const chunks: Array<Buffer> = []
      let status = 0
      const req = http.request({
        host: "127.0.0.1",
        port,
        path: "/request",
        method: "POST",
        agent: false,
        headers: { "X-Proxy-Destination": "http://dest.example/upload", "Transfer-Encoding": "chunked" }
      })
      const done = new Promise<void>((resolve) => {
        req.on("response", (res) => {
          status = res.statusCode ?? 0
          res.on("data", (c: Buffer) => chunks.push(c))
          res.on("end", () => resolve())
          res.on("error", () => resolve())
        })
        req.on("error", () => resolve())
      })
      req.write(Buffer.alloc(1000, 1))
      const head = JSON.parse((yield* next(peer)).data.toString()) as { ContentLength: number }
      expect(head.ContentLength).toBe(-1)
      respond(peer, "early")
      yield* Effect.promise(() => done)
      expect(status).toBe(200)
      expect(Buffer.concat(chunks).toString()).toBe("early")
      yield* waitFor("connection dropped", () => peer.closed)
      req.destroy()
      expect(server.stats().idle).toBe(0)
    })))

  it.live("survives a peer that sends garbage after the upgrade, and keeps serving", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const port = server.address.port
      const closed = yield* Effect.promise(() =>
        new Promise<boolean>((resolve) => {
          const socket = net.connect(port, "127.0.0.1", () => {
            socket.write(
              "GET /register HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
                `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-SECRET-KEY: ${secret}\r\n\r\n`
            )
          })
          let upgraded = false
          socket.on("data", (d: Buffer) => {
            if (!upgraded && d.toString("latin1").startsWith("HTTP/1.1 101")) {
              upgraded = true
              // an unmasked frame with a reserved opcode and a length far beyond the limit
              socket.write(Buffer.from([0x83, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]))
            }
          })
          socket.on("error", () => undefined)
          socket.on("close", () => resolve(upgraded))
        })
      )
      expect(closed).toBe(true)
      const status = yield* Effect.promise(() => call(port, { path: "/status" }))
      expect(status.body.toString()).toBe("ok")
      yield* connectPeer(port, "peer_1")
      yield* waitFor("a good peer still registers", () => server.stats().idle === 1)
    })))

  it.live("is available as a Layer", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* WspServer
      const status = yield* Effect.promise(() => call(server.address.port, { path: "/status" }))
      expect(status.body.toString()).toBe("ok")
    }).pipe(Effect.provide(WspServer.layer(serverConfig())))))

  it.live("bounds connections that upgrade but never greet", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const port = server.address.port
      const silent: Array<Peer> = []
      for (let i = 0; i < maxPendingGreetings; i++) silent.push(yield* connectPeer(port, undefined))
      const refused = yield* Effect.promise(() =>
        new Promise<string>((resolve) => {
          const ws = new WebSocket(`ws://127.0.0.1:${port}/register`, { headers: { "X-SECRET-KEY": secret } })
          ws.on("error", (e) => resolve(e.message))
          ws.on("open", () => {
            ws.terminate()
            resolve("opened")
          })
        })
      )
      expect(refused).toBe("Unexpected server response: 503")
      silent[0]!.send("peer_1")
      yield* waitFor("a greeting frees a slot", () => server.stats().idle === 1)
      yield* connectPeer(port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 2)
    })))

  it.live("terminates a greeting of 1 MB once it passes the greeting budget, before it is all read", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const port = server.address.port
      const { peer: greedy, socket } = yield* connectWithSocket(port, undefined)
      // one frame announcing 1 MB, written in pieces: the server must cut it long before the end
      const frame = maskedFrame(true, 0x1, Buffer.alloc(1024 * 1024, 0x61))
      let written = 0
      const started = Date.now()
      while (!greedy.closed && written < frame.length && Date.now() - started < 5_000) {
        socket.write(frame.subarray(written, written + 16 * 1024))
        written += 16 * 1024
        yield* Effect.promise(() => new Promise((resolve) => setTimeout(resolve, 5)))
      }
      yield* waitFor("greedy greeting terminated", () => greedy.closed)
      expect(written).toBeLessThan(frame.length)
      expect(server.refusals().greetingTooLarge).toBe(1)
      // a greeting within the budget still registers
      yield* connectPeer(port, "peer_1")
      yield* waitFor("registered", () => server.stats().idle === 1)
    })))

  it.live("terminates a registered connection that sends more than maxidlebytes while it carries no request", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ maxIdleBytes: 8 * 1024 }))
      const port = server.address.port
      const { peer: wild, socket } = yield* connectWithSocket(port, "peer_1")
      const calm = yield* connectPeer(port, "peer_2")
      yield* waitFor("registered", () => server.stats().idle === 2)
      // pings and pongs, however many over a long idle time, do not use up the budget (21 KB here)
      let pongs = 0
      wild.ws.on("pong", () => pongs++)
      for (let i = 0; i < 200; i++) {
        wild.ws.ping(Buffer.alloc(100, i))
        if (i % 20 === 19) yield* waitFor("pongs", () => pongs === i + 1)
      }
      expect(wild.closed).toBe(false)
      expect(server.refusals().idleOverflow).toBe(0)
      // the head of a 1 MB binary message and a first part of it: cut at the budget, not at the message's end
      const frame = maskedFrame(true, 0x2, Buffer.alloc(1024 * 1024, 0x62))
      socket.write(frame.subarray(0, 64 * 1024))
      yield* waitFor("idle overflow terminated", () => wild.closed)
      expect(server.refusals().idleOverflow).toBe(1)
      yield* waitFor("removed from the pool", () => server.stats().idle === 1)
      // the other connection still carries requests, and between them pings are fine
      calm.ws.ping()
      expect(yield* answeredCall(port, calm, "http://dest.example/", "still here")).toBe("still here")
      expect(yield* answeredCall(port, calm, "http://dest.example/", "and again")).toBe("and again")
      expect(server.refusals().idleOverflow).toBe(1)
    })))

  it.live("streams a response body to the caller as its fragments arrive", () =>
    noLeaks(Effect.gen(function*() {
      const { server, port, peer } = yield* oneRegisteredPeer
      const received: Array<string> = []
      let ended = false
      let headers: http.IncomingHttpHeaders = {}
      const req = http.get({ host: "127.0.0.1", port, path: "/request", agent: false, headers: { "X-Proxy-Destination": "http://dest.example/events" } }, (res) => {
        headers = res.headers
        res.on("data", (c: Buffer) => received.push(c.toString()))
        res.on("end", () => (ended = true))
      })
      req.on("error", () => undefined)
      yield* next(peer)
      yield* next(peer)
      peer.send("{\"StatusCode\":200,\"Header\":{\"Content-Type\":[\"text/event-stream\"]},\"ContentLength\":-1}")
      peer.ws.send(Buffer.from("data: one\n\n"), { binary: true, fin: false })
      yield* waitFor("first event delivered before the message ends", () => received.join("") === "data: one\n\n")
      expect(ended).toBe(false)
      expect(headers["content-type"]).toBe("text/event-stream")
      expect(headers["transfer-encoding"]).toBe("chunked")
      peer.ws.send(Buffer.from("data: two\n\n"), { binary: true, fin: false })
      yield* waitFor("second event", () => received.join("") === "data: one\n\ndata: two\n\n")
      peer.ws.send(Buffer.alloc(0), { binary: true, fin: true })
      yield* waitFor("ended", () => ended)
      yield* waitFor("released", () => server.stats().idle === 1)
    })))

  it.live("cuts a streamed response whose length differs from its ContentLength and drops the connection", () =>
    noLeaks(Effect.gen(function*() {
      const { port, peer } = yield* oneRegisteredPeer
      const outcome = Effect.runPromise(Effect.promise(() =>
        new Promise<string>((resolve) => {
          const req = http.get({ host: "127.0.0.1", port, path: "/request", agent: false, headers: { "X-Proxy-Destination": "http://d/" } }, (res) => {
            res.on("data", () => undefined)
            res.on("end", () => resolve("complete"))
            res.on("error", () => resolve("cut"))
            res.on("aborted", () => resolve("cut"))
          })
          req.on("error", () => resolve("cut"))
        })
      ))
      yield* next(peer)
      yield* next(peer)
      respond(peer, "short", 10)
      expect(yield* Effect.promise(() => outcome)).toBe("cut")
      yield* waitFor("connection dropped", () => peer.closed)
    })))

  it.live("an answer whose body or Header disagrees with its ContentLength never puts a byte past it on the caller's keep-alive connection", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const port = server.address.port
      const forged = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
      /**
       * A caller's `/request` and a pipelined `/status` on one connection, the first answered by a fresh
       * peer with `head` and body fragments (each sent once the caller has what came before): every
       * byte the caller got until the server closed the connection (the Date header blanked).
       */
      const exchange = (head: string, fragments: ReadonlyArray<string>, method = "GET") =>
        Effect.gen(function*() {
          const peer = yield* connectPeer(port, "peer_1")
          yield* waitFor("registered", () => server.stats().idle === 1)
          const caller = net.connect({ host: "127.0.0.1", port })
          let got = ""
          caller.on("data", (c: Buffer) => void (got += c.toString("latin1")))
          caller.on("error", () => undefined)
          const closed = new Promise<void>((resolve) => caller.on("close", () => resolve()))
          caller.write(
            `${method} /request HTTP/1.1\r\nHost: w\r\nX-Proxy-Destination: http://dest.example/\r\n\r\n` +
              "GET /status HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
          )
          yield* next(peer)
          yield* next(peer)
          peer.send(head)
          for (let i = 0; i < fragments.length; i++) {
            const before = got.length
            peer.ws.send(Buffer.from(fragments[i]!), { binary: true, fin: i === fragments.length - 1 })
            // the next fragment once this one reached the caller (or the exchange failed)
            if (i < fragments.length - 1) yield* waitFor("a fragment relayed", () => got.length > before || caller.destroyed || peer.closed)
          }
          yield* Effect.promise(() => closed)
          yield* waitFor("the peer's connection closed", () => peer.closed)
          yield* waitFor("the pool emptied", () => server.stats().idle === 0)
          return got.replace(/\r\nDate: [^\r]*\r\n/g, "\r\nDate: -\r\n")
        })
      // a refusal closes the caller's connection: the pipelined request is never read
      const refused = (message: string) =>
        `HTTP/1.1 526 Error\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${message.length + 1}\r\nConnection: close\r\n\r\n${message}\n`
      const started = (length: number) => `HTTP/1.1 200 OK\r\nContent-Length: ${length}\r\n\r\n`

      // a body longer than its ContentLength: refused before the head, or cut after it, never relayed long
      expect(yield* exchange(`{"StatusCode":200,"Header":{},"ContentLength":3}`, ["abc" + forged]))
        .toBe(refused(`response body of ${3 + forged.length} bytes or more does not match ContentLength 3`))
      expect(yield* exchange(`{"StatusCode":200,"Header":{},"ContentLength":3}`, ["ab", "c" + forged, ""])).toBe(started(3) + "ab")
      // shorter: the response is cut (its connection closed), never complete
      expect(yield* exchange(`{"StatusCode":200,"Header":{},"ContentLength":10}`, ["abc", ""])).toBe(started(10) + "abc")
      expect(yield* exchange(`{"StatusCode":200,"Header":{},"ContentLength":10}`, [""]))
        .toBe(refused("response body of 0 bytes does not match ContentLength 10"))
      // a Content-Length in the Header that is not one value, or disagrees: refused
      for (
        const [header, why] of [
          [`{"Content-Length":["abc"]}`, `response head with invalid content-length "abc"`],
          [`{"Content-Length":["3, 4"]}`, `response head with invalid content-length "3, 4"`],
          [`{"Content-Length":["3","3"]}`, "response head with 2 content-length fields"],
          [`{"Content-Length":["3"],"content-length":["3"]}`, "response head with 2 content-length fields"],
          [`{"Content-Length":["5"]}`, "response head with Content-Length 5 but a body of 3 bytes"]
        ] as const
      ) {
        expect(yield* exchange(`{"StatusCode":200,"Header":${header},"ContentLength":3}`, ["abc"]), header).toBe(refused(why))
      }
      // (to HEAD, the refusal is a head alone)
      const why = `response head with invalid content-length "abc"`
      expect(yield* exchange(`{"StatusCode":200,"Header":{"Content-Length":["abc"]},"ContentLength":-1}`, ["abc"], "HEAD")).toBe(
        refused(why).slice(0, -(why.length + 1))
      )
    })))

  it.live("pushes back on the wsp client when the caller reads slowly, and delivers every byte intact", () =>
    noLeaks(Effect.gen(function*() {
      const { port, peer } = yield* oneRegisteredPeer
      const total = 48 * 1024 * 1024
      let received = 0
      const receivedHash = createHash("sha256")
      const sentHash = createHash("sha256")
      let response: http.IncomingMessage | undefined
      const req = http.get({ host: "127.0.0.1", port, path: "/request", agent: false, headers: { "X-Proxy-Destination": "http://d/big" } }, (res) => {
        response = res
        res.pause()
        res.on("data", (c: Buffer) => {
          received += c.length
          receivedHash.update(c)
        })
      })
      req.on("error", () => undefined)
      yield* next(peer)
      yield* next(peer)
      peer.send(`{"StatusCode":200,"Header":{},"ContentLength":${total}}`)
      // a well-behaved sender: the next fragment goes out only when its own buffer is nearly empty.
      // The caller reads nothing, so once the server stops reading the WebSocket the sender stalls.
      // Each fragment differs, so a byte given back before it was written would show in the hash
      let sent = 0
      const nextFragment = (): Buffer => {
        const fragment = Buffer.alloc(64 * 1024, (sent / 65536) & 0xff)
        fragment.writeUInt32BE(sent, 0)
        sentHash.update(fragment)
        return fragment
      }
      const stalledAt = yield* Effect.promise(async () => {
        let lastProgress = Date.now()
        while (sent < total && Date.now() - lastProgress < 1000) {
          if (peer.ws.bufferedAmount < 256 * 1024) {
            const fragment = nextFragment()
            sent += fragment.length
            peer.ws.send(fragment, { binary: true, fin: sent >= total })
            lastProgress = Date.now()
          } else {
            await new Promise((r) => setTimeout(r, 5))
          }
        }
        return sent
      })
      expect(stalledAt).toBeLessThan(total / 2)
      expect(response).toBeDefined()
      expect(received).toBe(0)
      const rest = Effect.runPromise(Effect.promise(async () => {
        while (sent < total) {
          if (peer.ws.bufferedAmount < 256 * 1024) {
            const fragment = nextFragment()
            sent += fragment.length
            peer.ws.send(fragment, { binary: true, fin: sent >= total })
          } else {
            await new Promise((r) => setTimeout(r, 1))
          }
        }
      }))
      response!.resume()
      yield* Effect.promise(() => rest)
      yield* waitFor("everything delivered once the caller reads", () => received === total, 20_000)
      expect(receivedHash.digest("hex")).toBe(sentHash.digest("hex"))
      expect(peer.ws.bufferedAmount).toBe(0)
    })))

  it.live("a caller whose request body trickles in is answered 408 by the client limits, counted, and its wsp connection is dropped", () =>
    noLeaks(Effect.gen(function*() {
      const { server, port, peer } = yield* oneRegisteredPeer
      const caller = net.connect({ host: "127.0.0.1", port })
      let got = ""
      caller.on("data", (c: Buffer) => void (got += c.toString("latin1")))
      caller.on("error", () => undefined)
      const closed = new Promise<void>((resolve) => caller.on("close", () => resolve()))
      // 10 bytes of a 100 000-byte body, then nothing: below 240 B/s once the 5 s grace is over
      caller.write("POST /request HTTP/1.1\r\nHost: w\r\nX-Proxy-Destination: http://dest.example/\r\nContent-Length: 100000\r\n\r\n0123456789")
      yield* next(peer)
      yield* Effect.promise(() => closed).pipe(Effect.timeout("15 seconds"))
      expect(got).toMatch(/^HTTP\/1\.1 408 /)
      expect(server.clientLimited().request_body_rate).toBe(1)
      yield* waitFor("the wsp connection dropped", () => peer.closed)
      expect(server.stats()).toMatchObject({ idle: 0, busy: 0 })
    })), 30_000)
})
