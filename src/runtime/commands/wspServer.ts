/**
 * `switchyard wsp-server --config wsp_server.cfg`: a drop-in for root-gg/wsp's `wsp_server`. Reads
 * wsp's YAML config (refusing to start on any error, naming the field and value) and serves
 * `/register`, `/request` and `/status` until interrupted. It adds no other endpoints. With no
 * `secretkey`, `/register` is refused unless `--insecure-open-registration` (or the file's
 * `insecureopenregistration: true`) opens it, as wsp leaves it open. SIGHUP re-reads
 * the file and replaces `secretkey` and `requestkey` for new registrations and requests; the other
 * fields apply on restart.
 */
import * as fs from "node:fs"
import { Console, Effect, Redacted } from "effect"
import { Command, Flag } from "effect/cli"
import { parseWspServerConfig, WspConfigError } from "../../domain/WspConfig.ts"
import { makeWspServer } from "../../services/front/WspServer.ts"
import { prepareOperations, registerClientLimitCounters, registerPoolGauges, reloadRefused, serveOperations } from "../Admin.ts"
import { onHangup } from "../Lifecycle.ts"
import { adminFlags, adminOverrides, checkConfigFlag } from "./sharedFlags.ts"

const config = Flag.String("config").pipe(
  Flag.withDescription("wsp server YAML config file (wsp_server.cfg)"),
  Flag.withDefault("wsp_server.cfg")
)

const insecureOpenRegistration = Flag.Boolean("insecure-open-registration").pipe(
  Flag.withDescription(
    "Accept /register from any wsp client when no secretkey is set (wsp's behaviour): whoever reaches the port then receives /request traffic"
  ),
  Flag.withDefault(false)
)

/** Reads a config file; a missing or unreadable file is an error naming the path. */
export const readConfigText = (path: string): Effect.Effect<string, WspConfigError> =>
  Effect.try({
    try: () => fs.readFileSync(path, "utf8"),
    catch: (e) =>
      new WspConfigError({ reason: "InvalidYaml", field: "--config", value: path, message: `cannot read ${path}: ${(e as Error).message}` })
  })

const flags = { config, insecureOpenRegistration, checkConfig: checkConfigFlag, ...adminFlags("wsp-server") }

export const wspServerCommand = Command.make("wsp-server", flags, Effect.fn(function*(f) {
  const { config, insecureOpenRegistration } = f
  const read = parseWspServerConfig(yield* readConfigText(config))
  if (read instanceof WspConfigError) return yield* read
  const parsed = { ...read, config: { ...read.config, openRegistration: read.config.openRegistration || insecureOpenRegistration } }
  for (const key of parsed.unknownKeys) {
    // admin and log are switchyard's shared sections, read below
    if (key !== "admin" && key !== "log") yield* Effect.logWarning(`${config}: unknown key "${key}" ignored`)
  }
  const ops = yield* prepareOperations(config, adminOverrides(f))
  if (f.checkConfig) {
    yield* Console.log(`switchyard wsp-server: configuration OK (${config})`)
    return
  }
  if (Redacted.value(parsed.config.secretKey) === "") {
    if (parsed.config.openRegistration) {
      yield* Effect.logWarning(
        "wsp-server: INSECURE: no secretkey and open registration, so anyone who reaches /register receives a share of /request traffic; " +
          "set secretkey (and the same in every wsp_client.cfg) and drop --insecure-open-registration / insecureopenregistration"
      )
    } else {
      yield* Effect.logError(
        "wsp-server: no secretkey is configured, so /register refuses every wsp client (403); " +
          "set secretkey in the server's and the clients' files, or pass --insecure-open-registration to accept any client as wsp does"
      )
    }
  }
  if (parsed.config.host !== "127.0.0.1" && parsed.config.host !== "localhost" && parsed.config.requestKey === undefined) {
    yield* Effect.logWarning(`wsp-server: /request on ${parsed.config.host} needs no credential; set requestkey to require one`)
  }
  const server = yield* makeWspServer(parsed.config)
  const operations = yield* serveOperations({
    command: "wsp-server",
    ops,
    source: config,
    flags: adminOverrides(f),
    ready: () => true,
    listeners: () => [{ name: "wsp", address: `${server.address.host}:${server.address.port}` }],
    sessions: () => [{ frontDoor: "wsp", count: server.stats().idle + server.stats().busy }],
    register: (metrics) => {
      registerPoolGauges(metrics, server.stats, server.rejected, server.refusals, server.failures)
      registerClientLimitCounters(metrics, "wsp", server.clientLimited)
    }
  })
  yield* onHangup(Effect.gen(function*() {
    const next = parseWspServerConfig(yield* readConfigText(config))
    if (next instanceof WspConfigError) return yield* next
    yield* server.replaceCredentials({ secretKey: next.config.secretKey, requestKey: next.config.requestKey })
    if (Redacted.value(next.config.secretKey) === "" && !parsed.config.openRegistration) {
      yield* Effect.logError("wsp-server: the reloaded file has no secretkey, so /register now refuses every wsp client (403); set secretkey")
    }
    operations.metrics.reloads.labels("applied").inc()
    const restart = ([
      "host",
      "port",
      "timeout",
      "idleTimeout",
      "responseTimeout",
      "maxPools",
      "maxConnectionsPerPool",
      "maxConcurrentRequests",
      "maxHeaders"
    ] as const)
      .filter((field) => String(next.config[field]) !== String(parsed.config[field]))
    yield* Effect.logInfo(
      `configuration reloaded: secretkey and requestkey apply to new registrations and requests` +
        (restart.length === 0 ? "" : `; ${restart.join(", ")} changed and apply on restart`)
    )
  }).pipe(
    Effect.catch(reloadRefused(operations)),
    Effect.annotateLogs({ component: "wsp-server" })
  ))
  yield* Console.log(`switchyard wsp-server listening on http://${server.address.host}:${server.address.port} (/register, /request, /status)`)
  return yield* Effect.never
}, Effect.scoped)).pipe(Command.withDescription("Run a wsp-compatible WebSocket tunnel server (reads wsp_server.cfg)"))
