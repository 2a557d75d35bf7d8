/**
 * `switchyard server`: the gateway. Loads its config (file, `SWITCHYARD_...`, flags), then starts the
 * admin endpoint, the control port with its public listeners, and the reverse-HTTP/2 tunnel port when
 * enabled; runs until SIGTERM/SIGINT, which drains. SIGHUP reloads tokens and reverse-HTTP/2 routes. Every proxied request is
 * counted in the metrics and carries an `X-Request-Id`. It does not terminate TLS on the control port.
 */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { randomBytes } from "node:crypto"
import type * as http from "node:http"
import type { Duplex } from "node:stream"
import { Console, Context, Data, Effect, Layer, Option, Redacted, Runtime } from "effect"
import type { Scope } from "effect"
import { Command, Flag } from "effect/cli"
import { CLIENT_LIMIT_DEFAULTS, type ClientLimits } from "../../domain/ClientLimits.ts"
import type { RouteDefinition } from "../../domain/Route.ts"
import { LogSampler } from "../../domain/LogSampler.ts"
import type { PortRange, TokenGrant } from "../../domain/TokenPolicy.ts"
import type { GuardAction } from "../../services/ConnectionGuard.ts"
import { type DispatchError, Dispatcher, type Lease } from "../../services/Dispatcher.ts"
import { ControlPort } from "../../services/front/ControlPort.ts"
import { type ControlWebSocketConfig, DefaultTunnelPath } from "../../services/front/ControlWebSocket.ts"
import { ReverseH2 } from "../../services/front/ReverseH2.ts"
import { makeClientLimitReporter } from "../../services/forward/ClientLimitReporter.ts"
import { Listeners, type ListenersConfig } from "../../services/Listeners.ts"
import { type CounterChild, type Family, makeMetrics, Metrics, type MetricsShape, statusClass } from "../../services/Metrics.ts"
import { Registry, type RouteEntry } from "../../services/Registry.ts"
import { makeRecentErrors, registerClientLimitCounters, reloadRefused, serveAdmin, type StatusDocument } from "../Admin.ts"
import { ConfigLoadError, type ConfigRefused, type FlagValue, loadConfig, refuseConfig, ServerFile } from "../ConfigLoader.ts"
import { onHangup } from "../Lifecycle.ts"
import * as Logging from "../Logging.ts"
import { formatHostPort, type HostPort, parseHostPort } from "../NetAddress.ts"
import * as NodeTransport from "../NodeTransport.ts"
import packageJson from "../../../package.json" with { type: "json" }

/** Name of the token granted every port when `control.token` is set. */
export const DefaultGrantName = "default"
/** Name of the token generated when none is configured. */
export const GeneratedGrantName = "generated"
/** Random bytes in a generated token. */
export const GeneratedTokenBytes = 32
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
/** Where the control port, the admin endpoint and the reverse-HTTP/2 port listen by default. */
export const DefaultControlText = "127.0.0.1:9999"
export const DefaultAdminText = "127.0.0.1:9090"
export const DefaultReverseH2Text = "127.0.0.1:9443"
/** Default address of the WebSocket control path, when it is enabled. */
export const DefaultWebSocketText = "127.0.0.1:9998"
/** How long SIGTERM/SIGINT lets requests in flight finish, by default (ms). */
export const DefaultDrainTimeoutMs = 30_000
/** How long a route without backends keeps its port and queues requests, by default (ms). */
export const DefaultGracePeriodMs = 30_000
/** Every port, for tokens given without a port list. */
const AllPorts: ReadonlyArray<PortRange> = [{ from: 1, to: 65_535 }]

/** The gateway could not start (a port in use...); the reason was already printed as one line. */
export class StartFailed extends Data.TaggedError("StartFailed")<{ readonly message: string }> {
  override readonly [Runtime.errorReported] = false
}

const isLoopbackHost = (host: string): boolean => host === "localhost" || host === "::1" || host.startsWith("127.")

const invalid = (field: string, message: string) =>
  new ConfigLoadError({ reason: "Invalid", source: "config", field, message: `${field}: ${message}` })

/** The routes plain-mode reverse-HTTP/2 backends serve (`reverse_h2.routes`). */
const h2RoutesOf = (file: ServerFile): Array<RouteDefinition> =>
  (file.reverse_h2?.routes ?? []).map((r) => ({
    _tag: "Http",
    port: r.port,
    ...(r.domain_suffix === undefined ? {} : { domainSuffix: r.domain_suffix }),
    ...(r.path_prefix === undefined ? {} : { pathPrefix: r.path_prefix })
  }))

const addressAt = (field: string, text: string | undefined, fallback: string): HostPort | ConfigLoadError => {
  const parsed = parseHostPort(text ?? fallback)
  return parsed instanceof Error ? invalid(field, `${parsed.message}`) : parsed
}

const parsePorts = (field: string, ports: ReadonlyArray<number | string>): Array<number | PortRange> | ConfigLoadError => {
  const out: Array<number | PortRange> = []
  for (const p of ports) {
    const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(String(p).trim())
    const from = m ? Number(m[1]) : Number.NaN
    const to = m?.[2] !== undefined ? Number(m[2]) : from
    if (!m || from < 1 || to > 65_535 || to < from) return invalid(field, `"${p}" is not a port (1-65535) or a range a-b`)
    out.push(from === to ? from : { from, to })
  }
  return out
}

/** The token grants a server file asks for (without a generated one). */
export const grantsOf = (file: ServerFile): Array<TokenGrant> | ConfigLoadError => {
  const grants: Array<TokenGrant> = []
  if (file.control?.token !== undefined) grants.push({ name: DefaultGrantName, token: file.control.token, ports: AllPorts })
  const entries = file.control?.tokens ?? []
  for (let i = 0; i < entries.length; i++) {
    const entry = entries[i]!
    if (entry.token === undefined) return invalid(`control.tokens.${i}.token`, "required (or token_file)")
    const ports = parsePorts(`control.tokens.${i}.ports`, entry.ports)
    if (ports instanceof ConfigLoadError) return ports
    grants.push({
      name: entry.name,
      token: entry.token,
      ports,
      ...(entry.domains === undefined ? {} : { domainSuffixes: entry.domains.map((d) => d.toLowerCase()) })
    })
  }
  return grants
}

/**
 * Refuses reverse-HTTP/2 plain mode (no authentication) off loopback unless explicitly allowed, and an
 * access log without the per-request instruments that write it.
 */
const checkModes = (file: ServerFile, address: HostPort): ConfigLoadError | undefined =>
  file.request_metrics === false && file.log?.access_log === true
    ? invalid("log.access_log", "needs request_metrics (the access log is written by the per-request instruments)")
    : (file.reverse_h2?.enabled ?? false) && (file.reverse_h2?.plain ?? false) && !isLoopbackHost(address.host) &&
    file.reverse_h2?.allow_remote_plain !== true
    ? invalid(
      "reverse_h2.plain",
      `plain mode on ${formatHostPort(address)} lets any host that reaches it serve your routes; use tokens, or set reverse_h2.allow_remote_plain`
    )
    : undefined

/**
 * Everything `runGateway` checks before binding (addresses, token grants, plain mode), for
 * `--check-config`.
 */
export const checkServerFile = (file: ServerFile): ConfigLoadError | undefined => {
  const control = addressAt("control.address", file.control?.address, DefaultControlText)
  if (control instanceof ConfigLoadError) return control
  const admin = addressAt("admin.address", file.admin?.address, DefaultAdminText)
  if (admin instanceof ConfigLoadError) return admin
  const h2 = addressAt("reverse_h2.address", file.reverse_h2?.address, DefaultReverseH2Text)
  if (h2 instanceof ConfigLoadError) return h2
  const ws = webSocketOf(file)
  if (ws instanceof ConfigLoadError) return ws
  const controlTls = certificatePair("control", file.control)
  if (controlTls instanceof ConfigLoadError) return controlTls
  const h2Tls = certificatePair("reverse_h2", file.reverse_h2)
  if (h2Tls instanceof ConfigLoadError) return h2Tls
  const grants = grantsOf(file)
  if (grants instanceof ConfigLoadError) return grants
  return checkModes(file, h2)
}

/**
 * A section's certificate and key (`tls_cert`/`tls_key`, or their `_file` forms, read by the loader);
 * undefined when neither is set.
 */
const certificatePair = (
  field: string,
  section: { readonly tls_cert?: string | undefined; readonly tls_key?: Redacted.Redacted<string> | undefined } | undefined
): { readonly cert: string; readonly key: string } | ConfigLoadError | undefined => {
  const cert = section?.tls_cert
  const key = section?.tls_key
  if ((cert === undefined) !== (key === undefined)) return invalid(`${field}.tls_cert`, "tls_cert and tls_key go together")
  return cert === undefined || key === undefined ? undefined : { cert, key: Redacted.value(key) }
}

/** The WebSocket control path's settings (`control.websocket`), certificate files read; undefined when off. */
const webSocketOf = (file: ServerFile): ControlWebSocketConfig | ConfigLoadError | undefined => {
  const ws = file.control?.websocket
  if (ws === undefined || ws.enabled !== true) return undefined
  const address = addressAt("control.websocket.address", ws.address, DefaultWebSocketText)
  if (address instanceof ConfigLoadError) return address
  const tls = certificatePair("control.websocket", ws)
  if (tls instanceof ConfigLoadError) return tls
  return { address, path: ws.path ?? DefaultTunnelPath, ...(tls === undefined ? {} : { tls }) }
}

/** Writes a fresh random token to a file only this user can read; removed when the scope closes. */
const generateTokenFile = Effect.acquireRelease(
  Effect.try({
    try: () => {
      const dir = path.join(os.tmpdir(), `switchyard-${process.getuid?.() ?? "user"}`)
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 })
      const stat = fs.statSync(dir)
      if ((process.getuid !== undefined && stat.uid !== process.getuid()) || (stat.mode & 0o077) !== 0) {
        throw new Error(`${dir} is not private to this user`)
      }
      const file = path.join(dir, `control-token-${process.pid}`)
      const token = randomBytes(GeneratedTokenBytes).toString("base64url")
      fs.writeFileSync(file, token + "\n", { mode: 0o600, flag: "w" })
      return { file, token: Redacted.make(token) }
    },
    catch: (e) => invalid("control.token", `none configured and none could be generated: ${(e as Error).message}; set control.token_file or SWITCHYARD_TOKEN`)
  }),
  ({ file }) => Effect.sync(() => fs.rmSync(file, { force: true }))
)

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

const frontDoorOf = (lease: Lease): string => lease.backend.forwardHttp !== undefined ? "reverse_h2" : "control"

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
 * Wraps the forwarding handlers: a request id on every request (kept or generated, sent to the backend
 * and back to the client), and per-route counters resolved once per route, not per request. The same
 * instruments serve both public HTTP paths: Node's objects (`handleRequest`) and the raw engine
 * (`observeExchange`).
 */
export const instrumentHandlers = (
  inner: Pick<ListenersConfig, "handleRequest" | "handleUpgrade" | "observeDispatch">,
  metrics: MetricsShape,
  access: ((entry: Logging.AccessEntry) => void) | undefined
): Pick<ListenersConfig, "handleRequest" | "handleUpgrade" | "observeDispatch" | "observeExchange"> => {
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
  // Bytes are the connection's wire bytes (heads included) since the previous request on it ended; an
  // HTTP/2 connection carries many requests at once, so there they are the declared body lengths.
  const counted = new WeakMap<object, { read: number; written: number }>()
  const takeBytes = (req: http.IncomingMessage, res: http.ServerResponse): [number, number] => {
    if (req.httpVersionMajor === 2) return [Number(req.headers["content-length"] ?? 0) || 0, Number(res.getHeader("content-length") ?? 0) || 0]
    const s = req.socket as { bytesRead?: number; bytesWritten?: number } | undefined
    if (s === undefined || s === null) return [0, 0]
    const read = s.bytesRead ?? 0
    const written = s.bytesWritten ?? 0
    const last = counted.get(s)
    if (last === undefined) {
      counted.set(s, { read, written })
      return [read, written]
    }
    const delta: [number, number] = [Math.max(0, read - last.read), Math.max(0, written - last.written)]
    last.read = read
    last.written = written
    return delta
  }
  return {
    observeDispatch: dispatchObserver(metrics),
    handleRequest: (req, res, lease) => {
      const started = performance.now()
      const instruments = instrumentsFor(lease)
      const requestId = Logging.ensureRequestId(req)
      res.setHeader(Logging.RequestIdHeader, requestId)
      res.once("close", () => {
        const seconds = (performance.now() - started) / 1000
        const [receivedBytes, sentBytes] = takeBytes(req, res)
        countStatus(instruments, res.statusCode)
        instruments.duration.observe(seconds)
        instruments.received.inc(receivedBytes)
        instruments.sent.inc(sentBytes)
        access?.({
          frontDoor: instruments.frontDoor,
          method: req.method ?? "",
          path: req.url ?? "",
          route: instruments.route,
          status: res.statusCode,
          receivedBytes,
          sentBytes,
          durationMs: seconds * 1000,
          requestId,
          peer: req.socket?.remoteAddress ?? ""
        })
      })
      inner.handleRequest(req, res, lease)
    },
    handleUpgrade: (req: http.IncomingMessage, socket: Duplex, head: Buffer, lease: Lease) => {
      const instruments = instrumentsFor(lease)
      Logging.ensureRequestId(req)
      countStatus(instruments, 101)
      inner.handleUpgrade(req, socket, head, lease)
    },
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
            peer: (request.socket as { remoteAddress?: string }).remoteAddress ?? ""
          })
        }
      }
    }
  }
}

/** The log line for a connection a public port refused or closed to stay within its limits. */
const connectionLimitText = (action: GuardAction, port: number, address: string | undefined): string => {
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
  }
}

/** The public ports' client limits from the file's `client_limits` section, defaults filled in. */
export const clientLimitsOf = (file: ServerFile): ClientLimits => {
  const c = file.client_limits ?? {}
  const d = CLIENT_LIMIT_DEFAULTS
  return {
    minRequestBodyBytesPerSecond: c.min_request_body_bytes_per_second ?? d.minRequestBodyBytesPerSecond,
    requestBodyGracePeriodMs: c.request_body_grace_period_ms ?? d.requestBodyGracePeriodMs,
    minResponseBytesPerSecond: c.min_response_bytes_per_second ?? d.minResponseBytesPerSecond,
    responseGracePeriodMs: c.response_grace_period_ms ?? d.responseGracePeriodMs,
    maxUpstreamSlotsPerClient: c.max_upstream_slots_per_client ?? d.maxUpstreamSlotsPerClient,
    upstreamSlotWaitMs: c.upstream_slot_wait_ms ?? d.upstreamSlotWaitMs
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

/** What `runGateway` starts, for embedding and tests. */
export interface GatewayHandle {
  readonly control: HostPort
  readonly reverseH2: HostPort | undefined
  /** The WebSocket control path's URL, when it is served. */
  readonly controlWebSocket: string | undefined
  readonly admin: HostPort | undefined
  /** The generated token's file, when no token was configured. */
  readonly generatedTokenFile: string | undefined
  readonly metrics: MetricsShape
}

/** Options of `runGateway` beyond the file. */
export interface GatewayOptions {
  /** Re-reads the configuration on SIGHUP (the command passes its loader). */
  readonly reload?: Effect.Effect<ServerFile, ConfigLoadError> | undefined
}

/**
 * Starts the gateway described by `file` in the current scope; fails before binding on a bad value.
 * Its metrics go to the `Metrics` service when one is provided, else to a registry of its own.
 */
export const runGateway = Effect.fn("server.runGateway")(function*(
  file: ServerFile,
  options: GatewayOptions = {}
): Effect.fn.Return<GatewayHandle, ConfigLoadError | Error, Scope.Scope> {
  const control = addressAt("control.address", file.control?.address, DefaultControlText)
  if (control instanceof ConfigLoadError) return yield* control
  const adminEnabled = file.admin?.enabled ?? true
  const admin = addressAt("admin.address", file.admin?.address, DefaultAdminText)
  if (admin instanceof ConfigLoadError) return yield* admin
  const h2Enabled = file.reverse_h2?.enabled ?? false
  const h2Address = addressAt("reverse_h2.address", file.reverse_h2?.address, DefaultReverseH2Text)
  if (h2Address instanceof ConfigLoadError) return yield* h2Address
  const plain = file.reverse_h2?.plain ?? false
  const unsafe = checkModes(file, h2Address)
  if (unsafe !== undefined) return yield* unsafe
  let grants = grantsOf(file)
  if (grants instanceof ConfigLoadError) return yield* grants
  let generatedTokenFile: string | undefined
  if (grants.length === 0) {
    const generated = yield* generateTokenFile
    generatedTokenFile = generated.file
    grants = [{ name: GeneratedGrantName, token: generated.token, ports: AllPorts }]
  }
  const h2Routes = h2RoutesOf(file)

  // an embedding app may provide its own Metrics registry (one gateway per registry)
  const metrics = Option.getOrElse(yield* Effect.serviceOption(Metrics), makeMetrics)
  const recentErrors = makeRecentErrors()
  const access = Logging.accessLogger({ format: file.log?.format, accessLog: file.log?.access_log })

  const drainTimeout = file.drain_timeout_ms ?? DefaultDrainTimeoutMs
  const requestMetrics = file.request_metrics ?? true
  let draining = false
  let live: { listeners: Context.Service.Shape<typeof Listeners>; registry: Context.Service.Shape<typeof Registry>; controlPort: Context.Service.Shape<typeof ControlPort>; h2: Context.Service.Shape<typeof ReverseH2> | undefined } | undefined
  const startedAt = new Date().toISOString()
  const listenerNames: Array<{ name: string; address: string }> = []

  // The admin endpoint starts first so it closes last: /readyz answers 503 while the gateway drains.
  let adminBound: HostPort | undefined
  if (adminEnabled) {
    const status = (): StatusDocument => ({
      command: "server",
      version: packageJson.version,
      startedAt,
      ready: live !== undefined && !draining,
      listeners: listenerNames,
      sessions: live === undefined ? [] : [
        { frontDoor: "control", count: live.controlPort.sessions(), draining: live.controlPort.drainingSessions() },
        ...(live.h2 === undefined ? [] : [{ frontDoor: "reverse_h2", count: live.h2.connections() }])
      ],
      routes: live === undefined ? [] : live.registry.snapshot().map((entry) => ({
        route: entry.key,
        backends: entry.backends.map((b) => b.label),
        inFlight: entry.backends.reduce((n, b) => n + b.inFlight, 0)
      })),
      recentErrors: recentErrors.list()
    })
    adminBound = yield* serveAdmin({ address: admin, ready: () => live !== undefined && !draining, metrics: metrics.registry, status })
    listenerNames.push({ name: "admin", address: formatHostPort(adminBound) })
  }

  const controlRejections = countByReason(metrics.rejections, "control")
  const onRejected = (reason: string) => {
    controlRejections(reason)
    recentErrors.add(`control port refused a handshake: ${reason}`)
  }
  // sessions that ended because of the peer or the network, not by a close or a GoAway
  const controlProtocolErrors = countByReason(metrics.protocolErrors, "control")
  const onSessionFailed = (reason: string) => {
    if (!ProtocolErrorReasons.has(reason)) return
    controlProtocolErrors(reason)
    recentErrors.add(`control session ended: ${reason}`)
  }
  const controlDrains = metrics.sessionDrains.labels("control")
  const onSessionDraining = () => controlDrains.inc()
  // reverse-HTTP/2: refused handshakes and broken connections
  const h2Rejections = countByReason(metrics.rejections, "reverse_h2")
  const h2ProtocolErrors = countByReason(metrics.protocolErrors, "reverse_h2")
  const onH2Failure = (reason: string) => {
    if (H2HandshakeReasons.has(reason)) h2Rejections(reason)
    else h2ProtocolErrors(reason)
    recentErrors.add(`reverse-HTTP/2 connection failed: ${reason}`)
  }
  // public ports: connections refused or closed by their limits, counted and logged (sampled: a flood
  // of them must not become a flood of lines)
  const runLog = Effect.runForkWith(yield* Effect.context<never>())
  const connectionLimitCounts = countByReason(metrics.connectionLimits, "public")
  const connectionLimitLog = new LogSampler()
  const onConnectionLimit = (port: number, action: GuardAction, address: string | undefined) => {
    connectionLimitCounts(action)
    const suppressed = connectionLimitLog.take(action, Date.now())
    if (suppressed === undefined) return
    const what = connectionLimitText(action, port, address)
    recentErrors.add(what)
    runLog(Effect.logWarning(suppressed > 0 ? `${what} (and ${suppressed} more since the last line)` : what))
  }
  // public clients that trickle, read slowly or take a backend's every stream: refused, counted, logged (sampled)
  const services = yield* Effect.context<never>()
  const clientLimitReporter = makeClientLimitReporter((line) => {
    recentErrors.add(`public port: ${line}`)
    Effect.runForkWith(services)(Effect.logWarning(line).pipe(Effect.annotateLogs({ component: "public" })))
  })
  const removeClientLimitCounters = registerClientLimitCounters(metrics, "public", clientLimitReporter.counts)
  yield* Effect.addFinalizer(() => Effect.sync(removeClientLimitCounters))
  // reverse-HTTP/2: streams reset because the backend's response broke the protocol (the connection stays)
  const onH2StreamViolation = (message: string) => {
    h2ProtocolErrors("MalformedResponse")
    recentErrors.add(`reverse-HTTP/2 ${message}`)
  }
  // failed authentications per address, on the control port and the reverse-HTTP/2 port alike
  const authThrottle = {
    ...(file.control?.max_failed_auths === undefined ? {} : { refuseAfter: file.control.max_failed_auths }),
    ...(file.control?.failed_auth_window_ms === undefined ? {} : { windowMs: file.control.failed_auth_window_ms })
  }
  const webSocket = webSocketOf(file)
  if (webSocket instanceof ConfigLoadError) return yield* webSocket
  const controlTls = certificatePair("control", file.control)
  if (controlTls instanceof ConfigLoadError) return yield* controlTls
  const h2Tls = certificatePair("reverse_h2", file.reverse_h2)
  if (h2Tls instanceof ConfigLoadError) return yield* h2Tls
  const gateway = ControlPort.gatewayLayer({
    control: {
      address: control,
      ...(controlTls === undefined ? {} : { tls: controlTls }),
      tokens: grants,
      allowRemotePeers: file.control?.allow_remote_peers ?? false,
      handshakeTimeout: file.control?.handshake_timeout_ms,
      firstByteTimeout: file.control?.first_byte_timeout_ms,
      maxHelloBytes: file.control?.max_hello_bytes,
      maxHandshakes: file.control?.max_handshakes,
      maxHandshakesPerAddress: file.control?.max_handshakes_per_address,
      authThrottle,
      maxSessions: file.control?.max_sessions,
      maxSessionsPerToken: file.control?.max_sessions_per_token,
      maxPeerStreamsPerSecond: file.control?.max_peer_streams_per_second,
      maxPeerFramesPerSecond: file.control?.max_peer_frames_per_second,
      drainTimeout,
      onRejected,
      onSessionFailed,
      onSessionDraining,
      ...(webSocket === undefined ? {} : { websocket: webSocket })
    },
    publicHost: file.public_host ?? "127.0.0.1",
    publicConnections: {
      maxConnectionsPerPort: file.public_max_connections_per_port,
      maxConnectionsPerAddress: file.public_max_connections_per_address,
      silentConnectionTimeoutMs: file.public_silent_timeout_ms,
      onConnectionLimit
    },
    registry: { gracePeriod: file.grace_period_ms ?? DefaultGracePeriodMs },
    dispatcher: { maxWaiting: file.max_waiting },
    responseTimeoutMs: file.response_timeout_ms,
    idleTimeoutMs: file.idle_timeout_ms,
    // plain HTTP/1.1 public ports run the raw engine either way; the per-request instruments follow each
    // exchange there (`observeExchange`) and on the Node path kept for HTTP/2 and reverse-HTTP/2 backends
    wrapHandlers: requestMetrics
      ? (handlers) => instrumentHandlers(handlers, metrics, access)
      : (handlers) => ({ ...handlers, observeDispatch: dispatchObserver(metrics) }),
    rawEngine: true,
    clientLimits: clientLimitsOf(file),
    onClientLimit: clientLimitReporter.onClientLimit
  })
  const h2Layer: Layer.Layer<never, Error, Listeners> | Layer.Layer<ReverseH2, Error, Listeners> = h2Enabled
    ? ReverseH2.layer({
      address: h2Address,
      ...(h2Tls === undefined ? {} : { tls: h2Tls }),
      routes: h2Routes,
      tokens: plain ? undefined : grants,
      authThrottle,
      drainTimeout,
      onFailure: onH2Failure,
      onStreamViolation: onH2StreamViolation,
      responseTimeoutMs: file.response_timeout_ms,
      idleTimeoutMs: file.idle_timeout_ms
    })
    : Layer.empty
  const context = yield* Layer.build(
    (h2Layer as Layer.Layer<ReverseH2, Error, Listeners>).pipe(
      Layer.provideMerge(gateway),
      Layer.provide(NodeTransport.layer)
    )
  ).pipe(Effect.mapError((e) => new Error(`cannot start the gateway: ${e.message}`)))
  const controlPort = Context.get(context, ControlPort)
  const h2 = h2Enabled ? Context.get(context, ReverseH2) : undefined
  live = { listeners: Context.get(context, Listeners), registry: Context.get(context, Registry), controlPort, h2 }
  const dispatcher = Context.get(context, Dispatcher)
  // Finalizers run last-in first-out: readiness drops before the front doors drain.
  yield* Effect.addFinalizer(() =>
    Effect.sync(() => void (draining = true)).pipe(
      Effect.andThen(Effect.logInfo(`shutting down: public ports stop accepting, requests in flight get up to ${drainTimeout} ms`)),
      Effect.annotateLogs({ component: "server" })
    )
  )
  listenerNames.push({ name: "control", address: formatHostPort(controlPort.address as HostPort) })
  if (h2 !== undefined) listenerNames.push({ name: "reverse_h2", address: formatHostPort(h2.address) })
  const controlWebSocket = controlPort.webSocketAddress === undefined || webSocket === undefined
    ? undefined
    : `${webSocket.tls === undefined ? "ws" : "wss"}://${formatHostPort(controlPort.webSocketAddress as HostPort)}${webSocket.path}`
  if (controlWebSocket !== undefined) listenerNames.push({ name: "control_websocket", address: controlWebSocket })

  const registry = metrics.registry
  const removers = [
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
        return [[["control"], Math.max(0, live!.listeners.inFlight() - h2Streams)], ...(h2 === undefined ? [] : [[["reverse_h2"], h2Streams] as const])]
      }
    }),
    registry.sampledGauge({
      name: "switchyard_routes",
      help: "Routes in the routing table.",
      collect: () => [[[], live!.registry.snapshot().length]]
    }),
    registry.sampledGauge({
      name: "switchyard_route_backends",
      help: "Live backends per route.",
      labelNames: ["route"],
      collect: () => live!.registry.snapshot().map((e) => [[e.key], e.backends.length] as const)
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
      collect: () => [[[], live!.listeners.openPorts().size]]
    })
  ]
  yield* Effect.addFinalizer(() => Effect.sync(() => removers.forEach((r) => r())))

  if (options.reload !== undefined) {
    const reloadFile = options.reload
    yield* onHangup(Effect.gen(function*() {
      const next = yield* reloadFile
      const nextGrants = grantsOf(next)
      if (nextGrants instanceof ConfigLoadError) return yield* nextGrants
      if (nextGrants.length === 0 && generatedTokenFile === undefined) {
        return yield* invalid("control.token", "the new configuration has no token; keep at least one")
      }
      const applied = nextGrants.length === 0 ? grants as Array<TokenGrant> : nextGrants
      const nextH2Routes = h2RoutesOf(next)
      if (h2 !== undefined && !h2.authenticated && nextH2Routes.length === 0) {
        return yield* invalid("reverse_h2.routes", "a plain reverse-HTTP/2 port needs at least one route")
      }
      // routes first: the only step that can still refuse, and it changes nothing when it does
      if (h2 !== undefined) {
        yield* h2.replaceRoutes(nextH2Routes).pipe(Effect.mapError((e) => invalid("reverse_h2.routes", e.message)))
      }
      yield* controlPort.replaceTokens(applied)
      if (h2 !== undefined && h2.authenticated) yield* h2.replaceTokens(applied)
      metrics.reloads.labels("applied").inc()
      const routesNote = h2 === undefined ? "" : `, ${nextH2Routes.length} reverse-HTTP/2 route(s)`
      yield* Effect.logInfo(`configuration reloaded: ${nextGrants.length} token(s)${routesNote}; sessions already up keep their grants (addresses change on restart)`)
    }).pipe(
      Effect.catch(reloadRefused({ metrics, recordError: recentErrors.add })),
      Effect.annotateLogs({ component: "server" })
    ))
  }

  return {
    control: controlPort.address as HostPort,
    reverseH2: h2?.address,
    controlWebSocket,
    admin: adminBound,
    generatedTokenFile,
    metrics
  }
})

// ---------------------------------------------------------------------------------------------------
// The command.

const optionalString = (name: string, description: string) => Flag.String(name).pipe(Flag.withDescription(description), Flag.optional)

const flags = {
  config: optionalString("config", "YAML or JSON config file (see docs/OPERATIONS.md)"),
  checkConfig: Flag.Boolean("check-config").pipe(Flag.withDescription("Validate the configuration and exit"), Flag.withDefault(false)),
  set: Flag.String("set").pipe(Flag.withDescription("Override a field: path=value, e.g. control.max_sessions=100 (repeatable)"), Flag.atLeast(0)),
  control: optionalString("control", "Control port address (default 127.0.0.1:9999)"),
  token: Flag.Redacted("token").pipe(Flag.withDescription("A token allowed every port (or SWITCHYARD_TOKEN; prefer token_file)"), Flag.optional),
  publicHost: optionalString("public-host", "Address public ports bind to (default 127.0.0.1)"),
  reverseH2: optionalString("reverse-h2", "Serve the reverse-HTTP/2 tunnel port on this address"),
  wsListen: optionalString("ws-listen", "Serve the control port as a WebSocket path (/tunnel) on this address too"),
  admin: optionalString("admin", "Admin endpoint address (default 127.0.0.1:9090)"),
  noAdmin: Flag.Boolean("no-admin").pipe(Flag.withDescription("Do not serve the admin endpoint"), Flag.withDefault(false)),
  logFormat: optionalString("log-format", "logfmt or json"),
  logLevel: optionalString("log-level", "trace, debug, info, warn, error or none")
}

type Flags = {
  readonly [K in keyof typeof flags]: (typeof flags)[K] extends Flag.Flag<infer A> ? A : never
}

/** The flags as field overrides, in the order given. */
export const flagOverrides = (f: Flags): Array<FlagValue> | ConfigLoadError => {
  const out: Array<FlagValue> = []
  for (const text of f.set) {
    const eq = text.indexOf("=")
    if (eq <= 0) {
      return new ConfigLoadError({ reason: "Invalid", source: "--set", field: "", message: `--set: expected path=value, got "${text}"` })
    }
    out.push({ path: text.slice(0, eq).split("."), value: text.slice(eq + 1), flag: `--set ${text.slice(0, eq)}` })
  }
  const add = (flag: string, p: ReadonlyArray<string>, value: Option.Option<string>) => {
    if (Option.isSome(value)) out.push({ path: p, value: value.value, flag })
  }
  add("--control", ["control", "address"], f.control)
  add("--token", ["control", "token"], Option.map(f.token, Redacted.value))
  add("--public-host", ["public_host"], f.publicHost)
  add("--reverse-h2", ["reverse_h2", "address"], f.reverseH2)
  if (Option.isSome(f.reverseH2)) out.push({ path: ["reverse_h2", "enabled"], value: "true", flag: "--reverse-h2" })
  add("--ws-listen", ["control", "websocket", "address"], f.wsListen)
  if (Option.isSome(f.wsListen)) out.push({ path: ["control", "websocket", "enabled"], value: "true", flag: "--ws-listen" })
  add("--admin", ["admin", "address"], f.admin)
  if (f.noAdmin) out.push({ path: ["admin", "enabled"], value: "false", flag: "--no-admin" })
  add("--log-format", ["log", "format"], f.logFormat)
  add("--log-level", ["log", "level"], f.logLevel)
  return out
}

/** The control port as a client names it: `tls://host:port` when it is served over TLS. */
const controlText = (handle: GatewayHandle, file: ServerFile): string =>
  `${file.control?.tls_cert === undefined ? "" : "tls://"}${formatHostPort(handle.control)}`

const clientLine = (handle: GatewayHandle, file: ServerFile): string => {
  const token = handle.generatedTokenFile === undefined ? "SWITCHYARD_TOKEN=<your token>" : `SWITCHYARD_TOKEN="$(cat ${handle.generatedTokenFile})"`
  // a certificate no public CA signed is trusted with --ca (the certificate's own file will do)
  const ca = file.control?.tls_cert === undefined ? "" : " --ca <its CA or certificate file>"
  return `${token} npx switchyard client --server ${controlText(handle, file)}${ca} --expose 127.0.0.1:3000 --port 8000`
}

export const serverCommand = Command.make("server", flags, Effect.fn(function*(f) {
  const overrides = flagOverrides(f)
  if (overrides instanceof ConfigLoadError) return yield* refuseConfig("server")(overrides)
  const load = loadConfig({ schema: ServerFile, file: Option.getOrUndefined(f.config), flags: overrides }).pipe(Effect.map((l) => l.config))
  const file = yield* load.pipe(Effect.catch(refuseConfig("server")))
  // addresses, tokens and modes are checked too (without binding anything)
  const problem = checkServerFile(file)
  if (problem !== undefined) return yield* refuseConfig("server")(problem)
  const grants = grantsOf(file) as Array<TokenGrant>
  if (f.checkConfig) {
    yield* Console.log(`switchyard server: configuration OK${Option.isSome(f.config) ? ` (${f.config.value})` : ""}`)
    return
  }
  return yield* Effect.gen(function*() {
    const handle = yield* runGateway(file, { reload: load }).pipe(
      Effect.catch((e): Effect.Effect<never, ConfigRefused | StartFailed> =>
        e instanceof ConfigLoadError
          ? refuseConfig("server")(e)
          : Console.error(`switchyard server: ${e.message}`).pipe(Effect.andThen(Effect.fail(new StartFailed({ message: e.message }))))
      )
    )
    const lines = [
      `switchyard gateway running`,
      `  control port     ${controlText(handle, file)}  (backends dial it)`,
      ...(handle.reverseH2 === undefined
        ? []
        : [`  reverse HTTP/2   ${file.reverse_h2?.tls_cert === undefined ? "" : "tls://"}${formatHostPort(handle.reverseH2)}`]),
      ...(handle.controlWebSocket === undefined ? [] : [`  control (WebSocket) ${handle.controlWebSocket}  (backends behind HTTP-only egress)`]),
      ...(handle.admin === undefined ? [] : [`  admin endpoint   http://${formatHostPort(handle.admin)}  (/metrics /healthz /readyz /status)`]),
      `  public ports bind to ${file.public_host ?? "127.0.0.1"}`,
      handle.generatedTokenFile === undefined
        ? `  tokens: ${grants.map((g) => g.name).join(", ")}`
        : `  no token configured: generated one in ${handle.generatedTokenFile} (removed on exit)`,
      `expose a local service on public port 8000 with:`,
      `  ${clientLine(handle, file)}`
    ]
    yield* Console.log(lines.join("\n"))
    return yield* Effect.never
  }).pipe(Effect.scoped, Effect.provide(Logging.layer({ format: file.log?.format, level: file.log?.level })))
})).pipe(Command.withDescription("Run the gateway (control port, reverse HTTP/2, admin endpoint)"))
