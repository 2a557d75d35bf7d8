/**
 * What bounds one client connection in time: the head, keep-alive, body, response and idle timeouts,
 * the bounded wait for a pooled upstream connection (and a client's share of a pool), and the `ClientLimits` data rates (a request body
 * below its minimum rate, measured only while the engine reads it; a client not taking queued response
 * bytes), checked by the server's heartbeat. Each ends the exchange through `fail` or `destroy` and is
 * reported through the front door's `onClientLimit`; none of it runs per chunk.
 */
import { performance } from "node:perf_hooks"
import { type ClientLimitKind, requestBodyTooSlow, responseTakeDeadlineMs, slotsPerClient } from "../../../domain/ClientLimits.ts"
import type { UpstreamPool } from "../UpstreamPool.ts"
import { CLOSED, ConnectionState, EXCHANGE, HEAD, WAITING } from "./ConnectionState.ts"

export abstract class ConnectionLimits extends ConnectionState {
  // The request body's rate: measured while the engine reads it (not while it holds the client back).
  /** The body is being timed. */
  protected bodyTimed = false
  /** `receivedBytes` when the body began. */
  protected bodyFrom = 0
  /** Time the body was read before the current stretch (ms). */
  protected bodyActiveMs = 0
  /** Start of the current stretch of reading (`performance.now()`), or -1 while paused. */
  protected bodyResumedAt = -1
  // A client not taking response bytes: since when nothing was taken, and how much was queued then.
  protected stallSince = -1
  protected stallQueued = 0

  /** Tells the front door a client limit refused this request or cut this connection. */
  protected limitReached(limit: ClientLimitKind): void {
    const on = this.front.onClientLimit
    if (on === undefined) return
    const request = this.request
    on({ limit, client: this.socket.remoteAddress ?? "local", method: request?.method ?? "", target: request?.target ?? "" })
  }

  /** Starts timing the request body (once it can flow to the upstream). */
  protected startBodyClock(): void {
    if (this.server.clientLimits.minRequestBodyBytesPerSecond <= 0) return
    this.bodyTimed = true
    this.bodyFrom = this.receivedBytes
    this.bodyActiveMs = 0
    this.bodyResumedAt = performance.now()
    this.server.watch(this)
  }

  /** The engine stops reading the body (the upstream is not taking it): this time is not the client's. */
  protected pauseBodyClock(): void {
    if (this.bodyResumedAt >= 0) {
      this.bodyActiveMs += performance.now() - this.bodyResumedAt
      this.bodyResumedAt = -1
    }
  }

  protected resumeBodyClock(): void {
    if (this.bodyTimed && this.bodyResumedAt < 0) this.bodyResumedAt = performance.now()
  }

  /**
   * The periodic rate check (see `ConnectionHost.watch`): a request body below its minimum rate, or a
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

  /** Asks `pool` for a connection; a wait for one is bounded (`upstreamSlotWaitMs`). */
  protected acquireSlot(pool: UpstreamPool, fresh: boolean): void {
    const limits = this.server.clientLimits
    this.pool = pool
    this.slotLimit = slotsPerClient(limits.maxUpstreamSlotsPerClient, pool.maxSockets)
    const queued = pool.acquire(this, fresh)
    if (queued && this.pool === pool && limits.upstreamSlotWaitMs > 0) {
      this.slotTimer = setTimeout(this.onSlotWait, limits.upstreamSlotWaitMs)
    }
  }

  protected readonly onSlotWait = (): void => {
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

  protected readonly onHeadTimeout = (): void => {
    if (this.phase !== HEAD) return
    if (this.reader.buffered === 0 && this.pending === undefined) this.destroyClient()
    else {
      this.limitReached("head_timeout")
      this.fail(408, "switchyard: request not received in time")
    }
  }

  protected readonly onKeepAliveTimeout = (): void => {
    if (this.idle()) this.destroyClient()
  }

  protected readonly onBodyTimeout = (): void => {
    if (this.requestDone) return
    if (this.responseHeadSent) this.destroy()
    else this.fail(408, "switchyard: request not received in time")
  }

  protected readonly onResponseTimeout = (): void => {
    if (this.responseHeadSent || this.phase === CLOSED) return
    const target = this.outgoing!.upstream
    this.core.report(`upstream ${target.describe} did not answer in time: ${this.outgoing!.method} ${this.outgoing!.path}`)
    this.fail(504, `switchyard: upstream ${target.describe} timed out before answering`)
  }

  protected readonly onIdleTimeout = (): void => {
    if (this.phase !== EXCHANGE) return
    const target = this.outgoing!.upstream
    this.core.report(`upstream ${target.describe} was idle too long: ${this.outgoing!.method} ${this.outgoing!.path}`)
    this.destroy()
  }
}
