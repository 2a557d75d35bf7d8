/**
 * Socket-proxy access rules: the one-line syntax (`[allow|deny] METHODS PATH[?QUERY]`), parsing into
 * compiled matchers, first-match-wins decisions with deny by default, and named presets for common tools.
 * Rules match canonical paths (see `canonicalTarget`): no API version prefix, decoded, `//` collapsed.
 * Pure: no I/O. It does not look at request bodies (`BodyPolicy` judges the bodies of creates).
 */
import { Schema } from "effect"

export type RuleAction = "allow" | "deny"

/** One constraint on the query string. */
export type QueryConstraint =
  /**
   * `key=value` (the value may use `*` globs): the first value of `key` must match. The Engine's Go
   * handlers read the first value (`Form.Get`), so `force=0&force=1` is judged as `force=0` here too.
   */
  | { readonly _tag: "Equals"; readonly key: string; readonly value: RegExp; readonly source: string }
  /** `key`: the key must be present. */
  | { readonly _tag: "Present"; readonly key: string }
  /** `!key`: the key must be absent. */
  | { readonly _tag: "Absent"; readonly key: string }

export interface AccessRule {
  readonly action: RuleAction
  /** Upper-case methods, or `undefined` for any method (`*`). */
  readonly methods: ReadonlySet<string> | undefined
  /** The compiled path matcher (anchored). */
  readonly path: RegExp
  readonly query: ReadonlyArray<QueryConstraint>
  /** Idle limit for responses and hijacked streams allowed by this rule (ms; 0 = none). */
  readonly idleTimeoutMs: number | undefined
  /** The rule as written, for logs and denial messages. */
  readonly source: string
}

export class RuleSyntaxError extends Schema.TaggedError<RuleSyntaxError>()("RuleSyntaxError", {
  reason: Schema.Literals(["BadAction", "BadMethod", "BadPath", "BadRegex", "BadQuery", "UnknownPreset", "Empty"]),
  rule: Schema.String,
  message: Schema.String
}) {}

const METHOD = /^[A-Z]+$/
/** Longest rule line accepted; rules are written by people, anything longer is a mistake. */
export const MAX_RULE_LENGTH = 2048

const escapeRegex = (s: string): string => s.replace(/[.+?^${}()|[\]\\]/g, "\\$&")

/**
 * Compiles a path glob: `*` is one segment's worth (no `/`), `**` any number of segments (also none).
 * With `spanSegments` (deny rules), `*` also takes `/`: the Engine's router reads `{name:.*}` across
 * segments (`/containers/parent/alias/archive` is the archive of `parent/alias`), so a deny rule must
 * cover every path the Engine could route to the endpoint it names.
 */
export const compileGlob = (glob: string, spanSegments = false): RegExp => {
  let out = "^"
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i]!
    if (c === "/" && glob[i + 1] === "*" && glob[i + 2] === "*" && (i + 3 === glob.length || glob[i + 3] === "/")) {
      // "/**" is zero or more whole segments: "/images/**/json" matches "/images/json" too.
      out += "(?:/.*)?"
      i += 2
    } else if (c === "*") {
      if (glob[i + 1] === "*") {
        i++
        out += ".*"
      } else {
        out += spanSegments ? ".*" : "[^/]*"
      }
    } else {
      out += escapeRegex(c)
    }
  }
  return new RegExp(out + "$")
}

/** Compiles a query value glob: `*` is any run of characters. */
const compileValueGlob = (glob: string): RegExp =>
  new RegExp("^" + glob.split("*").map(escapeRegex).join(".*") + "$")

const VERSION_IN_PATTERN = /^\/v(?:\*|\d+(?:\.\d+){0,2})(?=\/|$)/

const syntax = (rule: string, reason: RuleSyntaxError["reason"], message: string) =>
  new RuleSyntaxError({ reason, rule, message })

const parseQuery = (rule: string, text: string): ReadonlyArray<QueryConstraint> | RuleSyntaxError => {
  const out: Array<QueryConstraint> = []
  for (const part of text.split("&")) {
    if (part.length === 0) continue
    if (part.startsWith("!")) {
      const key = part.slice(1)
      if (key.length === 0 || key.includes("=")) return syntax(rule, "BadQuery", `bad query constraint "${part}"`)
      out.push({ _tag: "Absent", key })
      continue
    }
    const eq = part.indexOf("=")
    if (eq === -1) {
      out.push({ _tag: "Present", key: part })
    } else {
      const key = part.slice(0, eq)
      if (key.length === 0) return syntax(rule, "BadQuery", `bad query constraint "${part}"`)
      const value = part.slice(eq + 1)
      out.push({ _tag: "Equals", key, value: compileValueGlob(value), source: value })
    }
  }
  return out
}

export interface RuleOptions {
  /** Used when the line does not start with `allow` or `deny`. */
  readonly defaultAction?: RuleAction
  readonly idleTimeoutMs?: number | undefined
}

/**
 * Parses one rule. Grammar (whitespace-separated):
 *   `[allow|deny] METHODS PATH[?QUERY] [?QUERY]`
 * METHODS is `*` or a comma list (`GET,HEAD`); PATH a glob (`/containers/*\/json`, `/images/**`) or a
 * regex after `~` (`~^/containers/[0-9a-f]+/json$`); QUERY `key=value&key&!key`. A leading `/v*` or
 * `/v1.41` in a glob is accepted and ignored: rules never see the API version.
 */
export const parseRule = (text: string, options: RuleOptions = {}): AccessRule | RuleSyntaxError => {
  const source = text.trim()
  if (source.length === 0) return syntax(text, "Empty", "empty rule")
  if (source.length > MAX_RULE_LENGTH) return syntax(source.slice(0, 64), "Empty", `rule longer than ${MAX_RULE_LENGTH} characters`)
  const words = source.split(/\s+/)
  let action = options.defaultAction ?? "allow"
  if (words[0] === "allow" || words[0] === "deny") {
    action = words.shift() as RuleAction
  } else if (/^[a-z]+$/.test(words[0]!)) {
    return syntax(source, "BadAction", `unknown action "${words[0]}" (expected allow or deny)`)
  }
  // Logs and denials always show the action, even when it came from --allow/--deny.
  const written = words.length === source.split(/\s+/).length ? `${action} ${source}` : source
  const methodWord = words.shift()
  const pathWord = words.shift()
  if (methodWord === undefined || pathWord === undefined) {
    return syntax(source, "BadPath", "expected METHODS PATH, e.g. \"GET /containers/json\"")
  }
  let methods: Set<string> | undefined
  if (methodWord !== "*") {
    methods = new Set()
    for (const m of methodWord.split(",")) {
      if (!METHOD.test(m)) return syntax(source, "BadMethod", `bad method "${m}" (upper-case, e.g. GET,HEAD or *)`)
      methods.add(m)
    }
  }
  let queryText = ""
  let path: RegExp
  if (pathWord.startsWith("~")) {
    try {
      path = new RegExp(pathWord.slice(1))
    } catch (e) {
      return syntax(source, "BadRegex", `bad regex "${pathWord.slice(1)}": ${(e as Error).message}`)
    }
  } else {
    let glob = pathWord
    const q = glob.indexOf("?")
    if (q !== -1) {
      queryText = glob.slice(q + 1)
      glob = glob.slice(0, q)
    }
    if (!glob.startsWith("/")) return syntax(source, "BadPath", `path "${glob}" must start with /`)
    glob = glob.replace(VERSION_IN_PATTERN, "") || "/"
    if (/(^|\/)\.\.?(\/|$)|\/\//.test(glob)) {
      return syntax(source, "BadPath", `path "${glob}" has . or .. segments or // (requests with them never match)`)
    }
    path = compileGlob(glob, action === "deny")
  }
  const rest = words.shift()
  if (rest !== undefined) {
    if (!rest.startsWith("?") || queryText.length > 0) return syntax(source, "BadQuery", `unexpected "${rest}" after the path`)
    queryText = rest.slice(1)
  }
  if (words.length > 0) return syntax(source, "BadQuery", `unexpected "${words.join(" ")}" at the end`)
  const query = parseQuery(source, queryText)
  if (query instanceof RuleSyntaxError) return query
  return { action, methods, path, query, idleTimeoutMs: options.idleTimeoutMs, source: written }
}

/** A request as rules see it. */
export interface RuleRequest {
  readonly method: string
  /** Canonical path (no version prefix). */
  readonly path: string
  /** Raw query string without `?`. */
  readonly query: string
}

const queryMatches = (constraints: ReadonlyArray<QueryConstraint>, query: string): boolean => {
  const params = new URLSearchParams(query)
  for (const c of constraints) {
    switch (c._tag) {
      case "Present":
        if (!params.has(c.key)) return false
        break
      case "Absent":
        if (params.has(c.key)) return false
        break
      case "Equals": {
        const first = params.get(c.key)
        if (first === null || !c.value.test(first)) return false
        break
      }
    }
  }
  return true
}

/** Whether `rule` applies to `request` (method, path and every query constraint). */
export const ruleMatches = (rule: AccessRule, request: RuleRequest): boolean =>
  (rule.methods === undefined || rule.methods.has(request.method)) &&
  rule.path.test(request.path) &&
  (rule.query.length === 0 || queryMatches(rule.query, request.query))

/** A named, ordered list of rules. */
export interface RuleSet {
  readonly name: string
  readonly rules: ReadonlyArray<AccessRule>
}

export type Decision =
  | { readonly allowed: true; readonly rule: AccessRule }
  | { readonly allowed: false; readonly rule: AccessRule | undefined }

/** First match wins; no match is a denial. */
export const decide = (ruleSet: RuleSet, request: RuleRequest): Decision => {
  const rules = ruleSet.rules
  for (let i = 0; i < rules.length; i++) {
    const rule = rules[i]!
    if (ruleMatches(rule, request)) return rule.action === "allow" ? { allowed: true, rule } : { allowed: false, rule }
  }
  return { allowed: false, rule: undefined }
}

/** The one-line reason given to a denied client. */
export const denialMessage = (ruleSet: RuleSet, request: RuleRequest, decision: Decision): string =>
  decision.rule === undefined
    ? `switchyard socket-proxy: ${request.method} ${request.path} is not allowed by rule set "${ruleSet.name}" (no rule matched; deny by default)`
    : `switchyard socket-proxy: ${request.method} ${request.path} is denied by rule set "${ruleSet.name}" (rule "${decision.rule.source}")`

const reads = (paths: ReadonlyArray<string>): Array<string> => paths.map((p) => `GET,HEAD ${p}`)

const BASICS = ["/_ping", "/version", "/info", "/events"]

/**
 * Presets, by name. Each is an ordered rule list; a preset's rules go where the preset is named.
 * `read-only` is broad: reads include `GET /containers/{id}/export` and `/archive` (file contents),
 * `/secrets` and `/configs` (Swarm metadata). Prefer the narrow presets for tools that need less.
 */
export const PRESETS: Readonly<Record<string, ReadonlyArray<string>>> = {
  /** Only the health check. */
  ping: ["GET,HEAD /_ping"],
  /** Every GET and HEAD, nothing else. */
  "read-only": ["GET,HEAD /**"],
  /** Traefik's Docker and Swarm providers: list and inspect containers, follow events, Swarm services. */
  traefik: reads([
    ...BASICS,
    "/containers/json",
    "/containers/*/json",
    "/services",
    "/services/*",
    "/tasks",
    "/networks",
    "/networks/*",
    "/nodes"
  ]),
  /** Dashboards and monitors (Portainer in read-only use, Homepage, cAdvisor-like tools): inspect everything, follow logs and stats. */
  dashboard: reads([
    ...BASICS,
    "/system/df",
    "/containers/json",
    "/containers/*/json",
    "/containers/*/logs",
    "/containers/*/stats",
    "/containers/*/top",
    "/images/json",
    "/images/**/json",
    "/images/**/history",
    "/networks",
    "/networks/*",
    "/volumes",
    "/volumes/*",
    "/services",
    "/services/*",
    "/tasks",
    "/tasks/*",
    "/nodes",
    "/nodes/*",
    "/swarm"
  ]),
  /** Watchtower-style updaters: inspect, pull, recreate containers, remove old images. */
  updater: [
    ...reads([
      ...BASICS,
      "/containers/json",
      "/containers/*/json",
      "/images/json",
      "/images/**/json",
      "/distribution/**/json"
    ]),
    "POST /images/create",
    "POST /containers/create",
    "POST /containers/*/start",
    "POST /containers/*/stop",
    "POST /containers/*/restart",
    "POST /containers/*/kill",
    "POST /containers/*/rename",
    "POST /containers/*/wait",
    "DELETE /containers/*",
    "DELETE /images/**",
    "POST /networks/*/connect",
    "POST /networks/*/disconnect"
  ],
  /**
   * CI runners that build and run test containers. This is close to root on the host (a created
   * container may mount anything): use it only for runners you trust.
   */
  ci: [
    ...reads([
      ...BASICS,
      "/containers/json",
      "/containers/*/json",
      "/containers/*/logs",
      "/containers/*/archive",
      "/images/json",
      "/images/**/json",
      "/images/**/history",
      "/exec/*/json",
      "/networks",
      "/networks/*",
      "/volumes",
      "/volumes/*",
      "/distribution/**/json"
    ]),
    "POST /build",
    "POST /images/create",
    "POST /images/**/push",
    "POST /images/**/tag",
    "DELETE /images/**",
    "POST /containers/create",
    "POST /containers/*/start",
    "POST /containers/*/stop",
    "POST /containers/*/kill",
    "POST /containers/*/wait",
    "POST /containers/*/attach",
    "POST /containers/*/resize",
    "PUT /containers/*/archive",
    "POST /containers/*/exec",
    "DELETE /containers/*",
    "POST /exec/*/start",
    "POST /exec/*/resize",
    "POST /networks/create",
    "POST /networks/*/connect",
    "POST /networks/*/disconnect",
    "DELETE /networks/*",
    "POST /volumes/create",
    "DELETE /volumes/*"
  ],
  /**
   * Podman's own (libpod) API, read-only and metadata only: list and inspect containers, images, pods,
   * networks and volumes, follow events, logs and stats. Not exports, archives or `generate kube`.
   */
  "libpod-read-only": reads([
    "/libpod/_ping",
    "/libpod/version",
    "/libpod/info",
    "/libpod/events",
    "/libpod/system/df",
    "/libpod/containers/json",
    "/libpod/containers/stats",
    "/libpod/containers/*/json",
    "/libpod/containers/*/exists",
    "/libpod/containers/*/logs",
    "/libpod/containers/*/stats",
    "/libpod/containers/*/top",
    "/libpod/containers/*/changes",
    "/libpod/containers/*/healthcheck",
    "/libpod/images/json",
    "/libpod/images/**/json",
    "/libpod/images/**/exists",
    "/libpod/images/**/history",
    "/libpod/images/**/tree",
    "/libpod/networks/json",
    "/libpod/networks/*/json",
    "/libpod/networks/*/exists",
    "/libpod/volumes/json",
    "/libpod/volumes/*/json",
    "/libpod/volumes/*/exists",
    "/libpod/pods/json",
    "/libpod/pods/stats",
    "/libpod/pods/*/json",
    "/libpod/pods/*/exists",
    "/libpod/pods/*/top"
  ])
}

/** The compiled rules of a preset, or an error naming the presets that exist. */
export const presetRules = (name: string): ReadonlyArray<AccessRule> | RuleSyntaxError => {
  const lines = Object.hasOwn(PRESETS, name) ? PRESETS[name] : undefined
  if (lines === undefined) {
    return syntax(name, "UnknownPreset", `unknown preset "${name}" (known: ${Object.keys(PRESETS).join(", ")})`)
  }
  const out: Array<AccessRule> = []
  for (const line of lines) {
    const rule = parseRule(line)
    if (rule instanceof RuleSyntaxError) return rule
    out.push({ ...rule, source: `preset ${name}: ${rule.source}` })
  }
  return out
}
