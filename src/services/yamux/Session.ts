/**
 * A yamux session over one Connection, byte-compatible with hashicorp/yamux: stream ids, accept
 * backlog, flow control, keepalive, GoAway, and one shutdown path that sends GoAway(protocol error)
 * when the peer breaks the rules. Frames are parsed and routed, and the single writer drains its queue,
 * by plain callbacks (the hot path, no fiber hop per frame); the write-timeout watchdog, the keepalive and
 * the open-timeout sweeper are fibers in the session's Scope, which ends everything when it closes.
 */
import { Cause, Clock, Duration, Effect, Scope } from "effect"
import * as F from "../../domain/Frame.ts"
import { type FrameParser, makeFrameParser } from "../../domain/FrameCodec.ts"
import { TokenBucket } from "../../domain/RateLimit.ts"
import type { ReadHolds, ReadRelease } from "../ReadLease.ts"
import type { Connection, TransportError } from "../Transport.ts"
import { type AssembledBatch, FrameAssembler } from "./FrameAssembler.ts"
import { StreamCore, type StreamHost, YamuxStream } from "./Stream.ts"
import { resolveYamuxConfig, type YamuxConfig } from "./YamuxConfig.ts"
import { YamuxError, yamuxError } from "./YamuxError.ts"

export type YamuxRole = "client" | "server"

export interface SessionOptions {
  /** client: opens odd stream ids; server: even ones. Independent of who dialed. */
  readonly role: YamuxRole
  readonly config?: Partial<YamuxConfig> | undefined
}

/** The session as others use it. */
export interface YamuxSession {
  readonly role: YamuxRole
  readonly config: YamuxConfig
  /** Opens a stream (sends SYN at once; the ACK must come within the open timeout or the stream resets). */
  readonly open: () => Effect.Effect<YamuxStream, YamuxError>
  /** The next stream the peer opened (sends its ACK). */
  readonly accept: () => Effect.Effect<YamuxStream, YamuxError>
  /** Round-trip time of one Ping. */
  readonly ping: () => Effect.Effect<Duration.Duration, YamuxError>
  /** Sends GoAway (normal by default): no new streams either way from now on. */
  readonly goAway: (code?: F.GoAwayCode) => Effect.Effect<void>
  /** Succeeds when the session ends cleanly (local close, or the peer's GoAway then EOF); fails with why otherwise. */
  readonly closed: Effect.Effect<void, YamuxError>
  /** Live streams (open, or waiting in the accept backlog). */
  readonly streamCount: Effect.Effect<number>
  /** Plain accessors and callbacks for adapters that do not run Effects per call (Node servers, agents). */
  readonly core: SessionCore
}

type Outcome = { readonly error: YamuxError | undefined; readonly clean: boolean }

/**
 * The session state machine. Everything here is synchronous and callback-driven; the fibers created by
 * `make` only keep time (write timeout, keepalive, open timeout).
 */
export class SessionCore implements StreamHost {
  readonly role: YamuxRole
  readonly config: YamuxConfig
  readonly conn: Connection
  readonly maxSendFrame: number
  readonly maxAutoTuneWindow: number
  /** Latest measured round-trip time in ms (from pings), for window auto-tuning. */
  rtt: number | undefined
  readonly rttMs = (): number | undefined => this.rtt
  readonly localAddress
  readonly remoteAddress
  /** Live streams by id. */
  readonly streams = new Map<number, StreamCore>()
  private nextId: number
  /** Highest stream id the peer has opened. */
  private highestPeerId = 0
  /** Live streams the peer opened (bounded by `maxPeerStreams`). */
  private peerStreams = 0
  /** The peer's stream opens and frames against their rate limits, when configured (made by `start`). */
  private openBucket: TokenBucket | undefined = undefined
  private frameBucket: TokenBucket | undefined = undefined
  /** Told once when the peer sends GoAway(normal). */
  private remoteGoAwayListeners: Array<() => void> = []
  private readonly parser: FrameParser
  /** Inbound streams waiting for accept (bounded by acceptBacklog). */
  private backlog: Array<StreamCore> = []
  private acceptWaiters: Array<(s: StreamCore | YamuxError) => void> = []
  /** Frames waiting for the writer, copied into its slabs. */
  private readonly out = new FrameAssembler()
  /** The batch being written, whose slabs come back once the transport releases it. */
  private batchInFlight: AssembledBatch | undefined = undefined
  private spaceWaiters: Array<() => void> = []
  private pings = new Map<number, (error: YamuxError | undefined) => void>()
  private nextPingId = 0
  /** Streams we opened, in open order, for the open-timeout sweeper. */
  /** Opened, not yet acknowledged streams and their deadlines, in open order (so in deadline order). */
  private pendingOpens = new Map<StreamCore, number>()
  private sweeperWake: (() => void) | undefined
  /** Unread payload across all streams (bounded by their windows; a metric). */
  private unread = 0
  /**
   * Unread payload in streams still waiting in the accept backlog: the session's own buffering. Past
   * `sessionReadBuffer` the transport is paused until the application accepts. (Accepted streams are
   * bounded by their windows instead: pausing the transport for them could starve the WindowUpdates
   * their own writers wait for.)
   */
  private backlogUnread = 0
  private readPaused = false
  localGoAway = false
  remoteGoAway = false
  /** Why the session ended; set once. */
  outcome: Outcome | undefined
  private closedListeners: Array<(o: Outcome) => void> = []
  private connClosedListeners: Array<() => void> = []
  /** A chunk is being handled: readable notifications wait for its end. */
  private handling = false
  /** Where streams take holds on the read being handled, when the connection leases its reads. */
  private readHolds: ReadHolds | undefined = undefined
  /** Holds on the reads the parts of an incomplete Data frame are views of. */
  private partHolds: Array<ReadRelease> = []
  /** While a frame split across reads is handed on: the holds on the earlier reads its parts came from. */
  private frameParts: Array<ReadRelease> | undefined = undefined
  private readableStreams: Array<StreamCore> = []
  /** Virtual or real time in ms, from the session's Clock (so TestClock drives timeouts). */
  now: () => number = () => Date.now()

  constructor(conn: Connection, role: YamuxRole, config: YamuxConfig) {
    this.conn = conn
    this.role = role
    this.config = config
    this.maxSendFrame = config.maxSendFrame
    this.maxAutoTuneWindow = config.maxAutoTuneWindow
    this.localAddress = conn.localAddress
    this.remoteAddress = conn.remoteAddress
    this.nextId = role === "client" ? 1 : 2
    this.parser = makeFrameParser({ maxFrameSize: config.maxFrameSize, zeroCopy: true })
  }

  // ---- reading --------------------------------------------------------------------------------------

  /** Starts reading from the connection. */
  start(): void {
    const { peerFrameRate, peerStreamOpenRate } = this.config
    if (peerStreamOpenRate !== undefined) this.openBucket = new TokenBucket(peerStreamOpenRate, this.now())
    if (peerFrameRate !== undefined) this.frameBucket = new TokenBucket(peerFrameRate, this.now())
    this.conn.start({
      onData: (chunk, holds) => this.onChunk(chunk, holds),
      onEnd: () => {
        this.onTransportEnd(undefined)
        // The peer will send nothing more and the session is over: finish our side too.
        this.conn.end()
      },
      onClose: (error) => {
        this.onTransportEnd(error)
        const ls = this.connClosedListeners
        this.connClosedListeners = []
        for (const l of ls) l()
      },
      // streams keep the views of frames they received under holds on their reads
      retainsReads: true
    })
  }

  private onTransportEnd(error: TransportError | undefined): void {
    if (this.outcome) return
    if (error) this.terminate(yamuxError("TransportError", `connection failed: ${error.message}`), undefined)
    else if (this.remoteGoAway) this.terminateClean(yamuxError("RemoteGoAway", "the peer went away"))
    else this.terminate(yamuxError("RemoteClosed", "the connection was closed by the peer"), undefined)
  }

  /**
   * Handles one chunk read from the connection. Streams that became readable hear of it once, after
   * every frame in the chunk was taken in, so a reader gets all of a stream's new data in one turn.
   */
  onChunk(chunk: Uint8Array, holds?: ReadHolds): void {
    if (this.outcome) return
    const outer = this.handling
    const outerHolds = this.readHolds
    this.handling = true
    this.readHolds = holds
    const { error, frames } = this.parser.push(chunk)
    // Holds on the reads the parts of a Data frame split across reads are views of: the frame this read
    // completes takes those held so far (`carried`); a frame it leaves incomplete keeps parts of this
    // read in the parser, held from now (before any frame is handed on, so a nested read sees them)
    // until the frame is complete and handed to its stream.
    // (a part copied out of the read, as small ones are, needs no hold on it)
    const earlier = this.partHolds
    const stillHeld = this.parser.holdsParts()
    const next = holds !== undefined && stillHeld && this.parser.keepsViewOf(chunk) ? holds.retain() : undefined
    let carried: Array<ReadRelease> = []
    if (frames.some((f) => f.parts !== undefined)) {
      carried = earlier
      this.partHolds = next === undefined ? [] : [next]
    } else if (stillHeld) {
      if (next !== undefined) earlier.push(next)
    } else {
      this.partHolds = []
      for (const release of earlier) release()
    }
    const frameBucket = this.frameBucket
    if (frameBucket !== undefined && frames.length > 0 && !frameBucket.take(this.now(), frames.length)) {
      this.rateExceeded("FrameRateExceeded", `the peer sent frames faster than ${frameBucket.limit.perSecond} per second`)
    }
    for (let i = 0; i < frames.length && this.outcome === undefined; i++) {
      const frame = frames[i]!
      const parts = frame.parts !== undefined ? carried : undefined
      this.frameParts = parts
      const problem = this.dispatch(frame)
      this.frameParts = undefined
      // the parts of a frame no stream took (discarded, or refused) are not held for it
      if (parts !== undefined) for (const release of parts.splice(0)) release()
      if (problem) this.protocolError(problem.message)
    }
    if (error && this.outcome === undefined) this.protocolError(error.message)
    this.readHolds = outerHolds
    this.handling = outer
    if (outer) return
    const ready = this.readableStreams
    if (ready.length > 0) {
      this.readableStreams = []
      for (let i = 0; i < ready.length; i++) ready[i]!.flushReadable()
    }
  }

  /**
   * The hold a stream keeps on the reads a Data frame's body is a view of (the read being handled, and
   * those a frame split across reads began in); undefined when reads are not leased.
   */
  private frameRelease(f: F.Frame): ReadRelease | undefined {
    if (f.type !== F.TYPE_DATA || f.length === 0) return undefined
    const current = this.readHolds?.retain()
    const earlier = f.parts === undefined ? undefined : this.frameParts?.splice(0)
    if (earlier === undefined || earlier.length === 0) return current
    return () => {
      current?.()
      for (const release of earlier) release()
    }
  }

  deferReadable(stream: StreamCore): boolean {
    if (!this.handling) return false
    this.readableStreams.push(stream)
    return true
  }

  private protocolError(message: string): void {
    this.terminate(yamuxError("ProtocolError", message), F.GO_AWAY_PROTOCOL_ERROR)
  }

  /** A rate limit on the peer was exceeded: GoAway(protocol error), with the limit as the reason. */
  private rateExceeded(reason: "StreamOpenRateExceeded" | "FrameRateExceeded", message: string): void {
    this.terminate(yamuxError(reason, message), F.GO_AWAY_PROTOCOL_ERROR)
  }

  private dispatch(f: F.Frame): YamuxError | undefined {
    switch (f.type) {
      case F.TYPE_DATA:
      case F.TYPE_WINDOW_UPDATE:
        return this.onStreamFrame(f)
      case F.TYPE_PING:
        return this.onPing(f)
      case F.TYPE_GO_AWAY:
        return this.onGoAway(f)
    }
  }

  private isOurs(id: number): boolean {
    return (id & 1) === (this.role === "client" ? 1 : 0)
  }

  private onStreamFrame(f: F.Frame): YamuxError | undefined {
    const id = f.streamId
    if (id === F.SESSION_STREAM_ID) return yamuxError("ProtocolError", `${F.typeName(f.type)} frame on stream 0`)
    if (f.flags & F.FLAG_SYN) return this.onSyn(f)
    const stream = this.streams.get(id)
    if (stream) return stream.receive(f.type, f.flags, f.length, f.body, f.parts, this.frameRelease(f))
    // hashicorp/yamux discards frames for streams it just closed or reset: so do we. Ids never opened are errors.
    const seen = this.isOurs(id) ? id < this.nextId : id <= this.highestPeerId
    if (seen) return undefined
    return yamuxError("ProtocolError", `${F.typeName(f.type)} frame for stream ${id}, which was never opened`)
  }

  private onSyn(f: F.Frame): YamuxError | undefined {
    const id = f.streamId
    if (this.isOurs(id)) return yamuxError("ProtocolError", `SYN for stream ${id}, which has our parity`)
    if (this.streams.has(id)) return yamuxError("ProtocolError", `SYN for stream ${id}, which is already open`)
    if (id > this.highestPeerId) this.highestPeerId = id
    // every SYN counts against the open rate, refused ones too: refusing is cheap, not free
    const openBucket = this.openBucket
    if (openBucket !== undefined && !openBucket.take(this.now(), 1)) {
      this.rateExceeded("StreamOpenRateExceeded", `the peer opened streams faster than ${openBucket.limit.perSecond} per second`)
      return undefined
    }
    if (
      this.localGoAway || this.backlog.length >= this.config.acceptBacklog || this.streams.size >= this.config.maxStreams ||
      this.peerStreams >= this.config.maxPeerStreams
    ) {
      // refused before anything is allocated for it
      this.sendFrame(F.TYPE_WINDOW_UPDATE, F.FLAG_RST, id, 0)
      return undefined
    }
    const stream = new StreamCore(this, id, this.config.maxStreamWindow, false)
    this.streams.set(id, stream)
    this.peerStreams++
    const problem = stream.receive(f.type, f.flags & ~F.FLAG_SYN, f.length, f.body, f.parts, this.frameRelease(f))
    if (problem) return problem
    const waiter = this.acceptWaiters.shift()
    if (waiter) {
      stream.acknowledge()
      waiter(stream)
    } else {
      this.backlog.push(stream)
    }
    return undefined
  }

  private onPing(f: F.Frame): YamuxError | undefined {
    if (f.streamId !== F.SESSION_STREAM_ID) return yamuxError("ProtocolError", `Ping on stream ${f.streamId}`)
    if (f.flags & F.FLAG_SYN) this.sendFrame(F.TYPE_PING, F.FLAG_ACK, F.SESSION_STREAM_ID, f.length)
    if (f.flags & F.FLAG_ACK) {
      const waiter = this.pings.get(f.length)
      if (waiter) {
        this.pings.delete(f.length)
        waiter(undefined)
      }
    }
    return undefined
  }

  private onGoAway(f: F.Frame): YamuxError | undefined {
    if (f.streamId !== F.SESSION_STREAM_ID) return yamuxError("ProtocolError", `GoAway on stream ${f.streamId}`)
    switch (f.length) {
      case F.GO_AWAY_NORMAL:
        if (!this.remoteGoAway) {
          this.remoteGoAway = true
          for (const l of this.remoteGoAwayListeners.splice(0)) l()
        }
        return undefined
      case F.GO_AWAY_PROTOCOL_ERROR:
        this.terminate(yamuxError("RemoteError", "the peer reported a protocol error (GoAway)"), undefined)
        return undefined
      case F.GO_AWAY_INTERNAL_ERROR:
        this.terminate(yamuxError("RemoteError", "the peer reported an internal error (GoAway)"), undefined)
        return undefined
      default:
        return yamuxError("ProtocolError", `unknown GoAway code ${f.length}`)
    }
  }

  // ---- StreamHost -------------------------------------------------------------------------------------

  sendFrame(type: F.FrameType, flags: number, streamId: number, length: number, body?: Uint8Array): void {
    if (this.outcome) return
    this.out.frame(type, flags, streamId, length, body)
    if (!this.flushScheduled && !this.writing) {
      // Frames queued in the same turn leave together, as one batched write.
      this.flushScheduled = true
      setImmediate(this.flushBound)
    }
    // Control frames are never refused; if they pile up (a peer that pings without reading) stop reading.
    if (this.out.bytes > 2 * this.config.writeQueueBytes) this.updatePause()
  }

  queueFull(): boolean {
    return this.out.bytes >= this.config.writeQueueBytes
  }

  waitQueueSpace(f: () => void): void {
    this.spaceWaiters.push(f)
  }

  received(n: number, pending: boolean): void {
    this.unread += n
    if (pending) {
      this.backlogUnread += n
      if (this.backlogUnread > this.config.sessionReadBuffer) this.updatePause()
    }
  }

  consumed(n: number, pending: boolean): void {
    this.unread -= n
    if (pending) this.backlogUnread -= n
    if (this.readPaused) this.updatePause()
  }

  adopted(n: number): void {
    this.backlogUnread -= n
    if (this.readPaused) this.updatePause()
  }

  forget(stream: StreamCore): void {
    if (this.streams.get(stream.id) === stream) {
      this.streams.delete(stream.id)
      if (!this.isOurs(stream.id)) this.peerStreams--
    }
    this.pendingOpens.delete(stream)
  }

  private updatePause(): void {
    const wantPause = this.backlogUnread > this.config.sessionReadBuffer ||
      this.out.bytes > 2 * this.config.writeQueueBytes
    const canResume = this.backlogUnread <= this.config.sessionReadBuffer / 2 &&
      this.out.bytes <= this.config.writeQueueBytes
    if (wantPause && !this.readPaused) {
      this.readPaused = true
      this.conn.pause()
    } else if (this.readPaused && canResume && !this.outcome) {
      this.readPaused = false
      this.conn.resume()
    }
  }

  // ---- the writer ---------------------------------------------------------------------------------------
  // One writer per connection: a single drain loop, at most one batch in flight, driven by the
  // transport's completion callback (no fiber hop per batch). The watchdog fiber enforces the timeout.

  private flushScheduled = false
  private writing = false
  /** Batches started / completed, and when the one in flight started (session clock, ms). */
  private writesStarted = 0
  private writesDone = 0
  private writeStartedAt = 0
  private watchdogWake: (() => void) | undefined
  private readonly flushBound = () => this.flush()

  private flush(): void {
    this.flushScheduled = false
    if (this.writing || this.out.bytes === 0 || this.conn.closed()) return
    const batch = this.out.take()
    this.batchInFlight = batch
    this.writing = true
    this.writesStarted++
    this.writeStartedAt = this.now()
    const wake = this.watchdogWake
    if (wake) {
      this.watchdogWake = undefined
      wake()
    }
    this.conn.write(batch.chunks, this.onWritten)
  }

  private readonly onWritten = (error?: TransportError): void => {
    this.writing = false
    this.writesDone++
    const batch = this.batchInFlight
    this.batchInFlight = undefined
    if (batch !== undefined && error === undefined && this.conn.releasesOnDone === true) this.out.release(batch)
    if (error) {
      this.terminate(yamuxError("TransportError", `write failed: ${error.message}`), undefined)
      this.conn.destroy()
      return
    }
    if (this.readPaused) this.updatePause()
    while (this.spaceWaiters.length > 0 && !this.queueFull()) {
      const ws = this.spaceWaiters
      this.spaceWaiters = []
      for (const w of ws) w()
    }
    if (this.out.bytes > 0) this.flush()
    else if (this.outcome && this.outcome.error !== undefined) this.conn.end() // the GoAway is out
  }

  /**
   * For the watchdog: the batch in flight as `{ seq, startedAt }`, or waits (via `wake`) until one is.
   */
  inFlight(wake: () => void): { readonly seq: number; readonly startedAt: number } | undefined {
    if (this.writing) return { seq: this.writesStarted, startedAt: this.writeStartedAt }
    if (this.outcome) return undefined
    this.watchdogWake = wake
    return undefined
  }

  /** True when batch `seq` has completed. */
  written(seq: number): boolean {
    return this.writesDone >= seq
  }

  /** Takes everything queued (`undefined` when nothing is); used once by the final close. */
  takeBatch(): ReadonlyArray<Uint8Array> | undefined {
    if (this.out.bytes === 0) return undefined
    return this.out.take().chunks
  }

  // ---- opening and accepting ---------------------------------------------------------------------------

  /** Opens a stream now (sends SYN), or says why it cannot. */
  openStream(): StreamCore | YamuxError {
    if (this.outcome) return this.outcome.error ?? yamuxError("SessionClosed", "the session is closed")
    if (this.localGoAway) return yamuxError("LocalGoAway", "this session sent GoAway; no new streams")
    if (this.remoteGoAway) return yamuxError("RemoteGoAway", "the peer sent GoAway; no new streams")
    if (this.streams.size >= this.config.maxStreams) {
      return yamuxError("TooManyStreams", `the session already has ${this.streams.size} streams`)
    }
    const id = this.nextId
    if (id > F.MAX_STREAM_ID) return yamuxError("StreamsExhausted", "no stream ids left in this session")
    this.nextId += 2
    const stream = new StreamCore(this, id, this.config.maxStreamWindow, true)
    this.streams.set(id, stream)
    this.sendFrame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, id, this.config.maxStreamWindow - F.INITIAL_STREAM_WINDOW)
    this.pendingOpens.set(stream, this.now() + this.config.streamOpenTimeoutMs)
    const wake = this.sweeperWake
    if (wake) {
      this.sweeperWake = undefined
      wake()
    }
    return stream
  }

  /** Hands the next inbound stream to `done` (now or later); returns a canceller. */
  acceptStream(done: (s: StreamCore | YamuxError) => void): () => void {
    const s = this.backlog.shift()
    if (s) {
      s.acknowledge()
      done(s)
      return noop
    }
    if (this.outcome) {
      done(this.outcome.error ?? yamuxError("SessionClosed", "the session is closed"))
      return noop
    }
    this.acceptWaiters.push(done)
    return () => {
      const i = this.acceptWaiters.indexOf(done)
      if (i >= 0) this.acceptWaiters.splice(i, 1)
    }
  }

  /** Resets opened streams whose ACK is overdue; returns the next deadline, if any. */
  sweepOpens(): number | undefined {
    const now = this.now()
    for (const [stream, deadline] of this.pendingOpens) {
      if (deadline > now) return deadline
      this.pendingOpens.delete(stream)
      stream.reset(yamuxError("OpenTimeout", `stream ${stream.id} was not acknowledged in time`))
    }
    return undefined
  }

  whenOpenPending(f: () => void): void {
    if (this.pendingOpens.size > 0 || this.outcome) f()
    else this.sweeperWake = f
  }

  acknowledged(stream: StreamCore): void {
    this.pendingOpens.delete(stream)
  }

  // ---- ping and GoAway --------------------------------------------------------------------------------

  sendPing(done: (error: YamuxError | undefined) => void): () => void {
    if (this.outcome) {
      done(this.outcome.error ?? yamuxError("SessionClosed", "the session is closed"))
      return noop
    }
    const id = this.nextPingId
    this.nextPingId = (this.nextPingId + 1) >>> 0
    this.pings.set(id, done)
    this.sendFrame(F.TYPE_PING, F.FLAG_SYN, F.SESSION_STREAM_ID, id)
    return () => {
      this.pings.delete(id)
    }
  }

  goAway(code: F.GoAwayCode): void {
    if (this.outcome || this.localGoAway) return
    this.localGoAway = true
    this.sendFrame(F.TYPE_GO_AWAY, 0, F.SESSION_STREAM_ID, code)
  }

  // ---- the end ----------------------------------------------------------------------------------------

  /** The one exit path: ends every stream and waiter with `error`; queues GoAway(`code`) when given. */
  terminate(error: YamuxError, code: F.GoAwayCode | undefined): void {
    this.finish({ error, clean: false }, code)
  }

  private terminateClean(streamError: YamuxError): void {
    this.finish({ error: undefined, clean: true }, undefined, streamError)
  }

  /** Local close: GoAway(normal) and a clean outcome. */
  closeLocally(): void {
    if (this.outcome) return
    this.finish(
      { error: undefined, clean: true },
      this.localGoAway ? undefined : F.GO_AWAY_NORMAL,
      yamuxError("SessionClosed", "the session was closed")
    )
  }

  private finish(outcome: Outcome, code: F.GoAwayCode | undefined, streamError?: YamuxError): void {
    if (this.outcome) return
    if (code !== undefined) {
      this.localGoAway = true
      this.sendFrame(F.TYPE_GO_AWAY, 0, F.SESSION_STREAM_ID, code)
    }
    this.outcome = outcome
    const err = outcome.error ?? streamError ?? yamuxError("SessionClosed", "the session was closed")
    // Keep reading (and discarding) so the peer's EOF is seen and the connection can close.
    if (this.readPaused) {
      this.readPaused = false
      this.conn.resume()
    }
    const streams = [...this.streams.values()]
    this.streams.clear()
    this.peerStreams = 0
    this.remoteGoAwayListeners = []
    this.backlog = []
    for (const s of streams) s.fail(err, false)
    for (const w of this.acceptWaiters.splice(0)) w(err)
    const pings = [...this.pings.values()]
    this.pings.clear()
    for (const p of pings) p(err)
    for (const w of this.spaceWaiters.splice(0)) w()
    this.pendingOpens.clear()
    for (const f of [this.watchdogWake, this.sweeperWake]) f?.()
    this.watchdogWake = undefined
    this.sweeperWake = undefined
    for (const l of this.closedListeners.splice(0)) l(outcome)
  }

  onClosed(f: (o: Outcome) => void): void {
    if (this.outcome) f(this.outcome)
    else this.closedListeners.push(f)
  }

  /** Calls `f` once when the peer sends GoAway(normal) (at once if it did); never after the session ended. */
  onRemoteGoAway(f: () => void): void {
    if (this.remoteGoAway) f()
    else if (!this.outcome) this.remoteGoAwayListeners.push(f)
  }

  onConnectionClosed(f: () => void): void {
    if (this.conn.closed()) f()
    else this.connClosedListeners.push(f)
  }

  get streamCount(): number {
    return this.streams.size
  }

  /** True while the transport is paused by the session (backlog bound or outbound pile-up). */
  get readingPaused(): boolean {
    return this.readPaused
  }

  /** Unread payload across the session (for tests and metrics). */
  get unreadBytes(): number {
    return this.unread
  }
}

const noop = () => {}


const toStream = (s: StreamCore | YamuxError): Effect.Effect<YamuxStream, YamuxError> =>
  s instanceof YamuxError ? Effect.fail(s) : Effect.succeed(new YamuxStream(s))

/** The write timeout: a batch the transport has not taken within it ends the session. */
const writeWatchdog = (core: SessionCore): Effect.Effect<void> =>
  Effect.gen(function*() {
    const timeoutMs = core.config.connectionWriteTimeoutMs
    while (!core.outcome) {
      const pending = yield* Effect.callback<{ readonly seq: number; readonly startedAt: number } | undefined>(
        (resume) => {
          const now = core.inFlight(() => resume(Effect.sync(() => core.inFlight(noop))))
          if (now !== undefined || core.outcome) resume(Effect.succeed(now))
        }
      )
      if (pending === undefined) continue
      const left = pending.startedAt + timeoutMs - core.now()
      if (left > 0) yield* Effect.sleep(Duration.millis(left))
      if (!core.written(pending.seq) && !core.outcome) {
        core.terminate(yamuxError("WriteTimeout", "the connection did not take our frames in time"), undefined)
        core.conn.destroy()
      }
    }
  })

/** Keepalive: a ping every interval; no answer within the write timeout ends the session. */
const keepAliveLoop = (core: SessionCore): Effect.Effect<void> =>
  Effect.gen(function*() {
    const interval = Duration.millis(core.config.keepAliveIntervalMs)
    while (!core.outcome) {
      yield* Effect.sleep(interval)
      const exit = yield* Effect.exit(pingEffect(core, "KeepAliveTimeout"))
      if (exit._tag === "Failure") {
        const error = Cause.findErrorOption(exit.cause)
        if (error._tag === "Some" && error.value.reason === "KeepAliveTimeout") {
          core.terminate(error.value, undefined)
          core.conn.destroy()
        }
      }
    }
  })

/** Resets streams whose ACK does not come within the open timeout. */
const openSweeperLoop = (core: SessionCore): Effect.Effect<void> =>
  Effect.gen(function*() {
    while (!core.outcome) {
      yield* Effect.callback<void>((resume) => core.whenOpenPending(() => resume(Effect.void)))
      const next = core.sweepOpens()
      if (next !== undefined) yield* Effect.sleep(Duration.millis(Math.max(0, next - core.now())))
    }
  })

const pingEffect = (
  core: SessionCore,
  timeoutReason: "PingTimeout" | "KeepAliveTimeout"
): Effect.Effect<Duration.Duration, YamuxError> =>
  Effect.gen(function*() {
    const start = yield* Clock.currentTimeNanos
    yield* Effect.callback<void, YamuxError>((resume) => {
      const cancel = core.sendPing((e) => resume(e ? Effect.fail(e) : Effect.void))
      return Effect.sync(cancel)
    }).pipe(
      Effect.timeoutOrElse({
        duration: Duration.millis(core.config.connectionWriteTimeoutMs),
        orElse: () => Effect.fail(yamuxError(timeoutReason, "ping not answered in time"))
      })
    )
    const end = yield* Clock.currentTimeNanos
    core.rtt = Number(end - start) / 1e6
    return Duration.nanos(end - start)
  })

/**
 * Runs a yamux session on `conn` until the scope closes. Closing the scope sends GoAway(normal), fails
 * every stream with SessionClosed, stops the fibers and closes the connection.
 */
export const make = (
  conn: Connection,
  options: SessionOptions
): Effect.Effect<YamuxSession, never, Scope.Scope> =>
  Effect.gen(function*() {
    const config = resolveYamuxConfig(options.config)
    const core = new SessionCore(conn, options.role, config)
    const clock = yield* Clock.Clock
    core.now = () => clock.currentTimeMillisUnsafe()
    const scope = yield* Effect.scope
    // Last in, first out: this finalizer (added first) runs after the fibers are stopped.
    yield* Scope.addFinalizer(scope, shutdown(core))
    core.start()
    yield* Effect.forkScoped(writeWatchdog(core))
    yield* Effect.forkScoped(openSweeperLoop(core))
    if (config.enableKeepAlive) yield* Effect.forkScoped(keepAliveLoop(core))
    // Auto-tuning needs a round-trip time from the start, not only after the first keepalive.
    if (config.maxAutoTuneWindow > config.maxStreamWindow) {
      yield* Effect.forkScoped(Effect.ignore(pingEffect(core, "PingTimeout")))
    }
    return {
      role: options.role,
      config,
      core,
      // Opening is on the per-request path: untraced.
      open: Effect.fnUntraced(function*() {
        return yield* toStream(core.openStream())
      }),
      accept: () =>
        Effect.callback<YamuxStream, YamuxError>((resume) => {
          const cancel = core.acceptStream((s) => resume(toStream(s)))
          return Effect.sync(cancel)
        }),
      ping: Effect.fn("YamuxSession.ping")(function*() {
        return yield* pingEffect(core, "PingTimeout")
      }),
      goAway: Effect.fn("YamuxSession.goAway")(function*(code: F.GoAwayCode = F.GO_AWAY_NORMAL) {
        core.goAway(code)
      }),
      closed: Effect.callback<void, YamuxError>((resume) => {
        core.onClosed((o) => resume(o.error ? Effect.fail(o.error) : Effect.void))
      }),
      streamCount: Effect.sync(() => core.streamCount)
    } satisfies YamuxSession
  })

/**
 * Local close: GoAway(normal), flush, half-close, then wait (bounded by the write timeout, in real
 * time so a frozen test clock cannot hold a scope open) for the peer to close before destroying.
 */
const shutdown = (core: SessionCore): Effect.Effect<void> =>
  Effect.callback<void>((resume) => {
    const wasOpen = core.outcome === undefined
    core.closeLocally()
    const conn = core.conn
    if (conn.closed()) return resume(Effect.void)
    const rest = core.takeBatch()
    if (!wasOpen && rest === undefined) {
      conn.destroy()
      return resume(Effect.void)
    }
    let timer: ReturnType<typeof setTimeout> | undefined
    const done = () => {
      if (timer) clearTimeout(timer)
      timer = undefined
      conn.destroy()
      resume(Effect.void)
    }
    if (rest) conn.write(rest, noop)
    conn.end()
    timer = setTimeout(done, core.config.connectionWriteTimeoutMs)
    core.onConnectionClosed(done)
    return Effect.sync(() => {
      if (timer) clearTimeout(timer)
      conn.destroy()
    })
  })
