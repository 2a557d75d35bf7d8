/**
 * `switchyard wsp-client --config wsp_client.cfg`: a drop-in for root-gg/wsp's `wsp_client`. Reads
 * wsp's YAML config, keeps connection pools to every target and performs the requests they carry,
 * checked against the configured rules, until interrupted. SIGHUP re-reads the file and swaps the
 * destination rules (`whitelist`, `blacklist`) for the next requests; the other fields apply on restart.
 */
import { randomUUID } from "node:crypto"
import { Console, Effect, Redacted } from "effect"
import { Command, Flag } from "effect/cli"
import { parseWspClientConfig, WspConfigError } from "../../domain/WspConfig.ts"
import { makeWspClient } from "../../services/client/WspClient.ts"
import { prepareOperations, registerGatewayGauges, reloadRefused, serveOperations } from "../Admin.ts"
import { onHangup } from "../Lifecycle.ts"
import { adminFlags, adminOverrides, checkConfigFlag } from "./sharedFlags.ts"
import { readConfigText } from "./wspServer.ts"

const config = Flag.String("config").pipe(
  Flag.withDescription("wsp client YAML config file (wsp_client.cfg)"),
  Flag.withDefault("wsp_client.cfg")
)

const flags = { config, checkConfig: checkConfigFlag, ...adminFlags("wsp-client") }

export const wspClientCommand = Command.make("wsp-client", flags, Effect.fn(function*(f) {
  const { config } = f
  const parsed = parseWspClientConfig(yield* readConfigText(config), randomUUID)
  if (parsed instanceof WspConfigError) return yield* parsed
  for (const key of parsed.unknownKeys) {
    // admin and log are switchyard's shared sections, read below
    if (key !== "admin" && key !== "log") yield* Effect.logWarning(`${config}: unknown key "${key}" ignored`)
  }
  const ops = yield* prepareOperations(config, adminOverrides(f))
  if (f.checkConfig) {
    yield* Console.log(`switchyard wsp-client: configuration OK (${config})`)
    return
  }
  const client = yield* makeWspClient(parsed.config)
  const operations = yield* serveOperations({
    command: "wsp-client",
    ops,
    source: config,
    flags: adminOverrides(f),
    ready: () => client.stats().some((t) => t.total > t.connecting),
    sessions: () => [{ frontDoor: "wsp", count: client.stats().reduce((n, t) => n + t.total - t.connecting, 0) }],
    register: (metrics) =>
      registerGatewayGauges(metrics, "wsp", () =>
        client.stats().map((t) => ({
          gateway: t.target,
          connected: t.total > t.connecting,
          attempts: t.failedAttempts,
          // the gauge counts sessions after the first as reconnects; a pool counts its replacements
          established: t.reconnects + 1
        }))
      )
  })
  yield* onHangup(Effect.gen(function*() {
    const next = parseWspClientConfig(yield* readConfigText(config), () => parsed.config.id)
    if (next instanceof WspConfigError) return yield* next
    yield* client.replaceRules(next.config.rules)
    operations.metrics.reloads.labels("applied").inc()
    const restart = (["id", "targets", "poolIdleSize", "poolMaxSize", "secretKey"] as const).filter((field) =>
      field === "secretKey"
        ? Redacted.value(next.config.secretKey) !== Redacted.value(parsed.config.secretKey)
        : JSON.stringify(next.config[field]) !== JSON.stringify(parsed.config[field])
    )
    yield* Effect.logInfo(
      `configuration reloaded: destination rules swapped for the next requests` +
        (restart.length === 0 ? "" : `; ${restart.join(", ")} changed and apply on restart (the live connections stay)`)
    )
  }).pipe(
    Effect.catch(reloadRefused(operations)),
    Effect.annotateLogs({ component: "wsp-client" })
  ))
  yield* Console.log(`switchyard wsp-client ${parsed.config.id} connecting to ${parsed.config.targets.join(", ")}`)
  return yield* Effect.never
}, Effect.scoped)).pipe(Command.withDescription("Run a wsp-compatible WebSocket tunnel client (reads wsp_client.cfg)"))
