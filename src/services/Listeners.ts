/**
 * Public listeners: one per port, opened when the first route on it is bound, shared by every route on
 * that port, closed once the registry has dropped the port's last route (after the grace period).
 * HTTP ports and HTTP/1.1 on TLS ports (certificate by SNI, h2 or http/1.1 by ALPN) are served by the
 * forwarding core's raw HTTP/1.1 engine, each request admitted once the dispatcher leased a backend;
 * HTTP/2 requests become exchanges (`NodeExchangeFront`); TCP ports pipe bytes. A backend reached by
 * messages (reverse HTTP/2) takes its exchanges itself. Per-request instruments follow every exchange
 * through `observeExchange`. Listeners never parse bodies nor retry.
 */
import { Buffer } from "node:buffer"
import { performance } from "node:perf_hooks"
import type * as http2 from "node:http2"
import * as net from "node:net"
import { Duplex } from "node:stream"
import * as tls from "node:tls"
import { Context, Duration, Effect, Exit, FiberSet, Layer, Schedule, Schema, Scope, Semaphore } from "effect"
import { checkRequestFields } from "../domain/Http1Parser.ts"
import { MaxClientHelloBytes, readClientHello } from "../domain/TlsClientHello.ts"
import { ErrorCode } from "../domain/Http2Frame.ts"
import { headerValue } from "../domain/HttpHeaders.ts"
import {
  forwardedTarget,
  isRoutingRejection,
  normalizeHost,
  type PortKind,
  portKind,
  type RouteDefinition,
  type RouteQuery,
  routingTarget
} from "../domain/Route.ts"
import type { Backend, ConnectionMeta, ConnectionProtocol } from "./Backend.ts"
import { type ConnectionGuard, DefaultMaxConnectionsPerAddress, DefaultSilentConnectionTimeoutMs, type GuardAction, makeConnectionGuard } from "./ConnectionGuard.ts"
import { type AcquireOptions, DispatchError, Dispatcher, type Lease } from "./Dispatcher.ts"
import type { ClientLimits } from "../domain/ClientLimits.ts"
import type {
  Admission,
  ClientLimitEvent,
  Http1Exchange,
  Http1Front,
  Http1Outgoing,
  Http1Request,
  Http1Server,
  PendingAdmission
} from "./forward/http1/Admission.ts"
import type { MessageUpstream } from "./forward/Exchange.ts"
import { authorityConflict, http2Fields, nodeExchangeFront, observeFront } from "./forward/NodeExchangeFront.ts"
import type { ForwarderShape } from "./Forwarder.ts"
import { joinStreams } from "./JoinStreams.ts"
import { Registry, type RegistryError } from "./Registry.ts"

/** Most concurrent connections on one public port, by default. */
export const DefaultMaxConnectionsPerPort = 10_000
/** Largest request head accepted on public HTTP ports (Node's own default, named). */
export const DefaultMaxHeaderBytes = 16 * 1024
/** Time allowed for a public client to send its request head. */
export const DefaultHeadersTimeoutMs = 60_000
/** Time allowed for a TLS handshake on a public port. */
export const DefaultTlsHandshakeTimeoutMs = 10_000
/**
 * What a public port did to a connection to keep within its limits: the connection limits
 * (`GuardAction`), or, on a TLS port that relays some names to other gateways of the cluster, a
 * ClientHello read before TLS that was larger than `MaxClientHelloBytes` or not complete within the TLS
 * handshake timeout.
 */
export type PublicConnectionAction = GuardAction | "ClientHelloTooLarge" | "ClientHelloTimeout"
/** Most cached TLS contexts (one per distinct certificate in use). */
export const MaxCachedSecureContexts = 4_096
/** How often a draining gateway checks whether work is still in flight. */
export const DrainPollInterval: Duration.Duration = Duration.millis(20)
/** ALPN protocols served on TLS ports whose route is HTTP, in order of preference. */
export const TlsHttpAlpnProtocols: ReadonlyArray<string> = ["h2", "http/1.1"]
/** Most concurrent HTTP/2 streams per public connection on TLS ports. */
export const DefaultMaxConcurrentStreams = 128
/** Largest HTTP/2 header list accepted from public clients (matches the HTTP/1.1 head limit). */
export const DefaultMaxHeaderListBytes = DefaultMaxHeaderBytes
/** Most headers in a public request head on engine ports (Node's own default, named). */
export const DefaultMaxHeadersCount = 2_000
/** Idle time of a keep-alive public connection between requests on engine ports (Node's default). */
export const DefaultKeepAliveTimeoutMs = 5_000
/** Time a port that lost its last route lets engine connections finish their exchange before closing them. */
export const EngineStopDrainMs = 30_000

/**
 * What per-request instruments add to one exchange on an engine port: request headers set on the head
 * forwarded to the backend and response headers set on the head sent back (flat `[name, value, ...]`,
 * each replacing headers of the same name), and an observer told once how the exchange went.
 */
export interface ExchangeTap {
  readonly requestHeaders?: ReadonlyArray<string> | undefined
  readonly responseHeaders?: ReadonlyArray<string> | undefined
  readonly observe?: ((exchange: Http1Exchange) => void) | undefined
}

/** Sets headers on an outgoing request, dropping those of the same name it had. */
const setRequestHeaders = (outgoing: Http1Outgoing, set: ReadonlyArray<string>): void => {
  const h = outgoing.headers
  for (let j = 0; j < set.length; j += 2) {
    const name = set[j]!.toLowerCase()
    for (let i = h.length - 2; i >= 0; i -= 2) {
      if (h[i]!.length === name.length && h[i]!.toLowerCase() === name) h.splice(i, 2)
    }
  }
  for (let j = 0; j < set.length; j++) h.push(set[j]!)
}

export interface ListenersConfig {
  /** Address public ports bind to (default all interfaces, `0.0.0.0`). */
  readonly host?: string | undefined
  /**
   * The forwarding core: its raw HTTP/1.1 engine serves plain ports and HTTP/1.1 on TLS ports, and it
   * carries HTTP/2 public requests as exchanges (`Forwarder.exchange`); a backend reached by messages
   * takes each exchange itself.
   */
  readonly forwarder: ForwarderShape
  /** Most client connections on one public port (see `ConnectionTable`). */
  readonly maxConnectionsPerPort?: number | undefined
  /** Most client connections from one address on one public port. */
  readonly maxConnectionsPerAddress?: number | undefined
  /** Time a connection to an HTTP or TLS port may stay without sending a byte (ms; 0 = none). */
  readonly silentConnectionTimeoutMs?: number | undefined
  /** Told of each client connection a port refused or closed to keep within its connection limits. */
  readonly onConnectionLimit?: ((port: number, action: PublicConnectionAction, address: string | undefined) => void) | undefined
  readonly maxHeaderBytes?: number | undefined
  readonly headersTimeoutMs?: number | undefined
  readonly tlsHandshakeTimeoutMs?: number | undefined
  /**
   * Told, for each HTTP request, how long it waited for a backend (ms) and the dispatch error if it got
   * none (for metrics); not called for raw TCP connections.
   */
  readonly observeDispatch?: ((waitedMs: number, error: DispatchError | undefined) => void) | undefined
  /**
   * Called for each public HTTP request once it has a backend (request ids, per-route metrics, the
   * access log), on HTTP/1.1 and HTTP/2 alike. Not called for requests that found no backend
   * (`observeDispatch` sees those).
   */
  readonly observeExchange?: ((request: Http1Request, lease: Lease) => ExchangeTap) | undefined
  /**
   * On engine ports: the minimum data rates of request bodies and response reads, and each client
   * address's share of a backend's tunnel streams with the bounded wait for one (default
   * `CLIENT_LIMIT_DEFAULTS`).
   */
  readonly clientLimits?: ClientLimits | undefined
  /** On engine ports: told each time a client limit refuses a request or cuts a connection. */
  readonly onClientLimit?: ((event: ClientLimitEvent) => void) | undefined
  /** Certificates and challenge answers for TLS routes with `acme` (none: such routes get no certificate). */
  readonly certificates?: CertificateSource | undefined
  /**
   * The forwarding core serving connections relayed from other gateways of a cluster: it keeps the
   * relaying gateway's `X-Forwarded-*` and appends that gateway's address (default `forwarder`).
   */
  readonly relayForwarder?: ForwarderShape | undefined
}

/**
 * Certificates the gateway holds itself (ACME) for TLS routes registered with `acme`, and the answers to
 * the CA's challenges: HTTP-01 on plain HTTP ports, before any route; TLS-ALPN-01 on TLS ports.
 */
export interface CertificateSource {
  /** The context serving `name`, or why there is none yet (the handshake then fails with an alert). */
  readonly contextFor: (name: string) => tls.SecureContext | string
  /** The TLS-ALPN-01 challenge certificate for `name` while a validation is pending. */
  readonly alpnChallenge: (name: string) => tls.SecureContext | undefined
  /** The body answering an HTTP-01 challenge request for `path`, when it is one pending. */
  readonly httpChallenge: (path: string) => string | undefined
}

/** The ALPN protocol of TLS-ALPN-01 validation connections (RFC 8737). */
const AcmeTlsAlpn = "acme-tls/1"

/** Served to a TLS route whose certificate does not exist yet: the handshake ends with a handshake_failure alert. */
const noCertificate = tls.createSecureContext({})

/** A public port could not be served. */
export class ListenerError extends Schema.TaggedError<ListenerError>()("ListenerError", {
  reason: Schema.Literals(["BindFailed", "Conflict", "Limit"]),
  port: Schema.Number,
  message: Schema.String
}) {}

/** What the backend gets when bound: the listener id it chose and the bound public address. */
export interface BoundRoute {
  readonly route: RouteDefinition
  readonly address: net.AddressInfo
}

export interface ListenersShape {
  /**
   * Makes `backend` serve `route` until the scope closes: opens the port if needed, then registers.
   * Fails when the port cannot be bound or the route conflicts with others on the port.
   */
  readonly bind: (route: RouteDefinition, backend: Backend) => Effect.Effect<BoundRoute, ListenerError, Scope.Scope>
  /** Ports currently open, with their kind. */
  readonly openPorts: () => ReadonlyMap<number, PortKind>
  /**
   * Graceful stop: every port stops accepting (idle HTTP connections close), then waits, at most
   * `timeout`, until no request or connection is in flight on any backend. Used on shutdown, before the
   * tunnels close.
   */
  readonly drain: (timeout: Duration.Input) => Effect.Effect<void>
  /** Requests and connections in flight on every backend. */
  readonly inFlight: () => number
  /**
   * Serves a connection relayed from another gateway of the cluster on the open port `port`, as a
   * public connection of that port (same engine, limits and checks) dispatched to local backends only;
   * `protocol` is the kind the relaying gateway routed it as. On a TLS port (`tls-http`, `tls-tcp`) the
   * stream is the public client's raw TLS, ClientHello included, and is terminated here as on the
   * public port. A port that is not open, or of another kind, closes it.
   */
  readonly acceptRelayed: (socket: Duplex, port: number, protocol: ConnectionProtocol) => void
}

export class Listeners extends Context.Service<Listeners, ListenersShape>()("switchyard/Listeners") {
  static readonly layer = (config: ListenersConfig): Layer.Layer<Listeners, never, Registry | Dispatcher> =>
    Layer.effect(Listeners, make(config))
  static readonly make = (config: ListenersConfig): Effect.Effect<ListenersShape, never, Registry | Dispatcher | Scope.Scope> =>
    make(config)
}

interface PortListener {
  readonly kind: PortKind
  readonly port: number
  readonly server: net.Server
  readonly address: net.AddressInfo
  readonly sockets: Set<net.Socket>
  /** Keeps the port's connections within its limits (stopped with the port). */
  readonly guard: ConnectionGuard
  /** The raw engine serving the port's connections, when it does. */
  readonly engine?: Http1Server | undefined
  /** The engine serving connections relayed from other gateways (local backends only), once one came. */
  relayEngine?: Http1Server | undefined
  /** TLS ports: terminates public TLS connections (fed by the port's server) and relayed raw TLS streams. */
  readonly tls?: TlsFront | undefined
}

/** The public client of a relayed stream (from its preamble) and the gateway that relayed it. */
interface RelayedClient {
  readonly remoteAddress: string | undefined
  readonly remotePort: number | undefined
  readonly relayedFrom: string | undefined
}

/** Terminates TLS for one port and serves what follows on local backends. */
interface TlsFront {
  /** Terminates the port's public connections. */
  readonly server: tls.Server
  /**
   * Terminates one raw TLS stream relayed from another gateway, whose TLS socket is given the public
   * client's address (the stream's, from its preamble).
   */
  readonly relayed: (stream: Duplex) => void
  readonly engine: Http1Server
}

/** The SNI server name a TLS client sent, normalized ("" when none). */
const serverNameOf = (socket: unknown): string => {
  const name = (socket as { servername?: string | false | null }).servername
  return typeof name === "string" ? normalizeHost(name) : ""
}

/**
 * Most time a raw TLS stream relayed from another gateway stays open once its TLS connection ended and
 * its last bytes were sent with the end of the stream, for the relaying gateway to pass them on and end
 * its side; after it the stream is reset.
 */
export const RelayedTlsLingerMs = 5_000

/**
 * A relay stream as TLS reads and writes it, ended gracefully: when the TLS connection is done after it
 * ended the stream, the stream is not reset (a reset would drop the last response bytes still on their
 * way to the relaying gateway) but kept until the relaying gateway ends it too, at most
 * `RelayedTlsLingerMs`. Anything else that ends the TLS connection resets it.
 */
const lingering = (inner: Duplex): Duplex => {
  const outer = new Duplex({
    allowHalfOpen: true,
    read: () => void inner.resume(),
    write: (chunk, _encoding, callback) => void inner.write(chunk, callback),
    final: (callback) => {
      inner.end()
      callback()
    },
    destroy: (error, callback) => {
      if (error === null && inner.writableEnded && !inner.destroyed) {
        const timer = setTimeout(() => inner.destroy(), RelayedTlsLingerMs)
        inner.once("close", () => clearTimeout(timer))
        inner.once("end", () => inner.destroy())
        inner.resume()
      } else {
        inner.destroy()
      }
      callback(error)
    }
  })
  inner.on("data", (chunk: Buffer) => {
    if (!outer.destroyed && !outer.push(chunk)) inner.pause()
  })
  inner.once("end", () => void (outer.destroyed || outer.push(null)))
  inner.on("error", () => inner.destroy())
  inner.once("close", () => void (outer.destroyed || outer.destroy()))
  return outer
}

/**
 * The request target a leased backend reads: without the route's path prefix when the route strips it,
 * except toward a relay backend, whose gateway routes the request again and strips it itself.
 */
const targetFor = (lease: Lease, routed: string): string =>
  lease.backend.relayedVia === undefined ? forwardedTarget(lease.route.route, routed) : routed

const dispatchErrorText = (error: DispatchError): string =>
  `${error.status === 404 ? "404 no route" : "503 no backend"} (${error.reason}): ${error.message}`

/** The answer to an ACME HTTP-01 challenge, as an exchange the engine serves itself. */
const challengeAnswer = (keyAuthorization: string): MessageUpstream => ({
  exchange: (front) => {
    const body = Buffer.from(keyAuthorization, "utf8")
    front.readBody(() => true, () => {})
    front.respond(200, ["content-type", "application/octet-stream", "content-length", String(body.length)], false)
    front.write(body)
    front.end(undefined)
  },
  upgrade: (_request, _protocol, socket) => void socket.destroy()
})

const make = Effect.fnUntraced(function*(config: ListenersConfig) {
  const registry = yield* Registry
  const dispatcher = yield* Dispatcher
  const host = config.host ?? "0.0.0.0"
  const maxConnections = config.maxConnectionsPerPort ?? DefaultMaxConnectionsPerPort
  const maxPerAddress = config.maxConnectionsPerAddress ?? DefaultMaxConnectionsPerAddress
  const silentTimeoutMs = config.silentConnectionTimeoutMs ?? DefaultSilentConnectionTimeoutMs
  const maxHeaderSize = config.maxHeaderBytes ?? DefaultMaxHeaderBytes
  const headersTimeout = config.headersTimeoutMs ?? DefaultHeadersTimeoutMs
  const handshakeTimeout = config.tlsHandshakeTimeoutMs ?? DefaultTlsHandshakeTimeoutMs
  const certificates = config.certificates
  const fibers = yield* FiberSet.make()
  const run = yield* FiberSet.runtime(fibers)<never>()
  const lock = yield* Semaphore.make(1)
  const open = new Map<number, PortListener>()
  const secureContexts = new Map<string, tls.SecureContext>()
  /** Relay backends of TLS routes, by port: such a port reads each ClientHello before terminating TLS. */
  const relayedTls = new Map<number, number>()
  /** Dispatch of connections and requests relayed here, and of those whose TLS this gateway terminates. */
  const localOnly: AcquireOptions = { localOnly: true }

  /** Dispatches, synchronously when a backend is free, else in a fiber that the caller may cancel. */
  const dispatch = (
    query: RouteQuery,
    onLease: (lease: Lease) => void,
    onError: (e: DispatchError) => void,
    cancelOn: Duplex,
    options?: AcquireOptions
  ) => {
    const now = dispatcher.tryAcquire(query, options)
    if (now instanceof DispatchError) return onError(now)
    if (now !== undefined) return onLease(now)
    const fiber = run(dispatcher.acquire(query, options))
    const cancel = () => fiber.interruptUnsafe()
    cancelOn.once("close", cancel)
    fiber.addObserver((exit) => {
      cancelOn.off("close", cancel)
      if (Exit.isSuccess(exit)) {
        if (cancelOn.destroyed) exit.value.release()
        else onLease(exit.value)
      } else {
        const failure = exit.cause.reasons.find((r) => r._tag === "Fail")
        if (failure !== undefined && failure._tag === "Fail") onError(failure.error)
        else cancelOn.destroy()
      }
    })
  }

  /**
   * One request of an HTTP/2 public client: routed and dispatched like the engine's, then carried as an
   * exchange (`nodeExchangeFront`) on the leased backend, by messages or on a pooled HTTP/1.1
   * connection; the per-request instruments observe it as they do engine exchanges.
   */
  const serveHttp2Exchange = (
    port: number,
    forwarder: ForwarderShape,
    req: http2.Http2ServerRequest,
    res: http2.Http2ServerResponse,
    options?: AcquireOptions
  ) => {
    const fields = http2Fields(req)
    const routed = routingTarget(req.url)
    const ambiguous = isRoutingRejection(routed) ? undefined : checkRequestFields(fields)
    const answer = (status: number, message: string) => {
      const body = forwarder.errors.render(message, status)
      if (res.headersSent || res.destroyed) return void res.stream.close(ErrorCode.INTERNAL_ERROR)
      res.writeHead(status, { "content-type": forwarder.errors.contentType, "content-length": Buffer.byteLength(body) })
      res.end(body)
    }
    if (isRoutingRejection(routed)) return answer(400, `switchyard: bad request target: ${routed.detail}`)
    if (ambiguous !== undefined) return answer(400, `switchyard: ${ambiguous.message}`)
    const conflict = authorityConflict(req, normalizeHost)
    if (conflict !== undefined) return answer(400, `switchyard: ${conflict}`)
    const host = normalizeHost(req.authority || headerValue(fields, "host"))
    const query: RouteQuery = { _tag: "Tls", port, serverName: serverNameOf(req.socket), host, path: routed.path }
    const observe = config.observeDispatch
    const arrived = performance.now()
    dispatch(
      query,
      (lease) => {
        observe?.(performance.now() - arrived, undefined)
        res.once("close", lease.release)
        const incoming: Http1Request = {
          method: req.method,
          target: req.url,
          originTarget: routed.target,
          versionMinor: 1,
          headers: fields,
          host,
          contentType: headerValue(fields, "content-type"),
          upgrade: undefined,
          socket: req.socket as unknown as Duplex
        }
        let tap: ExchangeTap | undefined
        try {
          tap = config.observeExchange?.(incoming, lease)
        } catch {
          return answer(502, "switchyard: the request could not be prepared for the upstream")
        }
        const plain = nodeExchangeFront(req, res, {
          forwardedMode: forwarder.forwardedMode,
          errors: forwarder.errors,
          path: targetFor(lease, routed.target),
          requestHeaders: tap?.requestHeaders,
          responseHeaders: tap?.responseHeaders
        })
        const tapped = tap?.observe
        const front = tapped === undefined ? plain : observeFront(plain, (seen) =>
          tapped({
            method: req.method,
            target: req.url,
            status: seen.status,
            receivedBytes: seen.receivedBytes,
            sentBytes: seen.sentBytes,
            durationMs: performance.now() - arrived,
            end: seen.end
          }))
        const messages = lease.backend.messages
        if (messages !== undefined) messages.exchange(front, lease)
        else forwarder.exchange(front, lease.backend.upstream, { maxHeaderSize, maxHeadersCount: DefaultMaxHeadersCount })
      },
      (error) => {
        observe?.(performance.now() - arrived, error)
        answer(error.status, dispatchErrorText(error))
      },
      req.stream,
      options
    )
  }

  /**
   * Joins a public connection to a raw stream of its leased backend (`first` written to the stream
   * before anything else); the lease ends with the connection, or at once if no stream could be opened.
   */
  const connectLeased = (
    socket: net.Socket,
    lease: Lease,
    at: { readonly protocol: ConnectionProtocol; readonly port: number; readonly serverName: string | undefined },
    first?: Buffer
  ) => {
    const meta: ConnectionMeta = {
      protocol: at.protocol,
      remoteAddress: socket.remoteAddress ?? "",
      remotePort: socket.remotePort ?? 0,
      localPort: at.port,
      localAddress: socket.localAddress,
      serverName: at.serverName
    }
    const fiber = run(lease.backend.connect(meta))
    const cancel = () => fiber.interruptUnsafe()
    socket.once("close", cancel)
    fiber.addObserver((exit) => {
      socket.off("close", cancel)
      if (Exit.isSuccess(exit) && !socket.destroyed) {
        if (first !== undefined) exit.value.write(first)
        joinStreams(socket, exit.value, lease.release)
      } else {
        if (Exit.isSuccess(exit)) exit.value.destroy()
        lease.release()
        socket.destroy()
      }
    })
  }

  const pipeToBackend = (
    socket: net.Socket,
    query: RouteQuery,
    port: number,
    protocol: ConnectionProtocol,
    serverName?: string,
    options?: AcquireOptions
  ) => {
    socket.on("error", () => socket.destroy())
    dispatch(
      query,
      (lease) => {
        connectLeased(socket, lease, { protocol, port, serverName })
      },
      () => socket.destroy(),
      socket,
      options
    )
  }

  /**
   * The engine's side of a plain HTTP port: each request is routed on its own Host and path, admitted at
   * once when a backend is free, else once the dispatcher grants one (bounded by its wait limit and
   * queue), and forwarded to that backend's upstream; its lease ends with the exchange.
   */
  const engineFront = (port: number, secure: boolean, options?: AcquireOptions): Http1Front => {
    const observe = config.observeDispatch
    const tapExchange = config.observeExchange
    /** The backend's own way in when it is reached by messages, bound to the lease. */
    const messageUpstream = (lease: Lease): MessageUpstream | undefined => {
      const messages = lease.backend.messages
      if (messages === undefined) return undefined
      return {
        exchange: (front) => messages.exchange(front, lease),
        upgrade: (request, protocol, socket, head) => messages.upgrade(request, protocol, socket, head, lease)
      }
    }
    const admission = (lease: Lease, request: Http1Request, routed: string): Admission => {
      const message = messageUpstream(lease)
      const target = targetFor(lease, routed)
      if (tapExchange === undefined) {
        return {
          _tag: "Forward",
          path: target,
          director: (outgoing) => void (outgoing.upstream = lease.backend.upstream),
          onEnd: lease.release,
          message
        }
      }
      let tap: ExchangeTap
      try {
        tap = tapExchange(request, lease)
      } catch (e) {
        lease.release()
        throw e
      }
      const headers = tap.requestHeaders
      return {
        _tag: "Forward",
        path: target,
        director: (outgoing) => {
          outgoing.upstream = lease.backend.upstream
          if (headers !== undefined) setRequestHeaders(outgoing, headers)
        },
        onEnd: lease.release,
        responseHeaders: tap.responseHeaders,
        observe: tap.observe,
        message
      }
    }
    const refusal = (error: DispatchError): Admission => ({ _tag: "Refuse", status: error.status, message: dispatchErrorText(error) })
    return {
      limits: {
        maxHeaderSize,
        maxHeadersCount: DefaultMaxHeadersCount,
        headersTimeoutMs: headersTimeout,
        requestTimeoutMs: 0,
        keepAliveTimeoutMs: DefaultKeepAliveTimeoutMs,
        maxConnections
      },
      clientLimits: config.clientLimits,
      onClientLimit: config.onClientLimit,
      admit: (request: Http1Request): Admission | PendingAdmission => {
        const challenge = secure || request.method !== "GET" ? undefined : certificates?.httpChallenge(request.originTarget)
        if (challenge !== undefined) {
          // an ACME HTTP-01 challenge, before any route: the engine answers it itself
          return { _tag: "Forward", message: challengeAnswer(challenge) }
        }
        const host = normalizeHost(request.host)
        const routed = routingTarget(request.originTarget)
        if (isRoutingRejection(routed)) return { _tag: "Refuse", status: 400, message: `switchyard: bad request target: ${routed.detail}` }
        const path = routed.path
        const query: RouteQuery = secure
          ? { _tag: "Tls", port, serverName: serverNameOf(request.socket), host, path }
          : { _tag: "Http", port, host, path }
        const arrived = observe === undefined ? 0 : performance.now()
        const now = dispatcher.tryAcquire(query, options)
        if (now instanceof DispatchError) {
          observe?.(performance.now() - arrived, now)
          return refusal(now)
        }
        if (now !== undefined) {
          observe?.(0, undefined)
          return admission(now, request, routed.target)
        }
        return {
          _tag: "Pending",
          wait: (decide) => {
            const fiber = run(dispatcher.acquire(query, options))
            fiber.addObserver((exit) => {
              if (Exit.isSuccess(exit)) {
                observe?.(performance.now() - arrived, undefined)
                let admitted: Admission
                try {
                  admitted = admission(exit.value, request, routed.target)
                } catch {
                  admitted = { _tag: "Refuse", status: 502, message: "switchyard: the request could not be prepared for the upstream" }
                }
                decide(admitted)
                return
              }
              const failure = exit.cause.reasons.find((r) => r._tag === "Fail")
              if (failure !== undefined && failure._tag === "Fail") {
                observe?.(performance.now() - arrived, failure.error)
                decide(refusal(failure.error))
              }
              // interrupted: the client left (the engine cancelled) or the listeners are closing
            })
            return () => fiber.interruptUnsafe()
          }
        }
      }
    }
  }

  const secureContextFor = (route: RouteDefinition): tls.SecureContext | undefined => {
    if (route._tag !== "Tls") return undefined
    if (route.acme === true) {
      const context = certificates?.contextFor(route.domainSuffix)
      return context === undefined || typeof context === "string" ? noCertificate : context
    }
    const cacheKey = route.cert + "\u0000" + route.key
    let context = secureContexts.get(cacheKey)
    if (context === undefined) {
      if (secureContexts.size >= MaxCachedSecureContexts) secureContexts.clear()
      context = tls.createSecureContext({ cert: route.cert, key: route.key })
      secureContexts.set(cacheKey, context)
    }
    return context
  }

  const track = (listener: { sockets: Set<net.Socket> }, socket: net.Socket) => {
    listener.sockets.add(socket)
    socket.once("close", () => listener.sockets.delete(socket))
  }

  /**
   * The TLS termination of one port: certificate by SNI (or the ACME TLS-ALPN-01 challenge's), then
   * HTTP/1.1 on the raw engine, HTTP/2 as exchanges, or raw TCP to the backend. The connections it serves
   * are public ones of this gateway and raw TLS streams relayed from other gateways; both are terminated
   * here, so they go to local backends only. Connections are fed to a `tls.Server` with the
   * `"connection"` event, which `tls.Server` documents for injecting any duplex stream; a relayed stream
   * gets a server of its own, which gives its TLS socket the public client's address.
   */
  const makeTlsFront = (port: number): TlsFront => {
    // HTTP/1.1 over the decrypted socket: the raw engine
    const tlsEngine = config.forwarder.serveHttp1(engineFront(port, true, localOnly))
    // HTTP/2 over the already-decrypted socket: a plain h2 server fed with the TLS socket (node:http2
    // is loaded by the first TLS port, so a process without one does not hold it)
    const innerH2 = process.getBuiltinModule("node:http2").createServer({
      settings: { maxConcurrentStreams: DefaultMaxConcurrentStreams, maxHeaderListSize: DefaultMaxHeaderListBytes }
    })
    innerH2.on("sessionError", () => {})
    innerH2.on("request", (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) =>
      serveHttp2Exchange(port, config.forwarder, req, res, localOnly)
    )
    // OpenSSL selects ALPN before it asks for the certificate, within the processing of the same
    // ClientHello (only microtasks run in between): a TLS-ALPN-01 validation (ALPN `acme-tls/1`)
    // is marked here and answered by `SNICallback` with the challenge certificate; the mark never
    // outlives that I/O callback
    let alpnChallengeFor: string | undefined
    const makeServer = (client?: RelayedClient) => {
      const tlsServer = tls.createServer({
        allowHalfOpen: true,
        handshakeTimeout,
        ALPNCallback: ({ servername, protocols }) => {
          alpnChallengeFor = undefined
          if (certificates !== undefined && protocols.includes(AcmeTlsAlpn)) {
            const name = normalizeHost(servername)
            if (certificates.alpnChallenge(name) !== undefined) {
              alpnChallengeFor = name
              setImmediate(() => void (alpnChallengeFor = undefined))
              return AcmeTlsAlpn
            }
          }
          const entry = registry.match({ _tag: "Tls", port, serverName: normalizeHost(servername) })
          if (entry === undefined || entry.route._tag !== "Tls") return undefined
          // raw TLS routes: the backend speaks whatever the client prefers
          if (entry.route.then === "tcp") return protocols[0]
          return TlsHttpAlpnProtocols.find((p) => protocols.includes(p))
        },
        SNICallback: (serverName, cb) => {
          const challenged = alpnChallengeFor
          alpnChallengeFor = undefined
          if (challenged !== undefined && challenged === normalizeHost(serverName)) {
            const challenge = certificates?.alpnChallenge(challenged)
            if (challenge !== undefined) return cb(null, challenge)
          }
          const entry = registry.match({ _tag: "Tls", port, serverName: normalizeHost(serverName) })
          const context = entry === undefined ? undefined : secureContextFor(entry.route)
          if (context === undefined) cb(new Error(`no certificate for ${serverName}`), undefined)
          else cb(null, context)
        }
      })
      tlsServer.on("tlsClientError", (_err, socket) => socket.destroy())
      tlsServer.on("secureConnection", (socket: tls.TLSSocket) => {
        socket.on("error", () => socket.destroy())
        if (client !== undefined) {
          Object.defineProperty(socket, "remoteAddress", { value: client.remoteAddress, enumerable: true })
          Object.defineProperty(socket, "remotePort", { value: client.remotePort, enumerable: true })
          // the per-request instruments say which gateway relayed it
          Object.defineProperty(socket, "relayedFrom", { value: client.relayedFrom, enumerable: true })
        }
        // a TLS-ALPN-01 validation ends with its handshake
        if (socket.alpnProtocol === AcmeTlsAlpn) return void socket.end()
        const serverName = serverNameOf(socket)
        const entry = registry.match({ _tag: "Tls", port, serverName })
        if (entry === undefined || entry.route._tag !== "Tls") return void socket.destroy()
        if (entry.route.then === "tcp") {
          pipeToBackend(socket, { _tag: "Tls", port, serverName }, port, "tls-tcp", serverName, localOnly)
        } else if (socket.alpnProtocol === "h2") {
          innerH2.emit("connection", socket)
        } else {
          tlsEngine.accept(socket)
        }
      })
      return tlsServer
    }
    return {
      server: makeServer(),
      relayed: (stream) => {
        const client = stream as unknown as RelayedClient
        makeServer({ remoteAddress: client.remoteAddress, remotePort: client.remotePort, relayedFrom: client.relayedFrom })
          .emit("connection", lingering(stream))
      },
      engine: tlsEngine
    }
  }

  /**
   * A public connection to a TLS port that relays some of its names: the ClientHello is read first (at
   * most `MaxClientHelloBytes`, within the TLS handshake timeout), without terminating TLS. A name whose
   * route has no live local backend here but a relay backend is piped, raw and ClientHello included, to
   * the gateway that holds it, which terminates TLS with its own certificate; anything else is handed,
   * bytes untouched, to this port's TLS termination, which serves or refuses it as on any TLS port.
   */
  const readClientHelloThen = (socket: net.Socket, port: number, front: TlsFront) => {
    let read: Buffer = Buffer.alloc(0)
    // chunks not yet joined, and how many bytes the reader needs before it can tell more
    const pending: Array<Buffer> = []
    let pendingBytes = 0
    let needed = 1
    let settled = false
    const settle = () => {
      settled = true
      clearTimeout(timer)
      socket.off("data", onData)
      socket.off("end", onEnd)
      socket.pause()
    }
    const cut = (action: PublicConnectionAction) => {
      settle()
      config.onConnectionLimit?.(port, action, socket.remoteAddress)
      socket.destroy()
    }
    const terminateHere = () => {
      socket.unshift(read)
      front.server.emit("connection", socket)
    }
    const onData = (chunk: Buffer) => {
      pending.push(chunk)
      pendingBytes += chunk.length
      if (read.length + pendingBytes < needed) return
      read = Buffer.concat([read, ...pending])
      pending.length = 0
      pendingBytes = 0
      const hello = readClientHello(read, MaxClientHelloBytes)
      switch (hello._tag) {
        case "Incomplete":
          needed = hello.needed
          return
        case "TooLarge":
          return cut("ClientHelloTooLarge")
        case "Malformed":
          settle()
          return terminateHere()
        case "ClientHello": {
          settle()
          const query: RouteQuery = { _tag: "Tls", port, serverName: hello.serverName }
          const entry = hello.serverName === "" ? undefined : registry.match(query)
          const relayed = entry !== undefined &&
            !entry.backends.some((b) => b.relayedVia === undefined && !b.isClosed()) &&
            entry.backends.some((b) => b.relayedVia !== undefined && !b.isClosed())
          if (!relayed || entry.route._tag !== "Tls") return terminateHere()
          const protocol: ConnectionProtocol = entry.route.then === "tcp" ? "tls-tcp" : "tls-http"
          return passThrough(socket, query, port, protocol, hello.serverName, read, terminateHere)
        }
      }
    }
    const onEnd = () => {
      settle()
      socket.destroy()
    }
    const timer = setTimeout(() => {
      if (!settled) cut("ClientHelloTimeout")
    }, handshakeTimeout)
    socket.once("close", () => clearTimeout(timer))
    socket.on("error", () => socket.destroy())
    socket.on("data", onData)
    socket.once("end", onEnd)
  }

  /**
   * Pipes a public TLS connection, its ClientHello `hello` first, to the relay backend the dispatcher
   * picks for `query`; should a local backend have connected meanwhile, TLS is terminated here instead.
   */
  const passThrough = (
    socket: net.Socket,
    query: RouteQuery,
    port: number,
    protocol: ConnectionProtocol,
    serverName: string,
    hello: Buffer,
    terminateHere: () => void
  ) => {
    dispatch(
      query,
      (lease) => {
        if (lease.backend.relayedVia === undefined) {
          lease.release()
          return terminateHere()
        }
        connectLeased(socket, lease, { protocol, port, serverName }, hello)
      },
      () => socket.destroy(),
      socket
    )
  }

  const openPort = (route: RouteDefinition): Effect.Effect<PortListener, ListenerError> => {
    const port = route.port
    const kind = portKind(route)
    const sockets = new Set<net.Socket>()
    // Raw TCP clients may rightly wait for the backend to speak first: only HTTP and TLS ports close the silent.
    const guard = makeConnectionGuard(
      { maxConnections, maxPerAddress, silentTimeoutMs: kind === "tcp" ? 0 : silentTimeoutMs },
      kind !== "tcp",
      (action, address) => config.onConnectionLimit?.(port, action, address),
      (socket) => engine?.betweenRequests(socket) ?? false
    )
    let server: net.Server
    let engine: Http1Server | undefined
    let tlsFront: TlsFront | undefined
    switch (kind) {
      case "http": {
        const served = config.forwarder.serveHttp1(engineFront(port, false))
        engine = served
        server = net.createServer({ allowHalfOpen: true }, (socket) => {
          if (!guard.admit(socket)) return
          track({ sockets }, socket)
          served.accept(socket)
        })
        break
      }
      case "tcp": {
        server = net.createServer({ allowHalfOpen: true }, (socket) => {
          if (!guard.admit(socket)) return
          track({ sockets }, socket)
          pipeToBackend(socket, { _tag: "Tcp", port }, port, "tcp")
        })
        break
      }
      case "tls": {
        tlsFront = makeTlsFront(port)
        engine = tlsFront.engine
        const front = tlsFront
        server = net.createServer({ allowHalfOpen: true }, (socket) => {
          if (!guard.admit(socket)) return
          track({ sockets }, socket)
          // names of this port that other gateways hold: read the ClientHello first, to relay those untouched
          if ((relayedTls.get(port) ?? 0) > 0) readClientHelloThen(socket, port, front)
          else front.server.emit("connection", socket)
        })
        break
      }
    }
    return Effect.callback<PortListener, ListenerError>((resume) => {
      const onError = (error: NodeJS.ErrnoException) => {
        guard.close()
        server.close()
        void engine?.close(0)
        resume(Effect.fail(new ListenerError({ reason: "BindFailed", port, message: `cannot listen on ${host}:${port}: ${error.code ?? error.message}` })))
      }
      server.once("error", onError)
      server.listen({ port, host }, () => {
        server.off("error", onError)
        server.on("error", () => {})
        resume(Effect.succeed({ kind, port, server, address: server.address() as net.AddressInfo, sockets, guard, engine, tls: tlsFront }))
      })
      return Effect.sync(() => {
        guard.close()
        server.close()
        void engine?.close(0)
      })
    })
  }

  // Ports no longer routed stop accepting at once; connections still answering (a 503 to a request
  // that waited, written with `Connection: close`) finish, and whatever is left is destroyed at shutdown.
  const draining = new Set<PortListener>()
  // set by `drain`: no port opens again
  let shuttingDown = false

  const stopPort = (listener: PortListener) =>
    Effect.sync(() => {
      open.delete(listener.port)
      draining.add(listener)
      listener.server.close(() => draining.delete(listener))
      // idle engine connections close now, busy ones after their exchange
      void listener.engine?.close(EngineStopDrainMs)
      void listener.relayEngine?.close(EngineStopDrainMs)
    })

  const destroyPort = (listener: PortListener) =>
    Effect.callback<void>((resume) => {
      open.delete(listener.port)
      draining.add(listener)
      listener.server.close(() => {
        draining.delete(listener)
        resume(Effect.void)
      })
      void listener.engine?.close(0)
      void listener.relayEngine?.close(0)
      listener.guard.close()
      for (const socket of listener.sockets) socket.destroy()
    })

  // Closes ports whose routes the registry has dropped.
  const reconcile = Effect.gen(function*() {
    for (;;) {
      const since = registry.version()
      const live = registry.ports()
      for (const listener of [...open.values()]) {
        if (!live.has(listener.port)) yield* lock.withPermits(1)(
          Effect.suspend(() => registry.ports().has(listener.port) ? Effect.void : stopPort(listener))
        )
      }
      yield* registry.awaitChange(since)
    }
  })
  yield* Effect.forkScoped(reconcile)
  yield* Effect.addFinalizer(() => Effect.forEach([...open.values(), ...draining], destroyPort, { discard: true }))

  const bind = Effect.fnUntraced(function*(route: RouteDefinition, backend: Backend) {
    const scope = yield* Scope.Scope
    return yield* lock.withPermits(1)(Effect.gen(function*() {
      if (shuttingDown) {
        return yield* new ListenerError({ reason: "BindFailed", port: route.port, message: "the gateway is shutting down" })
      }
      let listener = open.get(route.port)
      const fresh = listener === undefined
      if (listener === undefined) {
        listener = yield* openPort(route)
        open.set(route.port, listener)
      } else if (listener.kind !== portKind(route)) {
        return yield* new ListenerError({
          reason: "Conflict",
          port: route.port,
          message: `port ${route.port} already serves ${listener.kind}, cannot also serve ${portKind(route)}`
        })
      }
      const opened = listener
      if (route._tag === "Tls" && backend.relayedVia !== undefined) {
        relayedTls.set(route.port, (relayedTls.get(route.port) ?? 0) + 1)
        yield* Scope.addFinalizer(scope, Effect.sync(() => {
          const left = (relayedTls.get(route.port) ?? 1) - 1
          if (left === 0) relayedTls.delete(route.port)
          else relayedTls.set(route.port, left)
        }))
      }
      yield* registry.register(route, backend).pipe(
        Scope.provide(scope),
        Effect.catch((error: RegistryError) =>
          Effect.andThen(
            fresh && !registry.ports().has(route.port) ? destroyPort(opened) : Effect.void,
            Effect.fail(new ListenerError({ reason: error.reason, port: route.port, message: error.message }))
          )
        )
      )
      return { route, address: opened.address } satisfies BoundRoute
    }))
  })

  const inFlight = (): number => {
    let n = 0
    for (const entry of registry.snapshot()) for (const backend of entry.backends) n += backend.inFlight
    return n
  }

  const drain = (timeout: Duration.Input) =>
    lock.withPermits(1)(Effect.suspend(() => {
      shuttingDown = true
      return Effect.forEach([...open.values()], stopPort, { discard: true })
    })).pipe(
      Effect.andThen(
        Effect.suspend(() => inFlight() === 0 ? Effect.void : Effect.fail("busy" as const)).pipe(
          Effect.retry({ schedule: Schedule.spaced(DrainPollInterval) }),
          Effect.timeoutOption(timeout),
          Effect.ignore
        )
      )
    )

  const acceptRelayed = (socket: Duplex, port: number, protocol: ConnectionProtocol) => {
    const listener = open.get(port)
    const asSocket = socket as unknown as net.Socket
    if (listener === undefined || shuttingDown) return void socket.destroy()
    switch (listener.kind) {
      case "http": {
        if (protocol !== "http") return void socket.destroy()
        listener.relayEngine ??= (config.relayForwarder ?? config.forwarder).serveHttp1(engineFront(port, false, localOnly))
        track(listener, asSocket)
        listener.relayEngine.accept(asSocket)
        return
      }
      case "tcp":
        if (protocol !== "tcp") return void socket.destroy()
        track(listener, asSocket)
        pipeToBackend(asSocket, { _tag: "Tcp", port }, port, "tcp", undefined, localOnly)
        return
      case "tls":
        // the public client's raw TLS, terminated here with the route's certificate, which never leaves
        if ((protocol !== "tls-http" && protocol !== "tls-tcp") || listener.tls === undefined) return void socket.destroy()
        track(listener, asSocket)
        listener.tls.relayed(socket)
        return
    }
  }

  return Listeners.of({
    bind,
    openPorts: () => new Map([...open.values()].map((l) => [l.port, l.kind])),
    drain,
    inFlight,
    acceptRelayed
  })
})
