/**
 * One client connection of the raw HTTP/1.1 engine, its upstream side: the pooled upstream connection
 * (granted, refused, or refused unsent and decided again), the response head read and checked
 * (`Http1Parser`; interim responses relayed, bounded), the head rewritten for the client (`Http1Heads`)
 * and the body relayed raw with its framing tracked, runs of tunnel chunks written together, backpressure
 * on the client socket pausing the upstream, the connection given back to its pool or dropped when the
 * response ends, and a `101` made a raw tunnel. The client's side is `RequestSide`'s.
 */
import { Buffer } from "node:buffer"
import { responseHeadBytes, switchingHeadBytes } from "../../../domain/Http1Heads.ts"
import { BodyFramer, type Http1Error, type ResponseHead, responseFraming } from "../../../domain/Http1Parser.ts"
import { contentLengthValues } from "../../../domain/ContentLength.ts"
import type { ReadRelease } from "../../ReadLease.ts"
import { connectionRefusal } from "../Upstream.ts"
import type { ConnectionOwner, PooledConnection } from "../UpstreamPool.ts"
import { EXCHANGE, TUNNEL, WAITING } from "./ConnectionState.ts"
import { COALESCE_BYTES, MAX_INTERIM_RESPONSES, WRITE_QUEUE_PAUSE_BYTES } from "./Constants.ts"
import { spliceTunnel } from "./RawTunnel.ts"
import { writeAtTurnEnd } from "../TurnWrites.ts"
import { MessageSide } from "./MessageSide.ts"

const errorText = (err: (Error & { code?: string }) | undefined): string => err === undefined ? "connection closed" : err.code ?? err.message

/** One client connection: a loop of request → upstream exchange → response, then the next request. */
export class ClientConnection extends MessageSide implements ConnectionOwner {
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
      writeAtTurnEnd(up, this.head!)
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

  // ---- response ----

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
   * The run ended: the client socket is uncorked at the end of this turn of the event loop, joining the
   * runs of further reads in one write (a WebSocket tunnel hands over one message per read).
   */
  readonly upstreamBatchEnd = (): void => {
    if (this.batchCorked && !this.uncorkScheduled) {
      this.uncorkScheduled = true
      setImmediate(this.uncorkLater)
    }
  }

  private readonly uncorkLater = (): void => {
    this.uncorkScheduled = false
    if (this.batchCorked) {
      this.batchCorked = false
      this.socket.uncork()
    }
  }

  readonly upstreamData = (chunk: Buffer): void => {
    this.upstreamBytes += chunk.length
    const framer = this.responseFramer
    if (framer !== undefined) {
      this.upTimer.refresh()
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
        // a chunk the socket could not write at once is held until it is written, then given back
        let held: ReadRelease | undefined
        if (f > 0) {
          this.sentBytes += f
          ok = socket.write(f === chunk.length ? chunk : chunk.subarray(0, f), () => held?.())
        }
        if (trailers !== undefined) {
          this.sentBytes += trailers.length
          ok = socket.write(trailers)
        }
        if (socket.writableLength > 0) held = conn.holdRead()
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
    this.upTimer.refresh()
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
      if (framer.done) writeAtTurnEnd(socket, headBytes)
      else socket.write(headBytes)
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
      // One write for a small response (cheaper than a corked writev of two buffers), with the turn's others.
      ok = writeAtTurnEnd(socket, Buffer.concat([headBytes, body], headBytes.length + body.length))
    } else {
      let held: ReadRelease | undefined
      socket.cork()
      socket.write(headBytes)
      ok = socket.write(body, () => held?.())
      socket.uncork()
      if (socket.writableLength > 0) held = this.conn!.holdRead()
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
    this.exchangeComplete()
  }

  // ---- upstream end ----

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
    // The decision's hold (a backend lease) lasts as long as the tunnel.
    const onEnd = this.onEnd
    this.onEnd = undefined
    const target = this.outgoing!.upstream
    const what = `${this.request!.method} ${this.outgoing!.path}`
    const pending = this.pending
    this.pending = undefined
    // what followed the 101 in the upstream's read is copied: the read is given back after this call
    if (rest.length > 0) rest = Buffer.from(rest)
    spliceTunnel(socket, up, {
      tunnels: this.core.tunnels,
      onEnd,
      idleTimeoutMs: this.idleTimeoutMs,
      onIdle: () => this.core.report(`tunnel to ${target.describe} idle too long: ${what}`),
      switching,
      rest,
      pending,
      clientEnded: this.clientEnded
    })
    this.resetExchange()
  }
}
