/**
 * One client connection's state in the raw HTTP/1.1 engine: where it is in its loop (head, admission,
 * waiting for an upstream connection, exchange, tunnel, closed), the exchange in progress, its timers,
 * and the one way an exchange ends early (`fail`: an error answer, then the close) or is reported
 * (`observed`, `onEnd`). It reads and writes no bytes itself: `RequestSide` reads the client,
 * `ClientConnection` relays the upstream, `ConnectionLimits` times them.
 */
import { Buffer } from "node:buffer"
import { performance } from "node:perf_hooks"
import type * as net from "node:net"
import { clientKey, type ClientLimits } from "../../../domain/ClientLimits.ts"
import { type BodyFramer, type HeadReader, type RequestHead, requestHeadReader, type ResponseHead } from "../../../domain/Http1Parser.ts"
import { Deadline } from "../../Deadline.ts"
import { writeRawError } from "../ErrorResponse.ts"
import { closeAfterFlush } from "../Flush.ts"
import { flushTurn } from "../TurnWrites.ts"
import type { ConnectionWaiter, PooledConnection, UpstreamPool } from "../UpstreamPool.ts"
import type { EngineCore, Http1Exchange, Http1ExchangeEnd, Http1Front, Http1Outgoing, Http1Request } from "./Admission.ts"

/** Reading a request head (or waiting for the next one on a kept-alive connection). */
export const HEAD = 0
/** Waiting for an upstream connection. */
export const WAITING = 1
/** Request and response under way on an upstream connection. */
export const EXCHANGE = 2
/** A `101` made the connection a raw pipe. */
export const TUNNEL = 3
export const CLOSED = 4
/** Waiting for a pending admission. */
export const ADMITTING = 5

/** What a connection needs of the server that accepted it. */
export interface ConnectionHost {
  /** The server is shutting down: new requests are answered 503. */
  readonly closing: boolean
  readonly clientLimits: ClientLimits
  /** Checks `c`'s data rates on the server's heartbeat until it has nothing left to watch. */
  watch(c: ConnectionState): void
  /** `c` closed or was handed off. */
  forget(c: ConnectionState): void
}

/** One client connection: a loop of request → upstream exchange → response, then the next request. */
export abstract class ConnectionState implements ConnectionWaiter {
  readonly socket: net.Socket
  readonly core: EngineCore
  readonly front: Http1Front
  readonly server: ConnectionHost
  protected readonly reader: HeadReader<RequestHead>
  protected phase = HEAD
  /** Bytes received beyond the message being handled (the start of the next request, or an early body). */
  protected pending: Buffer | undefined = undefined
  protected clientEnded = false
  /** The head, keep-alive and request body timeouts (one at a time). */
  protected readonly clientTimer = new Deadline()
  /** The response and idle timeouts (one at a time). */
  protected readonly upTimer = new Deadline()

  // The exchange in progress.
  protected request: RequestHead | undefined = undefined
  /** The request being served is a `HEAD`: an error answered to it has no body. */
  protected headRequest = false
  protected head: Buffer | undefined = undefined
  protected outgoing: Http1Outgoing | undefined = undefined
  protected requestFramer: BodyFramer | undefined = undefined
  protected requestDone = false
  protected pool: UpstreamPool | undefined = undefined
  protected conn: PooledConnection | undefined = undefined
  protected responseReader: HeadReader<ResponseHead> | undefined = undefined
  protected responseFramer: BodyFramer | undefined = undefined
  protected responseStarted = false
  protected responseHeadSent = false
  protected upstreamBytes = 0
  protected closeAfter = false
  protected retryable = false
  protected retried = false
  /** The request as admitted (kept for a second decision when the upstream refuses it unsent). */
  protected incoming: Http1Request | undefined = undefined
  /** This exchange was already moved once after an upstream refused it unsent. */
  protected rerouted = false
  protected upgrading = false
  protected idleTimeoutMs = 0
  protected responseTimeoutMs = 0
  protected counted = false
  protected waitingDrain = false
  protected upstreamPaused = false
  /** Between keep-alive requests: the first byte of the next head switches to the head timeout. */
  protected awaitingFirstByte = false
  /** The upstream may carry another exchange after this response. */
  protected responseKeepAlive = true
  /** Interim responses relayed for this request. */
  protected interim = 0
  /** Cancels a pending admission (the client left while it was waiting). */
  protected cancelAdmission: (() => void) | undefined = undefined
  /** The admission's `onEnd`, until called. */
  protected onEnd: (() => void) | undefined = undefined
  /** The admission's `observe`, until called. */
  protected observer: ((exchange: Http1Exchange) => void) | undefined = undefined
  /** The admission's `responseHeaders`. */
  protected extraHeaders: ReadonlyArray<string> | undefined = undefined
  /** Bytes of the request head being read (counted before it is complete). */
  protected headBytes = 0
  /** The key this client's upstream slots are counted under (see `clientKey`). */
  readonly client: string | undefined
  /** Most connections of the pool being waited for this client may hold. */
  slotLimit: number | undefined = undefined
  /** Bounds the wait for a pooled connection. */
  protected slotTimer: NodeJS.Timeout | undefined = undefined
  // What the exchange in progress moved, and since when (for `observe`).
  protected receivedBytes = 0
  protected sentBytes = 0
  protected status = 0
  protected startedAt = 0

  constructor(socket: net.Socket, core: EngineCore, front: Http1Front, server: ConnectionHost) {
    this.socket = socket
    this.core = core
    this.front = front
    this.server = server
    this.client = clientKey(socket.remoteAddress)
    this.reader = requestHeadReader(front.limits)
  }

  /** A pooled connection for this exchange (see `ConnectionWaiter`). */
  abstract readonly granted: (conn: PooledConnection) => void
  /** No pooled connection for this exchange (see `ConnectionWaiter`). */
  abstract readonly refused: (message: string) => void
  /** Takes the client's bytes (the socket's `data` listener until the exchange is answered or tunnelled). */
  protected abstract readonly onClientData: (chunk: Buffer) => void
  /** The periodic rate check (see `ConnectionHost.watch`); returns whether there is still something to watch. */
  abstract check(now: number): boolean
  /** The exchange with an upstream reached by messages ends without its response (see `MessageSide`). */
  protected abstract leaveMessage(): void

  /** Whether nothing is in flight (a keep-alive connection between requests, its last answer written). */
  idle(): boolean {
    return this.betweenRequests() && this.socket.writableCorked === 0
  }

  /** Whether the connection waits for its next request (its last answer may still wait for the turn's end). */
  protected betweenRequests(): boolean {
    return this.phase === HEAD && this.reader.buffered === 0 && this.pending === undefined
  }

  /**
   * Shutdown: an idle connection closes now, one whose last answer leaves at the end of this turn once
   * that answer is out, a busy one after its exchange.
   */
  drain(): void {
    if (this.idle()) this.socket.destroy()
    else if (this.betweenRequests()) {
      this.phase = CLOSED
      this.clearTimers()
      closeAfterFlush(this.socket)
    } else this.closeAfter = true
  }

  destroy(): void {
    this.destroyClient()
    this.conn?.destroy()
  }

  /** Destroys the client socket once what this turn wrote to it has gone out (see `TurnWrites`). */
  protected destroyClient(): void {
    flushTurn(this.socket)
    this.socket.destroy()
  }

  // ---- how an exchange ends ----

  /** Ends the exchange with an error answer when no response head went out, else cuts the connection. */
  protected abandon(status: number, message: string): void {
    const conn = this.conn
    this.conn = undefined
    if (conn !== undefined) {
      conn.owner = undefined
      conn.destroy()
    }
    if (this.responseHeadSent) this.destroy()
    else this.fail(status, message)
  }

  /** Answers an error and closes the connection after it; nothing more is read. */
  protected fail(status: number, message: string): void {
    this.clearTimers()
    if (this.pool !== undefined) {
      this.pool.cancel(this)
      this.pool = undefined
    }
    const conn = this.conn
    this.conn = undefined
    if (conn !== undefined) {
      conn.owner = undefined
      conn.destroy()
    }
    const cancel = this.cancelAdmission
    this.cancelAdmission = undefined
    cancel?.()
    this.leaveMessage()
    this.finishCount()
    this.phase = CLOSED
    this.pending = undefined
    this.socket.off("data", this.onClientData)
    this.socket.resume() // discard what else arrives until the client reads the answer and leaves
    if (this.observer !== undefined) {
      const socket = this.socket as net.Socket & { bytesWritten?: number }
      const before = socket.bytesWritten ?? 0
      writeRawError(this.socket, this.core.errors, status, message, this.headRequest)
      this.sentBytes += Math.max(0, (socket.bytesWritten ?? 0) - before)
      // An answer after a relayed response head cannot happen (the connection is cut instead).
      this.status = status
      this.observed("Refused")
    } else {
      writeRawError(this.socket, this.core.errors, status, message, this.headRequest)
    }
    this.endAdmission()
    closeAfterFlush(this.socket)
  }

  /** Reports the exchange to the admission's observer, once. */
  protected observed(end: Http1ExchangeEnd): void {
    const observe = this.observer
    if (observe === undefined) return
    this.observer = undefined
    this.extraHeaders = undefined
    const request = this.request
    observe({
      method: request?.method ?? "",
      target: request?.target ?? "",
      status: end === "Aborted" && !this.responseHeadSent ? 0 : this.status,
      receivedBytes: this.receivedBytes,
      sentBytes: this.sentBytes,
      durationMs: performance.now() - this.startedAt,
      end
    })
  }

  protected endAdmission(): void {
    const onEnd = this.onEnd
    if (onEnd !== undefined) {
      this.onEnd = undefined
      onEnd()
    }
  }

  protected finishCount(): void {
    if (this.counted) {
      this.counted = false
      this.core.requestFinished()
    }
  }

  protected resetExchange(): void {
    this.headRequest = false
    this.request = undefined
    this.incoming = undefined
    this.rerouted = false
    this.extraHeaders = undefined
    this.outgoing = undefined
    this.head = undefined
    this.requestFramer = undefined
    this.responseReader = undefined
    this.responseFramer = undefined
    this.waitingDrain = false
  }

  // ---- timers ----

  protected armClient(ms: number, fire: () => void): void {
    this.clientTimer.arm(ms, fire)
  }

  protected clearClientTimer(): void {
    this.clientTimer.cancel()
  }

  protected armUp(ms: number, fire: () => void): void {
    this.upTimer.arm(ms, fire)
  }

  protected clearUpTimer(): void {
    this.upTimer.cancel()
  }

  protected clearSlotTimer(): void {
    if (this.slotTimer !== undefined) {
      clearTimeout(this.slotTimer)
      this.slotTimer = undefined
    }
  }

  /** Clears every timer: the connection is done with them (closing, or handed off). */
  protected clearTimers(): void {
    this.clientTimer.dispose()
    this.upTimer.dispose()
    this.clearSlotTimer()
  }
}
