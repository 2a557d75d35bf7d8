/**
 * One end of an open WebSocket (RFC 6455), owned by switchyard after the opening handshake
 * (`WebSocketOpen.ts`): frames are read by `FrameDecoder` straight off the socket and written by
 * switchyard, on public socket APIs only. Data messages are streamed: binary payload reaches the
 * consumer as views of each socket read, never assembled, so a relay neither waits for nor buffers a
 * whole message; text messages (heads, greetings) are collected, bounded by the message limit, and
 * checked as UTF-8. Pings are answered, close frames answered and checked, and every violation closes
 * the connection with its code at once: the close frame goes out, the socket is ended, and a peer that
 * does not close in `failCloseTimeout` is cut off.
 */
import { Buffer } from "node:buffer"
import type * as net from "node:net"
import { Duration } from "effect"
import {
  CloseCode,
  closeError,
  encodeClosePayload,
  readClosePayload,
  WebSocketError
} from "../../domain/WebSocketClose.ts"
import { encodeFrameHeader } from "../../domain/WebSocketFrameHeader.ts"
import { FrameDecoder, type FrameEvents, Opcode } from "../../domain/WebSocketFrames.ts"
import { type FrameMasking, WebSocketFrameWriter } from "./WebSocketFrameWriter.ts"
import { noRelease, ReadLease, type ReadRelease } from "../ReadLease.ts"
import { maskInto, nextMaskKey, unmaskInPlace } from "./WebSocketMasking.ts"

/** Time the peer has to answer a close frame switchyard sent before the socket is destroyed. */
export const DefaultCloseTimeout: Duration.Duration = Duration.seconds(5)
/** Pongs queued toward a peer (not yet taken by the kernel) beyond which its pings go unanswered. */
export const MaxQueuedPongBytes = 16 * 1024
/** Time a peer that broke a rule has to close after switchyard's close frame before it is cut off. */
export const FailCloseTimeout: Duration.Duration = Duration.millis(500)

/** What an endpoint hands its consumer. */
export interface EndpointHandlers {
  /** A complete text message (valid UTF-8, within the message limit). */
  readonly text: (message: string) => void
  /** A binary message begins. */
  readonly binaryStart: () => void
  /**
   * Payload of the current binary message, a view of one socket read. The consumer may keep it; with
   * `retainsReads`, only under a hold taken by `retainRead` during the call.
   */
  readonly binaryData: (payload: Buffer) => void
  /** The current binary message ended. */
  readonly binaryEnd: () => void
  /** A pong arrived (answers to pings are the consumer's business). */
  readonly pong?: ((payload: Buffer) => void) | undefined
  /** A ping arrived (it is answered already). */
  readonly ping?: ((payload: Buffer) => void) | undefined
  /** Everything of one socket read was handed over (a consumer that batches its writes per read flushes here). */
  readonly readDone?: (() => void) | undefined
  /** The connection is closed (once): `error` is undefined for a clean close (1000 or no status). */
  readonly closed: (error: WebSocketError | undefined) => void
  /**
   * The handlers take a hold (`retainRead`) for every view of a read they keep past the call that handed
   * it over, so each read's memory is given back once the last hold is released (`ReadLease`). Handlers
   * that replace these mid-read must retain too.
   */
  readonly retainsReads?: boolean | undefined
}

export interface EndpointOptions {
  /** How this side masks its frames: `none` for a server, `random` (or `zero`, operator's choice) for a client. */
  readonly masking: FrameMasking
  /** Largest message accepted from the peer; more is closed with 1009. */
  readonly maxMessageBytes: number
  /** Largest binary message this side sends as one frame by `sendMessages` (default: no split below 64 KiB + 12). */
  readonly maxSendMessageBytes?: number | undefined
  readonly closeTimeout?: Duration.Input | undefined
  /** Largest text message accepted (it is collected whole); more is closed with 1009. Default: `maxMessageBytes`. */
  readonly maxTextBytes?: number | undefined
  /** Refuse text messages (1003) as soon as one begins: for connections that carry only bytes. */
  readonly binaryOnly?: boolean | undefined
}

const State = {
  Open: 0,
  /** A close frame went out; waiting for the peer's. */
  Closing: 1,
  /** Both close frames crossed, or the connection failed: waiting for the socket to close. */
  Ending: 2,
  Closed: 3
} as const
type State = typeof State[keyof typeof State]

const strictUtf8 = new TextDecoder("utf-8", { fatal: true })
const EMPTY = Buffer.alloc(0)

export class WebSocketEndpoint {
  readonly socket: net.Socket
  private readonly decoder: FrameDecoder
  private readonly masking: FrameMasking
  private readonly writer: WebSocketFrameWriter
  private readonly closeTimeoutMs: number
  private readonly binaryOnly: boolean
  private readonly maxTextBytes: number
  private textBytes = 0
  private handlers: EndpointHandlers | undefined = undefined
  private state: State = State.Open
  /** Input not yet decoded: the handshake's leftover before `start`, or the rest of a read after `pause`. */
  private held: Buffer | undefined
  /** The lease of the read `held` is part of, when it is leased. */
  private heldLease: ReadLease | undefined = undefined
  /** The lease of the read being decoded, when the handlers retain reads. */
  private lease: ReadLease | undefined = undefined
  private paused = true
  private readonly key = new Uint8Array(4)
  /** The peer's close (code and reason), once its close frame arrived. */
  private peerClose: { readonly code: number; readonly reason: string } | undefined = undefined
  /** Why this side failed or closed the connection with an error. */
  private failure: WebSocketError | undefined = undefined
  private closeTimer: NodeJS.Timeout | undefined = undefined
  /** Text message being collected. */
  private textParts: Array<Buffer> | undefined = undefined
  /** Bytes of pongs written and not yet handed to the kernel. */
  private pongBytesQueued = 0
  /** A fragmented binary message this side is sending: its next frame is a continuation. */
  private sendingFragments = false

  constructor(socket: net.Socket, head: Buffer, options: EndpointOptions) {
    this.socket = socket
    this.masking = options.masking
    this.decoder = new FrameDecoder({
      maxMessageBytes: options.maxMessageBytes,
      expectMasked: options.masking === "none",
      unmask: unmaskInPlace
    })
    this.writer = new WebSocketFrameWriter(socket, options.masking, options.maxSendMessageBytes ?? 64 * 1024 + 12)
    this.closeTimeoutMs = Duration.toMillis(Duration.fromInputUnsafe(options.closeTimeout ?? DefaultCloseTimeout))
    this.binaryOnly = options.binaryOnly === true
    this.maxTextBytes = options.maxTextBytes ?? options.maxMessageBytes
    this.held = head.length > 0 ? head : undefined
    socket.setNoDelay?.(true)
    socket.pause()
    socket.on("data", this.onData)
    socket.on("error", this.onError)
    socket.once("end", this.onSocketEnd)
    socket.once("close", this.onSocketClose)
    if (socket.destroyed) this.socketGone = true
  }

  /** Starts reading: `handlers` hear every message from now on. */
  start(handlers: EndpointHandlers): void {
    this.handlers = handlers
    this.resume()
  }

  /** Hands every later event to `handlers` instead (a consumer passing the connection on). */
  replaceHandlers(handlers: EndpointHandlers): void {
    this.handlers = handlers
  }

  /** The connection is open for messages (no close frame sent or received). */
  get open(): boolean {
    return this.state === State.Open
  }

  /** The socket closed and the consumer heard of it. */
  get closed(): boolean {
    return this.notified
  }

  get isPaused(): boolean {
    return this.paused
  }

  /** Bytes written to the socket and not yet handed to the kernel. */
  get bufferedAmount(): number {
    return this.socket.writableLength
  }

  /** Holds reading after the event in progress; nothing more is handed over until `resume`. */
  pause(): void {
    if (this.paused) return
    this.paused = true
    this.decoder.hold()
    if (!this.socketGone) this.socket.pause()
  }

  /** Hands over what was held back, then reads on (or reports the close that waited behind it). */
  resume(): void {
    if (this.handlers === undefined || this.notified) return
    this.paused = false
    this.decoder.release()
    const rest = this.held
    const restLease = this.heldLease
    this.held = undefined
    this.heldLease = undefined
    this.decode(rest ?? EMPTY, restLease)
    if (this.paused) return
    if (this.socketGone) this.notifyClosed()
    else this.socket.resume()
  }

  // ------------------------------------------------------------------------------------------
  // reading

  private readonly onData = (chunk: Buffer): void => {
    // after a close frame or a failure nothing more is read: the socket is only drained to see its end
    if (this.decoder.stopped) return
    const lease = this.handlers?.retainsReads === true ? new ReadLease(chunk) : undefined
    if (this.paused) {
      // a read already under way when reads were paused
      if (this.held === undefined) {
        this.held = chunk
        this.heldLease = lease
      } else {
        this.held = Buffer.concat([this.held, chunk])
        this.releaseHeld()
        lease?.release()
      }
      return
    }
    this.decode(chunk, lease)
    this.handlers?.readDone?.()
  }

  /** Decodes `chunk` (of the read `lease` holds, if leased); what a pause leaves over is held. */
  private decode(chunk: Buffer, lease: ReadLease | undefined): void {
    const outer = this.lease
    this.lease = lease
    let taken: number
    try {
      taken = this.decoder.read(chunk, this.events)
    } finally {
      this.lease = outer
    }
    const violation = this.decoder.failed
    if (violation === undefined && taken < chunk.length && this.paused && !this.decoder.stopped) {
      this.held = chunk.subarray(taken)
      this.heldLease = lease
      return
    }
    lease?.release()
    if (violation !== undefined) {
      return this.fail(new WebSocketError({
        reason: violation.code === CloseCode.TooLarge ? "TooLarge" : "ProtocolError",
        code: violation.code,
        message: violation.message
      }))
    }
  }

  /**
   * A hold on the read whose payload is being handed over, for a consumer that keeps a view of it past
   * the call (`retainsReads`); does nothing outside a handler's call or when reads are not leased.
   */
  retainRead(): ReadRelease {
    return this.lease === undefined ? noRelease : this.lease.retain()
  }

  private releaseHeld(): void {
    const lease = this.heldLease
    this.heldLease = undefined
    lease?.release()
  }

  private readonly events: FrameEvents = {
    messageStart: (binary) => {
      if (binary) this.handlers!.binaryStart()
      else if (this.binaryOnly) {
        this.fail(new WebSocketError({ reason: "UnsupportedData", code: CloseCode.UnsupportedData, message: "websocket: a text message on a tunnel connection" }))
      } else {
        this.textParts = []
        this.textBytes = 0
      }
    },
    messageData: (payload) => {
      const parts = this.textParts
      if (parts === undefined) return this.handlers!.binaryData(payload)
      this.textBytes += payload.length
      if (this.textBytes > this.maxTextBytes) {
        return this.fail(new WebSocketError({ reason: "TooLarge", code: CloseCode.TooLarge, message: `websocket: a text message larger than ${this.maxTextBytes} bytes` }))
      }
      // a leased read is given back after this call: its part of a text message is copied
      parts.push(this.lease === undefined ? payload : Buffer.from(payload))
    },
    messageEnd: () => {
      const parts = this.textParts
      if (parts === undefined) return this.handlers!.binaryEnd()
      this.textParts = undefined
      let text: string
      try {
        text = strictUtf8.decode(parts.length === 1 ? parts[0]! : Buffer.concat(parts))
      } catch {
        return this.fail(new WebSocketError({ reason: "InvalidPayload", code: CloseCode.InvalidPayload, message: "websocket: a text message that is not UTF-8" }))
      }
      this.handlers!.text(text)
    },
    control: (opcode, payload) => {
      if (opcode === Opcode.Ping) {
        // a peer that pings without reading gets at most `MaxQueuedPongBytes` of pongs queued; pings
        // beyond go unanswered (RFC 6455 §5.5.3 lets an endpoint answer only the latest of several)
        if ((this.state === State.Open || this.state === State.Closing) && this.pongBytesQueued < MaxQueuedPongBytes) {
          const pong = Buffer.from(payload)
          const size = pong.length + 14
          this.pongBytesQueued += size
          this.writeFrame(true, Opcode.Pong, pong, false, () => void (this.pongBytesQueued -= size))
        }
        this.handlers!.ping?.(payload)
      } else if (opcode === Opcode.Pong) this.handlers!.pong?.(payload)
      else this.onCloseFrame(payload)
    }
  }

  private onCloseFrame(payload: Buffer): void {
    this.decoder.stop()
    const read = readClosePayload(payload)
    if (read._tag === "Invalid") {
      return this.fail(new WebSocketError({ reason: read.code === 1007 ? "InvalidPayload" : "ProtocolError", code: read.code, message: read.message }))
    }
    this.peerClose = { code: read.code, reason: read.reason }
    if (this.state === State.Open) {
      // answered with the same code (none when it carried none)
      this.writeControl(Opcode.Close, read.code === CloseCode.NoStatus ? EMPTY : encodeClosePayload(read.code, ""))
    }
    this.finishClose(this.closeTimeoutMs)
  }

  /**
   * The peer's side of the TCP connection ended (after its close frame, or without one: then the
   * close is abnormal). This side ends too (sockets Node's HTTP server hands over allow half-open
   * connections, which a WebSocket has no use for).
   */
  private readonly onSocketEnd = (): void => {
    if (this.socket.writableEnded) return
    this.decoder.stop()
    if (this.state === State.Open || this.state === State.Closing) this.state = State.Ending
    this.socket.end()
    clearTimeout(this.closeTimer)
    this.closeTimer = setTimeout(() => this.socket.destroy(), Duration.toMillis(FailCloseTimeout)).unref()
  }

  private readonly onError = (error: Error): void => {
    this.failure ??= new WebSocketError({ reason: "Abnormal", code: CloseCode.Abnormal, message: `websocket: ${error.message}` })
  }

  private readonly onSocketClose = (): void => {
    if (this.socketGone) return
    this.socketGone = true
    this.state = State.Closed
    clearTimeout(this.closeTimer)
    this.socket.off("data", this.onData)
    this.notifyClosed()
  }

  /**
   * Tells the consumer the connection closed, once: after the input held back while it paused was
   * handed over (a clean end never loses data that arrived before it), at once after a failure.
   */
  private notifyClosed(): void {
    if (this.notified || this.handlers === undefined) return
    if (this.failure === undefined && this.held !== undefined && this.paused) return
    this.notified = true
    this.held = undefined
    this.releaseHeld()
    const peer = this.peerClose
    const error = this.failure ??
      (peer === undefined
        ? new WebSocketError({ reason: "Abnormal", code: CloseCode.Abnormal, message: "websocket: the connection closed without a close frame" })
        : closeError(peer.code, peer.reason))
    this.finalError = error
    this.handlers.closed(error)
  }

  private socketGone = false
  private notified = false

  /** Why the connection closed, once it closed with an error. */
  finalError: WebSocketError | undefined = undefined

  // ------------------------------------------------------------------------------------------
  // closing

  /** Sends a close frame (default 1000) and waits for the peer's, at most the close timeout. */
  close(code: number = CloseCode.Normal, reason = ""): void {
    if (this.state !== State.Open) return
    if (code !== CloseCode.Normal && code !== CloseCode.GoingAway) {
      this.failure ??= closeError(code, reason)
    }
    this.state = State.Closing
    this.writeControl(Opcode.Close, encodeClosePayload(code, reason))
    this.closeTimer = setTimeout(() => this.socket.destroy(), this.closeTimeoutMs).unref()
    // reads go on, to see the peer's close frame
    if (this.paused) {
      this.paused = false
      this.decoder.release()
      const rest = this.held
      const restLease = this.heldLease
      this.held = undefined
      this.heldLease = undefined
      if (rest !== undefined) this.decode(rest, restLease)
      this.socket.resume()
    }
  }

  /**
   * Fails the connection (RFC 6455 §7.1.7): the error's close code goes out, the socket is ended, and
   * a peer that does not close within `FailCloseTimeout` is cut off. Nothing more is read or handed over.
   */
  fail(error: WebSocketError): void {
    if (this.state === State.Closed || this.state === State.Ending) return
    this.failure ??= error
    this.decoder.stop()
    if (this.state === State.Open) this.writeControl(Opcode.Close, encodeClosePayload(error.code ?? CloseCode.InternalError, error.message))
    this.finishClose(Duration.toMillis(FailCloseTimeout))
  }

  /** Destroys the socket at once (a peer deemed dead, or the owner's scope closed); `error` says why. */
  terminate(error?: WebSocketError): void {
    if (error !== undefined) this.failure ??= error
    this.decoder.stop()
    this.socket.destroy()
  }

  private finishClose(timeoutMs: number): void {
    if (this.state === State.Ending || this.state === State.Closed) return
    this.state = State.Ending
    clearTimeout(this.closeTimer)
    this.socket.end()
    this.closeTimer = setTimeout(() => this.socket.destroy(), timeoutMs).unref()
    // the socket must be read for its end to be seen
    this.socket.resume()
  }

  // ------------------------------------------------------------------------------------------
  // writing

  /** A control frame; its payload is copied (pings and pongs echo the decoder's reused buffer). */
  private writeControl(opcode: number, payload: Buffer): void {
    if (this.socket.destroyed || this.socket.writableEnded) return
    this.writeFrame(true, opcode, Buffer.from(payload), false)
  }

  /** One frame; `copy`: the payload belongs to the caller (masking works on a copy). */
  private writeFrame(fin: boolean, opcode: number, payload: Buffer, copy: boolean, done?: (error?: Error | null) => void): void {
    const socket = this.socket
    let key: Uint8Array | undefined
    let body = payload
    if (this.masking === "zero") key = ZERO_KEY
    else if (this.masking === "random") {
      nextMaskKey(this.key)
      key = this.key
      if (copy) body = Buffer.allocUnsafe(payload.length)
      maskInto(payload, key, 0, body, 0)
    }
    const header = encodeFrameHeader(fin, opcode, payload.length, key)
    if (body.length === 0) return void socket.write(header, done)
    socket.cork()
    socket.write(header)
    socket.write(body, done)
    socket.uncork()
  }

  private notOpen(done: ((error?: Error | null) => void) | undefined): false {
    const error = new Error("websocket is not open")
    if (done !== undefined) queueMicrotask(() => done(error))
    return false
  }

  /** Sends a text message; false (and `done` with an error) when the connection is not open. */
  sendText(text: string, done?: (error?: Error | null) => void): boolean {
    if (this.state !== State.Open || this.sendingFragments) return this.notOpen(done)
    this.writeFrame(true, Opcode.Text, Buffer.from(text, "utf8"), false, done)
    return true
  }

  /** Sends `data` as one whole binary message (a copy is masked; `data` stays the caller's). */
  sendBinary(data: Buffer, done?: (error?: Error | null) => void): boolean {
    if (this.state !== State.Open || this.sendingFragments) return this.notOpen(done)
    this.writeFrame(true, Opcode.Binary, data, true, done)
    return true
  }

  /**
   * Sends `payload` as the next frame of a binary message (its last when `fin`). A masking client masks
   * it in place: the caller gives up its contents. Returns whether the socket still holds the payload
   * (queued, not yet written), so its memory must not be reused yet; false, and `done` with an error,
   * when the connection is not open.
   */
  sendFragment(payload: Buffer, fin: boolean, done?: (error?: Error | null) => void): boolean {
    if (this.state !== State.Open) return this.notOpen(done)
    const opcode = this.sendingFragments ? Opcode.Continuation : Opcode.Binary
    this.sendingFragments = !fin
    this.writeFrame(fin, opcode, payload, false, done)
    return this.socket.writableLength > 0
  }

  /**
   * Sends `chunks` as whole binary messages of at most the send limit each (a tunnel's bytes, where
   * message boundaries carry no meaning); the chunks are not modified. `done` runs once written.
   */
  sendMessages(chunks: ReadonlyArray<Uint8Array>, done: (error?: Error | null) => void): boolean {
    if (this.state !== State.Open || this.sendingFragments) return this.notOpen(done)
    this.writer.write(chunks, done)
    return true
  }

  /** Sends a ping (payload at most 125 bytes). */
  ping(payload: Buffer = EMPTY): void {
    if (this.state === State.Open) this.writeControl(Opcode.Ping, payload)
  }
}

const ZERO_KEY = new Uint8Array(4)
