/**
 * wsp's YAML configuration files for both halves, read as wsp ships them (lower-case keys, times in
 * milliseconds), validated by Schema, with switchyard's extra limits as optional fields. Unknown keys
 * are reported as warnings, as Go's YAML decoder ignores them. Pure: text in, config or error out.
 */
import type { AuthThrottleLimits } from "./AuthThrottle.ts"
import { Redacted, Schema, SchemaIssue } from "effect"
import { parse as parseYaml } from "yaml"
import type { DestinationRules, RuleSpec } from "./DestinationRules.ts"
import { compileRules, RulePatternError } from "./DestinationRules.ts"

/** A configuration that cannot be used; `field` names where, `value` shows what was found. */
export class WspConfigError extends Schema.TaggedError<WspConfigError>()("WspConfigError", {
  reason: Schema.Literals(["InvalidYaml", "InvalidField", "InvalidPattern"]),
  field: Schema.String,
  value: Schema.String,
  message: Schema.String
}) {}

const Port = Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 65535 }))
const NonNegativeInt = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))
const PositiveInt = Schema.Int.check(Schema.isGreaterThan(0))
const WsUrl = Schema.String.check(Schema.isPattern(/^wss?:\/\/[^\s/]+/))

const Rule = Schema.Struct({
  method: Schema.optional(Schema.String),
  url: Schema.optional(Schema.String),
  headers: Schema.optional(Schema.Record(Schema.String, Schema.String))
})
const Rules = Schema.optional(Schema.NullOr(Schema.Array(Rule)))

const ServerFile = Schema.Struct({
  host: Schema.optional(Schema.String),
  port: Schema.optional(Port),
  timeout: Schema.optional(NonNegativeInt),
  idletimeout: Schema.optional(NonNegativeInt),
  secretkey: Schema.optional(Schema.String),
  whitelist: Rules,
  blacklist: Rules,
  // switchyard extensions
  requestkey: Schema.optional(Schema.String),
  maxmessagesize: Schema.optional(PositiveInt),
  maxheaders: Schema.optional(PositiveInt),
  maxconcurrentrequests: Schema.optional(PositiveInt),
  maxconnectionsperpool: Schema.optional(PositiveInt),
  maxpools: Schema.optional(PositiveInt),
  pinginterval: Schema.optional(NonNegativeInt),
  maxgreetingbytes: Schema.optional(PositiveInt),
  maxidlebytes: Schema.optional(PositiveInt),
  responsetimeout: Schema.optional(NonNegativeInt),
  insecureopenregistration: Schema.optional(Schema.Boolean)
})

const ClientFile = Schema.Struct({
  id: Schema.optional(Schema.String.check(Schema.isPattern(/^[^_]+$/))),
  targets: Schema.optional(Schema.Array(WsUrl)),
  poolidlesize: Schema.optional(NonNegativeInt),
  poolmaxsize: Schema.optional(NonNegativeInt),
  secretkey: Schema.optional(Schema.String),
  whitelist: Rules,
  blacklist: Rules,
  // switchyard extensions
  maxmessagesize: Schema.optional(PositiveInt),
  maxheaders: Schema.optional(PositiveInt),
  pinginterval: Schema.optional(NonNegativeInt),
  backoffinitial: Schema.optional(PositiveInt),
  backoffmax: Schema.optional(PositiveInt),
  maskframes: Schema.optional(Schema.Boolean)
})

/** Largest message (head or body) accepted by default: 256 MiB, as a body travels as one message. */
export const defaultMaxMessageSize = 256 * 1024 * 1024
/** Most header names in one request or response head by default. */
export const defaultMaxHeaders = 256
/** Most `/request` calls in flight (including those waiting for a connection) by default. */
export const defaultMaxConcurrentRequests = 1024
/** Most connections one client id may register by default. */
export const defaultMaxConnectionsPerPool = 1000
/** Most distinct client ids by default. */
export const defaultMaxPools = 1000
/** WebSocket ping interval by default (wsp's client pings every 30 s), in milliseconds. */
export const defaultPingInterval = 30_000
/**
 * How long a `/request` waits by default for the wsp client's response head once its request is sent,
 * in milliseconds (wsp itself waits forever).
 */
export const defaultResponseTimeout = 60_000

/** `switchyard wsp-server` settings (wsp's `server.Config` plus switchyard's limits). */
export interface WspServerConfig {
  readonly host: string
  readonly port: number
  /** How long a `/request` waits for an idle connection, ms; 0 means do not wait. */
  readonly timeout: number
  /** How long a surplus idle connection is kept, ms. */
  readonly idleTimeout: number
  readonly secretKey: Redacted.Redacted<string>
  readonly rules: DestinationRules
  /** When set, `/request` requires `Proxy-Authorization: Bearer <key>`. */
  readonly requestKey: Redacted.Redacted<string> | undefined
  readonly maxMessageSize: number
  readonly maxHeaders: number
  readonly maxConcurrentRequests: number
  readonly maxConnectionsPerPool: number
  readonly maxPools: number
  /** ms between WebSocket pings; 0 turns keepalive off. */
  readonly pingInterval: number
  /** Bytes a registering connection may send before its greeting is accepted (default 4 KiB). */
  readonly maxGreetingBytes?: number | undefined
  /** Bytes a registered connection may send while it carries no request (default 64 KiB). */
  readonly maxIdleBytes?: number | undefined
  /**
   * ms a `/request` waits for the response head after its last request byte went out; then the caller
   * gets 526 and the connection is dropped. 0 waits forever (wsp's behaviour).
   */
  readonly responseTimeout: number
  /**
   * Accept `/register` without a `secretkey` (anyone who reaches it gets a share of `/request` traffic,
   * as in wsp). Off by default: with no `secretkey`, registrations are refused.
   */
  readonly openRegistration: boolean
  /**
   * Failed `X-SECRET-KEY`s and request keys per peer address: free ones, then a doubling delay before each
   * refusal, then 429 for a while (default `DefaultAuthThrottleLimits`).
   */
  readonly authThrottle?: Partial<AuthThrottleLimits> | undefined
}

/** `switchyard wsp-client` settings (wsp's `client.Config` plus rules and switchyard's limits). */
export interface WspClientConfig {
  readonly id: string
  readonly targets: ReadonlyArray<string>
  readonly poolIdleSize: number
  readonly poolMaxSize: number
  readonly secretKey: Redacted.Redacted<string>
  readonly rules: DestinationRules
  readonly maxMessageSize: number
  readonly maxHeaders: number
  readonly pingInterval: number
  /** First reconnect delay after a failed dial, ms. */
  readonly backoffInitial: number
  /** Largest reconnect delay, ms. */
  readonly backoffMax: number
  /**
   * Mask client frames with a random key as RFC 6455 §5.3 requires (default). `false` sends an
   * all-zero key, which halves the per-byte work on both ends; only for trusted paths.
   */
  readonly maskFrames: boolean
}

/** wsp's server defaults. */
export const serverDefaults = { host: "127.0.0.1", port: 8080, timeout: 1000, idleTimeout: 60_000 } as const
/** wsp's client defaults (the id defaults to a fresh UUID). */
export const clientDefaults = {
  targets: ["ws://127.0.0.1:8080/register"],
  poolIdleSize: 10,
  poolMaxSize: 100,
  backoffInitial: 1000,
  backoffMax: 30_000
} as const

const pathSegment = /\[("(?:[^"\\]|\\.)*"|\d+)\]/g

const valueAt = (input: unknown, path: ReadonlyArray<string | number>): unknown => {
  let cur: unknown = input
  for (const key of path) {
    if (cur === null || typeof cur !== "object") return undefined
    cur = (cur as Record<string | number, unknown>)[key]
  }
  return cur
}

const showValue = (value: unknown): string => {
  if (value === undefined) return "(missing)"
  const shown = JSON.stringify(value)
  return shown === undefined ? String(value) : shown.length > 200 ? `${shown.slice(0, 200)}...` : shown
}

const formatIssue = SchemaIssue.makeFormatterDefault()

/** Turns the first Schema issue into an error naming the field (`targets[1]`) and the bad value. */
const schemaError = (what: string, input: unknown, issue: SchemaIssue.Issue): WspConfigError => {
  const text = formatIssue(issue)
  const lines = text.split("\n")
  const at = lines.find((l) => l.trimStart().startsWith("at ["))
  const path: Array<string | number> = []
  if (at !== undefined) {
    for (const m of at.matchAll(pathSegment)) {
      const seg = m[1]!
      path.push(seg.startsWith("\"") ? (JSON.parse(seg) as string) : Number(seg))
    }
  }
  const field = path.map((p, i) => (typeof p === "number" ? `[${p}]` : i === 0 ? p : `.${p}`)).join("") || "(root)"
  const value = showValue(path.length === 0 ? input : valueAt(input, path))
  return new WspConfigError({
    reason: "InvalidField",
    field,
    value,
    message: `${what}: field ${field} has invalid value ${value}: ${lines[0]}`
  })
}

const readYaml = (what: string, text: string): unknown | WspConfigError => {
  try {
    const doc = parseYaml(text) as unknown
    return doc === null || doc === undefined ? {} : doc
  } catch (e) {
    return new WspConfigError({ reason: "InvalidYaml", field: "(file)", value: "", message: `${what}: ${(e as Error).message}` })
  }
}

const unknownKeys = (input: unknown, known: ReadonlyArray<string>): ReadonlyArray<string> =>
  input !== null && typeof input === "object" && !Array.isArray(input)
    ? Object.keys(input).filter((k) => !known.includes(k))
    : []

const rulesOf = (
  what: string,
  file: { readonly whitelist?: ReadonlyArray<RuleSpec> | null | undefined; readonly blacklist?: ReadonlyArray<RuleSpec> | null | undefined }
): DestinationRules | WspConfigError => {
  const rules = compileRules({ whitelist: file.whitelist ?? [], blacklist: file.blacklist ?? [] })
  if (rules instanceof RulePatternError) {
    return new WspConfigError({
      reason: "InvalidPattern",
      field: rules.field,
      value: JSON.stringify(rules.pattern),
      message: `${what}: field ${rules.field} has invalid pattern ${JSON.stringify(rules.pattern)}: ${rules.message}`
    })
  }
  return rules
}

/** A parsed config plus the keys that were present but are not understood (ignored, as wsp does). */
export interface Parsed<A> {
  readonly config: A
  readonly unknownKeys: ReadonlyArray<string>
}

/** Reads YAML and decodes it with `schema`; errors name the field and the bad value. */
const decodeFile = <S extends Schema.Codec<unknown, unknown>>(
  what: string,
  schema: S,
  text: string
): { readonly input: unknown; readonly file: S["Type"] } | WspConfigError => {
  const input = readYaml(what, text)
  if (input instanceof WspConfigError) return input
  const decoded = Schema.decodeUnknownExit(schema)(input)
  if (decoded._tag === "Success") return { input, file: decoded.value }
  const err = decoded.cause.reasons.find((r) => r._tag === "Fail")
  const issue = err !== undefined && err._tag === "Fail" ? (err.error as Schema.SchemaError).issue : undefined
  if (issue !== undefined) return schemaError(what, input, issue)
  return new WspConfigError({ reason: "InvalidField", field: "(root)", value: showValue(input), message: `${what}: not a mapping` })
}

/** Parses a `wsp_server.cfg` text. */
export const parseWspServerConfig = (text: string): Parsed<WspServerConfig> | WspConfigError => {
  const what = "invalid wsp server config"
  const decoded = decodeFile(what, ServerFile, text)
  if (decoded instanceof WspConfigError) return decoded
  const { input, file } = decoded
  const rules = rulesOf(what, file)
  if (rules instanceof WspConfigError) return rules
  return {
    config: {
      host: file.host ?? serverDefaults.host,
      port: file.port ?? serverDefaults.port,
      timeout: file.timeout ?? serverDefaults.timeout,
      idleTimeout: file.idletimeout ?? serverDefaults.idleTimeout,
      secretKey: Redacted.make(file.secretkey ?? ""),
      rules,
      requestKey: file.requestkey !== undefined && file.requestkey !== "" ? Redacted.make(file.requestkey) : undefined,
      maxMessageSize: file.maxmessagesize ?? defaultMaxMessageSize,
      maxHeaders: file.maxheaders ?? defaultMaxHeaders,
      maxConcurrentRequests: file.maxconcurrentrequests ?? defaultMaxConcurrentRequests,
      maxConnectionsPerPool: file.maxconnectionsperpool ?? defaultMaxConnectionsPerPool,
      maxPools: file.maxpools ?? defaultMaxPools,
      pingInterval: file.pinginterval ?? defaultPingInterval,
      ...(file.maxgreetingbytes === undefined ? {} : { maxGreetingBytes: file.maxgreetingbytes }),
      ...(file.maxidlebytes === undefined ? {} : { maxIdleBytes: file.maxidlebytes }),
      responseTimeout: file.responsetimeout ?? defaultResponseTimeout,
      openRegistration: file.insecureopenregistration ?? false
    },
    unknownKeys: unknownKeys(input, Object.keys(ServerFile.fields))
  }
}

/** Parses a `wsp_client.cfg` text; `newId` supplies the id when the file has none (wsp: a UUID v4). */
export const parseWspClientConfig = (text: string, newId: () => string): Parsed<WspClientConfig> | WspConfigError => {
  const what = "invalid wsp client config"
  const decoded = decodeFile(what, ClientFile, text)
  if (decoded instanceof WspConfigError) return decoded
  const { input, file } = decoded
  const rules = rulesOf(what, file)
  if (rules instanceof WspConfigError) return rules
  const poolIdleSize = file.poolidlesize ?? clientDefaults.poolIdleSize
  const poolMaxSize = file.poolmaxsize ?? clientDefaults.poolMaxSize
  if (poolMaxSize < 1) {
    return new WspConfigError({
      reason: "InvalidField",
      field: "poolmaxsize",
      value: String(poolMaxSize),
      message: `${what}: field poolmaxsize has invalid value ${poolMaxSize}: must be at least 1`
    })
  }
  const backoffInitial = file.backoffinitial ?? clientDefaults.backoffInitial
  const backoffMax = file.backoffmax ?? Math.max(clientDefaults.backoffMax, backoffInitial)
  if (backoffMax < backoffInitial) {
    return new WspConfigError({
      reason: "InvalidField",
      field: "backoffmax",
      value: String(backoffMax),
      message: `${what}: field backoffmax has invalid value ${backoffMax}: must be at least backoffinitial (${backoffInitial})`
    })
  }
  return {
    config: {
      id: file.id ?? newId(),
      targets: file.targets ?? clientDefaults.targets,
      poolIdleSize,
      poolMaxSize,
      secretKey: Redacted.make(file.secretkey ?? ""),
      rules,
      maxMessageSize: file.maxmessagesize ?? defaultMaxMessageSize,
      maxHeaders: file.maxheaders ?? defaultMaxHeaders,
      pingInterval: file.pinginterval ?? defaultPingInterval,
      backoffInitial,
      backoffMax,
      maskFrames: file.maskframes ?? true
    },
    unknownKeys: unknownKeys(input, Object.keys(ClientFile.fields))
  }
}
