/**
 * The admin endpoint: a small HTTP server for operators and orchestrators: `/healthz` (process alive),
 * `/readyz` (listeners bound, sessions up), `/metrics` (Prometheus text) and `/status` (JSON for
 * `switchyard status`). It serves no user traffic, never exposes secrets, and binds loopback by default.
 */
import { Effect, FiberSet, Schema } from "effect"
import type { Scope } from "effect"
import * as http from "node:http"
import packageJson from "../../package.json" with { type: "json" }
import { ExpositionContentType, makeMetrics, type MetricRegistry, type MetricsShape } from "../services/Metrics.ts"
import { CLIENT_LIMIT_KINDS, type ClientLimitKind } from "../domain/ClientLimits.ts"
import type { SocketProxyStats } from "../services/front/SocketProxy.ts"
import { type AdminConnectionClose, applyConnectionBudget } from "./AdminConnections.ts"
import { ConfigLoadError, type FlagValue, loadOpsSections, type OpsFile, readOpsSections } from "./ConfigLoader.ts"
import * as Logging from "./Logging.ts"
import { formatHostPort, type HostPort, listenOn, parseHostPort } from "./NetAddress.ts"

/** Where the gateway's admin endpoint listens by default (7090-7094: clear of Prometheus' 9090-9094). */
export const DefaultAdminAddress: HostPort = { host: "127.0.0.1", port: 7090 }
/** What an admin address that cannot be bound tells the operator to do. */
export const MoveAdminHint = "move the admin endpoint with --admin host:port (admin.address, SWITCHYARD_ADMIN_ADDRESS) or turn it off with --no-admin"
/**
 * Most connections the admin endpoint keeps open at once. When all are taken, a new connection closes
 * the one that has waited longest for a request head, so idle peers cannot lock out health checks.
 */
export const MaxAdminConnections = 64
/** Time for a complete request head on the admin endpoint, from the connection's start or its previous response (ms). */
export const AdminHeadTimeoutMs = 5_000
/** Time for an admin response to be taken by its reader (ms). */
export const AdminResponseTimeoutMs = 10_000
/** Shortest interval between two warnings about admin connections closed by the budget (ms). */
export const AdminCloseLogIntervalMs = 10_000
/** Most recent errors kept for `/status`. */
export const MaxRecentErrors = 32

export class AdminError extends Schema.TaggedError<AdminError>()("AdminError", {
  reason: Schema.Literals(["BindFailed"]),
  message: Schema.String
}) {}

/** The JSON document of `/status` (also read by `switchyard status`). */
export interface StatusDocument {
  readonly command: string
  readonly version: string
  readonly startedAt: string
  readonly ready: boolean
  readonly listeners: ReadonlyArray<{ readonly name: string; readonly address: string }>
  /** Live sessions by front door; `draining`: of those, how many drain after their backend's GoAway. */
  readonly sessions: ReadonlyArray<{ readonly frontDoor: string; readonly count: number; readonly draining?: number }>
  /** Routes with their backends (a client: its expose address), and, for a client, where each stands on its gateways. */
  readonly routes: ReadonlyArray<{ readonly route: string; readonly backends: ReadonlyArray<string>; readonly inFlight: number; readonly state?: string | undefined }>
  readonly recentErrors: ReadonlyArray<{ readonly at: string; readonly message: string }>
  /** A tunnel client's gateways: session state, since when, and the last error (cause and what to do). */
  readonly gateways?: ReadonlyArray<GatewayStatusEntry> | undefined
  /** A gateway's ACME certificates: each name's state, expiry, failures and next order. */
  readonly certificates?: ReadonlyArray<CertificateStatusEntry> | undefined
  /** A gateway in a cluster: its node, where the lease store stands, and the other gateways' leases in use. */
  readonly cluster?: ClusterStatusEntry | undefined
}

/** A gateway's cluster, in `/status`. */
export interface ClusterStatusEntry {
  readonly node: string
  /** `connecting`, `connected` or `unreachable`. */
  readonly store: string
  /** True while the store has been unreachable for longer than the lease TTL: only local routes are served. */
  readonly stale: boolean
  readonly lastRead?: string | undefined
  readonly lastError?: string | undefined
  /** Leases this gateway keeps alive. */
  readonly published: number
  /** The other gateways' leases in use. */
  readonly leases: ReadonlyArray<{ readonly node: string; readonly route: string; readonly relay: string }>
  /** The other gateways' control addresses, as this gateway tells its clients. */
  readonly gateways?: ReadonlyArray<string> | undefined
}

/** One name whose certificate a gateway obtains by ACME, in `/status`. */
export interface CertificateStatusEntry {
  readonly name: string
  /** `ordering` (none yet: TLS for the name is refused), `valid`, `renewing`, `waiting` (after a failed order) or `unused` (no route wants it: not renewed). */
  readonly state: string
  readonly notAfter?: string | undefined
  readonly daysLeft?: number | undefined
  readonly failures: number
  readonly lastError?: string | undefined
  readonly nextAttempt?: string | undefined
  /** When the last route that wanted the name went away, while none wants it. */
  readonly unusedSince?: string | undefined
  /** Where the certificate served came from: `ordered` here, `disk` after a restart, `cluster` (the cluster's store). */
  readonly source?: string | undefined
}

/** One gateway of a tunnel client, in `/status`. */
export interface GatewayStatusEntry {
  readonly gateway: string
  /** `connected`, `connecting`, `retrying` or `rejected` (refused for good: the token or route must change). */
  readonly state: string
  readonly since: string
  readonly attempts: number
  readonly lastError?: string | undefined
}

export interface AdminOptions {
  /** Where the admin endpoint listens. */
  readonly address: HostPort
  /** Whether the process is ready for traffic (listeners bound, sessions up). */
  readonly ready: () => boolean
  /** A line `/readyz` adds to its answer when given and not undefined (a degraded but serving state). */
  readonly readyNote?: (() => string | undefined) | undefined
  /** Rendered on `/metrics` when given. */
  readonly metrics?: MetricRegistry | undefined
  /** Served on `/status` when given. */
  readonly status?: (() => StatusDocument) | undefined
  /**
   * Served on `/route?url=…` when given: which route and backends would serve the URL (an object
   * answered with 200), or why the URL cannot be tested (`{ error }`, answered with 400).
   */
  readonly routeTest?: ((url: string) => object) | undefined
  /** Further plain-text pages of the command, by path (e.g. the socket proxy's `/learned-rules`). */
  readonly pages?: Readonly<Record<string, () => string>> | undefined
  /** The connection budget (defaults: `MaxAdminConnections`, `AdminHeadTimeoutMs`, `AdminResponseTimeoutMs`). */
  readonly connections?: { readonly max?: number; readonly headTimeoutMs?: number; readonly responseTimeoutMs?: number } | undefined
}

/** A bounded list of the latest errors, for `/status`. */
export const makeRecentErrors = (limit: number = MaxRecentErrors) => {
  const items: Array<{ at: string; message: string }> = []
  return {
    add: (message: string) => {
      items.push({ at: new Date().toISOString(), message })
      if (items.length > limit) items.splice(0, items.length - limit)
    },
    list: (): ReadonlyArray<{ readonly at: string; readonly message: string }> => items.slice()
  }
}

/** Serves the admin endpoint until the scope closes; returns the bound address. */
export const serveAdmin = Effect.fn("Admin.serve")(function*(options: AdminOptions): Effect.fn.Return<
  HostPort,
  AdminError,
  Scope.Scope
> {
  const server = http.createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0]
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { "content-type": "text/plain", allow: "GET, HEAD" }).end("method not allowed\n")
      return
    }
    switch (path) {
      case "/healthz":
        res.writeHead(200, { "content-type": "text/plain" }).end("ok\n")
        return
      case "/readyz": {
        const ready = options.ready()
        const note = options.readyNote?.()
        res.writeHead(ready ? 200 : 503, { "content-type": "text/plain" }).end(`${ready ? "ready" : "not ready"}\n${note === undefined ? "" : `${note}\n`}`)
        return
      }
      case "/metrics":
        if (options.metrics === undefined) break
        res.writeHead(200, { "content-type": ExpositionContentType }).end(options.metrics.render())
        return
      case "/status":
        if (options.status === undefined) break
        res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(options.status(), null, 2) + "\n")
        return
      case "/route": {
        if (options.routeTest === undefined) break
        const url = new URLSearchParams((req.url ?? "").slice(path.length + 1)).get("url")
        const answer = url === null ? { error: "name the URL to test: /route?url=<URL-encoded URL>" } : options.routeTest(url)
        res.writeHead("error" in answer ? 400 : 200, { "content-type": "application/json" }).end(JSON.stringify(answer, null, 2) + "\n")
        return
      }
    }
    const page = options.pages !== undefined && Object.hasOwn(options.pages, path!) ? options.pages[path!] : undefined
    if (page !== undefined) {
      res.writeHead(200, { "content-type": "text/plain; charset=utf-8" }).end(page())
      return
    }
    res.writeHead(404, { "content-type": "text/plain" }).end("not found\n")
  })
  const run = yield* FiberSet.makeRuntime<never, void, never>()
  const closed: Record<AdminConnectionClose, number> = { head_timeout: 0, response_timeout: 0, evicted: 0, refused: 0 }
  const closedSinceLog: Record<AdminConnectionClose, number> = { head_timeout: 0, response_timeout: 0, evicted: 0, refused: 0 }
  let lastLog = 0
  const max = options.connections?.max ?? MaxAdminConnections
  applyConnectionBudget(server, {
    max,
    headTimeoutMs: options.connections?.headTimeoutMs ?? AdminHeadTimeoutMs,
    responseTimeoutMs: options.connections?.responseTimeoutMs ?? AdminResponseTimeoutMs,
    onClose: (reason) => {
      closed[reason]++
      closedSinceLog[reason]++
      const now = Date.now()
      if (now - lastLog < AdminCloseLogIntervalMs) return
      lastLog = now
      const counts = (Object.keys(closedSinceLog) as Array<AdminConnectionClose>)
        .filter((r) => closedSinceLog[r] > 0)
        .map((r) => `${r}=${closedSinceLog[r]}`)
        .join(" ")
      for (const r of Object.keys(closedSinceLog) as Array<AdminConnectionClose>) closedSinceLog[r] = 0
      run(Effect.logWarning(
        `admin endpoint closed connections that held it (${counts}; at most ${max} open, one warning per ` +
          `${AdminCloseLogIntervalMs / 1000} s, all counted in switchyard_admin_connections_closed_total)`
      ))
    }
  })
  // the budget's head deadline is the one that applies; Node's own is a backstop
  server.headersTimeout = AdminResponseTimeoutMs
  const bound = yield* listenOn(server, options.address).pipe(
    Effect.mapError((cause) => new AdminError({ reason: "BindFailed", message: `admin endpoint: ${cause.message} (${MoveAdminHint})` }))
  )
  if (options.metrics !== undefined) {
    const removeProcess = registerProcessMetrics(options.metrics)
    const removeClosed = options.metrics.sampledGauge({
      name: "switchyard_admin_connections_closed_total",
      type: "counter",
      help: "Admin endpoint connections closed by its budget: no request head in time (head_timeout), response not taken in time " +
        "(response_timeout), closed to admit a newer one (evicted), refused while every connection was being answered (refused).",
      labelNames: ["reason"],
      collect: () => (Object.keys(closed) as Array<AdminConnectionClose>).map((r) => [[r], closed[r]] as const)
    })
    yield* Effect.addFinalizer(() => Effect.sync(() => (removeProcess(), removeClosed())))
  }
  return bound
})

/** Process start time, in seconds since the epoch. */
const processStartSeconds = (Date.now() - process.uptime() * 1000) / 1000

/**
 * Registers the usual process gauges (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
 * `process_start_time_seconds`, `nodejs_heap_used_bytes`), read at scrape time; returns their remover.
 */
export const registerProcessMetrics = (registry: MetricRegistry): () => void => {
  const removers = [
    registry.sampledGauge({ name: "process_resident_memory_bytes", help: "Resident memory size in bytes.", collect: () => [[[], process.memoryUsage.rss()]] }),
    registry.sampledGauge({
      name: "process_cpu_seconds_total",
      type: "counter",
      help: "User and system CPU time spent, in seconds.",
      collect: () => {
        const usage = process.cpuUsage()
        return [[[], (usage.user + usage.system) / 1e6]]
      }
    }),
    registry.sampledGauge({ name: "process_start_time_seconds", help: "Start time of the process since the epoch, in seconds.", collect: () => [[[], processStartSeconds]] }),
    registry.sampledGauge({ name: "nodejs_heap_used_bytes", help: "V8 heap in use, in bytes.", collect: () => [[[], process.memoryUsage().heapUsed]] })
  ]
  return () => removers.forEach((r) => r())
}

/**
 * Reads and checks the `admin`/`log` sections of a command's own config file before it starts anything,
 * and applies its `log` section (with `SWITCHYARD_LOG_...` over it) to the running command. Returns the
 * raw sections for `serveOperations`.
 */
export const prepareOperations = (
  file: string | undefined,
  flags: ReadonlyArray<FlagValue> = []
): Effect.Effect<Record<string, unknown>, ConfigLoadError> =>
  Effect.gen(function*() {
    const sections = yield* readOpsSections(file)
    const decoded = yield* checkOperations(sections, file ?? "config", flags)
    if (sections["log"] !== undefined) yield* Logging.useInThisFiber({ format: decoded.log?.format, level: decoded.log?.level })
    return sections
  })

/** Decodes the `admin`/`log` sections (environment and flags over them) and checks the admin address, binding nothing. */
export const checkOperations = (
  ops: Record<string, unknown>,
  source: string,
  flags: ReadonlyArray<FlagValue> = []
): Effect.Effect<OpsFile, ConfigLoadError> =>
  Effect.flatMap(loadOpsSections(ops, source, flags), (decoded) => {
    const address = decoded.admin?.enabled === false || decoded.admin?.address === undefined ? undefined : parseHostPort(decoded.admin.address)
    return address instanceof Error
      ? Effect.fail(new ConfigLoadError({ reason: "Invalid", source: "admin.address", field: "admin.address", message: `admin.address: ${address.message}` }))
      : Effect.succeed(decoded)
  })

/**
 * Default admin address per command, so several switchyard processes fit on one host; outside 9090-9094,
 * where Prometheus, its Pushgateway and Alertmanager listen.
 */
export const DefaultAdminAddresses = {
  server: DefaultAdminAddress,
  client: { host: "127.0.0.1", port: 7091 },
  "socket-proxy": { host: "127.0.0.1", port: 7092 },
  "wsp-server": { host: "127.0.0.1", port: 7093 },
  "wsp-client": { host: "127.0.0.1", port: 7094 }
} as const satisfies Record<string, HostPort>

export interface OperationsOptions {
  readonly command: keyof typeof DefaultAdminAddresses
  /** The `admin`/`log` sections of the command's config file, when it has one (`SWITCHYARD_ADMIN_...` apply over them). */
  readonly ops?: Record<string, unknown> | undefined
  /** Where `ops` came from, for errors. */
  readonly source?: string | undefined
  /** `--admin` / `--no-admin`, over `ops` and the environment. */
  readonly flags?: ReadonlyArray<FlagValue> | undefined
  readonly ready: () => boolean
  readonly listeners?: (() => StatusDocument["listeners"]) | undefined
  readonly sessions?: (() => StatusDocument["sessions"]) | undefined
  readonly routes?: (() => StatusDocument["routes"]) | undefined
  readonly gateways?: (() => ReadonlyArray<GatewayStatusEntry>) | undefined
  /** Registers the command's own sampled metrics. */
  readonly register?: ((metrics: MetricsShape) => void) | undefined
  /** Further plain-text pages served on the admin endpoint, by path. */
  readonly pages?: Readonly<Record<string, () => string>> | undefined
}

/**
 * The admin endpoint of a command other than `server`: `/metrics`, `/healthz`, `/readyz`, `/status`.
 * Configured by the `admin` section, `SWITCHYARD_ADMIN_ADDRESS` / `SWITCHYARD_ADMIN_ENABLED` and
 * `--admin` / `--no-admin`; when
 * only the default address is in play and it is taken (another switchyard on the host), it logs a
 * warning and runs without one instead of refusing to start.
 */
export const serveOperations = Effect.fn("Admin.serveOperations")(function*(options: OperationsOptions): Effect.fn.Return<
  { readonly metrics: MetricsShape; readonly admin: HostPort | undefined; readonly recordError: (message: string) => void },
  ConfigLoadError | AdminError,
  Scope.Scope
> {
  const ops = yield* loadOpsSections(options.ops ?? {}, options.source ?? "config", options.flags)
  const metrics = makeMetrics()
  const recent = makeRecentErrors()
  options.register?.(metrics)
  if (ops.admin?.enabled === false) return { metrics, admin: undefined, recordError: recent.add }
  const explicit = ops.admin?.address
  const address = explicit === undefined ? DefaultAdminAddresses[options.command] : parseHostPort(explicit)
  if (address instanceof Error) {
    return yield* new ConfigLoadError({ reason: "Invalid", source: "admin.address", field: "admin.address", message: `admin.address: ${address.message}` })
  }
  const startedAt = new Date().toISOString()
  let bound: HostPort | undefined
  const status = (): StatusDocument => ({
    command: options.command,
    version: packageJson.version,
    startedAt,
    ready: options.ready(),
    listeners: [...(bound === undefined ? [] : [{ name: "admin", address: formatHostPort(bound) }]), ...(options.listeners?.() ?? [])],
    sessions: options.sessions?.() ?? [],
    routes: options.routes?.() ?? [],
    recentErrors: recent.list(),
    ...(options.gateways === undefined ? {} : { gateways: options.gateways() })
  })
  const served = yield* Effect.exit(serveAdmin({ address, ready: options.ready, metrics: metrics.registry, status, pages: options.pages }))
  if (served._tag === "Failure") {
    const message = served.cause.reasons.map((r) => r._tag === "Fail" ? r.error.message : "").join("")
    if (explicit !== undefined) return yield* new AdminError({ reason: "BindFailed", message })
    yield* Effect.logWarning(`running without an admin endpoint: ${message}`)
    return { metrics, admin: undefined, recordError: recent.add }
  }
  bound = served.value
  yield* Effect.logInfo(`admin endpoint on http://${formatHostPort(bound)} (/metrics /healthz /readyz /status)`)
  return { metrics, admin: bound, recordError: recent.add }
})

/** A tunnel client's view of one gateway, for its metrics. */
/**
 * A reload that could not be applied: counted (`switchyard_config_reloads_total{result="rejected"}`),
 * kept among the recent errors of `/status`, and logged; the running configuration stays in force.
 */
export const reloadRefused = (
  operations: { readonly metrics: Pick<MetricsShape, "reloads">; readonly recordError: (message: string) => void },
  what = "the previous configuration stays in force"
) =>
(error: { readonly message: string }): Effect.Effect<void> =>
  Effect.sync(() => {
    operations.metrics.reloads.labels("rejected").inc()
    operations.recordError(`reload refused: ${error.message}`)
  }).pipe(Effect.andThen(Effect.logError(`reload refused, ${what}: ${error.message}`)))

export interface GatewayView {
  readonly gateway: string
  readonly connected: boolean
  /** Failed attempts since the last successful handshake. */
  readonly attempts: number
  /** Sessions established so far (reconnects are the ones after the first). */
  readonly established: number
}

/**
 * Registers `switchyard_gateway_up`, `switchyard_gateway_failed_attempts` and
 * `switchyard_reconnects_total`, sampled from `views`.
 */
export const registerGatewayGauges = (metrics: MetricsShape, frontDoor: string, views: () => ReadonlyArray<GatewayView>): void => {
  metrics.registry.sampledGauge({
    name: "switchyard_gateway_up",
    help: "1 while the tunnel session to a gateway is up, by front door and gateway.",
    labelNames: ["front_door", "gateway"],
    collect: () => views().map((v) => [[frontDoor, v.gateway], v.connected ? 1 : 0] as const)
  })
  metrics.registry.sampledGauge({
    name: "switchyard_gateway_failed_attempts",
    help: "Failed connection attempts to a gateway since its last successful handshake.",
    labelNames: ["front_door", "gateway"],
    collect: () => views().map((v) => [[frontDoor, v.gateway], v.attempts] as const)
  })
  metrics.registry.sampledGauge({
    name: "switchyard_reconnects_total",
    type: "counter",
    help: "Tunnel sessions re-established after a loss, by front door and gateway.",
    labelNames: ["front_door", "gateway"],
    collect: () => views().map((v) => [[frontDoor, v.gateway], Math.max(0, v.established - 1)] as const)
  })
}

/**
 * Registers the wsp server's pool gauges (`switchyard_wsp_connections{state}`, `switchyard_wsp_pools`),
 * its refused credentials (`switchyard_wsp_rejections_total{credential}`), its failed exchanges
 * (`switchyard_wsp_request_failures_total{reason}`) and, when given, the connections it refused or cut for
 * what they sent (`switchyard_wsp_connection_refusals_total{reason}`).
 */
export const registerPoolGauges = (
  metrics: MetricsShape,
  stats: () => { readonly pools: number; readonly idle: number; readonly busy: number },
  rejected: () => { readonly secretKey: number; readonly requestKey: number; readonly registrationClosed?: number; readonly throttled?: number },
  refusals?: () => { readonly greetingTooLarge: number; readonly idleOverflow: number; readonly tooManyGreetings: number },
  failures: () => Readonly<Record<string, number | undefined>> = () => ({})
): void => {
  if (refusals !== undefined) {
    metrics.registry.sampledGauge({
      name: "switchyard_wsp_connection_refusals_total",
      type: "counter",
      help: "wsp connections refused or cut: a greeting over its byte budget (greeting_too_large), bytes sent while carrying no request (idle_overflow), /register beyond the registrations waiting to greet (too_many_greetings).",
      labelNames: ["reason"],
      collect: () => {
        const r = refusals()
        return [[["greeting_too_large"], r.greetingTooLarge], [["idle_overflow"], r.idleOverflow], [["too_many_greetings"], r.tooManyGreetings]]
      }
    })
  }
  metrics.registry.sampledGauge({
    name: "switchyard_wsp_rejections_total",
    type: "counter",
    help: "wsp credentials refused: a wrong X-SECRET-KEY on /register (secret_key), /register with no secretkey configured " +
      "(registration_closed), a wrong request key on /request (request_key), an address refused after too many failures (throttled).",
    labelNames: ["credential"],
    collect: () => {
      const r = rejected()
      return [[["secret_key"], r.secretKey], [["registration_closed"], r.registrationClosed ?? 0], [["request_key"], r.requestKey], [["throttled"], r.throttled ?? 0]]
    }
  })
  metrics.registry.sampledGauge({
    name: "switchyard_wsp_request_failures_total",
    type: "counter",
    help: "wsp /request exchanges that failed after a connection was taken (the connection is dropped), by reason " +
      "(ResponseTimeout: no response head within responsetimeout).",
    labelNames: ["reason"],
    collect: () => Object.entries(failures()).map(([reason, n]) => [[reason], n ?? 0] as const)
  })
  metrics.registry.sampledGauge({
    name: "switchyard_wsp_connections",
    help: "wsp client connections held by the server, by state (idle, busy).",
    labelNames: ["state"],
    collect: () => {
      const s = stats()
      return [[["idle"], s.idle], [["busy"], s.busy]]
    }
  })
  metrics.registry.sampledGauge({
    name: "switchyard_wsp_pools",
    help: "wsp client pools (one per client id).",
    collect: () => [[[], stats().pools]]
  })
}

/**
 * Registers the socket proxy's decision counters (`switchyard_socket_proxy_requests_total{decision,
 * listener, rule_set}`); labels are bounded by the listeners configured.
 */
export const registerSocketProxyCounters = (
  metrics: MetricsShape,
  stats: () => SocketProxyStats,
  listenerStats: () => ReadonlyArray<{ readonly listener: string; readonly ruleSet: string; readonly stats: SocketProxyStats }> = () => [
    { listener: "", ruleSet: "", stats: stats() }
  ]
): void => {
  metrics.registry.sampledGauge({
    name: "switchyard_socket_proxy_connection_limit_closes_total",
    type: "counter",
    help: "Socket-proxy client connections refused or closed by maxConnections, maxConnectionsPerAddress or silentTimeoutMs.",
    collect: () => [[[], stats().connectionLimitCloses]]
  })
  metrics.registry.sampledGauge({
    name: "switchyard_socket_proxy_requests_total",
    type: "counter",
    help:
      "Socket-proxy requests by decision: allowed (forwarded), denied (403 by the rules), rejected (client or target refused), out_of_scope (a container outside the label scope: 404, or a call the scope refuses: 403).",
    labelNames: ["decision", "listener", "rule_set"],
    collect: () =>
      listenerStats().flatMap(({ listener, ruleSet, stats: s }) =>
        [
          [["allowed", listener, ruleSet], s.allowed],
          [["denied", listener, ruleSet], s.denied],
          [["rejected", listener, ruleSet], s.rejected],
          [["out_of_scope", listener, ruleSet], s.outOfScope]
        ] as const
      )
  })
  metrics.registry.sampledGauge({
    name: "switchyard_socket_proxy_learned_total",
    type: "counter",
    help: "Socket-proxy requests that learning mode forwarded although the rules or the body policy would have refused them (also counted as allowed).",
    labelNames: ["listener", "rule_set"],
    collect: () => listenerStats().map(({ listener, ruleSet, stats: s }) => [[listener, ruleSet], s.learned] as const)
  })
  registerClientLimitCounters(metrics, "socket_proxy", () => stats().limited)
}

/** `switchyard_client_limit_refusals_total{front_door, limit}`: what the client limits refused or cut. */
export const registerClientLimitCounters = (
  metrics: MetricsShape,
  frontDoor: string,
  counts: () => Readonly<Record<ClientLimitKind, number>>
): () => void =>
  metrics.registry.sampledGauge({
    name: "switchyard_client_limit_refusals_total",
    type: "counter",
    help:
      "Requests refused and connections cut by the client limits, by front door and limit: request_body_rate (408), response_rate (closed), client_slots and slot_wait (503), head_timeout (408).",
    labelNames: ["front_door", "limit"],
    collect: () => {
      const c = counts()
      return CLIENT_LIMIT_KINDS.map((k) => [[frontDoor, k], c[k]] as const)
    }
  })
