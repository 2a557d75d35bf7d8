/**
 * The raw HTTP/1.1 proxy engine: takes client sockets as they are accepted, parses only request and
 * response heads (`Http1Parser`), asks the caller what to do with each request, rewrites the head
 * (hop-by-hop headers, `X-Forwarded-*`) and moves body bytes unchanged between the client and a pooled
 * upstream connection, with backpressure, keep-alive and pipelining in order, and `101` turned into a
 * raw half-closable pipe. A decision may take time (`admit` returns a pending admission, e.g. while a
 * route waits for a backend): the connection then reads nothing more until it is made. An admission may
 * ask to be told how its exchange went (status, bytes, duration) and add response headers. One client
 * cannot hold what all share (`ClientLimits`): request bodies and response reads below a minimum rate are
 * cut, a client address holds a bounded share of a pool's connections, and the wait for one is bounded.
 * It does not route, authorise or count (the caller's `admit`, `observe` and `onClientLimit` do) and
 * never decodes bodies.
 */
import type * as net from "node:net"
import type { Duplex } from "node:stream"
import {
  CLIENT_LIMIT_DEFAULTS,
  clientKey,
  type ClientLimitKind,
  type ClientLimits,
  RATE_CHECK_INTERVAL_MS,
  requestBodyTooSlow,
  responseTakeDeadlineMs,
  slotsPerClient
} from "../../domain/ClientLimits.ts"
import {
  BodyFramer,
  type HeadReader,
  type Http1Error,
  type RequestHead,
  requestHeadReader,
  type ResponseHead,
  responseFraming,
  responseHeadReader
} from "../../domain/Http1Parser.ts"
import { type ForwardedMode, requestHeaders, responseHeaders } from "../../domain/HttpHeaders.ts"
import { contentLengthValues } from "../../domain/ContentLength.ts"
import { type ErrorRenderer, writeRawError } from "./ErrorResponse.ts"
import { closeAfterFlush } from "./Flush.ts"
import type { HttpLimits } from "./FrontServer.ts"
import { connectionRefusal, type Upstream } from "./Upstream.ts"
import { type ConnectionOwner, type ConnectionWaiter, PooledConnection, type UpstreamPool } from "./UpstreamPool.ts"

/** A request as the engine parsed it, for the caller's decision. */
export interface Http1Request {
  readonly method: string
  /** The request target as sent. */
  readonly target: string
  /** The target in origin form (`/path?query`): what is forwarded unless the admission rewrites it. */
  readonly originTarget: string
  /** 0 for HTTP/1.0, 1 for HTTP/1.1. */
  readonly versionMinor: number
  /** Flat `[name, value, ...]` as received. */
  readonly headers: ReadonlyArray<string>
  readonly host: string | undefined
  readonly contentType: string | undefined
  /** The `Upgrade` value when the request asks to switch protocols. */
  readonly upgrade: string | undefined
  /** The client connection (for its address, or marks the caller set when it was accepted). */
  readonly socket: Duplex
}

/** The outgoing request a `Http1Director` may rewrite (same shape as the Node path's). */
export interface Http1Outgoing {
  method: string
  path: string
  headers: Array<string>
  upstream: Upstream
}

/**
 * How an observed exchange ended: its response complete, the connection cut before that (the client
 * left, a timeout, a broken body), answered by the engine itself with an error (upstream unreachable,
 * refused or too slow), or switched to a raw tunnel by a `101`.
 */
export type Http1ExchangeEnd = "Complete" | "Aborted" | "Refused" | "Upgraded"

/** One exchange as observed when it is over (see `Admission.Forward.observe`). */
export interface Http1Exchange {
  readonly method: string
  /** The request target as the client sent it. */
  readonly target: string
  /** The final status sent to the client; 0 when none was sent (aborted before a response head). */
  readonly status: number
  /** Bytes read from the client for this exchange: request head and body. */
  readonly receivedBytes: number
  /** Bytes written to the client for this exchange: interim and final heads, body, or an error answer. */
  readonly sentBytes: number
  /** From the request head parsed to the exchange's end (ms). */
  readonly durationMs: number
  readonly end: Http1ExchangeEnd
}

/** What to do with a request: forward it (optionally rewritten) or refuse it with a status. */
export type Admission =
  | {
    readonly _tag: "Forward"
    /** Overrides the client's target (e.g. a canonicalised path). */
    readonly path?: string | undefined
    /** Overrides the idle limit for this request (ms; 0 = none). */
    readonly idleTimeoutMs?: number | undefined
    /** Overrides the time allowed for the response head (ms; 0 = none). */
    readonly responseTimeoutMs?: number | undefined
    /** Rewrites the outgoing request (upstream, path, headers). */
    readonly director?: ((outgoing: Http1Outgoing, incoming: Http1Request) => void) | undefined
    /**
     * Called once when the exchange is over: the response complete, an error answered, the client gone,
     * or (for an upgrade) the tunnel closed. Releases what the decision took (a backend lease).
     */
    readonly onEnd?: (() => void) | undefined
    /**
     * Headers added to the final response head written to the client, as flat `[name, value, ...]`;
     * each replaces the upstream's headers of the same name (e.g. the request id the caller chose).
     */
    readonly responseHeaders?: ReadonlyArray<string> | undefined
    /**
     * Called once when the exchange is over, before `onEnd`, with its status, byte counts, duration and
     * how it ended (for an upgrade: when the `101` is relayed). The engine measures nothing more without it.
     */
    readonly observe?: ((exchange: Http1Exchange) => void) | undefined
  }
  | { readonly _tag: "Refuse"; readonly status: number; readonly message: string }
  | {
    /**
     * Gives the client connection to another server from this request on (a backend the engine cannot
     * reach, served by Node's `http` objects): `take` gets the socket, paused, and the bytes read for
     * this request and after it (the head as received, then any body or pipelined bytes), to be put back
     * with `socket.unshift` before that server takes the socket.
     */
    readonly _tag: "Handoff"
    readonly take: (socket: net.Socket, bytes: Buffer) => void
    /** Called instead of `take` when the client left before the decision arrived. */
    readonly onAbandon?: (() => void) | undefined
  }

/**
 * A decision not made yet. `wait` is called once with the callback that takes the decision (at most
 * once, possibly at once) and returns a canceller, called if the client leaves first; the client
 * connection reads nothing more meanwhile. The caller bounds the wait (an answer such as 503 or 504 on
 * its own limits); the engine's response timeout starts once the request is forwarded.
 */
export interface PendingAdmission {
  readonly _tag: "Pending"
  readonly wait: (decide: (admission: Admission) => void) => () => void
}

/** A client refused or cut by one of the `ClientLimits` (or the head timeout), for logs and metrics. */
export interface ClientLimitEvent {
  readonly limit: ClientLimitKind
  /** The client's address ("local" for a Unix-socket peer). */
  readonly client: string
  /** The request concerned ("" for a head that never completed). */
  readonly method: string
  readonly target: string
}

/** A front door's side of the engine: its limits and its decision for each request. */
export interface Http1Front {
  readonly limits: HttpLimits
  readonly admit: (request: Http1Request) => Admission | PendingAdmission
  /** Data-rate and upstream-slot limits per client (default `CLIENT_LIMIT_DEFAULTS`). */
  readonly clientLimits?: ClientLimits | undefined
  /** Told each time a client limit refuses a request or cuts a connection. */
  readonly onClientLimit?: ((event: ClientLimitEvent) => void) | undefined
}

/** The engine serving one front door's listeners. */
export interface Http1Server {
  /** Serves a newly accepted client connection (call from `net.Server`'s `connection` event). */
  readonly accept: (socket: net.Socket) => void
  /** Stops taking requests, lets those in flight finish for up to `drainMs`, then closes everything left. */
  readonly close: (drainMs: number) => Promise<void>
  /** Client connections open. */
  readonly connections: () => number
  /** Whether `socket` is a connection of this server waiting for its next request (nothing in flight). */
  readonly betweenRequests: (socket: net.Socket) => boolean
}

/** What the engine shares with the forwarder that made it. */
export interface EngineCore {
  readonly upstream: Upstream
  readonly forwardedMode: ForwardedMode
  readonly responseTimeoutMs: number
  readonly idleTimeoutMs: number
  readonly errors: ErrorRenderer
  readonly report: (message: string) => void
  /** The pool for an upstream (one per upstream object, created on first use). */
  readonly poolFor: (upstream: Upstream) => UpstreamPool
  /** Live raw tunnels, closed with the forwarder. */
  readonly tunnels: Set<Duplex>
  /** Counts exchanges in flight. */
  readonly requestStarted: () => void
  readonly requestFinished: () => void
  readonly isClosed: () => boolean
}

/** Largest body an upgrade request may carry (exec start sends a small JSON object). */
export const ENGINE_MAX_UPGRADE_BODY = 64 * 1024
/** Time allowed for an upgrade request's body to arrive (ms). */
export const ENGINE_UPGRADE_BODY_TIMEOUT_MS = 30_000
/** Most bytes of pipelined requests held while a response is in flight (the client is paused beyond). */
export const MAX_PIPELINED_BYTES = 256 * 1024

/**
 * Bytes queued on the receiving socket (client or upstream) above which the sending side stops being
 * read; it is read again once the queue is written out. Higher than a socket's own high-water mark so a
 * large read is not paused for every partially written chunk; with one read in flight it bounds what a
 * slow reader holds per connection.
 */
export const WRITE_QUEUE_PAUSE_BYTES = 512 * 1024

/** Most interim (1xx) responses relayed for one request; an upstream sending more is answered 502. */
export const MAX_INTERIM_RESPONSES = 16
/** Response bodies up to this size that arrive with their head are copied into one write with it. */
const COALESCE_BYTES = 16 * 1024
/** Methods a request may be repeated with when its pooled connection failed before any answer. */
const IDEMPOTENT: ReadonlySet<string> = new Set(["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
const CONTINUE = Buffer.from("HTTP/1.1 100 Continue\r\n\r\n", "latin1")

const HEAD = 0
const WAITING = 1
const EXCHANGE = 2
const TUNNEL = 3
const CLOSED = 4
/** Waiting for a pending admission. */
const ADMITTING = 5

const errorText = (err: (Error & { code?: string }) | undefined): string => err === undefined ? "connection closed" : err.code ?? err.message

/** The head sent upstream. */
const requestHeadBytes = (out: Http1Outgoing, versionMinor: number, chunked: boolean): Buffer => {
  let text = `${out.method} ${out.path} HTTP/1.${versionMinor}\r\n`
  const h = out.headers
  for (let i = 0; i < h.length; i += 2) text += `${h[i]}: ${h[i + 1]}\r\n`
  if (chunked) text += "Transfer-Encoding: chunked\r\n"
  return Buffer.from(text + "\r\n", "latin1")
}

/**
 * The head relayed to the client (hop-by-hop headers gone, framing and connection ours). A response with
 * a Transfer-Encoding never passes a Content-Length on (RFC 9112 §6.3); one whose codings do not end in
 * chunked keeps them and runs to the close.
 */
const responseHeadBytes = (head: ResponseHead, chunked: boolean, close: boolean, extra: ReadonlyArray<string> | undefined): Buffer => {
  let text = `HTTP/1.1 ${head.status} ${head.reason}\r\n`
  const h = responseHeaders(head.headers)
  const coded = chunked || head.transferCodings.length > 0
  for (let i = 0; i < h.length; i += 2) {
    if (coded && h[i]!.length === 14 && h[i]!.toLowerCase() === "content-length") continue
    if (extra !== undefined && replaced(extra, h[i]!)) continue
    text += `${h[i]}: ${h[i + 1]}\r\n`
  }
  if (extra !== undefined) for (let i = 0; i < extra.length; i += 2) text += `${extra[i]}: ${extra[i + 1]}\r\n`
  if (chunked) text += "Transfer-Encoding: chunked\r\n"
  else if (head.closeDelimitedCoding) text += `Transfer-Encoding: ${head.transferCodings}\r\n`
  if (close) text += "Connection: close\r\n"
  return Buffer.from(text + "\r\n", "latin1")
}

/** Whether `name` is among the names of a flat header list (case-insensitive). */
const replaced = (extra: ReadonlyArray<string>, name: string): boolean => {
  for (let i = 0; i < extra.length; i += 2) {
    if (extra[i]!.length === name.length && extra[i]!.toLowerCase() === name.toLowerCase()) return true
  }
  return false
}

/** The upstream's 101 as received (its Connection/Upgrade headers are what the client needs). */
const switchingHeadBytes = (head: ResponseHead): Buffer => {
  let text = `HTTP/1.1 ${head.status} ${head.reason}\r\n`
  const h = head.headers
  for (let i = 0; i < h.length; i += 2) text += `${h[i]}: ${h[i + 1]}\r\n`
  return Buffer.from(text + "\r\n", "latin1")
}

/** One client connection: a loop of request → upstream exchange → response, then the next request. */
class ClientConnection implements ConnectionOwner, ConnectionWaiter {
  readonly socket: net.Socket
  readonly core: EngineCore
  readonly front: Http1Front
  readonly server: EngineServer
  private readonly reader: HeadReader<RequestHead>
  private phase = HEAD
  /** Bytes received beyond the message being handled (the start of the next request, or an early body). */
  private pending: Buffer | undefined = undefined
  private clientEnded = false
  private clientTimer: NodeJS.Timeout | undefined = undefined
  private upTimer: NodeJS.Timeout | undefined = undefined

  // The exchange in progress.
  private request: RequestHead | undefined = undefined
  private head: Buffer | undefined = undefined
  private outgoing: Http1Outgoing | undefined = undefined
  private requestFramer: BodyFramer | undefined = undefined
  private requestDone = false
  private pool: UpstreamPool | undefined = undefined
  private conn: PooledConnection | undefined = undefined
  private responseReader: HeadReader<ResponseHead> | undefined = undefined
  private responseFramer: BodyFramer | undefined = undefined
  private responseStarted = false
  private responseHeadSent = false
  private upstreamBytes = 0
  private closeAfter = false
  private retryable = false
  private retried = false
  /** The request as admitted (kept for a second decision when the upstream refuses it unsent). */
  private incoming: Http1Request | undefined = undefined
  /** This exchange was already moved once after an upstream refused it unsent. */
  private rerouted = false
  private upgrading = false
  private idleTimeoutMs = 0
  private responseTimeoutMs = 0
  private counted = false
  private waitingDrain = false
  private upstreamPaused = false
  /** Between keep-alive requests: the first byte of the next head switches to the head timeout. */
  private awaitingFirstByte = false
  /** The upstream may carry another exchange after this response. */
  private responseKeepAlive = true
  /** Interim responses relayed for this request. */
  private interim = 0
  /** Cancels a pending admission (the client left while it was waiting). */
  private cancelAdmission: (() => void) | undefined = undefined
  /** The admission's `onEnd`, until called. */
  private onEnd: (() => void) | undefined = undefined
  /** The admission's `observe`, until called. */
  private observer: ((exchange: Http1Exchange) => void) | undefined = undefined
  /** The admission's `responseHeaders`. */
  private extraHeaders: ReadonlyArray<string> | undefined = undefined
  /** Bytes of the request head being read (counted before it is complete). */
  private headBytes = 0
  /** The key this client's upstream slots are counted under (see `clientKey`). */
  readonly client: string | undefined
  /** Most connections of the pool being waited for this client may hold. */
  slotLimit: number | undefined = undefined
  /** Bounds the wait for a pooled connection. */
  private slotTimer: NodeJS.Timeout | undefined = undefined
  // The request body's rate: measured while the engine reads it (not while it holds the client back).
  /** The body is being timed. */
  private bodyTimed = false
  /** `receivedBytes` when the body began. */
  private bodyFrom = 0
  /** Time the body was read before the current stretch (ms). */
  private bodyActiveMs = 0
  /** Start of the current stretch of reading (`performance.now()`), or -1 while paused. */
  private bodyResumedAt = -1
  // A client not taking response bytes: since when nothing was taken, and how much was queued then.
  private stallSince = -1
  private stallQueued = 0
  // What the exchange in progress moved, and since when (for `observe`).
  private receivedBytes = 0
  private sentBytes = 0
  private status = 0
  private startedAt = 0

  constructor(socket: net.Socket, core: EngineCore, front: Http1Front, server: EngineServer) {
    this.socket = socket
    this.core = core
    this.front = front
    this.server = server
    this.client = clientKey(socket.remoteAddress)
    this.reader = requestHeadReader(front.limits)
    socket.on("data", this.onClientData)
    socket.on("end", this.onClientEnd)
    socket.on("error", this.onClientError)
    socket.on("close", this.onClientClose)
    socket.on("drain", this.onClientDrain)
    this.armClient(front.limits.headersTimeoutMs, this.onHeadTimeout)
  }

  /** Whether nothing is in flight (a keep-alive connection between requests). */
  idle(): boolean {
    return this.phase === HEAD && this.reader.buffered === 0 && this.pending === undefined
  }

  /** Shutdown: an idle connection closes now, a busy one after its exchange. */
  drain(): void {
    if (this.idle()) this.socket.destroy()
    else this.closeAfter = true
  }

  destroy(): void {
    this.socket.destroy()
    this.conn?.destroy()
  }

  // ---- client side ----

  private readonly onClientData = (chunk: Buffer): void => {
    switch (this.phase) {
      case HEAD:
        if (this.awaitingFirstByte) {
          this.awaitingFirstByte = false
          this.armClient(this.front.limits.headersTimeoutMs, this.onHeadTimeout)
        }
        this.feedHead(chunk)
        return
      case EXCHANGE:
        if (!this.requestDone && this.conn !== undefined) {
          this.feedBody(chunk, 0)
          return
        }
        this.hold(chunk)
        return
      default:
        this.hold(chunk)
    }
  }

  /** Keeps bytes for later (the next request, or a body waiting for its connection) and stops reading. */
  private hold(chunk: Buffer): void {
    this.pending = this.pending === undefined ? chunk : Buffer.concat([this.pending, chunk])
    this.socket.pause()
    if (this.pending.length > MAX_PIPELINED_BYTES + this.front.limits.maxHeaderSize) this.socket.destroy()
  }

  private readonly onClientEnd = (): void => {
    this.clientEnded = true
    if (this.phase === HEAD) {
      // Nothing more will come: close once what was written is out.
      this.phase = CLOSED
      this.clearTimers()
      closeAfterFlush(this.socket)
    } else if (this.phase === EXCHANGE && !this.requestDone) {
      // The request body cannot be completed: abandon the exchange.
      this.destroy()
    } else if (this.phase === ADMITTING) {
      // A client that stops while its request waits (for a backend, possibly for long) has gone: it
      // must not hold its place in the wait.
      this.destroy()
    } else {
      this.closeAfter = true
    }
  }

  private readonly onClientError = (): void => {
    // A reset or a failed write; `close` follows and cleans up.
  }

  private readonly onClientClose = (): void => {
    const wasTunnel = this.phase === TUNNEL
    this.phase = CLOSED
    this.clearTimers()
    if (this.conn !== undefined) {
      // Never returned to the pool mid-exchange.
      const c = this.conn
      this.conn = undefined
      c.owner = undefined
      if (!wasTunnel) c.destroy()
    }
    if (this.pool !== undefined) this.pool.cancel(this)
    const cancel = this.cancelAdmission
    this.cancelAdmission = undefined
    cancel?.()
    this.finishCount()
    if (!wasTunnel) {
      this.observed("Aborted")
      this.endAdmission()
    }
    this.server.forget(this)
  }

  private readonly onClientDrain = (): void => {
    this.stallSince = -1
    if (this.upstreamPaused && this.conn !== undefined) {
      this.upstreamPaused = false
      this.conn.socket.resume()
    }
    this.upTimer?.refresh()
  }

  private feedHead(chunk: Buffer): void {
    this.headBytes += chunk.length
    const step = this.reader.push(chunk)
    switch (step._tag) {
      case "Need":
        return
      case "Error":
        this.fail(step.error.status, `switchyard: ${step.error.message}`)
        return
      case "Head":
        this.receivedBytes = this.headBytes - step.rest.length
        this.headBytes = 0
        this.sentBytes = 0
        this.status = 0
        this.startedAt = performance.now()
        this.startExchange(step.head, step.rest)
    }
  }

  private startExchange(request: RequestHead, rest: Buffer): void {
    this.socket.pause()
    this.clearClientTimer()
    this.pending = rest.length > 0 ? rest : undefined
    if (this.core.isClosed() || this.server.closing) {
      this.fail(503, "switchyard: shutting down")
      return
    }
    if (request.method === "CONNECT") {
      this.fail(501, "switchyard: CONNECT is not supported")
      return
    }
    const upgrading = request.upgrade !== undefined
    if (upgrading) {
      if (request.framing._tag === "Chunked") {
        this.fail(400, "switchyard: an upgrade request with a body needs a Content-Length")
        return
      }
      if (request.framing._tag === "Length" && request.framing.length > ENGINE_MAX_UPGRADE_BODY) {
        this.fail(413, `switchyard: an upgrade request body may have at most ${ENGINE_MAX_UPGRADE_BODY} bytes`)
        return
      }
    }
    const incoming: Http1Request = {
      method: request.method,
      target: request.target,
      originTarget: request.originTarget,
      versionMinor: request.versionMinor,
      headers: request.headers,
      host: request.host,
      contentType: request.contentType,
      upgrade: request.upgrade,
      socket: this.socket
    }
    const admission = this.decide(incoming)
    if (admission === undefined) return
    if (admission._tag === "Pending") {
      this.awaitAdmission(admission, request, incoming)
      return
    }
    this.admitted(admission, request, incoming)
  }

  /** Asks the front door what to do with `incoming`; a decision that throws is answered 502 (undefined). */
  private decide(incoming: Http1Request): Admission | PendingAdmission | undefined {
    try {
      return this.front.admit(incoming)
    } catch (e) {
      this.core.report(`request decision failed: ${(e as Error).message}`)
      this.fail(502, "switchyard: the request could not be prepared for the upstream")
      return undefined
    }
  }

  /** Waits for a decision with the connection paused (read on only to notice a client leaving). */
  private awaitAdmission(pending: PendingAdmission, request: RequestHead, incoming: Http1Request): void {
    this.phase = ADMITTING
    if (!this.counted) {
      this.counted = true
      this.core.requestStarted()
    }
    const body = request.framing._tag !== "None" && !(request.framing._tag === "Length" && request.framing.length === 0)
    // A request without a body: further bytes are held (and bounded) by `hold`, so reading on is safe.
    if (!body && this.pending === undefined) this.socket.resume()
    let decided = false
    let cancel: (() => void) | undefined
    try {
      cancel = pending.wait((admission) => {
        if (decided) return
        decided = true
        this.cancelAdmission = undefined
        if (this.phase !== ADMITTING) {
          // The client left or the connection failed meanwhile: give back what the decision took.
          if (admission._tag === "Forward") admission.onEnd?.()
          else if (admission._tag === "Handoff") admission.onAbandon?.()
          return
        }
        this.socket.pause()
        this.admitted(admission, request, incoming)
      })
    } catch (e) {
      this.core.report(`request decision failed: ${(e as Error).message}`)
      this.fail(502, "switchyard: the request could not be prepared for the upstream")
      return
    }
    if (!decided) this.cancelAdmission = cancel
  }

  /** Carries out a decision: an error answer, or the request on its way to the upstream. */
  private admitted(admission: Admission, request: RequestHead, incoming: Http1Request): void {
    const upgrading = incoming.upgrade !== undefined
    if (admission._tag === "Refuse") {
      this.fail(admission.status, admission.message)
      return
    }
    if (admission._tag === "Handoff") {
      this.handOff(admission.take, request)
      return
    }
    this.onEnd = admission.onEnd
    this.observer = admission.observe
    this.extraHeaders = admission.responseHeaders
    this.request = request
    this.incoming = incoming
    const core = this.core
    let out: Http1Outgoing
    try {
      const remote = this.socket as net.Socket & { encrypted?: boolean }
      out = {
        method: request.method,
        path: admission.path ?? request.originTarget,
        headers: requestHeaders(
          request.headers,
          upgrading,
          core.forwardedMode,
          core.forwardedMode === "off"
            ? undefined
            : { clientAddress: remote.remoteAddress, proto: remote.encrypted === true ? "https" : "http", host: request.host }
        ),
        upstream: core.upstream
      }
      admission.director?.(out, incoming)
    } catch (e) {
      core.report(`director failed: ${(e as Error).message}`)
      this.fail(502, "switchyard: the request could not be prepared for the upstream")
      return
    }
    this.request = request
    this.outgoing = out
    this.upgrading = upgrading
    this.head = requestHeadBytes(out, request.versionMinor, request.framing._tag === "Chunked")
    this.requestFramer = new BodyFramer(request.framing, this.front.limits.maxHeaderSize, 400)
    this.requestDone = this.requestFramer.done
    this.responseReader = responseHeadReader(this.front.limits)
    this.responseFramer = undefined
    this.responseStarted = false
    this.responseHeadSent = false
    this.responseKeepAlive = true
    this.upstreamBytes = 0
    this.interim = 0
    this.retried = false
    this.retryable = !upgrading && request.framing._tag === "None" && IDEMPOTENT.has(request.method)
    this.closeAfter = this.closeAfter || !request.keepAlive || request.versionMinor === 0 || this.clientEnded
    this.idleTimeoutMs = admission.idleTimeoutMs ?? core.idleTimeoutMs
    this.responseTimeoutMs = admission.responseTimeoutMs ?? core.responseTimeoutMs
    this.phase = WAITING
    if (!this.counted) {
      this.counted = true
      core.requestStarted()
    }
    if (request.expectContinue && !this.requestDone && request.versionMinor === 1) {
      this.sentBytes += CONTINUE.length
      this.socket.write(CONTINUE)
    }
    this.armUp(this.responseTimeoutMs, this.onResponseTimeout)
    if (!this.requestDone) {
      const bodyLimit = upgrading ? ENGINE_UPGRADE_BODY_TIMEOUT_MS : this.front.limits.requestTimeoutMs
      if (bodyLimit > 0) this.armClient(bodyLimit, this.onBodyTimeout)
    }
    // Nothing else is expected before the exchange ends: read on, so a client leaving is noticed.
    if (this.requestDone && this.pending === undefined) this.socket.resume()
    if (upgrading) {
      // An upgrade takes a connection of its own, never pooled (it becomes the tunnel).
      this.granted(PooledConnection.open({ ...out.upstream, connectReading: undefined }, undefined))
      return
    }
    this.acquireSlot(core.poolFor(out.upstream), false)
  }

  /** Asks `pool` for a connection; a wait for one is bounded (`upstreamSlotWaitMs`). */
  private acquireSlot(pool: UpstreamPool, fresh: boolean): void {
    const limits = this.server.clientLimits
    this.pool = pool
    this.slotLimit = slotsPerClient(limits.maxUpstreamSlotsPerClient, pool.maxSockets)
    const queued = pool.acquire(this, fresh)
    if (queued && this.pool === pool && limits.upstreamSlotWaitMs > 0) {
      this.slotTimer = setTimeout(this.onSlotWait, limits.upstreamSlotWaitMs)
    }
  }

  private clearSlotTimer(): void {
    if (this.slotTimer !== undefined) {
      clearTimeout(this.slotTimer)
      this.slotTimer = undefined
    }
  }

  private readonly onSlotWait = (): void => {
    this.slotTimer = undefined
    const pool = this.pool
    if (this.phase !== WAITING || pool === undefined) return
    const capped = pool.atCap(this)
    pool.cancel(this)
    this.pool = undefined
    this.limitReached(capped ? "client_slots" : "slot_wait")
    const ms = this.server.clientLimits.upstreamSlotWaitMs
    this.fail(
      503,
      capped
        ? `switchyard: this client already holds ${this.slotLimit} connections to upstream ${pool.upstream.describe}; none came free within ${ms} ms`
        : `switchyard: no connection to upstream ${pool.upstream.describe} came free within ${ms} ms`
    )
  }

  /** Tells the front door a client limit refused this request or cut this connection. */
  private limitReached(limit: ClientLimitKind): void {
    const on = this.front.onClientLimit
    if (on === undefined) return
    const request = this.request
    on({ limit, client: this.socket.remoteAddress ?? "local", method: request?.method ?? "", target: request?.target ?? "" })
  }

  /** Starts timing the request body (once it can flow to the upstream). */
  private startBodyClock(): void {
    if (this.server.clientLimits.minRequestBodyBytesPerSecond <= 0) return
    this.bodyTimed = true
    this.bodyFrom = this.receivedBytes
    this.bodyActiveMs = 0
    this.bodyResumedAt = performance.now()
    this.server.watch(this)
  }

  /** The engine stops reading the body (the upstream is not taking it): this time is not the client's. */
  private pauseBodyClock(): void {
    if (this.bodyResumedAt >= 0) {
      this.bodyActiveMs += performance.now() - this.bodyResumedAt
      this.bodyResumedAt = -1
    }
  }

  private resumeBodyClock(): void {
    if (this.bodyTimed && this.bodyResumedAt < 0) this.bodyResumedAt = performance.now()
  }

  /**
   * The periodic rate check (see `EngineServer.watch`): a request body below its minimum rate, or a
   * client that does not take queued response bytes in time, ends the exchange. Returns whether there is
   * still something to watch.
   */
  check(now: number): boolean {
    const limits = this.server.clientLimits
    let watching = false
    if (this.bodyTimed) {
      if (this.phase !== EXCHANGE || this.requestDone) this.bodyTimed = false
      else {
        const elapsed = this.bodyActiveMs + (this.bodyResumedAt >= 0 ? now - this.bodyResumedAt : 0)
        const rate = limits.minRequestBodyBytesPerSecond
        if (requestBodyTooSlow(rate, limits.requestBodyGracePeriodMs, this.receivedBytes - this.bodyFrom, elapsed)) {
          this.bodyTimed = false
          this.limitReached("request_body_rate")
          if (this.responseHeadSent) this.destroy()
          else this.fail(408, `switchyard: request body arrived slower than ${rate} bytes/s`)
          return false
        }
        watching = true
      }
    }
    const rate = limits.minResponseBytesPerSecond
    if (this.upstreamPaused && this.phase === EXCHANGE && rate > 0) {
      // Progress shows when a queued write completes (the queue shrinks); the wait then starts over.
      const queued = this.socket.writableLength
      if (this.stallSince < 0 || queued < this.stallQueued) {
        this.stallSince = now
        this.stallQueued = queued
      } else if (now - this.stallSince > responseTakeDeadlineMs(rate, limits.responseGracePeriodMs, this.stallQueued)) {
        this.limitReached("response_rate")
        this.destroy()
        return false
      } else if (queued > this.stallQueued) this.stallQueued = queued
      watching = true
    }
    return watching
  }

  /** Stops serving the connection and passes it on with what was read of it (see `Handoff`). */
  private handOff(take: (socket: net.Socket, bytes: Buffer) => void, request: RequestHead): void {
    this.clearTimers()
    this.finishCount()
    const socket = this.socket
    socket.pause()
    socket.off("data", this.onClientData)
    socket.off("end", this.onClientEnd)
    socket.off("error", this.onClientError)
    socket.off("close", this.onClientClose)
    socket.off("drain", this.onClientDrain)
    this.phase = CLOSED
    this.server.forget(this)
    let text = `${request.method} ${request.originTarget} HTTP/1.${request.versionMinor}\r\n`
    const h = request.headers
    for (let i = 0; i < h.length; i += 2) {
      // An upgrade the engine does not pass on (h2c) is not offered to the next server either.
      if (request.upgrade === undefined && (h[i]!.length === 7 || h[i]!.length === 14)) {
        const lower = h[i]!.toLowerCase()
        if (lower === "upgrade" || lower === "http2-settings") continue
      }
      text += `${h[i]}: ${h[i + 1]}\r\n`
    }
    const head = Buffer.from(text + "\r\n", "latin1")
    const pending = this.pending
    this.pending = undefined
    take(socket, pending === undefined ? head : Buffer.concat([head, pending]))
  }

  // ---- upstream connection ----

  readonly granted = (conn: PooledConnection): void => {
    if (this.phase !== WAITING) {
      // The client left while this connection was on its way.
      if (conn.pool !== undefined) conn.pool.release(conn, conn.usable())
      else conn.destroy()
      return
    }
    const refusal = connectionRefusal(conn.socket)
    if (refusal !== undefined) {
      this.upstreamRefused(conn, refusal)
      return
    }
    this.pool = undefined
    this.clearSlotTimer()
    this.phase = EXCHANGE
    this.conn = conn
    conn.owner = this
    const up = conn.socket
    if (!this.requestDone) this.startBodyClock()
    const pending = this.pending
    this.pending = undefined
    if (pending === undefined || this.requestDone) {
      up.write(this.head!)
      this.pending = pending
    } else {
      up.cork()
      up.write(this.head!)
      this.feedBody(pending, 0)
      up.uncork()
    }
    if (this.phase !== EXCHANGE) return
    if (!this.requestDone && this.clientEnded) {
      // The client finished sending before its body was complete: the request can never be whole.
      this.destroy()
      return
    }
    if (!this.waitingDrain && this.pending === undefined) this.socket.resume()
  }

  /**
   * The upstream refused the connection before anything was sent on it (a tunnel backend that sent
   * GoAway): the request goes once more through the front door's decision, which picks another backend
   * of the route or waits as for a route without backends; a second refusal is answered 502 naming it.
   */
  private upstreamRefused(conn: PooledConnection, refusal: string): void {
    this.pool = undefined
    conn.destroy() // its close gives the pool slot back
    const target = this.outgoing!.upstream
    const incoming = this.incoming
    if (this.rerouted || incoming === undefined) {
      this.core.report(`upstream ${target.describe} refused the request before it was sent: ${refusal}`)
      this.fail(502, `switchyard: upstream ${target.describe} refused the request before it was sent: ${refusal}`)
      return
    }
    this.rerouted = true
    this.clearUpTimer()
    const onEnd = this.onEnd
    this.onEnd = undefined
    onEnd?.() // the lease on the refusing backend
    const request = this.request!
    const admission = this.decide(incoming)
    if (admission === undefined) return
    if (admission._tag === "Pending") this.awaitAdmission(admission, request, incoming)
    else this.admitted(admission, request, incoming)
  }

  readonly refused = (message: string): void => {
    this.pool = undefined
    this.clearSlotTimer()
    this.fail(503, message)
  }

  private feedBody(chunk: Buffer, from: number): void {
    const framer = this.requestFramer!
    const n = framer.consume(chunk, from)
    if (typeof n !== "number") {
      this.abandon(n.status, `switchyard: ${n.message}`)
      return
    }
    const up = this.conn!.socket
    let ok = true
    this.receivedBytes += n
    const f = framer.forwardable
    if (f > 0) ok = up.write(from === 0 && f === chunk.length ? chunk : chunk.subarray(from, from + f))
    this.upTimer?.refresh()
    if (framer.done) {
      if (framer.trailers !== undefined) up.write(framer.trailers)
      this.requestDone = true
      this.bodyTimed = false
      this.clearClientTimer()
      const restAt = from + n
      // Reading on lets a client's close be seen; further bytes are held for the next request.
      if (restAt < chunk.length) this.hold(chunk.subarray(restAt))
      return
    }
    // Below the pause mark the upstream's `drain` still comes (a write returned false) and finds nothing paused.
    if (!ok && up.writableLength >= WRITE_QUEUE_PAUSE_BYTES) {
      this.waitingDrain = true
      this.pauseBodyClock()
      this.socket.pause()
    }
  }

  readonly upstreamDrain = (): void => {
    if (this.waitingDrain) {
      this.waitingDrain = false
      if (this.phase === EXCHANGE && !this.requestDone) {
        this.resumeBodyClock()
        this.socket.resume()
      }
    }
  }

  /** The client socket is corked for runs of upstream chunks (see `upstreamBatchStart`). */
  private batchCorked = false
  private uncorkScheduled = false

  /**
   * A run of chunks from a yamux stream (what one read of the tunnel brought) begins: the client
   * socket is corked so that they leave in one write.
   */
  readonly upstreamBatchStart = (): void => {
    if (!this.batchCorked && this.phase === EXCHANGE && this.responseFramer !== undefined && !this.socket.destroyed) {
      this.socket.cork()
      this.batchCorked = true
    }
  }

  /**
   * The run ended; returns whether one of its chunks is still referenced (queued on the client socket).
   * Lent chunks are written now, so that their memory can be read into again. Others wait for the end
   * of this turn of the event loop, joining the runs of further reads in one write (a WebSocket tunnel
   * hands over one message per read).
   */
  readonly upstreamBatchEnd = (lent: boolean): boolean => {
    if (this.batchCorked) {
      if (lent) this.uncorkNow()
      else if (!this.uncorkScheduled) {
        this.uncorkScheduled = true
        setImmediate(this.uncorkLater)
      }
    }
    return this.phase === TUNNEL || this.phase === CLOSED || this.socket.writableLength > 0
  }

  private uncorkNow(): void {
    this.batchCorked = false
    this.socket.uncork()
  }

  private readonly uncorkLater = (): void => {
    this.uncorkScheduled = false
    if (this.batchCorked) this.uncorkNow()
  }

  readonly upstreamData = (chunk: Buffer): void => {
    this.upstreamBytes += chunk.length
    const framer = this.responseFramer
    if (framer !== undefined) {
      this.upTimer?.refresh()
      const n = framer.consume(chunk, 0)
      if (typeof n !== "number") {
        this.core.report(`upstream ${this.outgoing!.upstream.describe} sent a malformed body: ${n.message}`)
        this.destroy()
        return
      }
      const conn = this.conn!
      const f = framer.forwardable
      const trailers = framer.done ? framer.trailers : undefined
      if (f > 0 || trailers !== undefined) {
        const socket = this.socket
        let ok = true
        if (f > 0) {
          this.sentBytes += f
          ok = socket.write(f === chunk.length ? chunk : chunk.subarray(0, f))
        }
        if (trailers !== undefined) {
          this.sentBytes += trailers.length
          ok = socket.write(trailers)
        }
        if (socket.writableLength > 0) conn.chunkHeld = true
        if (!ok && socket.writableLength >= WRITE_QUEUE_PAUSE_BYTES) {
          this.upstreamPaused = true
          conn.socket.pause()
          this.server.watch(this)
        }
      }
      if (framer.done) this.responseComplete(this.endsClean(chunk.length - n))
      return
    }
    this.responseStarted = true
    this.upTimer?.refresh()
    this.readResponseHead(chunk)
  }

  private readResponseHead(chunk: Buffer): void {
    const reader = this.responseReader!
    let step = reader.push(chunk)
    for (;;) {
      if (step._tag === "Need") return
      if (step._tag === "Error") {
        this.badResponse(step.error)
        return
      }
      const head = step.head
      const rest = step.rest
      if (head.status === 101) {
        if (this.upgrading) this.openTunnel(head, rest)
        else this.badResponse(undefined)
        return
      }
      if (head.status >= 100 && head.status < 200) {
        if (++this.interim > MAX_INTERIM_RESPONSES) {
          this.badResponse(undefined)
          return
        }
        // Interim responses go to the client as they come (an HTTP/1.0 client gets none).
        if (this.request!.versionMinor === 1) {
          const interimHead = responseHeadBytes(head, false, false, undefined)
          this.sentBytes += interimHead.length
          this.socket.write(interimHead)
        }
        if (rest.length === 0) return
        step = reader.push(rest)
        continue
      }
      this.sendResponseHead(head, rest)
      return
    }
  }

  private sendResponseHead(head: ResponseHead, rest: Buffer): void {
    const framing = responseFraming(this.request!.method, head)
    const framer = new BodyFramer(framing, this.front.limits.maxHeaderSize, 502)
    this.responseFramer = framer
    this.responseKeepAlive = head.keepAlive && head.versionMinor === 1
    // Transfer-Encoding beside a Content-Length: the coding frames the body (the length is not relayed),
    // and the upstream connection is not reused (RFC 9112 §6.3)
    if (head.contentLength === undefined && framing._tag !== "None" && contentLengthValues(head.headers).length > 0) this.responseKeepAlive = false
    // A declined upgrade, a response that ends with its connection, or an answer before the whole request
    // body: the client connection cannot carry another request.
    if (this.upgrading || framing._tag === "Close" || !this.requestDone) this.closeAfter = true
    const headBytes = responseHeadBytes(head, framing._tag === "Chunked", this.closeAfter, this.extraHeaders)
    this.responseHeadSent = true
    this.status = head.status
    this.sentBytes += headBytes.length
    this.armUp(this.idleTimeoutMs, this.onIdleTimeout)
    const socket = this.socket
    if (rest.length === 0 || framer.done) {
      socket.write(headBytes)
      if (framer.done) this.responseComplete(this.endsClean(rest.length))
      return
    }
    const n = framer.consume(rest, 0)
    if (typeof n !== "number") {
      socket.write(headBytes)
      this.destroy()
      return
    }
    const f = framer.forwardable
    const trailers = framer.done ? framer.trailers : undefined
    const verbatim = f === rest.length ? rest : rest.subarray(0, f)
    const body = trailers === undefined ? verbatim : Buffer.concat([verbatim, trailers])
    this.sentBytes += body.length
    let ok: boolean
    if (body.length <= COALESCE_BYTES) {
      // One write for a small response: cheaper than a corked writev of two buffers.
      ok = socket.write(Buffer.concat([headBytes, body], headBytes.length + body.length))
    } else {
      socket.cork()
      socket.write(headBytes)
      ok = socket.write(body)
      socket.uncork()
      if (socket.writableLength > 0) this.conn!.chunkHeld = true
    }
    if (!ok && socket.writableLength >= WRITE_QUEUE_PAUSE_BYTES) {
      this.upstreamPaused = true
      this.conn!.socket.pause()
      this.server.watch(this)
    }
    if (framer.done) this.responseComplete(this.endsClean(rest.length - n))
  }

  /**
   * Whether a complete response left nothing behind in its read; bytes past its framing are never
   * relayed and the upstream connection is not reused (reported: the upstream broke its own framing).
   */
  private endsClean(surplus: number): boolean {
    if (surplus === 0) return true
    this.core.report(`upstream ${this.outgoing!.upstream.describe} sent ${surplus} bytes past the end of its response; the connection is dropped`)
    return false
  }

  /** A response the client cannot be given: 502 if nothing was sent yet, else the exchange is cut. */
  private badResponse(error: Http1Error | undefined): void {
    const what = error === undefined ? "an unexpected 101 or too many interim responses" : error.message
    this.core.report(`upstream ${this.outgoing!.upstream.describe} sent a response that cannot be relayed: ${what}`)
    this.abandon(502, `switchyard: upstream ${this.outgoing!.upstream.describe} sent a response that cannot be relayed`)
  }

  /** Ends the exchange with an error answer when no response head went out, else cuts the connection. */
  private abandon(status: number, message: string): void {
    const conn = this.conn
    this.conn = undefined
    if (conn !== undefined) {
      conn.owner = undefined
      conn.destroy()
    }
    if (this.responseHeadSent) this.destroy()
    else this.fail(status, message)
  }

  private responseComplete(clean: boolean): void {
    this.clearUpTimer()
    const conn = this.conn!
    this.conn = undefined
    const request = this.request!
    const head = this.responseFramer!
    const reusable = clean && this.requestDone && !head.closeDelimited && this.responseKeepAlive && request.versionMinor === 1
    if (this.upstreamPaused) {
      this.upstreamPaused = false
      this.stallSince = -1
      conn.socket.resume()
    }
    if (conn.pool !== undefined) conn.pool.release(conn, reusable)
    else conn.destroy()
    this.finishCount()
    this.observed("Complete")
    this.endAdmission()
    this.resetExchange()
    if (this.closeAfter) {
      this.phase = CLOSED
      this.clearTimers()
      closeAfterFlush(this.socket)
      return
    }
    this.phase = HEAD
    this.armClient(this.front.limits.keepAliveTimeoutMs, this.onKeepAliveTimeout)
    this.awaitingFirstByte = true
    const pending = this.pending
    this.pending = undefined
    if (pending !== undefined) {
      this.awaitingFirstByte = false
      this.armClient(this.front.limits.headersTimeoutMs, this.onHeadTimeout)
      this.feedHead(pending)
    }
    if (this.phase === HEAD) this.socket.resume()
  }

  private resetExchange(): void {
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

  readonly upstreamEnd = (): void => {
    const framer = this.responseFramer
    if (framer !== undefined && framer.closeDelimited && !framer.done) {
      framer.done = true
      this.responseKeepAlive = false
      this.responseComplete(false)
      return
    }
    // Anything else ending here is incomplete: `close` follows (the socket is destroyed) and decides.
    this.conn?.destroy()
  }

  readonly upstreamClose = (error: (Error & { code?: string }) | undefined): void => {
    const conn = this.conn
    if (conn === undefined || this.phase !== EXCHANGE) return
    this.conn = undefined
    const target = this.outgoing!.upstream
    if (!this.responseStarted && this.upstreamBytes === 0) {
      if (conn.reused && this.retryable && !this.retried && this.pending === undefined) {
        // A pooled connection the upstream closed while idle: nothing was processed; try once more.
        this.retried = true
        this.phase = WAITING
        this.acquireSlot(this.core.poolFor(target), true)
        return
      }
      this.core.report(`upstream ${target.describe} unreachable: ${errorText(error)}`)
      this.fail(502, `switchyard: upstream ${target.describe} unreachable (${errorText(error)})`)
      return
    }
    if (!this.responseHeadSent) {
      this.core.report(`upstream ${target.describe} closed before a complete response head`)
      this.fail(502, `switchyard: upstream ${target.describe} closed the connection before answering`)
      return
    }
    // Mid-body: the client must see an incomplete response, not a complete one.
    this.destroy()
  }

  // ---- upgrades ----

  private openTunnel(head: ResponseHead, rest: Buffer): void {
    const conn = this.conn!
    this.conn = undefined
    this.clearTimers()
    this.phase = TUNNEL
    this.finishCount()
    const switching = switchingHeadBytes(head)
    if (this.observer !== undefined) {
      this.status = head.status
      this.sentBytes += switching.length + rest.length
      this.observed("Upgraded")
    }
    const up = conn.detach()
    const socket = this.socket
    socket.off("data", this.onClientData)
    socket.off("end", this.onClientEnd)
    socket.off("drain", this.onClientDrain)
    const tunnels = this.core.tunnels
    tunnels.add(socket)
    tunnels.add(up)
    // The decision's hold (a backend lease) lasts as long as the tunnel.
    const onEnd = this.onEnd
    this.onEnd = undefined
    if (onEnd !== undefined) {
      let open = 2
      const closed = () => {
        if (--open === 0) onEnd()
      }
      socket.once("close", closed)
      up.once("close", closed)
    }
    const target = this.outgoing!.upstream
    const what = `${this.request!.method} ${this.outgoing!.path}`
    const teardown = () => {
      tunnels.delete(socket)
      tunnels.delete(up)
      socket.destroy()
      up.destroy()
    }
    const timed = up as Duplex & { setTimeout?: (ms: number) => unknown }
    if (typeof timed.setTimeout === "function") timed.setTimeout(this.idleTimeoutMs)
    up.on("timeout", () => {
      this.core.report(`tunnel to ${target.describe} idle too long: ${what}`)
      teardown()
    })
    up.on("error", teardown)
    socket.on("error", teardown)
    up.on("close", () => {
      tunnels.delete(up)
      closeAfterFlush(socket)
    })
    socket.on("close", () => {
      tunnels.delete(socket)
      closeAfterFlush(up)
    })
    socket.cork()
    socket.write(switching)
    if (rest.length > 0) socket.write(rest)
    socket.uncork()
    const pending = this.pending
    this.pending = undefined
    if (pending !== undefined) up.write(pending)
    if (this.clientEnded) up.end()
    // pipe() ends the other side's writable when one side's readable ends: half-close carries over.
    socket.pipe(up)
    up.pipe(socket)
    up.resume()
    this.resetExchange()
  }

  // ---- errors and timers ----

  /** Answers an error and closes the connection after it; nothing more is read. */
  private fail(status: number, message: string): void {
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
    this.finishCount()
    this.phase = CLOSED
    this.pending = undefined
    this.socket.off("data", this.onClientData)
    this.socket.resume() // discard what else arrives until the client reads the answer and leaves
    if (this.observer !== undefined) {
      const socket = this.socket as Duplex & { bytesWritten?: number }
      const before = socket.bytesWritten ?? 0
      writeRawError(this.socket, this.core.errors, status, message)
      this.sentBytes += Math.max(0, (socket.bytesWritten ?? 0) - before)
      // An answer after a relayed response head cannot happen (the connection is cut instead).
      this.status = status
      this.observed("Refused")
    } else {
      writeRawError(this.socket, this.core.errors, status, message)
    }
    this.endAdmission()
    closeAfterFlush(this.socket)
  }

  /** Reports the exchange to the admission's observer, once. */
  private observed(end: Http1ExchangeEnd): void {
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

  private endAdmission(): void {
    const onEnd = this.onEnd
    if (onEnd !== undefined) {
      this.onEnd = undefined
      onEnd()
    }
  }

  private finishCount(): void {
    if (this.counted) {
      this.counted = false
      this.core.requestFinished()
    }
  }

  private armClient(ms: number, fire: () => void): void {
    this.clearClientTimer()
    if (ms > 0) this.clientTimer = setTimeout(fire, ms)
  }

  private clearClientTimer(): void {
    if (this.clientTimer !== undefined) {
      clearTimeout(this.clientTimer)
      this.clientTimer = undefined
    }
  }

  private armUp(ms: number, fire: () => void): void {
    this.clearUpTimer()
    if (ms > 0) this.upTimer = setTimeout(fire, ms)
  }

  private clearUpTimer(): void {
    if (this.upTimer !== undefined) {
      clearTimeout(this.upTimer)
      this.upTimer = undefined
    }
  }

  private clearTimers(): void {
    this.clearClientTimer()
    this.clearUpTimer()
    this.clearSlotTimer()
  }

  private readonly onHeadTimeout = (): void => {
    this.clientTimer = undefined
    if (this.phase !== HEAD) return
    if (this.reader.buffered === 0 && this.pending === undefined) this.socket.destroy()
    else {
      this.limitReached("head_timeout")
      this.fail(408, "switchyard: request not received in time")
    }
  }

  private readonly onKeepAliveTimeout = (): void => {
    this.clientTimer = undefined
    if (this.idle()) this.socket.destroy()
  }

  private readonly onBodyTimeout = (): void => {
    this.clientTimer = undefined
    if (this.requestDone) return
    if (this.responseHeadSent) this.destroy()
    else this.fail(408, "switchyard: request not received in time")
  }

  private readonly onResponseTimeout = (): void => {
    this.upTimer = undefined
    if (this.responseHeadSent || this.phase === CLOSED) return
    const target = this.outgoing!.upstream
    this.core.report(`upstream ${target.describe} did not answer in time: ${this.outgoing!.method} ${this.outgoing!.path}`)
    this.fail(504, `switchyard: upstream ${target.describe} timed out before answering`)
  }

  private readonly onIdleTimeout = (): void => {
    this.upTimer = undefined
    if (this.phase !== EXCHANGE) return
    const target = this.outgoing!.upstream
    this.core.report(`upstream ${target.describe} was idle too long: ${this.outgoing!.method} ${this.outgoing!.path}`)
    this.destroy()
  }
}

/** The set of client connections of one front door. */
class EngineServer implements Http1Server {
  readonly core: EngineCore
  readonly front: Http1Front
  readonly clientLimits: ClientLimits
  closing = false
  private readonly open = new Set<ClientConnection>()
  private readonly bySocket = new WeakMap<net.Socket, ClientConnection>()
  /** Connections whose data rates the heartbeat checks. */
  private readonly watched = new Set<ClientConnection>()
  /** Runs while some connection is watched. */
  private heartbeat: NodeJS.Timeout | undefined = undefined
  private readonly emptyWaiters: Array<() => void> = []
  private drainTimer: NodeJS.Timeout | undefined = undefined

  constructor(core: EngineCore, front: Http1Front) {
    this.core = core
    this.front = front
    this.clientLimits = front.clientLimits ?? CLIENT_LIMIT_DEFAULTS
  }

  /** Checks `c`'s data rates every `RATE_CHECK_INTERVAL_MS` until it has nothing left to watch. */
  watch(c: ClientConnection): void {
    this.watched.add(c)
    if (this.heartbeat === undefined) {
      this.heartbeat = setInterval(this.beat, RATE_CHECK_INTERVAL_MS)
      this.heartbeat.unref()
    }
  }

  private unwatch(c: ClientConnection): void {
    this.watched.delete(c)
    if (this.watched.size === 0 && this.heartbeat !== undefined) {
      clearInterval(this.heartbeat)
      this.heartbeat = undefined
    }
  }

  private readonly beat = (): void => {
    const now = performance.now()
    for (const c of this.watched) if (!c.check(now)) this.unwatch(c)
  }

  readonly accept = (socket: net.Socket): void => {
    if (this.closing || this.core.isClosed()) {
      socket.destroy()
      return
    }
    socket.setNoDelay(true)
    const connection = new ClientConnection(socket, this.core, this.front, this)
    this.open.add(connection)
    this.bySocket.set(socket, connection)
  }

  forget(c: ClientConnection): void {
    this.open.delete(c)
    this.unwatch(c)
    this.checkEmpty()
  }

  readonly connections = (): number => this.open.size

  readonly betweenRequests = (socket: net.Socket): boolean => {
    const connection = this.bySocket.get(socket)
    return connection !== undefined && this.open.has(connection) && connection.idle()
  }

  readonly close = (drainMs: number): Promise<void> =>
    new Promise((resolve) => {
      this.closing = true
      this.emptyWaiters.push(resolve)
      if (drainMs > 0) {
        // A later call may shorten the drain (0 destroys at once); the first timer stands otherwise.
        this.drainTimer ??= setTimeout(() => {
          this.drainTimer = undefined
          this.destroyAll()
        }, drainMs)
        for (const c of this.open) c.drain()
      } else this.destroyAll()
      this.checkEmpty()
    })

  private checkEmpty(): void {
    if (!this.closing || this.open.size > 0) return
    if (this.drainTimer !== undefined) {
      clearTimeout(this.drainTimer)
      this.drainTimer = undefined
    }
    for (const w of this.emptyWaiters.splice(0)) w()
  }

  destroyAll(): void {
    for (const c of [...this.open]) c.destroy()
  }
}

/** Starts serving a front door's connections with the forwarder's core. */
export const makeHttp1Server = (core: EngineCore, front: Http1Front): Http1Server => new EngineServer(core, front)
