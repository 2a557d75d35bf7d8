/**
 * `switchyard server`: the gateway's command. Reads its flags, loads the configuration (file,
 * `SWITCHYARD_...`, flags), checks it (`--check-config` stops there), then runs the gateway
 * (`runGateway`) until SIGTERM/SIGINT, which drains, and prints where it listens and how a backend
 * dials it. What the configuration means is `ServerConfig`'s; what runs is `runGateway`'s.
 */
import { Console, Data, Deferred, Effect, Option, Redacted, Runtime } from "effect"
import { Command, Flag } from "effect/cli"
import type { TokenGrant } from "../../domain/TokenPolicy.ts"
import { ConfigLoadError, type ConfigRefused, type FlagValue, loadConfig, refuseConfig, ServerFile } from "../ConfigLoader.ts"
import * as Logging from "../Logging.ts"
import { formatHostPort } from "../NetAddress.ts"
import { type GatewayHandle, runGateway } from "../server/runGateway.ts"
import { checkServerFile, DefaultPublicHost, grantsOf } from "../server/ServerConfig.ts"
import { adminFlags, checkConfigFlag } from "./sharedFlags.ts"

// The benchmarks build a gateway from these.
export { dispatchObserver, requestInstruments } from "../server/GatewayInstruments.ts"

/** The gateway could not start (a port in use...); the reason was already printed as one line. */
export class StartFailed extends Data.TaggedError("StartFailed")<{ readonly message: string }> {
  override readonly [Runtime.errorReported] = false
}

const optionalString = (name: string, description: string) => Flag.String(name).pipe(Flag.withDescription(description), Flag.optional)

const flags = {
  config: optionalString("config", "YAML or JSON config file (see docs/OPERATIONS.md)"),
  checkConfig: checkConfigFlag,
  set: Flag.String("set").pipe(Flag.withDescription("Override a field: path=value, e.g. control.max_sessions=100 (repeatable)"), Flag.atLeast(0)),
  control: optionalString("control", "Control port address (default 127.0.0.1:9999)"),
  token: Flag.Redacted("token").pipe(Flag.withDescription("A token allowed every port (or SWITCHYARD_TOKEN; prefer --token-file)"), Flag.optional),
  tokenFile: optionalString("token-file", "File holding a token allowed every port (control.token_file, SWITCHYARD_TOKEN_FILE)"),
  publicHost: optionalString("public-host", "Address public ports bind to (default 127.0.0.1)"),
  reverseH2: optionalString("reverse-h2", "Serve the reverse-HTTP/2 tunnel port on this address"),
  wsListen: optionalString("ws-listen", "Serve the control port as a WebSocket path (/tunnel) on this address too"),
  acmeDirectory: optionalString("acme-directory", "ACME directory URL: obtain certificates for TLS routes registered with --tls-acme (acme.directory)"),
  acmeEmail: optionalString("acme-email", "Contact address of the ACME account (acme.email)"),
  acmeCa: optionalString("acme-ca", "File of PEM CA certificate(s) trusted for the ACME directory's HTTPS besides the system's (acme.ca_file)"),
  clusterRedis: optionalString("cluster-redis", "Join a cluster whose route leases are in this Redis (redis://host:port; cluster.redis; needs SWITCHYARD_CLUSTER_SECRET)"),
  clusterNode: optionalString("cluster-node", "This gateway's name in the cluster (cluster.node)"),
  clusterAdvertise: optionalString("cluster-advertise", "Address of this gateway's relay link as the other gateways dial it, host:port (cluster.advertise)"),
  shutdownDelay: optionalString(
    "shutdown-delay",
    "On SIGTERM, keep serving this long with /readyz answering 503 before the ports close: 5s, 500ms or milliseconds (default 5s; shutdown_delay_ms)"
  ),
  ...adminFlags("server")
}

type Flags = {
  readonly [K in keyof typeof flags]: (typeof flags)[K] extends Flag.Flag<infer A> ? A : never
}

/** `5s`, `500ms` or a bare number of milliseconds, in milliseconds; undefined when it reads as none of them. */
export const durationMs = (text: string): number | undefined => {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$/.exec(text)
  if (m === null) return undefined
  return Math.round(Number(m[1]) * (m[2] === "s" ? 1000 : 1))
}

/**
 * Completes on SIGINT (an operator at a terminal) or on a second SIGTERM, so neither waits out the shutdown
 * delay; the listeners go when the scope closes. The runtime's own handlers still start the stop.
 */
const delaySkippedBySignal = Effect.gen(function*() {
  const skip = Deferred.makeUnsafe<void>()
  let terms = 0
  const onInterrupt = () => void Deferred.doneUnsafe(skip, Effect.void)
  const onTerm = () => {
    terms++
    if (terms > 1) Deferred.doneUnsafe(skip, Effect.void)
  }
  yield* Effect.acquireRelease(
    Effect.sync(() => {
      // ahead of the runtime's own handlers, which start the stop: the stop then sees the signal
      process.prependListener("SIGINT", onInterrupt)
      process.prependListener("SIGTERM", onTerm)
    }),
    () => Effect.sync(() => {
      process.off("SIGINT", onInterrupt)
      process.off("SIGTERM", onTerm)
    })
  )
  return skip
})

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
  add("--token-file", ["control", "token_file"], f.tokenFile)
  add("--public-host", ["public_host"], f.publicHost)
  add("--reverse-h2", ["reverse_h2", "address"], f.reverseH2)
  if (Option.isSome(f.reverseH2)) out.push({ path: ["reverse_h2", "enabled"], value: "true", flag: "--reverse-h2" })
  add("--ws-listen", ["control", "websocket", "address"], f.wsListen)
  if (Option.isSome(f.wsListen)) out.push({ path: ["control", "websocket", "enabled"], value: "true", flag: "--ws-listen" })
  add("--acme-directory", ["acme", "directory"], f.acmeDirectory)
  add("--acme-email", ["acme", "email"], f.acmeEmail)
  add("--acme-ca", ["acme", "ca_file"], f.acmeCa)
  add("--cluster-redis", ["cluster", "redis"], f.clusterRedis)
  add("--cluster-node", ["cluster", "node"], f.clusterNode)
  add("--cluster-advertise", ["cluster", "advertise"], f.clusterAdvertise)
  if (Option.isSome(f.shutdownDelay)) {
    const ms = durationMs(f.shutdownDelay.value)
    if (ms === undefined) {
      return new ConfigLoadError({
        reason: "Invalid",
        source: "--shutdown-delay",
        field: "shutdown_delay_ms",
        message: `--shutdown-delay: expected a duration such as 5s, 500ms or 5000 (milliseconds), got "${f.shutdownDelay.value}"`
      })
    }
    out.push({ path: ["shutdown_delay_ms"], value: String(ms), flag: "--shutdown-delay" })
  }
  add("--admin", ["admin", "address"], f.admin)
  if (f.noAdmin) out.push({ path: ["admin", "enabled"], value: "false", flag: "--no-admin" })
  return out
}

/** The control port as a client names it: `tls://host:port` when it is served over TLS. */
const controlText = (handle: GatewayHandle, file: ServerFile): string =>
  `${file.control?.tls_cert === undefined ? "" : "tls://"}${formatHostPort(handle.control)}`

/**
 * How to run the command on this machine: `switchyard` from an installed package (its bundle), `npx
 * switchyard` from a checkout's sources (whose command is not on PATH).
 */
const clientCommand = import.meta.url.endsWith(".ts") ? "npx switchyard" : "switchyard"

const clientLine = (handle: GatewayHandle, file: ServerFile): string => {
  const token = handle.generatedTokenFile === undefined ? "SWITCHYARD_TOKEN=<your token>" : `SWITCHYARD_TOKEN="$(cat ${handle.generatedTokenFile})"`
  // a certificate no public CA signed is trusted with --ca (the certificate's own file will do)
  const ca = file.control?.tls_cert === undefined ? "" : " --ca <its CA or certificate file>"
  return `${token} ${clientCommand} client --server ${controlText(handle, file)}${ca} --expose 127.0.0.1:3000 --port 8000`
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
    const skipShutdownDelay = yield* delaySkippedBySignal
    const handle = yield* runGateway(file, { reload: load, skipShutdownDelay }).pipe(
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
      `  public ports bind to ${file.public_host ?? DefaultPublicHost}`,
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
