/**
 * Reverse HTTP/2 from plain Node: `serveReverseHttp2(handler or http2 server, options)` dials the
 * gateway's tunnel port and serves the given handler over the connections it keeps; `close()` ends
 * them; `exposeOverReverseHttp2` forwards to a local HTTP service instead (`switchyard client --h2`).
 * The Effect Layer behind both is `H2Client.layer`. It does not start a gateway.
 */
import * as http2 from "node:http2"
import * as tls from "node:tls"
import { Context, Effect, Exit, Layer, Scope } from "effect"
import type * as Redacted from "effect/Redacted"
import type { HeadLimits } from "../domain/Http1Parser.ts"
import { sampledLines } from "../domain/LogSampler.ts"
import type { RouteDefinition } from "../domain/Route.ts"
import { H2Client, type H2ClientConfig, H2ClientError, type H2ClientShape, type H2GatewayState } from "../services/client/H2Client.ts"
import { plainErrors } from "../services/forward/ErrorResponse.ts"
import { exchangeOverHttp1 } from "../services/forward/Http1MessageUpstream.ts"
import { nodeExchangeFront } from "../services/forward/NodeExchangeFront.ts"
import { tcpUpstream } from "../services/forward/Upstream.ts"
import { IDLE_SURPLUS_LINGER_MS, UpstreamPool } from "../services/forward/UpstreamPool.ts"

/** What `serveReverseHttp2` returns. */
export interface ReverseHttp2Handle {
  /** Connections currently serving. */
  readonly connected: () => number
  /** Connection attempts made so far. */
  readonly attempts: () => number
  /** The latest failed attempt (unreachable gateway, refused token...), if any. */
  readonly lastError: () => H2ClientError | undefined
  /** Closes every connection (and the `http2` server, when it was made here from a handler). */
  readonly close: () => Promise<void>
}

/** A request handler in Node's `http2` compatibility API (`(req, res) => ...`). */
export type ReverseHttp2Handler = (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void

/**
 * Serves `handler` (or an existing `http2` server, e.g. one with `settings` or a `stream` listener)
 * over connections to the gateway. Options are `H2ClientConfig`: `gateway`, `token`, `routes`,
 * `connections`, `tls`, `backoff`.
 */
export const serveReverseHttp2 = async (
  handler: ReverseHttp2Handler | http2.Http2Server | http2.Http2SecureServer,
  options: H2ClientConfig
): Promise<ReverseHttp2Handle> => {
  const owned = typeof handler === "function"
  const server = typeof handler === "function" ? http2.createServer(handler) : handler
  const scope = Scope.makeUnsafe()
  const context = await Effect.runPromise(Layer.buildWithScope(H2Client.layer(server, options), scope))
  const client: H2ClientShape = Context.get(context, H2Client)
  let closing: Promise<void> | undefined
  return {
    connected: client.connected,
    attempts: client.attempts,
    lastError: client.lastError,
    close: () =>
      closing ??= Effect.runPromise(Scope.close(scope, Exit.void)).then(() => {
        if (owned) server.close()
      })
  }
}

/** Most pooled connections from a reverse-HTTP/2 client to the local service it exposes. */
export const MaxLocalSockets = 256
/** Most idle pooled connections kept to the local service. */
export const MaxLocalFreeSockets = 32
/** Shortest interval between two warnings about the local service failing requests (ms). */
export const LocalFailureLogIntervalMs = 10_000
/** Largest response head the local service may send, and most fields in it. */
export const LocalResponseHeadLimits: HeadLimits = { maxHeaderSize: 64 * 1024, maxHeadersCount: 2_000 }

/**
 * An `http2` request handler that forwards every request the gateway sends to a local HTTP/1.1 service
 * over the forwarding core's pooled connections (`exchangeOverHttp1`: bodies streamed both ways with
 * backpressure, trailers relayed, the local service's connections read into reused buffers, idle ones
 * beyond `maxFreeSockets` kept for `lingerMs` so a steady load reuses them); what `switchyard client
 * --h2` serves. The request goes as the gateway sent it (its `X-Forwarded-*` included); a local service
 * that cannot be reached answers 502. `Upgrade` is not offered (no extended CONNECT), so the gateway
 * answers WebSocket requests for such a tunnel with 501.
 */
export const localHttpHandler = (
  target: { readonly host: string; readonly port: number },
  pool: { readonly maxSockets: number; readonly maxFreeSockets: number; readonly lingerMs: number } = {
    maxSockets: MaxLocalSockets,
    maxFreeSockets: MaxLocalFreeSockets,
    lingerMs: IDLE_SURPLUS_LINGER_MS
  },
  report: (message: string) => void = () => {}
): {
  readonly handler: ReverseHttp2Handler
  readonly close: () => void
} => {
  const upstream = tcpUpstream(target.host, target.port, pool)
  const connections = new UpstreamPool(upstream, pool.maxSockets, pool.maxFreeSockets, () => {}, (bytes) => {
    report(`local service ${upstream.describe} sent ${bytes} bytes on an idle connection; the connection is dropped`)
  }, pool.lingerMs)
  const handler: ReverseHttp2Handler = (req, res) => {
    const front = nodeExchangeFront(req, res, { forwardedMode: "off", errors: plainErrors, path: req.url })
    exchangeOverHttp1(connections, front, { limits: LocalResponseHeadLimits, responseTimeoutMs: 0, idleTimeoutMs: 0, report, onDone: () => {} })
  }
  return { handler, close: () => connections.close() }
}

/**
 * Exposes a local HTTP service through reverse-HTTP/2 tunnel ports (one client per gateway, each with
 * its own connections) until the scope closes. Used by `switchyard client --h2`.
 */
export const exposeOverReverseHttp2 = (options: {
  /** The gateways' reverse-HTTP/2 ports; `tls` ones are dialled with TLS, trusting `ca` too. */
  readonly gateways: ReadonlyArray<{ readonly host: string; readonly port: number; readonly tls?: boolean | undefined }>
  /** PEM CA certificate(s) trusted for TLS gateways, besides the system's. */
  readonly ca?: string | undefined
  readonly target: { readonly host: string; readonly port: number }
  readonly token: Redacted.Redacted<string>
  readonly routes: ReadonlyArray<RouteDefinition>
  readonly label?: string | undefined
  readonly connections?: number | undefined
}): Effect.Effect<ExposedOverReverseHttp2, H2ClientError, Scope.Scope> =>
  Effect.gen(function*() {
    const tcp = options.routes.find((route) => route._tag === "Tcp" || (route._tag === "Tls" && route.then === "tcp"))
    if (tcp !== undefined) {
      return yield* new H2ClientError({ reason: "Config", message: "reverse HTTP/2 carries HTTP routes only; raw TCP needs the control port" })
    }
    // a local service that fails is said at the default level, one line per 10 s with a count
    const run = Effect.runForkWith(yield* Effect.context<never>())
    const warn = sampledLines(LocalFailureLogIntervalMs, (line) => void run(Effect.logWarning(`${line} (the local service --expose names)`).pipe(Effect.annotateLogs({ component: "client" }))))
    const local = yield* Effect.acquireRelease(
      Effect.sync(() => localHttpHandler(options.target, undefined, warn)),
      (l) => Effect.sync(l.close)
    )
    const server = http2.createServer(local.handler)
    yield* Effect.addFinalizer(() => Effect.sync(() => server.close()))
    const clients: Array<{ readonly gateway: string; readonly client: H2ClientShape }> = []
    for (const gateway of options.gateways) {
      const built = yield* Layer.build(H2Client.layer(server, {
        gateway: { host: gateway.host, port: gateway.port },
        // the system's CAs and the caller's own, as for control-port gateways
        ...(gateway.tls === true ? { tls: { ca: options.ca === undefined ? undefined : [...tls.rootCertificates, options.ca] } } : {}),
        token: options.token,
        routes: options.routes,
        label: options.label,
        connections: options.connections
      }))
      clients.push({ gateway: `${gateway.tls === true ? "tls://" : ""}${gateway.host}:${gateway.port}`, client: Context.get(built, H2Client) })
    }
    return {
      gateways: () => clients.map(({ gateway, client }) => ({ gateway, ...client.status(), connected: client.connected() }))
    }
  })

/** What `exposeOverReverseHttp2` reports: each gateway's state and its connections up. */
export interface ExposedOverReverseHttp2 {
  readonly gateways: () => ReadonlyArray<H2GatewayState & { readonly gateway: string; readonly connected: number }>
}
