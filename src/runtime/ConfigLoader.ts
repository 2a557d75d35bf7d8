/**
 * One configuration file per command (YAML or JSON), decoded with `Schema`; `SWITCHYARD_...`
 * environment variables override the file and command-line flags override both. Secrets are `Redacted`
 * and may be read from a file (`token_file`). Every error names where the value came from (file,
 * variable or flag), the field path and the bad value (never a secret's). It binds nothing and starts
 * nothing: commands call it first and exit non-zero on an error.
 */
import * as fs from "node:fs"
import { Console, Data, Effect, Redacted, Runtime, Schema, SchemaAST, SchemaIssue } from "effect"

/** Prefix of every environment variable read as configuration. */
export const EnvPrefix = "SWITCHYARD_"
/** Largest configuration or secret file read (bytes). */
export const MaxConfigFileBytes = 1024 * 1024
/** Suffix of a field naming a file that holds the secret of the field without it. */
export const SecretFileSuffix = "_file"
/** Exit code when the configuration is refused (sysexits' EX_CONFIG). */
export const ConfigExitCode = 78

/** The process refused its configuration; the reason was already printed as one line. */
export class ConfigRefused extends Data.TaggedError("ConfigRefused")<{ readonly message: string }> {
  override readonly [Runtime.errorReported] = false
  override readonly [Runtime.errorExitCode] = ConfigExitCode
}

/** Prints a configuration error as one line on stderr and fails (exit 78), before anything is bound. */
export const refuseConfig = (command: string) => (e: ConfigLoadError): Effect.Effect<never, ConfigRefused> =>
  Console.error(`switchyard ${command}: ${e.message}`).pipe(Effect.andThen(Effect.fail(new ConfigRefused({ message: e.message }))))

/** The configuration could not be read or is invalid. */
export class ConfigLoadError extends Schema.TaggedError<ConfigLoadError>()("ConfigLoadError", {
  reason: Schema.Literals(["Unreadable", "Syntax", "Invalid"]),
  /** Where the bad value came from: the file's path, `SWITCHYARD_...` or `--flag`. */
  source: Schema.String,
  /** Dotted field path (`control.address`), or "" for the whole document. */
  field: Schema.String,
  message: Schema.String
}) {}

// ---------------------------------------------------------------------------------------------------
// Sections shared by every command.

const Address = Schema.String.annotate({ expected: "host:port" })
const Ms = Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 86_400_000 }))

/** The admin endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`). */
export const AdminSection = Schema.Struct({
  enabled: Schema.optionalKey(Schema.Boolean.annotate({ description: "Serve the admin endpoint", default: true })),
  address: Schema.optionalKey(
    Address.annotate({ description: "Admin endpoint address (keep it on loopback or a private network); other commands default to 7091-7094", default: "127.0.0.1:7090" })
  )
})

/** Log output. */
export const LogSection = Schema.Struct({
  format: Schema.optionalKey(Schema.Literals(["logfmt", "json"]).annotate({ description: "Log line format", default: "logfmt" })),
  level: Schema.optionalKey(
    Schema.Literals(["trace", "debug", "info", "warn", "error", "none"]).annotate({ description: "Lowest level written", default: "info" })
  ),
  access_log: Schema.optionalKey(Schema.Boolean.annotate({ description: "One line per proxied request (method, route, status, bytes, duration, request id)", default: false }))
})

/** The sections every command's file may carry, whatever its own format. */
export const OpsFile = Schema.Struct({
  admin: Schema.optionalKey(AdminSection),
  log: Schema.optionalKey(LogSection)
})
export type OpsFile = typeof OpsFile.Type

// ---------------------------------------------------------------------------------------------------
// `switchyard server`.

const Secret = Schema.RedactedFromValue(Schema.String)

const Grant = Schema.Struct({
  name: Schema.String.annotate({ description: "Name shown in logs and metrics (never the token)" }),
  token: Schema.optionalKey(Secret.annotate({ description: "The token (or token_file)" })),
  token_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding the token" })),
  ports: Schema.Array(Schema.Union([Schema.Int, Schema.String])).annotate({ description: "Ports: numbers or \"from-to\" ranges" }),
  domains: Schema.optionalKey(Schema.Array(Schema.String).annotate({ description: "Domain suffixes the token may claim (default any)" })),
  share_routes: Schema.optionalKey(
    Schema.Boolean.annotate({ description: "Backends of other tokens with share_routes may join this token's routes, and this token's may join theirs (default: a route belongs to the token that registered it first)" })
  )
})
export type GrantEntry = typeof Grant.Type

const H2Route = Schema.Struct({
  port: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 65_535 })),
  path_prefix: Schema.optionalKey(Schema.String),
  domain_suffix: Schema.optionalKey(Schema.String)
})

/** `switchyard server`'s file. */
export const ServerFile = Schema.Struct({
  control: Schema.optionalKey(Schema.Struct({
    address: Schema.optionalKey(Address.annotate({ description: "Control port address backends dial", default: "127.0.0.1:9999" })),
    token: Schema.optionalKey(
      Secret.annotate({ description: "A token allowed every port (when no token is set at all, one is generated into a private file)", env: "SWITCHYARD_TOKEN" })
    ),
    token_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding control.token", env: "SWITCHYARD_TOKEN_FILE" })),
    tokens: Schema.optionalKey(Schema.Array(Grant).annotate({ description: "Tokens with their ports and domains (reloaded on SIGHUP)" })),
    close_revoked_sessions: Schema.optionalKey(
      Schema.Boolean.annotate({ description: "On reload, close the live sessions of tokens no longer configured (their routes keep their place for grace_period_ms); otherwise they keep running until they disconnect", default: false })
    ),
    allow_remote_peers: Schema.optionalKey(
      Schema.Boolean.annotate({ description: "Accept tokens from non-loopback peers without TLS", default: false })
    ),
    tls_cert: Schema.optionalKey(Schema.String.annotate({ description: "PEM certificate: serve the control port over TLS (with tls_key; or tls_cert_file)" })),
    tls_cert_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding control.tls_cert" })),
    tls_key: Schema.optionalKey(Secret.annotate({ description: "PEM private key for control.tls_cert (or tls_key_file)" })),
    tls_key_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding control.tls_key" })),
    handshake_timeout_ms: Schema.optionalKey(Ms.annotate({ description: "Time a backend has to authenticate", default: 10_000 })),
    first_byte_timeout_ms: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 86_400_000 })).annotate({ description: "Time a new control connection has to send its first byte (at most handshake_timeout_ms)", default: 5_000 })
    ),
    max_hello_bytes: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 1_024, maximum: 1_048_576 })).annotate({ description: "Largest Hello, refused from its length prefix (a TLS route with a 3-certificate 4096-bit chain takes about 9.5 KB)", default: 65_536 })
    ),
    max_handshakes: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 })).annotate({ description: "Most control connections not yet authenticated (TCP and WebSocket); more are closed at once", default: 512 })
    ),
    max_handshakes_per_address: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 })).annotate({ description: "Most control connections not yet authenticated from one peer address", default: 32 })
    ),
    max_failed_auths: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 })).annotate({
        description: "Failed authentications from one address, on the control port and the reverse-HTTP/2 port (each beyond the first 3 answered after a doubling delay, from 250 ms to 8 s), before the address is refused for failed_auth_window_ms",
        default: 20
      })
    ),
    failed_auth_window_ms: Schema.optionalKey(
      Ms.annotate({ description: "How long failed authentications are remembered, and an address that had too many is refused", default: 600_000 })
    ),
    max_sessions: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 })).annotate({ description: "Most control sessions", default: 4_096 })),
    max_sessions_per_token: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 })).annotate({ description: "Most control sessions per token", default: 1_024 })
    ),
    max_peer_streams_per_second: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 })).annotate({
        description: "Streams a backend may open per second (its control streams); beyond it its session ends with GoAway(protocol error)",
        default: 100
      })
    ),
    max_peer_frames_per_second: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 100_000_000 })).annotate({
        description: "Yamux frames a backend may send per second; beyond it its session ends with GoAway(protocol error)",
        default: 1_000_000
      })
    ),
    websocket: Schema.optionalKey(Schema.Struct({
      enabled: Schema.optionalKey(Schema.Boolean.annotate({ description: "Serve the control port as a WebSocket path too (ws:// or wss://)", default: false })),
      address: Schema.optionalKey(Address.annotate({ description: "HTTP address of the WebSocket control path", default: "127.0.0.1:9998" })),
      path: Schema.optionalKey(Schema.String.check(Schema.isPattern(/^\/\S*$/)).annotate({ description: "Upgrade path of the WebSocket control path", default: "/tunnel" })),
      tls_cert: Schema.optionalKey(Schema.String.annotate({ description: "PEM certificate: serve wss:// (with tls_key; or tls_cert_file)" })),
      tls_cert_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding control.websocket.tls_cert" })),
      tls_key: Schema.optionalKey(Secret.annotate({ description: "PEM private key for control.websocket.tls_cert (or tls_key_file)" })),
      tls_key_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding control.websocket.tls_key" }))
    }))
  })),
  public_host: Schema.optionalKey(Schema.String.annotate({ description: "Address public ports bind to (0.0.0.0 to serve other hosts)", default: "127.0.0.1" })),
  public_max_connections_per_port: Schema.optionalKey(
    Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 })).annotate({
      description: "Most client connections open on one public port; when full, its oldest idle connection (nothing sent yet, or between requests on an HTTP port) is closed to admit a new one",
      default: 10_000
    })
  ),
  public_max_connections_per_address: Schema.optionalKey(
    Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 })).annotate({
      description: "Most client connections from one address on one public port (the oldest idle one makes room, else the new one is refused)",
      default: 1_024
    })
  ),
  public_silent_timeout_ms: Schema.optionalKey(
    Ms.annotate({ description: "Time a connection to a public HTTP or TLS port may stay without sending a byte (0 = none)", default: 10_000 })
  ),
  grace_period_ms: Schema.optionalKey(Ms.annotate({ description: "How long a route without backends keeps its port and queues requests", default: 30_000 })),
  max_waiting: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 1_000_000 })).annotate({ description: "Most requests waiting for a backend", default: 1_024 })),
  response_timeout_ms: Schema.optionalKey(Ms.annotate({ description: "Time allowed for a backend's response head (0 = none)", default: 0 })),
  idle_timeout_ms: Schema.optionalKey(Ms.annotate({ description: "Idle limit on responses and upgraded connections (0 = none)", default: 0 })),
  shutdown_delay_ms: Schema.optionalKey(
    Ms.annotate({ description: "On SIGTERM, time the gateway keeps serving with /readyz answering 503 (so load balancers move away) before its public ports stop accepting; SIGINT skips it (0 = none)", default: 5_000 })
  ),
  drain_timeout_ms: Schema.optionalKey(Ms.annotate({ description: "On SIGTERM/SIGINT, time in-flight requests get to finish", default: 30_000 })),
  client_limits: Schema.optionalKey(Schema.Struct({
    min_request_body_bytes_per_second: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 1_000_000_000 })).annotate({
        description: "Least average request-body rate on public HTTP/1.1 ports once the grace period is over; slower gets 408 and a close (0 = none)",
        default: 240
      })
    ),
    request_body_grace_period_ms: Schema.optionalKey(
      Ms.annotate({ description: "Time a request body has, while the gateway reads it, before its rate is checked", default: 5_000 })
    ),
    min_response_bytes_per_second: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 1_000_000_000 })).annotate({
        description: "Least rate at which a public client takes response bytes queued for it; slower is closed (0 = none; a quiet stream queues nothing)",
        default: 240
      })
    ),
    response_grace_period_ms: Schema.optionalKey(
      Ms.annotate({ description: "Time added to each wait for a client to take queued response bytes", default: 5_000 })
    ),
    max_upstream_slots_per_client: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 65_536 })).annotate({
        description: "Most tunnel streams to one backend a public client address holds at once (default: a quarter of the backend's 256; 0 = no cap)"
      })
    ),
    upstream_slot_wait_ms: Schema.optionalKey(
      Ms.annotate({ description: "Time a request waits for a free tunnel stream to its backend before a 503 (0 = no bound)", default: 5_000 })
    )
  })),
  request_metrics: Schema.optionalKey(
    Schema.Boolean.annotate({
      description: "Per-request metrics (requests by route and status, duration, bytes), the access log and X-Request-Id on public HTTP ports, on the raw HTTP/1.1 engine as on the HTTP/2 path; false leaves them out (sessions, routes, queue and dispatch metrics stay)",
      default: true
    })
  ),
  reverse_h2: Schema.optionalKey(Schema.Struct({
    enabled: Schema.optionalKey(Schema.Boolean.annotate({ description: "Serve the reverse-HTTP/2 tunnel port", default: false })),
    address: Schema.optionalKey(Address.annotate({ description: "Reverse-HTTP/2 tunnel port address", default: "127.0.0.1:9443" })),
    plain: Schema.optionalKey(Schema.Boolean.annotate({ description: "Accept backends without a token preamble (ptth backends); serves `routes`", default: false })),
    allow_remote_plain: Schema.optionalKey(
      Schema.Boolean.annotate({ description: "Allow plain mode on a non-loopback address (anyone reaching the port can serve `routes`)", default: false })
    ),
    routes: Schema.optionalKey(Schema.Array(H2Route).annotate({ description: "Routes served by plain-mode backends (reloaded on SIGHUP)" })),
    tls_cert: Schema.optionalKey(Schema.String.annotate({ description: "PEM certificate: serve the reverse-HTTP/2 port over TLS (with tls_key; or tls_cert_file)" })),
    tls_cert_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding reverse_h2.tls_cert" })),
    tls_key: Schema.optionalKey(Secret.annotate({ description: "PEM private key for reverse_h2.tls_cert (or tls_key_file)" })),
    tls_key_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding reverse_h2.tls_key" }))
  })),
  acme: Schema.optionalKey(Schema.Struct({
    directory: Schema.optionalKey(
      Schema.String.annotate({ description: "ACME directory URL (https://); set, the gateway obtains and renews certificates for TLS routes registered with tls_acme" })
    ),
    email: Schema.optionalKey(Schema.String.annotate({ description: "Contact address of the ACME account (required with directory)" })),
    ca: Schema.optionalKey(Schema.String.annotate({ description: "PEM CA certificate(s) trusted for the directory's HTTPS besides the system's (or ca_file)" })),
    ca_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding acme.ca" })),
    storage_dir: Schema.optionalKey(
      Schema.String.annotate({ description: "Directory keeping the account key and each name's certificate and key (files 0600), reused after a restart", default: "~/.local/share/switchyard/acme" })
    ),
    renew_before: Schema.optionalKey(Schema.String.annotate({ description: "Renew a certificate this long before it expires (a duration: 30 days, 720 hours)", default: "30 days" })),
    cluster_lock_ms: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 1_000, maximum: 600_000 })).annotate({
        description: "In a cluster: lease of a name's order lock in Redis, renewed every third of it while the order runs; a gateway that died holding it frees the name after it",
        default: 60_000
      })
    ),
    challenge: Schema.optionalKey(
      Schema.Literals(["tls-alpn-01", "http-01"]).annotate({
        description: "Challenge answered for the CA: tls-alpn-01 on the route's TLS port (the CA connects to 443), http-01 on a public HTTP port (the CA connects to 80)",
        default: "tls-alpn-01"
      })
    )
  })),
  cluster: Schema.optionalKey(Schema.Struct({
    redis: Schema.optionalKey(
      Schema.String.annotate({ description: "Redis URL (redis://host:port or rediss://) holding the cluster's route leases; set, the gateway joins the cluster (with node, advertise and secret)" })
    ),
    node: Schema.optionalKey(Schema.String.annotate({ description: "This gateway's name in the cluster, unique among its gateways (letters, digits, . _ -; at most 64)" })),
    advertise: Schema.optionalKey(Address.annotate({ description: "Address of this gateway's relay link, as the other gateways dial it (host:port)" })),
    control_advertise: Schema.optionalKey(
      Schema.String.annotate({ description: "This gateway's control port as backends dial it (host:port, tls://host:port), told to clients of the other gateways (default: the control address, unless it binds every interface)" })
    ),
    secret: Schema.optionalKey(
      Secret.annotate({ description: "Secret shared by the cluster's gateways, at least 16 characters (or secret_file)", env: "SWITCHYARD_CLUSTER_SECRET" })
    ),
    secret_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding cluster.secret", env: "SWITCHYARD_CLUSTER_SECRET_FILE" })),
    lease_ttl_ms: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 1_000, maximum: 600_000 })).annotate({
        description: "Lifetime of this gateway's route leases in Redis without a heartbeat; also how long the last table read stays in use while Redis cannot be reached",
        default: 15_000
      })
    ),
    heartbeat_ms: Schema.optionalKey(
      Schema.Int.check(Schema.isBetween({ minimum: 100, maximum: 200_000 })).annotate({
        description: "Time between two renewals of this gateway's leases and two reads of the others' (at most a third of lease_ttl_ms)",
        default: 5_000
      })
    )
  })),
  admin: Schema.optionalKey(AdminSection),
  log: Schema.optionalKey(LogSection)
})
export type ServerFile = typeof ServerFile.Type

// ---------------------------------------------------------------------------------------------------
// `switchyard client`.

/**
 * One route of a client's `routes` list: what the gateway serves and where its connections go. The TLS
 * fields say how the gateway terminates TLS for it.
 */
export const ClientRoute = Schema.Struct({
  expose: Schema.String.annotate({ description: "Local address this route's connections go to, host:port" }),
  port: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 65_535 })).annotate({ description: "Public port on the gateway" }),
  path: Schema.optionalKey(Schema.String.annotate({ description: "HTTP path prefix, e.g. /a" })),
  strip_path: Schema.optionalKey(Schema.Boolean.annotate({ description: "Remove the path prefix from the forwarded path (/a/x is forwarded as /x)" })),
  domain: Schema.optionalKey(Schema.String.annotate({ description: "HTTP domain suffix, e.g. example.com" })),
  tcp: Schema.optionalKey(Schema.Boolean.annotate({ description: "Raw TCP instead of HTTP" })),
  proxy_protocol: Schema.optionalKey(Schema.Literals(["v1", "v2"])),
  tls_cert: Schema.optionalKey(Schema.String),
  tls_cert_file: Schema.optionalKey(Schema.String),
  tls_key: Schema.optionalKey(Secret),
  tls_key_file: Schema.optionalKey(Schema.String),
  tls_acme: Schema.optionalKey(Schema.Boolean.annotate({ description: "The gateway obtains and renews the certificate for domain from its ACME CA" }))
})
export type ClientRoute = typeof ClientRoute.Type

/** `switchyard client`'s file. */
export const ClientFile = Schema.Struct({
  server: Schema.optionalKey(
    Schema.String.annotate({ description: "Gateway control address(es), host:port or ws(s):// URL, comma-separated", default: "127.0.0.1:9999", env: "SWITCHYARD_SERVER" })
  ),
  token: Schema.optionalKey(Secret.annotate({ description: "Token granted by the gateway (or token_file)", env: "SWITCHYARD_TOKEN" })),
  token_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding the token", env: "SWITCHYARD_TOKEN_FILE" })),
  expose: Schema.optionalKey(Schema.String.annotate({ description: "Local address to forward to, host:port (required)" })),
  port: Schema.optionalKey(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 65_535 })).annotate({ description: "Public port on the gateway (required)" })),
  path: Schema.optionalKey(Schema.String.annotate({ description: "HTTP path prefix, e.g. /a" })),
  strip_path: Schema.optionalKey(
    Schema.Boolean.annotate({ description: "Remove the path prefix from the forwarded path (/a/x is forwarded as /x, /a as /)", default: false })
  ),
  domain: Schema.optionalKey(Schema.String.annotate({ description: "HTTP domain suffix, e.g. example.com" })),
  tcp: Schema.optionalKey(Schema.Boolean.annotate({ description: "Raw TCP instead of HTTP", default: false })),
  proxy_protocol: Schema.optionalKey(
    Schema.Literals(["v1", "v2"]).annotate({ description: "Start each raw TCP connection to expose with a PROXY protocol header naming the public peer" })
  ),
  tls_cert: Schema.optionalKey(Schema.String.annotate({ description: "PEM certificate the gateway terminates TLS with (or tls_cert_file)" })),
  tls_cert_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding tls_cert" })),
  tls_key: Schema.optionalKey(Secret.annotate({ description: "PEM private key for tls_cert (or tls_key_file)" })),
  tls_key_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding tls_key" })),
  tls_acme: Schema.optionalKey(
    Schema.Boolean.annotate({ description: "The gateway terminates TLS for domain with a certificate it obtains and renews from its ACME CA (instead of tls_cert/tls_key)", default: false })
  ),
  label: Schema.optionalKey(Schema.String.annotate({ description: "Name shown in the gateway's logs" })),
  ca: Schema.optionalKey(Schema.String.annotate({ description: "PEM CA certificate(s) trusted for tls:// and wss:// gateways, besides the system's (or ca_file)" })),
  ca_file: Schema.optionalKey(Schema.String.annotate({ description: "File holding ca" })),
  h2: Schema.optionalKey(Schema.Boolean.annotate({ description: "server names reverse-HTTP/2 tunnel ports: serve HTTP/2 to the gateway", default: false })),
  gateways: Schema.optionalKey(
    Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 64 })).annotate({
      description: "Gateways to keep sessions to: fewer than server names keeps the others as spares (one takes the place of a gateway that failed 3 attempts in a row); more adds the gateways of a cluster that its gateways name (default: every server)"
    })
  ),
  exit_on_reject: Schema.optionalKey(
    Schema.Boolean.annotate({ description: "Exit with code 77 when a gateway refuses the token or the route for good, instead of retrying", default: false })
  ),
  routes: Schema.optionalKey(
    Schema.Array(ClientRoute).annotate({
      description: "Several routes over the same gateway sessions, each with expose, port and optionally path, strip_path, domain, tcp, proxy_protocol, tls_cert/tls_key or tls_acme (instead of the single-route fields; reloaded on SIGHUP)"
    })
  ),
  admin: Schema.optionalKey(AdminSection),
  log: Schema.optionalKey(LogSection)
})
export type ClientFile = typeof ClientFile.Type

// ---------------------------------------------------------------------------------------------------
// Settings: the scalar fields of a schema, with their environment variable and documentation.

/** One scalar field of a config schema. */
export interface Setting {
  readonly path: ReadonlyArray<string>
  /** `string`, `number`, `boolean`, `secret` or the literals joined by `|`. */
  readonly type: string
  readonly env: string
  readonly description: string
  readonly default: string
}

const annotation = <A>(ast: SchemaAST.AST, key: string): A | undefined => SchemaAST.resolveAt<A>(key)(ast)

const typeOf = (ast: SchemaAST.AST): string | undefined => {
  switch (ast._tag) {
    case "String":
      return "string"
    case "Number":
      return "number"
    case "Boolean":
      return "boolean"
    case "Declaration":
      return "secret"
    case "Literal":
      return JSON.stringify(ast.literal)
    case "Union": {
      const parts = ast.types.map(typeOf)
      return parts.every((p) => p !== undefined && p.startsWith("\"")) ? parts.join(" | ") : undefined
    }
    default:
      return undefined
  }
}

/** The scalar settings of an object schema, depth first, in declaration order. */
export const settingsOf = (schema: Schema.Top): ReadonlyArray<Setting> => fieldsOf(schema, false)

/** Every documented field: the scalar settings and, with `lists`, list fields (file only, no variable). */
const fieldsOf = (schema: Schema.Top, lists: boolean): ReadonlyArray<Setting> => {
  const out: Array<Setting> = []
  const walk = (ast: SchemaAST.AST, path: ReadonlyArray<string>) => {
    if (ast._tag !== "Objects") return
    for (const ps of ast.propertySignatures) {
      const name = String(ps.name)
      const here = [...path, name]
      if (ps.type._tag === "Objects") {
        walk(ps.type, here)
        continue
      }
      if (lists && ps.type._tag === "Arrays") {
        out.push({ path: here, type: "list", env: "", description: SchemaAST.resolveDescription(ps.type) ?? "", default: "" })
        continue
      }
      const type = typeOf(ps.type)
      if (type === undefined) continue
      const fallback = annotation<unknown>(ps.type, "default")
      out.push({
        path: here,
        type,
        env: annotation<string>(ps.type, "env") ?? `${EnvPrefix}${here.join("_").toUpperCase()}`,
        description: SchemaAST.resolveDescription(ps.type) ?? "",
        default: fallback === undefined ? "" : String(fallback)
      })
    }
  }
  walk(schema.ast, [])
  return out
}

/** The reference table of a schema's settings, in Markdown (docs/OPERATIONS.md embeds it). */
export const settingsTable = (schema: Schema.Top): string => {
  const rows = fieldsOf(schema, true).map((s) =>
    `| \`${s.path.join(".")}\` | ${s.type.replace(/\|/g, "\\|")} | ${s.default === "" ? "" : `\`${s.default}\``} | ${s.env === "" ? "(file only)" : `\`${s.env}\``} | ${s.description.replace(/\|/g, "\\|")} |`
  )
  return ["| field | type | default | environment | meaning |", "| --- | --- | --- | --- | --- |", ...rows].join("\n")
}

// ---------------------------------------------------------------------------------------------------
// Loading.

/** A value given on the command line for a field. */
export interface FlagValue {
  readonly path: ReadonlyArray<string>
  readonly value: string
  /** How it was written, for errors (`--admin`). */
  readonly flag: string
}

export interface LoadOptions<S extends Schema.Top> {
  readonly schema: S
  /** The file, if any. */
  readonly file?: string | undefined
  /** Environment (default `process.env`). */
  readonly env?: Readonly<Record<string, string | undefined>> | undefined
  readonly flags?: ReadonlyArray<FlagValue> | undefined
}

/** A decoded configuration and where each overridden field came from. */
export interface Loaded<A> {
  readonly config: A
  /** Dotted path → source (`SWITCHYARD_X` or `--flag`) for each field not taken from the file. */
  readonly sources: ReadonlyMap<string, string>
}

/** Reads a YAML or JSON document (by extension; YAML otherwise, which also reads JSON). */
export const readDocument = (file: string): Effect.Effect<unknown, ConfigLoadError> =>
  // the YAML parser is loaded only when a file is read
  Effect.flatMap(Effect.promise(() => import("yaml")), ({ parse: parseYaml }) => {
    let text: string
    try {
      const size = fs.statSync(file).size
      if (size > MaxConfigFileBytes) {
        return Effect.fail(new ConfigLoadError({ reason: "Unreadable", source: file, field: "", message: `${file}: larger than ${MaxConfigFileBytes} bytes` }))
      }
      text = fs.readFileSync(file, "utf8")
    } catch (e) {
      return Effect.fail(new ConfigLoadError({ reason: "Unreadable", source: file, field: "", message: `${file}: cannot read: ${(e as Error).message}` }))
    }
    try {
      const doc = file.endsWith(".json") ? JSON.parse(text) : parseYaml(text)
      return Effect.succeed(doc ?? {})
    } catch (e) {
      const kind = file.endsWith(".json") ? "JSON" : "YAML"
      return Effect.fail(new ConfigLoadError({ reason: "Syntax", source: file, field: "", message: `${file}: not valid ${kind}: ${(e as Error).message.split("\n")[0]}` }))
    }
  })

const isRecord = (u: unknown): u is Record<string, unknown> => u !== null && typeof u === "object" && !Array.isArray(u)

const setAt = (doc: Record<string, unknown>, path: ReadonlyArray<string>, value: unknown) => {
  let node = doc
  for (const key of path.slice(0, -1)) {
    const next = node[key]
    if (!isRecord(next)) node[key] = {}
    node = node[key] as Record<string, unknown>
  }
  node[path[path.length - 1]!] = value
}

const valueAt = (doc: unknown, path: ReadonlyArray<PropertyKey>): unknown => {
  let v = doc
  for (const p of path) v = v !== null && typeof v === "object" ? (v as Record<PropertyKey, unknown>)[p] : undefined
  return v
}

/** Environment and flag text converted to the field's type when it reads as one (else left to fail). */
const coerce = (text: string, type: string): unknown => {
  if (type === "number") return /^-?\d+(\.\d+)?$/.test(text.trim()) ? Number(text) : text
  if (type === "boolean") return text === "true" || text === "1" ? true : text === "false" || text === "0" ? false : text
  return text
}

const deepCopy = (u: unknown): unknown => JSON.parse(JSON.stringify(u ?? {}))

/** Replaces `X_file: path` by `X: <contents>` everywhere (trailing newline dropped). */
const resolveSecretFiles = (
  doc: unknown,
  path: ReadonlyArray<string | number>,
  sourceOf: (path: string) => string
): ConfigLoadError | undefined => {
  if (Array.isArray(doc)) {
    for (let i = 0; i < doc.length; i++) {
      const e = resolveSecretFiles(doc[i], [...path, i], sourceOf)
      if (e) return e
    }
    return undefined
  }
  if (!isRecord(doc)) return undefined
  for (const key of Object.keys(doc)) {
    const value = doc[key]
    if (key.endsWith(SecretFileSuffix) && typeof value === "string") {
      const target = key.slice(0, -SecretFileSuffix.length)
      const field = [...path, key].join(".")
      const source = sourceOf(field)
      if (doc[target] !== undefined) {
        return new ConfigLoadError({ reason: "Invalid", source, field, message: `${source}: ${field}: set either ${target} or ${key}, not both` })
      }
      try {
        const size = fs.statSync(value).size
        if (size > MaxConfigFileBytes) throw new Error(`larger than ${MaxConfigFileBytes} bytes`)
        const secret = fs.readFileSync(value, "utf8").replace(/\r?\n$/, "")
        if (secret === "") throw new Error("the file is empty")
        doc[target] = secret
        delete doc[key]
      } catch (e) {
        return new ConfigLoadError({ reason: "Unreadable", source, field, message: `${source}: ${field}: cannot read ${JSON.stringify(value)}: ${(e as Error).message}` })
      }
    } else {
      const e = resolveSecretFiles(value, [...path, key], sourceOf)
      if (e) return e
    }
  }
  return undefined
}

const formatLeaf = SchemaIssue.makeFormatterDefault()
const firstLine = (issue: SchemaIssue.Issue): string => formatLeaf(issue).split("\n")[0]!

interface Problem {
  readonly path: ReadonlyArray<PropertyKey>
  readonly text: string
  readonly showValue: boolean
}

const collectIssues = (issue: SchemaIssue.Issue, path: ReadonlyArray<PropertyKey>, out: Array<Problem>): void => {
  switch (issue._tag) {
    case "Pointer":
      return collectIssues(issue.issue, [...path, ...issue.path], out)
    case "Composite":
      for (const i of issue.issues) collectIssues(i, path, out)
      return
    case "Encoding":
      return collectIssues(issue.issue, path, out)
    case "MissingKey":
      out.push({ path, text: "required", showValue: false })
      return
    case "UnexpectedKey":
      out.push({ path, text: "unknown field", showValue: false })
      return
    case "AnyOf": {
      const text = firstLine(issue)
      out.push({ path, text: text.startsWith(`Expected "`) ? text : "not one of the accepted forms", showValue: true })
      return
    }
    default:
      out.push({ path, text: firstLine(issue), showValue: true })
  }
}

const isSecretPath = (path: ReadonlyArray<PropertyKey>): boolean => {
  const last = String(path[path.length - 1] ?? "")
  return /token|secret|key|password/i.test(last) && !last.endsWith(SecretFileSuffix)
}

/**
 * Loads a command's configuration: the file (if any), then `SWITCHYARD_...` variables for each scalar
 * setting, then flags; `*_file` secrets are read; the result is decoded with `schema` (unknown fields are
 * errors). The first problem is returned, naming its source, field and value.
 */
export const loadConfig = <S extends Schema.Top & { readonly DecodingServices: never }>(
  options: LoadOptions<S>
): Effect.Effect<Loaded<S["Type"]>, ConfigLoadError> =>
  Effect.gen(function*() {
    const fromFile = options.file === undefined ? {} : yield* readDocument(options.file)
    const fileSource = options.file ?? "defaults"
    if (!isRecord(fromFile)) {
      return yield* new ConfigLoadError({ reason: "Invalid", source: fileSource, field: "", message: `${fileSource}: expected a mapping of fields at the top level` })
    }
    const doc = deepCopy(fromFile) as Record<string, unknown>
    const sources = new Map<string, string>()
    const settings = settingsOf(options.schema)
    const env = options.env ?? process.env
    for (const s of settings) {
      const text = env[s.env]
      if (text === undefined || text === "") continue
      setAt(doc, s.path, coerce(text, s.type))
      sources.set(s.path.join("."), s.env)
    }
    for (const f of options.flags ?? []) {
      const setting = settings.find((s) => s.path.join(".") === f.path.join("."))
      if (setting === undefined) {
        return yield* new ConfigLoadError({ reason: "Invalid", source: f.flag, field: f.path.join("."), message: `${f.flag}: ${f.path.join(".")}: unknown field` })
      }
      setAt(doc, f.path, coerce(f.value, setting.type))
      sources.set(f.path.join("."), f.flag)
    }
    const sourceOf = (field: string) => sources.get(field) ?? fileSource
    const secretError = resolveSecretFiles(doc, [], sourceOf)
    if (secretError) return yield* secretError
    const decoded = Schema.decodeUnknownExit(options.schema as unknown as Schema.Codec<S["Type"], unknown, never, never>, { errors: "all", onExcessProperty: "error" })(doc)
    if (decoded._tag === "Success") return { config: decoded.value, sources }
    const failure = decoded.cause.reasons.find((r) => r._tag === "Fail")
    const problems: Array<Problem> = []
    if (failure?._tag === "Fail" && SchemaIssue.isIssue(failure.error)) collectIssues(failure.error, [], problems)
    else if (failure?._tag === "Fail" && isRecord(failure.error) && SchemaIssue.isIssue((failure.error as { issue?: unknown }).issue)) {
      collectIssues((failure.error as unknown as { issue: SchemaIssue.Issue }).issue, [], problems)
    }
    const first = problems[0] ?? { path: [], text: "invalid", showValue: false }
    const field = first.path.map(String).join(".")
    const source = sourceOf(field)
    const value = valueAt(doc, first.path)
    const shown = !first.showValue ? "" : isSecretPath(first.path) || Redacted.isRedacted(value) ? " (got <redacted>)" : ` (got ${JSON.stringify(value)})`
    return yield* new ConfigLoadError({ reason: "Invalid", source, field, message: `${source}: ${field === "" ? "(document)" : field}: ${first.text}${shown}` })
  })

/** Splits the shared `admin` and `log` sections off a document whose remaining fields a command decodes itself. */
export const splitOpsSections = (doc: unknown): { readonly ops: Record<string, unknown>; readonly rest: unknown } => {
  if (!isRecord(doc)) return { ops: {}, rest: doc }
  const { admin, log, ...rest } = doc
  return { ops: { ...(admin === undefined ? {} : { admin }), ...(log === undefined ? {} : { log }) }, rest }
}

/** The `admin` and `log` sections of a command's config file (none when there is no file). */
export const readOpsSections = (file: string | undefined): Effect.Effect<Record<string, unknown>, ConfigLoadError> =>
  file === undefined ? Effect.succeed({}) : Effect.map(readDocument(file), (doc) => splitOpsSections(doc).ops)

/** Decodes the shared sections of an already-read document, with the environment and flags over them. */
export const loadOpsSections = (
  ops: Record<string, unknown>,
  source: string,
  flags: ReadonlyArray<FlagValue> = [],
  env?: Readonly<Record<string, string | undefined>>
): Effect.Effect<OpsFile, ConfigLoadError> =>
  Effect.gen(function*() {
    const doc = deepCopy(ops) as Record<string, unknown>
    const sources = new Map<string, string>()
    const settings = settingsOf(OpsFile)
    const vars = env ?? process.env
    for (const s of settings) {
      const text = vars[s.env]
      if (text === undefined || text === "") continue
      setAt(doc, s.path, coerce(text, s.type))
      sources.set(s.path.join("."), s.env)
    }
    for (const f of flags) {
      const setting = settings.find((s) => s.path.join(".") === f.path.join("."))
      setAt(doc, f.path, setting === undefined ? f.value : coerce(f.value, setting.type))
      sources.set(f.path.join("."), f.flag)
    }
    const decoded = Schema.decodeUnknownExit(OpsFile, { errors: "all", onExcessProperty: "error" })(doc)
    if (decoded._tag === "Success") return decoded.value
    const failure = decoded.cause.reasons.find((r) => r._tag === "Fail")
    const problems: Array<Problem> = []
    if (failure?._tag === "Fail") {
      const issue = SchemaIssue.isIssue(failure.error) ? failure.error : (failure.error as unknown as { issue: SchemaIssue.Issue }).issue
      if (issue !== undefined) collectIssues(issue, [], problems)
    }
    const first = problems[0] ?? { path: [], text: "invalid", showValue: false }
    const field = first.path.map(String).join(".")
    const from = sources.get(field) ?? source
    const shown = first.showValue ? ` (got ${JSON.stringify(valueAt(doc, first.path))})` : ""
    return yield* new ConfigLoadError({ reason: "Invalid", source: from, field, message: `${from}: ${field}: ${first.text}${shown}` })
  })
