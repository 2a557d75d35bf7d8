/**
 * The byte-connection abstraction every front door runs on (TCP, TLS, Unix sockets, WebSocket):
 * callback reads that can be paused, writes that report when the transport can take more, half-close
 * and destroy. Plus an in-memory pair for tests. Node bindings live in runtime/NodeTransport.
 */
import { Context, Effect, Schema } from "effect"
import type { Scope } from "effect"
import type { ReadHolds } from "./ReadLease.ts"

export class TransportError extends Schema.TaggedError<TransportError>()("TransportError", {
  reason: Schema.Literals(["Closed", "Io", "Dial", "Listen"]),
  message: Schema.String
}) {}

/** Where a connection ends: an IP endpoint or a Unix socket path. */
export interface Address {
  readonly host?: string | undefined
  readonly port?: number | undefined
  readonly path?: string | undefined
  /** TLS over the TCP or Unix connection (see `TlsOptions`); absent for plain bytes. */
  readonly tls?: TlsOptions | undefined
}

/**
 * TLS for an `Address`. Listening needs `cert` and `key` (PEM); dialing verifies the server's
 * certificate against the system's CAs plus `ca`, for `servername` (default: the host when it is a name).
 */
export interface TlsOptions {
  readonly cert?: string | undefined
  readonly key?: string | undefined
  readonly ca?: string | ReadonlyArray<string> | undefined
  readonly servername?: string | undefined
}

export interface ConnectionHandlers {
  /**
   * A chunk arrived. Not called while paused. The connection never reads into its memory again.
   * Without `holds` the chunk is the handler's to keep. With `holds` (the read is leased, `ReadLease`;
   * only for handlers that say `retainsReads`) its memory is given back after the call unless the
   * handler took a hold (`holds.retain()`) for the views it keeps, which it releases once done with them.
   */
  readonly onData: (chunk: Uint8Array, holds?: ReadHolds) => void
  /** The handler takes a hold for every view of a chunk it keeps past `onData`: reads may be leased. */
  readonly retainsReads?: boolean | undefined
  /** The peer half-closed: no more data will arrive. */
  readonly onEnd: () => void
  /** The connection is fully closed; `error` when it failed. Called exactly once. */
  readonly onClose: (error: TransportError | undefined) => void
}

/**
 * The reader of a Node stream that delivers its `data` events in runs (a yamux stream socket: what one
 * read of the session brought): the stream calls `batchStart` before a run and `batchEnd` after it, so
 * the reader can write what one read brought in one go.
 */
export interface ReadBatchListener {
  readonly batchStart: () => void
  readonly batchEnd: () => void
}

export interface Connection {
  readonly localAddress: Address | undefined
  readonly remoteAddress: Address | undefined
  /** Starts delivering events to `handlers`; call once. Delivery begins unpaused. */
  readonly start: (handlers: ConnectionHandlers) => void
  /** Stops `onData` until `resume` (read backpressure). */
  readonly pause: () => void
  readonly resume: () => void
  /**
   * Queues `chunks` in order (as one batch where the transport allows). `done` is called once the
   * transport can take more (its own buffer is below its high-water mark), or with an error.
   * The chunks are referenced, not copied: do not modify them afterwards.
   */
  readonly write: (chunks: ReadonlyArray<Uint8Array>, done: (error?: TransportError) => void) => void
  /**
   * True when `write`'s `done` (without an error) also means the transport no longer references the
   * chunks (they were written out or copied), so the writer may reuse their memory.
   */
  readonly releasesOnDone?: boolean | undefined
  /** Half-close: flush what was written, then signal end of data to the peer. */
  readonly end: () => void
  /** Closes at once, dropping anything unsent. Idempotent. */
  readonly destroy: () => void
  /** True once `onClose` has happened (or would have). */
  readonly closed: () => boolean
}

/** `Connection.write` as an Effect. */
export const writeEffect = (conn: Connection, chunks: ReadonlyArray<Uint8Array>): Effect.Effect<void, TransportError> =>
  Effect.callback<void, TransportError>((resume) => {
    conn.write(chunks, (error) => resume(error ? Effect.fail(error) : Effect.void))
  })

/** How a listener admits connections before they reach its handler. */
export interface ListenOptions {
  /**
   * Called for each TLS connection as it is accepted, before its TLS handshake: `undefined` closes it
   * at once; a ticket is released when the handshake ends (done, failed or timed out).
   */
  readonly admitTlsHandshake?: ((remote: Address) => { readonly release: () => void } | undefined) | undefined
}

/** Dialing and listening as a service, so front doors do not care which transport carries them. */
export class Transport extends Context.Service<Transport, {
  /** Connects to `address`; the connection is destroyed when the scope closes. */
  readonly dial: (address: Address) => Effect.Effect<Connection, TransportError, Scope.Scope>
  /**
   * Listens on `address` and hands every accepted connection to `onConnection`; the listener and every
   * connection it accepted are closed when the scope closes. Returns the bound address.
   */
  readonly listen: (
    address: Address,
    onConnection: (conn: Connection) => void,
    options?: ListenOptions
  ) => Effect.Effect<Address, TransportError, Scope.Scope>
}>()("switchyard/Transport") {}

// ---------------------------------------------------------------------------------------------------
// In-memory pair

/** Default bytes a memory connection holds for a paused or slow reader before writers are told to wait. */
export const MEMORY_HIGH_WATER_MARK = 64 * 1024

export interface MemoryPairOptions {
  /** Bytes buffered toward one side before `write`'s `done` is deferred. */
  readonly highWaterMark?: number
  /** Splits each delivered chunk (property tests use it to vary chunk boundaries). */
  readonly split?: (chunk: Uint8Array) => ReadonlyArray<Uint8Array>
  /** Delivers each `write` batch as one chunk, as a socket's writev tends to arrive (copies). */
  readonly coalesce?: boolean
}

class MemoryEnd implements Connection {
  peer!: MemoryEnd
  handlers: ConnectionHandlers | undefined
  readonly inbox: Array<Uint8Array | null> = []
  inboxBytes = 0
  paused = false
  scheduled = false
  ended = false
  isClosed = false
  drainWaiters: Array<() => void> = []
  readonly localAddress: Address
  readonly remoteAddress: Address
  readonly hwm: number
  readonly split: ((chunk: Uint8Array) => ReadonlyArray<Uint8Array>) | undefined
  readonly coalesce: boolean
  constructor(local: Address, remote: Address, options: MemoryPairOptions) {
    this.coalesce = options.coalesce === true
    this.localAddress = local
    this.remoteAddress = remote
    this.hwm = options.highWaterMark ?? MEMORY_HIGH_WATER_MARK
    this.split = options.split
  }
  start = (handlers: ConnectionHandlers): void => {
    this.handlers = handlers
    this.schedule()
  }
  pause = (): void => {
    this.paused = true
  }
  resume = (): void => {
    this.paused = false
    this.schedule()
  }
  closed = (): boolean => this.isClosed
  schedule(): void {
    if (this.scheduled || this.isClosed) return
    this.scheduled = true
    queueMicrotask(() => {
      this.scheduled = false
      this.deliver()
    })
  }
  deliver(): void {
    const h = this.handlers
    if (!h) return
    while (!this.paused && !this.isClosed && this.inbox.length > 0) {
      const chunk = this.inbox.shift()!
      if (chunk === null) {
        h.onEnd()
        this.maybeClose()
        continue
      }
      this.inboxBytes -= chunk.length
      if (this.split) for (const piece of this.split(chunk)) h.onData(piece)
      else h.onData(chunk)
    }
    if (this.inboxBytes <= this.hwm && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters
      this.drainWaiters = []
      for (const w of waiters) w()
    }
  }
  write = (chunks: ReadonlyArray<Uint8Array>, done: (error?: TransportError) => void): void => {
    if (this.isClosed || this.ended) {
      queueMicrotask(() => done(new TransportError({ reason: "Closed", message: "memory connection closed" })))
      return
    }
    const p = this.peer
    if (this.coalesce && chunks.length > 1) chunks = [joinChunks(chunks)]
    for (const c of chunks) {
      if (c.length === 0) continue
      p.inbox.push(c)
      p.inboxBytes += c.length
    }
    p.schedule()
    if (p.inboxBytes <= p.hwm) queueMicrotask(() => done())
    else p.drainWaiters.push(() => done())
  }
  end = (): void => {
    if (this.ended || this.isClosed) return
    this.ended = true
    this.peer.inbox.push(null)
    this.peer.schedule()
    this.maybeClose()
  }
  /** Both directions ended: the pair closes. */
  maybeClose(): void {
    if (this.ended && this.peer.ended && this.peer.inbox.length === 0 && this.inbox.length === 0) {
      this.close(undefined)
      this.peer.close(undefined)
    }
  }
  destroy = (): void => {
    if (this.isClosed) return
    this.close(undefined)
    this.peer.close(new TransportError({ reason: "Io", message: "connection reset by peer" }))
  }
  close(error: TransportError | undefined): void {
    if (this.isClosed) return
    this.isClosed = true
    this.inbox.length = 0
    this.inboxBytes = 0
    const waiters = this.drainWaiters
    this.drainWaiters = []
    for (const w of waiters) w()
    const h = this.handlers
    if (h) queueMicrotask(() => h.onClose(error))
    else this.pendingClose = error ?? null
  }
  pendingClose: TransportError | null | undefined = undefined
}

const joinChunks = (chunks: ReadonlyArray<Uint8Array>): Uint8Array => {
  let n = 0
  for (const c of chunks) n += c.length
  const out = new Uint8Array(n)
  let o = 0
  for (const c of chunks) {
    out.set(c, o)
    o += c.length
  }
  return out
}

/** Two connected in-memory connections (`[a, b]`): what one writes the other reads. */
export const makeMemoryPair = (options: MemoryPairOptions = {}): readonly [Connection, Connection] => {
  const a = new MemoryEnd({ host: "memory", port: 1 }, { host: "memory", port: 2 }, options)
  const b = new MemoryEnd({ host: "memory", port: 2 }, { host: "memory", port: 1 }, options)
  a.peer = b
  b.peer = a
  const wrap = (end: MemoryEnd): Connection => ({
    localAddress: end.localAddress,
    remoteAddress: end.remoteAddress,
    start: (handlers) => {
      end.start(handlers)
      if (end.pendingClose !== undefined) {
        const e = end.pendingClose ?? undefined
        queueMicrotask(() => handlers.onClose(e))
      }
    },
    pause: end.pause,
    resume: end.resume,
    write: end.write,
    end: end.end,
    destroy: end.destroy,
    closed: end.closed
  })
  return [wrap(a), wrap(b)] as const
}
