/**
 * Route definitions (what a backend asks to serve) and the pure matching rules every front door shares:
 * longest domain suffix, then longest path prefix; port-kind conflicts as typed values.
 * No I/O and no state: the live routing table lives in `services/Registry.ts`.
 */
import { Schema } from "effect"

/** Largest TCP port number. */
export const MaxPort = 65_535
/** Longest accepted domain suffix (DNS name limit). */
export const MaxDomainLength = 253
/** Longest accepted path prefix. */
export const MaxPathPrefixLength = 1_024
/** Longest accepted PEM text (certificate chain or key) in a TLS route. */
export const MaxPemLength = 64 * 1_024

const Port = Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: MaxPort }))

const DomainLabel = /^(?:\*|[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)$/

/** True when `suffix` is a lowercase DNS name (labels of letters, digits, `-`, `_`), without trailing dot. */
export const isDomainSuffix = (suffix: string): boolean =>
  suffix.length > 0 && suffix.length <= MaxDomainLength &&
  suffix.split(".").every((label) => label !== "*" && DomainLabel.test(label))

/** True when `prefix` starts with `/`, has no query, fragment, empty or dot segments, and no trailing `/` (except `/`). */
export const isPathPrefix = (prefix: string): boolean => {
  if (prefix.length === 0 || prefix.length > MaxPathPrefixLength || prefix[0] !== "/") return false
  if (prefix === "/") return true
  if (prefix.endsWith("/") || /[?#\s]/.test(prefix)) return false
  return prefix.slice(1).split("/").every((segment) => segment !== "" && segment !== "." && segment !== "..")
}

const DomainSuffix = Schema.String.check(
  Schema.makeFilter((s: string) => isDomainSuffix(s) || "a lowercase domain name such as example.com")
)
const PathPrefix = Schema.String.check(
  Schema.makeFilter((s: string) => isPathPrefix(s) || "a path starting with / without a trailing / (for example /api)")
)
const Pem = Schema.String.check(Schema.isNonEmpty(), Schema.isMaxLength(MaxPemLength))

/**
 * Whether the path prefix is removed from the forwarded request target (`/app/x` → `/x`, `/app` → `/`);
 * absent or false: the backend reads the path as the public caller sent it (normalised).
 */
const StripPrefix = Schema.optionalKey(Schema.Boolean)

/** Plain HTTP on a public port, optionally restricted to a domain suffix and a path prefix. */
export const HttpRoute = Schema.TaggedStruct("Http", {
  port: Port,
  domainSuffix: Schema.optionalKey(DomainSuffix),
  pathPrefix: Schema.optionalKey(PathPrefix),
  stripPrefix: StripPrefix
})
export type HttpRoute = typeof HttpRoute.Type

/** Raw TCP: every connection on the port goes to the route's backends, bytes untouched. */
export const TcpRoute = Schema.TaggedStruct("Tcp", { port: Port })
export type TcpRoute = typeof TcpRoute.Type

/**
 * TLS terminated by the gateway: the certificate is chosen by SNI (`domainSuffix` matched against the
 * server name), then the plaintext is served as HTTP (`then: "http"`, routed by Host and path) or piped
 * raw to the backend (`then: "tcp"`). The certificate is the backend's (`cert` and `key`), or, with
 * `acme: true`, one the gateway obtains and renews itself for the name `domainSuffix` (ACME); one or
 * the other, never both.
 */
export const TlsRoute = Schema.TaggedStruct("Tls", {
  port: Port,
  domainSuffix: DomainSuffix,
  cert: Schema.optionalKey(Pem),
  key: Schema.optionalKey(Pem),
  acme: Schema.optionalKey(Schema.Literal(true)),
  then: Schema.Literals(["http", "tcp"]),
  pathPrefix: Schema.optionalKey(PathPrefix),
  stripPrefix: StripPrefix
}).check(Schema.makeFilter((route) => tlsCertificateProblem(route) ?? true))
export type TlsRoute = typeof TlsRoute.Type

/** Why a TLS route's certificate fields cannot be used (cert and key together, or `acme` alone). */
export const tlsCertificateProblem = (route: {
  readonly cert?: string | undefined
  readonly key?: string | undefined
  readonly acme?: true | undefined
}): string | undefined => {
  const pair = route.cert !== undefined && route.key !== undefined
  if ((route.cert === undefined) !== (route.key === undefined)) return "a TLS route's cert and key go together"
  if (route.acme === true && pair) return "a TLS route takes either cert and key or acme, not both"
  if (route.acme !== true && !pair) return "a TLS route needs cert and key, or acme"
  return undefined
}

/** True when the gateway obtains the route's certificate itself (ACME). */
export const usesAcme = (route: RouteDefinition): route is TlsRoute & { readonly acme: true } =>
  route._tag === "Tls" && route.acme === true

/** Any route a backend can ask for. */
export const RouteDefinition = Schema.Union([HttpRoute, TcpRoute, TlsRoute])
export type RouteDefinition = typeof RouteDefinition.Type

/** What a public port serves; one port serves exactly one kind. */
export type PortKind = "http" | "tcp" | "tls"

/** The kind of listener a route needs on its port. */
export const portKind = (route: RouteDefinition): PortKind => {
  switch (route._tag) {
    case "Http":
      return "http"
    case "Tcp":
      return "tcp"
    case "Tls":
      return "tls"
  }
}

/**
 * Identity of a route in the routing table: two backends asking for the same key share the route and
 * are load-balanced. The TLS certificate is not part of the key (a redeploy may renew it).
 */
export const routeKey = (route: RouteDefinition): string => {
  switch (route._tag) {
    case "Http":
      return `http:${route.port}:${route.domainSuffix ?? ""}:${route.pathPrefix ?? "/"}`
    case "Tcp":
      return `tcp:${route.port}`
    case "Tls":
      return route.then === "tcp"
        ? `tls:${route.port}:${route.domainSuffix}:tcp`
        : `tls:${route.port}:${route.domainSuffix}:http:${route.pathPrefix ?? "/"}`
  }
}

/** A readable one-line form of a route, for logs and error messages. */
export const describeRoute = (route: RouteDefinition): string => {
  const strip = route._tag !== "Tcp" && route.stripPrefix === true && route.pathPrefix !== undefined && route.pathPrefix !== "/"
    ? " (prefix stripped)"
    : ""
  switch (route._tag) {
    case "Http":
      return `http :${route.port} ${route.domainSuffix ?? "*"}${route.pathPrefix ?? "/"}${strip}`
    case "Tcp":
      return `tcp :${route.port}`
    case "Tls":
      return `tls :${route.port} ${route.domainSuffix}${route.then === "http" ? (route.pathPrefix ?? "/") + strip : " (tcp)"}${route.acme === true ? " (acme)" : ""}`
  }
}

/**
 * The request target a route's backend receives for `target` (a routed target, see `routingTarget`):
 * unchanged, or, when the route strips its path prefix, without it: `/app/x?q` → `/x?q`, `/app` → `/`,
 * `/app?q` → `/?q`. A target the prefix does not match (it cannot have been routed here) is unchanged.
 */
export const forwardedTarget = (route: RouteDefinition, target: string): string => {
  if (route._tag === "Tcp" || route.stripPrefix !== true) return target
  const prefix = route.pathPrefix
  if (prefix === undefined || prefix === "/" || !target.startsWith(prefix)) return target
  const rest = target.slice(prefix.length)
  if (rest === "") return "/"
  const next = rest.charCodeAt(0)
  if (next === 47) return rest
  if (next === 63) return "/" + rest
  return target
}

/** Why a route cannot be added next to the routes already on its port. */
export type RouteConflict =
  | { readonly _tag: "PortKindConflict"; readonly port: number; readonly wanted: PortKind; readonly existing: PortKind }
  | {
    readonly _tag: "TlsModeConflict"
    readonly port: number
    readonly domainSuffix: string
    readonly wanted: "http" | "tcp"
    readonly existing: "http" | "tcp"
  }

/** Describes a conflict in one line. */
export const describeConflict = (conflict: RouteConflict): string => {
  switch (conflict._tag) {
    case "PortKindConflict":
      return `port ${conflict.port} already serves ${conflict.existing}, cannot also serve ${conflict.wanted}`
    case "TlsModeConflict":
      return `port ${conflict.port} already serves ${conflict.domainSuffix} as TLS+${conflict.existing}, cannot also serve it as TLS+${conflict.wanted}`
  }
}

/**
 * Checks `wanted` against the routes already present on the same port. A route with the same key is
 * not a conflict (its backends share it). Returns `undefined` when it fits.
 */
export const findConflict = (
  existing: Iterable<RouteDefinition>,
  wanted: RouteDefinition
): RouteConflict | undefined => {
  for (const route of existing) {
    if (route.port !== wanted.port) continue
    const existingKind = portKind(route)
    const wantedKind = portKind(wanted)
    if (existingKind !== wantedKind) {
      return { _tag: "PortKindConflict", port: wanted.port, wanted: wantedKind, existing: existingKind }
    }
    if (
      route._tag === "Tls" && wanted._tag === "Tls" && route.domainSuffix === wanted.domainSuffix &&
      route.then !== wanted.then
    ) {
      return {
        _tag: "TlsModeConflict",
        port: wanted.port,
        domainSuffix: wanted.domainSuffix,
        wanted: wanted.then,
        existing: route.then
      }
    }
  }
  return undefined
}

/**
 * The host name of a `Host` header (or TLS server name): lowercased, without port and trailing dot.
 * IPv6 literals keep their brackets off: `[::1]:80` gives `::1`.
 */
export const normalizeHost = (host: string | undefined): string => {
  if (host === undefined) return ""
  let name = host
  if (name.startsWith("[")) {
    const end = name.indexOf("]")
    name = end === -1 ? name.slice(1) : name.slice(1, end)
  } else {
    const colon = name.indexOf(":")
    if (colon !== -1 && name.indexOf(":", colon + 1) === -1) name = name.slice(0, colon)
  }
  if (name.endsWith(".")) name = name.slice(0, -1)
  return name.toLowerCase()
}

/** A request target as routes match it and as it is forwarded, see `routingTarget`. */
export interface RoutingTarget {
  /** The normalised path (no query) that path prefixes are matched against. */
  readonly path: string
  /** The normalised path with the query as received: what is sent to the backend. */
  readonly target: string
}

/** Why a request target was refused before routing. */
export interface RoutingTargetRejection {
  readonly problem: "NotOriginForm" | "BadPercentEncoding" | "EncodedSeparator" | "EncodedPercent" | "ControlCharacter" | "DotSegmentParameter" | "Fragment"
  readonly detail: string
}

/** Paths with none of these need no normalising: `%`, `\`, and `.`/`..` segments (also before a `;`). */
const NEEDS_NORMALISING = /[%\\]|\/\.\.?(?:[/;]|$)/

/** Unreserved characters (RFC 3986 §2.3): their percent-escapes mean the character itself. */
const isUnreserved = (c: number): boolean =>
  (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || (c >= 0x30 && c <= 0x39) || c === 0x2d || c === 0x2e || c === 0x5f || c === 0x7e

const hexValue = (c: number): number =>
  c >= 0x30 && c <= 0x39 ? c - 0x30 : c >= 0x41 && c <= 0x46 ? c - 0x37 : c >= 0x61 && c <= 0x66 ? c - 0x57 : -1

/** A path segment with unreserved escapes decoded and the others upper-cased, or why it is refused. */
const normaliseSegment = (raw: string): string | RoutingTargetRejection => {
  if (raw.indexOf("%") === -1 && raw.indexOf("\\") === -1) return raw
  let out = ""
  for (let i = 0; i < raw.length; i++) {
    const ch = raw.charCodeAt(i)
    if (ch === 0x5c) return { problem: "EncodedSeparator", detail: "a backslash in the request path" }
    if (ch !== 0x25) {
      out += raw[i]
      continue
    }
    const hi = hexValue(raw.charCodeAt(i + 1))
    const lo = hexValue(raw.charCodeAt(i + 2))
    if (hi < 0 || lo < 0) return { problem: "BadPercentEncoding", detail: "a malformed percent-escape in the request path" }
    const byte = hi * 16 + lo
    if (byte === 0x2f || byte === 0x5c) return { problem: "EncodedSeparator", detail: "an encoded path separator (%2F or %5C) in the request path" }
    if (byte === 0x25) return { problem: "EncodedPercent", detail: "an encoded percent sign (%25) in the request path" }
    if (byte < 0x20 || byte === 0x7f) return { problem: "ControlCharacter", detail: "an encoded control character in the request path" }
    out += isUnreserved(byte) ? String.fromCharCode(byte) : "%" + raw.slice(i + 1, i + 3).toUpperCase()
    i += 2
  }
  return out
}

/**
 * The path a public request is routed on, and the target forwarded to the chosen backend: percent-escapes
 * of unreserved characters decoded and dot-segments removed (RFC 3986 §5.2.4), so `/public/../admin` and
 * `/public/%2e%2e/admin` are routed (and sent) as `/admin`. Targets whose meaning depends on who decodes
 * them are refused: encoded `/` or `\`, a raw `\`, encoded `%` (double encoding), encoded control
 * characters, a dot-segment with parameters (`..;`), a fragment. The query is passed on as received.
 */
export const routingTarget = (originTarget: string): RoutingTarget | RoutingTargetRejection => {
  if (originTarget === "*") return { path: "*", target: "*" }
  if (originTarget.charCodeAt(0) !== 47) return { problem: "NotOriginForm", detail: "the request target must be a path starting with /" }
  if (originTarget.indexOf("#") !== -1) return { problem: "Fragment", detail: "a fragment (#) in the request target" }
  const q = originTarget.indexOf("?")
  const rawPath = q === -1 ? originTarget : originTarget.slice(0, q)
  if (!NEEDS_NORMALISING.test(rawPath)) return { path: rawPath, target: originTarget }
  const raw = rawPath.split("/")
  const out: Array<string> = []
  for (let i = 1; i < raw.length; i++) {
    const seg = normaliseSegment(raw[i]!)
    if (typeof seg !== "string") return seg
    const last = i === raw.length - 1
    const semi = seg.indexOf(";")
    const bare = semi === -1 ? seg : seg.slice(0, semi)
    if (bare === "." || bare === "..") {
      if (semi !== -1) return { problem: "DotSegmentParameter", detail: `a "${bare}" path segment with parameters` }
      if (bare === "..") out.pop()
      if (last) out.push("")
      continue
    }
    out.push(seg)
  }
  const path = "/" + out.join("/")
  return { path, target: q === -1 ? path : path + originTarget.slice(q) }
}

/** Narrows the result of `routingTarget`. */
export const isRoutingRejection = (r: RoutingTarget | RoutingTargetRejection): r is RoutingTargetRejection => "problem" in r

/**
 * Label-boundary domain suffix match on a normalized host: `example.com` matches `example.com` and
 * `a.example.com`, not `badexample.com`. An absent suffix matches every host.
 */
export const matchesDomain = (suffix: string | undefined, host: string): boolean => {
  if (suffix === undefined) return true
  if (host.length === suffix.length) return host === suffix
  return host.length > suffix.length && host.endsWith(suffix) && host.charCodeAt(host.length - suffix.length - 1) === 46
}

/**
 * Segment-boundary path prefix match: `/a` matches `/a`, `/a/` and `/a/x`, not `/ab`. An absent prefix
 * (or `/`) matches every path.
 */
export const matchesPath = (prefix: string | undefined, path: string): boolean => {
  if (prefix === undefined || prefix === "/") return true
  if (path.length === prefix.length) return path === prefix
  return path.length > prefix.length && path.startsWith(prefix) && path.charCodeAt(prefix.length) === 47
}

/** The routing-relevant facts of one public request or connection. */
export type RouteQuery =
  | { readonly _tag: "Http"; readonly port: number; readonly host: string; readonly path: string }
  | { readonly _tag: "Tcp"; readonly port: number }
  | { readonly _tag: "Tls"; readonly port: number; readonly serverName: string; readonly host?: string; readonly path?: string }

const suffixLength = (suffix: string | undefined): number => suffix === undefined ? -1 : suffix.length
const prefixLength = (prefix: string | undefined): number => prefix === undefined ? 0 : prefix === "/" ? 0 : prefix.length

/**
 * The most specific route matching `query` among `routes` (all assumed to be on the query's port):
 * longest domain suffix first, then longest path prefix. For TLS the server name (SNI) picks the route
 * and its certificate, then, for `then: "http"`, the path prefix; the Host header is not consulted, so a
 * request is always served by a route whose certificate the client verified.
 */
export const bestMatch = <R extends RouteDefinition>(routes: Iterable<R>, query: RouteQuery): R | undefined =>
  bestMatchBy(routes, (route) => route, query)

/** `bestMatch` over items that carry a route (e.g. routing-table entries). */
export const bestMatchBy = <A>(items: Iterable<A>, routeOf: (item: A) => RouteDefinition, query: RouteQuery): A | undefined => {
  let best: A | undefined
  let bestDomain = -2
  let bestPath = -1
  for (const item of items) {
    const route = routeOf(item)
    if (route.port !== query.port) continue
    let domain: number
    let path: number
    switch (query._tag) {
      case "Http": {
        if (route._tag !== "Http") continue
        if (!matchesDomain(route.domainSuffix, query.host) || !matchesPath(route.pathPrefix, query.path)) continue
        domain = suffixLength(route.domainSuffix)
        path = prefixLength(route.pathPrefix)
        break
      }
      case "Tcp": {
        if (route._tag !== "Tcp") continue
        domain = 0
        path = 0
        break
      }
      case "Tls": {
        if (route._tag !== "Tls") continue
        if (!matchesDomain(route.domainSuffix, query.serverName)) continue
        if (route.then === "http") {
          if (query.path === undefined) {
            path = 0
          } else {
            if (!matchesPath(route.pathPrefix, query.path)) continue
            path = prefixLength(route.pathPrefix)
          }
        } else {
          path = 0
        }
        domain = suffixLength(route.domainSuffix)
        break
      }
    }
    if (domain > bestDomain || (domain === bestDomain && path > bestPath)) {
      best = item
      bestDomain = domain
      bestPath = path
    }
  }
  return best
}
