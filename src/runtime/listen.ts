/**
 * `listen(definition)` for plain Node code: a `net.Server`-like object whose connections come through a
 * switchyard gateway's control port, so `http.createServer(app)` can serve over the tunnel the way
 * socketmaster's Go listener is served. Calls with the same servers and token share one control
 * connection per gateway. The tunnel protocol itself is `services/client/TunnelClient.ts`.
 */
import { EventEmitter } from "node:events"
import type * as net from "node:net"
import { Context, Effect, Exit, Layer, Redacted, Scope } from "effect"
import type { RouteDefinition } from "../domain/Route.ts"
import { describeTarget, type GatewayTarget, TunnelClient, type TunnelClientConfig } from "../services/client/TunnelClient.ts"
import { isWebSocketUrl, type WebSocketTarget } from "../services/transport/WebSocketDial.ts"
import type { StreamSocket } from "../services/yamux/StreamDuplex.ts"
import { parseGatewayAddress } from "./NetAddress.ts"
import * as NodeTransport from "./NodeTransport.ts"

/** Gateway used when neither the options nor `SWITCHYARD_SERVER` name one. */
export const DefaultServer = "127.0.0.1:9999"
/** Time `listen` waits for a first gateway to bind the listener. */
export const DefaultListenTimeoutMs = 30_000

/** What to serve: a public port and how its traffic is chosen. */
export interface ListenDefinition {
  readonly port: number
  /**
   * HTTP routed by domain suffix and/or path prefix (the default when nothing else is given);
   * `stripPrefix`: the backend reads the path without the prefix (`/a/x` as `/x`).
   */
  readonly http?: { readonly domainSuffix?: string; readonly pathPrefix?: string; readonly stripPrefix?: boolean } | undefined
  /** Every connection on the port, raw. */
  readonly tcp?: boolean | undefined
  /**
   * TLS terminated by the gateway with this certificate (or, with `acme: true` instead of `cert` and
   * `key`, one the gateway obtains for `domainSuffix` from its ACME CA), then HTTP (default) or raw TCP.
   */
  readonly tls?: {
    readonly domainSuffix: string
    readonly cert?: string | undefined
    readonly key?: string | undefined
    readonly acme?: boolean | undefined
    readonly then?: "http" | "tcp"
    readonly pathPrefix?: string
    readonly stripPrefix?: boolean
  } | undefined
}

export interface ListenOptions {
  /**
   * `host:port` of the gateway(s) (`tls://host:port` for a control port served over TLS), or
   * `ws://`/`wss://` URLs of their WebSocket control path; default `SWITCHYARD_SERVER` (comma-separated)
   * or 127.0.0.1:9999.
   */
  readonly server?: string | ReadonlyArray<string> | undefined
  /** For `tls://` servers: CA certificate(s) trusted besides the system's, and the name to verify. */
  readonly tls?: { readonly ca?: string | ReadonlyArray<string> | undefined; readonly servername?: string | undefined } | undefined
  /** Default `SWITCHYARD_TOKEN`. */
  readonly token?: string | undefined
  readonly label?: string | undefined
  readonly timeoutMs?: number | undefined
  readonly reconnect?: TunnelClientConfig["reconnect"]
  /** For `ws://`/`wss://` servers: CA, proxy (default from HTTPS_PROXY/HTTP_PROXY/NO_PROXY), keepalive. */
  readonly webSocket?: Omit<WebSocketTarget, "url"> | undefined
}

/** The route a definition asks for. */
export const toRoute = (definition: ListenDefinition): RouteDefinition => {
  const { port } = definition
  if (definition.tls !== undefined) {
    const { domainSuffix, cert, key, acme, then, pathPrefix, stripPrefix } = definition.tls
    const certificate = acme === true ? { acme: true as const } : { ...(cert === undefined ? {} : { cert }), ...(key === undefined ? {} : { key }) }
    return { _tag: "Tls", port, domainSuffix, ...certificate, then: then ?? "http", ...(pathPrefix ? { pathPrefix } : {}), ...(stripPrefix === true ? { stripPrefix } : {}) }
  }
  if (definition.tcp === true) return { _tag: "Tcp", port }
  const http = definition.http ?? {}
  return {
    _tag: "Http",
    port,
    ...(http.domainSuffix ? { domainSuffix: http.domainSuffix } : {}),
    ...(http.pathPrefix ? { pathPrefix: http.pathPrefix } : {}),
    ...(http.stripPrefix === true ? { stripPrefix: true } : {})
  }
}

interface SharedClient {
  readonly client: TunnelClient["Service"]
  readonly scope: Scope.Closeable
  refs: number
}

const shared = new Map<string, Promise<SharedClient>>()

const acquireClient = (key: string, config: TunnelClientConfig): Promise<SharedClient> => {
  let entry = shared.get(key)
  if (entry === undefined) {
    const scope = Scope.makeUnsafe()
    entry = Effect.runPromise(
      Layer.buildWithScope(TunnelClient.layer(config).pipe(Layer.provide(NodeTransport.layer)), scope).pipe(
        Effect.map((context) => ({ client: Context.get(context, TunnelClient), scope, refs: 0 }))
      )
    )
    shared.set(key, entry)
  }
  return entry.then((c) => {
    c.refs++
    return c
  })
}

const releaseClient = async (key: string, client: SharedClient): Promise<void> => {
  if (--client.refs > 0) return
  shared.delete(key)
  await Effect.runPromise(Scope.close(client.scope, Exit.void))
}

/**
 * A listener served through a gateway. Emits `listening`, `connection` (a socket-like stream whose
 * `remoteAddress`/`remotePort` are the public peer's), `error` (a gateway refused the listener) and
 * `close`. Hand it to an HTTP server with `serve(server)`.
 */
export class TunnelServer extends EventEmitter {
  readonly route: RouteDefinition
  /** Gateways that have bound the listener. */
  boundOn = 0
  private closing: Promise<void> | undefined
  private readonly release: () => Promise<void>

  constructor(route: RouteDefinition, release: () => Promise<void>) {
    super()
    this.route = route
    this.release = release
  }

  get listening(): boolean {
    return this.boundOn > 0 && this.closing === undefined
  }

  /** The public port, in `net.Server#address()` shape. */
  address(): net.AddressInfo {
    return { address: "0.0.0.0", family: "IPv4", port: this.route.port }
  }

  /** Feeds every tunnelled connection to `server` (an `http.Server`, `https.Server` or `net.Server`). */
  serve<S extends net.Server>(server: S): S {
    this.on("connection", (socket: StreamSocket) => server.emit("connection", socket))
    return server
  }

  /** Removes the listener from the gateways (in-flight work finishes first) and closes. */
  close(callback?: (error?: Error) => void): this {
    this.closing ??= this.release().then(() => void this.emit("close"))
    if (callback) this.closing.then(() => callback(), callback)
    return this
  }

  ref(): this {
    return this
  }

  unref(): this {
    return this
  }
}

const serversOf = (options: ListenOptions): Array<GatewayTarget> => {
  const raw = options.server ?? process.env["SWITCHYARD_SERVER"] ?? DefaultServer
  const list = typeof raw === "string" ? raw.split(",").map((s) => s.trim()).filter((s) => s.length > 0) : [...raw]
  return list.map((text): GatewayTarget => {
    if (isWebSocketUrl(text)) return { ...options.webSocket, url: text.trim() }
    const parsed = parseGatewayAddress(text)
    if (parsed instanceof Error) throw parsed
    const { host, port } = parsed
    return parsed.tls ? { host, port, tls: { ...options.tls } } : { host, port }
  })
}

/**
 * Asks the gateway(s) for `definition` and resolves once the first gateway has bound it; rejects when a
 * gateway refuses it or none answers within `timeoutMs`.
 */
export const listen = async (definition: ListenDefinition, options: ListenOptions = {}): Promise<TunnelServer> => {
  const route = toRoute(definition)
  const servers = serversOf(options)
  const token = options.token ?? process.env["SWITCHYARD_TOKEN"] ?? ""
  const key = JSON.stringify([servers, token, options.label ?? ""])
  const client = await acquireClient(key, {
    servers,
    token: Redacted.make(token),
    label: options.label,
    reconnect: options.reconnect
  })
  const scope = Effect.runSync(Scope.fork(client.scope))
  const server = new TunnelServer(route, async () => {
    await Effect.runPromise(Scope.close(scope, Exit.void))
    await releaseClient(key, client)
  })
  return new Promise<TunnelServer>((resolve, reject) => {
    let settled = false
    const timer = setTimeout(() => {
      // why the gateways have not answered (a refused TLS certificate, a connection refused), when known
      const reasons = client.client.status().filter((g) => g.lastError !== undefined).map((g) => `${describeTarget(g.address)}: ${g.lastError}`)
      const why = reasons.length === 0 ? "" : ` (${reasons.join("; ")})`
      fail(new Error(`no gateway bound ${JSON.stringify(definition)} within ${options.timeoutMs ?? DefaultListenTimeoutMs} ms${why}`))
    }, options.timeoutMs ?? DefaultListenTimeoutMs)
    const fail = (error: Error) => {
      if (settled) return void server.emit("error", error)
      settled = true
      clearTimeout(timer)
      server.close(() => reject(error))
    }
    Effect.runSync(
      client.client.addListener({
        route,
        onConnection: ({ socket }) => server.emit("connection", socket),
        onRejected: (gateway, reason, message) => fail(new Error(`gateway ${gateway} refused the listener: ${reason}: ${message}`)),
        onBound: () => {
          server.boundOn++
          if (settled) return
          settled = true
          clearTimeout(timer)
          server.emit("listening")
          resolve(server)
        }
      }).pipe(Scope.provide(scope))
    )
  })
}
