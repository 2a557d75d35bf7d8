/**
 * What the gateway counts and logs: per-request instruments on the public listeners (request ids,
 * per-route counters, the access log), the front doors' events (refused handshakes, failed sessions,
 * connection and client limits) as counters, recent errors and sampled log lines, and the gauges sampled
 * at scrape. It starts nothing and decides nothing: the wiring hands these to the services.
 */
import type * as http from "node:http"
import { type Context, Effect } from "effect"
import { LogSampler } from "../../domain/LogSampler.ts"
import { MaxClientHelloBytes } from "../../domain/TlsClientHello.ts"
import type { DispatchError, Dispatcher, Lease } from "../../services/Dispatcher.ts"
import { makeClientLimitReporter } from "../../services/forward/ClientLimitReporter.ts"
import type { ControlPort } from "../../services/front/ControlPort.ts"
import type { ReverseH2 } from "../../services/front/ReverseH2.ts"
import type { Listeners, ListenersConfig, PublicConnectionAction } from "../../services/Listeners.ts"
import { type CounterChild, type Family, type MetricsShape, statusClass } from "../../services/Metrics.ts"
import type { Registry, RouteEntry } from "../../services/Registry.ts"
import * as Logging from "../Logging.ts"

/** Session ends counted as protocol errors (the others are closes and GoAways). */
export const ProtocolErrorReasons: ReadonlySet<string> = new Set([
  "ProtocolError",
  "RemoteError",
  "KeepAliveTimeout",
  "WriteTimeout",
  "TransportError",
  "StreamOpenRateExceeded",
  "FrameRateExceeded"
])
/** Reverse-HTTP/2 failures counted as refused handshakes (the others as protocol errors). */
export const H2HandshakeReasons: ReadonlySet<string> = new Set(["HandshakeTimeout", "BadPreamble", "BadPreface", "Rejected", "Insecure", "TooManyFailures"])

// ---------------------------------------------------------------------------------------------------
// Instrumentation of the shared public listeners.

interface RouteInstruments {
  readonly byStatus: Map<number, { inc: (n?: number) => void }>
  readonly duration: { observe: (v: number) => void }
  readonly received: { inc: (n?: number) => void }
  readonly sent: { inc: (n?: number) => void }
  readonly frontDoor: string
  readonly route: string
}

const frontDoorOf = (lease: Lease): string => lease.backend.messages !== undefined ? "reverse_h2" : "control"

/**
 * Records each request's wait for a backend, and counts requests that found none: 404 (no route) or
 * 503 (none live, or too many waiting). Works on both public HTTP paths (Node objects and raw engine).
 */
export const dispatchObserver = (metrics: MetricsShape) => {
  const queueWait = metrics.queueWait.labels("public")
  const undispatched = new Map<string, CounterChild>()
  return (waitedMs: number, error: DispatchError | undefined): void => {
    queueWait.observe(waitedMs / 1000)
    if (error === undefined) return
    let counter = undispatched.get(error.reason)
    if (counter === undefined) {
      counter = metrics.requests.labels("public", error.reason === "NoRoute" ? "(no route)" : "(no backend)", statusClass(error.status))
      undispatched.set(error.reason, counter)
    }
    counter.inc()
  }
}

/**
 * The request id of a raw engine request (flat headers): its valid `X-Request-Id`, else a new one, by
 * the same rule as `Logging.ensureRequestId` on Node requests. `kept` tells whether the client's stands.
 */
const engineRequestId = (headers: ReadonlyArray<string>): { readonly id: string; readonly kept: boolean } => {
  let given: string | undefined
  for (let i = 0; i < headers.length; i += 2) {
    if (headers[i]!.length === Logging.RequestIdHeader.length && headers[i]!.toLowerCase() === Logging.RequestIdHeader) {
      given = headers[i + 1]
      break
    }
  }
  const probe = { headers: { [Logging.RequestIdHeader]: given }, rawHeaders: [] as Array<string> }
  const id = Logging.ensureRequestId(probe as unknown as http.IncomingMessage)
  return { id, kept: id === given }
}

/**
 * The public listeners' per-request instruments: a request id on every request (kept or generated, sent
 * to the backend and back to the client), per-route counters resolved once per route, not per request,
 * and the access log. Every public exchange reports through `observeExchange`: the engine's on HTTP/1.1,
 * and the HTTP/2 public port's (whose byte counts are body bytes; HTTP/2 frames many requests at once).
 */
export const requestInstruments = (
  metrics: MetricsShape,
  access: ((entry: Logging.AccessEntry) => void) | undefined,
  cluster?: ClusterInstruments | undefined
): Pick<ListenersConfig, "observeDispatch" | "observeExchange"> => {
  const cache = new WeakMap<RouteEntry, RouteInstruments>()
  const instrumentsFor = (lease: Lease): RouteInstruments => {
    let found = cache.get(lease.route)
    if (found === undefined) {
      const frontDoor = frontDoorOf(lease)
      const route = lease.route.key
      found = {
        byStatus: new Map(),
        duration: metrics.requestDuration.labels(frontDoor, route),
        received: metrics.receivedBytes.labels(route),
        sent: metrics.sentBytes.labels(route),
        frontDoor,
        route
      }
      cache.set(lease.route, found)
    }
    return found
  }
  const countStatus = (instruments: RouteInstruments, status: number) => {
    const cls = Math.floor(status / 100)
    let counter = instruments.byStatus.get(cls)
    if (counter === undefined) {
      counter = metrics.requests.labels(instruments.frontDoor, instruments.route, statusClass(status))
      instruments.byStatus.set(cls, counter)
    }
    counter.inc()
  }
  return {
    observeDispatch: dispatchObserver(metrics),
    observeExchange: (request, lease) => {
      const instruments = instrumentsFor(lease)
      const { id: requestId, kept } = engineRequestId(request.headers)
      const idHeader = ["X-Request-Id", requestId]
      const upgrade = request.upgrade !== undefined
      return {
        requestHeaders: kept ? undefined : idHeader,
        // as on the Node path: the id goes back on answers, not on a 101
        responseHeaders: upgrade ? undefined : idHeader,
        observe: (exchange) => {
          countStatus(instruments, exchange.status)
          // in a cluster: which gateway served it, and whether it crossed a relay link (either way)
          const via = lease.backend.relayedVia
          const from = cluster === undefined ? undefined : (request.socket as { relayedFrom?: string }).relayedFrom
          if (cluster !== undefined && (via !== undefined || from !== undefined)) {
            cluster.relayed(via !== undefined ? "out" : "in", (via ?? from)!)
          }
          // an upgrade is counted once, by its status, as on the Node path
          if (exchange.end === "Upgraded") return
          const seconds = exchange.durationMs / 1000
          instruments.duration.observe(seconds)
          instruments.received.inc(exchange.receivedBytes)
          instruments.sent.inc(exchange.sentBytes)
          access?.({
            frontDoor: instruments.frontDoor,
            method: exchange.method,
            path: exchange.target,
            route: instruments.route,
            status: exchange.status,
            receivedBytes: exchange.receivedBytes,
            sentBytes: exchange.sentBytes,
            durationMs: exchange.durationMs,
            requestId,
            peer: (request.socket as { remoteAddress?: string }).remoteAddress ?? "",
            ...(cluster === undefined ? {} : { node: via ?? cluster.node, relayed: via !== undefined || from !== undefined })
          })
        }
      }
    }
  }
}

/** A clustered gateway's part in the per-request instruments. */
export interface ClusterInstruments {
  /** This gateway's node name. */
  readonly node: string
  /** Counts a request relayed `out` to `node`, or served here `in` for `node`. */
  readonly relayed: (direction: "out" | "in", node: string) => void
}

/** The log line for a connection a public port refused or closed to stay within its limits. */
const connectionLimitText = (action: PublicConnectionAction, port: number, address: string | undefined): string => {
  const peer = address ?? "a client"
  switch (action) {
    case "ListenerFull":
      return `public port ${port} is full (public_max_connections_per_port) and no connection on it is silent: refused ${peer}`
    case "AddressFull":
      return `${peer} has public_max_connections_per_address connections open on port ${port}: refused a new one`
    case "EvictedIdle":
      return `public port ${port} at a connection limit: closed the oldest idle connection (nothing sent yet, or between requests; from ${peer})`
    case "SilentTimeout":
      return `public port ${port}: closed a connection from ${peer} that sent nothing for public_silent_timeout_ms`
    case "ClientHelloTooLarge":
      return `public port ${port}: closed a connection from ${peer} whose TLS ClientHello was larger than ${MaxClientHelloBytes} bytes`
    case "ClientHelloTimeout":
      return `public port ${port}: closed a connection from ${peer} that did not send its TLS ClientHello within the TLS handshake timeout`
  }
}

/** Counts events of a front door by reason, resolving each reason's counter once. */
const countByReason = (family: Family<"front_door" | "reason", CounterChild> | Family<"front_door" | "kind", CounterChild>, frontDoor: string) => {
  const counters = new Map<string, CounterChild>()
  return (reason: string): void => {
    let counter = counters.get(reason)
    if (counter === undefined) counters.set(reason, counter = family.labels(frontDoor, reason))
    counter.inc()
  }
}

// ---------------------------------------------------------------------------------------------------
// The front doors' events.

/**
 * The callbacks the front doors report their events to: each is counted, noted among the recent errors
 * of the status document when it is one, and (for limits on public ports) logged, sampled so that a
 * flood of them does not become a flood of lines. `services` runs the log lines.
 */
export const gatewayEvents = (
  metrics: MetricsShape,
  recordError: (message: string) => void,
  services: Context.Context<never>
) => {
  const controlRejections = countByReason(metrics.rejections, "control")
  const onRejected = (reason: string) => {
    controlRejections(reason)
    recordError(`control port refused a handshake: ${reason}`)
  }
  // sessions that ended because of the peer or the network, not by a close or a GoAway
  const controlProtocolErrors = countByReason(metrics.protocolErrors, "control")
  const onSessionFailed = (reason: string) => {
    if (!ProtocolErrorReasons.has(reason)) return
    controlProtocolErrors(reason)
    recordError(`control session ended: ${reason}`)
  }
  const controlDrains = metrics.sessionDrains.labels("control")
  const onSessionDraining = () => controlDrains.inc()
  // reverse-HTTP/2: refused handshakes and broken connections
  const h2Rejections = countByReason(metrics.rejections, "reverse_h2")
  const h2ProtocolErrors = countByReason(metrics.protocolErrors, "reverse_h2")
  const onH2Failure = (reason: string) => {
    if (H2HandshakeReasons.has(reason)) h2Rejections(reason)
    else h2ProtocolErrors(reason)
    recordError(`reverse-HTTP/2 connection failed: ${reason}`)
  }
  // reverse-HTTP/2: streams reset because the backend's response broke the protocol (the connection stays)
  const onH2StreamViolation = (message: string) => {
    h2ProtocolErrors("MalformedResponse")
    recordError(`reverse-HTTP/2 ${message}`)
  }
  // public ports: connections refused or closed by their limits, counted and logged (sampled)
  const runLog = Effect.runForkWith(services)
  const connectionLimitCounts = countByReason(metrics.connectionLimits, "public")
  const connectionLimitLog = new LogSampler()
  const onConnectionLimit = (port: number, action: PublicConnectionAction, address: string | undefined) => {
    connectionLimitCounts(action)
    const suppressed = connectionLimitLog.take(action, Date.now())
    if (suppressed === undefined) return
    const what = connectionLimitText(action, port, address)
    recordError(what)
    runLog(Effect.logWarning(suppressed > 0 ? `${what} (and ${suppressed} more since the last line)` : what))
  }
  // public clients that trickle, read slowly or take a backend's every stream: refused, counted, logged (sampled)
  const clientLimitReporter = makeClientLimitReporter((line) => {
    recordError(`public port: ${line}`)
    runLog(Effect.logWarning(line).pipe(Effect.annotateLogs({ component: "public" })))
  })
  return { onRejected, onSessionFailed, onSessionDraining, onH2Failure, onH2StreamViolation, onConnectionLimit, clientLimitReporter }
}

// ---------------------------------------------------------------------------------------------------
// Gauges sampled at scrape.

/** The running gateway's services the gauges read. */
export interface GatewayServices {
  readonly listeners: Context.Service.Shape<typeof Listeners>
  readonly registry: Context.Service.Shape<typeof Registry>
  readonly dispatcher: Context.Service.Shape<typeof Dispatcher>
  readonly controlPort: Context.Service.Shape<typeof ControlPort>
  readonly h2: Context.Service.Shape<typeof ReverseH2> | undefined
}

/** Registers the gateway's sampled gauges (sessions, streams, routes, queue, ports); returns their removers. */
export const registerServerGauges = (metrics: MetricsShape, live: GatewayServices): Array<() => void> => {
  const { controlPort, h2, dispatcher } = live
  const registry = metrics.registry
  return [
    registry.sampledGauge({
      name: "switchyard_sessions",
      help: "Live tunnel sessions, by front door.",
      labelNames: ["front_door"],
      collect: () => [[["control"], controlPort.sessions()], ...(h2 === undefined ? [] : [[["reverse_h2"], h2.connections()] as const])]
    }),
    registry.sampledGauge({
      name: "switchyard_streams_open",
      help: "Requests and connections in flight toward backends, by front door.",
      labelNames: ["front_door"],
      collect: () => {
        const h2Streams = h2 === undefined ? 0 : h2.activeStreams()
        return [[["control"], Math.max(0, live.listeners.inFlight() - h2Streams)], ...(h2 === undefined ? [] : [[["reverse_h2"], h2Streams] as const])]
      }
    }),
    registry.sampledGauge({
      name: "switchyard_routes",
      help: "Routes in the routing table.",
      collect: () => [[[], live.registry.snapshot().length]]
    }),
    registry.sampledGauge({
      name: "switchyard_route_backends",
      help: "Live backends per route.",
      labelNames: ["route"],
      collect: () => live.registry.snapshot().map((e) => [[e.key], e.backends.length] as const)
    }),
    registry.sampledGauge({
      name: "switchyard_queued_requests",
      help: "Requests waiting for a backend or a stream slot, by front door.",
      labelNames: ["front_door"],
      collect: () => [[["control"], dispatcher.waiting()], ...(h2 === undefined ? [] : [[["reverse_h2"], h2.queued()] as const])]
    }),
    registry.sampledGauge({
      name: "switchyard_open_ports",
      help: "Public ports open.",
      collect: () => [[[], live.listeners.openPorts().size]]
    })
  ]
}
