/**
 * wsp's destination rules: a blacklist (none may match) checked before a whitelist (one must match
 * when it is not empty), each rule an unanchored regex on the method, the URL and named headers.
 * Pure matching; it does not resolve hosts or look at addresses.
 */
import { Schema } from "effect"
import type { GoHeader } from "./WspMessage.ts"
import { goHeaderGet } from "./WspMessage.ts"

/** One rule as written in a wsp config: every present pattern must match (Go `regexp` syntax). */
export interface RuleSpec {
  readonly method?: string | undefined
  readonly url?: string | undefined
  readonly headers?: { readonly [name: string]: string } | undefined
}

/** A rule with its patterns compiled. */
export interface CompiledRule {
  readonly spec: RuleSpec
  readonly method: RegExp | undefined
  readonly url: RegExp | undefined
  readonly headers: ReadonlyArray<readonly [name: string, pattern: RegExp]>
}

/** Compiled allow/deny rules. */
export interface DestinationRules {
  readonly blacklist: ReadonlyArray<CompiledRule>
  readonly whitelist: ReadonlyArray<CompiledRule>
}

/** What a check decided, with wsp's wording for refusals. */
export type RuleVerdict =
  | { readonly _tag: "Allowed" }
  | { readonly _tag: "Forbidden"; readonly message: "Destination is forbidden"; readonly rule: RuleSpec }
  | { readonly _tag: "NotAllowed"; readonly message: "Destination is not allowed" }

/** A pattern that is not a valid regular expression. */
export class RulePatternError extends Schema.TaggedError<RulePatternError>()("RulePatternError", {
  reason: Schema.Literals(["InvalidPattern"]),
  field: Schema.String,
  pattern: Schema.String,
  message: Schema.String
}) {}

const goFlagPrefix = /^\(\?([imsU]+)\)/

/**
 * Compiles a Go `regexp` pattern to a JavaScript one. The RE2 subset wsp configs use (classes,
 * anchors, alternation, repetition, `(?i)` prefix flags) means the same in both; a leading `(?flags)`
 * group is turned into JavaScript flags. Go's non-greedy swap flag `U` is refused.
 */
export const compileGoPattern = (field: string, pattern: string): RegExp | RulePatternError => {
  let source = pattern
  let flags = ""
  const prefix = goFlagPrefix.exec(pattern)
  if (prefix !== null) {
    if (prefix[1]!.includes("U")) {
      return new RulePatternError({ reason: "InvalidPattern", field, pattern, message: "flag U is not supported" })
    }
    flags = [...new Set(prefix[1]!.split(""))].join("")
    source = pattern.slice(prefix[0].length)
  }
  try {
    return new RegExp(source, flags)
  } catch (e) {
    return new RulePatternError({ reason: "InvalidPattern", field, pattern, message: (e as Error).message })
  }
}

const compileRule = (field: string, spec: RuleSpec): CompiledRule | RulePatternError => {
  const method = spec.method !== undefined && spec.method !== "" ? compileGoPattern(`${field}.method`, spec.method) : undefined
  if (method instanceof RulePatternError) return method
  const url = spec.url !== undefined && spec.url !== "" ? compileGoPattern(`${field}.url`, spec.url) : undefined
  if (url instanceof RulePatternError) return url
  const headers: Array<readonly [string, RegExp]> = []
  for (const [name, pattern] of Object.entries(spec.headers ?? {})) {
    const re = compileGoPattern(`${field}.headers.${name}`, pattern)
    if (re instanceof RulePatternError) return re
    headers.push([name, re])
  }
  return { spec, method, url, headers }
}

/** Compiles both lists; the first bad pattern is reported with the field it sits in. */
export const compileRules = (
  lists: { readonly blacklist?: ReadonlyArray<RuleSpec> | undefined; readonly whitelist?: ReadonlyArray<RuleSpec> | undefined }
): DestinationRules | RulePatternError => {
  const blacklist: Array<CompiledRule> = []
  const whitelist: Array<CompiledRule> = []
  for (const [i, spec] of (lists.blacklist ?? []).entries()) {
    const rule = compileRule(`blacklist[${i}]`, spec)
    if (rule instanceof RulePatternError) return rule
    blacklist.push(rule)
  }
  for (const [i, spec] of (lists.whitelist ?? []).entries()) {
    const rule = compileRule(`whitelist[${i}]`, spec)
    if (rule instanceof RulePatternError) return rule
    whitelist.push(rule)
  }
  return { blacklist, whitelist }
}

/** Rules that allow every destination (wsp's behaviour with no rules configured). */
export const allowAll: DestinationRules = { blacklist: [], whitelist: [] }

/** True when no rule is configured, so every destination is allowed. */
export const isOpen = (rules: DestinationRules): boolean =>
  rules.blacklist.length === 0 && rules.whitelist.length === 0

/** A request as the rules see it. */
export interface RuleSubject {
  readonly method: string
  readonly url: string
  readonly header: GoHeader
}

/** wsp's `Rule.Match`: each present pattern finds a match somewhere in its subject. */
export const ruleMatches = (rule: CompiledRule, subject: RuleSubject): boolean => {
  if (rule.method !== undefined && !rule.method.test(subject.method)) return false
  if (rule.url !== undefined && !rule.url.test(subject.url)) return false
  for (const [name, pattern] of rule.headers) {
    if (!pattern.test(goHeaderGet(subject.header, name))) return false
  }
  return true
}

const allowed: RuleVerdict = { _tag: "Allowed" }

/** Blacklist first (any match refuses), then the whitelist (when present, one must match). */
export const checkDestination = (rules: DestinationRules, subject: RuleSubject): RuleVerdict => {
  for (const rule of rules.blacklist) {
    if (ruleMatches(rule, subject)) return { _tag: "Forbidden", message: "Destination is forbidden", rule: rule.spec }
  }
  if (rules.whitelist.length === 0) return allowed
  for (const rule of rules.whitelist) {
    if (ruleMatches(rule, subject)) return allowed
  }
  return { _tag: "NotAllowed", message: "Destination is not allowed" }
}
