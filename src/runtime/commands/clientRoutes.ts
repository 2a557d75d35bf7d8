/**
 * The routes a `switchyard client` configuration asks for: the single-route fields (the shorthand) or a
 * `routes` list, each checked before any gateway is dialled and turned into the route definition sent
 * to the gateways and the local address its connections go to. Pure: it reads a decoded configuration
 * and dials nothing. TLS options of a route are read in one place (`tlsOf`).
 */
import { Redacted } from "effect"
import { describeRoute, isPathPrefix, type RouteDefinition, routeKey } from "../../domain/Route.ts"
import type { ListenerGatewayState } from "../../services/client/TunnelClient.ts"
import { type ClientFile, type ClientRoute, ConfigLoadError } from "../ConfigLoader.ts"
import { toRoute } from "../listen.ts"
import { type HostPort, parseHostPort } from "../NetAddress.ts"

/** A host name as a route's domain: dot-separated labels of letters, digits and inner hyphens. */
export const HostNamePattern = /^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$/i

const required = (field: string, flag: string) =>
  new ConfigLoadError({
    reason: "Invalid",
    source: "config",
    field,
    message: `${field}: required (${flag}, SWITCHYARD_${field.toUpperCase()} or ${field} in the config file)`
  })

/** What one listener of the client serves: its route, the local address its connections go to, their PROXY header. */
export interface ListenerSpec {
  readonly route: RouteDefinition
  readonly expose: HostPort
  readonly proxyProtocol: "v1" | "v2" | undefined
}

/** The fields of one route: the single-route shorthand at the top of the file, or one entry of `routes`. */
export type RouteFields = Pick<ClientRoute, "path" | "strip_path" | "domain" | "tcp" | "proxy_protocol" | "tls_cert" | "tls_key" | "tls_acme"> & {
  readonly expose?: string | undefined
  readonly port?: number | undefined
}

/** The single-route fields: a file with `routes` sets none of them. */
export const SingleRouteFields = ["expose", "port", "path", "strip_path", "domain", "tcp", "proxy_protocol", "tls_cert", "tls_key", "tls_acme"] as const

export const invalidField = (field: string, message: string) => new ConfigLoadError({ reason: "Invalid", source: "config", field, message: `${field}: ${message}` })

/**
 * How the gateway terminates TLS for a route, from its fields (`at`: the field prefix, `routes.0.` or
 * ""): a certificate with its key, one the gateway obtains (ACME), nothing (no TLS), or the error naming
 * the field at fault.
 */
export const tlsOf = (
  fields: RouteFields,
  at: string
): { readonly cert: string; readonly key: string } | { readonly acme: true } | undefined | ConfigLoadError => {
  const cert = fields.tls_cert
  const key = fields.tls_key === undefined ? undefined : Redacted.value(fields.tls_key)
  if (cert !== undefined && key === undefined) return invalidField(`${at}tls_key`, "tls_cert needs its private key (--tls-key, tls_key or tls_key_file)")
  if (key !== undefined && cert === undefined) return invalidField(`${at}tls_cert`, "tls_key needs its certificate (--tls-cert, tls_cert or tls_cert_file)")
  if (fields.tls_acme === true) {
    if (cert !== undefined) return invalidField(`${at}tls_acme`, "the gateway obtains the certificate itself: drop tls_cert and tls_key (or tls_acme)")
    if (fields.domain === undefined) return invalidField(`${at}domain`, "tls_acme needs the host name to obtain a certificate for (--domain app.example.com)")
    return { acme: true }
  }
  return cert !== undefined && key !== undefined ? { cert, key } : undefined
}

/** The listener one route's fields ask for, or the error naming the field at fault (`at`: its prefix). */
export const specOf = (fields: RouteFields, at: string): ListenerSpec | ConfigLoadError => {
  if (fields.expose === undefined) return required("expose", "--expose")
  if (fields.port === undefined) return required("port", "--port")
  const expose = parseHostPort(fields.expose)
  if (expose instanceof Error) return invalidField(`${at}expose`, expose.message)
  const { path, domain } = fields
  const tcp = fields.tcp ?? false
  const strip = fields.strip_path ?? false
  if (path !== undefined && !path.startsWith("/")) return invalidField(`${at}path`, `${JSON.stringify(path)} must start with / (e.g. /${path})`)
  if (path !== undefined && !isPathPrefix(path)) return invalidField(`${at}path`, `${JSON.stringify(path)} is not a path prefix (no trailing /, empty, . or .. segments, ? or #)`)
  if (domain !== undefined && !HostNamePattern.test(domain)) return invalidField(`${at}domain`, `${JSON.stringify(domain)} is not a host name (e.g. example.com)`)
  const tls = tlsOf(fields, at)
  if (tls instanceof ConfigLoadError) return tls
  if (fields.proxy_protocol !== undefined && !tcp) {
    return invalidField(`${at}proxy_protocol`, "a PROXY header goes on raw TCP connections (tcp); HTTP routes carry the peer in X-Forwarded-For")
  }
  if (strip && (tcp || path === undefined || path === "/")) {
    return invalidField(`${at}strip_path`, tcp ? "a raw TCP route has no path to strip" : "needs a path prefix to strip (--path, path)")
  }
  const route = toRoute({
    port: fields.port,
    tcp,
    http: { ...(domain ? { domainSuffix: domain.toLowerCase() } : {}), ...(path ? { pathPrefix: path } : {}), ...(strip ? { stripPrefix: true } : {}) },
    tls: tls === undefined
      ? undefined
      : { domainSuffix: domain?.toLowerCase() ?? "localhost", ...tls, then: tcp ? "tcp" : "http", ...(path ? { pathPrefix: path } : {}), ...(strip ? { stripPrefix: true } : {}) }
  })
  return { route, expose, proxyProtocol: fields.proxy_protocol }
}

/** Every listener a configuration asks for (its `routes`, or the single route of its top-level fields). */
export const specsOf = (config: ClientFile): Array<ListenerSpec> | ConfigLoadError => {
  if (config.token === undefined) return required("token", "--token, SWITCHYARD_TOKEN_FILE")
  if (config.routes === undefined) {
    const single = specOf(config, "")
    return single instanceof ConfigLoadError ? single : [single]
  }
  const both = SingleRouteFields.find((field) => config[field] !== undefined)
  if (both !== undefined) {
    return invalidField("routes", `set either routes or the single-route fields, not both (${both} is set too: move it into a route)`)
  }
  if (config.routes.length === 0) return invalidField("routes", "the list is empty: give at least one route (expose and port)")
  const specs: Array<ListenerSpec> = []
  for (let i = 0; i < config.routes.length; i++) {
    const spec = specOf(config.routes[i]!, `routes.${i}.`)
    if (spec instanceof ConfigLoadError) return spec
    const same = specs.findIndex((other) => routeKey(other.route) === routeKey(spec.route))
    if (same !== -1) return invalidField(`routes.${i}`, `${describeRoute(spec.route)} is routes.${same} again`)
    specs.push(spec)
  }
  return specs
}

/** A route's place on the gateways, in one phrase: `bound`, `pending`, `bound on 1 of 2`, or refused with why. */
export const routeState = (states: ReadonlyArray<ListenerGatewayState>): string => {
  const bound = states.filter((s) => s.state === "bound").length
  if (bound === states.length) return "bound"
  const refused = states.find((s) => s.state === "refused")
  const head = bound > 0 ? `bound on ${bound} of ${states.length}` : refused !== undefined ? "refused" : "pending"
  return refused?.error === undefined ? head : `${head}: ${refused.error}`
}
