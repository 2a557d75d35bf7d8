/**
 * The client's side of one connection: the client socket's events, the request head (read and checked
 * by `Http1Parser`, bounded while pipelined bytes wait), the front door's decision on it (at once or
 * pending, with the connection paused), the head rewritten for the upstream (hop-by-hop and
 * `X-Forwarded-*` fields by `HttpHeaders`), and the request body moved raw to the upstream with its
 * framing tracked and backpressure both ways. What comes back is `ClientConnection`'s.
 */
import { Buffer } from "node:buffer"
import { performance } from "node:perf_hooks"
import type * as net from "node:net"
import { CONTINUE_HEAD, requestHeadBytes } from "../../../domain/Http1Heads.ts"
import { BodyFramer, type RequestHead, responseHeadReader } from "../../../domain/Http1Parser.ts"
import { requestHeaders } from "../../../domain/HttpHeaders.ts"
import { closeAfterFlush } from "../Flush.ts"
import { PooledConnection } from "../UpstreamPool.ts"
import type { MessageUpstream } from "../Exchange.ts"
import type { Admission, EngineCore, Http1Front, Http1Outgoing, Http1Request, PendingAdmission } from "./Admission.ts"
import { ConnectionLimits } from "./ConnectionLimits.ts"
import { ADMITTING, CLOSED, type ConnectionHost, EXCHANGE, HEAD, TUNNEL, WAITING } from "./ConnectionState.ts"
import { ENGINE_MAX_UPGRADE_BODY, ENGINE_UPGRADE_BODY_TIMEOUT_MS, IDEMPOTENT, MAX_PIPELINED_BYTES, WRITE_QUEUE_PAUSE_BYTES } from "./Constants.ts"

export abstract class RequestSide extends ConnectionLimits {
  /** The message exchange in progress (see `MessageSide`), if any. */
  protected abstract readonly message: object | undefined
  protected abstract feedMessageBody(chunk: Buffer, from: number): void
  protected abstract messageDrained(): void
  protected abstract override leaveMessage(): void
  protected abstract startMessage(upstream: MessageUpstream, out: Http1Outgoing, request: RequestHead, upgrading: boolean): void

  constructor(socket: net.Socket, core: EngineCore, front: Http1Front, server: ConnectionHost) {
    super(socket, core, front, server)
    socket.on("data", this.onClientData)
    socket.on("end", this.onClientEnd)
    socket.on("error", this.onClientError)
    socket.on("close", this.onClientClose)
    socket.on("drain", this.onClientDrain)
    this.armClient(front.limits.headersTimeoutMs, this.onHeadTimeout)
  }

  // ---- client socket ----

  protected readonly onClientData = (chunk: Buffer): void => {
    switch (this.phase) {
      case HEAD:
        if (this.awaitingFirstByte) {
          this.awaitingFirstByte = false
          this.armClient(this.front.limits.headersTimeoutMs, this.onHeadTimeout)
        }
        this.feedHead(chunk)
        return
      case EXCHANGE:
        if (!this.requestDone) {
          if (this.conn !== undefined) {
            this.feedBody(chunk, 0)
            return
          }
          if (this.message !== undefined) {
            this.feedMessageBody(chunk, 0)
            return
          }
        }
        this.hold(chunk)
        return
      default:
        this.hold(chunk)
    }
  }

  /** Keeps bytes for later (the next request, or a body waiting for its connection) and stops reading. */
  protected hold(chunk: Buffer): void {
    this.pending = this.pending === undefined ? chunk : Buffer.concat([this.pending, chunk])
    this.socket.pause()
    if (this.pending.length > MAX_PIPELINED_BYTES + this.front.limits.maxHeaderSize) this.destroyClient()
  }

  protected readonly onClientEnd = (): void => {
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

  protected readonly onClientError = (): void => {
    // A reset or a failed write; `close` follows and cleans up.
  }

  protected readonly onClientClose = (): void => {
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
    this.leaveMessage()
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

  protected readonly onClientDrain = (): void => {
    this.stallSince = -1
    if (this.upstreamPaused) {
      if (this.conn !== undefined) {
        this.upstreamPaused = false
        this.conn.socket.resume()
      } else this.messageDrained()
    }
    this.upTimer.refresh()
  }

  // ---- request head and admission ----

  protected feedHead(chunk: Buffer): void {
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

  /**
   * The socket keeps flowing through a decision made at once on a request without a body (nothing is
   * read meanwhile: this runs to the end first); it is paused wherever bytes must wait.
   */
  private startExchange(request: RequestHead, rest: Buffer): void {
    this.clearClientTimer()
    this.pending = rest.length > 0 ? rest : undefined
    this.headRequest = request.method === "HEAD"
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
  protected decide(incoming: Http1Request): Admission | PendingAdmission | undefined {
    try {
      return this.front.admit(incoming)
    } catch (e) {
      this.core.report(`request decision failed: ${(e as Error).message}`)
      this.fail(502, "switchyard: the request could not be prepared for the upstream")
      return undefined
    }
  }

  /** Waits for a decision with the connection paused (read on only to notice a client leaving). */
  protected awaitAdmission(pending: PendingAdmission, request: RequestHead, incoming: Http1Request): void {
    this.phase = ADMITTING
    if (!this.counted) {
      this.counted = true
      this.core.requestStarted()
    }
    const body = request.framing._tag !== "None" && !(request.framing._tag === "Length" && request.framing.length === 0)
    // A request without a body: further bytes are held (and bounded) by `hold`, so reading on is safe.
    if (!body && this.pending === undefined) this.socket.resume()
    else this.socket.pause()
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
  protected admitted(admission: Admission, request: RequestHead, incoming: Http1Request): void {
    const upgrading = incoming.upgrade !== undefined
    if (admission._tag === "Refuse") {
      this.fail(admission.status, admission.message)
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
      this.sentBytes += CONTINUE_HEAD.length
      this.socket.write(CONTINUE_HEAD)
    }
    if (admission.message !== undefined) {
      // an upstream reached by messages keeps its own response and idle times; the body's is the engine's
      if (!this.requestDone && !upgrading && this.front.limits.requestTimeoutMs > 0) {
        this.armClient(this.front.limits.requestTimeoutMs, this.onBodyTimeout)
      }
      this.socket.pause()
      this.startMessage(admission.message, out, request, upgrading)
      return
    }
    this.armUp(this.responseTimeoutMs, this.onResponseTimeout)
    if (!this.requestDone) {
      const bodyLimit = upgrading ? ENGINE_UPGRADE_BODY_TIMEOUT_MS : this.front.limits.requestTimeoutMs
      if (bodyLimit > 0) this.armClient(bodyLimit, this.onBodyTimeout)
    }
    // Nothing else is expected before the exchange ends: read on, so a client leaving is noticed.
    if (this.requestDone && this.pending === undefined) this.socket.resume()
    else this.socket.pause()
    if (upgrading) {
      // An upgrade takes a connection of its own, never pooled (it becomes the tunnel).
      this.granted(PooledConnection.open({ ...out.upstream, connectReading: undefined }, undefined))
      return
    }
    this.acquireSlot(core.poolFor(out.upstream), false)
  }

  /** Stops serving the connection: the socket, paused, is no longer this engine's. */
  protected detach(): net.Socket {
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
    return socket
  }

  /**
   * The exchange is over with its response complete: it is reported, its admission ends, and the
   * connection closes or waits for its next request (reading one already received).
   */
  protected exchangeComplete(): void {
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

  protected feedBody(chunk: Buffer, from: number): void {
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
    this.upTimer.refresh()
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
}
