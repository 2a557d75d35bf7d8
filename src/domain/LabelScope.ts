/**
 * The socket proxy's label scope, as pure functions: the `KEY=VALUE` label, which Docker API calls a
 * scope has to look at (lists filtered, per-container and per-exec calls resolved, creates labelled,
 * calls it cannot scope refused), the rewrite of a list's `filters` query and the labelled rewrite of a
 * create body. No I/O: resolving a name to a container is `services/front/ScopeResolver.ts`.
 */
import { Buffer } from "node:buffer"
import { foldKey, isJsonError, parseStrictJson, parseStrictJsonText } from "./StrictJson.ts"

/** The label every container of a scope carries. */
export interface ContainerLabel {
  readonly key: string
  readonly value: string
}

/** Longest label key or value accepted in the configuration. */
export const MAX_LABEL_LENGTH = 256

/** Parses `KEY=VALUE` (the value may be empty; the key may not, nor hold `=` or control characters). */
export const parseContainerLabel = (text: string): ContainerLabel | string => {
  const eq = text.indexOf("=")
  if (eq <= 0) return `expected KEY=VALUE, got ${JSON.stringify(text)}`
  const key = text.slice(0, eq)
  const value = text.slice(eq + 1)
  if (key.length > MAX_LABEL_LENGTH || value.length > MAX_LABEL_LENGTH) return `a label key or value longer than ${MAX_LABEL_LENGTH} characters`
  if (/[\x00-\x20\x7f]/.test(key) || /[\x00-\x1f\x7f]/.test(value)) return `a label with whitespace in its key or control characters, got ${JSON.stringify(text)}`
  return { key, value }
}

/** The label as a `label` filter value. */
export const labelFilterValue = (label: ContainerLabel): string => `${label.key}=${label.value}`

/** Whether a container's labels (its `Config.Labels`) put it in the scope. */
export const labelsInScope = (label: ContainerLabel, labels: unknown): boolean =>
  labels !== null && typeof labels === "object" && !Array.isArray(labels) &&
  Object.hasOwn(labels, label.key) && (labels as Record<string, unknown>)[label.key] === label.value

/** What a scope does with one request (canonical path, no version prefix). */
export type ScopedCall =
  /** A list or prune whose `filters` query gets the label filter added. */
  | { readonly _tag: "Filter" }
  /** A call on one container, named by `name` (a name, an id or an id prefix): resolved, then pinned. */
  | { readonly _tag: "Container"; readonly prefix: string; readonly name: string; readonly action: string }
  /** A call on one exec instance: its container must be in scope. */
  | { readonly _tag: "Exec"; readonly prefix: string; readonly id: string; readonly action: string }
  /** A create whose body gets the label added. */
  | { readonly _tag: "Label" }
  /** A call that names containers where the scope cannot see them: refused. */
  | { readonly _tag: "Refuse"; readonly reason: string }
  /** Nothing to do for the scope. */
  | { readonly _tag: "Pass" }

const FILTER: ScopedCall = { _tag: "Filter" }
const LABEL: ScopedCall = { _tag: "Label" }
const PASS: ScopedCall = { _tag: "Pass" }
const refuse = (reason: string): ScopedCall => ({ _tag: "Refuse", reason })

/** Calls whose target list the `label` filter narrows, by method and path. */
const FILTERED: ReadonlyArray<readonly [string, RegExp]> = [
  ["GET", /^(?:\/libpod)?\/containers\/json\/?$/],
  ["HEAD", /^(?:\/libpod)?\/containers\/json\/?$/],
  ["POST", /^(?:\/libpod)?\/containers\/prune\/?$/],
  ["GET", /^(?:\/libpod)?\/events\/?$/],
  ["GET", /^(?:\/libpod)?\/networks(?:\/json)?\/?$/],
  ["POST", /^(?:\/libpod)?\/networks\/prune\/?$/],
  ["GET", /^(?:\/libpod)?\/volumes(?:\/json)?\/?$/],
  ["POST", /^(?:\/libpod)?\/volumes\/prune\/?$/]
]

/** Creates whose body gets the label (Docker's shapes: a top-level `Labels` map). */
const LABELLED: ReadonlyArray<RegExp> = [/^\/containers\/create\/?$/, /^\/networks\/create\/?$/, /^\/volumes\/create\/?$/]

/** Paths that act on containers without naming one in the path: not scoped, so refused. */
const UNSCOPED: ReadonlyArray<readonly [RegExp, string]> = [
  [/^(?:\/libpod)?\/commit\/?$/, "commit names its container in the query"],
  [/^(?:\/libpod)?\/networks\/.+\/(?:connect|disconnect)\/?$/, "network connect and disconnect name their container in the body"],
  [/^\/libpod\/containers\/create\/?$/, "Podman's native create body is not labelled"],
  [/^\/libpod\/(?:pods|generate|play|kube|manifests\/.+\/push|containers\/stats|containers\/showmounted)(?:\/|$)/, "this libpod call reaches containers the scope cannot check"]
]

/** Actions of two segments (`/containers/{name}/attach/ws`). */
const TWO_SEGMENT_ACTIONS: ReadonlySet<string> = new Set(["attach/ws"])

/** Splits `/containers/{name}/{action}` (or `DELETE /containers/{name}`); `undefined` when it has no name. */
const containerParts = (method: string, rest: string): { readonly name: string; readonly action: string } | undefined => {
  const trimmed = rest.endsWith("/") ? rest.slice(0, -1) : rest
  if (trimmed.length === 0) return undefined
  if (method === "DELETE") return { name: trimmed, action: "" }
  for (const two of TWO_SEGMENT_ACTIONS) {
    if (trimmed.endsWith("/" + two) && trimmed.length > two.length + 1) return { name: trimmed.slice(0, -two.length - 1), action: two }
  }
  const slash = trimmed.lastIndexOf("/")
  if (slash <= 0) return undefined
  return { name: trimmed.slice(0, slash), action: trimmed.slice(slash + 1) }
}

/**
 * What the scope does with `method path`. The Engine's router reads a container name across segments
 * (`{name:.*}`), so the name is everything between `/containers/` and the action; the resolved call is
 * forwarded with the container's full id in its place, so the Engine cannot read it otherwise.
 */
export const scopedCall = (method: string, path: string): ScopedCall => {
  for (const [m, pattern] of FILTERED) if (m === method && pattern.test(path)) return FILTER
  if (method === "POST") for (const pattern of LABELLED) if (pattern.test(path)) return LABEL
  for (const [pattern, reason] of UNSCOPED) if (pattern.test(path)) return refuse(reason)
  const container = /^(\/libpod)?\/containers\/(.*)$/.exec(path)
  if (container !== null) {
    const rest = container[2]!
    if (/^(?:json|create|prune)\/?$/.test(rest)) return refuse("this container call is not available through a label scope")
    const parts = containerParts(method, rest)
    if (parts === undefined) return refuse("a container call without a container name")
    return { _tag: "Container", prefix: container[1] ?? "", name: parts.name, action: parts.action }
  }
  const exec = /^(\/libpod)?\/exec\/(.*)$/.exec(path)
  if (exec !== null) {
    const parts = containerParts(method, exec[2]!)
    if (parts === undefined || parts.action === "") return refuse("an exec call without an exec id")
    return { _tag: "Exec", prefix: exec[1] ?? "", id: parts.name, action: parts.action }
  }
  return PASS
}

/** Encodes a path segment as the canonical target does (keeps `:`, `@`, ...). */
const encodeSegment = (segment: string): string =>
  encodeURIComponent(segment).replace(/%(?:3A|40|21|24|26|27|28|29|2A|2B|2C|3B|3D)/g, decodeURIComponent)

/** The upstream target of a resolved call: the version prefix, the pinned id, the action and the query. */
export const pinnedTarget = (
  apiVersion: string | undefined,
  prefix: string,
  kind: "containers" | "exec",
  id: string,
  action: string,
  query: string,
  hadQuery: boolean
): string =>
  `${apiVersion === undefined ? "" : `/v${apiVersion}`}${prefix}/${kind}/${encodeSegment(id)}${action === "" ? "" : `/${action}`}${hadQuery ? `?${query}` : ""}`

/** The Engine's path for inspecting a container or exec by what the client named it (each segment encoded). */
export const inspectPath = (kind: "containers" | "exec", name: string): string =>
  `/${kind}/${name.split("/").map(encodeSegment).join("/")}/json`

/** A query the scope refuses to rewrite (the Engine could read it otherwise than the rewrite). */
export interface QueryRejection {
  readonly _tag: "QueryRejection"
  readonly reason: string
}

const decodeForm = (s: string): string | undefined => {
  try {
    return decodeURIComponent(s.replace(/\+/g, " "))
  } catch {
    return undefined
  }
}

/** Longest `filters` value read. */
export const MAX_FILTERS_LENGTH = 64 * 1024

/**
 * Adds the label to a query's `filters` (Docker's JSON map, as `{"k":["v"]}` or `{"k":{"v":true}}`),
 * written back as `{"k":["v",...]}` (the form Docker and Podman both read) in place of the client's.
 * Every other parameter is kept as sent. Refused: a `;` (Go's query parser drops such pairs), more
 * than one `filters`, bad percent-encoding, or a `filters` that is not such a map.
 */
export const scopeFilters = (query: string, label: ContainerLabel): string | QueryRejection => {
  const kept: Array<string> = []
  let filters: string | undefined
  for (const part of query.split("&")) {
    if (part.length === 0) continue
    if (part.includes(";")) return { _tag: "QueryRejection", reason: "a query with ; is not accepted" }
    const eq = part.indexOf("=")
    const key = decodeForm(eq === -1 ? part : part.slice(0, eq))
    const value = decodeForm(eq === -1 ? "" : part.slice(eq + 1))
    if (key === undefined || value === undefined) return { _tag: "QueryRejection", reason: "malformed percent-encoding in the query" }
    if (key !== "filters") {
      kept.push(part)
      continue
    }
    if (filters !== undefined) return { _tag: "QueryRejection", reason: "more than one filters parameter" }
    filters = value
  }
  const merged: Record<string, Array<string>> = {}
  if (filters !== undefined && filters.trim().length > 0) {
    if (filters.length > MAX_FILTERS_LENGTH) return { _tag: "QueryRejection", reason: `filters longer than ${MAX_FILTERS_LENGTH} characters` }
    const strict = parseStrictJsonText(filters)
    if (isJsonError(strict)) return { _tag: "QueryRejection", reason: `filters is not read: ${strict.message}` }
    const parsed: unknown = JSON.parse(filters)
    if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) return { _tag: "QueryRejection", reason: "filters must be a JSON object" }
    for (const [name, values] of Object.entries(parsed as Record<string, unknown>)) {
      if (Array.isArray(values) && values.every((v) => typeof v === "string")) {
        merged[name] = [...values as Array<string>]
      } else if (values !== null && typeof values === "object" && !Array.isArray(values) && Object.values(values).every((v) => typeof v === "boolean")) {
        merged[name] = Object.keys(values)
      } else {
        return { _tag: "QueryRejection", reason: `filters.${name} must be a list of strings or a map of booleans` }
      }
    }
  }
  const wanted = labelFilterValue(label)
  const labels = merged["label"] ?? []
  if (!labels.includes(wanted)) labels.push(wanted)
  merged["label"] = labels
  kept.push(`filters=${encodeURIComponent(JSON.stringify(merged))}`)
  return kept.join("&")
}

/** The outcome of labelling a create body. */
export type LabelledBody =
  | { readonly _tag: "Unchanged" }
  | { readonly _tag: "Rewritten"; readonly body: Buffer }
  | { readonly _tag: "Refuse"; readonly status: 400 | 403; readonly reason: string }

const WS = new Set([0x20, 0x09, 0x0a, 0x0d])

/** Index after the JSON string starting at `i` (a `"`). */
const skipString = (b: Uint8Array, i: number): number => {
  for (let j = i + 1; j < b.length; j++) {
    if (b[j] === 0x5c) j++
    else if (b[j] === 0x22) return j + 1
  }
  return b.length
}

const skipWs = (b: Uint8Array, i: number): number => {
  while (i < b.length && WS.has(b[i]!)) i++
  return i
}

/** Index after the JSON value starting at `i` (the body was already read as valid JSON). */
const skipValue = (b: Uint8Array, i: number): number => {
  const c = b[i]
  if (c === 0x22) return skipString(b, i)
  if (c === 0x7b || c === 0x5b) {
    let depth = 0
    for (let j = i; j < b.length; j++) {
      const d = b[j]!
      if (d === 0x22) j = skipString(b, j) - 1
      else if (d === 0x7b || d === 0x5b) depth++
      else if (d === 0x7d || d === 0x5d) {
        depth--
        if (depth === 0) return j + 1
      }
    }
    return b.length
  }
  let j = i
  while (j < b.length && b[j] !== 0x2c && b[j] !== 0x7d && b[j] !== 0x5d && !WS.has(b[j]!)) j++
  return j
}

/** The top-level members of a JSON object body: each key (decoded) and where its value lies. */
const topLevelMembers = (b: Uint8Array): Array<{ readonly key: string; readonly start: number; readonly end: number }> | undefined => {
  let i = skipWs(b, 0)
  if (b[i] !== 0x7b) return undefined
  i = skipWs(b, i + 1)
  const members: Array<{ key: string; start: number; end: number }> = []
  if (b[i] === 0x7d) return members
  for (;;) {
    if (b[i] !== 0x22) return undefined
    const keyEnd = skipString(b, i)
    const key = JSON.parse(Buffer.from(b.subarray(i, keyEnd)).toString("utf8")) as string
    i = skipWs(b, keyEnd)
    if (b[i] !== 0x3a) return undefined
    const start = skipWs(b, i + 1)
    const end = skipValue(b, start)
    members.push({ key, start, end })
    i = skipWs(b, end)
    if (b[i] === 0x7d) return members
    if (b[i] !== 0x2c) return undefined
    i = skipWs(b, i + 1)
  }
}

const LABELS = foldKey("Labels")

const splice = (b: Uint8Array, start: number, end: number, insert: string): Buffer =>
  Buffer.concat([b.subarray(0, start), Buffer.from(insert, "utf8"), b.subarray(end)])

/**
 * Adds the scope's label to a create body (a JSON object, read strictly: duplicate keys are refused):
 * inserted as the first entry of its top-level `Labels` map (the key Go matches in any case), or as a
 * new `Labels` first in the object, or in place of a `null`; every other byte is kept. A body that
 * already carries the label unchanged is forwarded as is; one that gives the label another value is
 * refused (403), as is a `Labels` that is not a map (400).
 */
export const labelBody = (body: Uint8Array, label: ContainerLabel): LabelledBody => {
  const strict = parseStrictJson(body)
  if (isJsonError(strict)) return { _tag: "Refuse", status: 400, reason: `the body is not read: ${strict.message} (at ${strict.offset})` }
  const members = topLevelMembers(body)
  if (members === undefined) return { _tag: "Refuse", status: 400, reason: "the body must be a JSON object" }
  const entry = `${JSON.stringify(label.key)}:${JSON.stringify(label.value)}`
  const labels = members.find((m) => foldKey(m.key) === LABELS)
  if (labels === undefined) {
    const open = skipWs(body, 0)
    return { _tag: "Rewritten", body: splice(body, open + 1, open + 1, `"Labels":{${entry}}${members.length > 0 ? "," : ""}`) }
  }
  const text = Buffer.from(body.subarray(labels.start, labels.end)).toString("utf8")
  const value: unknown = JSON.parse(text)
  if (value === null) return { _tag: "Rewritten", body: splice(body, labels.start, labels.end, `{${entry}}`) }
  if (typeof value !== "object" || Array.isArray(value)) return { _tag: "Refuse", status: 400, reason: `${labels.key} must be a map of strings` }
  if (Object.hasOwn(value, label.key)) {
    return (value as Record<string, unknown>)[label.key] === label.value
      ? { _tag: "Unchanged" }
      : { _tag: "Refuse", status: 403, reason: `${labels.key}.${label.key} must be ${JSON.stringify(label.value)} (the label scope of this proxy)` }
  }
  const empty = Object.keys(value).length === 0
  return { _tag: "Rewritten", body: splice(body, labels.start + 1, labels.start + 1, `${entry}${empty ? "" : ","}`) }
}
