/**
 * The socket proxy's learning mode, as pure functions: the log line written for each request the rules
 * or the body policy would have refused, reading those lines back from a log (logfmt or JSON), and the
 * smallest rule set that allows what was seen (ids and names replaced by globs, methods merged per
 * path), with the body-policy switches the refused bodies needed. No I/O and no state: the proxy keeps
 * what it saw in a `Learned` set.
 */
import type { BodyCheck } from "./BodyPolicy.ts"

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
    return { _tag: "Body", ...ruleSet, method: r["method"], path: r["path"], field: r["field"], check: r["check"] as BodyCheck, reason: r["reason"] }
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
  /** List switches (capabilities, bind sources) to review: the field and what was refused. */
  readonly bodyLists: ReadonlyArray<{ readonly check: BodyCheck; readonly field: string; readonly reason: string }>
}

/** The smallest rule set (and body switches) that would have allowed every learned request. */
export const learnRules = (requests: Iterable<LearnedRequest>): LearnedRules => {
  const byGlob = new Map<string, Set<string>>()
  const switches = new Set<BodyCheck>()
  const lists = new Map<string, { check: BodyCheck; field: string; reason: string }>()
  for (const r of requests) {
    if (r._tag === "Body") {
      if (LIST_CHECKS.has(r.check)) lists.set(`${r.check}\n${r.field}\n${r.reason}`, { check: r.check, field: r.field, reason: r.reason })
      else switches.add(r.check)
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
  return { rules, bodySwitches: [...switches].sort(), bodyLists: [...lists.values()] }
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
    for (const l of learned.bodyLists) lines.push(`  # ${l.check}: ${l.field}: ${l.reason}`)
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
    const key = request._tag === "Rule" ? `${request.method} ${pathGlob(request.path)}` : `${request.check}\n${request.field}\n${request.reason}`
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
