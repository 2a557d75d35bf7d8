/**
 * Public listeners: one per port, opened when the first route on it is bound, shared by every route on
 * that port, closed once the registry has dropped the port's last route (after the grace period).
 * HTTP ports run an `http.Server`, TLS ports a `tls.Server` choosing the certificate by SNI (and h2 or
 * http/1.1 by ALPN for HTTP routes), TCP ports pipe bytes. Each request or connection is dispatched to a backend; what is done with an HTTP request
 * is the front door's handler (normally the Forwarder). With `serveHttp1`, plain HTTP ports run the
 * forwarding core's raw HTTP/1.1 engine instead (each request admitted once a backend is leased, over
 * that backend's pooled tunnel streams); a connection whose request goes to a backend with its own
 * `forwardHttp` is handed to the Node `http.Server`; per-request instruments follow engine exchanges
 * through `observeExchange`. Listeners never parse bodies nor retry.
 */
import * as http from "node:http"
import type * as http2 from "node:http2"
import * as net from "node:net"
import type { Duplex } from "node:stream"
import * as tls from "node:tls"
import { Context, Duration, Effect, Exit, FiberSet, Layer, Schedule, Schema, Scope, Semaphore } from "effect"
import { checkRequestFields } from "../domain/Http1Parser.ts"
import {
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
import { DispatchError, Dispatcher, type Lease } from "./Dispatcher.ts"
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
import type { ForwarderShape } from "./Forwarder.ts"
import { Registry, type RegistryError } from "./Registry.ts"

/** Most concurrent connections on one public port, by default. */
export const DefaultMaxConnectionsPerPort = 10_000
/** Largest request head accepted on public HTTP ports (Node's own default, named). */
export const DefaultMaxHeaderBytes = 16 * 1024
/** Time allowed for a public client to send its request head. */
export const DefaultHeadersTimeoutMs = 60_000
/** Time allowed for a TLS handshake on a public port. */
export const DefaultTlsHandshakeTimeoutMs = 10_000
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
 * Makes an HTTP/2 compat request/response pair look like HTTP/1.1 to the forwarding core: pseudo-headers
 * leave the raw header list (`:authority` becomes `Host`), the status message (absent in HTTP/2) is
 * dropped, and `flushHeaders` sends the head at once.
 */
export const asHttp1 = (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse): [http.IncomingMessage, http.ServerResponse] => {
  const raw = req.rawHeaders
  const headers: Array<string> = []
  let hasHost = false
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!
    if (name.charCodeAt(0) === 58) continue
    if (name.length === 4 && name.toLowerCase() === "host") hasHost = true
    headers.push(name, raw[i + 1]!)
  }
  const authority = req.authority
  if (!hasHost && authority) headers.unshift("host", authority)
  Object.defineProperty(req, "rawHeaders", { value: headers })
  if (req.headers.host === undefined && authority) req.headers.host = authority
  const writeHead = res.writeHead.bind(res) as (status: number, headers?: unknown) => http2.Http2ServerResponse
  Object.defineProperty(res, "writeHead", {
    value: (status: number, message?: unknown, head?: unknown) =>
      typeof message === "string" ? writeHead(status, head) : writeHead(status, message)
  })
  if (typeof (res as unknown as { flushHeaders?: unknown }).flushHeaders !== "function") {
    // writeHead already sends the HTTP/2 head; there is nothing left to flush
    Object.defineProperty(res, "flushHeaders", { value: () => {} })
  }
  return [req as unknown as http.IncomingMessage, res as unknown as http.ServerResponse]
}

/** Handles one dispatched HTTP request; the lease is released by Listeners when the response closes. */
export type RequestHandler = (req: http.IncomingMessage, res: http.ServerResponse, lease: Lease) => void
/** Handles one dispatched `Upgrade` request; the lease is released when the socket closes. */
export type UpgradeHandler = (req: http.IncomingMessage, socket: Duplex, head: Buffer, lease: Lease) => void

/**
 * Handlers that forward each request to the leased backend's upstream through the shared Forwarder, or
 * to the backend's own `forwardHttp`/`upgradeHttp` when it has them (reverse-HTTP/2 connections).
 */
export const forwardingHandlers = (forwarder: ForwarderShape): Pick<ListenersConfig, "handleRequest" | "handleUpgrade"> => ({
  handleRequest: (req, res, lease) => {
    const own = lease.backend.forwardHttp
    if (own !== undefined) return own(req, res, lease)
    forwarder.forward(req, res, { director: (outgoing) => void (outgoing.upstream = lease.backend.upstream) })
  },
  handleUpgrade: (req, socket, head, lease) => {
    const own = lease.backend.upgradeHttp
    if (own !== undefined) return own(req, socket, head, lease)
    forwarder.upgrade(req, socket, head, { director: (outgoing) => void (outgoing.upstream = lease.backend.upstream) })
  }
})

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
  readonly handleRequest: RequestHandler
  readonly handleUpgrade: UpgradeHandler
  /** Most client connections on one public port (see `ConnectionTable`). */
  readonly maxConnectionsPerPort?: number | undefined
  /** Most client connections from one address on one public port. */
  readonly maxConnectionsPerAddress?: number | undefined
  /** Time a connection to an HTTP or TLS port may stay without sending a byte (ms; 0 = none). */
  readonly silentConnectionTimeoutMs?: number | undefined
  /** Told of each client connection a port refused or closed to keep within its connection limits. */
  readonly onConnectionLimit?: ((port: number, action: GuardAction, address: string | undefined) => void) | undefined
  readonly maxHeaderBytes?: number | undefined
  readonly headersTimeoutMs?: number | undefined
  readonly tlsHandshakeTimeoutMs?: number | undefined
  /**
   * Told, for each HTTP request, how long it waited for a backend (ms) and the dispatch error if it got
   * none (for metrics); not called for raw TCP connections.
   */
  readonly observeDispatch?: ((waitedMs: number, error: DispatchError | undefined) => void) | undefined
  /**
   * Serves plain HTTP ports with the forwarding core's raw HTTP/1.1 engine (`Forwarder.serveHttp1`):
   * requests go to the leased backend's `upstream` directly, without `handleRequest`/`handleUpgrade`
   * (so without what wraps them); backends with `forwardHttp` still get theirs, through the Node path.
   */
  readonly serveHttp1?: ((front: Http1Front) => Http1Server) | undefined
  /**
   * On engine ports, called for each request once it has a backend the engine forwards to (what
   * `handleRequest` wrappers do on the Node path: request ids, per-route metrics, the access log). Not
   * called for requests that found no backend (`observeDispatch` sees those) nor for connections handed
   * to the Node server (which go through `handleRequest`).
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
}

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
  /** Node's server for connections handed over by the engine. */
  readonly handoff?: http.Server | undefined
}

/** The SNI server name a TLS client sent, normalized ("" when none). */
const serverNameOf = (socket: unknown): string => {
  const name = (socket as { servername?: string | false | null }).servername
  return typeof name === "string" ? normalizeHost(name) : ""
}

/** Joins two byte streams both ways; when either closes or fails, both are destroyed. */
export const joinStreams = (a: Duplex, b: Duplex, onClose: () => void): void => {
  let done = false
  const finish = () => {
    if (done) return
    done = true
    a.destroy()
    b.destroy()
    onClose()
  }
  // half-close is carried through `pipe` (end → end); full close once both directions have finished
  let ended = 0
  const onEnd = () => {
    if (++ended === 2) finish()
  }
  a.once("end", onEnd)
  b.once("end", onEnd)
  a.once("error", finish)
  b.once("error", finish)
  a.once("close", finish)
  b.once("close", finish)
  a.pipe(b)
  b.pipe(a)
}

const dispatchErrorText = (error: DispatchError): string =>
  `${error.status === 404 ? "404 no route" : "503 no backend"} (${error.reason}): ${error.message}`

const writeDispatchError = (res: http.ServerResponse, error: DispatchError) => {
  if (res.headersSent || res.destroyed) {
    res.destroy()
    return
  }
  const body = `${dispatchErrorText(error)}\n`
  res.writeHead(error.status, {
    "content-type": "text/plain; charset=utf-8",
    "content-length": Buffer.byteLength(body),
    // a request that found no backend may be on a port about to close: do not keep the connection
    "connection": "close"
  })
  res.end(body)
}

/**
 * Checks a request Node's server parsed (its target as `routingTarget` reads it, its fields as the raw
 * engine's parser does) and sets its URL to the routed target, so the backend reads the path the route
 * was chosen by; why it is refused otherwise.
 */
const routeNodeRequest = (req: http.IncomingMessage): { readonly path: string } | string => {
  const routed = routingTarget(req.url ?? "/")
  if (isRoutingRejection(routed)) return `bad request target: ${routed.detail}`
  const ambiguous = checkRequestFields(req.rawHeaders)
  if (ambiguous !== undefined) return ambiguous.message
  req.url = routed.target
  return { path: routed.path }
}

/** A one-line 400 that closes the connection. */
const writeBadRequest = (res: http.ServerResponse, detail: string) => {
  const body = `400 ${detail}\n`
  res.writeHead(400, { "content-type": "text/plain; charset=utf-8", "content-length": Buffer.byteLength(body), "connection": "close" })
  res.end(body)
}

const rejectBadRequest = (socket: Duplex, detail: string) => {
  const body = `400 ${detail}\n`
  socket.end(`HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`)
}

const rejectUpgrade = (socket: Duplex, error: DispatchError) => {
  const body = `${error.reason}: ${error.message}\n`
  const reason = error.status === 404 ? "Not Found" : "Service Unavailable"
  socket.end(
    `HTTP/1.1 ${error.status} ${reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`
  )
}

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
  const fibers = yield* FiberSet.make()
  const run = yield* FiberSet.runtime(fibers)<never>()
  const lock = yield* Semaphore.make(1)
  const open = new Map<number, PortListener>()
  const secureContexts = new Map<string, tls.SecureContext>()

  // Leases the engine took for a connection's first request before handing the connection to Node's
  // server: that request is served by the backend leased at admission, not dispatched a second time.
  const handedOver = new WeakMap<Duplex, Lease>()

  /** The lease taken at admission for the request Node's server now reads on `socket`, if still good. */
  const takeHandedOver = (socket: Duplex, query: RouteQuery): Lease | undefined => {
    const lease = handedOver.get(socket)
    if (lease === undefined) return undefined
    handedOver.delete(socket)
    if (!lease.backend.isClosed() && registry.match(query) === lease.route) return lease
    lease.release()
    return undefined
  }

  /**
   * Dispatches, synchronously when a backend is free, else in a fiber that the caller may cancel. A
   * request the engine handed over with its lease keeps that lease.
   */
  const dispatch = (query: RouteQuery, onLease: (lease: Lease) => void, onError: (e: DispatchError) => void, cancelOn: Duplex) => {
    const handed = takeHandedOver(cancelOn, query)
    if (handed !== undefined) return onLease(handed)
    const now = dispatcher.tryAcquire(query)
    if (now instanceof DispatchError) return onError(now)
    if (now !== undefined) return onLease(now)
    const fiber = run(dispatcher.acquire(query))
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

  const serveHttpRequest = (port: number, tlsName: string | undefined) => (req: http.IncomingMessage, res: http.ServerResponse) => {
    const hostName = normalizeHost(req.headers.host)
    const routed = routeNodeRequest(req)
    if (typeof routed === "string") {
      writeBadRequest(res, routed)
      return
    }
    const path = routed.path
    const query: RouteQuery = tlsName === undefined
      ? { _tag: "Http", port, host: hostName, path }
      : { _tag: "Tls", port, serverName: tlsName, host: hostName, path }
    const observe = config.observeDispatch
    const arrived = observe === undefined ? 0 : performance.now()
    dispatch(
      query,
      (lease) => {
        observe?.(performance.now() - arrived, undefined)
        res.once("close", lease.release)
        try {
          config.handleRequest(req, res, lease)
        } catch {
          lease.release()
          res.destroy()
        }
      },
      (error) => {
        observe?.(performance.now() - arrived, error)
        writeDispatchError(res, error)
      },
      req.socket
    )
  }

  const serveUpgrade = (port: number, tlsName: string | undefined) => (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    socket.on("error", () => socket.destroy())
    const routed = routeNodeRequest(req)
    if (typeof routed === "string") {
      rejectBadRequest(socket, routed)
      return
    }
    const query: RouteQuery = tlsName === undefined
      ? { _tag: "Http", port, host: normalizeHost(req.headers.host), path: routed.path }
      : { _tag: "Tls", port, serverName: tlsName, host: normalizeHost(req.headers.host), path: routed.path }
    dispatch(
      query,
      (lease) => {
        socket.once("close", lease.release)
        try {
          config.handleUpgrade(req, socket, head, lease)
        } catch {
          socket.destroy()
        }
      },
      (error) => rejectUpgrade(socket, error),
      socket
    )
  }

  const pipeToBackend = (socket: net.Socket, query: RouteQuery, port: number, protocol: ConnectionProtocol, serverName?: string) => {
    socket.on("error", () => socket.destroy())
    dispatch(
      query,
      (lease) => {
        const meta: ConnectionMeta = {
          protocol,
          remoteAddress: socket.remoteAddress ?? "",
          remotePort: socket.remotePort ?? 0,
          localPort: port,
          localAddress: socket.localAddress,
          serverName
        }
        const fiber = run(lease.backend.connect(meta))
        const cancel = () => fiber.interruptUnsafe()
        socket.once("close", cancel)
        fiber.addObserver((exit) => {
          socket.off("close", cancel)
          if (Exit.isSuccess(exit) && !socket.destroyed) {
            joinStreams(socket, exit.value, lease.release)
          } else {
            if (Exit.isSuccess(exit)) exit.value.destroy()
            lease.release()
            socket.destroy()
          }
        })
      },
      () => socket.destroy(),
      socket
    )
  }

  /**
   * The engine's side of a plain HTTP port: each request is routed on its own Host and path, admitted at
   * once when a backend is free, else once the dispatcher grants one (bounded by its wait limit and
   * queue), and forwarded to that backend's upstream; its lease ends with the exchange.
   */
  const engineFront = (port: number, handoff: http.Server, secure: boolean): Http1Front => {
    const observe = config.observeDispatch
    const tapExchange = config.observeExchange
    const toNode = (lease: Lease): Admission => ({
      _tag: "Handoff",
      take: (socket, bytes) => {
        // The request in hand keeps its lease (see `dispatch`); the Node server dispatches the
        // connection's later requests one by one.
        handedOver.set(socket, lease)
        socket.once("close", () => {
          if (handedOver.get(socket) === lease) handedOver.delete(socket)
          lease.release()
        })
        socket.unshift(bytes)
        handoff.emit("connection", socket)
        socket.resume()
      },
      onAbandon: lease.release
    })
    const admission = (lease: Lease, request: Http1Request, target: string): Admission => {
      if (lease.backend.forwardHttp !== undefined) return toNode(lease)
      if (tapExchange === undefined) {
        return { _tag: "Forward", path: target, director: (outgoing) => void (outgoing.upstream = lease.backend.upstream), onEnd: lease.release }
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
        observe: tap.observe
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
        const host = normalizeHost(request.host)
        const routed = routingTarget(request.originTarget)
        if (isRoutingRejection(routed)) return { _tag: "Refuse", status: 400, message: `switchyard: bad request target: ${routed.detail}` }
        const path = routed.path
        const query: RouteQuery = secure
          ? { _tag: "Tls", port, serverName: serverNameOf(request.socket), host, path }
          : { _tag: "Http", port, host, path }
        const arrived = observe === undefined ? 0 : performance.now()
        const now = dispatcher.tryAcquire(query)
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
            const fiber = run(dispatcher.acquire(query))
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
    let handoff: http.Server | undefined
    switch (kind) {
      case "http": {
        if (config.serveHttp1 !== undefined) {
          handoff = http.createServer({ maxHeaderSize, headersTimeout, requestTimeout: 0 }, serveHttpRequest(port, undefined))
          handoff.on("upgrade", serveUpgrade(port, undefined))
          handoff.on("clientError", (_err, socket) => socket.destroy())
          const served = config.serveHttp1(engineFront(port, handoff, false))
          engine = served
          server = net.createServer({ allowHalfOpen: true }, (socket) => {
            if (!guard.admit(socket)) return
            track({ sockets }, socket)
            served.accept(socket)
          })
          break
        }
        const httpServer = http.createServer({ maxHeaderSize, headersTimeout, requestTimeout: 0 }, serveHttpRequest(port, undefined))
        httpServer.on("upgrade", serveUpgrade(port, undefined))
        httpServer.on("connection", (socket: net.Socket) => {
          if (guard.admit(socket)) track({ sockets }, socket)
        })
        httpServer.on("clientError", (_err, socket) => socket.destroy())
        server = httpServer
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
        const inner = http.createServer({ maxHeaderSize, headersTimeout, requestTimeout: 0 })
        inner.on("clientError", (_err, socket) => socket.destroy())
        // HTTP/1.1 over the decrypted socket: the raw engine when configured (handing over to `inner`)
        const tlsEngine = config.serveHttp1?.(engineFront(port, inner, true))
        engine = tlsEngine
        handoff = tlsEngine === undefined ? undefined : inner
        // HTTP/2 over the already-decrypted socket: a plain h2 server fed with the TLS socket (node:http2
        // is loaded by the first TLS port, so a process without one does not hold it)
        const innerH2 = process.getBuiltinModule("node:http2").createServer({
          settings: { maxConcurrentStreams: DefaultMaxConcurrentStreams, maxHeaderListSize: DefaultMaxHeaderListBytes }
        })
        innerH2.on("sessionError", () => {})
        innerH2.on("request", (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => {
          const [request, response] = asHttp1(req, res)
          serveHttpRequest(port, serverNameOf(req.socket))(request, response)
        })
        const tlsServer = tls.createServer({
          allowHalfOpen: true,
          handshakeTimeout,
          ALPNCallback: ({ servername, protocols }) => {
            const entry = registry.match({ _tag: "Tls", port, serverName: normalizeHost(servername) })
            if (entry === undefined || entry.route._tag !== "Tls") return undefined
            // raw TLS routes: the backend speaks whatever the client prefers
            if (entry.route.then === "tcp") return protocols[0]
            return TlsHttpAlpnProtocols.find((p) => protocols.includes(p))
          },
          SNICallback: (serverName, cb) => {
            const entry = registry.match({ _tag: "Tls", port, serverName: normalizeHost(serverName) })
            const context = entry === undefined ? undefined : secureContextFor(entry.route)
            if (context === undefined) cb(new Error(`no certificate for ${serverName}`), undefined)
            else cb(null, context)
          }
        })
        tlsServer.on("connection", (socket: net.Socket) => {
          if (guard.admit(socket)) track({ sockets }, socket)
        })
        tlsServer.on("tlsClientError", (_err, socket) => socket.destroy())
        tlsServer.on("secureConnection", (socket: tls.TLSSocket) => {
          socket.on("error", () => socket.destroy())
          const serverName = serverNameOf(socket)
          const entry = registry.match({ _tag: "Tls", port, serverName })
          if (entry === undefined || entry.route._tag !== "Tls") return void socket.destroy()
          if (entry.route.then === "tcp") {
            pipeToBackend(socket, { _tag: "Tls", port, serverName }, port, "tls-tcp", serverName)
          } else if (socket.alpnProtocol === "h2") {
            innerH2.emit("connection", socket)
          } else if (tlsEngine !== undefined) {
            tlsEngine.accept(socket)
          } else {
            inner.emit("connection", socket)
          }
        })
        inner.on("request", (req: http.IncomingMessage, res: http.ServerResponse) =>
          serveHttpRequest(port, serverNameOf(req.socket))(req, res)
        )
        inner.on("upgrade", (req: http.IncomingMessage, socket: Duplex, head: Buffer) =>
          serveUpgrade(port, serverNameOf(req.socket))(req, socket, head)
        )
        server = tlsServer
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
        resume(Effect.succeed({ kind, port, server, address: server.address() as net.AddressInfo, sockets, guard, engine, handoff }))
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
      if (listener.server instanceof http.Server) listener.server.closeIdleConnections()
      // idle engine connections close now, busy ones after their exchange
      void listener.engine?.close(EngineStopDrainMs)
      listener.handoff?.closeIdleConnections()
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

  return Listeners.of({
    bind,
    openPorts: () => new Map([...open.values()].map((l) => [l.port, l.kind])),
    drain,
    inFlight
  })
})
