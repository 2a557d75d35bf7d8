/**
 * One wsp request to an `http://` or `https://` destination over a pooled HTTP/1.1 connection (TCP, or
 * TLS verified against the process's trusted CAs): writes the head, streams the body (Content-Length or
 * chunked), reads the response head and hands the body on as views of the connection's reads (a plain
 * connection's reused read buffer; chunked coding decoded), with backpressure both ways. It does not
 * check destination rules or speak wsp.
 */
import { Buffer } from "node:buffer"
import type { ResponseHead } from "../../domain/Http1Parser.ts"
import { BodyFramer, HeadReader, parseResponseHead, responseFraming } from "../../domain/Http1Parser.ts"
import type { DestinationTarget, RequestBodyFraming } from "../../domain/DestinationRequestHead.ts"
import { goHeaderFromFields, responseContentLength } from "../../domain/DestinationRequestHead.ts"
import type { GoHeader } from "../../domain/WspMessage.ts"
import { tcpUpstream, tlsUpstream } from "../forward/Upstream.ts"
import type { ConnectionOwner, ConnectionWaiter } from "../forward/UpstreamPool.ts"
import { PooledConnection, UpstreamPool } from "../forward/UpstreamPool.ts"

/** Largest destination response head, status line and blank line included (bytes). */
export const DESTINATION_MAX_HEAD_BYTES = 64 * 1024
/** Largest trailer section of a chunked destination response (bytes); trailers are read and dropped. */
export const DESTINATION_MAX_TRAILER_BYTES = 16 * 1024
/** Most interim (1xx) responses skipped before a final one; a destination sending more fails the request. */
export const DESTINATION_MAX_INTERIM_RESPONSES = 16
/** Request body bytes queued while waiting for a connection before the sender is told to wait. */
export const DESTINATION_PENDING_BODY_BYTES = 1024 * 1024
/** Most destinations (host and port) with a connection pool; requests to others use one-off connections. */
export const MAX_DESTINATION_POOLS = 256

const LAST_CHUNK = Buffer.from("0\r\n\r\n", "latin1")
const CRLF = Buffer.from("\r\n", "latin1")
const EMPTY = Buffer.alloc(0)

/** What an exchange tells its user. */
export interface DestinationResponder {
  /** The final response head (interim 1xx responses are skipped). */
  readonly head: (status: number, header: GoHeader, contentLength: number) => void
  /**
   * Response body bytes, decoded; `end` marks the last call (`chunk` may then be empty). `chunk` is a view
   * of a buffer the next read reuses: copy it during the call, or call `holdChunk()`.
   */
  readonly data: (chunk: Buffer, end: boolean) => void
  /** The exchange failed; `responded` when the head was already given (the body is then incomplete). */
  readonly failed: (message: string, responded: boolean) => void
  /** The destination takes request body again (after `write` returned false). */
  readonly drained: () => void
}

/** A request in flight to a destination, whichever way it is performed. */
export interface DestinationCall {
  /** Request body bytes; false: wait for the responder's `drained`. */
  readonly write: (chunk: Buffer) => boolean
  /** The request body is complete. */
  readonly end: () => void
  /** Stops and restarts reading the response. */
  readonly pause: () => void
  readonly resume: () => void
  /** The chunk last given to `data` is still referenced (it is not reused for a later read). */
  readonly holdChunk: () => void
  /** Abandons the request; nothing more is reported. */
  readonly destroy: () => void
}

/** Connection pools per destination, bounded in number; closed with the client. */
export class DestinationPools {
  private readonly pools = new Map<string, UpstreamPool>()
  private readonly maxSockets: number
  private readonly maxFreeSockets: number
  private closed = false

  constructor(maxSockets: number, maxFreeSockets: number) {
    this.maxSockets = maxSockets
    this.maxFreeSockets = maxFreeSockets
  }

  /** Grants `waiter` a connection to `target` (pooled while fewer than `MAX_DESTINATION_POOLS` exist). */
  acquire(target: DestinationTarget, waiter: ConnectionWaiter, fresh: boolean): void {
    if (this.closed) return waiter.refused("wsp-client is shutting down")
    const key = `${target.secure ? "https" : "http"}\u0000${target.host}\u0000${target.port}`
    let pool = this.pools.get(key)
    if (pool === undefined) {
      const limits = { maxSockets: this.maxSockets, maxFreeSockets: this.maxFreeSockets }
      const upstream = target.secure ? tlsUpstream(target.host, target.port, limits) : tcpUpstream(target.host, target.port, limits)
      if (this.pools.size >= MAX_DESTINATION_POOLS) return waiter.granted(PooledConnection.open(upstream, undefined))
      pool = new UpstreamPool(upstream, this.maxSockets, this.maxFreeSockets, (empty) => {
        if (this.pools.get(key) === empty) this.pools.delete(key)
      })
      this.pools.set(key, pool)
    }
    pool.acquire(waiter, fresh)
  }

  /** Destinations with a pool now. */
  get size(): number {
    return this.pools.size
  }

  /** Closes idle connections and refuses waiters; connections in use close with their exchanges. */
  close(): void {
    this.closed = true
    for (const pool of this.pools.values()) pool.close()
    this.pools.clear()
  }
}

const errorText = (err: (Error & { code?: string }) | undefined): string => err?.message ?? "connection closed by the destination"

const WAITING = 0
const HEAD = 1
const BODY = 2
const DONE = 3

/** One request and its response on a pooled connection. */
export class DestinationExchange implements ConnectionOwner, ConnectionWaiter, DestinationCall {
  private readonly pools: DestinationPools
  private readonly target: DestinationTarget
  private readonly method: string
  private readonly head: Buffer
  private readonly framing: RequestBodyFraming
  private readonly responder: DestinationResponder
  private readonly maxHeaders: number
  private phase = WAITING
  private conn: PooledConnection | undefined = undefined
  /** Request body written before a connection was granted. */
  private pending: Array<Buffer> = []
  private pendingBytes = 0
  private requestEnded = false
  /** A `write` returned false: `drained` is owed. */
  private owesDrain = false
  private paused = false
  private retried = false
  private received = 0
  private interim = 0
  private reader: HeadReader<ResponseHead> | undefined = undefined
  private framer: BodyFramer | undefined = undefined
  /** The response body is chunk-coded: its data runs come through `onRun`. */
  private chunked = false
  private keepAlive = false
  /**
   * The last body run of the current read, passed on once the next run (or the read's end) shows
   * whether it is the body's last, so that the last frame carries FIN.
   */
  private run: Buffer | undefined = undefined
  /** The read being decoded (chunk data runs are views of it). */
  private current: Buffer = EMPTY

  constructor(
    pools: DestinationPools,
    target: DestinationTarget,
    method: string,
    head: Buffer,
    framing: RequestBodyFraming,
    maxHeaders: number,
    responder: DestinationResponder
  ) {
    this.pools = pools
    this.target = target
    this.method = method
    this.head = head
    this.framing = framing
    this.maxHeaders = maxHeaders
    this.responder = responder
  }

  /** Asks for a connection; the head goes out once one is granted. */
  start(): void {
    this.pools.acquire(this.target, this, false)
  }

  /** Request body bytes (raw; chunk-coded here when the length is unknown). False: wait for `drained`. */
  write(chunk: Buffer): boolean {
    if (this.phase === DONE || this.requestEnded || chunk.length === 0) return true
    const conn = this.conn
    if (conn === undefined) {
      this.pending.push(chunk)
      this.pendingBytes += chunk.length
      if (this.pendingBytes < DESTINATION_PENDING_BODY_BYTES) return true
      this.owesDrain = true
      return false
    }
    const ok = this.send(conn, chunk)
    if (!ok) this.owesDrain = true
    return ok
  }

  /** The request body is complete. */
  end(): void {
    if (this.phase === DONE || this.requestEnded) return
    this.requestEnded = true
    const conn = this.conn
    if (conn !== undefined && this.framing === "Chunked") conn.socket.write(LAST_CHUNK)
  }

  /** Stops reading the response (the receiver is behind). */
  pause(): void {
    if (this.paused) return
    this.paused = true
    this.conn?.socket.pause()
  }

  resume(): void {
    if (!this.paused) return
    this.paused = false
    if (this.phase !== DONE) this.conn?.socket.resume()
  }

  /** The chunk last given to `data` is still referenced: the next read goes into a fresh buffer. */
  holdChunk(): void {
    this.conn?.holdRead()
  }

  /** Abandons the exchange; its connection is closed, nothing more is reported. */
  destroy(): void {
    if (this.phase === DONE) return
    this.phase = DONE
    const conn = this.conn
    this.conn = undefined
    if (conn !== undefined) {
      conn.owner = undefined
      conn.destroy()
    }
    this.pending = []
  }

  // ---- ConnectionWaiter ----

  readonly granted = (conn: PooledConnection): void => {
    if (this.phase === DONE) {
      if (conn.pool !== undefined) conn.pool.release(conn, conn.usable())
      else conn.destroy()
      return
    }
    this.conn = conn
    conn.owner = this
    this.phase = HEAD
    this.reader = new HeadReader({ maxHeaderSize: DESTINATION_MAX_HEAD_BYTES, maxHeadersCount: this.maxHeaders }, parseResponseHead, 502)
    const socket = conn.socket
    if (this.paused) socket.pause()
    else socket.resume()
    socket.cork()
    socket.write(this.head)
    let ok = true
    for (const chunk of this.pending) ok = this.send(conn, chunk)
    if (this.requestEnded && this.framing === "Chunked") socket.write(LAST_CHUNK)
    socket.uncork()
    this.pending = []
    this.pendingBytes = 0
    if (ok && this.owesDrain) {
      this.owesDrain = false
      this.responder.drained()
    }
  }

  readonly refused = (message: string): void => {
    if (this.phase === DONE) return
    this.phase = DONE
    this.responder.failed(message, false)
  }

  // ---- ConnectionOwner ----

  readonly upstreamDrain = (): void => {
    if (!this.owesDrain || this.phase === DONE) return
    this.owesDrain = false
    this.responder.drained()
  }

  readonly upstreamData = (chunk: Buffer): void => {
    this.received += chunk.length
    if (this.phase === BODY) return this.body(chunk, 0)
    if (this.phase !== HEAD) return
    let step = this.reader!.push(chunk)
    for (;;) {
      if (step._tag === "Need") return
      if (step._tag === "Error") return this.fail(`malformed HTTP response: ${step.error.message}`)
      const head = step.head
      if (head.status === 101) return this.fail("unexpected 101 Switching Protocols")
      if (head.status < 200) {
        if (++this.interim > DESTINATION_MAX_INTERIM_RESPONSES) return this.fail("too many interim responses")
        if (step.rest.length === 0) return
        step = this.reader!.push(step.rest)
        continue
      }
      return this.startBody(head, step.rest)
    }
  }

  readonly upstreamEnd = (): void => {
    const framer = this.framer
    if (this.phase === BODY && framer !== undefined && framer.closeDelimited) {
      this.keepAlive = false
      framer.done = true
      return this.complete(false)
    }
    // anything else ending here is cut short: `close` follows and reports it
    this.conn?.destroy()
  }

  readonly upstreamClose = (error: (Error & { code?: string }) | undefined): void => {
    const conn = this.conn
    if (conn === undefined || this.phase === DONE) return
    this.conn = undefined
    if (this.phase === HEAD && this.received === 0 && conn.reused && !this.retried && this.framing === "None") {
      // a kept-alive connection the destination closed while idle: nothing was processed, try a fresh one
      this.retried = true
      this.phase = WAITING
      this.pools.acquire(this.target, this, true)
      return
    }
    const responded = this.phase === BODY
    this.phase = DONE
    this.responder.failed(responded ? `response body failed: ${errorText(error)}` : errorText(error), responded)
  }

  // ---- internals ----

  private send(conn: PooledConnection, chunk: Buffer): boolean {
    const socket = conn.socket
    if (this.framing !== "Chunked") return socket.write(chunk)
    socket.cork()
    socket.write(`${chunk.length.toString(16)}\r\n`, "latin1")
    socket.write(chunk)
    const ok = socket.write(CRLF)
    socket.uncork()
    return ok
  }

  private startBody(head: ResponseHead, rest: Buffer): void {
    const framing = responseFraming(this.method, head)
    this.framer = new BodyFramer(framing, DESTINATION_MAX_TRAILER_BYTES, 502)
    this.chunked = framing._tag === "Chunked"
    this.keepAlive = head.keepAlive && head.versionMinor === 1
    this.phase = BODY
    this.responder.head(head.status, goHeaderFromFields(head.headers), responseContentLength(head.contentLength, framing._tag === "None"))
    if (this.phase !== BODY) return
    if (this.framer.done) {
      this.responder.data(EMPTY, true)
      return this.complete(rest.length === 0)
    }
    if (rest.length > 0) this.body(rest, 0)
  }

  private readonly onRun = (start: number, end: number): void => {
    const previous = this.run
    this.run = this.current.subarray(start, end)
    if (previous !== undefined) this.responder.data(previous, false)
  }

  private body(chunk: Buffer, from: number): void {
    const framer = this.framer!
    this.current = chunk
    this.run = undefined
    const n = framer.consume(chunk, from, this.chunked ? this.onRun : undefined)
    if (typeof n !== "number") return this.fail(`malformed response body: ${n.message}`)
    if (this.phase !== BODY) return
    // Content-Length and close-delimited bodies are passed on as they are
    if (!this.chunked && n > 0) this.run = from === 0 && n === chunk.length ? chunk : chunk.subarray(from, from + n)
    const last = this.run ?? EMPTY
    this.run = undefined
    this.current = EMPTY
    if (last.length > 0 || framer.done) this.responder.data(last, framer.done)
    if (framer.done && this.phase === BODY) this.complete(from + n === chunk.length)
  }

  private complete(clean: boolean): void {
    this.phase = DONE
    const conn = this.conn
    this.conn = undefined
    if (conn === undefined) return
    conn.owner = undefined
    if (this.paused) conn.socket.resume()
    const reusable = clean && this.keepAlive && this.requestEnded
    if (conn.pool !== undefined) conn.pool.release(conn, reusable)
    else conn.destroy()
  }

  private fail(message: string): void {
    const responded = this.phase === BODY
    this.destroy()
    this.responder.failed(message, responded)
  }
}
