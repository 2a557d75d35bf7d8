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

/** Plain HTTP on a public port, optionally restricted to a domain suffix and a path prefix. */
export const HttpRoute = Schema.TaggedStruct("Http", {
  port: Port,
  domainSuffix: Schema.optionalKey(DomainSuffix),
  pathPrefix: Schema.optionalKey(PathPrefix)
})
export type HttpRoute = typeof HttpRoute.Type

/** Raw TCP: every connection on the port goes to the route's backends, bytes untouched. */
export const TcpRoute = Schema.TaggedStruct("Tcp", { port: Port })
export type TcpRoute = typeof TcpRoute.Type

/**
 * TLS terminated by the gateway: the certificate is chosen by SNI (`domainSuffix` matched against the
 * server name), then the plaintext is served as HTTP (`then: "http"`, routed by Host and path) or piped
 * raw to the backend (`then: "tcp"`).
 */
export const TlsRoute = Schema.TaggedStruct("Tls", {
  port: Port,
  domainSuffix: DomainSuffix,
  cert: Pem,
  key: Pem,
  then: Schema.Literals(["http", "tcp"]),
  pathPrefix: Schema.optionalKey(PathPrefix)
})
export type TlsRoute = typeof TlsRoute.Type

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
  switch (route._tag) {
    case "Http":
      return `http :${route.port} ${route.domainSuffix ?? "*"}${route.pathPrefix ?? "/"}`
    case "Tcp":
      return `tcp :${route.port}`
    case "Tls":
      return `tls :${route.port} ${route.domainSuffix}${route.then === "http" ? route.pathPrefix ?? "/" : " (tcp)"}`
  }
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

/** The path of a request target, without query and fragment (`/a/b?x` gives `/a/b`). */
export const requestPath = (target: string | undefined): string => {
  if (target === undefined || target.length === 0) return "/"
  let end = target.length
  const q = target.indexOf("?")
  if (q !== -1) end = q
  const h = target.indexOf("#")
  if (h !== -1 && h < end) end = h
  const path = target.slice(0, end)
  if (path[0] === "/") return path
  // absolute-form (`http://host/path`) as sent to proxies
  const scheme = path.indexOf("://")
  if (scheme !== -1) {
    const slash = path.indexOf("/", scheme + 3)
    return slash === -1 ? "/" : path.slice(slash)
  }
  return "/"
}

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
