/**
 * The HTTP-forwarding core shared by every front door: `serveHttp1` serves client connections a front
 * door accepts with the raw HTTP/1.1 engine (heads checked and rewritten, bodies streamed with
 * backpressure, upgrades turned into raw half-closable pipes, failures mapped to 502/504), and
 * `exchange` carries the exchanges of a front door whose requests are messages (the HTTP/2 public port)
 * on the same pooled upstream connections. It does not route or authorise: callers decide first. The
 * per-request path is plain Node callbacks; pools and live tunnels belong to the service's scope.
 */
import { Context, Effect, Layer } from "effect"
import type { Scope } from "effect"
import type { Duplex } from "node:stream"
import type { ForwardedMode } from "../domain/HttpHeaders.ts"
import { type ErrorRenderer, plainErrors } from "./forward/ErrorResponse.ts"
import type { HeadLimits } from "../domain/Http1Parser.ts"
import type { ExchangeFront } from "./forward/Exchange.ts"
import { exchangeOverHttp1 } from "./forward/Http1MessageUpstream.ts"
import type { Http1Front, Http1Server } from "./forward/http1/Admission.ts"
import { makeHttp1Server } from "./forward/Http1Engine.ts"
import type { Upstream } from "./forward/Upstream.ts"
import { UpstreamPool } from "./forward/UpstreamPool.ts"

export interface ForwarderConfig {
  readonly upstream: Upstream
  /** Default: `off` toward a local Unix-socket API, `replace` otherwise. */
  readonly forwardedHeaders?: ForwardedMode | undefined
  /** No bytes either way for this long before the response head (ms) is a 504. 0 = none. */
  readonly responseTimeoutMs: number
  /** No bytes either way on a response or tunnel for this long closes it (ms). 0 = none. */
  readonly idleTimeoutMs: number
  /** How error bodies look (default plain text). */
  readonly errors?: ErrorRenderer | undefined
  /** Called with a one-line description of each upstream failure (for logs). */
  readonly onUpstreamError?: ((message: string) => void) | undefined
}

export interface ForwarderShape {
  readonly upstream: Upstream
  /** What it does with `X-Forwarded-*` fields, for front doors that reach upstreams by messages. */
  readonly forwardedMode: ForwardedMode
  /** How its error answers look. */
  readonly errors: ErrorRenderer
  /**
   * Serves client connections the caller accepts (`net.Server` `connection`) with the raw HTTP/1.1
   * engine: heads parsed and rewritten, bodies moved unchanged, pooled raw upstream connections
   * (`upstream.connect()`). Closed with the forwarder's scope.
   */
  readonly serveHttp1: (front: Http1Front) => Http1Server
  /**
   * Carries one exchange of a front door whose requests are messages (the HTTP/2 public port) on a
   * pooled HTTP/1.1 connection to `upstream` (see `Http1MessageUpstream`).
   */
  readonly exchange: (front: ExchangeFront, upstream: Upstream, limits: HeadLimits) => void
  /** Requests and tunnels in flight (for metrics and leak checks). */
  readonly active: () => { readonly requests: number; readonly tunnels: number }
}

/** Most pooled connections per upstream when the upstream sets no limit. */
export const ENGINE_DEFAULT_MAX_SOCKETS = 256

/** Builds the forwarding core; its pools, engine servers and live tunnels close with the scope. */
export const makeForwarder: (config: ForwarderConfig) => Effect.Effect<ForwarderShape, never, Scope.Scope> = Effect.fn(
  "Forwarder.make"
)(function*(config: ForwarderConfig) {
  const upstream = config.upstream
  const errors = config.errors ?? plainErrors
  const forwardedMode: ForwardedMode = config.forwardedHeaders ?? (upstream.local ? "off" : "replace")
  const tunnels = new Set<Duplex>()
  let requests = 0
  let closed = false
  const report = config.onUpstreamError ?? (() => {})

  const pools = new Map<Upstream, UpstreamPool>()
  const servers = new Set<Http1Server>()

  yield* Effect.addFinalizer(() =>
    Effect.promise(async () => {
      closed = true
      await Promise.all([...servers].map((s) => s.close(0)))
      servers.clear()
      for (const s of tunnels) s.destroy()
      tunnels.clear()
      for (const p of pools.values()) p.close()
      pools.clear()
    })
  )

  const engineCore = {
    upstream,
    forwardedMode,
    responseTimeoutMs: config.responseTimeoutMs,
    idleTimeoutMs: config.idleTimeoutMs,
    errors,
    report,
    poolFor: (target: Upstream): UpstreamPool => {
      let pool = pools.get(target)
      if (pool === undefined) {
        const maxSockets = Number.isFinite(target.maxSockets) && target.maxSockets > 0 ? target.maxSockets : ENGINE_DEFAULT_MAX_SOCKETS
        const maxFree = Number.isFinite(target.maxFreeSockets) ? Math.min(target.maxFreeSockets, maxSockets) : maxSockets
        pool = new UpstreamPool(target, maxSockets, maxFree, (empty) => {
          if (pools.get(empty.upstream) === empty) pools.delete(empty.upstream)
        }, (bytes) => report(`upstream ${target.describe} sent ${bytes} bytes on an idle connection; the connection is dropped`))
        pools.set(target, pool)
      }
      return pool
    },
    tunnels,
    requestStarted: () => void requests++,
    requestFinished: () => void requests--,
    isClosed: () => closed
  }

  const exchange = (front: ExchangeFront, target: Upstream, limits: HeadLimits): void => {
    if (closed) {
      front.fail(503, "switchyard: shutting down")
      return
    }
    requests++
    exchangeOverHttp1(engineCore.poolFor(target), front, {
      limits,
      responseTimeoutMs: config.responseTimeoutMs ?? 0,
      idleTimeoutMs: config.idleTimeoutMs ?? 0,
      report,
      onDone: () => void requests--
    })
  }

  const serveHttp1 = (front: Http1Front): Http1Server => {
    const server = makeHttp1Server(engineCore, front)
    servers.add(server)
    // A closed server is forgotten (listeners come and go with their ports).
    return { ...server, close: (drainMs) => server.close(drainMs).finally(() => servers.delete(server)) }
  }

  return {
    upstream,
    serveHttp1,
    exchange,
    forwardedMode,
    errors,
    active: () => ({ requests, tunnels: tunnels.size })
  } satisfies ForwarderShape
})

/** The forwarding core as a service, for front doors that forward to one upstream. */
export class Forwarder extends Context.Service<Forwarder, ForwarderShape>()("switchyard/Forwarder") {
  static readonly make = makeForwarder
  static readonly layer = (config: ForwarderConfig): Layer.Layer<Forwarder> => Layer.effect(Forwarder, makeForwarder(config))
}
