/**
 * switchyard's HTTP/2 client connection against a scripted peer on a real loopback socket: the peer reads
 * the client's frames with the domain parser and answers with hand-built frames, so every rule (PING,
 * CONTINUATION, unknown frames, GOAWAY, RST_STREAM, flow control and its violations, oversized heads,
 * malformed frames) is exercised on the wire; nothing is left open afterwards.
 */
import { assert, describe, it } from "@effect/vitest"
import * as net from "node:net"
import { Effect } from "effect"
import { encodeHeaderBlock } from "../../../src/domain/Hpack.ts"
import {
  ClientPreface,
  encodeDataHeader,
  encodeFrame,
  encodeGoaway,
  encodeHeaders,
  encodePing,
  encodeRstStream,
  encodeSettings,
  encodeWindowUpdate,
  ErrorCode,
  Flag,
  FrameType,
  Http2FrameParser,
  Setting,
  SettingsAck
} from "../../../src/domain/Http2Frame.ts"
import {
  H2ClientConnection,
  type H2ClientLimits,
  type H2ClientStream,
  type H2ConnectionError,
  type H2StreamClose,
  type H2StreamEvents
} from "../../../src/services/forward/H2ClientConnection.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"
import { until } from "../../integration/reverse-h2-harness.ts"

interface Frame {
  readonly type: number
  readonly flags: number
  readonly id: number
  readonly payload: Buffer
}

interface Peer {
  readonly frames: Array<Frame>
  readonly send: (...bytes: Array<Buffer>) => void
  readonly closed: () => boolean
  readonly client: H2ClientConnection
  readonly clientClosed: () => H2ConnectionError | undefined | "open"
  readonly settingsEvents: () => number
  readonly acknowledgements: () => number
  readonly goaways: Array<number>
  /** Stops reading the client's bytes (they pile up in the client's socket queue). */
  readonly pauseReading: () => void
}

const limits = { maxFrameBytes: 32 * 1024, streamWindowBytes: 64 * 1024, connectionWindowBytes: 256 * 1024, maxHeaderListBytes: 4096, maxHeaderPairs: 64 }

/** A scripted HTTP/2 server and the client connected to it (SETTINGS exchanged when `settings` is given). */
const withPeer = <A>(
  settings: ReadonlyArray<readonly [number, number]> | undefined,
  body: (peer: Peer) => Effect.Effect<A>,
  clientLimits: H2ClientLimits = limits
) =>
  Effect.gen(function*() {
    const before = activeHandles()
    const result = yield* Effect.acquireUseRelease(
      Effect.promise(() =>
        new Promise<{ server: net.Server; peer: Peer; socket: () => net.Socket | undefined }>((resolve) => {
          const frames: Array<Frame> = []
          let serverSide: net.Socket | undefined
          let sawPreface = false
          let pending = Buffer.alloc(0)
          let closed = false
          const parser = new Http2FrameParser({ maxFrameBytes: 1 << 20, maxHeaderBlockBytes: 1 << 20 }, {
            dataStart: () => {},
            data: (id, chunk) => frames.push({ type: FrameType.DATA, flags: 0, id, payload: Buffer.from(chunk) }),
            dataEnd: (id, flags) => frames.push({ type: FrameType.DATA, flags: flags | 0x100, id, payload: Buffer.alloc(0) }),
            headers: (id, flags, block) => frames.push({ type: FrameType.HEADERS, flags, id, payload: Buffer.from(block) }),
            frame: (type, flags, id, payload) => frames.push({ type, flags, id, payload: Buffer.from(payload) })
          })
          const server = net.createServer((socket) => {
            serverSide = socket
            socket.on("error", () => {})
            socket.on("close", () => void (closed = true))
            socket.on("data", (chunk: Buffer) => {
              if (!sawPreface) {
                pending = Buffer.concat([pending, chunk])
                if (pending.length < ClientPreface.length) return
                assert.isTrue(pending.subarray(0, ClientPreface.length).equals(ClientPreface), "client preface")
                sawPreface = true
                chunk = pending.subarray(ClientPreface.length)
              }
              parser.push(chunk)
            })
            if (settings !== undefined) socket.write(encodeSettings(settings))
          })
          server.listen(0, "127.0.0.1", () => {
            const port = (server.address() as net.AddressInfo).port
            const socket = net.connect({ host: "127.0.0.1", port }, () => {
              let clientClosed: H2ConnectionError | undefined | "open" = "open"
              let settingsEvents = 0
              let acknowledgements = 0
              const goaways: Array<number> = []
              const client = new H2ClientConnection(socket, clientLimits, {
                settings: () => void settingsEvents++,
                acknowledged: () => void acknowledgements++,
                goaway: (last) => void goaways.push(last),
                close: (error) => void (clientClosed = error)
              })
              client.start()
              resolve({
                server,
                socket: () => serverSide,
                peer: {
                  frames,
                  send: (...bytes) => void serverSide?.write(Buffer.concat(bytes)),
                  closed: () => closed,
                  client,
                  clientClosed: () => clientClosed,
                  settingsEvents: () => settingsEvents,
                  acknowledgements: () => acknowledgements,
                  goaways,
                  pauseReading: () => void serverSide?.pause()
                }
              })
            })
          })
        })
      ),
      ({ peer }) => body(peer),
      ({ server, peer, socket }) =>
        Effect.promise(() =>
          new Promise<void>((resolve) => {
            peer.client.destroy()
            socket()?.destroy()
            server.close(() => resolve())
          })
        )
    )
    yield* Effect.promise(() => expectNoLeaks(before))
    return result
  })

interface Recorder {
  readonly events: Array<string>
  readonly body: Array<Buffer>
  readonly closed: () => H2StreamClose | undefined
  readonly handlers: H2StreamEvents
}

/**
 * Stream events as a list; response bytes are reported consumed as they arrive unless `hold`, as taken
 * at once (a consumer keeping up) when `atOnce`.
 */
const recorder = (hold = false, atOnce = false): Recorder & { stream?: H2ClientStream } => {
  const events: Array<string> = []
  const body: Array<Buffer> = []
  let closed: H2StreamClose | undefined
  const r: Recorder & { stream?: H2ClientStream } = {
    events,
    body,
    closed: () => closed,
    handlers: {
      response: (status, headers, endStream) => void events.push(`response ${status} ${headers.join(",")} ${endStream}`),
      data: (chunk) => {
        body.push(Buffer.from(chunk))
        events.push(`data ${chunk.length}`)
        if (!hold) r.stream?.consumed(chunk.length, atOnce)
      },
      trailers: (headers) => void events.push(`trailers ${headers.join(",")}`),
      end: () => void events.push("end"),
      close: (info) => {
        closed = info
        events.push(`close ${info.code} ${info.refused}`)
      },
      writable: () => void events.push("writable")
    }
  }
  return r
}

const open = (peer: Peer, r: Recorder & { stream?: H2ClientStream }, endStream = true) => {
  const stream = peer.client.request([":method", "GET", ":path", "/", ":scheme", "http", ":authority", "t"], endStream, r.handlers)
  if (!("id" in stream)) throw stream
  r.stream = stream
  return stream
}

const head = (id: number, fields: ReadonlyArray<string>, endStream: boolean) => encodeHeaders(id, encodeHeaderBlock(fields), endStream, 16_384)
const find = (peer: Peer, type: number) => peer.frames.filter((f) => f.type === type)
const ready = (peer: Peer) => until(() => peer.client.ready && find(peer, FrameType.SETTINGS).some((f) => f.flags & Flag.ACK), "SETTINGS exchanged")

describe("H2ClientConnection", () => {
  it.effect("sends its preface, SETTINGS and window; applies the peer's SETTINGS and acknowledges them", () =>
    withPeer([[Setting.MAX_CONCURRENT_STREAMS, 7], [Setting.ENABLE_CONNECT_PROTOCOL, 1], [0x99, 5]], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const ours = find(peer, FrameType.SETTINGS).find((f) => (f.flags & Flag.ACK) === 0)!
        const values = new Map<number, number>()
        for (let i = 0; i < ours.payload.length; i += 6) values.set(ours.payload.readUInt16BE(i), ours.payload.readUInt32BE(i + 2))
        assert.strictEqual(values.get(Setting.ENABLE_PUSH), 0)
        assert.strictEqual(values.get(Setting.INITIAL_WINDOW_SIZE), limits.streamWindowBytes)
        assert.strictEqual(values.get(Setting.MAX_FRAME_SIZE), limits.maxFrameBytes)
        const window = find(peer, FrameType.WINDOW_UPDATE).find((f) => f.id === 0)!
        assert.strictEqual(window.payload.readUInt32BE(0), limits.connectionWindowBytes - 65_535)
        assert.strictEqual(peer.client.remote.maxConcurrentStreams, 7)
        assert.isTrue(peer.client.remote.enableConnectProtocol)
        assert.strictEqual(peer.settingsEvents(), 1)
        // the backend's acknowledgement of the gateway's SETTINGS is noted once
        assert.isFalse(peer.client.acknowledged)
        peer.send(SettingsAck, SettingsAck)
        yield* until(() => peer.client.acknowledged, "the acknowledgement")
        assert.strictEqual(peer.acknowledgements(), 1)
      })))

  it.effect("a first frame other than SETTINGS is a bad preface: GOAWAY and a typed error", () =>
    withPeer(undefined, (peer) =>
      Effect.gen(function*() {
        peer.send(encodePing(Buffer.alloc(8), false))
        yield* until(() => peer.clientClosed() !== "open", "the client to close")
        const error = peer.clientClosed() as H2ConnectionError
        assert.strictEqual(error.reason, "BadPreface")
        yield* until(() => find(peer, FrameType.GOAWAY).length === 1, "GOAWAY")
        assert.strictEqual(find(peer, FrameType.GOAWAY)[0]!.payload.readUInt32BE(4), ErrorCode.PROTOCOL_ERROR)
      })))

  it.effect("PING both ways; unknown frame types are ignored", () =>
    withPeer([], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        peer.send(encodeFrame(0x33, 0xff, 0, Buffer.from("whatever")), encodePing(Buffer.from("abcdefgh"), false))
        yield* until(() => find(peer, FrameType.PING).length === 1, "the PING ACK")
        const ack = find(peer, FrameType.PING)[0]!
        assert.strictEqual(ack.flags, Flag.ACK)
        assert.strictEqual(ack.payload.toString(), "abcdefgh")
        let answered: boolean | undefined
        assert.isTrue(peer.client.ping((ok) => void (answered = ok)))
        yield* until(() => find(peer, FrameType.PING).length === 2, "our PING")
        peer.send(encodePing(find(peer, FrameType.PING)[1]!.payload, true))
        yield* until(() => answered !== undefined, "the PING answered")
        assert.isTrue(answered)
        assert.strictEqual(peer.clientClosed(), "open")
      })))

  it.effect("a response split over CONTINUATION, a body, trailers; the head is checked", () =>
    withPeer([[Setting.HEADER_TABLE_SIZE, 0]], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const r = recorder()
        const stream = open(peer, r)
        yield* until(() => find(peer, FrameType.HEADERS).length === 1, "the request")
        assert.strictEqual(find(peer, FrameType.HEADERS)[0]!.flags & Flag.END_STREAM, Flag.END_STREAM)
        const block = encodeHeaderBlock([":status", "200", "content-type", "text/plain", "x-a", "1"])
        peer.send(
          encodeFrame(FrameType.HEADERS, 0, stream.id, block.subarray(0, 4)),
          encodeFrame(FrameType.CONTINUATION, 0, stream.id, block.subarray(4, 9)),
          encodeFrame(FrameType.CONTINUATION, Flag.END_HEADERS, stream.id, block.subarray(9)),
          encodeDataHeader(stream.id, 5, false),
          Buffer.from("hello"),
          head(stream.id, ["grpc-status", "0"], true)
        )
        yield* until(() => r.closed() !== undefined, "the stream to end")
        assert.deepStrictEqual(r.events, ["response 200 content-type,text/plain,x-a,1 false", "data 5", "trailers grpc-status,0", "end", "close 0 false"])
        // a malformed head (upper-case name) resets the stream, not the connection
        const bad = recorder()
        const second = open(peer, bad)
        peer.send(head(second.id, [":status", "200", "X-Upper", "1"], false))
        yield* until(() => bad.closed() !== undefined, "the malformed stream to close")
        assert.deepStrictEqual(bad.events, [`close ${ErrorCode.PROTOCOL_ERROR} false`])
        yield* until(() => find(peer, FrameType.RST_STREAM).length === 1, "RST_STREAM")
        assert.strictEqual(peer.clientClosed(), "open")
      })))

  it.effect("a header list over the limit fails its stream; a header block over it ends the connection", () =>
    withPeer([], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const r = recorder()
        const stream = open(peer, r)
        // fits the block limit with Huffman-free literals, decodes past the list limit
        const many: Array<string> = [":status", "200"]
        for (let i = 0; i < 50; i++) many.push(`x-${i}`, "v".repeat(60))
        peer.send(head(stream.id, many.slice(0, 2), false), head(stream.id, many.slice(2, 2 + 2 * 45), true))
        yield* until(() => r.closed() !== undefined, "the oversized trailers to fail their stream")
        assert.strictEqual(r.closed()!.code, ErrorCode.PROTOCOL_ERROR)
        assert.strictEqual(peer.clientClosed(), "open")
        const second = open(peer, recorder())
        peer.send(encodeFrame(FrameType.HEADERS, 0, second.id, Buffer.alloc(3000)), encodeFrame(FrameType.CONTINUATION, 0, second.id, Buffer.alloc(3000)))
        yield* until(() => peer.clientClosed() !== "open", "the connection to close")
        assert.strictEqual((peer.clientClosed() as H2ConnectionError).reason, "HeaderBlockTooLarge")
        yield* until(() => find(peer, FrameType.GOAWAY).length === 1, "GOAWAY")
        assert.strictEqual(find(peer, FrameType.GOAWAY)[0]!.payload.readUInt32BE(4), ErrorCode.ENHANCE_YOUR_CALM)
      })))

  it.effect("a malformed frame ends the connection with FRAME_SIZE_ERROR; streams see it", () =>
    withPeer([], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const r = recorder()
        open(peer, r)
        peer.send(encodeFrame(FrameType.PING, 0, 0, Buffer.alloc(7)))
        yield* until(() => peer.clientClosed() !== "open" && r.closed() !== undefined, "the connection to close")
        assert.strictEqual((peer.clientClosed() as H2ConnectionError).reason, "FrameSize")
        assert.isFalse(r.closed()!.refused)
        yield* until(() => find(peer, FrameType.GOAWAY).length === 1, "GOAWAY")
        assert.strictEqual(find(peer, FrameType.GOAWAY)[0]!.payload.readUInt32BE(4), ErrorCode.FRAME_SIZE_ERROR)
        yield* until(() => peer.closed(), "the socket to close")
      })))

  it.effect("a header block spread over a flood of empty CONTINUATIONs ends the connection", () =>
    withPeer([], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const r = recorder()
        const stream = open(peer, r)
        const flood = [encodeFrame(FrameType.HEADERS, 0, stream.id, Buffer.from("88", "hex"))]
        for (let i = 0; i < 200; i++) flood.push(encodeFrame(FrameType.CONTINUATION, 0, stream.id, Buffer.alloc(0)))
        peer.send(...flood)
        yield* until(() => peer.clientClosed() !== "open", "the connection to close")
        assert.strictEqual((peer.clientClosed() as H2ConnectionError).reason, "HeaderBlockTooLarge")
      })))

  it.effect("a peer that sends PINGs and never reads the ACKs ends with ENHANCE_YOUR_CALM", () =>
    withPeer([], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        peer.pauseReading()
        const ping = encodePing(Buffer.alloc(8), false)
        const batch = Buffer.concat(Array.from({ length: 4096 }, () => ping))
        for (let i = 0; i < 1000 && peer.clientClosed() === "open"; i++) {
          peer.send(batch)
          yield* Effect.promise(() => new Promise((resolve) => setTimeout(resolve, 5)))
        }
        yield* until(() => peer.clientClosed() !== "open", "the connection to close")
        const error = peer.clientClosed() as H2ConnectionError
        assert.strictEqual(error.code, ErrorCode.ENHANCE_YOUR_CALM)
      })))

  it.effect("flow control: bytes held back withhold WINDOW_UPDATE; overruns and overflows are errors", () =>
    withPeer([], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const r = recorder(true)
        const stream = open(peer, r)
        peer.send(head(stream.id, [":status", "200"], false))
        const chunk = Buffer.alloc(16_384, 1)
        for (let i = 0; i < 3; i++) peer.send(encodeDataHeader(stream.id, chunk.length, false), chunk)
        yield* until(() => r.body.reduce((n, b) => n + b.length, 0) === 3 * chunk.length, "48 KiB delivered")
        // nothing consumed: no stream WINDOW_UPDATE
        assert.isFalse(find(peer, FrameType.WINDOW_UPDATE).some((f) => f.id === stream.id))
        stream.consumed(3 * chunk.length)
        yield* until(() => find(peer, FrameType.WINDOW_UPDATE).some((f) => f.id === stream.id), "the stream's WINDOW_UPDATE")
        const update = find(peer, FrameType.WINDOW_UPDATE).find((f) => f.id === stream.id)!
        assert.strictEqual(update.payload.readUInt32BE(0), 3 * chunk.length)
        // beyond the stream window (64 KiB, 48 KiB granted back): 112 KiB more is too much
        for (let i = 0; i < 7; i++) peer.send(encodeDataHeader(stream.id, chunk.length, false), chunk)
        yield* until(() => r.closed() !== undefined, "the overrun stream to be reset")
        assert.strictEqual(r.closed()!.code, ErrorCode.FLOW_CONTROL_ERROR)
        assert.strictEqual(peer.clientClosed(), "open")
        // a stream window overflow resets that stream; a connection window overflow ends the connection
        const s2 = recorder()
        const second = open(peer, s2, false)
        peer.send(encodeWindowUpdate(second.id, 0x7fff_ffff))
        yield* until(() => s2.closed() !== undefined, "the overflowing stream to be reset")
        assert.strictEqual(s2.closed()!.code, ErrorCode.FLOW_CONTROL_ERROR)
        peer.send(encodeWindowUpdate(0, 0x7fff_ffff))
        yield* until(() => peer.clientClosed() !== "open", "the connection to close")
        assert.strictEqual((peer.clientClosed() as H2ConnectionError).reason, "FlowControl")
      })))

  it.effect("a stream whose consumer keeps up has its window doubled up to the maximum; one that fell behind keeps its own", () =>
    withPeer([], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const chunk = Buffer.alloc(16_384, 7)
        const increments = (id: number) => find(peer, FrameType.WINDOW_UPDATE).filter((f) => f.id === id).map((f) => f.payload.readUInt32BE(0))
        /** Sends `n` 16 KiB DATA frames on `id` and waits for the WINDOW_UPDATEs that follow. */
        const send = (id: number, n: number, updates: number) =>
          Effect.gen(function*() {
            for (let i = 0; i < n; i++) peer.send(encodeDataHeader(id, chunk.length, false), chunk)
            yield* until(() => increments(id).length === updates, `${updates} WINDOW_UPDATEs on stream ${id}`)
          })
        const KiB = 1024
        // 64 KiB at first: half of it taken at once grows it to 128 KiB (32 + 64 granted), then 256 KiB
        const fast = recorder(false, true)
        const a = open(peer, fast)
        peer.send(head(a.id, [":status", "200"], false))
        yield* send(a.id, 2, 1)
        yield* send(a.id, 4, 2)
        assert.deepStrictEqual(increments(a.id), [96 * KiB, 192 * KiB])
        assert.strictEqual(a.window, 256 * KiB)
        // at the maximum: the whole grown window may be in flight, and what is taken is granted back, no more
        yield* send(a.id, 16, 3)
        const allowance = 64 * KiB + increments(a.id).reduce((x, y) => x + y, 0) - (2 + 4 + 16) * chunk.length
        assert.isAtMost(allowance, 256 * KiB)
        assert.isAtLeast(allowance, 128 * KiB)
        assert.strictEqual(a.window, 256 * KiB)
        assert.strictEqual(fast.closed(), undefined, "a grown window is not an overrun")
        // taken only after the consumer's own backlog drained: the window stays 64 KiB
        const slow = recorder(false, false)
        const b = open(peer, slow)
        peer.send(head(b.id, [":status", "200"], false))
        for (let updates = 1; updates <= 3; updates++) yield* send(b.id, 2, updates)
        assert.deepStrictEqual(increments(b.id), [32 * KiB, 32 * KiB, 32 * KiB])
        assert.strictEqual(peer.clientClosed(), "open")
      }), { ...limits, maxStreamWindowBytes: 256 * 1024, connectionWindowBytes: 4 * 1024 * 1024 }))

  it.effect("request bodies wait for the peer's window and resume on WINDOW_UPDATE", () =>
    withPeer([[Setting.INITIAL_WINDOW_SIZE, 1000]], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const r = recorder()
        const stream = open(peer, r, false)
        assert.isTrue(stream.write(Buffer.alloc(3000, 2)))
        stream.end(["x-trailer", "t"])
        const sent = () => find(peer, FrameType.DATA).filter((f) => f.id === stream.id).reduce((n, f) => n + f.payload.length, 0)
        yield* until(() => sent() === 1000, "the first 1000 bytes")
        peer.send(encodeWindowUpdate(stream.id, 5000))
        yield* until(() => sent() === 3000 && find(peer, FrameType.HEADERS).length === 2, "the rest and the trailers")
        const trailers = find(peer, FrameType.HEADERS)[1]!
        assert.strictEqual(trailers.flags & Flag.END_STREAM, Flag.END_STREAM)
      })))

  it.effect("GOAWAY: streams above its last id are refused, the others finish, then the connection closes", () =>
    withPeer([], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const a = recorder()
        const b = recorder()
        const first = open(peer, a)
        open(peer, b)
        peer.send(encodeGoaway(first.id, ErrorCode.NO_ERROR, "draining"))
        yield* until(() => b.closed() !== undefined, "the later stream refused")
        assert.isTrue(b.closed()!.refused)
        assert.isTrue(peer.client.goingAway)
        assert.deepStrictEqual(peer.goaways, [first.id])
        const refused = peer.client.request([":method", "GET", ":path", "/", ":scheme", "http", ":authority", "t"], true, recorder().handlers)
        assert.isFalse("id" in refused)
        peer.send(head(first.id, [":status", "204"], true))
        yield* until(() => a.closed() !== undefined && peer.clientClosed() !== "open", "the first stream done and the connection closed")
        assert.deepStrictEqual(a.events, ["response 204  true", "end", "close 0 false"])
        assert.isUndefined(peer.clientClosed())
      })))

  it.effect("RST_STREAM both ways: a reset from the peer closes the stream with its code; ours sends CANCEL", () =>
    withPeer([], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const a = recorder()
        const first = open(peer, a)
        peer.send(encodeRstStream(first.id, ErrorCode.REFUSED_STREAM))
        yield* until(() => a.closed() !== undefined, "the reset")
        assert.deepStrictEqual(a.closed(), { code: ErrorCode.REFUSED_STREAM, refused: true, reason: `stream reset (code ${ErrorCode.REFUSED_STREAM})` })
        const b = recorder()
        const second = open(peer, b)
        second.reset(ErrorCode.CANCEL)
        assert.strictEqual(b.closed()!.code, ErrorCode.CANCEL)
        yield* until(() => find(peer, FrameType.RST_STREAM).some((f) => f.id === second.id), "our RST_STREAM")
        assert.strictEqual(find(peer, FrameType.RST_STREAM).find((f) => f.id === second.id)!.payload.readUInt32BE(0), ErrorCode.CANCEL)
        // frames still in flight for the reset stream are ignored
        peer.send(head(second.id, [":status", "200"], false), encodeDataHeader(second.id, 4, true), Buffer.from("late"))
        const c = recorder()
        const third = open(peer, c)
        peer.send(head(third.id, [":status", "200"], true))
        yield* until(() => c.closed() !== undefined, "a later stream to work")
        assert.strictEqual(peer.clientClosed(), "open")
        // a frame on a stream never opened is a connection error
        peer.send(encodeRstStream(99, ErrorCode.CANCEL))
        yield* until(() => peer.clientClosed() !== "open", "the connection to close")
        assert.strictEqual((peer.clientClosed() as H2ConnectionError).reason, "Protocol")
      })))

  it.effect("a response body that disagrees with its content-length is a stream error: no byte past the length is handed on", () =>
    withPeer([], (peer) =>
      Effect.gen(function*() {
        yield* ready(peer)
        const data = (id: number, text: string, end: boolean) => Buffer.concat([encodeDataHeader(id, text.length, end), Buffer.from(text)])
        const awaitReset = (id: () => number) => until(() => find(peer, FrameType.RST_STREAM).some((f) => f.id === id()), "RST_STREAM")
        /** Opens a stream, lets the peer answer with `frames(id)`, and returns the events once it closed. */
        const exchange = (method: string, frames: (id: number) => ReadonlyArray<Buffer>) =>
          Effect.gen(function*() {
            const r = recorder()
            const stream = peer.client.request([":method", method, ":path", "/", ":scheme", "http", ":authority", "t"], true, r.handlers)
            if (!("id" in stream)) throw stream
            r.stream = stream
            peer.send(...frames(stream.id))
            yield* until(() => r.closed() !== undefined, `the ${method} stream to close`)
            if (r.closed()!.code !== ErrorCode.NO_ERROR) yield* awaitReset(() => stream.id)
            const resets = find(peer, FrameType.RST_STREAM).filter((f) => f.id === stream.id).map((f) => f.payload.readUInt32BE(0))
            // the body is checked on its own: how it was split into reads is up to the socket
            const events = r.events.filter((e) => !e.startsWith("data "))
            return { events, body: Buffer.concat(r.body).toString(), reason: r.closed()!.reason, resets }
          })
        const reset = `close ${ErrorCode.PROTOCOL_ERROR} false`

        // DATA past the length, in a later frame of the same read and within one frame
        const beyond = yield* exchange("GET", (id) => [head(id, [":status", "200", "content-length", "3"], false), data(id, "abc", false), data(id, "HTTP/1.1 200 OK\r\n\r\n", true)])
        assert.deepStrictEqual(beyond.events, ["response 200 content-length,3 false", reset])
        // (what came within the length may have been handed on, when the read was split before the rest)
        assert.isTrue("abc".startsWith(beyond.body), beyond.body)
        assert.match(beyond.reason!, /beyond the response's content-length/)
        const within = yield* exchange("GET", (id) => [head(id, [":status", "200", "content-length", "3"], false), data(id, "abcdef", true)])
        assert.deepStrictEqual(within.events, ["response 200 content-length,3 false", reset])
        assert.isTrue("abc".startsWith(within.body), within.body)
        // DATA past the length in a later read, after the first bytes were handed on
        const r = recorder()
        const later = open(peer, r)
        peer.send(head(later.id, [":status", "200", "content-length", "3"], false), data(later.id, "ab", false))
        yield* until(() => r.body.length === 1, "the first bytes")
        peer.send(data(later.id, "cd", false))
        yield* until(() => r.closed() !== undefined, "the overlong stream to close")
        assert.deepStrictEqual(r.events, ["response 200 content-length,3 false", "data 2", reset])
        yield* awaitReset(() => later.id)
        // END_STREAM before the length: in DATA, in trailers, on the head itself
        const short = yield* exchange("GET", (id) => [head(id, [":status", "200", "content-length", "5"], false), data(id, "abc", true)])
        assert.deepStrictEqual(short.events, ["response 200 content-length,5 false", reset])
        assert.isTrue("abc".startsWith(short.body), short.body)
        assert.match(short.reason!, /END_STREAM after 3 bytes of a response whose content-length is 5/)
        const shortTrailers = yield* exchange("GET", (id) => [head(id, [":status", "200", "content-length", "5"], false), data(id, "abc", false), head(id, ["x-t", "1"], true)])
        assert.deepStrictEqual(shortTrailers.events, ["response 200 content-length,5 false", reset])
        assert.strictEqual(shortTrailers.body, "abc")
        const emptyHead = yield* exchange("GET", (id) => [head(id, [":status", "200", "content-length", "5"], true)])
        assert.deepStrictEqual(emptyHead.events, [reset])
        // a content-length that is not one decimal value: the head is malformed, never handed on
        for (const lengths of [["abc"], ["3, 4"], ["3, 3"], ["3", "3"], ["3", "4"], [""], [" 3"], ["-1"], ["1".repeat(16)]]) {
          const fields = [":status", "200", ...lengths.flatMap((v) => ["content-length", v])]
          const malformed = yield* exchange("GET", (id) => [head(id, fields, false), data(id, "abc", true)])
          assert.deepStrictEqual(malformed.events, [reset], JSON.stringify(lengths))
          assert.match(malformed.reason!, /content-length/)
        }
        // no content in a response to HEAD, a 204 or a 304, whatever the length says
        const headOk = yield* exchange("HEAD", (id) => [head(id, [":status", "200", "content-length", "5"], true)])
        assert.deepStrictEqual(headOk.events, ["response 200 content-length,5 true", "end", "close 0 false"])
        const headData = yield* exchange("HEAD", (id) => [head(id, [":status", "200", "content-length", "5"], false), data(id, "hello", true)])
        assert.deepStrictEqual(headData.events, ["response 200 content-length,5 false", reset])
        assert.strictEqual(headData.body, "")
        assert.match(headData.reason!, /DATA in a response without content/)
        for (const status of ["204", "304"]) {
          const bodied = yield* exchange("GET", (id) => [head(id, [":status", status], false), data(id, "x", true)])
          assert.deepStrictEqual(bodied.events, [`response ${status}  false`, reset], status)
          assert.strictEqual(bodied.body, "", status)
          const empty = yield* exchange("GET", (id) => [head(id, [":status", status], false), data(id, "", true)])
          assert.deepStrictEqual(empty.events, [`response ${status}  false`, "end", "close 0 false"], status)
        }
        // a body that matches, over several frames and reads; one without a length runs to END_STREAM
        const ok = yield* exchange("GET", (id) => [head(id, [":status", "200", "content-length", "5"], false), data(id, "hel", false), data(id, "lo", true)])
        assert.deepStrictEqual(ok.events, ["response 200 content-length,5 false", "end", "close 0 false"])
        assert.strictEqual(ok.body, "hello")
        const open5 = yield* exchange("GET", (id) => [head(id, [":status", "200"], false), data(id, "any length", true)])
        assert.strictEqual(open5.body, "any length")
        // the resets are stream errors: the connection stays, and what the reset streams were sent is
        // granted back (a later body as large as the connection window still arrives)
        assert.deepStrictEqual(beyond.resets, [ErrorCode.PROTOCOL_ERROR])
        assert.strictEqual(peer.clientClosed(), "open")
        const big = "x".repeat(limits.streamWindowBytes)
        const whole = yield* exchange("GET", (id) => [head(id, [":status", "200", "content-length", String(big.length)], false), data(id, big.slice(0, 16_000), false), data(id, big.slice(16_000, 32_000), false), data(id, big.slice(32_000, 48_000), false), data(id, big.slice(48_000), true)])
        assert.strictEqual(whole.body.length, big.length)
        assert.strictEqual(peer.clientClosed(), "open")
      })))
})
