/**
 * The wsp wire messages: the `"<id>_<size>"` greeting and the request/response heads, encoded exactly
 * as Go's `encoding/json` writes wsp's `HTTPRequest`/`HTTPResponse` structs and decoded with Go's
 * rules (case-insensitive field names, unknown fields ignored, `null` leaves the zero value).
 * Pure: strings in, plain data or a typed error out. Bodies are not handled here.
 */
import { Schema } from "effect"
import { HOP_BY_HOP } from "./HttpHeaders.ts"

/** Go's `map[string][]string` (`http.Header`); `null` is a nil map. */
export type GoHeader = { readonly [name: string]: ReadonlyArray<string> } | null

/** wsp's `HTTPRequest`: the head sent by the server before the request body message. */
export interface WspRequestHead {
  readonly Method: string
  readonly URL: string
  readonly Header: GoHeader
  /** Go's `int64`: -1 when the length is unknown (chunked). */
  readonly ContentLength: number
}

/** wsp's `HTTPResponse`: the head sent by the client before the response body message. */
export interface WspResponseHead {
  readonly StatusCode: number
  readonly Header: GoHeader
  readonly ContentLength: number
}

/** The greeting a client sends once per connection: its pool id and wanted idle pool size. */
export interface WspGreeting {
  readonly id: string
  readonly size: number
}

/** Limits applied while decoding a head; each is a named bound, never a literal in logic. */
export interface WspHeadLimits {
  /** Largest head text accepted, in UTF-16 code units. */
  readonly maxHeadLength: number
  /** Most distinct header names accepted in one head. */
  readonly maxHeaderCount: number
  /** Most values accepted across all header names in one head. */
  readonly maxHeaderValues: number
}

/** Defaults for {@link WspHeadLimits}: generous for real traffic, small enough to bound memory. */
export const defaultHeadLimits: WspHeadLimits = {
  maxHeadLength: 1024 * 1024,
  maxHeaderCount: 256,
  maxHeaderValues: 1024
}

/** A wsp message that cannot be accepted; the connection carrying it is closed. */
export class WspMessageError extends Schema.TaggedError<WspMessageError>()("WspMessageError", {
  reason: Schema.Literals([
    "MalformedJson",
    "NotAnObject",
    "WrongFieldType",
    "HeadTooLarge",
    "TooManyHeaders",
    "MalformedGreeting"
  ]),
  message: Schema.String
}) {}

// ---------------------------------------------------------------------------------------------
// Go-compatible JSON encoding

const hex = "0123456789abcdef"

/**
 * A JSON string literal exactly as Go's encoder writes it: HTML-sensitive `<`, `>`, `&` and the
 * line separators U+2028/U+2029 escaped as `\u00XX`/`\u20XX`, control characters as `\n`, `\r`,
 * `\t` or `\u00XX`, and unpaired surrogates (invalid UTF-8 in Go) as U+FFFD. Backspace and form feed
 * are `\u0008`/`\u000c` as in Go up to 1.21 (Go 1.22 writes `\b`/`\f`; both decode the same).
 */
export const encodeGoString = (s: string): string => {
  let out = "\""
  let start = 0
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i)
    let escaped: string | undefined
    if (c < 0x20 || c === 0x22 || c === 0x5c || c === 0x3c || c === 0x3e || c === 0x26) {
      switch (c) {
        case 0x22: escaped = "\\\""; break
        case 0x5c: escaped = "\\\\"; break
        case 0x0a: escaped = "\\n"; break
        case 0x0d: escaped = "\\r"; break
        case 0x09: escaped = "\\t"; break
        default: escaped = "\\u00" + hex[c >> 4] + hex[c & 0xf]
      }
    } else if (c === 0x2028 || c === 0x2029) {
      escaped = c === 0x2028 ? "\\u2028" : "\\u2029"
    } else if (c >= 0xd800 && c <= 0xdfff) {
      const next = i + 1 < s.length ? s.charCodeAt(i + 1) : 0
      if (c <= 0xdbff && next >= 0xdc00 && next <= 0xdfff) {
        i++
        continue
      }
      escaped = "\\ufffd"
    }
    if (escaped !== undefined) {
      out += s.slice(start, i) + escaped
      start = i + 1
    }
  }
  return out + s.slice(start) + "\""
}

/**
 * Go sorts map keys by their UTF-8 bytes, which is code-point order. UTF-16 code-unit order (`<`)
 * differs only when a surrogate pair meets a character in U+E000..U+FFFF, so compare code points.
 */
const byGoKeyOrder = (a: string, b: string): number => {
  const n = Math.min(a.length, b.length)
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i)
    const y = b.charCodeAt(i)
    if (x === y) continue
    if (x < 0xd800 && y < 0xd800) return x - y
    return (a.codePointAt(i) ?? x) - (b.codePointAt(i) ?? y)
  }
  return a.length - b.length
}

/** `http.Header` as Go's encoder writes it: `null` for a nil map, keys sorted, `null` for nil slices. */
export const encodeGoHeader = (header: GoHeader): string => {
  if (header === null) return "null"
  const names = Object.keys(header).sort(byGoKeyOrder)
  let out = "{"
  for (let n = 0; n < names.length; n++) {
    const name = names[n]!
    const values = header[name]
    if (n > 0) out += ","
    out += encodeGoString(name) + ":"
    if (values === null || values === undefined) {
      out += "null"
      continue
    }
    out += "["
    for (let v = 0; v < values.length; v++) {
      if (v > 0) out += ","
      out += encodeGoString(values[v]!)
    }
    out += "]"
  }
  return out + "}"
}

/** The request head text message, byte for byte what wsp's Go server sends. */
export const encodeRequestHead = (head: WspRequestHead): string =>
  `{"Method":${encodeGoString(head.Method)},"URL":${encodeGoString(head.URL)},"Header":${
    encodeGoHeader(head.Header)
  },"ContentLength":${Math.trunc(head.ContentLength)}}`

/** The response head text message, byte for byte what wsp's Go client sends. */
export const encodeResponseHead = (head: WspResponseHead): string =>
  `{"StatusCode":${Math.trunc(head.StatusCode)},"Header":${encodeGoHeader(head.Header)},"ContentLength":${
    Math.trunc(head.ContentLength)
  }}`

// ---------------------------------------------------------------------------------------------
// Go-compatible JSON decoding

type FieldKind = "string" | "int" | "header"

const fail = (reason: WspMessageError["reason"], message: string): WspMessageError =>
  new WspMessageError({ reason, message })

const decodeHeader = (value: unknown, limits: WspHeadLimits): GoHeader | WspMessageError => {
  if (value === null) return null
  if (typeof value !== "object" || Array.isArray(value)) {
    return fail("WrongFieldType", "Header must be an object of string arrays")
  }
  // null prototype: a header called "__proto__" is just a header
  const out: Record<string, ReadonlyArray<string>> = Object.create(null)
  let names = 0
  let values = 0
  for (const [name, list] of Object.entries(value as Record<string, unknown>)) {
    if (++names > limits.maxHeaderCount) {
      return fail("TooManyHeaders", `more than ${limits.maxHeaderCount} header names`)
    }
    if (list === null) {
      out[name] = []
      continue
    }
    if (!Array.isArray(list)) return fail("WrongFieldType", `Header[${JSON.stringify(name)}] must be an array`)
    values += list.length
    if (values > limits.maxHeaderValues) {
      return fail("TooManyHeaders", `more than ${limits.maxHeaderValues} header values`)
    }
    for (const v of list) {
      if (typeof v !== "string") {
        return fail("WrongFieldType", `Header[${JSON.stringify(name)}] must hold strings`)
      }
    }
    out[name] = list as Array<string>
  }
  return out
}

/**
 * Decodes a JSON object into the named fields the way Go's `json.Unmarshal` fills a struct: an exact
 * name match wins, otherwise a case-insensitive one; unknown fields are ignored; `null` keeps the
 * zero value. Integers must be whole numbers within the safe range (Go's int64, as far as a double
 * can tell).
 */
const decodeStruct = <Fields extends Record<string, FieldKind>>(
  text: string,
  fields: Fields,
  zero: { [K in keyof Fields]: unknown },
  limits: WspHeadLimits
): Record<keyof Fields, unknown> | WspMessageError => {
  if (text.length > limits.maxHeadLength) {
    return fail("HeadTooLarge", `head of ${text.length} characters exceeds ${limits.maxHeadLength}`)
  }
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch (e) {
    return fail("MalformedJson", `head is not valid JSON: ${(e as Error).message}`)
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    return fail("NotAnObject", "head must be a JSON object")
  }
  const out: Record<string, unknown> = { ...zero }
  const names = Object.keys(fields)
  const lowered = names.map((n) => n.toLowerCase())
  const exactSeen = new Set<string>()
  for (const [key, value] of Object.entries(parsed as Record<string, unknown>)) {
    let name: string | undefined
    if (key in fields) {
      name = key
      exactSeen.add(key)
    } else {
      const i = lowered.indexOf(key.toLowerCase())
      if (i >= 0 && !exactSeen.has(names[i]!)) name = names[i]
    }
    if (name === undefined || value === null) continue
    switch (fields[name]) {
      case "string":
        if (typeof value !== "string") return fail("WrongFieldType", `${name} must be a string`)
        out[name] = value
        break
      case "int":
        if (typeof value !== "number" || !Number.isSafeInteger(value)) {
          return fail("WrongFieldType", `${name} must be an integer`)
        }
        out[name] = value
        break
      case "header": {
        const header = decodeHeader(value, limits)
        if (header instanceof WspMessageError) return header
        out[name] = header
        break
      }
    }
  }
  return out as Record<keyof Fields, unknown>
}

const requestFields = { Method: "string", URL: "string", Header: "header", ContentLength: "int" } as const
const responseFields = { StatusCode: "int", Header: "header", ContentLength: "int" } as const

/** Decodes a request head text message as wsp's Go client would. */
export const decodeRequestHead = (
  text: string,
  limits: WspHeadLimits = defaultHeadLimits
): WspRequestHead | WspMessageError => {
  const out = decodeStruct(text, requestFields, { Method: "", URL: "", Header: null, ContentLength: 0 }, limits)
  return out instanceof WspMessageError ? out : (out as unknown as WspRequestHead)
}

/** Decodes a response head text message as wsp's Go server would. */
export const decodeResponseHead = (
  text: string,
  limits: WspHeadLimits = defaultHeadLimits
): WspResponseHead | WspMessageError => {
  const out = decodeStruct(text, responseFields, { StatusCode: 0, Header: null, ContentLength: 0 }, limits)
  return out instanceof WspMessageError ? out : (out as unknown as WspResponseHead)
}

// ---------------------------------------------------------------------------------------------
// Greeting

/** The greeting text: `"<id>_<size>"`. */
export const encodeGreeting = (greeting: WspGreeting): string => `${greeting.id}_${greeting.size}`

/** Largest pool size a greeting may announce (Go's `strconv.Atoi` on 64-bit, bounded further here). */
export const maxGreetingPoolSize = 1_000_000

const decimal = /^[+-]?[0-9]+$/

/**
 * Parses a greeting as wsp's server does: the id is the text before the first `_`, the size the text
 * between the first and second `_` (so ids cannot contain `_`), parsed as a base-10 integer.
 */
export const decodeGreeting = (text: string, maxIdLength: number): WspGreeting | WspMessageError => {
  const parts = text.split("_")
  if (parts.length < 2) return fail("MalformedGreeting", "greeting must be \"<id>_<size>\"")
  const id = parts[0]!
  const sizeText = parts[1]!
  if (id.length > maxIdLength) return fail("MalformedGreeting", `pool id longer than ${maxIdLength} characters`)
  if (!decimal.test(sizeText)) return fail("MalformedGreeting", `pool size ${JSON.stringify(sizeText)} is not an integer`)
  const size = Number.parseInt(sizeText, 10)
  if (size < 0 || size > maxGreetingPoolSize) {
    return fail("MalformedGreeting", `pool size ${size} is outside 0..${maxGreetingPoolSize}`)
  }
  return { id, size }
}

// ---------------------------------------------------------------------------------------------
// Header names

const tokenChar = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/

/**
 * Go's `textproto.CanonicalMIMEHeaderKey`: the first letter and every letter after a hyphen upper
 * case, the rest lower case; names holding a character outside the token set are left untouched.
 */
export const canonicalHeaderName = (name: string): string => {
  const known = canonicalNames.get(name)
  if (known !== undefined) return known
  let out = name
  if (tokenChar.test(name)) {
    out = ""
    let upper = true
    for (let i = 0; i < name.length; i++) {
      const ch = name[i]!
      out += upper ? ch.toUpperCase() : ch.toLowerCase()
      upper = ch === "-"
    }
  }
  if (canonicalNames.size >= CANONICAL_NAME_CACHE_ENTRIES) canonicalNames.clear()
  if (name.length <= CANONICAL_NAME_CACHE_MAX_LENGTH) canonicalNames.set(name, out)
  return out
}

/** Most header names whose canonical form is remembered (the set starts over when full). */
export const CANONICAL_NAME_CACHE_ENTRIES = 512
/** Longest header name remembered. */
const CANONICAL_NAME_CACHE_MAX_LENGTH = 64
/** Header names seen recently and their canonical forms (every request repeats most of them). */
const canonicalNames = new Map<string, string>()

/** `http.Header.Get`: the first value of a header, looked up by canonical name, or "". */
export const goHeaderGet = (header: GoHeader, name: string): string => {
  if (header === null) return ""
  const values = header[canonicalHeaderName(name)]
  return values !== undefined && values.length > 0 ? values[0]! : ""
}

// ---------------------------------------------------------------------------------------------
// Hop-by-hop headers

const NOTHING_MORE: ReadonlySet<string> = new Set()

/**
 * A header map without hop-by-hop fields (the forwarding core's list), including those named in
 * `Connection`, and without the names in `alsoDrop` (lower case). wsp forwards these unchanged;
 * switchyard does not.
 */
export const withoutHopByHop = (
  header: GoHeader,
  alsoDrop: ReadonlySet<string> = NOTHING_MORE
): Record<string, ReadonlyArray<string>> => {
  const out: Record<string, ReadonlyArray<string>> = Object.create(null)
  if (header === null) return out
  let named: Set<string> | undefined
  for (const name of Object.keys(header)) {
    if (name.length !== 10 || name.toLowerCase() !== "connection") continue
    named ??= new Set<string>()
    for (const value of header[name]!) {
      for (const token of value.split(",")) {
        const t = token.trim().toLowerCase()
        if (t !== "") named.add(t)
      }
    }
  }
  for (const name of Object.keys(header)) {
    const lower = name.toLowerCase()
    if (HOP_BY_HOP.has(lower) || named?.has(lower) === true || alsoDrop.has(lower)) continue
    out[name] = header[name]!
  }
  return out
}
