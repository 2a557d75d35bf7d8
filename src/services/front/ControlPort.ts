/**
 * The control port: backends dial it, authenticate with a `Hello`, get their listeners bound, and then
 * serve them over a yamux session in which the gateway opens one stream per public connection (per
 * pooled HTTP connection for HTTP), each starting with a preamble. Listeners can be added and removed
 * over control streams the backend opens. A bad connection is closed with a typed error and never
 * disturbs the port or other sessions. The same sessions can arrive over a WebSocket path
 * (`ControlWebSocket.ts`). Routing, forwarding and ports are the shared core's.
 */
import { Buffer } from "node:buffer"
import type { Duplex } from "node:stream"
import { Clock, Context, Duration, Effect, Exit, FiberSet, Layer, Schedule, Schema, Scope } from "effect"
import type * as Redacted from "effect/Redacted"
import {
  type BoundListener,
  type ControlReply,
  ControlProtocolError,
  decodeControlRequest,
  decodeHello,
  encodeControlReply,
  encodeHelloReply,
  encodePreamble,
  FrameReader,
  MaxControlMessageBytes,
  MaxPendingControlBytes,
  MaxPendingControlRequests,
  MaxPreambleAddressLength,
  MaxWelcomeGateways,
  type Preamble,
  ProtocolVersion,
  type RejectionReason
} from "../../domain/ControlMessage.ts"
import { AuthThrottle, type AuthThrottleLimits, DefaultAuthThrottleLimits } from "../../domain/AuthThrottle.ts"
import { LogSampler } from "../../domain/LogSampler.ts"
import type { ClientLimits } from "../../domain/ClientLimits.ts"
import { perSecond } from "../../domain/RateLimit.ts"
import { describeRoute, type RouteDefinition, usesAcme } from "../../domain/Route.ts"
import { type GrantRefusal, makeTokenPolicy, type TokenGrant } from "../../domain/TokenPolicy.ts"
import { type Backend, BackendUnavailable, type ConnectionMeta, type ConnectionProtocol, type RouteOwner } from "../Backend.ts"
import { Dispatcher, type DispatcherConfig } from "../Dispatcher.ts"
import { Forwarder } from "../Forwarder.ts"
import type { ClientLimitEvent } from "../forward/http1/Admission.ts"
import type { UpgradeRequest } from "../transport/WebSocketOpen.ts"
import { refusedConnection, streamUpstream } from "../forward/Upstream.ts"
import { plainErrors, withoutUpstreamDetail } from "../forward/ErrorResponse.ts"
import { type CertificateSource, type ListenerError, Listeners, type ListenersConfig } from "../Listeners.ts"
import { Registry, type RegistryConfig } from "../Registry.ts"
import { type Address, type Connection, Transport, type TransportError } from "../Transport.ts"
import * as Session from "../yamux/Session.ts"
import { tunnelYamuxConfig, type YamuxConfig } from "../yamux/YamuxConfig.ts"
import { YamuxError } from "../yamux/YamuxError.ts"
import { makeStreamDuplex } from "../yamux/StreamDuplex.ts"
import { fromEndpoint } from "../transport/WebSocketConnection.ts"
import { readFrame, writeFrame } from "./ControlHandshake.ts"
import { DeferredStream } from "./DeferredStream.ts"
import { type ControlWebSocketConfig, listenControlWebSocket, makeUpgradeHandler, type UpgradeHandler } from "./ControlWebSocket.ts"
import {
  type AdmissionRefusal,
  type HandshakeTicket,
  makeHandshakeAdmission,
  skippedNote
} from "./HandshakeAdmission.ts"

/** Where the control port listens by default. */
export const DefaultControlAddress: Address = { host: "127.0.0.1", port: 9999 }
/** Time a new connection has to send its `Hello`. */
export const DefaultHandshakeTimeout: Duration.Duration = Duration.seconds(10)
/** Time a new connection has to send its first byte (a silent one is closed sooner than a slow one). */
export const DefaultFirstByteTimeout: Duration.Duration = Duration.seconds(5)
/**
 * Largest `Hello` body, checked from its length prefix before the body is read. A `Hello` carrying a
 * TLS route with a 3-certificate 4096-bit RSA chain and its key is about 9.5 KB: this fits six such
 * routes (more go in `AddListener` requests once the session is up, or raise `maxHelloBytes`).
 */
export const DefaultMaxHelloBytes = 64 * 1024
/** Most handshakes in progress (connected, not yet authenticated) in total, TCP and WebSocket together. */
export const DefaultMaxHandshakes = 512
/** Most handshakes in progress from one peer address. */
export const DefaultMaxHandshakesPerAddress = 32
/**
 * Bytes a WebSocket control connection may read beyond `maxHelloBytes` before it authenticated
 * (frame headers, pings, a close): past that budget it is terminated.
 */
export const WebSocketPreAuthSlackBytes = 16 * 1024
/** Most live sessions on the control port. */
export const DefaultMaxSessions = 4_096
/** Most live sessions per token. */
export const DefaultMaxSessionsPerToken = 1_024
/** Most listeners one session may hold (from `Hello` and `AddListener` together). */
export const DefaultMaxListenersPerSession = 256
/** Most pooled HTTP streams per listener (concurrent requests beyond it queue in the agent). */
export const DefaultMaxHttpStreamsPerListener = 256
/** Most idle HTTP streams kept per listener for reuse. */
export const DefaultMaxIdleHttpStreamsPerListener = 32
/** Most control streams a backend may keep open; a SYN beyond it is refused with RST before anything is allocated. */
export const MaxControlStreamsPerSession = 4
/**
 * Streams a backend may open per second (a bucket of one second's worth). Backends open only control
 * streams (one, reused, for the tunnel client); beyond the rate the session ends with GoAway(protocol
 * error). The gateway's own opens toward the backend (one per public connection) are not counted.
 */
export const DefaultMaxPeerStreamsPerSecond = 100
/**
 * Frames of any type a backend may send per second (a bucket of one second's worth); beyond it the
 * session ends with GoAway(protocol error). Far above what heavy legitimate traffic sends (see
 * docs/tunnels.md for the measurement): it only stops a peer flooding the gateway's event loop.
 */
export const DefaultMaxPeerFramesPerSecond = 1_000_000
/** Longest wait, on `RemoveListener`, for the listener's requests and connections in flight to finish. */
export const DefaultDrainTimeout: Duration.Duration = Duration.seconds(30)
/** How often a draining listener's in-flight count is checked. */
export const DrainPollInterval: Duration.Duration = Duration.millis(20)

export interface ControlPortConfig {
  readonly address?: Address | undefined
  /** The other gateways of a cluster, named in each `Welcome` (their control addresses as clients name them). */
  readonly otherGateways?: (() => ReadonlyArray<string>) | undefined
  /**
   * Serve the control port over TLS with this certificate and key (PEM); backends then dial it with TLS
   * (`tls` on their gateway address) and their tokens are accepted from any peer, as over `wss://`.
   */
  readonly tls?: { readonly cert: string; readonly key: string } | undefined
  readonly tokens: ReadonlyArray<TokenGrant>
  readonly handshakeTimeout?: Duration.Input | undefined
  /** Time a connection has to send its first byte (default 5 s, at most `handshakeTimeout`). */
  readonly firstByteTimeout?: Duration.Input | undefined
  /** Largest `Hello` body in bytes (default `DefaultMaxHelloBytes`). */
  readonly maxHelloBytes?: number | undefined
  /** Most handshakes in progress in total (default `DefaultMaxHandshakes`); beyond it, closed at once. */
  readonly maxHandshakes?: number | undefined
  /** Most handshakes in progress per peer address (default `DefaultMaxHandshakesPerAddress`). */
  readonly maxHandshakesPerAddress?: number | undefined
  /**
   * Failed authentications per peer address: free ones, then a doubling delay before each rejection, then
   * refusal for a while (default `DefaultAuthThrottleLimits`).
   */
  readonly authThrottle?: Partial<AuthThrottleLimits> | undefined
  readonly maxSessions?: number | undefined
  readonly maxSessionsPerToken?: number | undefined
  readonly maxListenersPerSession?: number | undefined
  readonly maxHttpStreamsPerListener?: number | undefined
  /**
   * Accept tokens from non-loopback peers over this port without TLS (default false: only loopback peers,
   * so tokens do not cross a network in clear unless the operator says the network is trusted).
   */
  readonly allowRemotePeers?: boolean | undefined
  /**
   * Longest wait for in-flight work when a backend removes a listener, and when the gateway shuts down
   * (ports stop accepting, then sessions close once nothing is in flight) (default 30 s).
   */
  readonly drainTimeout?: Duration.Input | undefined
  readonly yamux?: Partial<YamuxConfig> | undefined
  /** Streams a backend may open per second (default `DefaultMaxPeerStreamsPerSecond`). */
  readonly maxPeerStreamsPerSecond?: number | undefined
  /** Frames a backend may send per second (default `DefaultMaxPeerFramesPerSecond`). */
  readonly maxPeerFramesPerSecond?: number | undefined
  /**
   * Also serve the control port as a WebSocket path (default `/tunnel`) on an HTTP(S) port of its own
   * (`address`, default 127.0.0.1:9998), and through `handleUpgrade` on any HTTP server. Tokens from
   * non-loopback peers are accepted over `wss://` (TLS here or on the mounting server); over plain
   * `ws://` the `allowRemotePeers` rule applies as on TCP.
   */
  readonly websocket?: ControlWebSocketConfig | undefined
  /** Called for each refused handshake, with the reason sent to the backend or why it was cut (for metrics). */
  readonly onRejected?: ((reason: HandshakeRefusal) => void) | undefined
  /** Called when an established session ends with an error, with the yamux reason (for metrics). */
  readonly onSessionFailed?: ((reason: string) => void) | undefined
  /** Called when a backend's session sends GoAway(normal) and starts draining (for metrics). */
  readonly onSessionDraining?: (() => void) | undefined
  /**
   * The gateway's ACME certificates: told of each TLS route bound with `acme` (it obtains the name's
   * certificate), answering why it cannot when it cannot (the route is then refused with `Limit`), and
   * told again when that route is gone (`release`). Without it, such routes are refused (`Malformed`).
   */
  readonly acme?: { readonly want: (name: string) => string | undefined; readonly release?: ((name: string) => void) | undefined } | undefined
}

/**
 * Why a handshake did not lead to a session: a rejection sent to the backend, or a connection cut
 * before it authenticated (`HandshakeTimeout`; `FirstByteTimeout`: nothing sent; `HelloTooLarge`: the
 * length prefix announced more than `maxHelloBytes`; `Protocol`: an unreadable frame; `PreAuthBudget`: a
 * WebSocket read more than its budget; `TooManyHandshakes`, `TooManyHandshakesFromAddress`: refused at
 * accept by the caps on handshakes in progress).
 */
export type HandshakeRefusal =
  | RejectionReason
  | "HandshakeTimeout"
  | "FirstByteTimeout"
  | "HelloTooLarge"
  | "Protocol"
  | "PreAuthBudget"
  /** The peer's address failed to authenticate too often; closed before anything was read. */
  | "TooManyFailures"
  | AdmissionRefusal

/** A handshake's place among those in progress; `cut` tells whether a byte budget ended the connection. */
interface PreAuthTicket extends HandshakeTicket {
  readonly cut?: (() => boolean) | undefined
}

/**
 * A control connection was refused or broke; it is closed, the port keeps serving. `Cut`: ended by a
 * byte budget before it authenticated (counted and logged when it was cut).
 */
export class ControlPortError extends Schema.TaggedError<ControlPortError>()("ControlPortError", {
  reason: Schema.Literals(["HandshakeTimeout", "Protocol", "Rejected", "Refused", "Cut", "Io"]),
  message: Schema.String
}) {}

export interface ControlPortShape {
  /** The bound control address (the port is known even when 0 was asked). */
  readonly address: Address
  /** Live sessions. */
  readonly sessions: () => number
  /** Live sessions draining after their backend's GoAway (no new requests; closed once idle). */
  readonly drainingSessions: () => number
  /** Routes refused to authenticated backends so far (in a `Hello` or an `AddListener`), by reason. */
  readonly routeRefusals: () => ReadonlyMap<RejectionReason, number>
  /** The bound WebSocket control address, when `websocket` is configured with a port of its own. */
  readonly webSocketAddress: Address | undefined
  /**
   * Serves an HTTP upgrade on the WebSocket control path from another server (its `upgrade` event);
   * returns false, touching nothing, for other paths or when `websocket` is not configured.
   */
  readonly handleUpgrade: (req: UpgradeRequest, socket: Duplex, head: Buffer) => boolean
  /**
   * Replaces the token grants for new sessions; sessions already up keep the grant they were given,
   * unless `closeRevoked` is set: then the sessions whose token no longer authenticates are closed (their
   * routes enter the grace period). Returns the number of sessions closed.
   */
  readonly replaceTokens: (tokens: ReadonlyArray<TokenGrant>, options?: { readonly closeRevoked?: boolean | undefined }) => Effect.Effect<number>
}

// ---------------------------------------------------------------------------------------------------
// A session's side of a backend: streams opened on the yamux session once it runs.

interface Tunnel {
  readonly id: string
  readonly label: string
  /** Opens a stream and writes its preamble; waits for the session when called before it runs. */
  readonly open: (preamble: Preamble, done: (error: Error | undefined, stream?: Duplex) => void) => void
  /** Opens a stream at once; before the session runs or after it ended, a stream that fails at once. */
  readonly openNow: (preamble: Preamble) => Duplex
  readonly isClosed: () => boolean
}

/** What a refused stream open means, for the 502 text and logs. */
const openFailure = (error: Error): string =>
  error instanceof YamuxError && error.reason === "RemoteGoAway" ? "backend is shutting down (GoAway)" : error.message

/** A stream that could not be opened: nothing reached the backend (the request may go elsewhere). */
const failedStream = (error: Error): Duplex => refusedConnection(openFailure(error))

const makeTunnel = (id: string, label: string) => {
  let core: Session.YamuxSession["core"] | undefined
  let failure: Error | undefined
  /** The backend sent GoAway: no new work is dispatched to it. */
  let draining = false
  const waiting: Array<() => void> = []
  const open: Tunnel["open"] = (preamble, done) => {
    if (failure !== undefined) return done(failure)
    if (core === undefined) {
      waiting.push(() => open(preamble, done))
      return
    }
    const s = core.openStream()
    if (s instanceof Error) return done(new Error(openFailure(s)))
    const socket = makeStreamDuplex(s)
    socket.write(encodePreamble(preamble))
    done(undefined, socket)
  }
  const openNow = (preamble: Preamble): Duplex => {
    if (failure !== undefined) return failedStream(failure)
    if (core === undefined) {
      // Routed before the session runs (its listeners are bound first): the stream opens once it does.
      const deferred = new DeferredStream()
      waiting.push(() => {
        if (failure !== undefined || core === undefined) return void deferred.destroy(failure ?? new Error("the session ended"))
        const s = core.openStream()
        if (s instanceof Error) return void deferred.destroy(s)
        const socket = makeStreamDuplex(s)
        socket.write(encodePreamble(preamble))
        deferred.attach(socket)
      })
      return deferred
    }
    const s = core.openStream()
    if (s instanceof Error) return failedStream(s)
    const socket = makeStreamDuplex(s)
    socket.write(encodePreamble(preamble))
    return socket
  }
  const tunnel: Tunnel = { id, label, open, openNow, isClosed: () => failure !== undefined || draining }
  return {
    tunnel,
    drain: () => {
      draining = true
    },
    ready: (session: Session.YamuxSession["core"]) => {
      core = session
      for (const w of waiting.splice(0)) w()
    },
    close: (error: Error) => {
      failure ??= error
      for (const w of waiting.splice(0)) w()
    }
  }
}


const makeBackend = (tunnel: Tunnel, listenerId: number, route: RouteDefinition, maxHttpStreams: number, owner: RouteOwner): Backend => {
  const port = route.port
  const httpProtocol: ConnectionProtocol = route._tag === "Tls" ? "tls-http" : "http"
  const preamble = (meta: Omit<ConnectionMeta, "localPort">): Preamble => ({
    _tag: "Preamble",
    listenerId,
    protocol: meta.protocol,
    remoteAddress: meta.remoteAddress.slice(0, MaxPreambleAddressLength),
    remotePort: meta.remotePort,
    localPort: port,
    ...(meta.localAddress ? { localAddress: meta.localAddress.slice(0, MaxPreambleAddressLength) } : {}),
    ...(meta.serverName ? { serverName: meta.serverName } : {})
  })
  const httpPreamble = preamble({ protocol: httpProtocol, remoteAddress: "", remotePort: 0 })
  const upstream = streamUpstream({
    describe: `tunnel ${tunnel.label} listener ${listenerId}`,
    limits: { maxSockets: maxHttpStreams, maxFreeSockets: DefaultMaxIdleHttpStreamsPerListener },
    // each pooled connection (and an upgrade's own) is a new stream with the listener's preamble
    connect: () => tunnel.openNow(httpPreamble),
    // draining after the backend's GoAway: streams in the pool are not reused
    retiring: tunnel.isClosed
  })
  return {
    id: `${tunnel.id}/${listenerId}`,
    label: `${tunnel.label}#${listenerId}`,
    owner,
    inFlight: 0,
    upstream,
    connect: (meta) =>
      Effect.callback<Duplex, BackendUnavailable>((resume) => {
        tunnel.open(preamble(meta), (error, stream) => {
          if (error !== undefined || stream === undefined) {
            resume(Effect.fail(new BackendUnavailable({ reason: "OpenFailed", message: error?.message ?? "no stream" })))
          } else resume(Effect.succeed(stream))
        })
      }),
    isClosed: tunnel.isClosed
  }
}

// ---------------------------------------------------------------------------------------------------

export class ControlPort extends Context.Service<ControlPort, ControlPortShape>()("switchyard/ControlPort") {
  static readonly layer = (config: ControlPortConfig): Layer.Layer<ControlPort, TransportError, Transport | Listeners> =>
    Layer.effect(ControlPort, make(config))

  /**
   * The whole control-port gateway: routing table, dispatcher, public listeners forwarding through the
   * shared Forwarder, and the control port. Needs a `Transport` (runtime's `NodeTransport.layer`).
   */
  static readonly gatewayLayer = (config: GatewayConfig): Layer.Layer<ControlPort | Listeners | Registry | Dispatcher, TransportError, Transport> => {
    const core = Layer.unwrap(Effect.gen(function*() {
      const runLog = Effect.runForkWith(yield* Effect.context<never>())
      const forwarder = yield* Forwarder.make({
        upstream: unroutedUpstream,
        // a backend unreachable, or answering what cannot be relayed (a malformed head, bytes past its
        // framing): the detail (session, backend address) is logged; the public caller reads a plain 502
        onUpstreamError: (message) => void runLog(Effect.logWarning(`control-port tunnel: ${message}`)),
        errors: withoutUpstreamDetail(plainErrors),
        responseTimeoutMs: config.responseTimeoutMs ?? 0,
        idleTimeoutMs: config.idleTimeoutMs ?? 0
      })
      // connections relayed from another gateway of a cluster carry that gateway's X-Forwarded-* (it is
      // authenticated): they are kept, and its address appended
      const relayForwarder = config.cluster === true
        ? yield* Forwarder.make({
          upstream: unroutedUpstream,
          onUpstreamError: (message) => void runLog(Effect.logWarning(`relayed request: ${message}`)),
          errors: withoutUpstreamDetail(plainErrors),
          forwardedHeaders: "append",
          responseTimeoutMs: config.responseTimeoutMs ?? 0,
          idleTimeoutMs: config.idleTimeoutMs ?? 0
        })
        : undefined
      return Layer.effect(
        Listeners,
        Listeners.make({
          relayForwarder,
          host: config.publicHost,
          ...config.publicConnections,
          ...config.instruments,
          forwarder,
          clientLimits: config.clientLimits,
          onClientLimit: config.onClientLimit,
          certificates: config.certificates
        })
      )
    })).pipe(
      Layer.provideMerge(Dispatcher.layer(config.dispatcher)),
      Layer.provideMerge(Registry.layer(config.registry))
    )
    const control = config.certificates === undefined ? config.control : { ...config.control, acme: config.certificates }
    return ControlPort.layer(control).pipe(Layer.provideMerge(core))
  }
}

export interface GatewayConfig {
  readonly control: ControlPortConfig
  /** The gateway is part of a cluster: its public ports also serve connections relayed from other gateways. */
  readonly cluster?: boolean | undefined
  /** Address public ports bind to (default `0.0.0.0`). */
  readonly publicHost?: string | undefined
  /** Connection limits of every public port, and who is told when they close or refuse a connection. */
  readonly publicConnections?: Pick<ListenersConfig, "maxConnectionsPerPort" | "maxConnectionsPerAddress" | "silentConnectionTimeoutMs" | "onConnectionLimit"> | undefined
  readonly registry?: RegistryConfig | undefined
  readonly dispatcher?: DispatcherConfig | undefined
  /** Time allowed for a backend's response head (ms, 0 = none). */
  readonly responseTimeoutMs?: number | undefined
  /** Idle limit on responses and upgraded connections (ms, 0 = none). */
  readonly idleTimeoutMs?: number | undefined
  /** Per-request instruments of the public listeners (request ids, metrics, access log). */
  readonly instruments?: RequestInstruments | undefined
  /** Data-rate and tunnel-stream limits per public client on engine ports (see `ListenersConfig.clientLimits`). */
  readonly clientLimits?: ClientLimits | undefined
  /** Told each time a client limit refuses a request or cuts a connection. */
  readonly onClientLimit?: ((event: ClientLimitEvent) => void) | undefined
  /**
   * Certificates the gateway obtains itself (ACME) for TLS routes registered with `acme`, with the
   * challenge answers on public ports; without it, such routes are refused.
   */
  readonly certificates?:
    | (CertificateSource & { readonly want: (name: string) => string | undefined; readonly release?: ((name: string) => void) | undefined })
    | undefined
}

/** What the public listeners tell per-request instruments: each dispatch and each exchange. */
export type RequestInstruments = Pick<ListenersConfig, "observeDispatch" | "observeExchange">

/**
 * The Forwarder's default upstream. Every routed request is directed to its leased backend, so this is
 * only reached if a request were forwarded without a lease; it answers like an unreachable backend.
 */
const unroutedUpstream = streamUpstream({
  describe: "no backend",
  limits: { maxSockets: 1, maxFreeSockets: 0 },
  connect: () => failedStream(new Error("no backend"))
})

/** True for 127.0.0.0/8, ::1, IPv4-mapped loopback and Unix-socket peers (no host). */
export const isLoopbackPeer = (address: Address | undefined): boolean => {
  const host = address?.host
  if (host === undefined) return address?.path !== undefined
  return host === "::1" || host.startsWith("127.") || host.startsWith("::ffff:127.")
}

const describeRefusal = (refusal: GrantRefusal): string =>
  refusal._tag === "PortNotAllowed"
    ? `port ${refusal.port} is not allowed for this token`
    : `domain ${refusal.domainSuffix ?? "(none)"} is not allowed for this token`

const rejectionFor = (error: ListenerError): RejectionReason =>
  error.reason === "BindFailed" ? "BindFailed" : error.reason === "Limit" ? "Limit" : "Conflict"

const make = Effect.fnUntraced(function*(config: ControlPortConfig) {
  const transport = yield* Transport
  const listeners = yield* Listeners
  let policy = makeTokenPolicy(config.tokens)
  const handshakeTimeout = config.handshakeTimeout === undefined ? DefaultHandshakeTimeout : Duration.fromInputUnsafe(config.handshakeTimeout)
  const maxSessions = config.maxSessions ?? DefaultMaxSessions
  const maxPerToken = config.maxSessionsPerToken ?? DefaultMaxSessionsPerToken
  const maxListeners = config.maxListenersPerSession ?? DefaultMaxListenersPerSession
  const maxHttpStreams = config.maxHttpStreamsPerListener ?? DefaultMaxHttpStreamsPerListener
  const drainTimeout = config.drainTimeout === undefined ? DefaultDrainTimeout : Duration.fromInputUnsafe(config.drainTimeout)
  const firstByteTimeout = Duration.min(
    config.firstByteTimeout === undefined ? DefaultFirstByteTimeout : Duration.fromInputUnsafe(config.firstByteTimeout),
    handshakeTimeout
  )
  const maxHelloBytes = config.maxHelloBytes ?? DefaultMaxHelloBytes
  const admission = makeHandshakeAdmission({
    maxHandshakes: config.maxHandshakes ?? DefaultMaxHandshakes,
    maxHandshakesPerAddress: config.maxHandshakesPerAddress ?? DefaultMaxHandshakesPerAddress
  })
  // one log line per kind of refusal and interval: a flood of connections must not flood the log
  const sampler = new LogSampler()
  const authThrottle = new AuthThrottle({ ...DefaultAuthThrottleLimits, ...config.authThrottle })
  const logRefusal = (kind: string, message: string) =>
    Effect.suspend(() => {
      const skipped = sampler.take(kind, Date.now())
      return skipped === undefined ? Effect.void : Effect.logWarning(`control port: ${message}${skippedNote(skipped)}`)
    }).pipe(Effect.annotateLogs({ component: "ControlPort" }))
  const fibers = yield* FiberSet.make()
  const run = yield* FiberSet.runtime(fibers)<never>()
  const maxPeerStreamsPerSecond = config.maxPeerStreamsPerSecond ?? DefaultMaxPeerStreamsPerSecond
  const maxPeerFramesPerSecond = config.maxPeerFramesPerSecond ?? DefaultMaxPeerFramesPerSecond
  const perToken = new Map<string, number>()
  const routeRefusals = new Map<RejectionReason, number>()
  const countRouteRefusal = (reason: RejectionReason) => void routeRefusals.set(reason, (routeRefusals.get(reason) ?? 0) + 1)
  // live sessions by id: the token each authenticated with, and how to close it (a token revoked on reload)
  const live = new Map<string, { readonly token: Redacted.Redacted<string>; readonly grant: string; readonly label: string; readonly close: () => void }>()
  let sessions = 0
  let drainingSessions = 0
  // sessions ended by a rate limit are logged at most once a second, with how many were not
  let limitLoggedAt = -Infinity
  let limitUnlogged = 0
  let nextSession = 1

  /**
   * Serves one control connection. `admitted`: its ticket among the handshakes in progress, taken at
   * the WebSocket upgrade; a TCP connection takes its own here, before anything is read.
   */
  const serveConnection = (conn: Connection, secure: boolean, admitted?: PreAuthTicket) =>
    Effect.gen(function*() {
      const sessionScope = yield* Scope.Scope
      yield* Effect.addFinalizer(() => Effect.sync(() => conn.destroy()))
      const peer = conn.remoteAddress
      const peerText = peer?.host !== undefined ? `${peer.host}:${peer.port}` : (peer?.path ?? "unknown")

      const reject = (reason: RejectionReason, message: string, index?: number) =>
        Effect.andThen(
          Effect.sync(() => config.onRejected?.(reason)),
          Effect.andThen(
          writeFrame(conn, encodeHelloReply(index === undefined ? { _tag: "Rejected", reason, message } : { _tag: "Rejected", reason, message, index })).pipe(Effect.ignore),
          Effect.fail(new ControlPortError({ reason: "Rejected", message: `${peerText}: ${reason}: ${message}` }))
        ))

      // Checked before anything is read: a refused peer costs no buffer.
      if (!config.allowRemotePeers && !secure && !isLoopbackPeer(peer)) {
        admitted?.release()
        return yield* reject("Insecure", "without TLS this control port accepts tokens from loopback peers only (serve it with TLS, or set allowRemotePeers)")
      }
      const addressKey = peer?.host ?? peer?.path ?? "unknown"
      const gate = authThrottle.gate(addressKey, Date.now())
      if (gate._tag === "Refuse") {
        admitted?.release()
        config.onRejected?.("TooManyFailures")
        const message = `${peerText}: TooManyFailures: too many failed authentications from ${addressKey}; refused for ${Math.ceil(gate.retryAfterMs / 1000)} s more`
        yield* logRefusal("TooManyFailures", message)
        return yield* Effect.fail(new ControlPortError({ reason: "Refused", message }))
      }
      let ticket = admitted
      if (ticket === undefined) {
        const result = admission.admit(peer?.host ?? peer?.path ?? "unknown")
        if (typeof result === "string") {
          config.onRejected?.(result)
          return yield* Effect.fail(new ControlPortError({
            reason: "Refused",
            message: `${peerText}: ${result}: ${admission.inProgress()} handshakes in progress; closed at once`
          }))
        }
        ticket = result
      }
      const heldTicket = ticket
      yield* Effect.addFinalizer(() => Effect.sync(heldTicket.release))

      let heard = false
      let unreadable: HandshakeRefusal = "Protocol"
      const silent = Effect.sleep(firstByteTimeout).pipe(
        Effect.andThen(Effect.suspend(() =>
          heard
            ? Effect.never
            : Effect.fail(new ControlPortError({ reason: "HandshakeTimeout", message: `${peerText}: FirstByteTimeout: nothing sent within ${Duration.format(firstByteTimeout)}` }))
        ))
      )
      const { body, rest } = yield* Effect.raceFirst(
        readFrame(conn, maxHelloBytes, () => void (heard = true)).pipe(
          Effect.mapError((e) => {
            if (e.reason === "TooLarge") unreadable = "HelloTooLarge"
            return new ControlPortError({ reason: "Protocol", message: `${peerText}: ${e.reason === "TooLarge" ? "HelloTooLarge" : e.reason}: ${e.message}` })
          })
        ),
        silent
      ).pipe(
        Effect.timeoutOrElse({
          duration: handshakeTimeout,
          orElse: () => Effect.fail(new ControlPortError({ reason: "HandshakeTimeout", message: `${peerText}: HandshakeTimeout: no Hello within ${Duration.format(handshakeTimeout)}` }))
        }),
        Effect.mapError((e) =>
          // a connection its byte budget cut was counted and logged then; its end is not another refusal
          admitted?.cut?.() === true ? new ControlPortError({ reason: "Cut", message: `${peerText}: ${e.message}` }) : e
        ),
        Effect.tapError((e) =>
          Effect.sync(() => {
            if (e.reason === "Cut") return
            // refused: what it sends from now on is no longer counted against its byte budget
            admitted?.release()
            config.onRejected?.(e.reason === "Protocol" ? unreadable : heard ? "HandshakeTimeout" : "FirstByteTimeout")
          })
        )
      )
      const hello = decodeHello(body)
      if (hello instanceof ControlProtocolError) return yield* reject("Malformed", hello.message)
      if (hello.version !== ProtocolVersion) {
        return yield* reject("Version", `protocol version ${hello.version} is not supported; this gateway speaks ${ProtocolVersion}`)
      }
      const grant = policy.authenticate(hello.token)
      if (grant === undefined) {
        // each failure beyond the free ones is answered later than the one before (the place among the
        // handshakes in progress is held meanwhile, which bounds guesses from one address in parallel too)
        const delay = authThrottle.failed(addressKey, Date.now())
        if (delay > 0) yield* Effect.sleep(Duration.millis(delay))
        return yield* reject("BadToken", "the token is not valid")
      }
      authThrottle.succeeded(addressKey)
      // authenticated: its place among the handshakes in progress (and a WebSocket's byte budget) is given back
      heldTicket.release()
      if (sessions >= maxSessions) return yield* reject("Limit", `the gateway already has ${maxSessions} sessions`)
      if ((perToken.get(grant.name) ?? 0) >= maxPerToken) {
        return yield* reject("Limit", `token ${grant.name} already has ${maxPerToken} sessions`)
      }
      if (hello.listeners.length > maxListeners) return yield* reject("Limit", `at most ${maxListeners} listeners per session`)
      for (let i = 0; i < hello.listeners.length; i++) {
        const refusal = policy.authorize(grant, hello.listeners[i]!)
        if (refusal !== undefined) {
          countRouteRefusal(refusal._tag)
          return yield* reject(refusal._tag, describeRefusal(refusal), i)
        }
      }
      sessions++
      perToken.set(grant.name, (perToken.get(grant.name) ?? 0) + 1)
      yield* Effect.addFinalizer(() =>
        Effect.sync(() => {
          sessions--
          const n = (perToken.get(grant.name) ?? 1) - 1
          if (n === 0) perToken.delete(grant.name)
          else perToken.set(grant.name, n)
        })
      )

      const sessionId = `s${nextSession++}`
      const label = hello.label === undefined ? `${sessionId} ${peerText}` : `${sessionId} ${hello.label}`
      const { tunnel, ready, close, drain } = makeTunnel(sessionId, label)
      yield* Effect.addFinalizer(() => Effect.sync(() => close(new Error(`session ${label} closed`))))
      live.set(sessionId, { token: hello.token, grant: grant.name, label, close: () => conn.destroy() })
      yield* Effect.addFinalizer(() => Effect.sync(() => live.delete(sessionId)))
      const owner: RouteOwner = { name: grant.name, shares: grant.shareRoutes === true }
      const bound = new Map<number, { scope: Scope.Closeable; listener: BoundListener; backend: Backend }>()
      let nextListener = 1

      const bindListener = (route: RouteDefinition) =>
        Effect.gen(function*() {
          // listeners added later over a control stream are held to the same grant as the Hello's
          const refusal = policy.authorize(grant, route)
          if (refusal !== undefined) {
            countRouteRefusal(refusal._tag)
            return yield* Effect.fail({ reason: refusal._tag, message: describeRefusal(refusal) })
          }
          if (bound.size >= maxListeners) {
            countRouteRefusal("Limit")
            return yield* Effect.fail({ reason: "Limit" as const, message: `at most ${maxListeners} listeners per session` })
          }
          if (usesAcme(route) && config.acme === undefined) {
            return yield* Effect.fail({
              reason: "Malformed" as const,
              message: `this gateway does not obtain certificates (no ACME directory configured): ${route.domainSuffix} needs its own certificate and key`
            })
          }
          const listenerId = nextListener++
          const scope = yield* Scope.fork(sessionScope)
          const backend = makeBackend(tunnel, listenerId, route, maxHttpStreams, owner)
          const result = yield* Effect.exit(listeners.bind(route, backend).pipe(Scope.provide(scope)))
          if (Exit.isFailure(result)) {
            yield* Scope.close(scope, Exit.void)
            const error = Exit.isFailure(result) ? result.cause.reasons.find((r) => r._tag === "Fail") : undefined
            const e = error?._tag === "Fail" ? error.error : undefined
            countRouteRefusal(e === undefined ? "BindFailed" : rejectionFor(e))
            if (e !== undefined) yield* logRefusal(`route/${e.reason}`, `${label} (token ${grant.name}): ${describeRoute(route)} refused: ${e.reason}: ${e.message}`)
            return yield* Effect.fail({
              reason: e === undefined ? "BindFailed" as const : rejectionFor(e),
              message: e === undefined ? `cannot bind ${describeRoute(route)}` : e.message
            })
          }
          if (usesAcme(route)) {
            const refused = config.acme?.want(route.domainSuffix)
            if (refused !== undefined) {
              yield* Scope.close(scope, Exit.void)
              return yield* Effect.fail({ reason: "Limit" as const, message: refused })
            }
            const name = route.domainSuffix
            yield* Scope.addFinalizer(scope, Effect.sync(() => config.acme?.release?.(name)))
          }
          const listener: BoundListener = { listenerId, route }
          bound.set(listenerId, { scope, listener, backend })
          return listener
        })

      const welcomed: Array<BoundListener> = []
      for (let i = 0; i < hello.listeners.length; i++) {
        const result = yield* Effect.exit(bindListener(hello.listeners[i]!))
        if (Exit.isFailure(result)) {
          const failure = result.cause.reasons.find((r) => r._tag === "Fail")
          const e = failure?._tag === "Fail" ? failure.error : { reason: "BindFailed" as const, message: "bind failed" }
          return yield* reject(e.reason, e.message, i)
        }
        welcomed.push(result.value)
      }
      const others = config.otherGateways?.() ?? []
      const welcome = { _tag: "Welcome" as const, version: ProtocolVersion, sessionId, listeners: welcomed, ...(others.length === 0 ? {} : { gateways: others.slice(0, MaxWelcomeGateways) }) }
      yield* writeFrame(conn, encodeHelloReply(welcome)).pipe(
        Effect.mapError((e) => new ControlPortError({ reason: "Io", message: `${peerText}: ${e.message}` }))
      )
      const session = yield* Session.make(rest, {
        role: "client",
        config: {
          // the backend only opens control streams: refuse more before allocating, and bound its rates
          maxPeerStreams: MaxControlStreamsPerSession,
          peerStreamOpenRate: perSecond(maxPeerStreamsPerSecond),
          peerFrameRate: perSecond(maxPeerFramesPerSecond),
          ...tunnelYamuxConfig(config.yamux)
        }
      })
      ready(session.core)
      yield* Effect.logDebug(`control session ${label} up with ${welcomed.map((l) => describeRoute(l.route)).join(", ")}`)

      // Control streams: the backend opens them to add and remove listeners.
      let controlStreams = 0
      const serveControlStream = (stream: Duplex) => {
        controlStreams++
        const reader = new FrameReader(MaxControlMessageBytes)
        let busy = Promise.resolve()
        // requests are answered in order; a backend that piles up more than the limit loses the stream
        let pendingRequests = 0
        // and the bytes they came in, so that a backend cannot make the stream hold 64 of the largest
        let pendingBytes = 0
        const reply = (message: ControlReply) => void stream.write(encodeControlReply(message))
        stream.on("error", () => stream.destroy())
        stream.once("close", () => controlStreams--)
        stream.on("data", (chunk: Buffer) => {
          const failed = reader.push(chunk)
          if (failed !== undefined) return void stream.destroy()
          for (;;) {
            const frame = reader.next()
            if (frame === undefined) break
            if (frame instanceof ControlProtocolError) return void stream.destroy()
            const request = decodeControlRequest(frame)
            if (request instanceof ControlProtocolError) return void stream.destroy()
            if (++pendingRequests > MaxPendingControlRequests) return void stream.destroy()
            const size = frame.length
            pendingBytes += size
            if (pendingBytes > MaxPendingControlBytes) return void stream.destroy()
            busy = busy.then(() =>
              new Promise<void>((resolve) => {
                const work = request._tag === "AddListener"
                  ? Effect.match(bindListener(request.route), {
                    onFailure: (e) => reply({ _tag: "ListenerRejected", requestId: request.requestId, reason: e.reason, message: e.message }),
                    onSuccess: (listener) => reply({ _tag: "ListenerAdded", requestId: request.requestId, listener })
                  })
                  : Effect.suspend(() => {
                    const entry = bound.get(request.listenerId)
                    if (entry === undefined) {
                      reply({ _tag: "ListenerRejected", requestId: request.requestId, reason: "UnknownListener", message: `no listener ${request.listenerId} in this session` })
                      return Effect.void
                    }
                    bound.delete(request.listenerId)
                    // no new work reaches it once unregistered; answer when what is in flight is done
                    const drained = Effect.suspend(() => entry.backend.inFlight === 0 ? Effect.void : Effect.fail("busy" as const)).pipe(
                      Effect.retry({ schedule: Schedule.spaced(DrainPollInterval) }),
                      Effect.timeoutOption(drainTimeout)
                    )
                    return Scope.close(entry.scope, Exit.void).pipe(
                      Effect.andThen(drained),
                      Effect.andThen(Effect.sync(() => {
                        reply({ _tag: "ListenerRemoved", requestId: request.requestId, listenerId: request.listenerId })
                      }))
                    )
                  })
                run(work).addObserver(() => {
                  pendingRequests--
                  pendingBytes -= size
                  resolve()
                })
              })
            )
          }
        })
      }
      const acceptNext = (): void => {
        session.core.acceptStream((s) => {
          if (s instanceof Error) return
          const stream = makeStreamDuplex(s)
          if (controlStreams >= MaxControlStreamsPerSession) stream.destroy()
          else serveControlStream(stream)
          acceptNext()
        })
      }
      acceptNext()

      // The backend's GoAway(normal): it takes no new streams. Its listeners stop being picked at once;
      // requests in flight finish (bounded by the drain timeout); then the session closes.
      const inFlight = () => {
        let n = 0
        for (const entry of bound.values()) n += entry.backend.inFlight
        return n
      }
      let draining = false
      const idle = (): Effect.Effect<void> =>
        Effect.suspend(() => inFlight() === 0 ? Effect.void : Effect.andThen(Effect.sleep(DrainPollInterval), idle()))
      const drained = Effect.callback<void>((resume) => session.core.onRemoteGoAway(() => resume(Effect.void))).pipe(
        Effect.andThen(Effect.suspend(() => {
          drain()
          draining = true
          drainingSessions++
          config.onSessionDraining?.()
          return Effect.logInfo(`control session ${label} sent GoAway: draining (no new requests; ${inFlight()} in flight)`)
        })),
        Effect.andThen(Effect.timeoutOption(idle(), drainTimeout)),
        Effect.asVoid,
        Effect.ensuring(Effect.sync(() => {
          if (draining) drainingSessions--
        }))
      )
      const ended = yield* Effect.exit(Effect.raceFirst(session.closed, drained))
      // work the session still carried when it ended: those callers get a 502 or a cut connection
      const stranded = inFlight()
      close(new Error(`session ${label} ended`))
      if (stranded > 0) {
        const why = Exit.isFailure(ended) ? ended.cause.reasons.find((r) => r._tag === "Fail") : undefined
        yield* Effect.logWarning(
          `control session ${label} ended with ${stranded} request(s) or connection(s) in flight` +
            `${why?._tag === "Fail" ? ` (${why.error.message})` : draining ? " (drain timeout)" : ""}; their callers get a 502 or a closed connection`
        )
      }
      if (Exit.isFailure(ended)) {
        const failure = ended.cause.reasons.find((r) => r._tag === "Fail")
        if (failure?._tag === "Fail") {
          const error = failure.error
          config.onSessionFailed?.(error.reason)
          if (error.reason === "StreamOpenRateExceeded" || error.reason === "FrameRateExceeded") {
            const now = yield* Clock.currentTimeMillis
            if (now - limitLoggedAt >= 1_000) {
              const more = limitUnlogged === 0 ? "" : ` (${limitUnlogged} more sessions ended by a rate limit since the last line)`
              limitLoggedAt = now
              limitUnlogged = 0
              yield* Effect.logWarning(`control session ${label} ended: ${error.message}; sent GoAway(protocol error)${more}`)
            } else limitUnlogged++
          }
        }
        yield* Effect.logDebug(`control session ${label} ended: ${String(ended.cause)}`)
      } else if (draining) {
        yield* Effect.logInfo(`control session ${label} drained after its GoAway; closing it`)
      }
    }).pipe(
      Effect.scoped,
      Effect.catch((error: ControlPortError | TransportError) =>
        error._tag === "ControlPortError" && error.reason === "Cut"
          ? Effect.void
          : error._tag === "ControlPortError" && error.reason !== "Io"
          ? logRefusal(`${error.reason}/${/^\S+: (\w+): /.exec(error.message)?.[1] ?? ""}`, error.message)
          : Effect.logWarning(`control port: ${error.message}`)
      ),
      Effect.annotateLogs({ component: "ControlPort" })
    )

  const secure = config.tls !== undefined
  /** A place among the handshakes in progress for `remote`, or undefined (counted and logged) when full. */
  const admitOrRefuse = (remote: Address, how: string): HandshakeTicket | undefined => {
    const admitted = admission.admit(remote.host ?? remote.path ?? "unknown")
    if (typeof admitted !== "string") return admitted
    config.onRejected?.(admitted)
    run(logRefusal(admitted, `${remote.host}:${remote.port}: ${admitted}: ${admission.inProgress()} handshakes in progress; ${how}`))
    return undefined
  }
  const address = yield* transport.listen(
    { ...(config.address ?? DefaultControlAddress), tls: config.tls },
    (conn) => run(serveConnection(conn, secure)),
    // TLS handshakes hold a place too; once TLS is up the connection takes its own for the Hello
    { admitTlsHandshake: (remote) => admitOrRefuse(remote, "closed before its TLS handshake") }
  )
  const websocket = config.websocket
  let handleUpgrade: UpgradeHandler | undefined
  let webSocketAddress: Address | undefined
  if (websocket !== undefined) {
    const preAuthBudget = maxHelloBytes + WebSocketPreAuthSlackBytes
    const handler = makeUpgradeHandler(websocket, (accepted) => {
      // every byte the connection reads counts until it authenticated, frames and all, however the
      // peer splits its messages
      let read = 0
      const stopWatching = accepted.watchReads((bytes) => {
        read += bytes
        // a connection already failed (a refused frame) is closing on its own
        if (read <= preAuthBudget || !accepted.endpoint.open) return
        stopWatching()
        accepted.endpoint.terminate()
        config.onRejected?.("PreAuthBudget")
        run(logRefusal("PreAuthBudget", `${accepted.remoteAddress.host}:${accepted.remoteAddress.port}: PreAuthBudget: read more than ${preAuthBudget} bytes before authenticating; terminated`))
      })
      const ticket: PreAuthTicket = {
        release: () => {
          stopWatching()
          accepted.ticket.release()
        },
        cut: () => read > preAuthBudget
      }
      run(Effect.scoped(Effect.flatMap(
        fromEndpoint(accepted.endpoint, {
          ...websocket,
          localAddress: accepted.localAddress,
          remoteAddress: accepted.remoteAddress
        }),
        (conn) => serveConnection(conn, accepted.secure, ticket)
      )).pipe(Effect.ensuring(Effect.sync(ticket.release))))
    }, {
      admit: (remote) => admission.admit(remote.host ?? "unknown"),
      onRefused: (refusal, remote) => {
        config.onRejected?.(refusal)
        run(logRefusal(refusal, `${remote.host}:${remote.port}: ${refusal}: ${admission.inProgress()} handshakes in progress; WebSocket upgrade refused with 503`))
      }
    })
    yield* Effect.addFinalizer(() => Effect.sync(() => handler.close()))
    handleUpgrade = handler
    if (websocket.listen !== false) webSocketAddress = yield* listenControlWebSocket(websocket, handler)
  }
  // On shutdown, first (finalizers run last-in first-out): stop accepting public traffic and let what
  // is in flight finish over the still-open sessions; then the control listener and the sessions close.
  yield* Effect.addFinalizer(() => listeners.drain(drainTimeout))

  return ControlPort.of({
    address,
    sessions: () => sessions,
    routeRefusals: () => routeRefusals,
    drainingSessions: () => drainingSessions,
    webSocketAddress,
    handleUpgrade: (req, socket, head) => handleUpgrade === undefined ? false : handleUpgrade(req, socket, head),
    replaceTokens: (tokens, options) =>
      Effect.gen(function*() {
        policy = makeTokenPolicy(tokens)
        if (options?.closeRevoked !== true) return 0
        const revoked = [...live.values()].filter((session) => policy.authenticate(session.token) === undefined)
        for (const session of revoked) {
          yield* Effect.logWarning(`control session ${session.label}: token ${session.grant} was removed; closing the session (its routes keep their place for the grace period)`)
          session.close()
        }
        return revoked.length
      }).pipe(Effect.annotateLogs({ component: "ControlPort" }))
  })
})
