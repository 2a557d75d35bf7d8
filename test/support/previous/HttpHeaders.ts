/**
 * `requestHeaders` and `responseHeaders` as they were before field names were looked up by length
 * (switchyard 46154ca), kept unchanged as the oracle of `test/domain/HttpHeadersEquivalence.test.ts`.
 * Not used by switchyard itself.
 */
/**
 * Pure header and request-target handling for the HTTP-forwarding core: which headers are hop-by-hop
 * (RFC 9110 §7.6.1), building the outgoing header list, `X-Forwarded-*`, and the canonical form of a
 * request path that access rules match. No I/O and no Node objects: flat `[name, value, ...]` arrays in and out.
 */

/**
 * Headers that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the proxy-auth pair and
 * `HTTP2-Settings`, which only goes with an h2c upgrade, RFC 9113 §3.1).
 */
export const HOP_BY_HOP: ReadonlySet<string> = new Set([
  "connection",
  "proxy-connection",
  "keep-alive",
  "te",
  "transfer-encoding",
  "upgrade",
  "proxy-authorization",
  "proxy-authenticate",
  "http2-settings"
])

/** Request headers consumed by the proxy itself: Node answers `Expect: 100-continue` before forwarding. */
const CONSUMED_REQUEST: ReadonlySet<string> = new Set(["expect"])

/** The `X-Forwarded-*` headers switchyard writes. */
const FORWARDED: ReadonlySet<string> = new Set(["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"])

/** Names listed in `Connection` headers (lower-cased), which are hop-by-hop for this message. */
const connectionTokens = (raw: ReadonlyArray<string>): ReadonlySet<string> | undefined => {
  let named: Set<string> | undefined
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.length === 10 && raw[i]!.toLowerCase() === "connection") {
      for (const token of raw[i + 1]!.split(",")) {
        const t = token.trim().toLowerCase()
        if (t.length > 0) (named ??= new Set()).add(t)
      }
    }
  }
  return named
}

export interface ForwardedInfo {
  /** The client's address as the proxy saw it (absent on Unix sockets). */
  readonly clientAddress: string | undefined
  /** `http` or `https`: how the client reached the proxy. */
  readonly proto: string
  /** The `Host` the client asked for. */
  readonly host: string | undefined
}

/** What to do with `X-Forwarded-*` headers on the way upstream. */
export type ForwardedMode =
  /** Leave the client's own `X-Forwarded-*` untouched and add nothing (toward a local Unix-socket API). */
  | "off"
  /** Drop the client's `X-Forwarded-*` and write switchyard's own (the proxy is the edge). */
  | "replace"
  /** Append to the client's `X-Forwarded-For`, keep its proto/host when present (behind a trusted proxy). */
  | "append"

/**
 * The request headers to send upstream: hop-by-hop headers and those named in `Connection` removed.
 * With `upgrade`, `Connection: Upgrade` and the client's `Upgrade` value are kept (a 101 needs them).
 */
export const requestHeaders = (
  raw: ReadonlyArray<string>,
  upgrade: boolean,
  forwardedMode: ForwardedMode,
  forwarded: ForwardedInfo | undefined
): Array<string> => {
  const named = connectionTokens(raw)
  const out: Array<string> = []
  let upgradeValue: string | undefined
  let xff: string | undefined
  let xfProto: string | undefined
  let xfHost: string | undefined
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!
    const lower = name.toLowerCase()
    if (HOP_BY_HOP.has(lower)) {
      if (lower === "upgrade") upgradeValue = raw[i + 1]
      continue
    }
    if (CONSUMED_REQUEST.has(lower) || (named !== undefined && named.has(lower))) continue
    if (forwardedMode !== "off" && FORWARDED.has(lower)) {
      if (forwardedMode === "append") {
        if (lower === "x-forwarded-for") xff = xff === undefined ? raw[i + 1] : `${xff}, ${raw[i + 1]}`
        else if (lower === "x-forwarded-proto") xfProto ??= raw[i + 1]
        else xfHost ??= raw[i + 1]
      }
      continue
    }
    out.push(name, raw[i + 1]!)
  }
  if (upgrade && upgradeValue !== undefined) out.push("Connection", "Upgrade", "Upgrade", upgradeValue)
  if (forwardedMode !== "off" && forwarded !== undefined) {
    const client = forwarded.clientAddress
    if (client !== undefined) out.push("X-Forwarded-For", xff === undefined ? client : `${xff}, ${client}`)
    else if (xff !== undefined) out.push("X-Forwarded-For", xff)
    out.push("X-Forwarded-Proto", xfProto ?? forwarded.proto)
    const host = xfHost ?? forwarded.host
    if (host !== undefined) out.push("X-Forwarded-Host", host)
  }
  return out
}

/** The response headers to send to the client: hop-by-hop headers and those named in `Connection` removed. */
export const responseHeaders = (raw: ReadonlyArray<string>): Array<string> => {
  const named = connectionTokens(raw)
  const out: Array<string> = []
  for (let i = 0; i < raw.length; i += 2) {
    const lower = raw[i]!.toLowerCase()
    if (HOP_BY_HOP.has(lower) || (named !== undefined && named.has(lower))) continue
    out.push(raw[i]!, raw[i + 1]!)
  }
  return out
}

/** The value of the first header called `lowerName` in a flat raw list, if any. */
export const headerValue = (raw: ReadonlyArray<string>, lowerName: string): string | undefined => {
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.length === lowerName.length && raw[i]!.toLowerCase() === lowerName) return raw[i + 1]
  }
  return undefined
}

/**
 * Fields that must not arrive as trailers (RFC 9110 §6.5.1): framing, routing, authentication, request
 * modifiers, response control data and how to process the content. A proxy that relayed them would let a
 * sender add them after the recipient's checks ran; they are dropped from relayed trailer sections.
 */
export const FORBIDDEN_TRAILERS: ReadonlySet<string> = new Set([
  "content-length",
  "transfer-encoding",
  "host",
  "connection",
  "keep-alive",
  "upgrade",
  "te",
  "trailer",
  "expect",
  "authorization",
  "proxy-authorization",
  "www-authenticate",
  "proxy-authenticate",
  "cookie",
  "set-cookie",
  "content-type",
  "content-encoding",
  "content-range",
  "range",
  "cache-control",
  "max-forwards",
  "if-match",
  "if-none-match",
  "if-modified-since",
  "if-unmodified-since",
  "if-range",
  "age",
  "expires",
  "date",
  "location",
  "retry-after",
  "vary",
  "warning",
  "forwarded",
  "x-forwarded-for",
  "x-forwarded-proto",
  "x-forwarded-host",
  "x-http-method-override",
  "x-http-method",
  "x-method-override"
])

/** Whether a trailer field may be relayed: neither hop-by-hop nor among `FORBIDDEN_TRAILERS`. */
export const relayableTrailer = (name: string): boolean => {
  const lower = name.toLowerCase()
  return !HOP_BY_HOP.has(lower) && !FORBIDDEN_TRAILERS.has(lower)
}

/**
 * Flat `[name, value, ...]` trailers as the `[name, value]` pairs `addTrailers` takes, without the fields
 * that must not be relayed as trailers (see `relayableTrailer`).
 */
export const trailerPairs = (raw: ReadonlyArray<string>): Array<[string, string]> => {
  const out: Array<[string, string]> = []
  for (let i = 0; i < raw.length; i += 2) if (relayableTrailer(raw[i]!)) out.push([raw[i]!, raw[i + 1]!])
  return out
}

/** A request target in the form access rules match. */
export interface CanonicalTarget {
  /** The path without the API version prefix, `//` collapsed, percent-decoded: `/containers/json`. */
  readonly path: string
  /** The API version from a `/v1.41` prefix, when there was one. */
  readonly apiVersion: string | undefined
  /** The raw query string without `?` (empty when none). */
  readonly query: string
  /** The target to send upstream: the canonical path re-encoded, version prefix kept, query unchanged. */
  readonly upstreamTarget: string
}

/** Why a request target was refused before matching. */
export type TargetProblem =
  | "NotOriginForm"
  | "BadPercentEncoding"
  | "EncodedSeparator"
  | "DotSegment"
  | "ControlCharacter"
  | "BadApiVersion"

export interface TargetRejection {
  readonly problem: TargetProblem
  readonly detail: string
}

/** The Engine's router takes `/v` and any run of digits and dots as a version (`/v{version:[0-9.]+}`). */
const VERSION_PREFIX = /^\/v([0-9.]+)(?=\/|$)/
/** Versions as Docker clients write them; any other run of digits and dots is refused. */
const PLAIN_VERSION = /^\d+(?:\.\d+)?$/
/** Podman's clients version its own (libpod) API as `N.N.N`; accepted before `/libpod/` only. */
const LIBPOD_VERSION = /^\d+\.\d+\.\d+$/
/** Bytes that never appear raw in a canonical path: `%`, `.`-segments, `//`, controls, `\`. */
const NEEDS_WORK = /[%\\\x00-\x20\x7f]|\/\/|\/\.(?:\.)?(?:\/|$)/

/** Characters left unescaped when re-encoding a decoded path segment (RFC 3986 pchar minus `%`). */
const encodeSegment = (segment: string): string =>
  encodeURIComponent(segment).replace(/%(?:3A|40|21|24|26|27|28|29|2A|2B|2C|3B|3D)/g, decodeURIComponent)

/**
 * Canonicalises an origin-form request target (`/path?query`). Rejects absolute/authority forms,
 * malformed or encoded separators (`%2F`, `%5C`, `%00`), control characters and `.`/`..` segments
 * (no Docker client sends them; resolving them would let a rule be bypassed). Collapses `//` to `/`
 * and strips a `/vN.NN` API version prefix for matching.
 */
export const canonicalTarget = (target: string): CanonicalTarget | TargetRejection => {
  if (target.charCodeAt(0) !== 47 /* / */) {
    return { problem: "NotOriginForm", detail: "the request target must be a path starting with /" }
  }
  const q = target.indexOf("?")
  const rawPath = q === -1 ? target : target.slice(0, q)
  const query = q === -1 ? "" : target.slice(q + 1)
  if (rawPath.includes("#") || query.includes("#")) {
    return { problem: "ControlCharacter", detail: "a fragment (#) is not allowed in a request target" }
  }
  let path = rawPath
  let upstreamPath = rawPath
  if (NEEDS_WORK.test(rawPath)) {
    const segments: Array<string> = []
    for (const raw of rawPath.split("/")) {
      if (raw.length === 0) continue
      let seg: string
      try {
        seg = decodeURIComponent(raw)
      } catch {
        return { problem: "BadPercentEncoding", detail: `malformed percent-encoding in "${raw}"` }
      }
      if (seg.includes("/") || seg.includes("\\")) {
        return { problem: "EncodedSeparator", detail: `an encoded path separator in "${raw}"` }
      }
      if (/[\x00-\x1f\x7f]/.test(seg)) {
        return { problem: "ControlCharacter", detail: `a control character in "${raw}"` }
      }
      if (seg === "." || seg === "..") {
        return { problem: "DotSegment", detail: `a "${seg}" path segment` }
      }
      segments.push(seg)
    }
    const trailing = rawPath.length > 1 && rawPath.endsWith("/") ? "/" : ""
    path = "/" + segments.join("/") + (segments.length > 0 ? trailing : "")
    upstreamPath = "/" + segments.map(encodeSegment).join("/") + (segments.length > 0 ? trailing : "")
  }
  const m = VERSION_PREFIX.exec(path)
  if (m && !PLAIN_VERSION.test(m[1]!) && !(LIBPOD_VERSION.test(m[1]!) && path.startsWith("/libpod/", m[0].length))) {
    return { problem: "BadApiVersion", detail: `an API version "${m[1]!.slice(0, 16)}" other than N or N.N` }
  }
  const apiVersion = m ? m[1] : undefined
  const matchPath = m ? path.slice(m[0].length) || "/" : path
  return {
    path: matchPath,
    apiVersion,
    query,
    upstreamTarget: query.length > 0 || q !== -1 ? `${upstreamPath}?${query}` : upstreamPath
  }
}

/** Narrows the result of `canonicalTarget`. */
export const isTargetRejection = (r: CanonicalTarget | TargetRejection): r is TargetRejection => "problem" in r
