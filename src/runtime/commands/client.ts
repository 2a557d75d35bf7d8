/**
 * `switchyard client`: exposes a local service through one or more gateways' control ports. Each
 * tunnelled connection is piped to `expose` as raw bytes (HTTP or TCP alike); the public peer's
 * address reaches HTTP services as `X-Forwarded-For`. Settings come from `--config` (YAML or JSON),
 * `SWITCHYARD_...` variables and flags, in that order. One route from the single-route fields, or
 * several from `routes`, all over the same session per gateway. Runs until interrupted, then drains.
 * SIGHUP re-reads them: added and changed routes are bound over the live sessions before the routes
 * they replace are removed (those drain), a changed `expose` applies to new connections; gateways,
 * token, label and CA apply on restart (logged).
 */
import * as net from "node:net"
import { Console, Data, Deferred, Duration, Effect, Exit, Fiber, Option, Redacted, Runtime, Scope, Stream } from "effect"
import { Command, Flag } from "effect/cli"
import { encodeProxyHeader } from "../../domain/ProxyProtocol.ts"
import { describeRoute } from "../../domain/Route.ts"
import { describeTarget, type GatewayTarget, TunnelClient, type TunnelListener } from "../../services/client/TunnelClient.ts"
import { isWebSocketUrl } from "../../services/transport/WebSocketDial.ts"
import { joinReading } from "../../services/JoinStreams.ts"
import { checkOperations, registerGatewayGauges, reloadRefused, serveOperations } from "../Admin.ts"
import { ClientFile, ConfigLoadError, type FlagValue, loadConfig, refuseConfig } from "../ConfigLoader.ts"
import { onHangup } from "../Lifecycle.ts"
import { DefaultServer } from "../listen.ts"
import * as Logging from "../Logging.ts"
import { AddressError, formatHostPort, parseGatewayAddress } from "../NetAddress.ts"
import { exposeOverReverseHttp2 } from "../serveReverseHttp2.ts"
import * as NodeTransport from "../NodeTransport.ts"
import { invalidField, type ListenerSpec, routeState, specsOf } from "./clientRoutes.ts"
import { adminFlags, adminOverrides, checkConfigFlag } from "./sharedFlags.ts"

/** Exit code when a gateway refuses the client for good and exit_on_reject is set (sysexits' EX_NOPERM). */
export const RejectedExitCode = 77

/** A gateway refused the token or the route for good and exit_on_reject is set; the reason was logged. */
class GatewayRejected extends Data.TaggedError("GatewayRejected")<{ readonly message: string }> {
  override readonly [Runtime.errorReported] = false
  override readonly [Runtime.errorExitCode] = RejectedExitCode
}

const optionalString = (name: string, description: string) => Flag.String(name).pipe(Flag.withDescription(description), Flag.optional)

const flags = {
  config: optionalString("config", "YAML or JSON config file (see docs/OPERATIONS.md)"),
  checkConfig: checkConfigFlag,
  server: Flag.String("server").pipe(
    Flag.withDescription(
      "Gateway control address host:port (tls://host:port when it is served over TLS), or ws://host[:port]/tunnel / wss://… for its WebSocket control path " +
        "(through HTTPS_PROXY/HTTP_PROXY unless NO_PROXY covers it); repeat for several gateways (default 127.0.0.1:9999)"
    ),
    Flag.atLeast(0)
  ),
  token: Flag.Redacted("token").pipe(Flag.withDescription("Token granted by the gateway (or SWITCHYARD_TOKEN; prefer --token-file)"), Flag.optional),
  tokenFile: optionalString("token-file", "File holding the token (token_file, SWITCHYARD_TOKEN_FILE)"),
  expose: optionalString("expose", "Local address to forward to, host:port"),
  port: Flag.Int("port").pipe(Flag.withDescription("Public port on the gateway"), Flag.optional),
  path: optionalString("path", "HTTP path prefix, e.g. /a (forwarded as received unless --strip-path)"),
  stripPath: Flag.Boolean("strip-path").pipe(Flag.withDescription("Remove the --path prefix from the forwarded path: /a/x is forwarded as /x, /a as /"), Flag.withDefault(false)),
  domain: optionalString("domain", "HTTP domain suffix, e.g. example.com"),
  tcp: Flag.Boolean("tcp").pipe(Flag.withDescription("Raw TCP instead of HTTP"), Flag.withDefault(false)),
  proxyProtocol: optionalString("proxy-protocol", "v1 or v2: start each raw TCP connection to --expose with a PROXY protocol header naming the public peer"),
  tlsCert: Flag.FileText("tls-cert").pipe(Flag.withDescription("PEM certificate: the gateway terminates TLS with it"), Flag.optional),
  tlsKey: Flag.FileText("tls-key").pipe(Flag.withDescription("PEM private key for --tls-cert"), Flag.optional),
  tlsAcme: Flag.Boolean("tls-acme").pipe(
    Flag.withDescription("The gateway terminates TLS for --domain with a certificate it obtains from its ACME CA (instead of --tls-cert/--tls-key)"),
    Flag.withDefault(false)
  ),
  label: optionalString("label", "Name shown in the gateway's logs"),
  ca: Flag.FileText("ca").pipe(Flag.withDescription("PEM CA certificate(s) trusted for tls:// and wss:// gateways, besides the system's"), Flag.optional),
  h2: Flag.Boolean("h2").pipe(
    Flag.withDescription("--server names reverse-HTTP/2 tunnel ports: serve HTTP/2 to the gateway, forward to --expose as HTTP"),
    Flag.withDefault(false)
  ),
  gateways: Flag.Int("gateways").pipe(
    Flag.withDescription("Keep sessions to this many gateways: fewer than --server gives keeps the rest as spares; more adds gateways of a cluster its gateways name (default: every --server)"),
    Flag.optional
  ),
  exitOnReject: Flag.Boolean("exit-on-reject").pipe(
    Flag.withDescription(`Exit with code ${RejectedExitCode} when a gateway refuses the token or the route for good, instead of retrying`),
    Flag.withDefault(false)
  ),
  ...adminFlags("client")
}

type Flags = {
  readonly [K in keyof typeof flags]: (typeof flags)[K] extends Flag.Flag<infer A> ? A : never
}

/** The flags given, as field overrides of the client's file. */
const flagOverrides = (f: Flags): Array<FlagValue> => {
  const out: Array<FlagValue> = []
  const add = (flag: string, field: string, value: Option.Option<string>) => {
    if (Option.isSome(value)) out.push({ path: [field], value: value.value, flag })
  }
  if (f.server.length > 0) out.push({ path: ["server"], value: f.server.join(","), flag: "--server" })
  add("--token", "token", Option.map(f.token, Redacted.value))
  add("--token-file", "token_file", f.tokenFile)
  add("--expose", "expose", f.expose)
  add("--port", "port", Option.map(f.port, String))
  add("--path", "path", f.path)
  if (f.stripPath) out.push({ path: ["strip_path"], value: "true", flag: "--strip-path" })
  add("--domain", "domain", f.domain)
  if (f.tcp) out.push({ path: ["tcp"], value: "true", flag: "--tcp" })
  add("--proxy-protocol", "proxy_protocol", f.proxyProtocol)
  add("--tls-cert", "tls_cert", f.tlsCert)
  add("--tls-key", "tls_key", f.tlsKey)
  if (f.tlsAcme) out.push({ path: ["tls_acme"], value: "true", flag: "--tls-acme" })
  add("--label", "label", f.label)
  add("--ca", "ca", f.ca)
  if (f.h2) out.push({ path: ["h2"], value: "true", flag: "--h2" })
  add("--gateways", "gateways", Option.map(f.gateways, String))
  if (f.exitOnReject) out.push({ path: ["exit_on_reject"], value: "true", flag: "--exit-on-reject" })
  out.push(...adminOverrides(f))
  return out
}

/** Shortest interval between two warnings about connections the local service failed (ms). */
export const LocalFailureLogIntervalMs = 10_000

/** How long a reload waits for a changed route to be bound before it gives up waiting (the old one is removed anyway). */
export const ReloadBindTimeout: Duration.Duration = Duration.seconds(10)

/** Settings a live client cannot change without new sessions: named in the reload log, applied on restart. */
const sessionSettingsChanged = (before: ClientFile, after: ClientFile): Array<string> => {
  const changed: Array<string> = []
  if ((before.server ?? DefaultServer) !== (after.server ?? DefaultServer)) changed.push("server")
  const tokenOf = (c: ClientFile) => c.token === undefined ? undefined : Redacted.value(c.token)
  if (tokenOf(before) !== tokenOf(after)) changed.push("token")
  if (before.label !== after.label) changed.push("label")
  if (before.ca !== after.ca) changed.push("ca")
  if ((before.h2 ?? false) !== (after.h2 ?? false)) changed.push("h2")
  return changed
}

export const clientCommand = Command.make("client", flags, Effect.fn(function*(f) {
  const load = loadConfig({ schema: ClientFile, file: Option.getOrUndefined(f.config), flags: flagOverrides(f) }).pipe(
    Effect.map((loaded) => loaded.config)
  )
  const config = yield* load.pipe(Effect.catch(refuseConfig("client")))
  const firstSpecs = specsOf(config)
  if (firstSpecs instanceof ConfigLoadError) return yield* refuseConfig("client")(firstSpecs)
  const token = config.token!
  const serverTexts = (config.server ?? DefaultServer).split(",").map((s) => s.trim()).filter((s) => s.length > 0)
  const servers = []
  const targets: Array<GatewayTarget> = []
  for (const text of serverTexts) {
    if (isWebSocketUrl(text)) {
      targets.push({ url: text, ...(config.ca === undefined ? {} : { ca: config.ca }) })
      continue
    }
    const parsed = parseGatewayAddress(text)
    if (parsed instanceof Error) return yield* refuseConfig("client")(new ConfigLoadError({ reason: "Invalid", source: "config", field: "server", message: `server: ${parsed.message}` }))
    servers.push(parsed)
    const { host, port } = parsed
    targets.push(parsed.tls ? { host, port, tls: { ca: config.ca } } : { host, port })
  }
  if (config.h2 === true && servers.length !== targets.length) {
    return yield* new AddressError({ reason: "Malformed", message: "--h2 needs host:port gateways; ws:// and wss:// are for control-port tunnels" })
  }
  const h2Expose = firstSpecs[0]!.expose
  if (config.h2 === true && firstSpecs.some((spec) => formatHostPort(spec.expose) !== formatHostPort(h2Expose))) {
    return yield* refuseConfig("client")(invalidField("routes", "with h2 every route goes to the same expose address (one HTTP service)"))
  }
  if (f.checkConfig) {
    yield* checkOperations(config.admin === undefined ? {} : { admin: config.admin }, "config", adminOverrides(f)).pipe(Effect.catch(refuseConfig("client")))
    yield* Console.log(`switchyard client: configuration OK${Option.isSome(f.config) ? ` (${f.config.value})` : ""}`)
    return
  }
  if (config.log !== undefined) yield* Logging.useInThisFiber({ format: config.log.format, level: config.log.level })
  const ops = { ...(config.admin === undefined ? {} : { admin: config.admin }) }
  const label = config.label
  const described = (specs: ReadonlyArray<ListenerSpec>) => specs.map((spec) => `${describeRoute(spec.route)} -> ${formatHostPort(spec.expose)}`).join(", ")
  if (config.h2 === true) {
    const exposed = yield* exposeOverReverseHttp2({ gateways: servers, target: h2Expose, token, routes: firstSpecs.map((spec) => spec.route), label, ca: config.ca })
    const h2Gateways = () => exposed.gateways()
    const up = () => h2Gateways().some((g) => g.connected > 0)
    const operations = yield* serveOperations({
      command: "client",
      ops,
      flags: adminOverrides(f),
      ready: up,
      sessions: () => [{ frontDoor: "reverse_h2", count: h2Gateways().reduce((n, g) => n + g.connected, 0) }],
      // the gateway answers the preamble only once it took the token and every route: a connection up
      // means the routes are bound there
      routes: () => {
        const gateways = h2Gateways()
        const bound = gateways.filter((g) => g.state === "connected").length
        const refused = gateways.find((g) => g.state === "rejected")
        const state = bound === gateways.length
          ? "bound"
          : bound > 0
          ? `bound on ${bound} of ${gateways.length}`
          : refused !== undefined
          ? `refused: ${refused.lastError ?? "by the gateway"}`
          : "pending"
        return firstSpecs.map((spec) => ({ route: describeRoute(spec.route), backends: [formatHostPort(spec.expose)], inFlight: 0, state }))
      },
      gateways: () =>
        h2Gateways().map((g) => ({
          gateway: g.gateway,
          state: g.state,
          since: g.since.toISOString(),
          attempts: g.failures,
          ...(g.lastError === undefined ? {} : { lastError: g.lastError })
        })),
      register: (metrics) =>
        registerGatewayGauges(metrics, "reverse_h2", () => h2Gateways().map((g) => ({ gateway: g.gateway, connected: g.connected > 0, attempts: g.failures, established: g.established })))
    })
    yield* onHangup(Effect.sync(() => {
      operations.metrics.reloads.labels("rejected").inc()
      operations.recordError("reload refused: a reverse-HTTP/2 client applies its configuration on restart")
    }).pipe(Effect.andThen(Effect.logWarning("reload refused: with h2 the client applies configuration changes on restart")), Effect.annotateLogs({ component: "client" })))
    yield* Console.log(
      `switchyard client: ${described(firstSpecs)} over reverse HTTP/2 on ${serverTexts.join(", ")} ` +
        `(connecting: each gateway's connections, refusals and losses are logged and in /status)`
    )
    return yield* Effect.never
  }
  // problems reach /status once it is up; with exit_on_reject a refusal for good ends the command
  const rejectedForGood = Deferred.makeUnsafe<never, GatewayRejected>()
  let recordError: (message: string) => void = () => {}
  const client = yield* TunnelClient.make({
    servers: targets,
    token,
    label,
    ...(config.gateways === undefined ? {} : { maxGateways: config.gateways }),
    // gateways a cluster names in its Welcome, read as --server would read them
    targetOf: (text) => {
      const parsed = parseGatewayAddress(text)
      if (parsed instanceof Error) return undefined
      return parsed.tls ? { host: parsed.host, port: parsed.port, tls: { ca: config.ca } } : { host: parsed.host, port: parsed.port }
    },
    onProblem: (problem) => {
      recordError(problem.message)
      if (problem.permanent && config.exit_on_reject === true) {
        Deferred.doneUnsafe(rejectedForGood, Effect.fail(new GatewayRejected({ message: problem.message })))
      }
    }
  })
  const gateways = () => client.status().map((g) => ({ gateway: describeTarget(g.address), connected: g.connected, attempts: g.attempts, established: g.established }))
  /** One route being served: its listener on the gateways and where its connections go now (a reload may change it). */
  interface Served {
    spec: ListenerSpec
    readonly scope: Scope.Closeable
    readonly listener: TunnelListener
    /** Connections from the gateways now piped to the local address. */
    inFlight: number
  }
  // every route served, in the order of the configuration
  let served: ReadonlyArray<Served> = []
  const operations = yield* serveOperations({
    command: "client",
    ops,
    flags: adminOverrides(f),
    ready: () => gateways().some((g) => g.connected),
    sessions: () => [{ frontDoor: "control", count: gateways().filter((g) => g.connected).length }],
    routes: () =>
      served.map((s) => ({
        route: describeRoute(s.spec.route),
        backends: [formatHostPort(s.spec.expose)],
        inFlight: s.inFlight,
        state: routeState(s.listener.status())
      })),
    gateways: () =>
      client.status().map((g) => ({
        gateway: describeTarget(g.address),
        state: g.state,
        since: g.since.toISOString(),
        attempts: g.attempts,
        ...(g.lastError === undefined ? {} : { lastError: g.lastError })
      })),
    register: (metrics) => {
      registerGatewayGauges(metrics, "control", gateways)
      metrics.registry.sampledGauge({
        name: "switchyard_client_routes",
        help: "The client's routes by where they stand on its gateways: bound on every gateway, partly bound, pending (no session or no answer yet), refused by a gateway.",
        labelNames: ["state"],
        collect: () => {
          const counts = { bound: 0, partly_bound: 0, pending: 0, refused: 0 }
          for (const s of served) {
            const states = s.listener.status()
            const bound = states.filter((g) => g.state === "bound").length
            if (bound === states.length) counts.bound++
            else if (bound > 0) counts.partly_bound++
            else if (states.some((g) => g.state === "refused")) counts.refused++
            else counts.pending++
          }
          return Object.entries(counts).map(([state, n]) => [[state], n] as const)
        }
      })
    }
  })
  recordError = operations.recordError
  for (const g of client.status()) if (g.lastError !== undefined) recordError(g.lastError)
  const commandScope = yield* Effect.scope
  // failures to reach a local service: one warning per interval, the rest counted into the next
  let lastLocalWarning = 0
  let localFailures = 0
  const logRun = Effect.runForkWith(yield* Effect.context<never>())
  /** Opens a listener for `spec` in its own scope, its connections piped to the spec's current expose address. */
  const openListener = (spec: ListenerSpec) =>
    Effect.gen(function*() {
      const scope = yield* Scope.fork(commandScope)
      // the consumer stops last, once the listener has been unbound and drained, so a connection the
      // gateway sends while the listener is being removed is still piped
      let consumer: Fiber.Fiber<void> | undefined
      yield* Scope.addFinalizer(scope, Effect.suspend(() => consumer === undefined ? Effect.void : Fiber.interrupt(consumer)))
      const listener = yield* client.listen(spec.route).pipe(Scope.provide(scope))
      const entry: Served = { spec, scope, listener, inFlight: 0 }
      consumer = yield* Stream.runForEach(listener.connections, ({ preamble, socket }) =>
        Effect.sync(() => {
          const { expose: target, proxyProtocol } = entry.spec
          entry.inFlight++
          let settled = false
          const settle = () => {
            if (!settled) (settled = true, entry.inFlight--)
          }
          const local = joinReading(socket, (onread) => net.createConnection({ host: target.host, port: target.port, allowHalfOpen: true, onread }), settle)
          // the public peer for the backend, ahead of the connection's own bytes
          if (proxyProtocol !== undefined && !local.destroyed) {
            local.write(encodeProxyHeader(proxyProtocol, {
              sourceAddress: preamble.remoteAddress,
              sourcePort: preamble.remotePort,
              destinationAddress: preamble.localAddress ?? "",
              destinationPort: preamble.localPort
            }))
          }
          local.on("error", (error) => {
            local.destroy()
            if (Date.now() - lastLocalWarning < LocalFailureLogIntervalMs) return void localFailures++
            lastLocalWarning = Date.now()
            const more = localFailures === 0 ? "" : ` (${localFailures} more since the last warning)`
            localFailures = 0
            logRun(Effect.logWarning(
              `local service ${formatHostPort(target)} failed a connection${preamble.remoteAddress ? ` from ${preamble.remoteAddress}` : ""}: ${error.message}${more}; ` +
                `the public caller gets an error: check that --expose is running there`
            ).pipe(Effect.annotateLogs({ component: "client" })))
          })
          socket.on("error", () => socket.destroy())
        })).pipe(Effect.forkIn(commandScope))
      return entry
    })
  const sameRoute = (a: ListenerSpec, b: ListenerSpec) => JSON.stringify(a.route) === JSON.stringify(b.route)
  served = yield* Effect.forEach(firstSpecs, openListener)
  yield* Console.log(
    `switchyard client: ${described(firstSpecs)} on ${targets.map(describeTarget).join(", ")} ` +
      `(connecting: each gateway's session, refusals and losses are logged and in /status)`
  )

  yield* onHangup(Effect.gen(function*() {
    const next = yield* load
    const specs = specsOf(next)
    if (specs instanceof ConfigLoadError) return yield* specs
    const notes: Array<string> = []
    // new and changed routes first, over the live sessions; the routes they replace go once they are bound
    const added = specs.filter((spec) => !served.some((s) => sameRoute(s.spec, spec)))
    const opened = yield* Effect.forEach(added, openListener)
    const bound = yield* Effect.forEach(
      opened,
      (entry) => entry.listener.bound.pipe(Effect.timeoutOption(ReloadBindTimeout), Effect.exit),
      { concurrency: "unbounded" }
    )
    const failedAt = bound.findIndex(Exit.isFailure)
    if (failedAt !== -1) {
      yield* Effect.forEach(opened, (entry) => Scope.close(entry.scope, Exit.void), { discard: true })
      const exit = bound[failedAt]!
      const failure = Exit.isFailure(exit) ? exit.cause.reasons.find((r) => r._tag === "Fail") : undefined
      return yield* new ConfigLoadError({
        reason: "Invalid",
        source: "config",
        field: next.routes === undefined ? "port" : "routes",
        message: `the gateway refused ${describeRoute(opened[failedAt]!.spec.route)}: ${failure?._tag === "Fail" ? failure.error.message : "interrupted"}`
      })
    }
    const removed = served.filter((s) => !specs.some((spec) => sameRoute(s.spec, spec)))
    served = specs.map((spec) => {
      const kept = served.find((s) => sameRoute(s.spec, spec))
      if (kept === undefined) return opened.find((o) => sameRoute(o.spec, spec))!
      if (formatHostPort(spec.expose) !== formatHostPort(kept.spec.expose)) {
        notes.push(`${describeRoute(spec.route)}: new connections go to ${formatHostPort(spec.expose)}`)
      }
      if (spec.proxyProtocol !== kept.spec.proxyProtocol) {
        notes.push(`${describeRoute(spec.route)}: new connections start with ${spec.proxyProtocol === undefined ? "no PROXY header" : `a PROXY ${spec.proxyProtocol} header`}`)
      }
      kept.spec = spec
      return kept
    })
    for (const entry of opened) notes.push(`now serving ${describeRoute(entry.spec.route)} -> ${formatHostPort(entry.spec.expose)}`)
    // a removed route drains in the background: the gateway routes no new work to it, work in flight finishes
    for (const entry of removed) {
      notes.push(`no longer serving ${describeRoute(entry.spec.route)}`)
      yield* Scope.close(entry.scope, Exit.void).pipe(Effect.forkIn(commandScope))
    }
    // compared with what the sessions started with: they keep it until a restart
    const restart = sessionSettingsChanged(config, next)
    operations.metrics.reloads.labels("applied").inc()
    yield* Effect.logInfo(`configuration reloaded${notes.length === 0 ? ": routes unchanged" : `: ${notes.join("; ")}`}`)
    if (restart.length > 0) {
      yield* Effect.logWarning(`configuration reloaded: ${restart.join(", ")} changed; the live sessions keep the old value (a reconnect needs a restart, which drains)`)
    }
  }).pipe(
    Effect.catch(reloadRefused(operations)),
    Effect.annotateLogs({ component: "client" })
  ))
  return yield* Deferred.await(rejectedForGood).pipe(
    Effect.tapError(() => Effect.logError(`exiting with code ${RejectedExitCode}: a gateway refused this client for good and exit_on_reject is set`))
  )
}, Effect.scoped, Effect.provide(NodeTransport.layer))).pipe(
  Command.withDescription("Expose a local service through a switchyard gateway's control port")
)
