/**
 * Raw keep-alive connections to one upstream for the HTTP/1.1 engine: bounded in use and idle, LIFO
 * reuse, idle connections watched so one the upstream closed (or that talks out of turn) is dropped
 * before reuse, and a bounded queue of requests waiting for a connection. A waiter may name its client
 * and the most connections that client may hold at once: a client at its cap waits for one of its own
 * to come back, while others are served. It parses nothing; its one timer closes idle connections beyond
 * `maxFreeSockets` that stayed unused for `IDLE_SURPLUS_LINGER_MS` (the waiter bounds its own wait): the
 * connection's current owner gets its events through one set of listeners installed per connection.
 */
import { Buffer } from "node:buffer"
import { performance } from "node:perf_hooks"
import type { Duplex } from "node:stream"
import { freeRead, noRelease, type ReadHolds, ReadLease, type ReadRelease } from "../ReadLease.ts"
import type { ReadBatchListener } from "../Transport.ts"
import type { Upstream } from "./Upstream.ts"

/** A socket that delivers its chunks in runs to a `ReadBatchListener` (a yamux stream socket). */
const isBatching = (socket: Duplex): socket is Duplex & { batchListener: ReadBatchListener | undefined } =>
  "batchListener" in socket

/** A socket whose `data` listener may take the hold on the read a chunk is a view of (a yamux stream socket). */
const isLeasing = (socket: Duplex): socket is Duplex & { takeReadRelease: (chunk: Uint8Array) => ReadRelease | undefined } =>
  "takeReadRelease" in socket

/** The exchange currently using a connection; receives its events. */
export interface ConnectionOwner {
  /**
   * Bytes from the upstream, a view of the connection's read: an owner that keeps it past the call
   * (queued on a socket) takes a hold with the connection's `holdRead`.
   */
  readonly upstreamData: (chunk: Buffer) => void
  readonly upstreamEnd: () => void
  readonly upstreamClose: (error: (Error & { code?: string }) | undefined) => void
  readonly upstreamDrain: () => void
  /**
   * For sockets that deliver their chunks in runs (see `ReadBatchListener`): a run of `upstreamData`
   * calls begins, and it ended.
   */
  readonly upstreamBatchStart?: () => void
  readonly upstreamBatchEnd?: () => void
}

/** A request waiting for a connection. */
export interface ConnectionWaiter {
  readonly granted: (connection: PooledConnection) => void
  readonly refused: (message: string) => void
  /** The client the connection is held for (its address); `undefined` is not counted. */
  readonly client?: string | undefined
  /** Most connections of this pool `client` may hold at once (default: no cap). */
  readonly slotLimit?: number | undefined
}

/**
 * How long idle connections beyond `maxFreeSockets` are kept for reuse after their last exchange. Under
 * a steady load of more concurrent requests than `maxFreeSockets`, the connections in use rise and fall
 * within every turn of the event loop: closing the surplus at once would close and reopen connections
 * on most requests. A pool with `maxFreeSockets` 0 keeps none.
 */
export const IDLE_SURPLUS_LINGER_MS = 1_000

/** Most requests that may wait for a connection of one upstream; more are answered 503. */
export const MAX_POOL_WAITERS = 4096

/**
 * Size of the buffer a pooled socket reads into at first and between exchanges (one per connection,
 * replaced only while still referenced): enough for most responses in one read.
 */
export const UPSTREAM_READ_BUFFER_BYTES = 64 * 1024

/**
 * Size the read buffer grows to once a read fills it (a large body is streaming): a Unix socket delivers
 * up to its peer's send buffer (about 220 KiB on Linux) per read, so one read and one client write move
 * that much. The connection goes back to `UPSTREAM_READ_BUFFER_BYTES` when its exchange ends.
 */
export const UPSTREAM_READ_BUFFER_MAX_BYTES = 256 * 1024

/**
 * One upstream connection; its listeners stay for its lifetime and dispatch to the current owner. A
 * connection opened with `connectReading` reads into one reusable buffer: an owner that keeps bytes it
 * was given (queued for writing) takes a hold with `holdRead`, and the next read then goes into a fresh
 * buffer; the held one is given back (`ReadLease`) once every hold on it was released. A read that fills
 * the buffer makes the next one `UPSTREAM_READ_BUFFER_MAX_BYTES`; an idle connection keeps only a
 * `UPSTREAM_READ_BUFFER_BYTES` one. On a socket that leases its reads (a yamux stream's), `holdRead`
 * holds the session's read the chunk is a view of.
 */
export class PooledConnection {
  readonly socket: Duplex
  readonly pool: UpstreamPool | undefined
  owner: ConnectionOwner | undefined = undefined
  /** It carried a complete exchange before (a failure before any byte may mean it was closed while idle). */
  reused = false
  state: "busy" | "idle" | "gone" = "busy"
  error: (Error & { code?: string }) | undefined = undefined
  ended = false
  /** The last chunk handed to the owner is still referenced (queued on a socket): do not read into it. */
  private chunkHeld = false
  /** Holds on the chunk being handed to the owner, while `upstreamData` runs. */
  private chunkHolds: ReadHolds | undefined = undefined
  /** The lease of the read buffer, whose memory goes back once it is replaced and every hold released. */
  private bufferLease: ReadLease | undefined = undefined
  /** A replaced read buffer every holder released, for the next read that needs fresh memory. */
  private spare: Buffer | undefined = undefined
  /** The client the pool counts this busy connection against, if any. */
  client: string | undefined = undefined
  /** When it last went idle (`performance.now()`). */
  idleSince = 0
  private readBuffer: Buffer | undefined = undefined
  /** The socket, when its reads may come with holds on the memory they are views of. */
  private leasing: { readonly takeReadRelease: (chunk: Uint8Array) => ReadRelease | undefined } | undefined = undefined
  /** The last read filled the buffer. */
  private filled = false

  /** Opens a connection to `upstream`, reading into reused buffers when the upstream allows it. */
  static open(upstream: Upstream, pool: UpstreamPool | undefined): PooledConnection {
    return new PooledConnection(upstream, pool)
  }

  private constructor(upstream: Upstream, pool: UpstreamPool | undefined) {
    this.pool = pool
    const socket = upstream.connectReading !== undefined
      ? upstream.connectReading({ buffer: this.nextBuffer, callback: this.onRead })
      : upstream.connect()
    this.socket = socket
    if (isLeasing(socket)) this.leasing = socket
    if (upstream.connectReading === undefined) socket.on("data", this.onData)
    if (isBatching(socket)) socket.batchListener = this.batches
    socket.on("end", this.onEnd)
    socket.on("error", this.onError)
    socket.on("close", this.onClose)
    socket.on("drain", this.onDrain)
  }

  /** Whether an idle connection can take another request. */
  usable(): boolean {
    const s = this.socket
    return !this.ended && !s.destroyed && s.writable && this.error === undefined
  }

  /** The owner of the run of `data` events in progress on a batching socket. */
  private batchOwner: ConnectionOwner | undefined = undefined

  private readonly batches: ReadBatchListener = {
    batchStart: () => {
      const owner = this.owner
      this.batchOwner = owner
      owner?.upstreamBatchStart?.()
    },
    batchEnd: () => {
      const owner = this.batchOwner
      this.batchOwner = undefined
      owner?.upstreamBatchEnd?.()
    }
  }

  /** Hands the socket over for a raw tunnel (only for connections opened without `connectReading`). */
  detach(): Duplex {
    const s = this.socket
    if (isBatching(s)) s.batchListener = undefined
    s.off("data", this.onData)
    s.off("end", this.onEnd)
    s.off("close", this.onClose)
    s.off("drain", this.onDrain)
    this.owner = undefined
    if (this.state !== "gone") {
      this.state = "gone"
      this.pool?.forget(this)
    }
    return s
  }

  destroy(): void {
    this.socket.destroy()
  }

  private readonly nextBuffer = (): Uint8Array => {
    const current = this.readBuffer
    // Called after each read (the owner has handled it): a full read asks for the large size, an exchange
    // that ended (or never began) for the small one.
    const size = this.state === "busy" && (this.filled || (current !== undefined && current.length === UPSTREAM_READ_BUFFER_MAX_BYTES))
      ? UPSTREAM_READ_BUFFER_MAX_BYTES
      : UPSTREAM_READ_BUFFER_BYTES
    this.filled = false
    if (current === undefined || this.chunkHeld || current.length !== size) {
      // the connection's own hold on a buffer the owner took holds on: the memory goes once they were
      // released. A buffer replaced only for its size is left to the collector: an owner may still have
      // its bytes queued without a hold (it reads nothing more until they are written, as wsp-client does)
      if (this.chunkHeld) this.bufferLease?.release()
      this.chunkHeld = false
      const spare = this.spare
      this.spare = undefined
      let fresh: Buffer
      if (spare !== undefined && spare.length === size) fresh = spare
      else {
        if (spare !== undefined) freeRead(spare)
        fresh = Buffer.allocUnsafe(size)
      }
      this.readBuffer = fresh
      this.bufferLease = new ReadLease(() => this.recycle(fresh))
      return fresh
    }
    return current
  }

  /**
   * A replaced read buffer nobody holds any more: kept for the next read that needs fresh memory (one,
   * so a download alternates between two buffers rather than allocating one per queued read), else
   * given back.
   */
  private recycle(buffer: Buffer): void {
    if (this.spare === undefined && this.state !== "gone") this.spare = buffer
    else freeRead(buffer)
  }

  /**
   * For the owner, during `upstreamData`: a hold on the chunk it is being given, which it keeps past the
   * call (queued on a socket). It calls the release once it keeps no view of the chunk; left uncalled,
   * the memory is the collector's. The connection reads into other memory from now on.
   */
  holdRead(): ReadRelease {
    this.chunkHeld = true
    const holds = this.chunkHolds
    if (holds !== undefined) return holds.retain()
    // outside the call: the buffer last read into stays held for good (left to the collector)
    this.bufferLease?.retain()
    return noRelease
  }

  private readonly onRead = (bytesRead: number, buffer: Uint8Array): boolean => {
    if (bytesRead === buffer.length) this.filled = true
    this.deliver((buffer as Buffer).subarray(0, bytesRead), buffer === this.readBuffer ? this.bufferLease : undefined)
    return true // pausing is the owner's, through socket.pause()
  }

  private readonly onData = (chunk: Buffer): void => {
    const release = this.leasing?.takeReadRelease(chunk)
    if (release === undefined) return this.deliver(chunk, undefined)
    // the owner's holds are counted under the one hold the stream handed over
    const holds = new ReadLease(release)
    this.deliver(chunk, holds)
    holds.release()
  }

  private deliver(chunk: Buffer, holds: ReadHolds | undefined): void {
    const owner = this.owner
    if (owner !== undefined) {
      this.chunkHolds = holds
      try {
        owner.upstreamData(chunk)
      } finally {
        this.chunkHolds = undefined
      }
    } else {
      // bytes nobody asked for: the connection cannot be trusted
      this.pool?.outOfTurn(chunk.length)
      this.socket.destroy()
    }
  }

  private readonly onEnd = (): void => {
    this.ended = true
    const owner = this.owner
    if (owner !== undefined) owner.upstreamEnd()
    else this.socket.destroy()
  }

  private readonly onError = (err: Error & { code?: string }): void => {
    this.error ??= err
  }

  private readonly onClose = (): void => {
    const owner = this.owner
    this.owner = undefined
    if (this.state === "idle") this.pool?.dropIdle(this)
    if (this.state !== "gone") {
      this.state = "gone"
      this.pool?.forget(this)
    }
    owner?.upstreamClose(this.error)
  }

  private readonly onDrain = (): void => {
    this.owner?.upstreamDrain()
  }
}

/** Connections to one upstream: at most `maxSockets` open, at most `maxFreeSockets` of them idle. */
export class UpstreamPool {
  readonly upstream: Upstream
  readonly maxSockets: number
  readonly maxFreeSockets: number
  private readonly idle: Array<PooledConnection> = []
  private readonly waiters: Array<ConnectionWaiter> = []
  /** Connections open and not idle. */
  private busy = 0
  /** Busy connections per client (only clients with some). */
  private readonly held = new Map<string, number>()
  private closed = false
  /** Closes idle connections beyond `maxFreeSockets` that stayed unused long enough (armed while there are some). */
  private trimTimer: ReturnType<typeof setTimeout> | undefined = undefined
  private readonly lingerMs: number
  /** Called when the pool holds nothing any more (so its owner can drop it). */
  private readonly onEmpty: (pool: UpstreamPool) => void
  /** Called with the byte count when an idle connection received bytes (it is then destroyed). */
  private readonly onOutOfTurn: ((bytes: number) => void) | undefined

  constructor(
    upstream: Upstream,
    maxSockets: number,
    maxFreeSockets: number,
    onEmpty: (pool: UpstreamPool) => void,
    onOutOfTurn?: (bytes: number) => void,
    lingerMs: number = IDLE_SURPLUS_LINGER_MS
  ) {
    this.upstream = upstream
    this.maxSockets = maxSockets
    this.maxFreeSockets = maxFreeSockets
    this.onEmpty = onEmpty
    this.onOutOfTurn = onOutOfTurn
    this.lingerMs = lingerMs
  }

  /** An idle connection received bytes nobody asked for. */
  outOfTurn(bytes: number): void {
    this.onOutOfTurn?.(bytes)
  }

  /** Open connections (in use and idle) and waiting requests. */
  stats(): { readonly busy: number; readonly idle: number; readonly waiting: number } {
    return { busy: this.busy, idle: this.idle.length, waiting: this.waiters.length }
  }

  /** Connections `client` holds now. */
  heldBy(client: string | undefined): number {
    return client === undefined ? 0 : this.held.get(client) ?? 0
  }

  /** Whether the waiter's client holds as many connections as it may. */
  atCap(waiter: ConnectionWaiter): boolean {
    const limit = waiter.slotLimit
    return limit !== undefined && waiter.client !== undefined && this.heldBy(waiter.client) >= limit
  }

  /**
   * Grants a connection now (idle or new), refuses, or queues the waiter; `fresh` skips idle connections.
   * Returns whether the waiter was queued (it then hears `granted` or `refused` later, or cancels).
   */
  acquire(waiter: ConnectionWaiter, fresh: boolean): boolean {
    if (this.closed) {
      waiter.refused("switchyard: shutting down")
      return false
    }
    if (this.atCap(waiter)) return this.enqueue(waiter)
    if (!fresh) {
      while (this.idle.length > 0) {
        const c = this.idle.pop()!
        if (!c.usable() || this.upstream.retiring?.() === true) {
          c.state = "gone"
          c.destroy()
          continue
        }
        c.state = "busy"
        this.busy++
        this.grant(waiter, c)
        return false
      }
    }
    if (this.busy + this.idle.length < this.maxSockets || (fresh && this.idle.length > 0 && this.dropOneIdle())) {
      this.grant(waiter, this.open())
      return false
    }
    return this.enqueue(waiter)
  }

  private enqueue(waiter: ConnectionWaiter): boolean {
    if (this.waiters.length >= MAX_POOL_WAITERS) {
      waiter.refused(`switchyard: more than ${MAX_POOL_WAITERS} requests waiting for upstream ${this.upstream.describe}`)
      return false
    }
    this.waiters.push(waiter)
    return true
  }

  /** Hands a busy connection to a waiter, counted against its client. */
  private grant(waiter: ConnectionWaiter, c: PooledConnection): void {
    const client = waiter.client
    c.client = client
    if (client !== undefined) this.held.set(client, (this.held.get(client) ?? 0) + 1)
    waiter.granted(c)
  }

  /** A busy connection stops counting against its client. */
  private unhold(c: PooledConnection): void {
    const client = c.client
    if (client === undefined) return
    c.client = undefined
    const n = (this.held.get(client) ?? 1) - 1
    if (n <= 0) this.held.delete(client)
    else this.held.set(client, n)
  }

  /** The first waiter whose client is below its cap, taken off the queue. */
  private nextWaiter(): ConnectionWaiter | undefined {
    const waiters = this.waiters
    for (let i = 0; i < waiters.length; i++) {
      const w = waiters[i]!
      if (this.atCap(w)) continue
      waiters.splice(i, 1)
      return w
    }
    return undefined
  }

  /** Stops waiting (the client went away). */
  cancel(waiter: ConnectionWaiter): void {
    const i = this.waiters.indexOf(waiter)
    if (i !== -1) this.waiters.splice(i, 1)
    this.checkEmpty()
  }

  /** Returns a connection after a complete exchange; one that cannot carry another is destroyed. */
  release(c: PooledConnection, reusable: boolean): void {
    c.owner = undefined
    if (c.state !== "busy") return
    if (!reusable || this.closed || !c.usable() || this.upstream.retiring?.() === true) {
      c.destroy()
      return
    }
    c.reused = true
    this.unhold(c)
    const next = this.nextWaiter()
    if (next !== undefined) {
      this.grant(next, c)
      return
    }
    if (this.maxFreeSockets === 0) {
      c.destroy()
      return
    }
    this.busy--
    c.state = "idle"
    c.idleSince = performance.now()
    this.idle.push(c)
    if (this.idle.length > this.maxFreeSockets && this.trimTimer === undefined) this.armTrim(this.lingerMs)
  }

  private armTrim(ms: number): void {
    this.trimTimer = setTimeout(this.trimSurplus, ms)
    this.trimTimer.unref()
  }

  /**
   * Closes the least recently used idle connections beyond `maxFreeSockets` that stayed idle for the
   * linger time (the idle list is in release order: the oldest first).
   */
  private readonly trimSurplus = (): void => {
    this.trimTimer = undefined
    const idle = this.idle
    const now = performance.now()
    while (idle.length > this.maxFreeSockets) {
      const oldest = idle[0]!
      const left = oldest.idleSince + this.lingerMs - now
      if (left > 0) {
        this.armTrim(left)
        return
      }
      this.dropOneIdle()
    }
  }

  /** A busy connection closed: its slot goes to the next waiter its client's cap allows. */
  forget(c: PooledConnection): void {
    this.busy--
    this.unhold(c)
    const next = this.closed ? undefined : this.nextWaiter()
    if (next !== undefined) this.grant(next, this.open())
    else this.checkEmpty()
  }

  /** An idle connection closed (the upstream timed it out). */
  dropIdle(c: PooledConnection): void {
    const i = this.idle.indexOf(c)
    if (i !== -1) this.idle.splice(i, 1)
    c.state = "gone"
    this.checkEmpty()
  }

  /** Closes every connection, idle or not, and refuses the waiters. */
  close(): void {
    this.closed = true
    if (this.trimTimer !== undefined) {
      clearTimeout(this.trimTimer)
      this.trimTimer = undefined
    }
    for (const w of this.waiters.splice(0)) w.refused("switchyard: shutting down")
    for (const c of this.idle.splice(0)) {
      c.state = "gone"
      c.destroy()
    }
  }

  private dropOneIdle(): boolean {
    const c = this.idle.shift()
    if (c === undefined) return false
    c.state = "gone"
    c.destroy()
    return true
  }

  private open(): PooledConnection {
    this.busy++
    return PooledConnection.open(this.upstream, this)
  }

  private checkEmpty(): void {
    if (this.busy === 0 && this.idle.length === 0 && this.waiters.length === 0) this.onEmpty(this)
  }
}
