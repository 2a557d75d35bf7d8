/**
 * A WebSocket (`ws`) as a Transport `Connection`, so the control-port protocol (handshake + yamux) can
 * run through HTTP-only networks: bytes travel in binary messages of at most `MaxMessageBytes`, reads
 * pause the socket when the consumer is behind, writes report drain by `bufferedAmount`, pings keep
 * proxies from idling the connection out, and close codes become typed errors. Message boundaries carry
 * no meaning; text messages are refused. Dialing (with HTTP proxies) is `WebSocketDial.ts`.
 */
import type * as net from "node:net"
import { Deferred, Duration, Effect, Option } from "effect"
import type { Scope } from "effect"
import { WebSocket } from "ws"
import type { RawData } from "ws"
import { CloseCode, closeError, closeReason, WebSocketError } from "../../domain/WebSocketClose.ts"
import { type Address, type Connection, type ConnectionHandlers, TransportError } from "../Transport.ts"
import type { LendingReads } from "./LendingReads.ts"
import { WebSocketDataTap } from "./WebSocketDataTap.ts"
import { type FrameMasking, WebSocketFrameWriter } from "./WebSocketFrameWriter.ts"

/**
 * Largest message a sender puts on the wire: one full yamux data frame (64 KiB payload and its 12-byte
 * header). Bigger batches are split. Messages near the size of one socket read spare the receiver from
 * assembling (copying) large ones, which measured at half the throughput with 1 MiB messages.
 */
export const MaxMessageBytes = 64 * 1024 + 12
/** Largest message a receiver accepts (`ws`'s `maxPayload`); a bigger one is closed with 1009. */
export const DefaultMaxPayload = 1024 * 1024
/** Bytes queued in `ws` and its socket above which a write's `done` waits for them to go out. */
export const DefaultWriteHighWater = 1024 * 1024
/** Time between pings (0 turns keepalive off). */
export const DefaultKeepaliveInterval: Duration.Duration = Duration.seconds(20)
/** Time a ping has to be answered before the connection is closed as dead. */
export const DefaultKeepaliveTimeout: Duration.Duration = Duration.seconds(10)
/** Chunks smaller than this are joined into one message (one copy); bigger ones go out as they are. */
export const JoinBelowBytes = 4 * 1024
/**
 * Bytes `ws` may still hand over after reads are paused: it parses the socket chunk it already has
 * (one socket read) and may complete one message. Beyond this bound, plus `maxPayload`, the connection
 * is closed rather than buffered.
 */
export const MaxReadAfterPauseSlack = 256 * 1024

export interface WebSocketConnectionOptions {
  readonly maxPayload?: number | undefined
  /** Largest message this side sends (default `MaxMessageBytes`; the peer's `maxPayload` must allow it). */
  readonly maxMessageBytes?: number | undefined
  readonly writeHighWater?: number | undefined
  readonly keepaliveInterval?: Duration.Input | undefined
  readonly keepaliveTimeout?: Duration.Input | undefined
  readonly localAddress?: Address | undefined
  readonly remoteAddress?: Address | undefined
  /** The socket under the WebSocket (from the upgrade): a write batch is corked into one writev on it. */
  readonly socket?: net.Socket | undefined
  /**
   * With `socket`: switchyard writes the binary messages itself (`WebSocketFrameWriter`), masked as
   * given: `random` for a client, `zero` for a client whose operator turned masking off, `none` for a
   * server, and reads the peer's binary frames off the socket itself (`WebSocketDataTap`). Without it,
   * messages go through `ws.send` and `ws`'s receiver.
   */
  readonly masking?: FrameMasking | undefined
  /**
   * With `masking`: `socket` reads through these (see `LendingReads`), and the peer's binary payload is
   * lent to the consumer when it is `lendable`.
   */
  readonly reads?: LendingReads | undefined
}

/** A Connection over a WebSocket, with the typed reason it closed. */
export interface WebSocketConnection extends Connection {
  readonly socket: WebSocket
  /** Why it closed, once it closed with an error (close code, keepalive, refused message). */
  readonly closeError: () => WebSocketError | undefined
}

const sendOptions = { binary: true, compress: false, fin: true } as const
const noop = (): void => {}

/**
 * Groups `chunks` into messages of at most `max` bytes, keeping order: runs of chunks smaller than
 * `joinBelow` (yamux headers, window updates) are joined (one small copy); bigger chunks are never
 * copied, only sliced when over `max`. Empty chunks vanish.
 */
export const packMessages = (chunks: ReadonlyArray<Uint8Array>, max: number, joinBelow: number = JoinBelowBytes): Array<Uint8Array> => {
  if (chunks.length === 1 && chunks[0]!.length <= max) return chunks[0]!.length === 0 ? [] : [chunks[0]!]
  const out: Array<Uint8Array> = []
  let group: Array<Uint8Array> = []
  let size = 0
  const flush = () => {
    if (group.length === 1) out.push(group[0]!)
    else if (group.length > 1) out.push(Buffer.concat(group, size))
    group = []
    size = 0
  }
  for (const c of chunks) {
    if (c.length === 0) continue
    if (c.length >= joinBelow || c.length > max) {
      flush()
      if (c.length <= max) out.push(c)
      else for (let offset = 0; offset < c.length; offset += max) out.push(c.subarray(offset, Math.min(offset + max, c.length)))
      continue
    }
    if (size + c.length > max) flush()
    group.push(c)
    size += c.length
  }
  flush()
  return out
}

const toTransportError = (error: WebSocketError): TransportError =>
  new TransportError({ reason: error.reason === "GoingAway" ? "Closed" : "Io", message: error.message })

const fromWsError = (error: Error & { code?: string }): WebSocketError => {
  switch (error.code) {
    case "WS_ERR_UNSUPPORTED_MESSAGE_LENGTH":
      return new WebSocketError({ reason: "TooLarge", code: CloseCode.TooLarge, message: `websocket: ${error.message}` })
    case "WS_ERR_INVALID_UTF8":
      return new WebSocketError({ reason: "InvalidPayload", code: CloseCode.InvalidPayload, message: `websocket: ${error.message}` })
    case undefined:
      return new WebSocketError({ reason: "Abnormal", code: CloseCode.Abnormal, message: `websocket: ${error.message}` })
    default:
      return error.code.startsWith("WS_ERR_")
        ? new WebSocketError({ reason: "ProtocolError", code: CloseCode.ProtocolError, message: `websocket: ${error.message}` })
        : new WebSocketError({ reason: "Abnormal", code: CloseCode.Abnormal, message: `websocket: ${error.message}` })
  }
}

const closedError = () => new TransportError({ reason: "Closed", message: "websocket closed" })

class WsConnection implements WebSocketConnection {
  readonly socket: WebSocket
  private readonly raw: net.Socket | undefined
  private readonly writer: WebSocketFrameWriter | undefined
  readonly localAddress: Address | undefined
  readonly remoteAddress: Address | undefined
  readonly lendsReads: boolean
  private handlers: ConnectionHandlers | undefined
  /** Reads are held back (before `start`, and while the consumer asked for a pause). */
  private paused = true
  /** Messages `ws` delivered while paused, handed over on resume (bounded by `pendingLimit`). */
  private readonly pending: Array<Buffer> = []
  private pendingBytes = 0
  private readonly pendingLimit: number
  private readonly highWater: number
  private readonly maxMessage: number
  private isClosed = false
  private ending = false
  /** The close happened but is held back behind pending data (clean closes only). */
  private closeHeld = false
  private closeDelivered = false
  private failure: WebSocketError | undefined
  private finalError: WebSocketError | undefined
  /** Writes waiting for their messages to go out. */
  private readonly drainWaiters = new Set<(error?: TransportError) => void>()
  /** Set while a ping is unanswered. */
  onPong: (() => void) | undefined

  constructor(ws: WebSocket, options: WebSocketConnectionOptions) {
    this.socket = ws
    this.raw = options.socket
    this.localAddress = options.localAddress
    this.remoteAddress = options.remoteAddress
    this.pendingLimit = (options.maxPayload ?? DefaultMaxPayload) + MaxReadAfterPauseSlack
    this.highWater = options.writeHighWater ?? DefaultWriteHighWater
    this.maxMessage = options.maxMessageBytes ?? MaxMessageBytes
    this.writer = options.socket !== undefined && options.masking !== undefined
      ? new WebSocketFrameWriter(options.socket, options.masking, this.maxMessage)
      : undefined
    ws.binaryType = "nodebuffer"
    ws.pause()
    const tap = options.masking === undefined
      ? undefined
      : WebSocketDataTap.install(ws, options.maxPayload ?? DefaultMaxPayload, options.masking === "none", this.deliver)
    const reads = options.reads
    this.lendsReads = reads !== undefined && tap !== undefined
    if (reads !== undefined) {
      const raw = options.socket
      reads.attach(
        tap !== undefined
          ? { lendable: true, onData: tap.read, onEnd: noop, onClose: noop }
          // `ws` reads it all, from `data` events as on any socket; it keeps what it is given
          : { onData: (chunk) => void raw?.emit("data", chunk), onEnd: noop, onClose: noop }
      )
    }
    ws.on("message", this.onMessage)
    ws.on("pong", () => this.onPong?.())
    ws.on("error", (e: Error) => {
      this.failure ??= fromWsError(e)
    })
    ws.once("close", (code: number, reason: Buffer) => this.onSocketClose(code, reason.toString("utf8")))
    if (ws.readyState === WebSocket.CLOSED) this.onSocketClose(CloseCode.Abnormal, "closed before use")
  }

  private readonly onMessage = (data: RawData, isBinary: boolean): void => {
    // after a failure nothing more is delivered; reading goes on only to see the peer's close frame
    if (this.isClosed || this.failure !== undefined) return
    if (!isBinary) {
      return this.fail(new WebSocketError({ reason: "UnsupportedData", code: CloseCode.UnsupportedData, message: "websocket: a text message on a tunnel connection" }))
    }
    this.deliver(data as Buffer)
  }

  /**
   * Binary payload, from `ws`'s messages or read off the socket by the tap; returns whether a reference
   * to `chunk` is kept (held while paused, or kept by the consumer).
   */
  private readonly deliver = (chunk: Buffer): boolean => {
    if (this.isClosed || this.failure !== undefined || chunk.length === 0) return false
    if (this.paused || this.pending.length > 0 || this.handlers === undefined) {
      this.pending.push(chunk)
      this.pendingBytes += chunk.length
      if (this.pendingBytes > this.pendingLimit) {
        this.fail(new WebSocketError({ reason: "ReadOverflow", code: CloseCode.InternalError, message: `websocket: more than ${this.pendingLimit} bytes arrived while reads were paused` }))
      }
      return true
    }
    const h = this.handlers
    const kept = h.onData(chunk)
    return h.lendable !== true || kept === true
  }

  /**
   * Fails the connection with `error`; the close event reports it. With `terminate` (a peer deemed
   * dead) the socket is destroyed at once; otherwise the error's close code is sent and reads resume
   * so that the peer's close frame can end it (`ws` destroys the socket if none comes in time).
   */
  fail(error: WebSocketError, terminate = false): void {
    if (this.isClosed) return
    this.failure ??= error
    if (!terminate && this.socket.readyState === WebSocket.OPEN) {
      this.socket.close(error.code ?? CloseCode.InternalError, closeReason(error.message))
      this.socket.resume()
    } else this.socket.terminate()
  }

  private onSocketClose(code: number, reason: string): void {
    if (this.isClosed) return
    this.isClosed = true
    this.finalError = this.failure ?? closeError(code, reason)
    const error = this.finalError === undefined ? closedError() : toTransportError(this.finalError)
    const waiters = [...this.drainWaiters]
    this.drainWaiters.clear()
    for (const w of waiters) w(error)
    this.onPong?.()
    // a clean close waits behind data the consumer has not taken yet; a failed one is reported at once
    if (this.finalError === undefined && (this.paused || this.pending.length > 0)) this.closeHeld = true
    else this.deliverClose()
  }

  private deliverClose(): void {
    const h = this.handlers
    if (h === undefined || this.closeDelivered) return
    this.closeDelivered = true
    this.closeHeld = false
    this.pending.length = 0
    this.pendingBytes = 0
    if (this.finalError === undefined) {
      h.onEnd()
      h.onClose(undefined)
    } else h.onClose(toTransportError(this.finalError))
  }

  readonly start = (handlers: ConnectionHandlers): void => {
    this.handlers = handlers
    this.resume()
  }

  readonly pause = (): void => {
    if (this.paused) return
    this.paused = true
    this.socket.pause()
  }

  readonly resume = (): void => {
    const h = this.handlers
    if (h === undefined) return
    this.paused = false
    while (!this.paused && this.pending.length > 0 && !this.closeDelivered) {
      const chunk = this.pending.shift()!
      this.pendingBytes -= chunk.length
      h.onData(chunk)
    }
    if (this.paused) return
    if (this.isClosed) {
      if (!this.closeDelivered && (this.closeHeld || this.finalError !== undefined)) this.deliverClose()
      return
    }
    this.socket.resume()
  }

  readonly write = (chunks: ReadonlyArray<Uint8Array>, done: (error?: TransportError) => void): void => {
    const ws = this.socket
    if (this.isClosed || this.ending || ws.readyState !== WebSocket.OPEN) {
      queueMicrotask(() => done(closedError()))
      return
    }
    let waiting = false
    const waiter = (error?: TransportError) => {
      if (!waiting) return
      waiting = false
      this.drainWaiters.delete(waiter)
      done(error)
    }
    const written = (error?: Error | null) =>
      waiter(error ? new TransportError({ reason: "Io", message: `websocket write failed: ${error.message}` }) : undefined)
    const writer = this.writer
    if (writer !== undefined) writer.write(chunks, written)
    else {
      const messages = packMessages(chunks, this.maxMessage)
      if (messages.length === 0) {
        queueMicrotask(() => done())
        return
      }
      const last = messages.length - 1
      const raw = last > 0 ? this.raw : undefined
      raw?.cork()
      for (let i = 0; i < last; i++) ws.send(messages[i]!, sendOptions)
      ws.send(messages[last]!, sendOptions, written)
      raw?.uncork()
    }
    if (ws.bufferedAmount <= this.highWater) queueMicrotask(() => done())
    else {
      waiting = true
      this.drainWaiters.add(waiter)
    }
  }

  readonly end = (): void => {
    if (this.isClosed || this.ending) return
    this.ending = true
    this.socket.close(CloseCode.Normal)
  }

  readonly destroy = (): void => {
    this.socket.terminate()
  }

  readonly closed = (): boolean => this.isClosed

  readonly closeError = (): WebSocketError | undefined => this.finalError
}

/**
 * Pings every `interval`; a ping unanswered within `timeout` closes the connection with
 * `KeepaliveTimeout`. While reads are paused (by the consumer) a late pong is not held against the peer.
 */
const keepalive = (conn: WsConnection, interval: Duration.Duration, timeout: Duration.Duration): Effect.Effect<void> =>
  Effect.gen(function*() {
    for (;;) {
      yield* Effect.sleep(interval)
      if (conn.closed()) return
      const pong = Deferred.makeUnsafe<void>()
      conn.onPong = () => void Deferred.doneUnsafe(pong, Effect.void)
      conn.socket.ping()
      const answered = yield* Deferred.await(pong).pipe(Effect.timeoutOption(timeout))
      conn.onPong = undefined
      if (conn.closed()) return
      if (Option.isNone(answered) && !conn.socket.isPaused) {
        conn.fail(new WebSocketError({
          reason: "KeepaliveTimeout",
          code: CloseCode.GoingAway,
          message: `websocket: no pong within ${Duration.format(timeout)}`
        }), true)
        return
      }
    }
  })

/**
 * Wraps an open WebSocket. Keepalive runs in the scope; closing the scope terminates the WebSocket.
 * Reads start when the consumer calls `start`.
 */
export const fromWebSocket = (
  ws: WebSocket,
  options: WebSocketConnectionOptions = {}
): Effect.Effect<WebSocketConnection, never, Scope.Scope> =>
  Effect.gen(function*() {
    const conn = new WsConnection(ws, options)
    yield* Effect.addFinalizer(() => Effect.sync(() => ws.terminate()))
    const interval = Duration.fromInputUnsafe(options.keepaliveInterval ?? DefaultKeepaliveInterval)
    const timeout = Duration.fromInputUnsafe(options.keepaliveTimeout ?? DefaultKeepaliveTimeout)
    if (Duration.toMillis(interval) > 0) yield* Effect.forkScoped(keepalive(conn, interval, timeout))
    return conn
  })
