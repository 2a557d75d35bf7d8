/**
 * switchyard's HTTP/2 client connection (RFC 9113) over a socket a backend opened: preface and SETTINGS,
 * streams with bounded send queues and both levels of flow control, PING, GOAWAY both ways, RST_STREAM,
 * trailers and extended CONNECT (RFC 8441). DATA payloads are handed on as views of the socket's read,
 * joined once per read and stream, and receive windows are granted back only as the consumer reports
 * bytes written on (`consumed`), so a slow reader holds the backend back. Plain callbacks, no fibers: it
 * neither picks backends nor speaks HTTP/1.1 (`Http2Upstream` does), nor accepts server pushes.
 */
import { Buffer } from "node:buffer"
import type { Duplex } from "node:stream"
import { Schema } from "effect"
import { contentLengthValues, declaredContentLength, isInvalidContentLength } from "../../domain/ContentLength.ts"
import { encodeHeaderBlock, HpackDecoder, HpackError } from "../../domain/Hpack.ts"
import { noRelease, ReadLease, type ReadRelease } from "../ReadLease.ts"
import {
  ClientPreface,
  DefaultMaxFrameBytes,
  DefaultWindowBytes,
  encodeDataHeader,
  encodeGoaway,
  encodeHeaders,
  encodePing,
  encodeRstStream,
  encodeSettings,
  encodeWindowUpdate,
  ErrorCode,
  Flag,
  FrameType,
  Http2FrameError,
  Http2FrameParser,
  MaxFrameBytesLimit,
  MaxStreamId,
  MaxWindowBytes,
  Setting,
  SettingsAck
} from "../../domain/Http2Frame.ts"

/** Bytes a stream may queue for sending beyond its window before `write` asks the caller to wait. */
export const StreamSendQueueBytes = 64 * 1024
/** Bytes queued on the socket above which stream DATA waits for the socket to drain. */
export const SocketSendQueueBytes = 1024 * 1024
/**
 * Bytes waiting to be written to the backend (socket queue and this turn's frames) beyond which the
 * connection ends with ENHANCE_YOUR_CALM: a backend that sends PINGs or SETTINGS without reading the
 * answers would otherwise grow the queue without bound (request DATA stops at `SocketSendQueueBytes`).
 */
export const MaxWriteQueueBytes = 4 * 1024 * 1024
/** How long a gracefully closing connection may take to flush its last frames before it is destroyed (ms). */
export const CloseFlushTimeoutMs = 5_000
/** PINGs awaiting their ACK at once. */
export const MaxPendingPings = 8
/** A receive window is granted back once this fraction of it has been consumed (batched WINDOW_UPDATE). */
export const WindowUpdateFraction = 0.5
/** Response heads (interim 1xx) a stream may receive before its final one. */
export const MaxInterimHeads = 16
/** Most SETTINGS entries handled in one frame. */
export const MaxSettingsPerFrame = 64
/** Response header fields HTTP/2 forbids (RFC 9113 §8.2.2). */
const ConnectionSpecific: ReadonlySet<string> = new Set(["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"])

/** The connection broke a rule, or was used after it closed. */
export class H2ConnectionError extends Schema.TaggedError<H2ConnectionError>()("H2ConnectionError", {
  reason: Schema.Literals(["Protocol", "FlowControl", "FrameSize", "Compression", "HeaderBlockTooLarge", "BadPreface", "Closed", "GoingAway", "NoStreamSlot", "PeerGoaway"]),
  /** The HTTP/2 error code sent (or received, for `PeerGoaway`). */
  code: Schema.Number,
  message: Schema.String
}) {}

export interface H2ClientLimits {
  /** SETTINGS_MAX_FRAME_SIZE advertised: the largest frame the backend may send. */
  readonly maxFrameBytes: number
  /** SETTINGS_INITIAL_WINDOW_SIZE advertised: what one response may have in flight at first. */
  readonly streamWindowBytes: number
  /**
   * Largest a stream's receive window grows to while its consumer keeps up (every byte reported
   * consumed as it is handed on); absent or equal to `streamWindowBytes`, windows stay as advertised.
   */
  readonly maxStreamWindowBytes?: number | undefined
  /** Connection receive window granted right after the preface. */
  readonly connectionWindowBytes: number
  /** SETTINGS_MAX_HEADER_LIST_SIZE advertised, and the bound of a received header block. */
  readonly maxHeaderListBytes: number
  /** Most fields in a received head. */
  readonly maxHeaderPairs: number
}

/** What the backend's SETTINGS say (defaults until they arrive). */
export interface H2RemoteSettings {
  maxConcurrentStreams: number
  initialWindowSize: number
  maxFrameSize: number
  enableConnectProtocol: boolean
}

/** How a stream ended. */
export interface H2StreamClose {
  /** RST_STREAM code received or sent; NO_ERROR when both sides ended normally. */
  readonly code: number
  /** The backend did not process it (REFUSED_STREAM, or above its GOAWAY's last stream): safe to resend. */
  readonly refused: boolean
  /** For logs: what happened, when not a normal end. */
  readonly reason: string | undefined
  /**
   * The gateway reset the stream because the backend broke the protocol on it: a malformed response
   * head, a body disagreeing with its content-length, a flow-control overrun.
   */
  readonly violation?: true | undefined
}

/** A stream's events; each is called on the socket's read path, so keep them short. */
export interface H2StreamEvents {
  /** The final response head: status and fields (pseudo-headers removed, names lower-case). */
  readonly response: (status: number, headers: ReadonlyArray<string>, endStream: boolean) => void
  /**
   * Response body bytes (a view of the socket's read); report them with `consumed` once written on.
   * `release` is a hold on that read (`ReadLease`): called once the consumer keeps no view of the chunk
   * (its bytes written out), the read's memory goes back at once; left uncalled, to the collector.
   */
  readonly data: (chunk: Buffer, release: ReadRelease) => void
  /**
   * Several DATA payloads from one socket read, in order (`bytes` in all), for a consumer that writes
   * them in one go (a corked socket) instead of a joined copy; without it they are joined for `data`.
   * `release` as for `data`, for all of them.
   */
  readonly dataMany?: ((chunks: ReadonlyArray<Buffer>, bytes: number, release: ReadRelease) => void) | undefined
  readonly trailers: (headers: ReadonlyArray<string>) => void
  /** The response is complete (END_STREAM). */
  readonly end: () => void
  /** The stream is gone (after `end` when it completed); called once. */
  readonly close: (info: H2StreamClose) => void
  /** The send queue went below its bound after `write` returned false. */
  readonly writable: () => void
}

export interface H2ConnectionEvents {
  /** SETTINGS from the backend were applied (the first ones complete the handshake). */
  readonly settings: () => void
  /** The backend acknowledged the gateway's SETTINGS (once; they are sent once). */
  readonly acknowledged?: (() => void) | undefined
  /** The backend sent GOAWAY: no new streams; those above `lastStreamId` were refused. */
  readonly goaway: (lastStreamId: number, code: number) => void
  /** The connection is closed; `error` when it broke. Called once. */
  readonly close: (error: H2ConnectionError | undefined) => void
}

const fromFrameError = (e: Http2FrameError) =>
  new H2ConnectionError({ reason: e.reason === "FrameSize" ? "FrameSize" : e.reason === "HeaderBlockTooLarge" ? "HeaderBlockTooLarge" : "Protocol", code: e.code, message: e.message })

/** One request/response exchange on the connection. */
export class H2ClientStream {
  readonly id: number
  readonly connection: H2ClientConnection
  readonly events: H2StreamEvents
  /** What the backend still lets us send. */
  sendWindow: number
  /** What the backend may still send us. */
  recvWindow: number
  /** Received bytes consumed but not yet granted back. */
  unacked = 0
  /** The receive window this stream is granted (it grows while the consumer keeps up). */
  window: number
  /** Every byte consumed since the last WINDOW_UPDATE was consumed as it was handed on. */
  keptUp = true
  /** Delivered bytes not yet reported consumed (returned to the connection if the stream closes). */
  outstanding = 0
  queue: Array<Buffer> = []
  queued = 0
  /** `end` was called: END_STREAM goes out once the queue is empty. */
  ending = false
  endTrailers: ReadonlyArray<string> | undefined = undefined
  localEnded = false
  remoteEnded = false
  responded = false
  /** The request was HEAD: a response to it has no content, whatever its head declares. */
  headRequest = false
  /** The request was (extended) CONNECT: a 2xx answer is followed by tunnel bytes, not content. */
  connectRequest = false
  /** Response content the head declares (bytes); -1 when the body runs to END_STREAM. */
  expectedBytes = -1
  /** Response DATA bytes received (padding excluded). */
  receivedBytes = 0
  interim = 0
  closed = false
  wantWritable = false
  /** DATA views received in the current socket read, delivered as one chunk at its end. */
  pieces: Array<Buffer> = []
  piecesBytes = 0

  constructor(id: number, connection: H2ClientConnection, events: H2StreamEvents, sendWindow: number, recvWindow: number) {
    this.id = id
    this.connection = connection
    this.events = events
    this.sendWindow = sendWindow
    this.recvWindow = recvWindow
    this.window = recvWindow
  }

  /** Queues request body bytes; false when the caller should wait for `writable`. */
  write(chunk: Buffer): boolean {
    if (this.closed || this.ending) return false
    if (chunk.length > 0) {
      this.queue.push(chunk)
      this.queued += chunk.length
      this.connection.pump(this)
    }
    const ok = this.queued < StreamSendQueueBytes
    if (!ok) this.wantWritable = true
    return ok
  }

  /** Ends the request (after the queued bytes), with trailers when given. */
  end(trailers?: ReadonlyArray<string>): void {
    if (this.closed || this.ending) return
    this.ending = true
    this.endTrailers = trailers !== undefined && trailers.length > 0 ? trailers : undefined
    this.connection.pump(this)
  }

  /** Abandons the stream (RST_STREAM with `code`); `close` follows at once. */
  reset(code: number): void {
    this.connection.resetStream(this, code, "reset by the gateway", false)
  }

  /**
   * Reports response bytes written on, so the backend may send that much more; `atOnce` when they were
   * taken as they were handed on (not after the consumer's own backlog drained).
   */
  consumed(bytes: number, atOnce = false): void {
    if (this.closed || bytes <= 0) return
    if (!atOnce) this.keptUp = false
    this.outstanding -= bytes
    this.connection.grant(this, bytes)
  }
}

export class H2ClientConnection {
  readonly socket: Duplex
  readonly limits: H2ClientLimits
  readonly events: H2ConnectionEvents
  readonly remote: H2RemoteSettings = {
    maxConcurrentStreams: Number.POSITIVE_INFINITY,
    initialWindowSize: DefaultWindowBytes,
    maxFrameSize: DefaultMaxFrameBytes,
    enableConnectProtocol: false
  }
  /** The backend's first SETTINGS arrived. */
  ready = false
  /** The backend acknowledged the gateway's SETTINGS: its windows and frame size are in effect. */
  acknowledged = false
  /** Either side sent GOAWAY: no new streams. */
  goingAway = false
  destroyed = false
  private readonly parser: Http2FrameParser
  private readonly decoder: HpackDecoder
  private readonly streams = new Map<number, H2ClientStream>()
  private nextId = 1
  private sendWindow = DefaultWindowBytes
  private recvWindow: number
  private recvUnacked = 0
  /** The lease of the socket read being parsed, which the DATA views handed on are views of. */
  private readLease: ReadLease | undefined = undefined
  /** Streams with queued DATA waiting for window or for the socket. */
  private readonly blocked = new Set<H2ClientStream>()
  private out: Array<Buffer> = []
  private outBytes = 0
  private flushTimer: NodeJS.Immediate | undefined = undefined
  /** The DATA frame being parsed, and how much of it went to a stream. */
  private dataStream: H2ClientStream | undefined = undefined
  private dataDelivered = 0
  private dataLength = 0
  private readonly touched: Array<H2ClientStream> = []
  private readonly pings = new Map<string, (ok: boolean) => void>()
  private pingCounter = 0
  private readonly closeWaiters: Array<() => void> = []
  private closeTimer: NodeJS.Timeout | undefined = undefined

  constructor(socket: Duplex, limits: H2ClientLimits, events: H2ConnectionEvents) {
    this.socket = socket
    this.limits = limits
    this.events = events
    this.recvWindow = DefaultWindowBytes
    this.decoder = new HpackDecoder(limits.maxHeaderListBytes)
    this.parser = new Http2FrameParser(
      { maxFrameBytes: limits.maxFrameBytes, maxHeaderBlockBytes: limits.maxHeaderListBytes },
      { dataStart: this.onDataStart, data: this.onData, dataEnd: this.onDataEnd, headers: this.onHeaders, frame: this.onFrame }
    )
  }

  /** Sends the preface and SETTINGS and starts reading (bytes already unshifted on the socket come first). */
  start(): void {
    const socket = this.socket
    const grant = this.limits.connectionWindowBytes - DefaultWindowBytes
    this.write(ClientPreface)
    this.write(encodeSettings([
      [Setting.ENABLE_PUSH, 0],
      [Setting.INITIAL_WINDOW_SIZE, this.limits.streamWindowBytes],
      [Setting.MAX_FRAME_SIZE, this.limits.maxFrameBytes],
      [Setting.MAX_HEADER_LIST_SIZE, this.limits.maxHeaderListBytes]
    ]))
    if (grant > 0) {
      this.write(encodeWindowUpdate(0, grant))
      this.recvWindow += grant
    }
    this.flush()
    socket.on("data", this.onSocketData)
    socket.on("error", this.onSocketError)
    socket.on("close", this.onSocketClose)
    socket.on("drain", this.onSocketDrain)
    socket.resume()
  }

  /** Streams open. */
  get active(): number {
    return this.streams.size
  }

  /** Whether a new stream may be opened now. */
  canOpen(): boolean {
    return this.ready && !this.goingAway && !this.destroyed && this.streams.size < this.remote.maxConcurrentStreams
  }

  /** Opens a stream with a request head (pseudo-headers first, names lower-case). */
  request(headers: ReadonlyArray<string>, endStream: boolean, events: H2StreamEvents): H2ClientStream | H2ConnectionError {
    if (this.destroyed) return new H2ConnectionError({ reason: "Closed", code: ErrorCode.NO_ERROR, message: "the connection is closed" })
    if (this.goingAway) return new H2ConnectionError({ reason: "GoingAway", code: ErrorCode.NO_ERROR, message: "the connection is going away" })
    if (this.streams.size >= this.remote.maxConcurrentStreams) {
      return new H2ConnectionError({ reason: "NoStreamSlot", code: ErrorCode.REFUSED_STREAM, message: "the backend's stream limit is reached" })
    }
    const id = this.nextId
    if (id > MaxStreamId) {
      this.close()
      return new H2ConnectionError({ reason: "GoingAway", code: ErrorCode.NO_ERROR, message: "stream identifiers exhausted" })
    }
    const frames = encodeHeaders(id, encodeHeaderBlock(headers), endStream, this.remote.maxFrameSize)
    if (this.outBytes + this.socket.writableLength + frames.length > MaxWriteQueueBytes) {
      // the backend does not read: the connection ends (before a stream exists, so no event fires here)
      this.write(frames)
      return new H2ConnectionError({ reason: "Closed", code: ErrorCode.ENHANCE_YOUR_CALM, message: "the backend does not read what it is sent" })
    }
    this.nextId += 2
    const stream = new H2ClientStream(id, this, events, this.remote.initialWindowSize, this.limits.streamWindowBytes)
    const method = headers[0] === ":method" ? headers[1] : undefined
    stream.headRequest = method === "HEAD"
    stream.connectRequest = method === "CONNECT"
    this.streams.set(id, stream)
    this.write(frames)
    if (endStream) {
      stream.ending = true
      stream.localEnded = true
    }
    return stream
  }

  /** Sends a PING; `done(true)` on its ACK, `done(false)` if the connection closes first. */
  ping(done: (ok: boolean) => void): boolean {
    if (this.destroyed || this.pings.size >= MaxPendingPings) return false
    const payload = Buffer.alloc(8)
    payload.writeUInt32BE(++this.pingCounter, 4)
    this.pings.set(payload.toString("hex"), done)
    this.write(encodePing(payload, false))
    return true
  }

  /** Graceful close: GOAWAY, no new streams, the socket ends once the open streams are done. */
  close(): void {
    if (this.destroyed) return
    if (!this.goingAway) {
      this.goingAway = true
      this.write(encodeGoaway(0, ErrorCode.NO_ERROR, ""))
    }
    if (this.streams.size === 0) this.finish()
  }

  /** Closes at once: open streams end with `close` (not refused), the socket is destroyed. */
  destroy(error?: H2ConnectionError): void {
    if (this.destroyed) return
    this.destroyed = true
    this.goingAway = true
    if (this.flushTimer !== undefined) {
      clearImmediate(this.flushTimer)
      this.flushTimer = undefined
    }
    if (this.closeTimer !== undefined) {
      clearTimeout(this.closeTimer)
      this.closeTimer = undefined
    }
    const why = error?.message ?? "the connection closed"
    for (const stream of [...this.streams.values()]) this.closeStream(stream, { code: error?.code ?? ErrorCode.CANCEL, refused: false, reason: why })
    for (const done of this.pings.values()) done(false)
    this.pings.clear()
    if (error !== undefined && error.reason !== "PeerGoaway" && !this.socket.destroyed && this.socket.writable) {
      // tell the backend why, then close
      const goaway = encodeGoaway(0, error.code, error.message.slice(0, 256))
      this.out.push(goaway)
      this.socket.end(Buffer.concat(this.out))
      this.out = []
      setImmediate(() => this.socket.destroy()).unref()
    } else {
      this.socket.destroy()
    }
    this.events.close(error)
    for (const waiter of this.closeWaiters.splice(0)) waiter()
  }

  /** Calls `done` once the connection is closed (at once if it is). */
  whenClosed(done: () => void): void {
    if (this.destroyed) done()
    else this.closeWaiters.push(done)
  }

  // ---- sending ----

  /** Queues frame bytes; they go out together once the current I/O callbacks are done. */
  write(bytes: Buffer): void {
    if (this.destroyed) return
    if (this.outBytes + this.socket.writableLength + bytes.length > MaxWriteQueueBytes) {
      this.protocolError(`more than ${MaxWriteQueueBytes} bytes wait to be written to a backend that does not read`, "Protocol", ErrorCode.ENHANCE_YOUR_CALM)
      return
    }
    this.out.push(bytes)
    this.outBytes += bytes.length
    if (this.flushTimer === undefined) this.flushTimer = setImmediate(this.flush)
  }

  private readonly flush = (): void => {
    this.flushTimer = undefined
    const out = this.out
    if (out.length === 0 || this.destroyed) return
    this.out = []
    const bytes = this.outBytes
    this.outBytes = 0
    const socket = this.socket
    if (out.length === 1) socket.write(out[0]!)
    else if (bytes <= StreamSendQueueBytes) socket.write(Buffer.concat(out, bytes))
    else {
      socket.cork()
      for (const b of out) socket.write(b)
      socket.uncork()
    }
    // streams held back only by what was waiting here go on now (no `drain` would wake them)
    if (this.blocked.size > 0 && socket.writableLength < SocketSendQueueBytes) this.onSocketDrain()
  }

  private readonly onSocketDrain = (): void => {
    if (this.blocked.size > 0) for (const s of [...this.blocked]) this.pump(s)
  }

  /** Sends what a stream may send now: DATA within both windows and the peer's frame size, then its end. */
  pump(stream: H2ClientStream): void {
    if (stream.closed || this.destroyed) return
    while (stream.queue.length > 0) {
      if (this.socket.writableLength + this.outBytes >= SocketSendQueueBytes) {
        this.blocked.add(stream)
        return
      }
      const room = Math.min(stream.sendWindow, this.sendWindow, this.remote.maxFrameSize)
      if (room <= 0) {
        this.blocked.add(stream)
        return
      }
      const head = stream.queue[0]!
      const n = Math.min(room, head.length)
      const piece = n === head.length ? head : head.subarray(0, n)
      if (n === head.length) stream.queue.shift()
      else stream.queue[0] = head.subarray(n)
      stream.queued -= n
      stream.sendWindow -= n
      this.sendWindow -= n
      const last = stream.queue.length === 0 && stream.ending && stream.endTrailers === undefined
      this.write(encodeDataHeader(stream.id, n, last))
      this.write(piece)
      if (last) stream.localEnded = true
    }
    if (stream.closed || this.destroyed) return
    this.blocked.delete(stream)
    if (stream.ending && !stream.localEnded) {
      stream.localEnded = true
      if (stream.endTrailers !== undefined) {
        this.write(encodeHeaders(stream.id, encodeHeaderBlock(stream.endTrailers), true, this.remote.maxFrameSize))
      } else {
        this.write(encodeDataHeader(stream.id, 0, true))
      }
    }
    if (stream.wantWritable && stream.queued < StreamSendQueueBytes) {
      stream.wantWritable = false
      stream.events.writable()
    }
    if (stream.localEnded && stream.remoteEnded) this.closeStream(stream, { code: ErrorCode.NO_ERROR, refused: false, reason: undefined })
  }

  /** Grants consumed bytes back to the backend, in batches. */
  grant(stream: H2ClientStream, bytes: number): void {
    this.grantConnection(bytes)
    if (this.destroyed || stream.closed || stream.remoteEnded) return
    stream.unacked += bytes
    if (stream.unacked >= stream.window * WindowUpdateFraction) {
      let increment = stream.unacked
      // a consumer that took every byte as it came can take more in flight: double the window, so a
      // fast download waits on fewer WINDOW_UPDATEs; a slow one keeps the window it has
      const max = Math.min(this.limits.maxStreamWindowBytes ?? this.limits.streamWindowBytes, MaxWindowBytes)
      if (stream.keptUp && stream.window < max) {
        const grow = Math.min(stream.window, max - stream.window)
        stream.window += grow
        increment += grow
      }
      stream.keptUp = true
      this.write(encodeWindowUpdate(stream.id, increment))
      stream.recvWindow += increment
      stream.unacked = 0
    }
  }

  private grantConnection(bytes: number): void {
    if (this.destroyed) return
    this.recvUnacked += bytes
    if (this.recvUnacked >= this.limits.connectionWindowBytes * WindowUpdateFraction) {
      this.write(encodeWindowUpdate(0, this.recvUnacked))
      this.recvWindow += this.recvUnacked
      this.recvUnacked = 0
    }
  }

  /** `violation` when the backend broke the protocol on the stream (a malformed response, say). */
  resetStream(stream: H2ClientStream, code: number, reason: string, refused: boolean, violation = false): void {
    if (stream.closed) return
    // DATA gathered in this read is not handed to a stream being abandoned
    if (stream.piecesBytes > 0) {
      this.grantConnection(stream.piecesBytes)
      stream.pieces = []
      stream.piecesBytes = 0
    }
    this.write(encodeRstStream(stream.id, code))
    this.closeStream(stream, violation ? { code, refused, reason, violation } : { code, refused, reason })
  }

  private closeStream(stream: H2ClientStream, info: H2StreamClose): void {
    if (stream.closed) return
    this.deliver(stream)
    stream.closed = true
    this.streams.delete(stream.id)
    this.blocked.delete(stream)
    stream.queue = []
    stream.queued = 0
    // what was delivered but never reported consumed goes back to the connection window
    const owed = stream.outstanding
    stream.outstanding = 0
    if (owed > 0) this.grant(stream, owed)
    stream.events.close(info)
    if (this.goingAway && this.streams.size === 0 && !this.destroyed) this.finish()
  }

  /** Ends the socket once the frames written are out (graceful close with nothing left open). */
  private finish(): void {
    if (this.destroyed || this.closeTimer !== undefined) return
    this.flush()
    // destroyed once the last frames are out, or after a bound if the backend does not read them
    this.closeTimer = setTimeout(() => this.destroy(), CloseFlushTimeoutMs)
    this.socket.end(() => this.destroy())
  }

  // ---- receiving ----

  private readonly onSocketData = (chunk: Buffer): void => {
    // the parser keeps no view of a read past `push` (split frames are gathered into its own memory):
    // only the DATA views delivered below hold the read
    const lease = new ReadLease(chunk)
    this.readLease = lease
    const error = this.parser.push(chunk)
    if (this.touched.length > 0) {
      for (const stream of this.touched) this.deliver(stream)
      this.touched.length = 0
    }
    this.readLease = undefined
    lease.release()
    if (error !== undefined && !this.destroyed) this.fail(fromFrameError(error))
  }

  private readonly onSocketError = (): void => {
    // `close` follows
  }

  private readonly onSocketClose = (): void => {
    if (this.destroyed) return
    this.destroy(this.ready ? undefined : new H2ConnectionError({ reason: "BadPreface", code: ErrorCode.PROTOCOL_ERROR, message: "closed before sending HTTP/2 SETTINGS" }))
  }

  /** A connection error: GOAWAY with its code, everything closed. */
  private fail(error: H2ConnectionError): void {
    this.destroy(error)
  }

  private protocolError(message: string, reason: H2ConnectionError["reason"] = "Protocol", code: number = ErrorCode.PROTOCOL_ERROR): void {
    if (!this.destroyed) this.fail(new H2ConnectionError({ reason, code, message }))
  }

  /** Hands a stream the DATA gathered in this read (views of the read `readLease` holds), as one chunk. */
  private deliver(stream: H2ClientStream): void {
    const lease = this.readLease
    if (stream.pieces.length === 0) return
    const pieces = stream.pieces
    const bytes = stream.piecesBytes
    stream.pieces = []
    stream.piecesBytes = 0
    if (stream.closed) return
    stream.outstanding += bytes
    if (pieces.length === 1) stream.events.data(pieces[0]!, lease?.retain() ?? noRelease)
    else if (stream.events.dataMany !== undefined) stream.events.dataMany(pieces, bytes, lease?.retain() ?? noRelease)
    else stream.events.data(Buffer.concat(pieces, bytes), noRelease)
  }

  /** Whether a stream id names one the backend may not use (never opened by us, or a push). */
  private isIdle(id: number): boolean {
    return (id & 1) === 0 || id >= this.nextId
  }

  private readonly onDataStart = (id: number, _flags: number, length: number): void => {
    if (this.destroyed) return
    if (!this.ready) return this.protocolError("DATA before SETTINGS", "BadPreface")
    this.recvWindow -= length
    if (this.recvWindow < 0) return this.protocolError("the backend overran the connection window", "FlowControl", ErrorCode.FLOW_CONTROL_ERROR)
    this.dataLength = length
    this.dataDelivered = 0
    const stream = this.streams.get(id)
    this.dataStream = undefined
    if (stream === undefined) {
      if (this.isIdle(id)) return this.protocolError(`DATA on idle stream ${id}`)
      return
    }
    if (!stream.responded || stream.remoteEnded) {
      this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, "DATA before the response head or after its end", false, true)
      return
    }
    stream.recvWindow -= length
    if (stream.recvWindow < 0) {
      this.resetStream(stream, ErrorCode.FLOW_CONTROL_ERROR, "the backend overran the stream window", false, true)
      return
    }
    this.dataStream = stream
  }

  private readonly onData = (_id: number, chunk: Buffer): void => {
    const stream = this.dataStream
    if (stream === undefined || stream.closed) return
    stream.receivedBytes += chunk.length
    if (stream.expectedBytes >= 0 && stream.receivedBytes > stream.expectedBytes) {
      // content beyond what the head declared is malformed (RFC 9113 §8.1.1): none of it is handed on,
      // nor the rest of this read's DATA for the stream (counted unused, so granted back by `onDataEnd`)
      return this.resetStream(
        stream,
        ErrorCode.PROTOCOL_ERROR,
        stream.expectedBytes === 0
          ? "DATA in a response without content (to HEAD, a 204 or 304, or a content-length of 0)"
          : `DATA beyond the response's content-length (${stream.receivedBytes} bytes of ${stream.expectedBytes})`,
        false,
        true
      )
    }
    this.dataDelivered += chunk.length
    if (stream.pieces.length === 0) this.touched.push(stream)
    stream.pieces.push(chunk)
    stream.piecesBytes += chunk.length
  }

  private readonly onDataEnd = (_id: number, flags: number): void => {
    if (this.destroyed) return
    const stream = this.dataStream
    this.dataStream = undefined
    // padding, and bytes for streams already gone, never reach a consumer: granted back at once
    const unused = this.dataLength - this.dataDelivered
    if (unused > 0) {
      if (stream !== undefined && !stream.closed && !stream.remoteEnded) stream.unacked += unused
      this.grantConnection(unused)
    }
    if (stream !== undefined && !stream.closed && (flags & Flag.END_STREAM) !== 0) this.remoteEnd(stream)
  }

  /** Whether the response ended short of its content-length (then reset: RFC 9113 §8.1.1, never complete). */
  private endedShort(stream: H2ClientStream): boolean {
    if (stream.expectedBytes < 0 || stream.receivedBytes === stream.expectedBytes) return false
    const why = `END_STREAM after ${stream.receivedBytes} bytes of a response whose content-length is ${stream.expectedBytes}`
    this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, why, false, true)
    return true
  }

  private remoteEnd(stream: H2ClientStream): void {
    if (this.endedShort(stream)) return
    this.deliver(stream)
    stream.remoteEnded = true
    // a stream done both ways frees its slot before its consumer hears of the end (and may open another)
    if (stream.localEnded) this.streams.delete(stream.id)
    stream.events.end()
    if (stream.localEnded) this.closeStream(stream, { code: ErrorCode.NO_ERROR, refused: false, reason: undefined })
  }

  private readonly onHeaders = (id: number, flags: number, block: Buffer): void => {
    if (this.destroyed) return
    if (!this.ready) return this.protocolError("HEADERS before SETTINGS", "BadPreface")
    // decoded whatever becomes of the stream, so the table stays in step with the backend's
    const decoded = this.decoder.decode(block)
    if (decoded instanceof HpackError && decoded.reason === "Compression") {
      return this.protocolError(decoded.message, "Compression", ErrorCode.COMPRESSION_ERROR)
    }
    const stream = this.streams.get(id)
    if (stream === undefined) {
      if (this.isIdle(id)) this.protocolError(`HEADERS on idle stream ${id}`)
      return
    }
    this.deliver(stream)
    if (decoded instanceof HpackError) {
      this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, decoded.message, false, true)
      return
    }
    const endStream = (flags & Flag.END_STREAM) !== 0
    if (stream.remoteEnded) {
      this.resetStream(stream, ErrorCode.STREAM_CLOSED, "HEADERS after the end of the response", false, true)
      return
    }
    if (decoded.length / 2 > this.limits.maxHeaderPairs) {
      this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, `more than ${this.limits.maxHeaderPairs} header fields`, false, true)
      return
    }
    if (stream.responded) {
      // trailers: must end the stream and carry no pseudo-headers
      if (!endStream) return this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, "trailers without END_STREAM", false, true)
      const fields = plainFields(decoded, false)
      if (typeof fields === "string") return this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, fields, false, true)
      if (this.endedShort(stream)) return
      stream.events.trailers(fields)
      this.remoteEnd(stream)
      return
    }
    let status = -1
    if (decoded.length >= 2 && decoded[0] === ":status") {
      const text = decoded[1]!
      if (/^[1-9][0-9][0-9]$/.test(text)) status = Number(text)
    }
    if (status < 0) return this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, "a response head without a valid :status", false, true)
    const fields = plainFields(decoded, true)
    if (typeof fields === "string") return this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, fields, false, true)
    if (status < 200) {
      if (endStream || status === 101) return this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, `an invalid interim response ${status}`, false, true)
      if (++stream.interim > MaxInterimHeads) return this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, "too many interim responses", false, true)
      return
    }
    const expected = responseContentBytes(stream, status, fields)
    if (typeof expected === "string") return this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, expected, false, true)
    stream.expectedBytes = expected
    if (endStream && expected > 0) {
      return this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, `a response head ending the stream although its content-length is ${expected}`, false, true)
    }
    stream.responded = true
    stream.events.response(status, fields, endStream)
    if (endStream && !stream.closed) this.remoteEnd(stream)
  }

  private readonly onFrame = (type: number, flags: number, id: number, payload: Buffer): void => {
    if (this.destroyed) return
    if (!this.ready && !(type === FrameType.SETTINGS && (flags & Flag.ACK) === 0)) {
      return this.protocolError("the backend's first frame is not SETTINGS", "BadPreface")
    }
    switch (type) {
      case FrameType.SETTINGS:
        if ((flags & Flag.ACK) === 0) this.applySettings(payload)
        else if (!this.acknowledged) {
          this.acknowledged = true
          this.events.acknowledged?.()
        }
        return
      case FrameType.PING:
        if ((flags & Flag.ACK) === 0) {
          this.write(encodePing(payload, true))
          return
        }
        {
          const key = payload.toString("hex")
          const done = this.pings.get(key)
          if (done !== undefined) {
            this.pings.delete(key)
            done(true)
          }
        }
        return
      case FrameType.RST_STREAM: {
        const stream = this.streams.get(id)
        if (stream === undefined) {
          if (this.isIdle(id)) this.protocolError(`RST_STREAM on idle stream ${id}`)
          return
        }
        const code = payload.readUInt32BE(0)
        this.closeStream(stream, { code, refused: code === ErrorCode.REFUSED_STREAM, reason: `stream reset (code ${code})` })
        return
      }
      case FrameType.WINDOW_UPDATE: {
        const increment = payload.readUInt32BE(0) & 0x7fff_ffff
        if (id === 0) {
          if (increment === 0) return this.protocolError("a connection WINDOW_UPDATE of 0")
          this.sendWindow += increment
          if (this.sendWindow > MaxWindowBytes) return this.protocolError("the connection window overflowed", "FlowControl", ErrorCode.FLOW_CONTROL_ERROR)
          for (const s of [...this.blocked]) this.pump(s)
          return
        }
        const stream = this.streams.get(id)
        if (stream === undefined) {
          if (this.isIdle(id)) this.protocolError(`WINDOW_UPDATE on idle stream ${id}`)
          return
        }
        if (increment === 0) return this.resetStream(stream, ErrorCode.PROTOCOL_ERROR, "a stream WINDOW_UPDATE of 0", false, true)
        stream.sendWindow += increment
        if (stream.sendWindow > MaxWindowBytes) return this.resetStream(stream, ErrorCode.FLOW_CONTROL_ERROR, "the stream window overflowed", false, true)
        this.pump(stream)
        return
      }
      case FrameType.GOAWAY: {
        const lastStreamId = payload.readUInt32BE(0) & 0x7fff_ffff
        const code = payload.readUInt32BE(4)
        this.goingAway = true
        for (const stream of [...this.streams.values()]) {
          if (stream.id > lastStreamId) this.closeStream(stream, { code: ErrorCode.REFUSED_STREAM, refused: true, reason: "beyond the backend's GOAWAY" })
        }
        this.events.goaway(lastStreamId, code)
        if (code !== ErrorCode.NO_ERROR && this.streams.size > 0) {
          // an error GOAWAY: the backend is gone for the streams too
          this.destroy(new H2ConnectionError({ reason: "PeerGoaway", code, message: `the backend sent GOAWAY (code ${code})` }))
          return
        }
        if (this.streams.size === 0) this.finish()
        return
      }
      case FrameType.PUSH_PROMISE:
        return this.protocolError("PUSH_PROMISE although push is disabled")
    }
  }

  private applySettings(payload: Buffer): void {
    const count = payload.length / 6
    if (count > MaxSettingsPerFrame) return this.protocolError(`SETTINGS with ${count} entries`, "Protocol", ErrorCode.ENHANCE_YOUR_CALM)
    for (let i = 0; i < count; i++) {
      const id = payload.readUInt16BE(6 * i)
      const value = payload.readUInt32BE(6 * i + 2)
      switch (id) {
        case Setting.ENABLE_PUSH:
          if (value !== 0) return this.protocolError("a server may not enable push")
          break
        case Setting.MAX_CONCURRENT_STREAMS:
          this.remote.maxConcurrentStreams = value
          break
        case Setting.INITIAL_WINDOW_SIZE: {
          if (value > MaxWindowBytes) return this.protocolError("SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1", "FlowControl", ErrorCode.FLOW_CONTROL_ERROR)
          const delta = value - this.remote.initialWindowSize
          this.remote.initialWindowSize = value
          for (const stream of this.streams.values()) {
            stream.sendWindow += delta
            if (stream.sendWindow > MaxWindowBytes) return this.protocolError("a stream window overflowed", "FlowControl", ErrorCode.FLOW_CONTROL_ERROR)
          }
          break
        }
        case Setting.MAX_FRAME_SIZE:
          if (value < DefaultMaxFrameBytes || value > MaxFrameBytesLimit) return this.protocolError(`SETTINGS_MAX_FRAME_SIZE ${value} out of range`)
          this.remote.maxFrameSize = value
          break
        case Setting.ENABLE_CONNECT_PROTOCOL:
          if (value > 1) return this.protocolError("SETTINGS_ENABLE_CONNECT_PROTOCOL not 0 or 1")
          this.remote.enableConnectProtocol = value === 1
          break
        default:
          // HEADER_TABLE_SIZE needs nothing (the encoder never indexes), MAX_HEADER_LIST_SIZE is advisory,
          // unknown settings are ignored
          break
      }
    }
    this.write(SettingsAck)
    this.ready = true
    for (const s of [...this.blocked]) this.pump(s)
    this.events.settings()
  }
}

/**
 * How many content bytes a final response may carry: what its `content-length` declares (-1 when none),
 * 0 for a response that has no content (to HEAD, 204, 304: RFC 9110 §6.4.1), or why the head is
 * malformed (a `content-length` that is not one decimal value). A 2xx to CONNECT is a tunnel: its bytes
 * are not content, and any `content-length` on it is ignored (RFC 9110 §9.3.6).
 */
const responseContentBytes = (stream: H2ClientStream, status: number, fields: ReadonlyArray<string>): number | string => {
  if (stream.connectRequest && status >= 200 && status < 300) return -1
  const declared = declaredContentLength(contentLengthValues(fields))
  if (isInvalidContentLength(declared)) return `a response head with ${declared.message}`
  if (stream.headRequest || status === 204 || status === 304) return 0
  return declared ?? -1
}

/** Pseudo-headers and forbidden fields checked; returns the plain fields or why the head is malformed. */
const plainFields = (decoded: ReadonlyArray<string>, response: boolean): Array<string> | string => {
  const out: Array<string> = []
  let pseudoDone = false
  for (let i = 0; i < decoded.length; i += 2) {
    const name = decoded[i]!
    if (name.length === 0) return "an empty header name"
    if (name.charCodeAt(0) === 58) {
      if (!response || pseudoDone || name !== ":status" || i !== 0) return `pseudo-header ${name} not allowed here`
      continue
    }
    pseudoDone = true
    if (/[A-Z]/.test(name)) return `header name ${name} is not lower-case`
    if (ConnectionSpecific.has(name)) return `connection-specific header ${name}`
    out.push(name, decoded[i + 1]!)
  }
  return out
}
