/**
 * `GET /route?url=…` on the gateway's admin endpoint, read by `switchyard route test URL`: which route
 * of the live routing table a public URL reaches, the path its backend would read, and the backends it
 * would be dispatched among. Read-only: it asks the routing table, it sends nothing to a backend.
 */
import { Duration } from "effect"
import {
  describeRoute,
  forwardedTarget,
  isRoutingRejection,
  normalizeHost,
  type PortKind,
  type RouteQuery,
  routingTarget
} from "../../domain/Route.ts"
import type { RegistryShape } from "../../services/Registry.ts"

/** Longest URL accepted (the admin endpoint's request head is bounded too). */
export const MaxRouteTestUrlLength = 4_096

/** The default port of each scheme a route test accepts (`tcp://` names its port). */
const DefaultPorts: Readonly<Record<string, number | undefined>> = { "http:": 80, "ws:": 80, "https:": 443, "wss:": 443, "tcp:": undefined }

/** The answer of a route test. */
export interface RouteTestAnswer {
  readonly url: string
  readonly port: number
  /** What the port serves, when anything does. */
  readonly portKind: PortKind | null
  /** The matching route's key, or null when none matches. */
  readonly route: string | null
  /** The matching route in words (its path prefix, whether it is stripped). */
  readonly description?: string | undefined
  /** The request target its backend reads (HTTP routes). */
  readonly forwardedPath?: string | undefined
  /** The token that owns the route (control-port tunnels). */
  readonly owner?: string | undefined
  /** Its backends; the dispatcher picks among the live ones. */
  readonly backends: ReadonlyArray<{ readonly backend: string; readonly inFlight: number; readonly draining: boolean }>
  /** What a request to the URL meets now, in one line. */
  readonly verdict: string
}

/** A URL a route test cannot read: the line says why. */
export interface RouteTestRefusal {
  readonly error: string
}

/** The routing facts of `text` (an absolute `http(s)://`, `ws(s)://` or `tcp://host:port` URL), or why it cannot be tested. */
export const routeTestQuery = (text: string): { readonly query: RouteQuery; readonly target: string } | RouteTestRefusal => {
  if (text.length > MaxRouteTestUrlLength) return { error: `the URL is longer than ${MaxRouteTestUrlLength} characters` }
  let url: URL
  try {
    url = new URL(text)
  } catch {
    return { error: `${JSON.stringify(text)} is not an absolute URL (e.g. http://app.example.com:8000/path)` }
  }
  if (!(url.protocol in DefaultPorts)) return { error: `scheme ${url.protocol.slice(0, -1)} is not one a gateway routes (http, https, ws, wss, tcp)` }
  const port = url.port === "" ? DefaultPorts[url.protocol] : Number(url.port)
  if (port === undefined) return { error: "a tcp:// URL names its port (tcp://host:port)" }
  const host = normalizeHost(url.hostname)
  if (url.protocol === "tcp:") return { query: { _tag: "Tcp", port }, target: "" }
  const routed = routingTarget(`${url.pathname}${url.search}`)
  if (isRoutingRejection(routed)) return { error: `the gateway refuses this request target with 400: ${routed.detail}` }
  const secure = url.protocol === "https:" || url.protocol === "wss:"
  return {
    query: secure ? { _tag: "Tls", port, serverName: host, host, path: routed.path } : { _tag: "Http", port, host, path: routed.path },
    target: routed.target
  }
}

/** Tests `text` against the live routing table. */
export const testRoute = (registry: RegistryShape, text: string): RouteTestAnswer | RouteTestRefusal => {
  const read = routeTestQuery(text)
  if ("error" in read) return read
  const { query, target } = read
  const port = query.port
  const kind = registry.ports().get(port) ?? null
  const base = { url: text, port, portKind: kind, backends: [] }
  if (kind === null) return { ...base, route: null, verdict: `nothing is served on port ${port}: the connection is refused` }
  const wanted: PortKind = query._tag === "Tcp" ? "tcp" : query._tag === "Tls" ? "tls" : "http"
  if (kind !== wanted) {
    const scheme = kind === "tls" ? "https://" : kind === "tcp" ? "tcp://" : "http://"
    return { ...base, route: null, verdict: `port ${port} serves ${kind}, not ${wanted}: test it with ${scheme}` }
  }
  const entry = registry.match(query)
  if (entry === undefined) {
    const onPort = registry.routesOnPort(port).map((e) => describeRoute(e.route))
    return { ...base, route: null, verdict: `no route matches: 404 (port ${port} serves ${onPort.join(", ")})` }
  }
  const backends = entry.backends.map((b) => ({ backend: b.label, inFlight: b.inFlight, draining: b.isClosed() }))
  const live = backends.filter((b) => !b.draining).length
  const grace = Duration.toSeconds(registry.gracePeriod)
  const verdict = live > 0
    ? `served by ${live === 1 ? "its backend" : `one of its ${live} backends`}`
    : `the route has no live backend: requests wait up to the grace period (${grace} s) for one, then get 503`
  return {
    ...base,
    route: entry.key,
    description: describeRoute(entry.route),
    ...(query._tag === "Tcp" || (entry.route._tag === "Tls" && entry.route.then === "tcp") ? {} : { forwardedPath: forwardedTarget(entry.route, target) }),
    ...(entry.owner === undefined ? {} : { owner: entry.owner.name }),
    backends,
    verdict
  }
}
