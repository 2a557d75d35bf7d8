/**
 * A WebSocket as a Transport `Connection`, so the control-port protocol (handshake + yamux) can run
 * through HTTP-only networks: bytes travel in binary messages of at most `MaxMessageBytes` (message
 * boundaries carry no meaning; a text message is refused with 1003), reads pause where the consumer
 * asks, a write reports done once its messages went out to the socket (its chunks are then no longer
 * referenced: `releasesOnDone`), pings keep proxies from
 * idling the connection out, and close codes become typed errors. Frames are switchyard's own
 * (`WebSocketEndpoint`); opening one is `WebSocketOpen.ts`, dialing with proxies `WebSocketDial.ts`.
 */
import { Buffer } from "node:buffer"
import { Deferred, Duration, Effect, Option } from "effect"
import type { Scope } from "effect"
import { CloseCode, WebSocketError } from "../../domain/WebSocketClose.ts"
import type { ReadHolds } from "../ReadLease.ts"
import { type Address, type Connection, type ConnectionHandlers, TransportError } from "../Transport.ts"
import type { WebSocketEndpoint } from "./WebSocketEndpoint.ts"

/**
 * Largest message a sender puts on the wire: one full yamux data frame (64 KiB payload and its 12-byte
 * header). Bigger batches are split.
 */
export const MaxMessageBytes = 64 * 1024 + 12
/** Largest message a receiver accepts; a bigger one is closed with 1009. */
export const DefaultMaxPayload = 1024 * 1024
/** Time between pings (0 turns keepalive off). */
export const DefaultKeepaliveInterval: Duration.Duration = Duration.seconds(20)
/** Time a ping has to be answered before the connection is closed as dead. */
export const DefaultKeepaliveTimeout: Duration.Duration = Duration.seconds(10)
/** Chunks smaller than this are joined into one message (one copy); bigger ones go out as they are. */
export const JoinBelowBytes = 4 * 1024

export interface WebSocketConnectionOptions {
  readonly maxPayload?: number | undefined
  /** Largest message this side sends (default `MaxMessageBytes`; the peer's `maxPayload` must allow it). */
  readonly maxMessageBytes?: number | undefined
  readonly keepaliveInterval?: Duration.Input | undefined
  readonly keepaliveTimeout?: Duration.Input | undefined
  readonly localAddress?: Address | undefined
  readonly remoteAddress?: Address | undefined
}

/** A Connection over a WebSocket, with the typed reason it closed. */
export interface WebSocketConnection extends Connection {
  readonly endpoint: WebSocketEndpoint
  /** Why it closed, once it closed with an error (close code, keepalive, refused message). */
  readonly closeError: () => WebSocketError | undefined
}

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

const closedError = () => new TransportError({ reason: "Closed", message: "websocket closed" })
const noop = (): void => {}

class WsConnection implements WebSocketConnection {
  readonly endpoint: WebSocketEndpoint
  readonly localAddress: Address | undefined
  readonly remoteAddress: Address | undefined
  private handlers: ConnectionHandlers | undefined
  private ending = false
  private finalError: WebSocketError | undefined
  private isClosed = false
  /** Writes waiting for their messages to go out (failed if the connection closes first). */
  private readonly drainWaiters = new Set<(error?: TransportError) => void>()
  /** Set while a ping is unanswered. */
  onPong: (() => void) | undefined

  constructor(endpoint: WebSocketEndpoint, options: WebSocketConnectionOptions) {
    this.endpoint = endpoint
    this.localAddress = options.localAddress
    this.remoteAddress = options.remoteAddress
  }

  private onClosed(error: WebSocketError | undefined): void {
    this.isClosed = true
    this.finalError = error
    const failure = error === undefined ? closedError() : toTransportError(error)
    const waiters = [...this.drainWaiters]
    this.drainWaiters.clear()
    for (const w of waiters) w(failure)
    this.onPong?.()
    const h = this.handlers!
    if (error === undefined) {
      h.onEnd()
      h.onClose(undefined)
    } else h.onClose(failure)
  }

  /** Fails the connection with `error`: its close code goes out (or, with `terminate`, the socket is cut). */
  fail(error: WebSocketError, terminate = false): void {
    if (terminate) this.endpoint.terminate(error)
    else this.endpoint.fail(error)
  }

  readonly start = (handlers: ConnectionHandlers): void => {
    this.handlers = handlers
    const endpoint = this.endpoint
    const retains = handlers.retainsReads === true
    const holds: ReadHolds = { retain: () => endpoint.retainRead() }
    endpoint.start({
      text: noop,
      binaryStart: noop,
      binaryData: retains ? (payload) => void handlers.onData(payload, holds) : (payload) => void handlers.onData(payload),
      binaryEnd: noop,
      pong: () => this.onPong?.(),
      closed: (error) => this.onClosed(error),
      // a consumer that retains what it keeps lets the endpoint give each read back once done
      retainsReads: retains
    })
  }

  readonly pause = (): void => this.endpoint.pause()

  readonly resume = (): void => this.endpoint.resume()

  readonly write = (chunks: ReadonlyArray<Uint8Array>, done: (error?: TransportError) => void): void => {
    const endpoint = this.endpoint
    if (this.isClosed || this.ending || !endpoint.open) {
      queueMicrotask(() => done(closedError()))
      return
    }
    let waiting = true
    const waiter = (error?: TransportError) => {
      if (!waiting) return
      waiting = false
      this.drainWaiters.delete(waiter)
      done(error)
    }
    this.drainWaiters.add(waiter)
    endpoint.sendMessages(chunks, (error) => waiter(error ? new TransportError({ reason: "Io", message: `websocket write failed: ${error.message}` }) : undefined))
  }

  readonly releasesOnDone = true

  readonly end = (): void => {
    if (this.isClosed || this.ending) return
    this.ending = true
    this.endpoint.close(CloseCode.Normal)
  }

  readonly destroy = (): void => {
    this.endpoint.terminate()
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
      conn.endpoint.ping()
      const answered = yield* Deferred.await(pong).pipe(Effect.timeoutOption(timeout))
      conn.onPong = undefined
      if (conn.closed()) return
      if (Option.isNone(answered) && !conn.endpoint.isPaused) {
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
 * Wraps an open WebSocket endpoint. Keepalive runs in the scope; closing the scope terminates it.
 * Reads start when the consumer calls `start`.
 */
export const fromEndpoint = (
  endpoint: WebSocketEndpoint,
  options: WebSocketConnectionOptions = {}
): Effect.Effect<WebSocketConnection, never, Scope.Scope> =>
  Effect.gen(function*() {
    const conn = new WsConnection(endpoint, options)
    yield* Effect.addFinalizer(() => Effect.sync(() => endpoint.terminate()))
    const interval = Duration.fromInputUnsafe(options.keepaliveInterval ?? DefaultKeepaliveInterval)
    const timeout = Duration.fromInputUnsafe(options.keepaliveTimeout ?? DefaultKeepaliveTimeout)
    if (Duration.toMillis(interval) > 0) yield* Effect.forkScoped(keepalive(conn, interval, timeout))
    return conn
  })
