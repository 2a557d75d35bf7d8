/**
 * The socket proxy's configuration: the Schema of its YAML/JSON file, the defaults, and resolution into
 * compiled rules and parsed addresses. Every error names the field and the bad value. Pure: reading the
 * file and merging command-line flags happen in the runtime.
 */
import { Result, Schema, SchemaIssue } from "effect"
import { type AccessRule, parseRule, presetRules, RuleSyntaxError, type RuleSet } from "./AccessRule.ts"
import { type BodyPolicy, DEFAULT_BODY_POLICY, normalizeHostPath } from "./BodyPolicy.ts"
import { type ClientAllowlist, parseAllowlist } from "./ClientAllowlist.ts"
import { type ContainerLabel, parseContainerLabel } from "./LabelScope.ts"
import {
  DEFAULT_MIN_REQUEST_BODY_BYTES_PER_SECOND,
  DEFAULT_MIN_RESPONSE_BYTES_PER_SECOND,
  DEFAULT_REQUEST_BODY_GRACE_PERIOD_MS,
  DEFAULT_RESPONSE_GRACE_PERIOD_MS,
  DEFAULT_UPSTREAM_SLOT_WAIT_MS,
  slotsPerClient
} from "./ClientLimits.ts"
import type { ForwardedMode } from "./HttpHeaders.ts"

/** Defaults an operator can rely on; each is a config field under `limits`. */
export const SOCKET_PROXY_DEFAULTS = {
  /** Largest request head accepted from a client (bytes); larger gets 431. */
  maxHeaderSize: 16 * 1024,
  /** Most request headers accepted from a client. */
  maxHeadersCount: 100,
  /** Time allowed to receive a request head (ms). */
  headersTimeoutMs: 30_000,
  /** Time allowed to receive a whole request, body included (ms); 0 = none (large build contexts). */
  requestTimeoutMs: 0,
  /** Idle keep-alive time of a client connection between requests (ms). */
  keepAliveTimeoutMs: 5_000,
  /** No bytes either way for this long before the upstream's response head (ms) is a 504. */
  responseTimeoutMs: 300_000,
  /** Idle limit on a response or hijacked stream with no bytes either way (ms); 0 = none. */
  idleTimeoutMs: 0,
  /**
   * Most client connections open at once (per listener); when full, the oldest connection that has sent
   * nothing is closed to admit a new one, and with none such the new one is closed on arrival.
   */
  maxConnections: 1024,
  /** Most client connections from one TCP address at once (per listener); Unix-socket clients share `maxConnections`. */
  maxConnectionsPerAddress: 256,
  /** Time a client connection may stay without sending a byte (ms); 0 = none. */
  silentTimeoutMs: 10_000,
  /** Most pooled upstream connections in use at once; further requests wait for one. */
  maxSockets: 256,
  /** Most idle pooled upstream connections kept. */
  maxFreeSockets: 32,
  /** On shutdown, time requests in flight get to finish before their connections are closed (ms). */
  drainTimeoutMs: 5_000,
  /** Least average request-body rate after the grace period (bytes/s); slower gets 408 and a close. 0 = none. */
  minRequestBodyBytesPerSecond: DEFAULT_MIN_REQUEST_BODY_BYTES_PER_SECOND,
  /** Time a request body has, while switchyard reads it, before its rate is checked (ms). */
  requestBodyGracePeriodMs: DEFAULT_REQUEST_BODY_GRACE_PERIOD_MS,
  /** Least rate at which a client takes response bytes queued for it (bytes/s); slower is closed. 0 = none. */
  minResponseBytesPerSecond: DEFAULT_MIN_RESPONSE_BYTES_PER_SECOND,
  /** Time added to each wait for a client to take queued response bytes (ms). */
  responseGracePeriodMs: DEFAULT_RESPONSE_GRACE_PERIOD_MS,
  /**
   * Most pooled upstream connections one TCP client address holds at once; 0 = no cap. When not set:
   * a quarter of `maxSockets` (64 with the default pool). Unix-socket clients are not capped.
   */
  maxUpstreamSlotsPerClient: 64,
  /** Time a request waits for a pooled upstream connection before a 503 (ms); 0 = no bound. */
  upstreamSlotWaitMs: DEFAULT_UPSTREAM_SLOT_WAIT_MS
} as const

const Limits = Schema.Struct({
  maxHeaderSize: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 1024, maximum: 1024 * 1024 }))),
  maxHeadersCount: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 10_000 }))),
  headersTimeoutMs: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 3_600_000 }))),
  requestTimeoutMs: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 86_400_000 }))),
  keepAliveTimeoutMs: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 3_600_000 }))),
  responseTimeoutMs: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 86_400_000 }))),
  idleTimeoutMs: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 86_400_000 }))),
  maxConnections: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 }))),
  maxConnectionsPerAddress: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 }))),
  silentTimeoutMs: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 3_600_000 }))),
  maxSockets: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 65_536 }))),
  maxFreeSockets: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 65_536 }))),
  drainTimeoutMs: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 3_600_000 }))),
  minRequestBodyBytesPerSecond: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 1_000_000_000 }))),
  requestBodyGracePeriodMs: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 3_600_000 }))),
  minResponseBytesPerSecond: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 1_000_000_000 }))),
  responseGracePeriodMs: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 3_600_000 }))),
  maxUpstreamSlotsPerClient: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 65_536 }))),
  upstreamSlotWaitMs: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 3_600_000 })))
})

const ListenEntry = Schema.Union([
  Schema.String,
  Schema.Struct({
    address: Schema.String,
    /** Unix sockets only: file mode as an octal string, e.g. "0660". */
    mode: Schema.optionalKey(Schema.String),
    /** Unix sockets only: owner as numeric `uid` or `uid:gid`. */
    owner: Schema.optionalKey(Schema.String)
  })
])

const RuleEntry = Schema.Union([
  Schema.String,
  Schema.Struct({ preset: Schema.String }),
  Schema.Struct({ allow: Schema.String, idleTimeoutMs: Schema.optionalKey(Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))) }),
  Schema.Struct({ deny: Schema.String })
])

/** The request-body policy's switches (see `BodyPolicy`); each `allow...` is off by default. */
const BodyPolicySection = Schema.Struct({
  enabled: Schema.optionalKey(Schema.Boolean),
  maxBodyBytes: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 1024, maximum: 64 * 1024 * 1024 }))),
  allowPrivileged: Schema.optionalKey(Schema.Boolean),
  allowHostNamespaces: Schema.optionalKey(Schema.Boolean),
  allowNamespaceJoins: Schema.optionalKey(Schema.Boolean),
  allowCapabilities: Schema.optionalKey(Schema.Array(Schema.String)),
  allowDevices: Schema.optionalKey(Schema.Boolean),
  allowUnconfined: Schema.optionalKey(Schema.Boolean),
  allowSysctls: Schema.optionalKey(Schema.Boolean),
  allowVolumesFrom: Schema.optionalKey(Schema.Boolean),
  allowBindSources: Schema.optionalKey(Schema.Array(Schema.String))
})

/** The body-policy switches `--body-allow` turns on, by flag value. */
export const BODY_ALLOW_FLAGS = {
  privileged: "allowPrivileged",
  "host-namespaces": "allowHostNamespaces",
  "namespace-joins": "allowNamespaceJoins",
  devices: "allowDevices",
  unconfined: "allowUnconfined",
  sysctls: "allowSysctls",
  "volumes-from": "allowVolumesFrom"
} as const

/** One listener group of a file with `listeners`: its sockets, and the rule set they are served by. */
const ListenerSection = Schema.Struct({
  /** Rule set name shown in denials, logs and metrics (unique). */
  name: Schema.String,
  listen: Schema.Array(ListenEntry),
  allowFrom: Schema.optionalKey(Schema.Array(Schema.String)),
  rules: Schema.optionalKey(Schema.Array(RuleEntry)),
  logAllowed: Schema.optionalKey(Schema.Boolean),
  bodyPolicy: Schema.optionalKey(BodyPolicySection),
  container_label: Schema.optionalKey(Schema.String),
  mode: Schema.optionalKey(Schema.Literals(["enforce", "learn"]))
})

/** Most listeners (addresses, over all listener groups) one proxy serves: each is a label value in metrics. */
export const MAX_LISTENERS = 64

/** The file format (YAML or JSON). */
export const SocketProxyFile = Schema.Struct({
  /** `unix:/var/run/docker.sock` (default) or `host:port`. */
  upstream: Schema.optionalKey(Schema.String),
  /** Rule set name shown in denials and logs. */
  name: Schema.optionalKey(Schema.String),
  listen: Schema.optionalKey(Schema.Array(ListenEntry)),
  /** TCP client addresses/CIDR blocks allowed to connect (default: everyone who can reach the listener). */
  allowFrom: Schema.optionalKey(Schema.Array(Schema.String)),
  rules: Schema.optionalKey(Schema.Array(RuleEntry)),
  forwardedHeaders: Schema.optionalKey(Schema.Literals(["off", "replace", "append"])),
  /** Log allowed requests too (denials are always logged). */
  logAllowed: Schema.optionalKey(Schema.Boolean),
  limits: Schema.optionalKey(Limits),
  /** Checks on container, exec and service create bodies (on by default). */
  bodyPolicy: Schema.optionalKey(BodyPolicySection),
  /** `KEY=VALUE`: only containers with this label are listed and reachable; creates get it. */
  container_label: Schema.optionalKey(Schema.String),
  /** `enforce` (default) or `learn`: nothing denied by the rules or body checks, each would-be denial logged. */
  mode: Schema.optionalKey(Schema.Literals(["enforce", "learn"])),
  /** Several listener groups, each with its own sockets, rules, body policy and label scope (instead of the top-level ones). */
  listeners: Schema.optionalKey(Schema.Array(ListenerSection))
})
export type SocketProxyFile = typeof SocketProxyFile.Type

export type ListenAddress =
  | { readonly _tag: "Tcp"; readonly host: string; readonly port: number }
  | {
    readonly _tag: "Unix"
    readonly path: string
    readonly mode: number | undefined
    /** Owner set on the socket file after binding. */
    readonly owner?: { readonly uid: number; readonly gid: number | undefined } | undefined
  }

export type UpstreamAddress =
  | { readonly _tag: "Unix"; readonly path: string }
  | { readonly _tag: "Tcp"; readonly host: string; readonly port: number }

export type Limits = { readonly [K in keyof typeof SOCKET_PROXY_DEFAULTS]: number }

/** A validated, compiled configuration: one listener group (its sockets and rule set) and what all groups share. */
export interface SocketProxyConfig {
  readonly upstream: UpstreamAddress
  readonly listen: ReadonlyArray<ListenAddress>
  readonly allowFrom: ClientAllowlist | undefined
  readonly ruleSet: RuleSet
  readonly forwardedHeaders: ForwardedMode
  readonly logAllowed: boolean
  readonly limits: Limits
  readonly bodyPolicy: BodyPolicy
  /** The label scope, when set: containers without this label are invisible through the proxy. */
  readonly containerLabel: ContainerLabel | undefined
  /** Learning mode: requests the rules or the body policy would refuse are forwarded and logged. */
  readonly learn: boolean
  /**
   * Every listener group the proxy serves (this one first): one for a file without `listeners`. The
   * groups share the upstream, limits and forwarded headers.
   */
  readonly groups?: ReadonlyArray<SocketProxyConfig> | undefined
}

export class ConfigError extends Schema.TaggedError<ConfigError>()("ConfigError", {
  reason: Schema.Literals(["Invalid", "NoRules", "Unreadable"]),
  field: Schema.String,
  message: Schema.String
}) {}

export const DEFAULT_UPSTREAM = "unix:/var/run/docker.sock"
export const DEFAULT_LISTEN = "127.0.0.1:2375"
export const DEFAULT_RULE_SET_NAME = "socket-proxy"

const show = (value: unknown): string => {
  const s = JSON.stringify(value)
  return s === undefined ? String(value) : s.length > 120 ? s.slice(0, 117) + "..." : s
}

const fieldName = (path: ReadonlyArray<PropertyKey>): string =>
  path.map((p, i) => typeof p === "number" ? `[${p}]` : i === 0 ? String(p) : `.${String(p)}`).join("") || "(root)"

const valueAt = (input: unknown, path: ReadonlyArray<PropertyKey>): unknown => {
  let v: unknown = input
  for (const p of path) v = v !== null && typeof v === "object" ? (v as Record<PropertyKey, unknown>)[p] : undefined
  return v
}

const formatLeaf = SchemaIssue.makeFormatterDefault()
const firstLine = (issue: SchemaIssue.Issue): string => formatLeaf(issue).split("\n")[0]!

/** Flattens a Schema issue into `field: problem (got value)` lines. */
const describeIssue = (input: unknown, issue: SchemaIssue.Issue, path: ReadonlyArray<PropertyKey>, out: Array<string>): void => {
  switch (issue._tag) {
    case "Pointer":
      return describeIssue(input, issue.issue, [...path, ...issue.path], out)
    case "Composite":
      for (const i of issue.issues) describeIssue(input, i, path, out)
      return
    case "AnyOf": {
      // A union of literals reads well as Schema words it ("Expected "a" | "b""); a union of shapes does not.
      const text = firstLine(issue)
      const what = text.startsWith(`Expected "`) ? text : "not one of the accepted forms"
      out.push(`${fieldName(path)}: ${what} (got ${show(valueAt(input, path))})`)
      return
    }
    case "Encoding":
      return describeIssue(input, issue.issue, path, out)
    case "MissingKey":
      out.push(`${fieldName(path)}: required`)
      return
    case "UnexpectedKey":
      out.push(`${fieldName(path)}: unknown field`)
      return
    default:
      out.push(`${fieldName(path)}: ${firstLine(issue)} (got ${show(valueAt(input, path))})`)
  }
}

/** Parses `unix:/path` or `host:port`. */
export const parseAddress = (text: string): { readonly _tag: "Unix"; readonly path: string } | { readonly _tag: "Tcp"; readonly host: string; readonly port: number } | undefined => {
  if (text.startsWith("unix:")) {
    const p = text.slice(5).replace(/^\/\/(?=\/)/, "")
    return p.startsWith("/") || p.startsWith(".") ? { _tag: "Unix", path: p } : undefined
  }
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(text.trim())
  const port = m ? Number(m[3]) : Number.NaN
  if (!m || port > 65535) return undefined
  return { _tag: "Tcp", host: m[1] ?? (m[2] || "127.0.0.1"), port }
}

const invalid = (field: string, message: string) => new ConfigError({ reason: "Invalid", field, message: `${field}: ${message}` })

/** Command-line input merged over the file. */
export interface SocketProxyFlags {
  readonly upstream?: string | undefined
  readonly listen?: ReadonlyArray<string>
  readonly allow?: ReadonlyArray<string>
  readonly deny?: ReadonlyArray<string>
  readonly presets?: ReadonlyArray<string>
  readonly allowFrom?: ReadonlyArray<string>
  readonly name?: string | undefined
  /** `off` forwards create bodies unread; `on` (the default) checks them. */
  readonly bodyPolicy?: string | undefined
  /** Body-policy switches to turn on (`BODY_ALLOW_FLAGS` keys). */
  readonly bodyAllow?: ReadonlyArray<string>
  /** Capabilities `CapAdd` may name. */
  readonly allowCapability?: ReadonlyArray<string>
  /** Host paths bind mounts may use. */
  readonly allowBindSource?: ReadonlyArray<string>
  /** `KEY=VALUE` label scope. */
  readonly containerLabel?: string | undefined
  /** Learning mode (`--learn`). */
  readonly learn?: boolean | undefined
}

/** Flags that describe one listener group: not accepted with a file that declares `listeners`. */
const GROUP_FLAGS: ReadonlyArray<readonly [keyof SocketProxyFlags, string]> = [
  ["listen", "--listen"],
  ["allow", "--allow"],
  ["deny", "--deny"],
  ["presets", "--preset"],
  ["allowFrom", "--allow-from"],
  ["name", "--name"],
  ["bodyPolicy", "--body-policy"],
  ["bodyAllow", "--body-allow"],
  ["allowCapability", "--allow-capability"],
  ["allowBindSource", "--allow-bind-source"],
  ["containerLabel", "--container-label"]
]
const GROUP_FIELDS = ["listen", "allowFrom", "rules", "name", "logAllowed", "bodyPolicy", "container_label", "mode"] as const

/** Prefixes a group's error with where the group is in the file. */
const inGroup = (index: number, e: ConfigError): ConfigError =>
  new ConfigError({ reason: e.reason, field: `listeners[${index}].${e.field}`, message: `listeners[${index}].${e.message}` })

/**
 * Validates a decoded file plus flags into a config; the first problem wins, naming its field. With
 * `listeners`, each group is resolved as a file of its own (the top-level group fields and the group
 * flags are refused) and the config is the first group with `groups` holding them all.
 */
export const resolveConfig = (
  file: SocketProxyFile,
  flags: SocketProxyFlags = {}
): SocketProxyConfig | ConfigError => {
  if (file.listeners === undefined) {
    const single = resolveGroup(file, flags, undefined)
    return single instanceof ConfigError ? single : { ...single, groups: [single] }
  }
  for (const f of GROUP_FIELDS) {
    if (file[f] !== undefined) return invalid(f, "not accepted with listeners: give it inside each listener")
  }
  for (const [key, flag] of GROUP_FLAGS) {
    const v = flags[key]
    if (v !== undefined && (!Array.isArray(v) || v.length > 0)) return invalid(flag, "not accepted with a config file that declares listeners")
  }
  if (file.listeners.length === 0) return invalid("listeners", "expected at least one listener")
  const total = file.listeners.reduce((n, l) => n + l.listen.length, 0)
  if (total > MAX_LISTENERS) return invalid("listeners", `at most ${MAX_LISTENERS} addresses in all, got ${total}`)
  // Every group's sockets, so that no group's body policy lets a container mount another group's socket.
  const everyListen: Array<typeof ListenEntry.Type> = file.listeners.flatMap((l) => l.listen)
  const groups: Array<SocketProxyConfig> = []
  const names = new Set<string>()
  const addresses = new Set<string>()
  for (const [i, section] of file.listeners.entries()) {
    if (names.has(section.name)) return invalid(`listeners[${i}].name`, `${show(section.name)} is already the name of another listener`)
    names.add(section.name)
    if (section.listen.length === 0) return invalid(`listeners[${i}].listen`, "expected at least one address")
    const { listeners: _listeners, ...shared } = file
    const group = resolveGroup({ ...shared, ...section }, { upstream: flags.upstream, learn: flags.learn }, everyListen)
    if (group instanceof ConfigError) return inGroup(i, group)
    for (const [j, l] of group.listen.entries()) {
      const key = l._tag === "Unix" ? `unix:${l.path}` : `${l.host}:${l.port}`
      if (addresses.has(key) && !(l._tag === "Tcp" && l.port === 0)) return invalid(`listeners[${i}].listen[${j}]`, `${key} is already a listener`)
      addresses.add(key)
    }
    groups.push(group)
  }
  return { ...groups[0]!, groups }
}

/** One listener group from a file (or a group section over the shared fields) and flags. */
const resolveGroup = (
  file: SocketProxyFile,
  flags: SocketProxyFlags,
  everyListen: ReadonlyArray<typeof ListenEntry.Type> | undefined
): SocketProxyConfig | ConfigError => {
  const upstreamText = flags.upstream ?? file.upstream ?? DEFAULT_UPSTREAM
  const upstream = parseAddress(upstreamText)
  if (!upstream) return invalid(flags.upstream ? "--upstream" : "upstream", `expected unix:/path or host:port, got ${show(upstreamText)}`)

  const listen: Array<ListenAddress> = []
  const listenEntries: ReadonlyArray<{ field: string; entry: typeof ListenEntry.Type }> = flags.listen && flags.listen.length > 0
    ? flags.listen.map((entry) => ({ field: "--listen", entry }))
    : (file.listen ?? [DEFAULT_LISTEN]).map((entry, i) => ({ field: `listen[${i}]`, entry }))
  if (listenEntries.length > MAX_LISTENERS) return invalid(listenEntries[0]!.field.replace(/\[\d+\]$/, ""), `at most ${MAX_LISTENERS} addresses, got ${listenEntries.length}`)
  for (const { field, entry } of listenEntries) {
    const text = typeof entry === "string" ? entry : entry.address
    const addr = parseAddress(text)
    if (!addr) return invalid(field, `expected unix:/path or host:port, got ${show(text)}`)
    let mode: number | undefined
    if (typeof entry !== "string" && entry.mode !== undefined) {
      if (addr._tag !== "Unix") return invalid(`${field}.mode`, `only Unix sockets have a mode, got ${show(entry.mode)} for ${show(text)}`)
      if (!/^0?[0-7]{3}$/.test(entry.mode)) return invalid(`${field}.mode`, `expected an octal mode like "0660", got ${show(entry.mode)}`)
      mode = parseInt(entry.mode, 8)
    }
    let owner: { uid: number; gid: number | undefined } | undefined
    if (typeof entry !== "string" && entry.owner !== undefined) {
      if (addr._tag !== "Unix") return invalid(`${field}.owner`, `only Unix sockets have an owner, got ${show(entry.owner)} for ${show(text)}`)
      const m = /^(\d{1,10})(?::(\d{1,10}))?$/.exec(entry.owner)
      if (m === null || Number(m[1]) > 0xffffffff || Number(m[2] ?? 0) > 0xffffffff) {
        return invalid(`${field}.owner`, `expected a numeric uid or uid:gid like "1000:1000", got ${show(entry.owner)}`)
      }
      owner = { uid: Number(m[1]), gid: m[2] === undefined ? undefined : Number(m[2]) }
    }
    listen.push(addr._tag === "Unix" ? { _tag: "Unix", path: addr.path, mode, ...(owner === undefined ? {} : { owner }) } : addr)
  }

  let allowFrom: ClientAllowlist | undefined
  const allowFromEntries = flags.allowFrom && flags.allowFrom.length > 0 ? flags.allowFrom : file.allowFrom
  if (allowFromEntries !== undefined) {
    const parsed = parseAllowlist(allowFromEntries)
    if ("index" in parsed) {
      return invalid(flags.allowFrom && flags.allowFrom.length > 0 ? "--allow-from" : `allowFrom[${parsed.index}]`, parsed.message)
    }
    allowFrom = parsed
  }

  const merged = { ...SOCKET_PROXY_DEFAULTS, ...file.limits }
  const limits = {
    ...merged,
    maxUpstreamSlotsPerClient: file.limits?.maxUpstreamSlotsPerClient ?? slotsPerClient(undefined, merged.maxSockets)
  }
  const rules: Array<AccessRule> = []
  const add = (field: string, rule: AccessRule | ReadonlyArray<AccessRule> | RuleSyntaxError): ConfigError | undefined => {
    if (rule instanceof RuleSyntaxError) return invalid(field, rule.message + (rule.reason === "UnknownPreset" ? "" : ` in ${show(rule.rule)}`))
    if (Array.isArray(rule)) rules.push(...rule)
    else rules.push(rule as AccessRule)
    return undefined
  }
  for (const d of flags.deny ?? []) {
    const e = add("--deny", parseRule(d, { defaultAction: "deny" }))
    if (e) return e
  }
  for (const a of flags.allow ?? []) {
    const e = add("--allow", parseRule(a, { defaultAction: "allow" }))
    if (e) return e
  }
  for (const [i, entry] of (file.rules ?? []).entries()) {
    const field = `rules[${i}]`
    const e = typeof entry === "string"
      ? add(field, parseRule(entry))
      : "preset" in entry
      ? add(`${field}.preset`, presetRules(entry.preset))
      : "allow" in entry
      ? add(`${field}.allow`, parseRule(entry.allow, { defaultAction: "allow", idleTimeoutMs: entry.idleTimeoutMs }))
      : add(`${field}.deny`, parseRule(entry.deny, { defaultAction: "deny" }))
    if (e) return e
  }
  for (const p of flags.presets ?? []) {
    const e = add("--preset", presetRules(p))
    if (e) return e
  }
  if (!rules.some((r) => r.action === "allow")) {
    return new ConfigError({
      reason: "NoRules",
      field: "rules",
      message: "rules: no allow rule and no preset: every request would be denied; pass --allow, --preset or rules in the config file"
    })
  }
  const protectedListen = everyListen === undefined ? listen : everyListen.flatMap((entry) => {
    const a = parseAddress(typeof entry === "string" ? entry : entry.address)
    return a?._tag === "Unix" ? [{ _tag: "Unix" as const, path: a.path, mode: undefined }] : []
  })
  const bodyPolicy = resolveBodyPolicy(file.bodyPolicy ?? {}, flags, upstream, protectedListen)
  if (bodyPolicy instanceof ConfigError) return bodyPolicy
  let containerLabel: ContainerLabel | undefined
  const labelText = flags.containerLabel ?? file.container_label
  if (labelText !== undefined) {
    const parsed = parseContainerLabel(labelText)
    if (typeof parsed === "string") return invalid(flags.containerLabel !== undefined ? "--container-label" : "container_label", parsed)
    containerLabel = parsed
  }
  return {
    containerLabel,
    learn: flags.learn === true || file.mode === "learn",
    upstream,
    listen,
    allowFrom,
    bodyPolicy,
    ruleSet: { name: flags.name ?? file.name ?? DEFAULT_RULE_SET_NAME, rules },
    forwardedHeaders: file.forwardedHeaders ?? (upstream._tag === "Unix" ? "off" : "replace"),
    logAllowed: file.logAllowed ?? false,
    limits
  }
}

/** The body policy from the file's section and the flags; the upstream's and listeners' sockets are never bind-mounted. */
const resolveBodyPolicy = (
  section: typeof BodyPolicySection.Type,
  flags: SocketProxyFlags,
  upstream: UpstreamAddress,
  listen: ReadonlyArray<ListenAddress>
): BodyPolicy | ConfigError => {
  let enabled = section.enabled ?? DEFAULT_BODY_POLICY.enabled
  if (flags.bodyPolicy !== undefined) {
    if (flags.bodyPolicy !== "on" && flags.bodyPolicy !== "off") return invalid("--body-policy", `expected on or off, got ${show(flags.bodyPolicy)}`)
    enabled = flags.bodyPolicy === "on"
  }
  const switches: Record<string, boolean> = {}
  for (const name of flags.bodyAllow ?? []) {
    const key = Object.hasOwn(BODY_ALLOW_FLAGS, name) ? BODY_ALLOW_FLAGS[name as keyof typeof BODY_ALLOW_FLAGS] : undefined
    if (key === undefined) return invalid("--body-allow", `unknown switch ${show(name)} (known: ${Object.keys(BODY_ALLOW_FLAGS).join(", ")})`)
    switches[key] = true
  }
  const capabilities = [...(section.allowCapabilities ?? []), ...(flags.allowCapability ?? [])]
  for (const [i, cap] of capabilities.entries()) {
    if (!/^[A-Za-z_]+$/.test(cap)) return invalid(i < (section.allowCapabilities?.length ?? 0) ? `bodyPolicy.allowCapabilities[${i}]` : "--allow-capability", `expected a capability name like NET_ADMIN, got ${show(cap)}`)
  }
  const sources: Array<string> = []
  const fileSources = section.allowBindSources ?? []
  for (const [i, source] of [...fileSources, ...(flags.allowBindSource ?? [])].entries()) {
    const field = i < fileSources.length ? `bodyPolicy.allowBindSources[${i}]` : "--allow-bind-source"
    const normalized = source.startsWith("/") ? normalizeHostPath(source) : undefined
    if (normalized === undefined) return invalid(field, `expected an absolute host path without .. segments, got ${show(source)}`)
    sources.push(normalized)
  }
  const sockets = [
    ...DEFAULT_BODY_POLICY.protectedPaths,
    ...(upstream._tag === "Unix" ? [upstream.path] : []),
    ...listen.flatMap((l) => l._tag === "Unix" ? [l.path] : [])
  ].flatMap((p) => {
    const n = p.startsWith("/") ? normalizeHostPath(p) : undefined
    return n === undefined ? [] : [n]
  })
  return {
    enabled,
    maxBodyBytes: section.maxBodyBytes ?? DEFAULT_BODY_POLICY.maxBodyBytes,
    allowPrivileged: switches.allowPrivileged ?? section.allowPrivileged ?? false,
    allowHostNamespaces: switches.allowHostNamespaces ?? section.allowHostNamespaces ?? false,
    allowNamespaceJoins: switches.allowNamespaceJoins ?? section.allowNamespaceJoins ?? false,
    allowCapabilities: capabilities,
    allowDevices: switches.allowDevices ?? section.allowDevices ?? false,
    allowUnconfined: switches.allowUnconfined ?? section.allowUnconfined ?? false,
    allowSysctls: switches.allowSysctls ?? section.allowSysctls ?? false,
    allowVolumesFrom: switches.allowVolumesFrom ?? section.allowVolumesFrom ?? false,
    allowBindSources: sources,
    protectedPaths: [...new Set(sockets)]
  }
}

/** Decodes an already-parsed YAML/JSON document; unknown fields are errors (typos must not pass silently). */
export const decodeSocketProxyFile = (input: unknown): SocketProxyFile | ConfigError => {
  const r = Schema.decodeUnknownResult(SocketProxyFile, { errors: "all", onExcessProperty: "error" })(input)
  if (Result.isSuccess(r)) return r.success
  const lines: Array<string> = []
  describeIssue(input, r.failure.issue, [], lines)
  const first = lines[0] ?? String(r.failure)
  return new ConfigError({ reason: "Invalid", field: first.split(":")[0]!, message: lines.join("; ") })
}
