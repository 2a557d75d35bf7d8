/**
 * Assembles the gateway from its resolved configuration: the admin endpoint, the control port with its
 * public listeners, the reverse-HTTP/2 tunnel port when enabled, the instruments, the drain on scope
 * close and the reload on SIGHUP (tokens, reverse-HTTP/2 routes and ACME settings). It reads no flags and prints
 * nothing: the `server` command does that.
 */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { randomBytes } from "node:crypto"
import { Context, Deferred, Effect, Layer, Option, Redacted, Scope } from "effect"
import type { TokenGrant } from "../../domain/TokenPolicy.ts"
import { AcmeCertificates, type AcmeCertificatesShape, type AcmeConfig } from "../../services/acme/AcmeCertificates.ts"
import { redisSharedCertificates } from "../../services/acme/SharedCertificates.ts"
import { Dispatcher } from "../../services/Dispatcher.ts"
import { leaseRouteKey } from "../../domain/ClusterLease.ts"
import { LogSampler } from "../../domain/LogSampler.ts"
import { type ClusterLeasesShape, makeClusterLeases } from "../../services/cluster/ClusterLeases.ts"
import { redisLeaseStore } from "../../services/cluster/LeaseStore.ts"
import { makeRelayBackends } from "../../services/cluster/RelayBackends.ts"
import { listenRelay, makeRelayDialer } from "../../services/cluster/RelayLink.ts"
import { ControlPort } from "../../services/front/ControlPort.ts"
import { ReverseH2 } from "../../services/front/ReverseH2.ts"
import { Listeners } from "../../services/Listeners.ts"
import { makeMetrics, Metrics, type MetricsShape } from "../../services/Metrics.ts"
import { Registry } from "../../services/Registry.ts"
import { type ClusterStatusEntry, makeRecentErrors, registerClientLimitCounters, reloadRefused, serveAdmin, type StatusDocument } from "../Admin.ts"
import { ConfigLoadError, type ServerFile } from "../ConfigLoader.ts"
import { onHangup } from "../Lifecycle.ts"
import * as Logging from "../Logging.ts"
import { formatHostPort, type HostPort } from "../NetAddress.ts"
import * as NodeTransport from "../NodeTransport.ts"
import packageJson from "../../../package.json" with { type: "json" }
import { type ClusterInstruments, dispatchObserver, gatewayEvents, type GatewayServices, registerServerGauges, requestInstruments } from "./GatewayInstruments.ts"
import { testRoute } from "./RouteTest.ts"
import { acmeOf, AllPorts, GeneratedGrantName, GeneratedTokenBytes, grantsOf, h2RoutesOf, invalid, redisDisplay, resolveServerConfig } from "./ServerConfig.ts"

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
  /**
   * Completed when a stop should not wait out `shutdown_delay_ms` (the command completes it on SIGINT or a
   * second SIGTERM); by default the delay always runs.
   */
  readonly skipShutdownDelay?: Deferred.Deferred<void> | undefined
}

/** The ACME metrics, read from the certificate manager at scrape time; returns their remover. */
const registerAcmeGauges = (metrics: MetricsShape, acme: AcmeCertificatesShape, clustered: boolean) => {
  const removers = [
    metrics.registry.sampledGauge({
      name: "switchyard_acme_orders_total",
      help: "ACME orders by result: issued (a certificate was obtained) or failed.",
      labelNames: ["result"],
      type: "counter",
      collect: () => {
        const { issued, failed } = acme.orders()
        return [[["issued"], issued], [["failed"], failed]]
      }
    }),
    metrics.registry.sampledGauge({
      name: "switchyard_acme_certificate_days_left",
      help: "Days until the certificate served for a name expires (names no route wants are left out).",
      labelNames: ["name"],
      collect: () => acme.status().flatMap((s) => s.daysLeft === undefined || s.state === "unused" ? [] : [[[s.name], s.daysLeft] as const])
    }),
    metrics.registry.sampledGauge({
      name: "switchyard_acme_names",
      help: "Names whose certificate the gateway obtains, by state (ordering: none yet; waiting: after a failed order; unused: no route wants it, not renewed).",
      labelNames: ["state"],
      collect: () => {
        const counts = new Map<string, number>([["ordering", 0], ["valid", 0], ["renewing", 0], ["waiting", 0], ["unused", 0]])
        for (const s of acme.status()) counts.set(s.state, (counts.get(s.state) ?? 0) + 1)
        return [...counts].map(([state, n]) => [[state], n] as const)
      }
    }),
    metrics.registry.sampledGauge({
      name: "switchyard_acme_failures",
      help: "Consecutive failed orders per name (0 once a certificate is obtained).",
      labelNames: ["name"],
      collect: () => acme.status().map((s) => [[s.name], s.failures] as const)
    }),
    ...(clustered
      ? [metrics.registry.sampledGauge({
        name: "switchyard_acme_cluster_certificates_total",
        help: "Certificates taken from the cluster's store (ordered by another gateway) instead of ordered here.",
        type: "counter",
        collect: () => [[[], acme.fromCluster()]]
      })]
      : [])
  ]
  return () => removers.forEach((r) => r())
}

/** Applies reloaded ACME settings; turning ACME on or off needs a restart (a warning says so). */
const reloadAcme = (acme: AcmeCertificatesShape | undefined, next: AcmeConfig | undefined) =>
  acme !== undefined && next !== undefined
    ? Effect.asVoid(acme.reconfigure(next))
    : acme === next
    ? Effect.void
    : Effect.logWarning(
      acme === undefined
        ? "acme.directory is set now: the gateway obtains certificates after a restart"
        : "acme.directory was removed: the gateway keeps obtaining and renewing certificates until a restart"
    ).pipe(Effect.annotateLogs({ component: "acme" }))

/** Longest wait for one command of the cluster's lease store (ms). */
export const MaxClusterCommandMs = 2_000

/** The control port as backends dial it, or `undefined` when it binds every interface (no address to tell). */
const advertisedControl = (bound: HostPort, tls: boolean): string | undefined =>
  bound.host === "0.0.0.0" || bound.host === "::" || bound.host === "" ? undefined : `${tls ? "tls://" : ""}${formatHostPort(bound)}`

/** The cluster's part of `/status`. */
const clusterStatus = (cluster: ClusterLeasesShape): ClusterStatusEntry => {
  const state = cluster.state()
  return {
    node: cluster.node,
    store: state.store,
    stale: state.stale,
    ...(state.lastReadAt === undefined ? {} : { lastRead: new Date(state.lastReadAt).toISOString() }),
    ...(state.lastError === undefined ? {} : { lastError: state.lastError }),
    published: state.published,
    leases: [...cluster.table().values()].map((lease) => ({ node: lease.node, route: leaseRouteKey(lease.route), relay: lease.relay })),
    gateways: cluster.gateways()
  }
}

/** What `/readyz` adds about the cluster when its store is not answering. */
const clusterReadyNote = (cluster: ClusterLeasesShape): string | undefined => {
  const state = cluster.state()
  if (state.store !== "unreachable") return undefined
  return state.stale
    ? `cluster store unreachable for longer than the lease TTL: serving local routes only (${state.lastError ?? ""})`
    : `cluster store unreachable: serving local routes and the last table read (${state.lastError ?? ""})`
}

/** The cluster metrics, read at scrape time; returns their remover. */
const registerClusterGauges = (metrics: MetricsShape, cluster: ClusterLeasesShape) => {
  const removers = [
    metrics.registry.sampledGauge({
      name: "switchyard_cluster_store_up",
      help: "1 while the cluster's lease store (Redis) answers, else 0.",
      collect: () => [[[], cluster.state().store === "connected" ? 1 : 0]]
    }),
    metrics.registry.sampledGauge({
      name: "switchyard_cluster_leases",
      help: "Route leases: published (this gateway's, kept alive) and remote (the other gateways' in use).",
      labelNames: ["side"],
      collect: () => {
        const state = cluster.state()
        return [[["published"], state.published], [["remote"], cluster.table().size]]
      }
    })
  ]
  return () => removers.forEach((r) => r())
}

/** Most node names the relayed-requests counter keeps as labels per direction; others count as `other`. */
export const MaxRelayedNodeLabels = 256

/** The cluster's per-request counter: requests relayed out to each gateway and in from each. */
const makeClusterInstruments = (metrics: MetricsShape, node: string): ClusterInstruments => {
  const family = metrics.registry.counter({
    name: "switchyard_cluster_relayed_requests_total",
    help: "Requests that crossed a relay link: out (relayed from here to node) or in (relayed here from node and served here).",
    labelNames: ["direction", "node"]
  })
  const children = new Map<string, { inc: () => void }>()
  return {
    node,
    relayed: (direction, peer) => {
      // node names come from authenticated gateways; the label values stay bounded all the same
      const name = children.size < MaxRelayedNodeLabels * 2 ? peer : "other"
      const key = `${direction} ${name}`
      let child = children.get(key)
      if (child === undefined) children.set(key, child = family.labels(direction, name))
      child.inc()
    }
  }
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

/**
 * The first steps of a stop: readiness turns false, then the gateway keeps serving for the shutdown delay
 * (ended early when `skipDelay` completes), then it says the ports stop accepting. What closes them and
 * drains requests in flight is the front doors' own finalizers, which run after this.
 */
export const stopSequence = (options: {
  readonly shutdownDelayMs: number
  readonly drainTimeoutMs: number
  readonly skipDelay?: Deferred.Deferred<void> | undefined
  readonly notReady: () => void
}): Effect.Effect<void> =>
  Effect.gen(function*() {
    options.notReady()
    const skip = options.skipDelay
    if (options.shutdownDelayMs > 0 && skip !== undefined && Deferred.isDoneUnsafe(skip)) {
      yield* Effect.logInfo("stopping without the shutdown delay (SIGINT): /readyz answers 503")
    } else if (options.shutdownDelayMs > 0) {
      yield* Effect.logInfo(
        `stopping: /readyz answers 503; still serving for ${options.shutdownDelayMs} ms (shutdown_delay_ms) so load balancers move away`
      )
      const elapsed = yield* Effect.raceFirst(
        Effect.as(Effect.sleep(options.shutdownDelayMs), true),
        Effect.as(skip === undefined ? Effect.never : Deferred.await(skip), false)
      )
      if (!elapsed) yield* Effect.logInfo("shutdown delay cut short (SIGINT or a second SIGTERM)")
    }
    yield* Effect.logInfo(`shutting down: public ports stop accepting, requests in flight get up to ${options.drainTimeoutMs} ms`)
  }).pipe(Effect.annotateLogs({ component: "server" }))

/**
 * Starts the gateway described by `file` in the current scope; fails before binding on a bad value.
 * Its metrics go to the `Metrics` service when one is provided, else to a registry of its own.
 */
export const runGateway = Effect.fn("server.runGateway")(function*(
  file: ServerFile,
  options: GatewayOptions = {}
): Effect.fn.Return<GatewayHandle, ConfigLoadError | Error, Scope.Scope> {
  const config = resolveServerConfig(file)
  if (config instanceof ConfigLoadError) return yield* config
  let grants: ReadonlyArray<TokenGrant> = config.grants
  let generatedTokenFile: string | undefined
  if (grants.length === 0) {
    const generated = yield* generateTokenFile
    generatedTokenFile = generated.file
    grants = [{ name: GeneratedGrantName, token: generated.token, ports: AllPorts }]
  }
  const h2Enabled = config.reverseH2.enabled
  const webSocket = config.webSocket

  // an embedding app may provide its own Metrics registry (one gateway per registry)
  const metrics = Option.getOrElse(yield* Effect.serviceOption(Metrics), makeMetrics)
  const recentErrors = makeRecentErrors()
  const access = Logging.accessLogger({ format: config.log?.format, accessLog: config.log?.access_log })

  const drainTimeout = config.drainTimeoutMs
  const removersLater: Array<() => void> = []
  let draining = false
  let live: GatewayServices | undefined
  const startedAt = new Date().toISOString()
  const listenerNames: Array<{ name: string; address: string }> = []
  let acme: AcmeCertificatesShape | undefined
  let cluster: ClusterLeasesShape | undefined

  // The admin endpoint starts first so it closes last: /readyz answers 503 while the gateway drains.
  let adminBound: HostPort | undefined
  if (config.admin.enabled) {
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
      recentErrors: recentErrors.list(),
      ...(acme === undefined ? {} : { certificates: acme.status() }),
      ...(cluster === undefined ? {} : { cluster: clusterStatus(cluster) })
    })
    const routeTest = (url: string) => live === undefined ? { error: "the gateway is starting" } : testRoute(live.registry, url)
    adminBound = yield* serveAdmin({
      address: config.admin.address,
      ready: () => live !== undefined && !draining,
      readyNote: () => cluster === undefined ? undefined : clusterReadyNote(cluster),
      metrics: metrics.registry,
      status,
      routeTest
    })
    listenerNames.push({ name: "admin", address: formatHostPort(adminBound) })
  }

  if (config.acme !== undefined) {
    const clusterConfig = config.cluster
    // in a cluster the certificates are shared through its Redis, and one gateway at a time orders a name
    const shared = clusterConfig === undefined ? undefined : yield* redisSharedCertificates({
      url: clusterConfig.redisUrl,
      node: clusterConfig.node,
      secret: clusterConfig.secret,
      commandTimeoutMs: MaxClusterCommandMs,
      lockLeaseMs: config.acme.clusterLockMs
    })
    acme = yield* AcmeCertificates.make({
      ...config.acme,
      ...(shared === undefined ? {} : { shared }),
      onFailure: (name, reason) => recentErrors.add(`acme: no certificate for ${name}: ${reason}`)
    }).pipe(Effect.annotateLogs({ component: "acme" }))
    const removeAcmeGauges = registerAcmeGauges(metrics, acme, shared !== undefined)
    yield* Effect.addFinalizer(() => Effect.sync(removeAcmeGauges))
  }
  const events = gatewayEvents(metrics, recentErrors.add, yield* Effect.context<never>())
  const clusterInstruments = config.cluster === undefined ? undefined : makeClusterInstruments(metrics, config.cluster.node)
  const removeClientLimitCounters = registerClientLimitCounters(metrics, "public", events.clientLimitReporter.counts)
  yield* Effect.addFinalizer(() => Effect.sync(removeClientLimitCounters))
  const gateway = ControlPort.gatewayLayer({
    cluster: config.cluster !== undefined,
    control: {
      ...config.control,
      otherGateways: () => cluster?.gateways() ?? [],
      tokens: grants,
      onRejected: events.onRejected,
      onSessionFailed: events.onSessionFailed,
      onSessionDraining: events.onSessionDraining,
      ...(webSocket === undefined ? {} : { websocket: webSocket })
    },
    publicHost: config.publicHost,
    publicConnections: { ...config.publicConnections, onConnectionLimit: events.onConnectionLimit },
    registry: { gracePeriod: config.gracePeriodMs },
    dispatcher: { maxWaiting: config.maxWaiting },
    responseTimeoutMs: config.responseTimeoutMs,
    idleTimeoutMs: config.idleTimeoutMs,
    // the per-request instruments follow each public exchange (`observeExchange`)
    instruments: config.requestMetrics ? requestInstruments(metrics, access, clusterInstruments) : { observeDispatch: dispatchObserver(metrics) },
    clientLimits: config.clientLimits,
    onClientLimit: events.clientLimitReporter.onClientLimit,
    ...(acme === undefined ? {} : { certificates: acme })
  })
  const h2Layer: Layer.Layer<never, Error, Listeners> | Layer.Layer<ReverseH2, Error, Listeners> = h2Enabled
    ? ReverseH2.layer({
      address: config.reverseH2.address,
      ...(config.reverseH2.tls === undefined ? {} : { tls: config.reverseH2.tls }),
      routes: config.reverseH2.routes,
      tokens: config.reverseH2.plain ? undefined : grants,
      authThrottle: config.authThrottle,
      drainTimeout,
      onFailure: events.onH2Failure,
      onStreamViolation: events.onH2StreamViolation,
      responseTimeoutMs: config.responseTimeoutMs,
      idleTimeoutMs: config.idleTimeoutMs
    })
    : Layer.empty
  // The cluster's links and leases live in a scope that closes after the gateway has drained (finalizers
  // run last-in first-out): requests relayed either way finish with the others.
  const clusterScope = config.cluster === undefined ? undefined : yield* Scope.fork(yield* Effect.scope)
  const context = yield* Layer.build(
    (h2Layer as Layer.Layer<ReverseH2, Error, Listeners>).pipe(
      Layer.provideMerge(gateway),
      Layer.provide(NodeTransport.layer)
    )
  ).pipe(Effect.mapError((e) => new Error(`cannot start the gateway: ${e.message}`)))
  const controlPort = Context.get(context, ControlPort)
  const h2 = h2Enabled ? Context.get(context, ReverseH2) : undefined
  live = {
    listeners: Context.get(context, Listeners),
    registry: Context.get(context, Registry),
    dispatcher: Context.get(context, Dispatcher),
    controlPort,
    h2
  }
  // Finalizers run last-in first-out: readiness drops and the shutdown delay runs before the front doors
  // drain, so a load balancer polling /readyz moves traffic away while every port still serves.
  yield* Effect.addFinalizer(() =>
    stopSequence({ shutdownDelayMs: config.shutdownDelayMs, drainTimeoutMs: drainTimeout, skipDelay: options.skipShutdownDelay, notReady: () => void (draining = true) })
  )
  if (config.cluster !== undefined && clusterScope !== undefined) {
    const clusterConfig = config.cluster
    const gatewayServices = live
    cluster = yield* Effect.gen(function*() {
      const clusterLog = Effect.annotateLogs({ component: "cluster" })
      const runLog = Effect.runForkWith(yield* Effect.context<never>())
      const listeners = gatewayServices.listeners
      const refusals = new LogSampler()
      // streams relayed here are served by the public listeners, on local backends only
      const relayAddress = yield* listenRelay({
        transport: NodeTransport.layerService,
        address: clusterConfig.advertise,
        node: clusterConfig.node,
        secret: clusterConfig.secret,
        onStream: ({ socket, preamble }) => listeners.acceptRelayed(socket, preamble.localPort, preamble.protocol),
        onRefused: (remote, error) => {
          recentErrors.add(`cluster: relay link from ${remote} refused: ${error.message}`)
          // a peer that keeps dialing with a wrong secret makes one line per reason every 10 s
          const left = refusals.take(error.reason, Date.now())
          if (left === undefined) return
          const more = left > 0 ? ` (${left} more refused for this reason since the last line)` : ""
          runLog(Effect.logWarning(`relay link from ${remote} refused: ${error.reason}: ${error.message}${more}`).pipe(clusterLog))
        },
        onLink: (event, node, remote) => void runLog(Effect.logInfo(`relay link from gateway "${node}" (${remote}) ${event}`).pipe(clusterLog))
      }).pipe(Effect.mapError((e) => new Error(`cannot listen for relay links on ${formatHostPort(clusterConfig.advertise)}: ${e.message}`)))
      listenerNames.push({ name: "cluster_relay", address: `${relayAddress.host}:${relayAddress.port}` })
      const dialer = yield* makeRelayDialer({
        transport: NodeTransport.layerService,
        node: clusterConfig.node,
        secret: clusterConfig.secret,
        onLinkState: (address, state, detail) => {
          if (state === "down") recentErrors.add(`cluster: relay link to ${address} down: ${detail}`)
          // requests waiting for a backend look again: the link's relay backends take work again
          else gatewayServices.registry.touch()
          runLog((state === "up" ? Effect.logInfo(`relay link to ${address} up (${detail})`) : Effect.logWarning(`relay link to ${address} down: ${detail}`)).pipe(clusterLog))
        }
      })
      const relays = yield* makeRelayBackends({
        listeners,
        dialer,
        onRefused: (lease, message) => {
          recentErrors.add(`cluster: route ${leaseRouteKey(lease.route)} of gateway "${lease.node}" not served here: ${message}`)
          return Effect.logWarning(`route ${leaseRouteKey(lease.route)} of gateway "${lease.node}" not served here: ${message}`).pipe(clusterLog)
        }
      })
      const store = yield* redisLeaseStore({ url: clusterConfig.redisUrl, commandTimeoutMs: Math.min(clusterConfig.heartbeatMs, MaxClusterCommandMs) })
      const leases = yield* makeClusterLeases({
        config: {
          ...clusterConfig,
          control: () => clusterConfig.controlAdvertise ?? advertisedControl(controlPort.address as HostPort, config.control.tls !== undefined)
        },
        store,
        registry: gatewayServices.registry,
        isLocal: (backend) => backend.relayedVia === undefined,
        onChange: (diff, table) =>
          Effect.logInfo(
            `cluster table: ${diff.added.length} lease(s) added, ${diff.removed.length} removed, ${diff.changed.length} changed`
          ).pipe(clusterLog, Effect.andThen(relays.apply(diff, table)))
      })
      removersLater.push(registerClusterGauges(metrics, leases))
      yield* Effect.logInfo(`cluster: node ${clusterConfig.node}, leases in ${redisDisplay(clusterConfig.redisUrl)} (TTL ${clusterConfig.leaseTtlMs} ms)`).pipe(clusterLog)
      return leases
    }).pipe(Scope.provide(clusterScope))
    // on a stop, the leases go first: the other gateways stop relaying here while this one still serves
    const leases = cluster
    yield* Effect.addFinalizer(() => leases.withdraw)
  }
  listenerNames.push({ name: "control", address: formatHostPort(controlPort.address as HostPort) })
  if (h2 !== undefined) listenerNames.push({ name: "reverse_h2", address: formatHostPort(h2.address) })
  const controlWebSocket = controlPort.webSocketAddress === undefined || webSocket === undefined
    ? undefined
    : `${webSocket.tls === undefined ? "ws" : "wss"}://${formatHostPort(controlPort.webSocketAddress as HostPort)}${webSocket.path}`
  if (controlWebSocket !== undefined) listenerNames.push({ name: "control_websocket", address: controlWebSocket })

  const removers = [
    ...removersLater,
    ...registerServerGauges(metrics, live),
    metrics.registry.sampledGauge({
      name: "switchyard_route_refusals_total",
      type: "counter",
      help: "Routes the control port refused to authenticated backends (in a Hello or an AddListener), by reason: Conflict (another kind on the port, or another token's route), PortNotAllowed, DomainNotAllowed, BindFailed, Limit.",
      labelNames: ["reason"],
      collect: () => [...controlPort.routeRefusals()].map(([reason, n]) => [[reason], n] as const)
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
      const applied = nextGrants.length === 0 ? grants : nextGrants
      const nextH2Routes = h2RoutesOf(next)
      const nextAcme = acmeOf(next)
      if (nextAcme instanceof ConfigLoadError) return yield* nextAcme
      if (h2 !== undefined && !h2.authenticated && nextH2Routes.length === 0) {
        return yield* invalid("reverse_h2.routes", "a plain reverse-HTTP/2 port needs at least one route")
      }
      // routes first: the only step that can still refuse, and it changes nothing when it does
      if (h2 !== undefined) {
        yield* h2.replaceRoutes(nextH2Routes).pipe(Effect.mapError((e) => invalid("reverse_h2.routes", e.message)))
      }
      const closeRevoked = next.control?.close_revoked_sessions === true
      const closed = yield* controlPort.replaceTokens(applied, { closeRevoked })
      if (h2 !== undefined && h2.authenticated) yield* h2.replaceTokens(applied)
      yield* reloadAcme(acme, nextAcme)
      metrics.reloads.labels("applied").inc()
      const routesNote = h2 === undefined ? "" : `, ${nextH2Routes.length} reverse-HTTP/2 route(s)`
      const sessionsNote = closeRevoked
        ? `sessions already up keep their grants; ${closed} session(s) of removed tokens closed`
        : "sessions already up keep their grants"
      yield* Effect.logInfo(`configuration reloaded: ${nextGrants.length} token(s)${routesNote}; ${sessionsNote} (addresses change on restart)`)
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
