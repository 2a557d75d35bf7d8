/**
 * WebSocketFrameWriter against real peers on loopback: a bare server that completes the handshake and
 * reads the frames as they are on the wire (masking keys, lengths, payloads), a `ws` server for client
 * frames, and a `ws` client for server frames, with batches that span pooled buffers and messages.
 */
import { assert, describe, it } from "@effect/vitest"
import { createHash } from "node:crypto"
import * as net from "node:net"
import { Effect } from "effect"
import { WebSocket, WebSocketServer } from "ws"
import { type FrameMasking, MASKED_OUTPUT_BUFFER_BYTES, WebSocketFrameWriter } from "../../../src/services/transport/WebSocketFrameWriter.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

interface WireFrame {
  readonly fin: boolean
  readonly opcode: number
  readonly key: Buffer | undefined
  /** The payload as sent, unmasked here. */
  readonly payload: Buffer
}

/** Parses complete frames off the front of `buf`; returns them and the bytes left over. */
const parseFrames = (buf: Buffer): { frames: Array<WireFrame>; rest: Buffer } => {
  const frames: Array<WireFrame> = []
  let at = 0
  for (;;) {
    if (buf.length - at < 2) break
    const b0 = buf[at]!
    const b1 = buf[at + 1]!
    let len = b1 & 0x7f
    let p = at + 2
    if (len === 126) {
      if (buf.length - p < 2) break
      len = buf.readUInt16BE(p)
      p += 2
    } else if (len === 127) {
      if (buf.length - p < 8) break
      len = buf.readUInt32BE(p) * 0x100000000 + buf.readUInt32BE(p + 4)
      p += 8
    }
    const masked = (b1 & 0x80) !== 0
    const key = masked ? buf.subarray(p, p + 4) : undefined
    if (masked) p += 4
    if (buf.length - p < len) break
    const payload = Buffer.from(buf.subarray(p, p + len))
    if (key !== undefined) for (let i = 0; i < payload.length; i++) payload[i] = payload[i]! ^ key[i & 3]!
    frames.push({ fin: (b0 & 0x80) !== 0, opcode: b0 & 0x0f, key: key === undefined ? undefined : Buffer.from(key), payload })
    at = p + len
  }
  return { frames, rest: buf.subarray(at) }
}

/** A server that answers the upgrade and records every frame it then reads. */
const bareServer = () =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ server: net.Server; port: number; frames: Array<WireFrame> }>((resolve) => {
        const frames: Array<WireFrame> = []
        const server = net.createServer((socket) => {
          let head = Buffer.alloc(0)
          let upgraded = false
          socket.on("data", (chunk: Buffer) => {
            head = Buffer.concat([head, chunk])
            if (!upgraded) {
              const end = head.indexOf("\r\n\r\n")
              if (end < 0) return
              const key = /sec-websocket-key: *(\S+)/i.exec(head.subarray(0, end).toString("latin1"))![1]!
              const accept = createHash("sha1").update(key + GUID).digest("base64")
              socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`)
              upgraded = true
              head = head.subarray(end + 4)
            }
            const { frames: got, rest } = parseFrames(head)
            frames.push(...got)
            head = Buffer.from(rest)
          })
        })
        server.listen(0, "127.0.0.1", () => resolve({ server, port: (server.address() as net.AddressInfo).port, frames }))
      })
    ),
    ({ server }) => Effect.promise(() => new Promise<void>((r) => server.close(() => r())))
  )

/** A `ws` client connected to `url`, with the socket under it. */
const wsClient = (url: string, masking: "random" | "zero") =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ ws: WebSocket; socket: net.Socket }>((resolve, reject) => {
        let socket: net.Socket | undefined
        const ws = new WebSocket(url, masking === "zero" ? { generateMask: (m: Buffer) => void m.fill(0) } : {})
        ws.once("upgrade", (res) => {
          socket = res.socket as net.Socket
        })
        ws.once("open", () => resolve({ ws, socket: socket! }))
        ws.once("error", reject)
      })
    ),
    ({ ws }) => Effect.sync(() => ws.terminate())
  )

/** Chunks of varying sizes (a few bytes to 100 KiB) whose concatenation is `total` patterned bytes. */
const chunksOf = (total: number, seed: number): Array<Buffer> => {
  const out: Array<Buffer> = []
  let made = 0
  let s = seed
  while (made < total) {
    s = (s * 1103515245 + 12345) % 2147483648
    const size = Math.min(total - made, 1 + (s % 100_000))
    const b = Buffer.allocUnsafe(size)
    for (let i = 0; i < size; i++) b[i] = (made + i) * 7 & 0xff
    out.push(b)
    made += size
  }
  return out
}

const writeAll = (writer: WebSocketFrameWriter, chunks: ReadonlyArray<Uint8Array>) =>
  Effect.promise(() => new Promise<void>((resolve, reject) => writer.write(chunks, (e) => (e ? reject(e) : resolve()))))

const until = (pred: () => boolean, what: string) =>
  Effect.gen(function*() {
    for (let i = 0; i < 2000 && !pred(); i++) yield* Effect.sleep("5 millis")
    if (!pred()) return yield* Effect.die(new Error(`timed out waiting for ${what}`))
  })

describe("WebSocketFrameWriter", () => {
  for (const masking of ["random", "zero"] as const) {
    it.live(`client frames (${masking} key) on the wire: one binary frame per message, at most the message size, payload intact`, () =>
      Effect.gen(function*() {
        const before = activeHandles()
        yield* Effect.scoped(Effect.gen(function*() {
          const server = yield* bareServer()
          const { socket } = yield* wsClient(`ws://127.0.0.1:${server.port}/`, masking)
          const maxMessage = 40_000
          const writer = new WebSocketFrameWriter(socket, masking, maxMessage)
          const batches = [chunksOf(3 * MASKED_OUTPUT_BUFFER_BYTES + 12_345, 1), chunksOf(10, 2), chunksOf(700_000, 3)]
          const copies = batches.map((b) => Buffer.concat(b))
          for (const b of batches) yield* writeAll(writer, b)
          const expected = Buffer.concat(copies)
          yield* until(() => server.frames.reduce((n, f) => n + f.payload.length, 0) === expected.length, "every payload byte")
          assert.isTrue(Buffer.concat(server.frames.map((f) => f.payload)).equals(expected), "payloads in order, byte for byte")
          for (const f of server.frames) {
            assert.isTrue(f.fin)
            assert.strictEqual(f.opcode, 2)
            assert.isAtMost(f.payload.length, maxMessage)
            assert.isDefined(f.key, "client frames carry a masking key")
          }
          const keys = server.frames.map((f) => f.key!.toString("hex"))
          if (masking === "zero") assert.deepStrictEqual(new Set(keys), new Set(["00000000"]))
          else {
            assert.notInclude(keys, "00000000")
            assert.isAbove(new Set(keys).size, keys.length / 2, "a fresh key per frame")
          }
          assert.isTrue(Buffer.concat(batches.map((b) => Buffer.concat(b))).equals(Buffer.concat(copies)), "the caller's chunks are untouched")
        }))
        yield* Effect.promise(() => expectNoLeaks(before))
      }))
  }

  it.live("client frames reach a ws server as messages, between ws's own pings; server frames reach a ws client", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.scoped(Effect.gen(function*() {
        const received: Array<Buffer> = []
        const serverSide: Array<{ ws: WebSocket; socket: net.Socket }> = []
        const wss = yield* Effect.acquireRelease(
          Effect.promise(() =>
            new Promise<WebSocketServer>((resolve) => {
              const s: WebSocketServer = new WebSocketServer({ host: "127.0.0.1", port: 0 }, () => resolve(s))
              s.on("connection", (ws, req) => {
                serverSide.push({ ws, socket: req.socket as net.Socket })
                ws.on("message", (data) => received.push(data as Buffer))
              })
            })
          ),
          (s) =>
            Effect.promise(() =>
              new Promise<void>((r) => {
                for (const c of s.clients) c.terminate()
                s.close(() => r())
              })
            )
        )
        const port = (wss.address() as net.AddressInfo).port
        const client = yield* wsClient(`ws://127.0.0.1:${port}/`, "random")
        const pongs: Array<number> = []
        client.ws.on("pong", () => pongs.push(1))
        const writer = new WebSocketFrameWriter(client.socket, "random", 64 * 1024 + 12)
        const sent = chunksOf(2 * 1024 * 1024, 9)
        for (let i = 0; i < sent.length; i += 5) {
          client.ws.ping()
          yield* writeAll(writer, sent.slice(i, i + 5))
        }
        const expected = Buffer.concat(sent)
        yield* until(() => received.reduce((n, b) => n + b.length, 0) === expected.length, "every message")
        assert.isTrue(Buffer.concat(received).equals(expected))
        yield* until(() => pongs.length === Math.ceil(sent.length / 5), "every pong")

        // and the other way: unmasked server frames to the ws client
        const back: Array<Buffer> = []
        client.ws.on("message", (data) => back.push(data as Buffer))
        yield* until(() => serverSide.length === 1, "the server side")
        const serverWriter = new WebSocketFrameWriter(serverSide[0]!.socket, "none" satisfies FrameMasking, 64 * 1024 + 12)
        const reply = chunksOf(900_000, 4)
        yield* writeAll(serverWriter, reply)
        const replied = Buffer.concat(reply)
        yield* until(() => back.reduce((n, b) => n + b.length, 0) === replied.length, "every reply")
        assert.isTrue(Buffer.concat(back).equals(replied))
      }))
      yield* Effect.promise(() => expectNoLeaks(before))
    }))
})
