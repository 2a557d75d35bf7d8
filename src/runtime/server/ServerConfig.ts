/**
 * The gateway's configuration: a `ServerFile` (file, `SWITCHYARD_...`, flags, already merged by the
 * loader) checked and resolved into the typed settings `runGateway` wires, defaults filled in. Pure:
 * nothing is bound, read or written here (a generated token is the wiring's).
 */
import * as os from "node:os"
import * as path from "node:path"
import { Duration, Option, Redacted } from "effect"
import type { AcmeConfig } from "../../services/acme/AcmeCertificates.ts"
import type { ClusterConfig } from "../../services/cluster/ClusterLeases.ts"
import { isNodeName } from "../../domain/ClusterLease.ts"
import { CLIENT_LIMIT_DEFAULTS, type ClientLimits } from "../../domain/ClientLimits.ts"
import type { RouteDefinition } from "../../domain/Route.ts"
import type { PortRange, TokenGrant } from "../../domain/TokenPolicy.ts"
import type { ControlPortConfig } from "../../services/front/ControlPort.ts"
import { type ControlWebSocketConfig, DefaultTunnelPath } from "../../services/front/ControlWebSocket.ts"
import { ConfigLoadError, type ServerFile } from "../ConfigLoader.ts"
import { formatHostPort, type HostPort, parseHostPort } from "../NetAddress.ts"

/** Name of the token granted every port when `control.token` is set. */
export const DefaultGrantName = "default"
/** Name of the token generated when none is configured. */
export const GeneratedGrantName = "generated"
/** Random bytes in a generated token. */
export const GeneratedTokenBytes = 32
/** Where the control port, the admin endpoint and the reverse-HTTP/2 port listen by default. */
export const DefaultControlText = "127.0.0.1:9999"
export const DefaultAdminText = "127.0.0.1:7090"
export const DefaultReverseH2Text = "127.0.0.1:9443"
/** Default address of the WebSocket control path, when it is enabled. */
export const DefaultWebSocketText = "127.0.0.1:9998"
/** How long SIGTERM/SIGINT lets requests in flight finish, by default (ms). */
export const DefaultDrainTimeoutMs = 30_000
/** How long the gateway keeps serving, not ready, after SIGTERM (`shutdown_delay_ms`). */
export const DefaultShutdownDelayMs = 5_000
/** How long a route without backends keeps its port and queues requests, by default (ms). */
export const DefaultGracePeriodMs = 30_000
/** Address public ports bind to by default. */
export const DefaultPublicHost = "127.0.0.1"
/** Where ACME certificates are kept by default (under the user's home). */
export const DefaultAcmeStorageDir = "~/.local/share/switchyard/acme"

/** Lifetime of a gateway's route leases without a heartbeat, by default (ms). */
export const DefaultLeaseTtlMs = 15_000
/** Time between two heartbeats of the cluster leases, by default (ms). */
export const DefaultHeartbeatMs = 5_000
/** Shortest accepted cluster secret (characters). */
export const MinClusterSecretLength = 16

/** Every port, for tokens given without a port list. */
export const AllPorts: ReadonlyArray<PortRange> = [{ from: 1, to: 65_535 }]

/** A certificate and its key, PEM texts. */
export interface CertificatePair {
  readonly cert: string
  readonly key: string
}

/** The control port's settings as `ControlPort` takes them, without its tokens and the gateway's callbacks. */
export type ControlSettings = Omit<ControlPortConfig, "tokens" | "websocket" | "onRejected" | "onSessionFailed" | "onSessionDraining">

/** A server file resolved: addresses parsed, certificates paired, token grants built, defaults filled in. */
export interface ServerConfig {
  readonly control: ControlSettings & { readonly address: HostPort }
  /** The WebSocket control path, when `control.websocket.enabled`. */
  readonly webSocket: ControlWebSocketConfig | undefined
  /** The configured grants; empty when none is configured (the gateway then generates one). */
  readonly grants: ReadonlyArray<TokenGrant>
  /** The admin endpoint (its address is checked even when it is off). */
  readonly admin: { readonly enabled: boolean; readonly address: HostPort }
  readonly reverseH2: {
    readonly enabled: boolean
    readonly address: HostPort
    /** Plain mode: no authentication, every connection serves `routes`. */
    readonly plain: boolean
    readonly tls: CertificatePair | undefined
    readonly routes: ReadonlyArray<RouteDefinition>
  }
  /** Failed authentications per address, on the control port and the reverse-HTTP/2 port alike. */
  readonly authThrottle: { readonly refuseAfter?: number; readonly windowMs?: number }
  readonly publicHost: string
  readonly publicConnections: {
    readonly maxConnectionsPerPort: number | undefined
    readonly maxConnectionsPerAddress: number | undefined
    readonly silentConnectionTimeoutMs: number | undefined
  }
  readonly clientLimits: ClientLimits
  readonly gracePeriodMs: number
  readonly maxWaiting: number | undefined
  readonly responseTimeoutMs: number | undefined
  readonly idleTimeoutMs: number | undefined
  readonly drainTimeoutMs: number
  /** Time between readiness turning 503 and the public ports closing, on a stop. */
  readonly shutdownDelayMs: number
  /** Per-request instruments (request ids, per-route metrics, the access log). */
  readonly requestMetrics: boolean
  /** Certificates obtained by ACME for routes registered with `acme`, when `acme.directory` is set. */
  readonly acme: AcmeConfig | undefined
  /** The cluster this gateway joins, when `cluster.redis` is set. */
  readonly cluster: ClusterConfig | undefined
  readonly log: ServerFile["log"]
}

const isLoopbackHost = (host: string): boolean => host === "localhost" || host === "::1" || host.startsWith("127.")

/** A value of the file that cannot be used, naming its field. */
export const invalid = (field: string, message: string) =>
  new ConfigLoadError({ reason: "Invalid", source: "config", field, message: `${field}: ${message}` })

/** The routes plain-mode reverse-HTTP/2 backends serve (`reverse_h2.routes`). */
export const h2RoutesOf = (file: ServerFile): Array<RouteDefinition> =>
  (file.reverse_h2?.routes ?? []).map((r) => ({
    _tag: "Http",
    port: r.port,
    ...(r.domain_suffix === undefined ? {} : { domainSuffix: r.domain_suffix }),
    ...(r.path_prefix === undefined ? {} : { pathPrefix: r.path_prefix })
  }))

const addressAt = (field: string, text: string | undefined, fallback: string): HostPort | ConfigLoadError => {
  const parsed = parseHostPort(text ?? fallback)
  return parsed instanceof Error ? invalid(field, `${parsed.message}`) : parsed
}

const parsePorts = (field: string, ports: ReadonlyArray<number | string>): Array<number | PortRange> | ConfigLoadError => {
  const out: Array<number | PortRange> = []
  for (const p of ports) {
    const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(String(p).trim())
    const from = m ? Number(m[1]) : Number.NaN
    const to = m?.[2] !== undefined ? Number(m[2]) : from
    if (!m || from < 1 || to > 65_535 || to < from) return invalid(field, `"${p}" is not a port (1-65535) or a range a-b`)
    out.push(from === to ? from : { from, to })
  }
  return out
}

/** The token grants a server file asks for (without a generated one). */
export const grantsOf = (file: ServerFile): Array<TokenGrant> | ConfigLoadError => {
  const grants: Array<TokenGrant> = []
  if (file.control?.token !== undefined) grants.push({ name: DefaultGrantName, token: file.control.token, ports: AllPorts })
  const entries = file.control?.tokens ?? []
  for (let i = 0; i < entries.length; i++) {
    const entry = entries[i]!
    if (entry.token === undefined) return invalid(`control.tokens.${i}.token`, "required (or token_file)")
    const ports = parsePorts(`control.tokens.${i}.ports`, entry.ports)
    if (ports instanceof ConfigLoadError) return ports
    grants.push({
      name: entry.name,
      token: entry.token,
      ports,
      ...(entry.domains === undefined ? {} : { domainSuffixes: entry.domains.map((d) => d.toLowerCase()) }),
      ...(entry.share_routes === true ? { shareRoutes: true } : {})
    })
  }
  return grants
}

/**
 * Refuses reverse-HTTP/2 plain mode (no authentication) off loopback unless explicitly allowed, and an
 * access log without the per-request instruments that write it.
 */
const checkModes = (file: ServerFile, address: HostPort): ConfigLoadError | undefined =>
  file.request_metrics === false && file.log?.access_log === true
    ? invalid("log.access_log", "needs request_metrics (the access log is written by the per-request instruments)")
    : (file.reverse_h2?.enabled ?? false) && (file.reverse_h2?.plain ?? false) && !isLoopbackHost(address.host) &&
    file.reverse_h2?.allow_remote_plain !== true
    ? invalid(
      "reverse_h2.plain",
      `plain mode on ${formatHostPort(address)} lets any host that reaches it serve your routes; use tokens, or set reverse_h2.allow_remote_plain`
    )
    : undefined

/**
 * A section's certificate and key (`tls_cert`/`tls_key`, or their `_file` forms, read by the loader);
 * undefined when neither is set.
 */
const certificatePair = (
  field: string,
  section: { readonly tls_cert?: string | undefined; readonly tls_key?: Redacted.Redacted<string> | undefined } | undefined
): CertificatePair | ConfigLoadError | undefined => {
  const cert = section?.tls_cert
  const key = section?.tls_key
  if ((cert === undefined) !== (key === undefined)) return invalid(`${field}.tls_cert`, "tls_cert and tls_key go together")
  return cert === undefined || key === undefined ? undefined : { cert, key: Redacted.value(key) }
}

/** The WebSocket control path's settings (`control.websocket`), certificate files read; undefined when off. */
const webSocketOf = (file: ServerFile): ControlWebSocketConfig | ConfigLoadError | undefined => {
  const ws = file.control?.websocket
  if (ws === undefined || ws.enabled !== true) return undefined
  const address = addressAt("control.websocket.address", ws.address, DefaultWebSocketText)
  if (address instanceof ConfigLoadError) return address
  const tls = certificatePair("control.websocket", ws)
  if (tls instanceof ConfigLoadError) return tls
  return { address, path: ws.path ?? DefaultTunnelPath, ...(tls === undefined ? {} : { tls }) }
}

/** The public ports' client limits from the file's `client_limits` section, defaults filled in. */
export const clientLimitsOf = (file: ServerFile): ClientLimits => {
  const c = file.client_limits ?? {}
  const d = CLIENT_LIMIT_DEFAULTS
  return {
    minRequestBodyBytesPerSecond: c.min_request_body_bytes_per_second ?? d.minRequestBodyBytesPerSecond,
    requestBodyGracePeriodMs: c.request_body_grace_period_ms ?? d.requestBodyGracePeriodMs,
    minResponseBytesPerSecond: c.min_response_bytes_per_second ?? d.minResponseBytesPerSecond,
    responseGracePeriodMs: c.response_grace_period_ms ?? d.responseGracePeriodMs,
    maxUpstreamSlotsPerClient: c.max_upstream_slots_per_client ?? d.maxUpstreamSlotsPerClient,
    upstreamSlotWaitMs: c.upstream_slot_wait_ms ?? d.upstreamSlotWaitMs
  }
}

/** The ACME settings (`acme`), checked; undefined when no directory is set. */
export const acmeOf = (file: ServerFile): AcmeConfig | ConfigLoadError | undefined => {
  const section = file.acme
  if (section?.directory === undefined) {
    return section === undefined || Object.keys(section).length === 0 ? undefined : invalid("acme.directory", "required with the other acme settings (--acme-directory)")
  }
  let url: URL
  try {
    url = new URL(section.directory)
  } catch {
    return invalid("acme.directory", `${JSON.stringify(section.directory)} is not a URL`)
  }
  if (url.protocol !== "https:") return invalid("acme.directory", `${JSON.stringify(section.directory)}: an ACME directory is served over https://`)
  if (section.email === undefined || !/^[^@\s]+@[^@\s]+$/.test(section.email)) {
    return invalid("acme.email", section.email === undefined ? "required with acme.directory (--acme-email)" : `${JSON.stringify(section.email)} is not an email address`)
  }
  const renewText = section.renew_before ?? "30 days"
  const renew = Duration.fromInput(renewText as Duration.Input)
  if (Option.isNone(renew) || Duration.toMillis(renew.value) <= 0 || !Number.isFinite(Duration.toMillis(renew.value))) {
    return invalid("acme.renew_before", `${JSON.stringify(renewText)} is not a positive duration (e.g. 30 days)`)
  }
  const storage = section.storage_dir ?? DefaultAcmeStorageDir
  const storageDir = storage.startsWith("~/") ? path.join(os.homedir(), storage.slice(2)) : path.resolve(storage)
  return {
    directoryUrl: section.directory,
    email: section.email,
    ...(section.ca === undefined ? {} : { ca: section.ca }),
    storageDir,
    renewBefore: renew.value,
    challenge: section.challenge ?? "tls-alpn-01",
    ...(section.cluster_lock_ms === undefined ? {} : { clusterLockMs: section.cluster_lock_ms })
  }
}

/**
 * The cluster settings (`cluster`), checked; undefined when no Redis is set. A cluster needs a node name,
 * an advertised relay address and a shared secret.
 */
export const clusterOf = (file: ServerFile): ClusterConfig | ConfigLoadError | undefined => {
  const section = file.cluster
  if (section?.redis === undefined) {
    return section === undefined || Object.keys(section).length === 0 ? undefined : invalid("cluster.redis", "required with the other cluster settings (--cluster-redis)")
  }
  let url: URL
  try {
    url = new URL(section.redis)
  } catch {
    return invalid("cluster.redis", `${JSON.stringify(section.redis)} is not a URL (redis://host:port)`)
  }
  if ((url.protocol !== "redis:" && url.protocol !== "rediss:") || url.hostname === "") {
    return invalid("cluster.redis", `${JSON.stringify(redisDisplay(section.redis))}: expected redis://host:port or rediss://host:port`)
  }
  if (section.node === undefined) return invalid("cluster.node", "required with cluster.redis (--cluster-node)")
  if (!isNodeName(section.node)) return invalid("cluster.node", `${JSON.stringify(section.node)} is not a node name (letters, digits, . _ -; at most 64)`)
  if (section.advertise === undefined) return invalid("cluster.advertise", "required with cluster.redis: the relay address other gateways dial (--cluster-advertise)")
  const advertise = parseHostPort(section.advertise)
  if (advertise instanceof Error) return invalid("cluster.advertise", advertise.message)
  if (advertise.port === 0) return invalid("cluster.advertise", `${section.advertise}: the other gateways dial it, so it needs a port other than 0`)
  if (section.secret === undefined) {
    return invalid("cluster.secret", "required with cluster.redis: the gateways authenticate each other with it (SWITCHYARD_CLUSTER_SECRET or cluster.secret_file)")
  }
  if (Redacted.value(section.secret).length < MinClusterSecretLength) {
    return invalid("cluster.secret", `shorter than ${MinClusterSecretLength} characters`)
  }
  const leaseTtlMs = section.lease_ttl_ms ?? DefaultLeaseTtlMs
  const heartbeatMs = section.heartbeat_ms ?? Math.min(DefaultHeartbeatMs, Math.floor(leaseTtlMs / 3))
  if (heartbeatMs * 3 > leaseTtlMs) {
    return invalid("cluster.heartbeat_ms", `${heartbeatMs} ms is more than a third of lease_ttl_ms (${leaseTtlMs} ms): a lease would expire between two heartbeats`)
  }
  if (section.control_advertise !== undefined) {
    const text = section.control_advertise
    const parsed = parseHostPort(text.startsWith("tls://") ? text.slice("tls://".length) : text)
    if (parsed instanceof Error || parsed.port === 0) {
      return invalid("cluster.control_advertise", `${JSON.stringify(text)}: expected host:port or tls://host:port, as backends dial it`)
    }
  }
  return {
    redisUrl: section.redis,
    node: section.node,
    advertise,
    secret: section.secret,
    leaseTtlMs,
    heartbeatMs,
    ...(section.control_advertise === undefined ? {} : { controlAdvertise: section.control_advertise })
  }
}

/** A Redis URL without its password, for messages. */
export const redisDisplay = (text: string): string => {
  try {
    const url = new URL(text)
    if (url.password !== "") url.password = "redacted"
    return url.toString()
  } catch {
    return text.replace(/\/\/[^@/]*@/, "//redacted@")
  }
}

/** Resolves a server file into the gateway's settings; the first unusable value is the error. */
export const resolveServerConfig = (file: ServerFile): ServerConfig | ConfigLoadError => {
  const control = addressAt("control.address", file.control?.address, DefaultControlText)
  if (control instanceof ConfigLoadError) return control
  const admin = addressAt("admin.address", file.admin?.address, DefaultAdminText)
  if (admin instanceof ConfigLoadError) return admin
  const h2Address = addressAt("reverse_h2.address", file.reverse_h2?.address, DefaultReverseH2Text)
  if (h2Address instanceof ConfigLoadError) return h2Address
  const webSocket = webSocketOf(file)
  if (webSocket instanceof ConfigLoadError) return webSocket
  const controlTls = certificatePair("control", file.control)
  if (controlTls instanceof ConfigLoadError) return controlTls
  const h2Tls = certificatePair("reverse_h2", file.reverse_h2)
  if (h2Tls instanceof ConfigLoadError) return h2Tls
  const grants = grantsOf(file)
  if (grants instanceof ConfigLoadError) return grants
  const unsafe = checkModes(file, h2Address)
  if (unsafe !== undefined) return unsafe
  const acme = acmeOf(file)
  if (acme instanceof ConfigLoadError) return acme
  const cluster = clusterOf(file)
  if (cluster instanceof ConfigLoadError) return cluster
  const drainTimeoutMs = file.drain_timeout_ms ?? DefaultDrainTimeoutMs
  const authThrottle = {
    ...(file.control?.max_failed_auths === undefined ? {} : { refuseAfter: file.control.max_failed_auths }),
    ...(file.control?.failed_auth_window_ms === undefined ? {} : { windowMs: file.control.failed_auth_window_ms })
  }
  return {
    control: {
      address: control,
      ...(controlTls === undefined ? {} : { tls: controlTls }),
      allowRemotePeers: file.control?.allow_remote_peers ?? false,
      handshakeTimeout: file.control?.handshake_timeout_ms,
      firstByteTimeout: file.control?.first_byte_timeout_ms,
      maxHelloBytes: file.control?.max_hello_bytes,
      maxHandshakes: file.control?.max_handshakes,
      maxHandshakesPerAddress: file.control?.max_handshakes_per_address,
      authThrottle,
      maxSessions: file.control?.max_sessions,
      maxSessionsPerToken: file.control?.max_sessions_per_token,
      maxPeerStreamsPerSecond: file.control?.max_peer_streams_per_second,
      maxPeerFramesPerSecond: file.control?.max_peer_frames_per_second,
      drainTimeout: drainTimeoutMs
    },
    webSocket,
    grants,
    admin: { enabled: file.admin?.enabled ?? true, address: admin },
    reverseH2: {
      enabled: file.reverse_h2?.enabled ?? false,
      address: h2Address,
      plain: file.reverse_h2?.plain ?? false,
      tls: h2Tls,
      routes: h2RoutesOf(file)
    },
    authThrottle,
    publicHost: file.public_host ?? DefaultPublicHost,
    publicConnections: {
      maxConnectionsPerPort: file.public_max_connections_per_port,
      maxConnectionsPerAddress: file.public_max_connections_per_address,
      silentConnectionTimeoutMs: file.public_silent_timeout_ms
    },
    clientLimits: clientLimitsOf(file),
    gracePeriodMs: file.grace_period_ms ?? DefaultGracePeriodMs,
    maxWaiting: file.max_waiting,
    responseTimeoutMs: file.response_timeout_ms,
    idleTimeoutMs: file.idle_timeout_ms,
    drainTimeoutMs,
    shutdownDelayMs: file.shutdown_delay_ms ?? DefaultShutdownDelayMs,
    requestMetrics: file.request_metrics ?? true,
    acme,
    cluster,
    log: file.log
  }
}

/** Everything `runGateway` checks before binding (addresses, token grants, plain mode), for `--check-config`. */
export const checkServerFile = (file: ServerFile): ConfigLoadError | undefined => {
  const resolved = resolveServerConfig(file)
  return resolved instanceof ConfigLoadError ? resolved : undefined
}
