/**
 * A pure, incremental HTTP/1.1 parser for a proxy that moves bodies raw: a bounded head reader for
 * requests and responses (strict: no bare LF, no obs-fold, no CL+TE, one Content-Length, only `chunked`,
 * no duplicated field that framing, routing or a rule reads, no `Connection` naming one of them) and a
 * body-framing tracker that finds where a body ends (Content-Length, chunked with extensions and
 * trailers, close-delimited) without copying or decoding the data. Trailer sections are held (bounded),
 * checked field by field and handed back without the fields that must not be trailers. No I/O, no Node
 * streams, no Effect runtime.
 */
import { Buffer } from "node:buffer"
import { Schema } from "effect"
import { FORBIDDEN_TRAILERS } from "./HttpHeaders.ts"

/** Why a message was refused, and the status a proxy answers with. */
export class Http1Error extends Schema.TaggedError<Http1Error>()("Http1Error", {
  reason: Schema.Literals([
    "MalformedStartLine",
    "MalformedHeader",
    "HeadTooLarge",
    "TooManyHeaders",
    "AmbiguousLength",
    "InvalidContentLength",
    "UnsupportedTransferEncoding",
    "MissingHost",
    "MalformedChunk",
    "DuplicateField",
    "NominatedField",
    "MalformedTarget"
  ]),
  status: Schema.Number,
  message: Schema.String
}) {}

export interface HeadLimits {
  /** Largest head, start line and terminating blank line included (bytes). */
  readonly maxHeaderSize: number
  /** Most header fields in one head. */
  readonly maxHeadersCount: number
}

/** Longest chunk-size line, extensions included (bytes). */
export const MAX_CHUNK_LINE = 4096
/** Most hex digits in a chunk size (2^60 bytes; more cannot be a real body). */
export const MAX_CHUNK_SIZE_DIGITS = 15
/** Longest request method (anything longer is not HTTP). */
export const MAX_METHOD_LENGTH = 32
/** Most decimal digits in a Content-Length. */
export const MAX_CONTENT_LENGTH_DIGITS = 15

/** How a message body ends. */
export type Framing =
  | { readonly _tag: "None" }
  | { readonly _tag: "Length"; readonly length: number }
  | { readonly _tag: "Chunked" }
  | { readonly _tag: "Close" }

const NO_BODY: Framing = { _tag: "None" }
const CHUNKED: Framing = { _tag: "Chunked" }
const CLOSE: Framing = { _tag: "Close" }

/** What both kinds of head share. */
interface HeadFields {
  /** 0 for HTTP/1.0, 1 for HTTP/1.1. */
  readonly versionMinor: number
  /** Flat `[name, value, ...]` as received (values trimmed). */
  readonly headers: Array<string>
  /** Tokens of the `Connection` headers, lower-cased. */
  readonly connection: ReadonlyArray<string>
  /** Whether the connection may carry another message after this one. */
  readonly keepAlive: boolean
  /** The `Upgrade` header's value, when the message asks for (or confirms) an upgrade. */
  readonly upgrade: string | undefined
  /** The head's size on the wire (bytes). */
  readonly size: number
}

export interface RequestHead extends HeadFields {
  readonly method: string
  /** The request target as sent. */
  readonly target: string
  /**
   * The target in origin form (`/path?query`), to forward: the target itself, or the path and query of
   * an absolute-form target (whose authority matched `Host`); `*` for `OPTIONS *`.
   */
  readonly originTarget: string
  readonly host: string | undefined
  readonly contentType: string | undefined
  /** `Expect: 100-continue` was sent. */
  readonly expectContinue: boolean
  readonly framing: Framing
}

export interface ResponseHead extends HeadFields {
  readonly status: number
  readonly reason: string
  /** The Content-Length, when there was one and no Transfer-Encoding (which overrides it). */
  readonly contentLength: number | undefined
  readonly chunked: boolean
  /** Transfer-Encoding present but not ending in chunked: the body runs to the close. */
  readonly closeDelimitedCoding: boolean
  /** The Transfer-Encoding codings as received, joined (`""` when absent). */
  readonly transferCodings: string
}

const fail = (reason: Http1Error["reason"], status: number, message: string): Http1Error => new Http1Error({ reason, status, message })

/** A lookup table of bytes: 1 for those in the inclusive `ranges` and in `chars`. */
const byteTable = (ranges: ReadonlyArray<readonly [number, number]>, chars = ""): Uint8Array => {
  const t = new Uint8Array(256)
  for (const [from, to] of ranges) for (let c = from; c <= to; c++) t[c] = 1
  for (const ch of chars) t[ch.charCodeAt(0)] = 1
  return t
}
const ALNUM = [[0x30, 0x39], [0x41, 0x5a], [0x61, 0x7a]] as const

/** `tchar` of RFC 9110 §5.6.2, as a lookup table. */
const TOKEN: Uint8Array = byteTable(ALNUM, "!#$%&'*+-.^_`|~")

/** Bytes allowed in a field value: HTAB, SP, VCHAR, obs-text. */
const FIELD_VALUE: Uint8Array = byteTable([[0x09, 0x09], [0x20, 0x7e], [0x80, 0xff]])

/** Bytes allowed in a request target: VCHAR only. */
const TARGET: Uint8Array = byteTable([[0x21, 0x7e]])

/** Bytes allowed in the authority of an absolute-form target: unreserved, sub-delims, ":", "@", "[", "]", "%". */
const AUTHORITY: Uint8Array = byteTable(ALNUM, "-._~!$&'()*+,;=:@[]%")

const HEX: Int8Array = (() => {
  const t = new Int8Array(256).fill(-1)
  for (let c = 0; c < 10; c++) t[0x30 + c] = c
  for (let c = 0; c < 6; c++) {
    t[0x41 + c] = 10 + c
    t[0x61 + c] = 10 + c
  }
  return t
})()

/** A latin1 string of `buf[start..end)`. */
const latin1 = (buf: Buffer, start: number, end: number): string => buf.toString("latin1", start, end)

const CR = 13
const LF = 10
const SP = 32
const HTAB = 9
const COLON = 58

const SLASH = 0x2f
const QUESTION = 0x3f
const STAR = 0x2a
const isAlpha = (c: number): boolean => (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a)

/**
 * Whether `buf[start..end)` has the form of a request target other than CONNECT's (RFC 9112 §3.2):
 * origin-form ("/..."), asterisk-form ("*"), or absolute-form with a letters-only scheme and a non-empty
 * authority ("http://host[:port]" then a path or query). Authority-form ("host:port") and anything else
 * are refused, as llhttp does.
 */
const targetFormOk = (s: string, start: number, end: number): boolean => {
  const first = s.charCodeAt(start)
  if (first === SLASH) return true
  if (first === STAR) return end - start === 1
  let i = start
  while (i < end && isAlpha(s.charCodeAt(i))) i++
  if (i === start || end - i < 3 || s.charCodeAt(i) !== COLON || s.charCodeAt(i + 1) !== SLASH || s.charCodeAt(i + 2) !== SLASH) return false
  i += 3
  const authority = i
  for (; i < end && s.charCodeAt(i) !== SLASH && s.charCodeAt(i) !== QUESTION; i++) if (AUTHORITY[s.charCodeAt(i)] !== 1) return false
  return i > authority
}

const isToken = (buf: Uint8Array, start: number, end: number): boolean => {
  if (end <= start) return false
  for (let i = start; i < end; i++) if (TOKEN[buf[i]!] !== 1) return false
  return true
}

/** The error for an LF without its CR anywhere in a head. */
const bareLf = (status: number): Http1Error => fail("MalformedHeader", status, "a bare LF in the head")

/**
 * Header fields of a head's text (latin1, one character per byte), checked character by character;
 * returns the flat list or an error. Every line must end in CRLF.
 */
const parseFields = (
  s: string,
  start: number,
  end: number,
  limits: HeadLimits,
  errorStatus: number
): Array<string> | Http1Error => {
  const headers: Array<string> = []
  let pos = start
  while (pos < end) {
    let eol = s.indexOf("\n", pos)
    if (eol === -1 || eol > end) eol = end
    if (eol === pos || s.charCodeAt(eol - 1) !== CR) return bareLf(errorStatus)
    const lineEnd = eol - 1
    const first = s.charCodeAt(pos)
    if (first === SP || first === HTAB) return fail("MalformedHeader", errorStatus, "obs-fold (a header line starting with whitespace)")
    let colon = pos
    while (colon < lineEnd && TOKEN[s.charCodeAt(colon)] === 1) colon++
    if (colon === pos || colon === lineEnd || s.charCodeAt(colon) !== COLON) {
      const c = s.indexOf(":", pos)
      if (c === -1 || c >= lineEnd) return fail("MalformedHeader", errorStatus, "a header line without a colon")
      return fail("MalformedHeader", errorStatus, "a header name with bad characters or whitespace before the colon")
    }
    let vs = colon + 1
    let ve = lineEnd
    while (vs < ve && (s.charCodeAt(vs) === SP || s.charCodeAt(vs) === HTAB)) vs++
    let tabAfter = false
    while (ve > vs && (s.charCodeAt(ve - 1) === SP || s.charCodeAt(ve - 1) === HTAB)) if (s.charCodeAt(--ve) === HTAB) tabAfter = true
    // llhttp reads "chunked" followed by a tab as some other coding (and refuses the request).
    if (tabAfter && colon - pos === 17 && s.slice(pos, colon).toLowerCase() === "transfer-encoding") {
      return fail("MalformedHeader", errorStatus, "a Transfer-Encoding ending in a tab")
    }
    for (let i = vs; i < ve; i++) {
      if (FIELD_VALUE[s.charCodeAt(i)] !== 1) return fail("MalformedHeader", errorStatus, "a control character in a header value")
    }
    if (headers.length >= limits.maxHeadersCount * 2) {
      // a bare LF anywhere in the head is the first fault, whatever comes before it (400, not 431)
      for (let i = s.indexOf("\n", eol + 1); i !== -1 && i < end; i = s.indexOf("\n", i + 1)) {
        if (s.charCodeAt(i - 1) !== CR) return bareLf(errorStatus)
      }
      return fail("TooManyHeaders", errorStatus === 400 ? 431 : errorStatus, `more than ${limits.maxHeadersCount} headers`)
    }
    headers.push(s.slice(pos, colon), s.slice(vs, ve))
    pos = eol + 1
  }
  return headers
}

/** What the framing headers of a head say, checked for ambiguity. */
interface FramingFields {
  readonly contentLength: number | undefined
  /** Transfer-Encoding codings, lower-cased, in order; empty when absent. */
  readonly codings: ReadonlyArray<string>
  /** How many Transfer-Encoding field lines there were. */
  readonly transferEncodingFields: number
  readonly connection: ReadonlyArray<string>
  /** Tokens of the obsolete `Proxy-Connection` headers, lower-cased (llhttp honours them like `Connection`). */
  readonly proxyConnection: ReadonlyArray<string>
  readonly upgrade: string | undefined
  readonly host: string | undefined
  readonly hostCount: number
  readonly contentType: string | undefined
  readonly contentTypeCount: number
  /** How many fields of the method-override family (`X-HTTP-Method-Override` and its kin) there were, by name. */
  readonly methodOverrideDuplicated: string | undefined
  readonly expectContinue: boolean
}

/**
 * Request fields a `Connection` header may not name: removing them as hop-by-hop would change how the
 * message is framed (Content-Length, Transfer-Encoding), routed (Host) or checked (Content-Type) after the
 * proxy has decided on it. Such a request is refused.
 */
export const UNNOMINATABLE_REQUEST_FIELDS: ReadonlySet<string> = new Set(["content-length", "transfer-encoding", "host", "content-type"])
/** Response fields a `Connection` header may not name (they frame the body the proxy relays). */
export const UNNOMINATABLE_RESPONSE_FIELDS: ReadonlySet<string> = new Set(["content-length", "transfer-encoding"])
/** Header names some frameworks read as a replacement for the request method; one of each at most. */
export const METHOD_OVERRIDE_FIELDS: ReadonlySet<string> = new Set(["x-http-method-override", "x-http-method", "x-method-override"])

const lowerEquals = (name: string, lower: string): boolean => name.length === lower.length && name.toLowerCase() === lower

/**
 * `s` without leading and trailing SP/HTAB (RFC 9110's OWS). Not `String.prototype.trim`, which also
 * drops 0xA0 (NBSP in latin1) and so would read "\xa0chunked" as "chunked" where llhttp sees another coding.
 */
const trimOws = (s: string): string => {
  let start = 0
  let end = s.length
  while (start < end && (s.charCodeAt(start) === SP || s.charCodeAt(start) === HTAB)) start++
  while (end > start && (s.charCodeAt(end - 1) === SP || s.charCodeAt(end - 1) === HTAB)) end--
  return start === 0 && end === s.length ? s : s.slice(start, end)
}

/** Adds the comma-separated tokens of a `Connection`-like value to `into`, lower-cased. */
const connectionTokens = (value: string, into: Array<string>): void => {
  if (value.indexOf(",") === -1) {
    const token = trimOws(value).toLowerCase()
    if (token.length > 0) into.push(token)
    return
  }
  for (const t of value.split(",")) {
    const token = trimOws(t).toLowerCase()
    if (token.length > 0) into.push(token)
  }
}

const framingFields = (headers: ReadonlyArray<string>, errorStatus: number): FramingFields | Http1Error => {
  let contentLength: number | undefined
  let lengths = 0
  const codings: Array<string> = []
  let transferEncodingFields = 0
  const connection: Array<string> = []
  const proxyConnection: Array<string> = []
  let upgrade: string | undefined
  let host: string | undefined
  let hostCount = 0
  let contentType: string | undefined
  let contentTypeCount = 0
  let overrides: Set<string> | undefined
  let methodOverrideDuplicated: string | undefined
  let expectContinue = false
  for (let i = 0; i < headers.length; i += 2) {
    const name = headers[i]!
    const value = headers[i + 1]!
    switch (name.length) {
      case 4:
        if (lowerEquals(name, "host")) {
          host = value
          hostCount++
        }
        break
      case 6:
        if (lowerEquals(name, "expect") && value.toLowerCase() === "100-continue") expectContinue = true
        break
      case 7:
        if (lowerEquals(name, "upgrade")) upgrade = value
        break
      case 10:
        if (lowerEquals(name, "connection")) connectionTokens(value, connection)
        break
      case 16:
        if (lowerEquals(name, "proxy-connection")) connectionTokens(value, proxyConnection)
        break
      case 12:
        if (lowerEquals(name, "content-type")) {
          contentType = value
          contentTypeCount++
        } else if (lowerEquals(name, "content_type")) return underscored(name, errorStatus)
        break
      case 13:
      case 17:
      case 22:
        if (name.length === 17 && lowerEquals(name, "transfer_encoding")) return underscored(name, errorStatus)
        if (name.length === 17 && lowerEquals(name, "transfer-encoding")) {
          transferEncodingFields++
          for (const t of value.split(",")) {
            const coding = trimOws(t).toLowerCase()
            if (coding.length === 0) return fail("AmbiguousLength", errorStatus, "an empty Transfer-Encoding coding")
            codings.push(coding)
          }
          break
        }
        {
          const lower = name.toLowerCase()
          if (METHOD_OVERRIDE_FIELDS.has(lower)) {
            if ((overrides ??= new Set()).has(lower)) methodOverrideDuplicated ??= name
            overrides.add(lower)
          }
        }
        break
      case 14:
        if (lowerEquals(name, "content-length")) {
          lengths++
          if (lengths > 1) return fail("AmbiguousLength", errorStatus, "more than one Content-Length")
          if (!digitsOnly(value, 0, MAX_CONTENT_LENGTH_DIGITS)) {
            return fail("InvalidContentLength", errorStatus, `invalid Content-Length "${value.slice(0, 32)}"`)
          }
          contentLength = Number(value)
        } else if (lowerEquals(name, "content_length")) return underscored(name, errorStatus)
        break
    }
  }
  return {
    contentLength,
    codings,
    transferEncodingFields,
    connection,
    proxyConnection,
    upgrade,
    host,
    hostCount,
    contentType,
    contentTypeCount,
    methodOverrideDuplicated,
    expectContinue
  }
}

/** Characters of a host name or IPv4 address in `Host`. */
const HOST_NAME: Uint8Array = byteTable(ALNUM, "._~-")
/** Characters between the brackets of an IPv6 address in `Host`. */
const IPV6_LITERAL: Uint8Array = byteTable([[0x30, 0x39], [0x41, 0x46], [0x61, 0x66]], ":.")

/**
 * A Host value routes can be matched on: empty, a name or IPv4 address of letters, digits, `.`, `-`, `_`
 * and `~`, or a bracketed IPv6 address, each with an optional port. Commas, spaces, `@`, `/` and the other
 * characters a server might split or decode another way are refused:
 * `(name | "[" ipv6 "]") [":" 1*5DIGIT]`.
 */
export const hostValueOk = (host: string): boolean => {
  const n = host.length
  let i = 0
  if (n > 0 && host.charCodeAt(0) === 0x5b /* [ */) {
    i = 1
    while (i < n && IPV6_LITERAL[host.charCodeAt(i)] === 1) i++
    if (i === 1 || i === n || host.charCodeAt(i) !== 0x5d /* ] */) return false
    i++
  } else {
    while (i < n && HOST_NAME[host.charCodeAt(i)] === 1) i++
  }
  if (i === n) return true
  if (host.charCodeAt(i) !== COLON) return false
  return digitsOnly(host, i + 1, 5)
}

/** Whether `s[from..)` is 1 to `max` ASCII digits. */
const digitsOnly = (s: string, from: number, max: number): boolean => {
  const n = s.length - from
  if (n < 1 || n > max) return false
  for (let i = from; i < s.length; i++) {
    const c = s.charCodeAt(i)
    if (c < 0x30 || c > 0x39) return false
  }
  return true
}

/** Repeated or `Connection`-nominated request fields that a proxy and an upstream could read differently. */
const ambiguousRequestFields = (f: FramingFields): Http1Error | undefined => {
  if (f.hostCount > 1) return fail("MissingHost", 400, "more than one Host")
  if (f.host !== undefined && !hostValueOk(f.host)) return fail("MalformedHeader", 400, `a Host that is not a host name, address or port ("${f.host.slice(0, 64)}")`)
  if (f.contentTypeCount > 1) return fail("DuplicateField", 400, "more than one Content-Type")
  if (f.transferEncodingFields > 1) return fail("DuplicateField", 400, "more than one Transfer-Encoding field")
  if (f.methodOverrideDuplicated !== undefined) return fail("DuplicateField", 400, `more than one ${f.methodOverrideDuplicated}`)
  const named = nominated(f.connection, UNNOMINATABLE_REQUEST_FIELDS)
  if (named !== undefined) return fail("NominatedField", 400, `Connection names ${named}, which cannot be removed in transit`)
  return undefined
}

/**
 * The same field checks as a request head gets here, for a request another parser read (Node's, on the
 * wsp entry and for HTTP/2 clients): more than one Host, Content-Length, Content-Type or
 * Transfer-Encoding field, a repeated method override, or a `Connection` naming one of them.
 */
export const checkRequestFields = (rawHeaders: ReadonlyArray<string>): Http1Error | undefined => {
  const f = framingFields(rawHeaders, 400)
  return f instanceof Http1Error ? f : ambiguousRequestFields(f)
}

/**
 * A field named like a framing field with `_` for `-`: servers that map header names to CGI-style
 * variables (`CONTENT_LENGTH`) read it as the real one, which the proxy did not frame by. Refused.
 */
const underscored = (name: string, errorStatus: number): Http1Error =>
  fail("MalformedHeader", errorStatus, `a header named ${name.slice(0, 32)}, which some servers read as ${name.replace(/_/g, "-")}`)

/** The first of `connection`'s tokens that names a field in `fields`. */
const nominated = (connection: ReadonlyArray<string>, fields: ReadonlySet<string>): string | undefined => {
  for (const token of connection) if (fields.has(token)) return token
  return undefined
}

const keepAliveOf = (versionMinor: number, connection: ReadonlyArray<string>): boolean =>
  versionMinor === 1 ? !connection.includes("close") : connection.includes("keep-alive") && !connection.includes("close")

const HTTP_VERSION_PREFIX = "HTTP/1."

const parseVersion = (s: string, start: number, end: number): number => {
  if (end - start !== 8 || !s.startsWith(HTTP_VERSION_PREFIX, start)) return -1
  const minor = s.charCodeAt(start + 7)
  return minor === 0x30 ? 0 : minor === 0x31 ? 1 : -1
}

/** Parses a complete request head: its text (latin1), ending in CRLFCRLF. */
export const parseRequestHead = (s: string, limits: HeadLimits): RequestHead | Http1Error => {
  const end = s.length
  const eol = s.indexOf("\n")
  if (eol <= 0 || s.charCodeAt(eol - 1) !== CR) return bareLf(400)
  const lineEnd = eol - 1
  const sp1 = s.indexOf(" ")
  const sp2 = sp1 === -1 ? -1 : s.indexOf(" ", sp1 + 1)
  if (sp1 <= 0 || sp1 > MAX_METHOD_LENGTH || sp2 === -1 || sp2 >= lineEnd) return fail("MalformedStartLine", 400, "malformed request line")
  for (let i = 0; i < sp1; i++) if (TOKEN[s.charCodeAt(i)] !== 1) return fail("MalformedStartLine", 400, "malformed request line")
  for (let i = sp1 + 1; i < sp2; i++) if (TARGET[s.charCodeAt(i)] !== 1) return fail("MalformedStartLine", 400, "malformed request target")
  if (sp2 === sp1 + 1) return fail("MalformedStartLine", 400, "empty request target")
  const versionMinor = parseVersion(s, sp2 + 1, lineEnd)
  if (versionMinor === -1) return fail("MalformedStartLine", 400, "unsupported or malformed HTTP version")
  const headers = parseFields(s, eol + 1, end - 2, limits, 400)
  if (headers instanceof Http1Error) return headers
  const f = framingFields(headers, 400)
  if (f instanceof Http1Error) return f
  if (versionMinor === 1 && f.hostCount !== 1) {
    return fail("MissingHost", 400, f.hostCount === 0 ? "an HTTP/1.1 request without Host" : "more than one Host")
  }
  const ambiguous = ambiguousRequestFields(f)
  if (ambiguous !== undefined) return ambiguous
  const method = s.slice(0, sp1)
  const target = s.slice(sp1 + 1, sp2)
  const originTarget = originFormOf(method, target, f.host)
  if (originTarget instanceof Http1Error) return originTarget
  if (method !== "CONNECT" && !targetFormOk(s, sp1 + 1, sp2)) return fail("MalformedTarget", 400, "a request target in no form a request may take")
  let framing: Framing = NO_BODY
  if (f.codings.length > 0) {
    if (f.contentLength !== undefined) return fail("AmbiguousLength", 400, "ambiguous message length (Content-Length and Transfer-Encoding)")
    if (versionMinor === 0) return fail("AmbiguousLength", 400, "Transfer-Encoding in an HTTP/1.0 request")
    const chunkedCount = f.codings.filter((c) => c === "chunked").length
    if (f.codings.includes("identity") || chunkedCount > 1) {
      return fail("AmbiguousLength", 400, `ambiguous Transfer-Encoding "${f.codings.join(", ")}"`)
    }
    if (f.codings.length > 1 || chunkedCount === 0) {
      return fail("UnsupportedTransferEncoding", 501, `unsupported Transfer-Encoding "${f.codings.join(", ")}"`)
    }
    framing = CHUNKED
  } else if (f.contentLength !== undefined && f.contentLength > 0) {
    framing = { _tag: "Length", length: f.contentLength }
  }
  // An upgrade to h2c is never passed on: the request goes as a plain HTTP/1.1 request (RFC 9113 §3.1).
  const upgradeAsked = f.upgrade !== undefined && f.connection.includes("upgrade") && !upgradesToH2c(f.upgrade)
  // llhttp takes an upgrade or a close from Proxy-Connection too: an upgrade asked only there is refused
  // (a recipient would relay the next bytes raw), a close is honoured.
  if (f.upgrade !== undefined && !f.connection.includes("upgrade") && f.proxyConnection.includes("upgrade")) {
    return fail("MalformedHeader", 400, "an upgrade asked by Proxy-Connection")
  }
  // Upgrade names at least one protocol; llhttp reads an empty one as no upgrade at all.
  if (upgradeAsked && f.upgrade!.length === 0) return fail("MalformedHeader", 400, "an upgrade to no protocol (an empty Upgrade)")
  return {
    method,
    target,
    originTarget,
    versionMinor,
    headers,
    connection: f.connection,
    keepAlive: keepAliveOf(versionMinor, f.connection) && !f.proxyConnection.includes("close"),
    upgrade: upgradeAsked ? f.upgrade : undefined,
    host: f.host,
    contentType: f.contentType,
    expectContinue: f.expectContinue,
    framing,
    size: end
  }
}

/** Whether an `Upgrade` value offers h2c (cleartext HTTP/2), which a proxy must not relay. */
const upgradesToH2c = (upgrade: string): boolean => {
  for (const t of upgrade.split(",")) if (trimOws(t).toLowerCase() === "h2c") return true
  return false
}

const ABSOLUTE_FORM = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)(.*)$/

/** An authority without a default port, lower-cased, for comparing with `Host`. */
const comparableAuthority = (authority: string, scheme: string): string => {
  const a = authority.toLowerCase()
  const defaultPort = scheme === "https" ? ":443" : ":80"
  return a.endsWith(defaultPort) ? a.slice(0, -defaultPort.length) : a
}

/**
 * The origin form of a request target (RFC 9112 §3.2): an origin-form target as it is; an absolute-form
 * one as its path and query, refused unless its authority is the `Host` (a proxy routing by one while the
 * upstream reads the other would disagree about where the request goes); `*` only for `OPTIONS`;
 * authority form only for `CONNECT` (which the engine answers itself). Anything else is refused.
 */
const originFormOf = (method: string, target: string, host: string | undefined): string | Http1Error => {
  if (target.charCodeAt(0) === 47 /* / */) return target
  if (target === "*") return method === "OPTIONS" ? target : fail("MalformedTarget", 400, "an asterisk-form target is only for OPTIONS")
  if (method === "CONNECT") return target
  const m = ABSOLUTE_FORM.exec(target)
  if (m === null) return fail("MalformedTarget", 400, "a request target that is neither a path nor an absolute URL")
  const scheme = m[1]!.toLowerCase()
  const authority = m[2]!
  if (scheme !== "http" && scheme !== "https") return fail("MalformedTarget", 400, `an absolute-form target with scheme "${scheme.slice(0, 16)}"`)
  if (authority.length === 0 || authority.includes("@")) return fail("MalformedTarget", 400, "an absolute-form target without a plain host")
  if (host === undefined || comparableAuthority(host, scheme) !== comparableAuthority(authority, scheme)) {
    return fail("MalformedTarget", 400, "the request target's host differs from the Host header")
  }
  const rest = m[3]!
  return rest.length === 0 ? "/" : rest.charCodeAt(0) === 47 ? rest : "/" + rest
}

/** Parses a complete response head: its text (latin1), ending in CRLFCRLF. Errors carry status 502. */
export const parseResponseHead = (s: string, limits: HeadLimits): ResponseHead | Http1Error => {
  const end = s.length
  const eol = s.indexOf("\n")
  if (eol <= 0 || s.charCodeAt(eol - 1) !== CR) return bareLf(502)
  const lineEnd = eol - 1
  const versionMinor = parseVersion(s, 0, 8)
  if (versionMinor === -1 || s.charCodeAt(8) !== SP || lineEnd < 12) return fail("MalformedStartLine", 502, "malformed status line")
  const d0 = s.charCodeAt(9) - 0x30
  const d1 = s.charCodeAt(10) - 0x30
  const d2 = s.charCodeAt(11) - 0x30
  if (d0 < 1 || d0 > 5 || d1 < 0 || d1 > 9 || d2 < 0 || d2 > 9) return fail("MalformedStartLine", 502, "malformed status code")
  if (lineEnd > 12 && s.charCodeAt(12) !== SP) return fail("MalformedStartLine", 502, "malformed status line")
  for (let i = 13; i < lineEnd; i++) if (FIELD_VALUE[s.charCodeAt(i)] !== 1) return fail("MalformedStartLine", 502, "a control character in the reason phrase")
  const headers = parseFields(s, eol + 1, end - 2, limits, 502)
  if (headers instanceof Http1Error) return headers
  const f = framingFields(headers, 502)
  if (f instanceof Http1Error) return f
  const named = nominated(f.connection, UNNOMINATABLE_RESPONSE_FIELDS)
  if (named !== undefined) return fail("NominatedField", 502, `Connection names ${named}, which frames the response`)
  const chunked = f.codings.length > 0 && f.codings[f.codings.length - 1] === "chunked" && f.codings.indexOf("chunked") === f.codings.length - 1
  return {
    status: d0 * 100 + d1 * 10 + d2,
    reason: lineEnd > 13 ? s.slice(13, lineEnd) : "",
    versionMinor,
    headers,
    connection: f.connection,
    keepAlive: keepAliveOf(versionMinor, f.connection),
    upgrade: f.upgrade,
    // With Transfer-Encoding, a Content-Length is ignored (RFC 9112 §6.3) and must not be relayed.
    contentLength: f.codings.length > 0 ? undefined : f.contentLength,
    chunked,
    closeDelimitedCoding: f.codings.length > 0 && !chunked,
    transferCodings: f.codings.join(", "),
    size: end
  }
}

/** How a response to `method` is framed (RFC 9112 §6.3). */
export const responseFraming = (method: string, head: ResponseHead): Framing => {
  const status = head.status
  if (method === "HEAD" || (status >= 100 && status < 200) || status === 204 || status === 304) return NO_BODY
  if (head.chunked) return CHUNKED
  if (head.closeDelimitedCoding) return CLOSE
  if (head.contentLength !== undefined) return head.contentLength === 0 ? NO_BODY : { _tag: "Length", length: head.contentLength }
  return CLOSE
}

/** Result of feeding bytes to a head reader. */
export type HeadStep<H> =
  | { readonly _tag: "Need" }
  | { readonly _tag: "Head"; readonly head: H; readonly rest: Buffer }
  | { readonly _tag: "Error"; readonly error: Http1Error }

const NEED: HeadStep<never> = { _tag: "Need" }

/** Whether the bytes so far can start a request line (a method token, then a space), so garbage is refused early. */
const methodPrefixOk = (buf: Buffer): boolean => {
  if (buf.length === 1 && buf[0] === CR) return true // the first half of an empty line before the request
  const n = buf.length < MAX_METHOD_LENGTH + 1 ? buf.length : MAX_METHOD_LENGTH + 1
  for (let i = 0; i < n; i++) {
    const c = buf[i]!
    if (c === SP) return i > 0
    if (TOKEN[c] !== 1) return false
  }
  return n < MAX_METHOD_LENGTH + 1
}

/** Whether every LF in `buf[from..to)` follows a CR. */
const lfPrecededByCr = (buf: Buffer, from: number, to: number): boolean => {
  let i = buf.indexOf(LF, from)
  while (i !== -1 && i < to) {
    if (i === 0 || buf[i - 1] !== CR) return false
    i = buf.indexOf(LF, i + 1)
  }
  return true
}

const DOUBLE_CRLF = Buffer.from("\r\n\r\n", "latin1")
const EMPTY = Buffer.alloc(0)
/** Bytes of a read first looked at as text for the end of a head (most heads are shorter). */
const HEAD_WINDOW = 2048

/**
 * Collects bytes until a head is complete, never holding more than `maxHeaderSize`; dead after the first
 * error. Empty lines before a request line are skipped (RFC 9112 §2.2). After a head it starts over.
 */
export class HeadReader<H> {
  readonly limits: HeadLimits
  /** Parses a complete head's text (latin1, ending in CRLFCRLF). */
  readonly parse: (head: string, limits: HeadLimits) => H | Http1Error
  readonly tooLargeStatus: number
  private pending: Buffer | undefined = undefined
  private dead: Http1Error | undefined = undefined

  constructor(limits: HeadLimits, parse: (head: string, limits: HeadLimits) => H | Http1Error, tooLargeStatus: number) {
    this.limits = limits
    this.parse = parse
    this.tooLargeStatus = tooLargeStatus
  }

  /** Bytes held for a head not yet complete. */
  get buffered(): number {
    return this.pending === undefined ? 0 : this.pending.length
  }

  push(chunk: Buffer): HeadStep<H> {
    if (this.dead !== undefined) return { _tag: "Error", error: this.dead }
    let had = this.pending === undefined ? 0 : this.pending.length
    // Only the bytes that can still belong to a head within the limit are looked at or kept.
    const room = this.limits.maxHeaderSize - had
    const take = chunk.length > room ? chunk.subarray(0, room) : chunk
    let buf = this.pending === undefined ? take : Buffer.concat([this.pending, take], had + take.length)
    // Empty lines before a start line are ignored (RFC 9112 §2.2).
    let skip = 0
    while (skip + 1 < buf.length && buf[skip] === CR && buf[skip + 1] === LF) skip += 2
    if (skip > 0) {
      buf = buf.subarray(skip)
      if (skip <= had) had -= skip
      else {
        chunk = chunk.subarray(skip - had)
        had = 0
      }
    }
    // A head that ends in the first bytes: one string of them, searched and then parsed without another
    // call into Node per line or field. The parser checks every line of a complete head ends in CRLF.
    const from = had > 3 ? had - 3 : 0
    let text: string | undefined
    let at: number
    if (buf.length <= HEAD_WINDOW) {
      text = buf.toString("latin1")
      at = text.indexOf("\r\n\r\n", from)
    } else {
      at = buf.indexOf(DOUBLE_CRLF, from)
    }
    if (at === -1) {
      if (!lfPrecededByCr(buf, had > 0 ? had - 1 : 0, buf.length)) return this.die(bareLf(this.tooLargeStatus === 431 ? 400 : 502))
      if (this.tooLargeStatus === 431 && !methodPrefixOk(buf)) return this.die(fail("MalformedStartLine", 400, "malformed request line"))
      if (buf.length >= this.limits.maxHeaderSize) return this.die(fail("HeadTooLarge", this.tooLargeStatus, "head too large"))
      this.pending = buf.length === 0 ? undefined : Buffer.from(buf)
      return NEED
    }
    const end = at + 4
    const head = text === undefined ? buf.toString("latin1", 0, end) : end === text.length ? text : text.slice(0, end)
    const parsed = this.parse(head, this.limits)
    if (parsed instanceof Http1Error) return this.die(parsed)
    this.pending = undefined
    const restAt = end - had
    return { _tag: "Head", head: parsed, rest: restAt === chunk.length ? EMPTY : chunk.subarray(restAt) }
  }

  private die(error: Http1Error): HeadStep<H> {
    this.dead = error
    this.pending = undefined
    return { _tag: "Error", error }
  }
}

/** A reader of request heads (too large: 431). */
export const requestHeadReader = (limits: HeadLimits): HeadReader<RequestHead> => new HeadReader(limits, parseRequestHead, 431)
/** A reader of response heads (anything wrong: 502). */
export const responseHeadReader = (limits: HeadLimits): HeadReader<ResponseHead> => new HeadReader(limits, parseResponseHead, 502)

/** Chunked-coding states. */
const SIZE = 0
const SIZE_LF = 1
const EXT = 2
const DATA = 3
const DATA_CR = 4
const DATA_LF = 5
const TRAILER_START = 6
const TRAILER_LINE = 7
const TRAILER_LF = 8
const FINAL_LF = 9
const EXT_NAME = 10
const EXT_VALUE_START = 11
const EXT_VALUE = 12
const EXT_QUOTED = 13
const EXT_QUOTED_PAIR = 14
const EXT_QUOTED_END = 15
const STATE_COUNT = 16

/** States inside a chunk-size line (its length is bounded by `MAX_CHUNK_LINE`). */
const IN_SIZE_LINE: Uint8Array = (() => {
  const t = new Uint8Array(STATE_COUNT)
  for (const s of [SIZE, SIZE_LF, EXT, EXT_NAME, EXT_VALUE_START, EXT_VALUE, EXT_QUOTED, EXT_QUOTED_PAIR, EXT_QUOTED_END]) t[s] = 1
  return t
})()


/**
 * Trailer fields that refuse the whole message instead of being dropped: llhttp refuses a body whose
 * trailers carry a length or a coding, and closes the connection on a trailer `Connection: close`, so a
 * recipient reading the bytes as sent would frame them otherwise.
 */
const REFUSED_TRAILERS: ReadonlySet<string> = new Set(["content-length", "transfer-encoding", "connection", "proxy-connection"])

const CRLF = Buffer.from("\r\n", "latin1")

/**
 * Checks a held trailer section (field lines each ending in CRLF, then the final CRLF) and returns it
 * without the fields in `FORBIDDEN_TRAILERS`. A line that is not `name: value` with a token name and
 * valid value bytes is an error.
 */
export const filterTrailerSection = (section: Buffer, errorStatus: number): Buffer | Http1Error => {
  if (section.length === 2) return CRLF
  let pos = 0
  let kept: Array<Buffer> | undefined
  let dropped = false
  const end = section.length - 2
  while (pos < end) {
    const eol = section.indexOf(CR, pos)
    const colon = section.indexOf(COLON, pos)
    if (colon === -1 || colon > eol || !isToken(section, pos, colon)) {
      return fail("MalformedChunk", errorStatus, "a trailer line that is not a header field")
    }
    for (let i = colon + 1; i < eol; i++) {
      if (FIELD_VALUE[section[i]!] !== 1) return fail("MalformedChunk", errorStatus, "a control character in a trailer")
    }
    const name = latin1(section, pos, colon).toLowerCase()
    if (REFUSED_TRAILERS.has(name)) return fail("MalformedChunk", errorStatus, `a ${latin1(section, pos, colon)} trailer`)
    if (FORBIDDEN_TRAILERS.has(name)) {
      if (!dropped) {
        dropped = true
        kept = pos === 0 ? [] : [section.subarray(0, pos)]
      }
    } else if (dropped) kept!.push(section.subarray(pos, eol + 2))
    pos = eol + 2
  }
  if (!dropped) return section
  kept!.push(CRLF)
  return Buffer.concat(kept!)
}

/**
 * Tracks where a body ends while its bytes pass through unchanged. `consume(buf, from)` returns how many
 * bytes from `from` belong to the body (the rest is the next message), or an `Http1Error`. Only chunk-size
 * lines and trailers are looked at byte by byte; chunk data is skipped in bulk.
 *
 * A chunked body's trailer section is not passed through: its bytes are held (at most `maxTrailerBytes`)
 * until the final CRLF, then checked and handed back without forbidden fields as `trailers`. So of the
 * bytes a `consume` call takes, only the first `forwardable` are to be relayed as they are, and once
 * `done`, `trailers` (when set) follows them.
 */
export class BodyFramer {
  /** The body ended; bytes after it belong to the next message. */
  done: boolean
  /** Of the bytes the last `consume` took, how many (from its `from`) are relayed unchanged. */
  forwardable = 0
  /** Once a chunked body is done: its checked trailer section (final CRLF included), to relay after the rest. */
  trailers: Buffer | undefined = undefined
  private held: Buffer | undefined = undefined
  private heldLength = 0
  private readonly kind: Framing["_tag"]
  private remaining: number
  private state = SIZE
  private digits = 0
  private lineBytes = 0
  private readonly maxTrailerBytes: number
  private readonly errorStatus: number
  private dead: Http1Error | undefined = undefined

  constructor(framing: Framing, maxTrailerBytes: number, errorStatus: number) {
    this.kind = framing._tag
    this.remaining = framing._tag === "Length" ? framing.length : 0
    this.done = framing._tag === "None"
    this.maxTrailerBytes = maxTrailerBytes
    this.errorStatus = errorStatus
  }

  /** Whether the body runs until the connection closes. */
  get closeDelimited(): boolean {
    return this.kind === "Close"
  }

  /** Whether the body is framed with chunked coding (its data is reported through `onChunkData`). */
  get isChunked(): boolean {
    return this.kind === "Chunked"
  }

  /**
   * `onChunkData`, for chunked bodies, is told each run of chunk data in `buf` (`[start, end)`), so a
   * caller that needs the decoded body can take views of it; framing bytes are never reported.
   */
  consume(buf: Uint8Array, from: number, onChunkData?: (start: number, end: number) => void): number | Http1Error {
    this.forwardable = 0
    if (this.dead !== undefined) return this.dead
    if (this.done) return 0
    const available = buf.length - from
    switch (this.kind) {
      case "None":
        return 0
      case "Close":
        this.forwardable = available
        return available
      case "Length": {
        const n = available < this.remaining ? available : this.remaining
        this.remaining -= n
        if (this.remaining === 0) this.done = true
        this.forwardable = n
        return n
      }
      case "Chunked": {
        const holding = this.state >= TRAILER_START && this.state <= FINAL_LF
        this.heldFrom = -1
        const n = this.chunked(buf, from, onChunkData)
        if (typeof n === "number") this.forwardable = this.heldFrom !== -1 ? this.heldFrom - from : holding ? 0 : n
        return n
      }
    }
  }

  /** Where the trailer section began in the buffer of the current `consume` call (-1: not in it). */
  private heldFrom = -1

  /** Keeps one byte of the trailer section. */
  private hold(c: number): Http1Error | undefined {
    if (this.heldLength >= this.maxTrailerBytes) return this.error("trailers too large")
    this.held ??= Buffer.allocUnsafe(Math.min(this.maxTrailerBytes, 1024))
    if (this.heldLength === this.held.length) {
      const grown = Buffer.allocUnsafe(Math.min(this.maxTrailerBytes, this.held.length * 4))
      this.held.copy(grown, 0, 0, this.heldLength)
      this.held = grown
    }
    this.held[this.heldLength++] = c
    return undefined
  }

  /** After an extension name or value: ";" starts the next extension, CR ends the line. */
  private extensionEnd(c: number): boolean {
    if (c === 0x3b) this.state = EXT
    else if (c === CR) this.state = SIZE_LF
    else return false
    return true
  }

  private error(message: string): Http1Error {
    this.dead = fail("MalformedChunk", this.errorStatus, message)
    return this.dead
  }

  private chunked(buf: Uint8Array, from: number, onChunkData: ((start: number, end: number) => void) | undefined): number | Http1Error {
    let i = from
    const end = buf.length
    while (i < end) {
      switch (this.state) {
        case DATA: {
          const left = end - i
          if (left < this.remaining) {
            this.remaining -= left
            onChunkData?.(i, end)
            return end - from
          }
          onChunkData?.(i, i + this.remaining)
          i += this.remaining
          this.remaining = 0
          this.state = DATA_CR
          continue
        }
        case SIZE: {
          const c = buf[i]!
          const v = HEX[c]!
          if (v >= 0) {
            if (++this.digits > MAX_CHUNK_SIZE_DIGITS) return this.error("chunk size too large")
            this.remaining = this.remaining * 16 + v
          } else if (this.digits === 0) {
            return this.error("a chunk size without digits")
          } else if (c === CR) {
            this.state = SIZE_LF
          } else if (c === 0x3b /* ; */) {
            this.state = EXT
          } else if (c === SP || c === HTAB) {
            // RFC 9112 allows none before CRLF and only "BWS" before ";", which strict parsers (llhttp)
            // refuse: a recipient that reads "5 " differently must never see such a body from us.
            return this.error("whitespace after a chunk size")
          } else {
            return this.error("a bad character in a chunk size")
          }
          break
        }
        // chunk-ext = *( ";" token [ "=" ( token / quoted-string ) ] ), without the optional whitespace
        // RFC 9112 tolerates, which llhttp refuses.
        case EXT:
          if (TOKEN[buf[i]!] !== 1) return this.error("a chunk extension without a name")
          this.state = EXT_NAME
          break
        case EXT_NAME: {
          const c = buf[i]!
          if (c === 0x3d /* = */) this.state = EXT_VALUE_START
          else if (!this.extensionEnd(c) && TOKEN[c] !== 1) return this.error("a bad character in a chunk extension name")
          break
        }
        case EXT_VALUE_START: {
          const c = buf[i]!
          if (c === 0x22 /* " */) this.state = EXT_QUOTED
          else if (TOKEN[c] === 1) this.state = EXT_VALUE
          else return this.error("a bad chunk extension value")
          break
        }
        case EXT_VALUE: {
          const c = buf[i]!
          if (!this.extensionEnd(c) && TOKEN[c] !== 1) return this.error("a bad character in a chunk extension value")
          break
        }
        case EXT_QUOTED: {
          const c = buf[i]!
          if (c === 0x22) this.state = EXT_QUOTED_END
          else if (c === 0x5c /* \ */) this.state = EXT_QUOTED_PAIR
          else if (FIELD_VALUE[c] !== 1) return this.error("a control character in a chunk extension")
          break
        }
        case EXT_QUOTED_PAIR:
          if (FIELD_VALUE[buf[i]!] !== 1) return this.error("a control character in a chunk extension")
          this.state = EXT_QUOTED
          break
        case EXT_QUOTED_END:
          if (!this.extensionEnd(buf[i]!)) return this.error("a bad character after a quoted chunk extension value")
          break
        case SIZE_LF: {
          if (buf[i] !== LF) return this.error("a chunk-size line not ending in CRLF")
          this.digits = 0
          this.lineBytes = 0
          if (this.remaining === 0) {
            this.state = TRAILER_START
            this.heldFrom = i + 1
          } else {
            this.state = DATA
          }
          i++
          continue
        }
        case DATA_CR:
          if (buf[i] !== CR) return this.error("chunk data not followed by CRLF")
          this.state = DATA_LF
          break
        case DATA_LF:
          if (buf[i] !== LF) return this.error("chunk data not followed by CRLF")
          this.state = SIZE
          this.remaining = 0
          i++
          continue
        case TRAILER_START: {
          const c = buf[i]!
          if (this.hold(c) !== undefined) return this.dead!
          if (c === CR) this.state = FINAL_LF
          else if (c === SP || c === HTAB) return this.error("obs-fold in a trailer")
          else if (c === LF) return this.error("a bare LF in the trailers")
          else this.state = TRAILER_LINE
          break
        }
        case TRAILER_LINE: {
          const c = buf[i]!
          if (this.hold(c) !== undefined) return this.dead!
          if (c === CR) this.state = TRAILER_LF
          else if (c === LF || (c < 0x20 && c !== HTAB) || c === 0x7f) return this.error("a control character in a trailer")
          break
        }
        case TRAILER_LF:
          if (buf[i] !== LF) return this.error("a trailer line not ending in CRLF")
          if (this.hold(LF) !== undefined) return this.dead!
          this.state = TRAILER_START
          break
        case FINAL_LF: {
          if (buf[i] !== LF) return this.error("trailers not ending in CRLF")
          if (this.hold(LF) !== undefined) return this.dead!
          const section = filterTrailerSection(this.held!.subarray(0, this.heldLength), this.errorStatus)
          if (section instanceof Http1Error) {
            this.dead = section
            return section
          }
          // The section is copied out: the held buffer is not reused, but a caller may keep `trailers`.
          this.trailers = section === CRLF ? CRLF : Buffer.from(section)
          this.held = undefined
          this.heldLength = 0
          this.done = true
          return i + 1 - from
        }
      }
      i++
      const s = this.state
      if (IN_SIZE_LINE[s] === 1 && ++this.lineBytes > MAX_CHUNK_LINE) {
        return this.error("a chunk-size line too long")
      }
    }
    return end - from
  }
}
