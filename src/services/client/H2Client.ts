/**
 * The backend side of reverse HTTP/2: keeps N connections to the gateway's tunnel port (TCP or TLS),
 * each optionally opened with a framed `Hello` (token and routes), and hands every connection to a
 * Node `http2` server, which then serves the gateway's requests on it. Lost connections come back with
 * capped exponential backoff and jitter. It does not route or forward; the `http2` server is the caller's.
 */
import type * as http2 from "node:http2"
import * as net from "node:net"
import * as tls from "node:tls"
import { Clock, Context, Duration, Effect, Layer, Random, Schema } from "effect"
import * as Redacted from "effect/Redacted"
import {
  decodeHelloReply,
  encodeHello,
  makeHello,
  MaxControlMessageBytes
} from "../../domain/ControlMessage.ts"
import { readSocketFrame } from "../front/ControlHandshake.ts"
import type { RouteDefinition } from "../../domain/Route.ts"

/** Connections kept to the gateway by default. */
export const DefaultConnections = 2
/** Most connections one client keeps. */
export const MaxConnections = 64
/** First reconnect delay. */
export const DefaultBackoffInitial: Duration.Duration = Duration.millis(250)
/** Longest reconnect delay. */
export const DefaultBackoffMax: Duration.Duration = Duration.seconds(30)
/** Growth of the delay after each failed attempt. */
export const DefaultBackoffFactor = 2
/** Share of each delay that is randomized (0 = none, 1 = anywhere between 0 and the delay). */
export const DefaultBackoffJitter = 0.2
/** A connection that served at least this long resets the reconnect backoff. */
export const HealthyConnectionTime: Duration.Duration = Duration.seconds(5)
/** Time allowed to dial and, in authenticated mode, to get the gateway's answer. */
export const DefaultHandshakeTimeout: Duration.Duration = Duration.seconds(10)

export interface BackoffConfig {
  readonly initial?: Duration.Input | undefined
  readonly max?: Duration.Input | undefined
  readonly factor?: number | undefined
  readonly jitter?: number | undefined
}

export interface H2ClientConfig {
  /** The gateway's reverse-HTTP/2 tunnel port. */
  readonly gateway: { readonly host: string; readonly port: number }
  /** Authenticated mode: the token sent in the preamble. Absent: plain mode (the gateway's routes). */
  readonly token?: Redacted.Redacted<string> | string | undefined
  /** Routes asked for in the preamble (authenticated mode; none = the gateway's configured routes). */
  readonly routes?: ReadonlyArray<RouteDefinition> | undefined
  /** Name shown in the gateway's logs. */
  readonly label?: string | undefined
  /** Connections kept open at once (default 2). */
  readonly connections?: number | undefined
  /** Dial with TLS (ALPN `h2`); `ca` trusts a private CA, `servername` sets SNI. */
  readonly tls?: {
    readonly ca?: string | ReadonlyArray<string> | undefined
    readonly servername?: string | undefined
    readonly rejectUnauthorized?: boolean | undefined
  } | undefined
  readonly backoff?: BackoffConfig | undefined
  readonly handshakeTimeout?: Duration.Input | undefined
}

/** A connection attempt failed (the client waits and tries again), or the configuration cannot work. */
export class H2ClientError extends Schema.TaggedError<H2ClientError>()("H2ClientError", {
  reason: Schema.Literals(["Dial", "Handshake", "Rejected", "Config"]),
  message: Schema.String
}) {}

/** Where a client stands with its gateway, for `/status` and `switchyard status`. */
export interface H2GatewayState {
  /** `connecting` (no attempt finished yet), `connected`, `retrying`, or `rejected` (the token or routes must change). */
  readonly state: "connecting" | "connected" | "retrying" | "rejected"
  readonly since: Date
  /** Failed attempts since the last connection up. */
  readonly failures: number
  /** Connections established so far. */
  readonly established: number
  readonly lastError: string | undefined
}

export interface H2ClientShape {
  /** Where the client stands with its gateway. */
  readonly status: () => H2GatewayState
  /** Connections currently serving. */
  readonly connected: () => number
  /** Connection attempts made so far. */
  readonly attempts: () => number
  /** The latest failure, if any. */
  readonly lastError: () => H2ClientError | undefined
}

export class H2Client extends Context.Service<H2Client, H2ClientShape>()("switchyard/H2Client") {
  /** Keeps `config.connections` connections to the gateway, each served by `server`, until the scope closes. */
  static readonly layer = (server: http2.Http2Server | http2.Http2SecureServer, config: H2ClientConfig): Layer.Layer<H2Client> =>
    Layer.effect(H2Client, make(server, config))
}

/** What an operator checks after a failed attempt of each kind. */
export const failureAdvice = (error: H2ClientError): string => {
  switch (error.reason) {
    case "Dial":
      return "check --server and that the gateway runs with its reverse-HTTP/2 port (--reverse-h2) open"
    case "Handshake":
      return "check that this address is the gateway's reverse-HTTP/2 port, not its control port"
    case "Rejected":
      return "check the token (--token, --token-file) and that the gateway grants it these routes"
    case "Config":
      return "check the client's configuration"
  }
}

/** The delay before attempt `failures + 1`: capped exponential growth, the top `jitter` share random. */
export const backoffDelay = (failures: number, config: BackoffConfig, random: number): Duration.Duration => {
  const initial = Duration.toMillis(Duration.fromInputUnsafe(config.initial ?? DefaultBackoffInitial))
  const max = Duration.toMillis(Duration.fromInputUnsafe(config.max ?? DefaultBackoffMax))
  const factor = config.factor ?? DefaultBackoffFactor
  const jitter = Math.min(1, Math.max(0, config.jitter ?? DefaultBackoffJitter))
  const base = Math.min(max, initial * Math.pow(factor, Math.max(0, failures - 1)))
  return Duration.millis(Math.round(base * (1 - jitter * random)))
}

const make = Effect.fnUntraced(function*(server: http2.Http2Server | http2.Http2SecureServer, config: H2ClientConfig) {
  const count = Math.min(MaxConnections, Math.max(1, config.connections ?? DefaultConnections))
  const handshakeTimeout = Duration.fromInputUnsafe(config.handshakeTimeout ?? DefaultHandshakeTimeout)
  const token = config.token === undefined ? undefined : Redacted.isRedacted(config.token) ? config.token : Redacted.make(config.token)
  const where = `${config.gateway.host}:${config.gateway.port}`
  const sockets = new Set<net.Socket>()
  let connected = 0
  let attempts = 0
  let lastError: H2ClientError | undefined
  let state: H2GatewayState["state"] = "connecting"
  let since = new Date(yield* Clock.currentTimeMillis)
  let failuresSinceUp = 0
  let established = 0
  const enter = (next: H2GatewayState["state"]) =>
    Effect.gen(function*() {
      if (next === state) return
      state = next
      since = new Date(yield* Clock.currentTimeMillis)
    })

  yield* Effect.addFinalizer(() =>
    Effect.sync(() => {
      for (const socket of sockets) socket.destroy()
      sockets.clear()
    })
  )

  const dial = Effect.callback<net.Socket, H2ClientError>((resume) => {
    const tlsOptions = config.tls
    const socket: net.Socket = tlsOptions === undefined
      ? net.connect({ host: config.gateway.host, port: config.gateway.port, noDelay: true })
      : tls.connect({
        host: config.gateway.host,
        port: config.gateway.port,
        ALPNProtocols: ["h2"],
        ca: typeof tlsOptions.ca === "string" || tlsOptions.ca === undefined ? tlsOptions.ca : [...tlsOptions.ca],
        servername: tlsOptions.servername ?? (net.isIP(config.gateway.host) === 0 ? config.gateway.host : undefined),
        rejectUnauthorized: tlsOptions.rejectUnauthorized ?? true
      })
    sockets.add(socket)
    socket.once("close", () => sockets.delete(socket))
    const onError = (error: Error & { code?: string }) => {
      socket.destroy()
      resume(Effect.fail(new H2ClientError({ reason: "Dial", message: `cannot reach ${where}: ${error.code ?? error.message}` })))
    }
    socket.once("error", onError)
    socket.once(tlsOptions === undefined ? "connect" : "secureConnect", () => {
      socket.off("error", onError)
      socket.on("error", () => socket.destroy())
      resume(Effect.succeed(socket))
    })
    return Effect.sync(() => socket.destroy())
  })

  /** Writes the `Hello` and reads the answer; bytes after it are handed back to the socket. */
  const handshake = (socket: net.Socket, secret: Redacted.Redacted<string>) =>
    Effect.suspend(() => {
      const reply = readSocketFrame(socket, MaxControlMessageBytes)
      socket.write(encodeHello(makeHello(secret, config.routes ?? [], config.label)))
      return reply
    }).pipe(
      Effect.mapError((e) =>
        new H2ClientError({
          reason: "Handshake",
          message: e.reason === "Truncated" ? `${where} closed the connection during the handshake` : e.message
        })
      ),
      Effect.flatMap((body) => {
        const reply = decodeHelloReply(body)
        if (!("_tag" in reply) || (reply._tag !== "Welcome" && reply._tag !== "Rejected")) {
          return Effect.fail(new H2ClientError({ reason: "Handshake", message: (reply as { message: string }).message }))
        }
        if (reply._tag === "Rejected") {
          return Effect.fail(new H2ClientError({ reason: "Rejected", message: `${where} refused: ${reply.reason}: ${reply.message}` }))
        }
        return Effect.void
      })
    )

  const awaitClose = (socket: net.Socket) =>
    Effect.callback<void>((resume) => {
      if (socket.destroyed) return resume(Effect.void)
      socket.once("close", () => resume(Effect.void))
    })

  /** One connection from dial to close. Succeeds when a served connection ends. */
  const connectOnce = Effect.gen(function*() {
    attempts++
    const socket = yield* Effect.acquireRelease(dial, (s) => Effect.sync(() => s.destroy())).pipe(
      Effect.timeoutOrElse({
        duration: handshakeTimeout,
        orElse: () => Effect.fail(new H2ClientError({ reason: "Dial", message: `${where} did not answer within ${Duration.format(handshakeTimeout)}` }))
      })
    )
    if (token !== undefined) {
      yield* handshake(socket, token).pipe(
        Effect.timeoutOrElse({
          duration: handshakeTimeout,
          orElse: () => Effect.fail(new H2ClientError({ reason: "Handshake", message: `${where} did not answer the preamble in time` }))
        })
      )
    }
    connected++
    established++
    failuresSinceUp = 0
    yield* enter("connected")
    if (connected === 1) yield* Effect.logInfo(`connected to gateway ${where} (reverse HTTP/2)`)
    yield* Effect.addFinalizer(() => Effect.sync(() => void connected--))
    // the http2 session takes the socket over, bytes already read past the preamble included
    server.emit("connection", socket)
    yield* awaitClose(socket)
  }).pipe(Effect.scoped)

  /**
   * Keeps one connection up: reconnects after a loss, with backoff after failures. The first slot tells
   * the operator about each failed attempt (the others try the same gateway): a warning, or an error
   * when the gateway refuses the client, naming the cause, what to check, the next delay and the attempt.
   */
  const slot = (index: number) =>
    Effect.gen(function*() {
      let failures = 0
      for (;;) {
        const started = yield* Clock.currentTimeMillis
        const result = yield* Effect.result(connectOnce)
        const random = yield* Random.next
        if (result._tag === "Success") {
          // a connection that served for a while resets the backoff; one dropped at once (a gateway that
          // accepts and closes) keeps it growing
          const lived = (yield* Clock.currentTimeMillis) - started
          failures = lived >= Duration.toMillis(HealthyConnectionTime) ? 1 : failures + 1
          const delay = backoffDelay(failures, config.backoff ?? {}, random)
          if (connected === 0) {
            yield* enter("retrying")
            yield* Effect.logWarning(`lost gateway ${where} (reverse HTTP/2); reconnecting in ${Duration.format(delay)}`)
          }
          yield* Effect.sleep(delay)
          continue
        }
        lastError = result.failure
        failures++
        failuresSinceUp++
        if (connected === 0) yield* enter(result.failure.reason === "Rejected" ? "rejected" : "retrying")
        const delay = backoffDelay(failures, config.backoff ?? {}, random)
        if (index === 0) {
          const line = `${result.failure.message}; ${failureAdvice(result.failure)}; retrying in ${Duration.format(delay)} (attempt ${failures})`
          yield* result.failure.reason === "Rejected" ? Effect.logError(line) : Effect.logWarning(line)
        }
        yield* Effect.sleep(delay)
      }
    })

  for (let i = 0; i < count; i++) yield* Effect.forkScoped(slot(i))

  return H2Client.of({
    status: () => ({ state, since, failures: failuresSinceUp, established, lastError: lastError?.message }),
    connected: () => connected,
    attempts: () => attempts,
    lastError: () => lastError
  })
})
