/**
 * Which HTTP proxy an outgoing tunnel connection goes through, from `HTTPS_PROXY`, `HTTP_PROXY` and
 * `NO_PROXY` (lower-case names win, as curl and Go read them), and the credentials a proxy URL carries.
 * Pure: it reads the variables it is given, never `process.env`, and opens nothing.
 */
import { Schema } from "effect"

/** The proxy variables, already read from an environment. */
export interface ProxyEnvironment {
  readonly httpProxy?: string | undefined
  readonly httpsProxy?: string | undefined
  readonly noProxy?: string | undefined
}

/** Where a connection is going: `secure` for TLS targets (`wss://`), which use `HTTPS_PROXY`. */
export interface ProxyTarget {
  readonly secure: boolean
  readonly host: string
  readonly port: number
}

/** A proxy chosen for a target, with its `Proxy-Authorization` value when the URL has credentials. */
export interface ProxyChoice {
  readonly url: URL
  readonly secure: boolean
  readonly host: string
  readonly port: number
  readonly authorization: string | undefined
}

export class ProxyConfigError extends Schema.TaggedError<ProxyConfigError>()("ProxyConfigError", {
  reason: Schema.Literals(["BadUrl", "UnsupportedScheme"]),
  message: Schema.String
}) {}

/** Reads the proxy variables from `env` (lower-case first, then upper-case; empty means unset). */
export const readProxyEnvironment = (env: Readonly<Record<string, string | undefined>>): ProxyEnvironment => {
  const pick = (name: string) => {
    const value = env[name.toLowerCase()] || env[name.toUpperCase()]
    return value === undefined || value.trim() === "" ? undefined : value.trim()
  }
  return { httpProxy: pick("http_proxy"), httpsProxy: pick("https_proxy"), noProxy: pick("no_proxy") }
}

const defaultPort = (protocol: string): number => (protocol === "https:" ? 443 : 80)

const stripBrackets = (host: string): string => (host.startsWith("[") && host.endsWith("]") ? host.slice(1, -1) : host)

const ipv4 = (text: string): number | undefined => {
  const parts = text.split(".")
  if (parts.length !== 4) return undefined
  let n = 0
  for (const p of parts) {
    if (!/^\d{1,3}$/.test(p) || Number(p) > 255) return undefined
    n = n * 256 + Number(p)
  }
  return n
}

/** Whether one `NO_PROXY` entry (`*`, `host`, `.suffix`, `host:port`, `a.b.c.d/nn`) covers the target. */
const entryMatches = (entry: string, host: string, port: number): boolean => {
  if (entry === "*") return true
  const slash = entry.indexOf("/")
  if (slash > 0) {
    const base = ipv4(entry.slice(0, slash))
    const bits = Number(entry.slice(slash + 1))
    const addr = ipv4(host)
    if (base === undefined || addr === undefined || !Number.isInteger(bits) || bits < 0 || bits > 32) return false
    const mask = bits === 0 ? 0 : (0xffffffff << (32 - bits)) >>> 0
    return ((base & mask) >>> 0) === ((addr & mask) >>> 0)
  }
  let name = entry
  const portMatch = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(entry)
  if (portMatch !== null) {
    if (Number(portMatch[2]) !== port) return false
    name = portMatch[1]!
  }
  name = stripBrackets(name).toLowerCase()
  if (name.startsWith("*.")) name = name.slice(1)
  if (name.startsWith(".")) name = name.slice(1)
  return host === name || host.endsWith(`.${name}`)
}

/** True when `NO_PROXY` says the target is reached directly. */
export const bypassesProxy = (noProxy: string | undefined, host: string, port: number): boolean => {
  if (noProxy === undefined) return false
  const h = stripBrackets(host).toLowerCase().replace(/\.$/, "")
  return noProxy.split(/[\s,]+/).filter((e) => e !== "").some((e) => entryMatches(e, h, port))
}

/** Parses a proxy URL (`http://user:pass@host:port`, `https://…`, or a bare `host:port`, taken as http). */
export const parseProxyUrl = (text: string): ProxyChoice | ProxyConfigError => {
  let url: URL
  try {
    url = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(text) ? text : `http://${text}`)
  } catch {
    return new ProxyConfigError({ reason: "BadUrl", message: `proxy URL "${text}" cannot be parsed` })
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    return new ProxyConfigError({ reason: "UnsupportedScheme", message: `proxy scheme ${url.protocol} is not supported (http: or https:)` })
  }
  if (url.hostname === "") return new ProxyConfigError({ reason: "BadUrl", message: `proxy URL "${text}" has no host` })
  const user = decodeURIComponent(url.username)
  const password = decodeURIComponent(url.password)
  const authorization = user === "" && password === ""
    ? undefined
    : `Basic ${Buffer.from(`${user}:${password}`, "utf8").toString("base64")}`
  return {
    url,
    secure: url.protocol === "https:",
    host: stripBrackets(url.hostname),
    port: url.port === "" ? defaultPort(url.protocol) : Number(url.port),
    authorization
  }
}

/**
 * The proxy for `target` under `env`: `HTTPS_PROXY` for TLS targets, `HTTP_PROXY` for plain ones,
 * none when `NO_PROXY` covers the target or the variable is unset.
 */
export const proxyFor = (target: ProxyTarget, env: ProxyEnvironment): ProxyChoice | ProxyConfigError | undefined => {
  const raw = target.secure ? env.httpsProxy : env.httpProxy
  if (raw === undefined) return undefined
  if (bypassesProxy(env.noProxy, target.host, target.port)) return undefined
  return parseProxyUrl(raw)
}
