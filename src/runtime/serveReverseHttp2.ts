/**
 * Reverse HTTP/2 from plain Node: `serveReverseHttp2(handler or http2 server, options)` dials the
 * gateway's tunnel port and serves the given handler over the connections it keeps; `close()` ends
 * them; `exposeOverReverseHttp2` forwards to a local HTTP service instead (`switchyard client --h2`).
 * The Effect Layer behind both is `H2Client.layer`. It does not start a gateway.
 */
import * as http from "node:http"
import * as http2 from "node:http2"
import type * as net from "node:net"
import * as tls from "node:tls"
import { Context, Effect, Exit, Layer, Scope } from "effect"
import type * as Redacted from "effect/Redacted"
import { responseHeaders } from "../domain/HttpHeaders.ts"
import type { RouteDefinition } from "../domain/Route.ts"
import { H2Client, type H2ClientConfig, H2ClientError, type H2ClientShape, type H2GatewayState } from "../services/client/H2Client.ts"

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
/**
 * How long idle connections beyond `MaxLocalFreeSockets` stay for reuse after their last request (ms):
 * under a steady load of more concurrent requests than that, closing the surplus at once would close
 * and reopen a connection for a good share of the requests.
 */
export const LocalIdleSurplusLingerMs = 1_000

/**
 * A keep-alive agent that keeps up to `maxSockets` idle connections, and closes the least recently
 * used idle ones beyond `keep` once they stayed idle for `lingerMs` (one unref'd timer, armed while
 * there are more than `keep`).
 */
class LingeringAgent extends http.Agent {
  private readonly keep: number
  private readonly lingerMs: number
  private readonly idleSince = new WeakMap<object, number>()
  private timer: ReturnType<typeof setTimeout> | undefined = undefined

  constructor(maxSockets: number, keep: number, lingerMs: number) {
    super({ keepAlive: true, maxSockets, maxFreeSockets: maxSockets, scheduling: "lifo" })
    this.keep = keep
    this.lingerMs = lingerMs
  }

  /** Node's documented hook for a socket its request released: `false` has it closed instead. */
  override keepSocketAlive(socket: net.Socket): boolean {
    // typed `void` in @types/node; Node documents (and returns) whether the socket may be kept
    const kept = (super.keepSocketAlive(socket) as unknown) !== false
    if (kept) {
      this.idleSince.set(socket, performance.now())
      if (this.timer === undefined) this.arm(this.lingerMs)
    }
    return kept
  }

  private arm(ms: number): void {
    this.timer = setTimeout(this.trim, ms)
    this.timer.unref()
  }

  /** Idle connections, least recently used first. */
  private idle(): Array<net.Socket> {
    const all: Array<net.Socket> = []
    for (const list of Object.values(this.freeSockets)) if (list !== undefined) all.push(...list)
    return all.sort((a, b) => (this.idleSince.get(a) ?? 0) - (this.idleSince.get(b) ?? 0))
  }

  private readonly trim = (): void => {
    this.timer = undefined
    const idle = this.idle()
    const now = performance.now()
    for (let i = 0; i < idle.length - this.keep; i++) {
      const left = (this.idleSince.get(idle[i]!) ?? 0) + this.lingerMs - now
      if (left > 0) {
        this.arm(left)
        return
      }
      idle[i]!.destroy()
    }
  }

  override destroy(): void {
    if (this.timer !== undefined) clearTimeout(this.timer)
    this.timer = undefined
    super.destroy()
  }
}

/**
 * An `http2` request handler that forwards every request the gateway sends to a local HTTP/1.1 service
 * (streaming both ways, trailers included); what `switchyard client --h2` serves. A local service that
 * cannot be reached answers 502. `Upgrade` is not offered (no extended CONNECT), so the gateway answers
 * WebSocket requests for such a tunnel with 501.
 */
export const localHttpHandler = (
  target: { readonly host: string; readonly port: number },
  pool: { readonly maxSockets: number; readonly maxFreeSockets: number; readonly lingerMs: number } = {
    maxSockets: MaxLocalSockets,
    maxFreeSockets: MaxLocalFreeSockets,
    lingerMs: LocalIdleSurplusLingerMs
  }
): {
  readonly handler: ReverseHttp2Handler
  readonly close: () => void
} => {
  const agent = new LingeringAgent(pool.maxSockets, pool.maxFreeSockets, pool.lingerMs)
  const handler: ReverseHttp2Handler = (req, res) => {
    const headers: Array<string> = []
    const raw = req.rawHeaders
    for (let i = 0; i < raw.length; i += 2) {
      if (raw[i]!.charCodeAt(0) !== 58 /* : */) headers.push(raw[i]!, raw[i + 1]!)
    }
    headers.push("host", req.authority)
    const local = http.request({ host: target.host, port: target.port, agent, method: req.method, path: req.url, headers })
    local.on("error", (error: Error & { code?: string }) => {
      if (!res.headersSent) {
        const body = `switchyard client: local service ${target.host}:${target.port} unreachable (${error.code ?? error.message})\n`
        res.writeHead(502, { "content-type": "text/plain; charset=utf-8", "content-length": String(Buffer.byteLength(body)) })
        res.end(body)
      } else {
        res.stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR)
      }
    })
    local.on("response", (up) => {
      res.writeHead(up.statusCode ?? 502, Object.fromEntries(pairs(responseHeaders(up.rawHeaders))))
      up.pipe(res, { end: false })
      up.on("end", () => {
        if (up.rawTrailers.length > 0) res.addTrailers(Object.fromEntries(pairs(up.rawTrailers)))
        res.end()
      })
      up.on("close", () => {
        if (!up.complete) res.stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR)
      })
    })
    res.on("close", () => {
      if (!res.writableFinished) local.destroy()
    })
    req.pipe(local)
  }
  return { handler, close: () => agent.destroy() }
}

/** Flat `[name, value, ...]` as pairs, repeated names joined as arrays (`set-cookie`). */
const pairs = (flat: ReadonlyArray<string>): Array<[string, string | Array<string>]> => {
  const out = new Map<string, string | Array<string>>()
  for (let i = 0; i < flat.length; i += 2) {
    const name = flat[i]!.toLowerCase()
    const previous = out.get(name)
    if (previous === undefined) out.set(name, flat[i + 1]!)
    else if (Array.isArray(previous)) previous.push(flat[i + 1]!)
    else out.set(name, [previous, flat[i + 1]!])
  }
  return [...out]
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
    const local = yield* Effect.acquireRelease(Effect.sync(() => localHttpHandler(options.target)), (l) => Effect.sync(l.close))
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
