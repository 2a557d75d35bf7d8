/**
 * `switchyard wsp-server --config wsp_server.cfg`: a drop-in for root-gg/wsp's `wsp_server`. Reads
 * wsp's YAML config (refusing to start on any error, naming the field and value) and serves
 * `/register`, `/request` and `/status` until interrupted. It adds no other endpoints. SIGHUP re-reads
 * the file and replaces `secretkey` and `requestkey` for new registrations and requests; the other
 * fields apply on restart.
 */
import * as fs from "node:fs"
import { Console, Effect, Redacted } from "effect"
import { Command, Flag } from "effect/cli"
import { parseWspServerConfig, WspConfigError } from "../../domain/WspConfig.ts"
import { makeWspServer } from "../../services/front/WspServer.ts"
import { prepareOperations, registerPoolGauges, reloadRefused, serveOperations } from "../Admin.ts"
import { onHangup } from "../Lifecycle.ts"

const config = Flag.String("config").pipe(
  Flag.withDescription("wsp server YAML config file (wsp_server.cfg)"),
  Flag.withDefault("wsp_server.cfg")
)

/** Reads a config file; a missing or unreadable file is an error naming the path. */
export const readConfigText = (path: string): Effect.Effect<string, WspConfigError> =>
  Effect.try({
    try: () => fs.readFileSync(path, "utf8"),
    catch: (e) =>
      new WspConfigError({ reason: "InvalidYaml", field: "--config", value: path, message: `cannot read ${path}: ${(e as Error).message}` })
  })

export const wspServerCommand = Command.make("wsp-server", { config }, Effect.fn(function*({ config }) {
  const parsed = parseWspServerConfig(yield* readConfigText(config))
  if (parsed instanceof WspConfigError) return yield* parsed
  for (const key of parsed.unknownKeys) {
    // admin and log are switchyard's shared sections, read below
    if (key !== "admin" && key !== "log") yield* Effect.logWarning(`${config}: unknown key "${key}" ignored`)
  }
  const ops = yield* prepareOperations(config)
  if (Redacted.value(parsed.config.secretKey) === "") {
    yield* Effect.logWarning("wsp-server: secretkey is empty, so any wsp client may register and receive requests (wsp's behaviour); set secretkey")
  }
  if (parsed.config.host !== "127.0.0.1" && parsed.config.host !== "localhost" && parsed.config.requestKey === undefined) {
    yield* Effect.logWarning(`wsp-server: /request on ${parsed.config.host} needs no credential; set requestkey to require one`)
  }
  const server = yield* makeWspServer(parsed.config)
  const operations = yield* serveOperations({
    command: "wsp-server",
    ops,
    source: config,
    ready: () => true,
    listeners: () => [{ name: "wsp", address: `${server.address.host}:${server.address.port}` }],
    sessions: () => [{ frontDoor: "wsp", count: server.stats().idle + server.stats().busy }],
    register: (metrics) => registerPoolGauges(metrics, server.stats, server.rejected, server.refusals)
  })
  yield* onHangup(Effect.gen(function*() {
    const next = parseWspServerConfig(yield* readConfigText(config))
    if (next instanceof WspConfigError) return yield* next
    yield* server.replaceCredentials({ secretKey: next.config.secretKey, requestKey: next.config.requestKey })
    operations.metrics.reloads.labels("applied").inc()
    const restart = (["host", "port", "timeout", "idleTimeout", "maxPools", "maxConnectionsPerPool", "maxConcurrentRequests", "maxHeaders"] as const)
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
