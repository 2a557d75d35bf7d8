/**
 * The socket proxy's learning mode, as pure functions: the log line written for each request the rules
 * or the body policy would have refused, reading those lines back from a log (logfmt or JSON), and the
 * smallest rule set that allows what was seen (ids and names replaced by globs, methods merged per
 * path), with the body-policy switches the refused bodies needed. No I/O and no state: the proxy keeps
 * what it saw in a `Learned` set.
 */
import { type BodyCheck, type BodyEndpoint, type BodyPolicy, type BodyVerdict, checkBody, normalizeHostPath } from "./BodyPolicy.ts"

/** One request learning mode let through although it would have been refused. */
export type LearnedRequest =
  | { readonly _tag: "Rule"; readonly ruleSet?: string | undefined; readonly method: string; readonly path: string }
  | {
    readonly _tag: "Body"
    readonly ruleSet?: string | undefined
    readonly method: string
    readonly path: string
    readonly field: string
    readonly check: BodyCheck
    readonly reason: string
    /** For a list switch: the capability or host path to add to it. */
    readonly value?: string | undefined
  }

/** What the log line carries after this marker: the request as JSON. */
export const LEARN_MARKER = "learn: would refuse "

/** The message logged for a request learning mode let through: the reason, then the record. */
export const learnMessage = (ruleSet: string, why: string, request: LearnedRequest): string =>
  `switchyard socket-proxy: rule set "${ruleSet}" in learning mode forwarded ${request.method} ${request.path} (${why}); ${LEARN_MARKER}${JSON.stringify(request)}`

const isString = (v: unknown): v is string => typeof v === "string"

/** The record in a log message, or `undefined`. */
const recordIn = (message: string): LearnedRequest | undefined => {
  const at = message.indexOf(LEARN_MARKER)
  if (at === -1) return undefined
  let v: unknown
  try {
    v = JSON.parse(message.slice(at + LEARN_MARKER.length))
  } catch {
    return undefined
  }
  if (v === null || typeof v !== "object") return undefined
  const r = v as Record<string, unknown>
  if (!isString(r["method"]) || !isString(r["path"]) || !/^[A-Z]+$/.test(r["method"]) || !r["path"].startsWith("/")) return undefined
  const ruleSet = isString(r["ruleSet"]) ? { ruleSet: r["ruleSet"] } : {}
  if (r["_tag"] === "Rule") return { _tag: "Rule", ...ruleSet, method: r["method"], path: r["path"] }
  if (r["_tag"] === "Body" && isString(r["field"]) && isString(r["check"]) && isString(r["reason"])) {
    const value = isString(r["value"]) ? { value: r["value"] } : {}
    return { _tag: "Body", ...ruleSet, method: r["method"], path: r["path"], field: r["field"], check: r["check"] as BodyCheck, reason: r["reason"], ...value }
  }
  return undefined
}

/** The `message` of one log line, logfmt (`message="..."`) or JSON (`{"message": ...}`). */
const messageOf = (line: string): string | undefined => {
  const trimmed = line.trim()
  if (trimmed.startsWith("{")) {
    try {
      const v = JSON.parse(trimmed) as { message?: unknown }
      return isString(v.message) ? v.message : undefined
    } catch {
      return undefined
    }
  }
  const m = /(?:^|\s)message=("(?:[^"\\]|\\.)*"|\S+)/.exec(trimmed)
  if (m === null) return trimmed.includes(LEARN_MARKER) ? trimmed : undefined
  try {
    return m[1]!.startsWith("\"") ? JSON.parse(m[1]!) as string : m[1]
  } catch {
    return undefined
  }
}

/** Every learning record in a log's text (other lines are skipped). */
export const readLearnLog = (text: string): Array<LearnedRequest> => {
  const out: Array<LearnedRequest> = []
  for (const line of text.split("\n")) {
    if (!line.includes("learn: would refuse")) continue
    const message = messageOf(line)
    const record = message === undefined ? undefined : recordIn(message)
    if (record !== undefined) out.push(record)
  }
  return out
}

/** Kinds of object whose calls name one by id or name in the second segment. */
const OBJECTS = "containers|exec|networks|volumes|services|tasks|nodes|secrets|configs|plugins|pods|swarm"
/** Second segments that are calls of their own, not an object's name. */
const FIXED = /^(?:json|create|prune|search|load|get|build|stats|exists|kube|play|update|init|join|leave|unlock|unlockkey)$/

/**
 * The glob a rule uses for `path`: the object's name or id becomes `*` (`**` for images, whose names
 * hold `/`), the rest is kept. A path with characters that globs read (`*`, `?`, `~`) is kept as a
 * regex rule instead.
 */
export const pathGlob = (path: string): string => {
  const escaped = /[*?~\s]/.test(path)
  if (escaped) {
    const regex = path.replace(/[.*+?^${}()|[\]\\]/g, "\\$&").replace(/\s/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`)
    return `~^${regex}$`
  }
  const image = /^(\/libpod)?\/images\/(.+?)(?:\/(json|history|push|tag|get))?$/.exec(path)
  if (image !== null) {
    if (image[3] === undefined && FIXED.test(image[2]!)) return path
    return `${image[1] ?? ""}/images/**${image[3] === undefined ? "" : `/${image[3]}`}`
  }
  const distribution = /^(\/libpod)?\/distribution\/.+\/json$/.exec(path)
  if (distribution !== null) return `${distribution[1] ?? ""}/distribution/**/json`
  const object = new RegExp(`^(/libpod)?/(${OBJECTS})/([^/]+)(/.+)?$`).exec(path)
  if (object !== null && !FIXED.test(object[3]!)) return `${object[1] ?? ""}/${object[2]}/*${object[4] ?? ""}`
  return path
}

/** Methods in the order rules list them. */
const METHOD_ORDER = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
const methodRank = (m: string) => {
  const i = METHOD_ORDER.indexOf(m)
  return i === -1 ? METHOD_ORDER.length : i
}

/** Body-policy switches that are lists, and what each learned refusal needs added. */
const LIST_CHECKS: ReadonlySet<BodyCheck> = new Set(["allowCapabilities", "allowBindSources"])

/** The suggestion built from learned requests. */
export interface LearnedRules {
  /** Allow rules, one per path glob with its methods merged, sorted by path. */
  readonly rules: ReadonlyArray<string>
  /** Boolean body-policy switches the refused bodies needed. */
  readonly bodySwitches: ReadonlyArray<BodyCheck>
  /** List switches (capabilities, bind sources) and the values the refused bodies needed in them. */
  readonly bodyLists: ReadonlyArray<{ readonly check: BodyCheck; readonly values: ReadonlyArray<string> }>
}

/** Most times one body is checked again with one more switch on, in learning mode. */
export const MAX_LEARN_PASSES = 32

type Refusal = Extract<BodyVerdict, { _tag: "Refuse" }>

/** What the body policy refused of one body, switch by switch, and its verdict with all those switches on. */
export interface LearnedBody {
  /** Each refusal, with the value a list switch needs (a capability, a host path). */
  readonly refusals: ReadonlyArray<{ readonly verdict: Refusal; readonly value: string | undefined }>
  /** `Allow` when the switches learned allow the body; else a refusal no switch allows (the engine's socket, an unreadable body). */
  readonly verdict: BodyVerdict
}

const CAPABILITY_REFUSAL = /^capability ("(?:[^"\\]|\\.)*") is not in the allowed list$/
const BIND_REFUSAL = /^host path ("(?:[^"\\]|\\.)*") is not under an allowed bind source$/

/** `policy` with the switch that `refusal` names turned on (or its value added), or `undefined` when none would allow it. */
const relax = (policy: BodyPolicy, refusal: Refusal): { readonly policy: BodyPolicy; readonly value: string | undefined } | undefined => {
  const check = refusal.check
  if (check === undefined) return undefined
  if (check === "allowCapabilities") {
    const m = CAPABILITY_REFUSAL.exec(refusal.reason)
    if (m === null) return undefined
    const cap = JSON.parse(m[1]!) as string
    return { policy: { ...policy, allowCapabilities: [...policy.allowCapabilities, cap] }, value: cap }
  }
  if (check === "allowBindSources") {
    const m = BIND_REFUSAL.exec(refusal.reason)
    const path = m === null ? undefined : normalizeHostPath(JSON.parse(m[1]!) as string)
    if (path === undefined || policy.allowBindSources.includes(path)) return undefined
    return { policy: { ...policy, allowBindSources: [...policy.allowBindSources, path] }, value: path }
  }
  if (policy[check]) return undefined
  return { policy: { ...policy, [check]: true }, value: undefined }
}

/**
 * Learning mode's reading of a body: checked, and after each refusal checked again with the switch
 * that refused it turned on (a capability or host path added to its list), so that every switch the
 * body needs is found, not only the first. Refusals no switch allows end it.
 */
export const learnBody = (policy: BodyPolicy, endpoint: BodyEndpoint, body: Uint8Array): LearnedBody => {
  let current = policy
  const refusals: Array<{ verdict: Refusal; value: string | undefined }> = []
  for (let pass = 0; pass < MAX_LEARN_PASSES; pass++) {
    const verdict = checkBody(current, endpoint, body)
    if (verdict._tag === "Allow" || verdict.status !== 403) return { refusals, verdict }
    const relaxed = relax(current, verdict)
    if (relaxed === undefined) return { refusals, verdict }
    refusals.push({ verdict, value: relaxed.value })
    current = relaxed.policy
  }
  return { refusals, verdict: checkBody(current, endpoint, body) }
}

/** The smallest rule set (and body switches) that would have allowed every learned request. */
export const learnRules = (requests: Iterable<LearnedRequest>): LearnedRules => {
  const byGlob = new Map<string, Set<string>>()
  const switches = new Set<BodyCheck>()
  const lists = new Map<BodyCheck, Set<string>>()
  for (const r of requests) {
    if (r._tag === "Body") {
      if (!LIST_CHECKS.has(r.check)) switches.add(r.check)
      else if (r.value !== undefined) lists.set(r.check, (lists.get(r.check) ?? new Set()).add(r.value))
      continue
    }
    const glob = pathGlob(r.path)
    const methods = byGlob.get(glob) ?? new Set()
    methods.add(r.method)
    byGlob.set(glob, methods)
  }
  const rules = [...byGlob.entries()]
    .sort(([a], [b]) => a < b ? -1 : a > b ? 1 : 0)
    .map(([glob, methods]) => `${[...methods].sort((a, b) => methodRank(a) - methodRank(b) || (a < b ? -1 : 1)).join(",")} ${glob}`)
  const bodyLists = [...lists.entries()].sort(([a], [b]) => a < b ? -1 : 1).map(([check, values]) => ({ check, values: [...values].sort() }))
  return { rules, bodySwitches: [...switches].sort(), bodyLists }
}

/** The suggestion as a config-file fragment (YAML) to review and paste. */
export const renderLearnedRules = (learned: LearnedRules, ruleSet: string): string => {
  const lines = [`# rules learned for rule set "${ruleSet}": review, then add them to the rules (before any deny rule they must pass)`]
  if (learned.rules.length === 0) lines.push("# nothing was refused while learning")
  else {
    lines.push("rules:")
    for (const rule of learned.rules) lines.push(`  - ${JSON.stringify(rule)}`)
  }
  if (learned.bodySwitches.length > 0 || learned.bodyLists.length > 0) {
    lines.push("bodyPolicy:")
    for (const s of learned.bodySwitches) lines.push(`  ${s}: true`)
    for (const l of learned.bodyLists) lines.push(`  ${l.check}: [${l.values.map((v) => JSON.stringify(v)).join(", ")}]`)
  }
  return lines.join("\n") + "\n"
}

/** Most distinct requests a running proxy keeps for its learned rules. */
export const MAX_LEARNED_REQUESTS = 10_000

/** The distinct learned requests of a running proxy, bounded (later ones past the bound are counted, not kept). */
export class Learned {
  private readonly seen = new Map<string, LearnedRequest>()
  /** Requests not kept because the bound was reached. */
  dropped = 0
  add(request: LearnedRequest): void {
    const key = request._tag === "Rule" ? `${request.method} ${pathGlob(request.path)}` : `${request.check}\n${request.value ?? ""}`
    if (this.seen.has(key)) return
    if (this.seen.size >= MAX_LEARNED_REQUESTS) {
      this.dropped++
      return
    }
    this.seen.set(key, request)
  }
  values(): Iterable<LearnedRequest> {
    return this.seen.values()
  }
}
