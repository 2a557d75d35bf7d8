/**
 * One yamux stream: its receive buffer and window, its send window, FIN/RST state, and the Effect API
 * (`read`, `write`, `closeWrite`, `reset`, `toDuplex`). The state machine is plain callbacks so the data
 * path costs no fiber hop per chunk; the session (Session.ts) routes frames here and owns the wire.
 */
import { Effect } from "effect"
import type { Duplex } from "node:stream"
import {
  FLAG_ACK,
  FLAG_FIN,
  FLAG_RST,
  type FrameType,
  INITIAL_STREAM_WINDOW,
  TYPE_DATA,
  TYPE_WINDOW_UPDATE
} from "../../domain/Frame.ts"
import { noRelease, ReadLease, type ReadRelease } from "../ReadLease.ts"
import type { Address } from "../Transport.ts"
import { makeStreamDuplex } from "./StreamDuplex.ts"
import { type YamuxError, yamuxError } from "./YamuxError.ts"

/** What a stream needs from its session. */
export interface StreamHost {
  /** Queues one frame for the writer (control frames are never held back). */
  readonly sendFrame: (type: FrameType, flags: number, streamId: number, length: number, body?: Uint8Array) => void
  /** True while the writer's queue is at its bound; Data must wait. */
  readonly queueFull: () => boolean
  /** Calls `f` once the writer's queue has room again (or the session ended). */
  readonly waitQueueSpace: (f: () => void) => void
  /** The largest Data body to put in one frame. */
  readonly maxSendFrame: number
  /**
   * Unread payload accounting across the session. `pending`: the stream is still in the accept
   * backlog, so the bytes are the session's own buffering (which pauses the transport past its bound).
   */
  readonly received: (n: number, pending: boolean) => void
  readonly consumed: (n: number, pending: boolean) => void
  /** A backlog stream was accepted: its `n` unread bytes now belong to the application. */
  readonly adopted: (n: number) => void
  /** The peer acknowledged a stream we opened: it no longer needs the open timeout. */
  readonly acknowledged: (stream: StreamCore) => void
  /** The stream has finished both ways or was reset: forget it. */
  readonly forget: (stream: StreamCore) => void
  /** Window auto-tuning: the largest window a stream may grow to, the session clock and its RTT. */
  readonly maxAutoTuneWindow: number
  readonly now: () => number
  readonly rttMs: () => number | undefined
  /** Addresses of the underlying connection, for sockets built on the stream. */
  readonly localAddress: Address | undefined
  readonly remoteAddress: Address | undefined
  /** Defers a readable notification to the end of the chunk being handled; false when none is. */
  readonly deferReadable: (stream: StreamCore) => boolean
}

/** Marker returned by `tryRead` at end of stream. */
export const EOF: unique symbol = Symbol.for("switchyard/yamux/EOF")
export type ReadResult = Uint8Array | typeof EOF | YamuxError | undefined

interface WriteOp {
  readonly chunk: Uint8Array
  offset: number
  readonly done: (error: YamuxError | undefined) => void
}

/** The protocol state of one stream. Exposed for the session, the duplex adapter and tests. */
export class StreamCore {
  readonly id: number
  readonly host: StreamHost
  /** Our receive window: the credit the peer currently has (never negative, never above recvMax). */
  recvWindow: number
  /** The receive window we maintain for this stream (grows with auto-tuning). */
  recvMax: number
  /** When we last granted window (session clock, ms), for auto-tuning. */
  private lastGrantAt: number
  /** Consumed bytes not yet granted back with a WindowUpdate. */
  pendingGrant = 0
  /** Received, unread chunks (bounded by the window). */
  private recvBuf: Array<Uint8Array> = []
  /** Beside each of `recvBuf`, the hold on the connection read it is a view of, if leased. */
  private recvReleases: Array<ReadRelease | undefined> = []
  private recvHead = 0
  /**
   * The hold on the read the chunk `tryRead` returned last is a view of, when that read is leased: a
   * reader that keeps the chunk past the call may take it (and must then release it once done with
   * the chunk); one that does not take it leaves the read to the collector.
   */
  private lastRelease: ReadRelease | undefined = undefined
  recvBytes = 0
  /** How much Data the peer will still accept from us. */
  sendWindow = INITIAL_STREAM_WINDOW
  /** Opened by us, or accepted by the application (not waiting in the accept backlog). */
  private accepted: boolean
  /** We opened it and the peer has not acknowledged it yet. */
  awaitingAck: boolean
  /** We sent FIN (or will, once queued writes are out). */
  localFin = false
  private finSent = false
  /** The peer sent FIN. */
  remoteFin = false
  /** Reset by either side, or the session ended: the reason reads and writes fail. */
  error: YamuxError | undefined
  /** Reads fail at once (RST) rather than after draining the buffer (session end). */
  private hardError = false
  private forgotten = false
  private writes: Array<WriteOp> = []
  private pumping = false
  private waitingWindow = false
  /** Called when something becomes readable (data, EOF or an error). */
  onReadable: (() => void) | undefined
  /** A readable notification is queued with the host for the end of the chunk. */
  readableDeferred = false
  /** Called once when the stream fails (reset, or the session ended), even if nobody is reading. */
  onFail: ((error: YamuxError, hard: boolean) => void) | undefined

  constructor(host: StreamHost, id: number, recvMax: number, opener: boolean) {
    this.host = host
    this.id = id
    this.recvMax = recvMax
    this.recvWindow = recvMax
    this.lastGrantAt = host.now()
    this.awaitingAck = opener
    this.accepted = opener
  }

  /** Both directions finished, or reset. */
  get finished(): boolean {
    return this.hardError || (this.finSent && this.remoteFin)
  }

  // ---- inbound (from the session's reader) ------------------------------------------------------

  /** A Data or WindowUpdate frame for this stream. Returns a protocol error to end the session. */
  receive(
    type: FrameType,
    flags: number,
    length: number,
    body: Uint8Array | undefined,
    parts?: ReadonlyArray<Uint8Array>,
    release?: ReadRelease
  ): YamuxError | undefined {
    if (flags & FLAG_ACK && this.awaitingAck) {
      this.awaitingAck = false
      this.host.acknowledged(this)
      this.settleAck(undefined)
    }
    if (type === TYPE_DATA) {
      if (length > 0) {
        if (this.remoteFin) return yamuxError("ProtocolError", `Data after FIN on stream ${this.id}`)
        if (length > this.recvWindow) {
          return yamuxError(
            "ProtocolError",
            `Data of ${length} bytes exceeds the receive window of ${this.recvWindow} on stream ${this.id}`
          )
        }
        this.recvWindow -= length
        if (this.error === undefined) {
          if (body !== undefined) {
            this.recvBuf.push(body)
            this.recvReleases.push(release)
          } else {
            // each part holds the frame's hold, released with the last of them
            const shared = release !== undefined && parts!.length > 1 ? new ReadLease(release) : undefined
            for (let i = 0; i < parts!.length; i++) {
              this.recvBuf.push(parts![i]!)
              this.recvReleases.push(shared !== undefined ? shared.retain() : release)
            }
            shared?.release()
          }
          this.recvBytes += length
          this.host.received(length, !this.accepted)
        } else release?.()
      } else release?.()
    } else if (length > 0) {
      this.sendWindow += length
      if (this.waitingWindow) {
        this.waitingWindow = false
        this.pump()
      }
    }
    if (flags & FLAG_RST) {
      this.fail(yamuxError("StreamReset", `stream ${this.id} reset by the peer`), true)
      return undefined
    }
    if (flags & FLAG_FIN && !this.remoteFin) {
      this.remoteFin = true
      if (this.finished) this.forget()
    }
    if ((type === TYPE_DATA || flags & FLAG_FIN) && this.onReadable !== undefined && !this.readableDeferred) {
      // one notification per chunk read from the connection, however many frames it held
      if (this.host.deferReadable(this)) this.readableDeferred = true
      else this.notifyReadable()
    }
    return undefined
  }

  /** The host's deferred notification (see `deferReadable`). */
  flushReadable(): void {
    this.readableDeferred = false
    this.notifyReadable()
  }

  // ---- reading ------------------------------------------------------------------------------------

  /**
   * Takes the hold on the read the chunk `tryRead` returned last is a view of (`noRelease` when that read
   * is not leased). Call it right after `tryRead`, only to keep the chunk past the call; release the
   * hold once done with the chunk.
   */
  takeRelease(): ReadRelease {
    const release = this.lastRelease
    this.lastRelease = undefined
    return release ?? noRelease
  }

  /** The next chunk, EOF, an error, or `undefined` when nothing is there yet. Counts as consumed. */
  tryRead(): ReadResult {
    this.lastRelease = undefined
    if (this.hardError) return this.error
    if (this.recvBytes > 0) {
      const chunk = this.recvBuf[this.recvHead]!
      this.lastRelease = this.recvReleases[this.recvHead]
      this.recvReleases[this.recvHead] = undefined
      this.recvBuf[this.recvHead++] = undefined as unknown as Uint8Array
      if (this.recvHead === this.recvBuf.length) {
        this.recvBuf = []
        this.recvReleases = []
        this.recvHead = 0
      } else if (this.recvHead > 64 && this.recvHead * 2 > this.recvBuf.length) {
        this.recvBuf = this.recvBuf.slice(this.recvHead)
        this.recvReleases = this.recvReleases.slice(this.recvHead)
        this.recvHead = 0
      }
      this.recvBytes -= chunk.length
      this.consume(chunk.length)
      return chunk
    }
    if (this.remoteFin) return EOF
    return this.error
  }

  private consume(n: number): void {
    this.host.consumed(n, !this.accepted)
    this.pendingGrant += n
    // After the peer's FIN (or an error) nothing more will arrive: no point granting window.
    if (this.error !== undefined || this.remoteFin) return
    if (this.pendingGrant * 2 >= this.recvMax) {
      let delta = this.pendingGrant
      this.pendingGrant = 0
      if (this.recvMax < this.host.maxAutoTuneWindow) delta += this.autoTune()
      this.recvWindow += delta
      this.host.sendFrame(TYPE_WINDOW_UPDATE, 0, this.id, delta)
    }
  }

  /**
   * Half the window was consumed within two round trips: the window, not the reader, limits this
   * stream, so double it (the peer learns through the larger delta). Returns the growth.
   */
  private autoTune(): number {
    const now = this.host.now()
    const rtt = this.host.rttMs()
    const keepingUp = rtt !== undefined && now - this.lastGrantAt < 2 * rtt
    this.lastGrantAt = now
    if (!keepingUp) return 0
    const grown = Math.min(this.recvMax * 2, this.host.maxAutoTuneWindow)
    const growth = grown - this.recvMax
    this.recvMax = grown
    return growth
  }

  private notifyReadable(): void {
    const f = this.onReadable
    if (f) {
      this.onReadable = undefined
      f()
    }
  }

  /** Calls `done` with the next chunk, EOF or an error, waiting if needed. Returns a canceller. */
  read(done: (result: Uint8Array | typeof EOF | YamuxError) => void): () => void {
    const attempt = (): void => {
      const r = this.tryRead()
      if (r === undefined) this.onReadable = attempt
      else done(r)
    }
    attempt()
    return () => {
      if (this.onReadable === attempt) this.onReadable = undefined
    }
  }

  // ---- writing ------------------------------------------------------------------------------------

  /** Sends `chunk` within the peer's window; `done` once all of it is queued for the writer. */
  write(chunk: Uint8Array, done: (error: YamuxError | undefined) => void): () => void {
    if (this.error) {
      done(this.error)
      return noop
    }
    if (this.localFin) {
      done(yamuxError("StreamClosed", `write after close on stream ${this.id}`))
      return noop
    }
    const op: WriteOp = { chunk, offset: 0, done }
    this.writes.push(op)
    this.pump()
    return () => {
      const i = this.writes.indexOf(op)
      if (i > 0 || (i === 0 && op.offset === 0 && !this.pumping)) this.writes.splice(i, 1)
    }
  }

  private pump(): void {
    if (this.pumping) return
    this.pumping = true
    try {
      while (this.writes.length > 0) {
        const op = this.writes[0]!
        if (this.error) {
          this.failWrites(this.error)
          return
        }
        if (op.offset >= op.chunk.length) {
          this.writes.shift()
          op.done(undefined)
          continue
        }
        if (this.sendWindow <= 0) {
          this.waitingWindow = true
          return
        }
        if (this.host.queueFull()) {
          this.host.waitQueueSpace(() => this.pump())
          return
        }
        const n = Math.min(this.sendWindow, op.chunk.length - op.offset, this.host.maxSendFrame)
        const body = op.offset === 0 && n === op.chunk.length ? op.chunk : op.chunk.subarray(op.offset, op.offset + n)
        op.offset += n
        this.sendWindow -= n
        this.host.sendFrame(TYPE_DATA, 0, this.id, n, body)
      }
      if (this.localFin && !this.finSent && !this.error) this.sendFin()
    } finally {
      this.pumping = false
    }
  }

  private failWrites(error: YamuxError): void {
    const ops = this.writes
    this.writes = []
    for (const op of ops) op.done(error)
  }

  private sendFin(): void {
    this.finSent = true
    this.host.sendFrame(TYPE_WINDOW_UPDATE, FLAG_FIN, this.id, 0)
    if (this.finished) this.forget()
  }

  /** Half-close: FIN after every queued write. Later writes fail with StreamClosed. */
  closeWrite(): void {
    if (this.localFin || this.error) return
    this.localFin = true
    if (this.writes.length === 0) this.sendFin()
  }

  /** Abort both directions with RST (nothing happens if the stream already finished cleanly). */
  reset(error: YamuxError = yamuxError("StreamReset", `stream ${this.id} reset locally`)): void {
    if (this.hardError || this.finished) return
    if (this.error === undefined) this.host.sendFrame(TYPE_WINDOW_UPDATE, FLAG_RST, this.id, 0)
    this.fail(error, true)
  }

  private ackWaiters: Array<(error: YamuxError | undefined) => void> = []

  /** Calls `done` once the peer has acknowledged the stream (at once if it has, or if we accepted it). */
  whenEstablished(done: (error: YamuxError | undefined) => void): () => void {
    if (!this.awaitingAck) {
      done(undefined)
      return noop
    }
    if (this.error) {
      done(this.error)
      return noop
    }
    this.ackWaiters.push(done)
    return () => {
      const i = this.ackWaiters.indexOf(done)
      if (i >= 0) this.ackWaiters.splice(i, 1)
    }
  }

  private settleAck(error: YamuxError | undefined): void {
    if (this.ackWaiters.length === 0) return
    const ws = this.ackWaiters
    this.ackWaiters = []
    for (const w of ws) w(error)
  }

  /** Ends the stream with `error`. `hard`: drop unread data (RST); otherwise unread data stays readable. */
  fail(error: YamuxError, hard: boolean): void {
    if (this.hardError) return
    if (this.error === undefined || hard) this.error = error
    if (hard) {
      this.hardError = true
      if (this.recvBytes > 0) {
        this.host.consumed(this.recvBytes, !this.accepted)
        // dropped unread: their reads are given back
        for (let i = this.recvHead; i < this.recvReleases.length; i++) this.recvReleases[i]?.()
        this.recvBuf = []
        this.recvReleases = []
        this.recvHead = 0
        this.recvBytes = 0
      }
    }
    this.waitingWindow = false
    this.failWrites(error)
    this.settleAck(this.error)
    this.forget()
    this.notifyReadable()
    const onFail = this.onFail
    if (onFail) {
      this.onFail = undefined
      onFail(this.error!, hard)
    }
  }

  private forget(): void {
    if (this.forgotten) return
    this.forgotten = true
    this.host.forget(this)
  }

  /** The stream was accepted by the application: tell the peer (ACK, plus any extra window). */
  acknowledge(): void {
    this.accepted = true
    this.host.adopted(this.recvBytes)
    if (this.error) return
    this.host.sendFrame(TYPE_WINDOW_UPDATE, FLAG_ACK, this.id, this.recvMax - INITIAL_STREAM_WINDOW)
  }
}

const noop = () => {}

/** One stream, as the rest of switchyard uses it. */
export class YamuxStream {
  readonly id: number
  /** The protocol state; for adapters (the Node duplex) and tests. */
  readonly core: StreamCore
  constructor(core: StreamCore) {
    this.core = core
    this.id = core.id
  }

  /** The next chunk, or `undefined` at end of stream (after the peer's FIN). */
  readonly read = (): Effect.Effect<Uint8Array | undefined, YamuxError> =>
    Effect.callback<Uint8Array | undefined, YamuxError>((resume) => {
      const cancel = this.core.read((r) =>
        resume(r === EOF ? Effect.succeed(undefined) : r instanceof Uint8Array ? Effect.succeed(r) : Effect.fail(r))
      )
      return Effect.sync(cancel)
    })

  /** Writes `chunk`, waiting for the peer's window as needed. Do not modify `chunk` afterwards. */
  readonly write = (chunk: Uint8Array): Effect.Effect<void, YamuxError> =>
    Effect.callback<void, YamuxError>((resume) => {
      const cancel = this.core.write(chunk, (e) => resume(e ? Effect.fail(e) : Effect.void))
      return Effect.sync(cancel)
    })

  /**
   * Waits until the peer acknowledged the stream (its ACK); fails with OpenTimeout when it does not
   * come within the open timeout, or with the stream's error. Reads and writes need not wait for it.
   */
  readonly established = (): Effect.Effect<void, YamuxError> =>
    Effect.callback<void, YamuxError>((resume) => {
      const cancel = this.core.whenEstablished((e) => resume(e ? Effect.fail(e) : Effect.void))
      return Effect.sync(cancel)
    })

  /** Half-close (FIN): we send no more; reading continues until the peer's FIN. */
  readonly closeWrite = (): Effect.Effect<void> => Effect.sync(() => this.core.closeWrite())

  /** Abort (RST) both directions. */
  readonly reset = (): Effect.Effect<void> => Effect.sync(() => this.core.reset())

  /** A Node `Duplex` that behaves like a socket for `http` servers and agents. */
  readonly toDuplex = (): Duplex => makeStreamDuplex(this.core)
}
