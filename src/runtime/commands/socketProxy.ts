/**
 * `switchyard socket-proxy`: fronts a Unix-socket HTTP API (the Docker Engine API) with a deny-by-default
 * allowlist. Reads an optional YAML/JSON config file, merges flags over it, refuses to start on any
 * config error (naming the field and value), and runs until interrupted. SIGHUP reloads the rules.
 * The proxy itself and the YAML parser are loaded when the command runs, not when the command line is built.
 */
import { Console, Data, Effect, Option, Runtime } from "effect"
import { Command, Flag } from "effect/cli"
import * as fs from "node:fs"
import * as readline from "node:readline"
import { PRESETS } from "../../domain/AccessRule.ts"
import {
  BODY_ALLOW_FLAGS,
  ConfigError,
  decodeSocketProxyFile,
  resolveConfig,
  type SocketProxyConfig,
  type SocketProxyFile,
  DEFAULT_RULE_SET_NAME,
  type SocketProxyFlags
} from "../../domain/SocketProxyConfig.ts"
import { Learned, learnRules, MAX_LEARNED_REQUESTS, readLearnLog, renderLearnedRules } from "../../domain/RuleLearning.ts"
import { prepareOperations, registerSocketProxyCounters, reloadRefused, serveOperations } from "../Admin.ts"
import { splitOpsSections } from "../ConfigLoader.ts"
import { adminFlags, adminOverrides, checkConfigFlag } from "./sharedFlags.ts"

const repeated = (name: string, description: string) =>
  Flag.String(name).pipe(Flag.withDescription(description), Flag.atLeast(0))

const flags = {
  config: Flag.String("config").pipe(
    Flag.withDescription("YAML or JSON config file (flags override its upstream, listen and allow-from)"),
    Flag.optional
  ),
  upstream: Flag.String("upstream").pipe(
    Flag.withDescription("The API to front: unix:/path (default unix:/var/run/docker.sock) or host:port"),
    Flag.optional
  ),
  listen: repeated("listen", "Listen on host:port or unix:/path (repeatable; default 127.0.0.1:2375)"),
  allow: repeated("allow", "Allow rule, e.g. 'GET /containers/json' (repeatable)"),
  deny: repeated("deny", "Deny rule, checked before the allow rules (repeatable)"),
  preset: repeated("preset", `Rule preset (repeatable): ${Object.keys(PRESETS).join(", ")}`),
  allowFrom: repeated("allow-from", "TCP client address or CIDR allowed to connect (repeatable)"),
  name: Flag.String("name").pipe(Flag.withDescription("Rule set name shown in denials"), Flag.optional),
  bodyPolicy: Flag.String("body-policy").pipe(
    Flag.withDescription("on (default): check container, exec and service create bodies before forwarding; off: forward them unread"),
    Flag.optional
  ),
  bodyAllow: repeated("body-allow", `Turn a body-policy switch on (repeatable): ${Object.keys(BODY_ALLOW_FLAGS).join(", ")}`),
  allowCapability: repeated("allow-capability", "A capability create bodies may add, e.g. NET_ADMIN (repeatable)"),
  allowBindSource: repeated("allow-bind-source", "A host path (and everything under it) bind mounts may use (repeatable)"),
  containerLabel: Flag.String("container-label").pipe(
    Flag.withDescription("KEY=VALUE: only containers with this label are listed and reachable; creates through the proxy get it"),
    Flag.optional
  ),
  learn: Flag.Boolean("learn").pipe(
    Flag.withDescription("Learning mode: forward what the rules or body policy would refuse, and log each such request"),
    Flag.withDefault(false)
  ),
  checkConfig: checkConfigFlag,
  ...adminFlags("socket-proxy")
}

/** Reads and decodes the config file; errors name the file and field. */
const readConfigFile = (path: string): Effect.Effect<SocketProxyFile, ConfigError> =>
  Effect.flatMap(Effect.promise(() => import("yaml")), ({ parse: parseYaml }) => {
    let text: string
    try {
      text = fs.readFileSync(path, "utf8")
    } catch (e) {
      return Effect.fail(new ConfigError({ reason: "Unreadable", field: "--config", message: `--config: cannot read ${path}: ${(e as Error).message}` }))
    }
    let doc: unknown
    try {
      doc = path.endsWith(".json") ? JSON.parse(text) : parseYaml(text)
    } catch (e) {
      return Effect.fail(new ConfigError({ reason: "Invalid", field: "--config", message: `${path}: not valid ${path.endsWith(".json") ? "JSON" : "YAML"}: ${(e as Error).message}` }))
    }
    // the shared admin/log sections are read by the admin endpoint
    const decoded = decodeSocketProxyFile(splitOpsSections(doc ?? {}).rest ?? {})
    return decoded instanceof ConfigError
      ? Effect.fail(new ConfigError({ reason: decoded.reason, field: decoded.field, message: `${path}: ${decoded.message}` }))
      : Effect.succeed(decoded)
  })

/**
 * `switchyard socket-proxy rules --from-log FILE`: reads the log of a proxy in learning mode (logfmt or
 * JSON, `-` for stdin) and prints the smallest rule set, and the body-policy switches, that would have
 * allowed what it forwarded.
 */
const rulesCommand = Command.make("rules", {
  fromLog: Flag.String("from-log").pipe(Flag.withDescription("Log of a socket proxy in learning mode (- for stdin)")),
  name: Flag.String("name").pipe(Flag.withDescription("Only the requests of this rule set (default: each rule set in the log)"), Flag.optional)
}, Effect.fn(function*(f) {
  const byRuleSet = new Map<string, Learned>()
  const read = yield* Effect.tryPromise({
    try: async () => {
      const input = f.fromLog === "-" ? process.stdin : fs.createReadStream(f.fromLog, { encoding: "utf8" })
      const lines = readline.createInterface({ input, crlfDelay: Infinity })
      for await (const line of lines) {
        for (const record of readLearnLog(line)) {
          const name = record.ruleSet ?? DEFAULT_RULE_SET_NAME
          if (Option.isSome(f.name) && f.name.value !== name) continue
          const set = byRuleSet.get(name) ?? new Learned()
          set.add(record)
          byRuleSet.set(name, set)
        }
      }
    },
    catch: (e) => new ConfigError({ reason: "Unreadable", field: "--from-log", message: `--from-log: cannot read ${f.fromLog}: ${(e as Error).message}` })
  }).pipe(Effect.catch(refuse))
  void read
  if (byRuleSet.size === 0) byRuleSet.set(Option.getOrElse(f.name, () => DEFAULT_RULE_SET_NAME), new Learned())
  for (const [name, learned] of byRuleSet) {
    if (learned.dropped > 0) yield* Effect.logWarning(`rule set "${name}": ${learned.dropped} distinct requests past the first ${MAX_LEARNED_REQUESTS} were not read`)
    yield* Console.log(renderLearnedRules(learnRules(learned.values()), name).trimEnd())
  }
})).pipe(Command.withDescription("Print the rules that would have allowed what a proxy in learning mode logged"))

/** Exit code when the configuration is refused (sysexits' EX_CONFIG). */
export const CONFIG_ERROR_EXIT_CODE = 78

/** The process refused its configuration; the reason was already printed as one line. */
class ConfigRefused extends Data.TaggedError("ConfigRefused")<{ readonly message: string }> {
  override readonly [Runtime.errorReported] = false
  override readonly [Runtime.errorExitCode] = CONFIG_ERROR_EXIT_CODE
}

/** Prints a configuration error as one line on stderr and fails without a stack trace. */
const refuse = (e: ConfigError) =>
  Console.error(`switchyard socket-proxy: ${e.message}`).pipe(Effect.andThen(Effect.fail(new ConfigRefused({ message: e.message }))))

/** The parsed flags in the shape `resolveConfig` merges over the file. */
const flagValues = (f: {
  readonly upstream: Option.Option<string>
  readonly listen: ReadonlyArray<string>
  readonly allow: ReadonlyArray<string>
  readonly deny: ReadonlyArray<string>
  readonly preset: ReadonlyArray<string>
  readonly allowFrom: ReadonlyArray<string>
  readonly name: Option.Option<string>
  readonly bodyPolicy: Option.Option<string>
  readonly bodyAllow: ReadonlyArray<string>
  readonly allowCapability: ReadonlyArray<string>
  readonly allowBindSource: ReadonlyArray<string>
  readonly containerLabel: Option.Option<string>
  readonly learn: boolean
}): SocketProxyFlags => ({
  upstream: Option.getOrUndefined(f.upstream),
  listen: f.listen,
  allow: f.allow,
  deny: f.deny,
  presets: f.preset,
  allowFrom: f.allowFrom,
  name: Option.getOrUndefined(f.name),
  bodyPolicy: Option.getOrUndefined(f.bodyPolicy),
  bodyAllow: f.bodyAllow,
  allowCapability: f.allowCapability,
  allowBindSource: f.allowBindSource,
  containerLabel: Option.getOrUndefined(f.containerLabel),
  learn: f.learn
})

const describe = (config: SocketProxyConfig): string =>
  config.upstream._tag === "Unix" ? `unix:${config.upstream.path}` : `${config.upstream.host}:${config.upstream.port}`

const isLoopback = (host: string): boolean => host === "localhost" || host === "::1" || host.startsWith("127.")

export const socketProxyCommand = Command.make("socket-proxy", flags, Effect.fn(function*(f) {
  const file: SocketProxyFile = Option.isSome(f.config)
    ? yield* readConfigFile(f.config.value).pipe(Effect.catch(refuse))
    : {}
  const config = resolveConfig(file, flagValues(f))
  if (config instanceof ConfigError) return yield* refuse(config)
  for (const l of config.listen) {
    if (l._tag === "Tcp" && !isLoopback(l.host) && config.allowFrom === undefined) {
      yield* Effect.logWarning(`listening on ${l.host}:${l.port} without --allow-from: any host that can reach it may use the allowed API calls`)
    }
  }
  // the admin/log sections are checked before anything is bound
  const ops = yield* prepareOperations(Option.getOrUndefined(f.config), adminOverrides(f)).pipe(
    Effect.catch((e) => refuse(new ConfigError({ reason: "Invalid", field: e.field, message: e.message })))
  )
  if (f.checkConfig) {
    yield* Console.log(`switchyard socket-proxy: configuration OK${Option.isSome(f.config) ? ` (${f.config.value})` : ""}`)
    return
  }
  const { makeSocketProxy } = yield* Effect.promise(() => import("../../services/front/SocketProxy.ts"))
  const proxy = yield* makeSocketProxy(config)
  const operations = yield* serveOperations({
    command: "socket-proxy",
    ops,
    source: Option.getOrUndefined(f.config),
    flags: adminOverrides(f),
    ready: () => true,
    listeners: () =>
      proxy.listenerStats().map((l) => ({ name: config.groups !== undefined && config.groups.length > 1 ? `socket-proxy:${l.ruleSet}` : "socket-proxy", address: l.listener })),
    register: (metrics) => registerSocketProxyCounters(metrics, proxy.stats, proxy.listenerStats),
    pages: {
      "/learned-rules": () => {
        const learning = proxy.learned()
        return learning.length === 0
          ? "# no rule set is in learning mode\n"
          : learning.map((l) => renderLearnedRules(learnRules(l.requests), l.ruleSet)).join("\n")
      }
    }
  }).pipe(Effect.catchTag("ConfigLoadError", (e) => refuse(new ConfigError({ reason: "Invalid", field: e.field, message: e.message }))))
  // SIGHUP: re-read the config file and swap the rules; a bad file keeps the rules in force.
  const services = yield* Effect.context<never>()
  const reload = Effect.gen(function*() {
    const next = Option.isSome(f.config) ? yield* readConfigFile(f.config.value) : {}
    const resolved = resolveConfig(next, flagValues(f))
    if (resolved instanceof ConfigError) return yield* resolved
    const groups = resolved.groups ?? [resolved]
    if (groups.length !== (config.groups ?? [config]).length) {
      return yield* new ConfigError({ reason: "Invalid", field: "listeners", message: "listeners: the number of listener groups changes only on restart" })
    }
    for (const [i, group] of groups.entries()) yield* proxy.replaceRules(group.ruleSet, i)
    operations.metrics.reloads.labels("applied").inc()
    for (const group of groups) {
      yield* Effect.logInfo(`reloaded rule set "${group.ruleSet.name}" with ${group.ruleSet.rules.length} rules (listeners, upstream, limits, body policy, label scope and mode change only on restart)`)
    }
  }).pipe(Effect.catch(reloadRefused(operations, "previous rules stay in force")))
  const onHangup = () => void Effect.runForkWith(services)(reload)
  yield* Effect.acquireRelease(
    Effect.sync(() => process.on("SIGHUP", onHangup)),
    () => Effect.sync(() => process.off("SIGHUP", onHangup))
  )
  const where = proxy.addresses.map((a) => a._tag === "Unix" ? `unix:${a.path}` : `${a.host}:${a.port}`).join(", ")
  yield* Console.log(
    `switchyard socket-proxy: ${describe(config)} on ${where}; rule set "${config.ruleSet.name}" with ${config.ruleSet.rules.length} rules (deny by default)` +
      (config.containerLabel === undefined ? "" : `; label scope ${config.containerLabel.key}=${config.containerLabel.value}`) +
      (config.learn ? "; LEARNING MODE: nothing is refused by the rules or the body policy" : "")
  )
  return yield* Effect.never
}, Effect.scoped)).pipe(
  Command.withDescription("Front the Docker Engine API socket with an allowlist"),
  Command.withSubcommands([rulesCommand])
)
