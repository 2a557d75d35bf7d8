/**
 * The backend's side of control-port tunnels: one control connection per gateway (several gateways at
 * once), carrying every listener of this process; reconnects with capped exponential backoff and
 * jitter, re-registering everything. Each stream a gateway opens is read for its preamble and handed to
 * the matching listener as a Node `Duplex`. It does not speak HTTP: callers serve the sockets.
 */
import { Context, Deferred, Duration, Effect, Exit, FiberSet, Layer, Queue, Random, Schema, Scope, Stream } from "effect"
import type * as Redacted from "effect/Redacted"
import {
  ControlProtocolError,
  type ControlReply,
  decodeControlReply,
  decodeHelloReply,
  decodePreamble,
  encodeControlRequest,
  encodeHello,
  FrameReader,
  makeHello,
  MaxControlMessageBytes,
  MaxPreambleBytes,
  type Preamble,
  type RejectionReason
} from "../../domain/ControlMessage.ts"
import { describeRoute, type RouteDefinition } from "../../domain/Route.ts"
import { readFrame, writeFrame } from "../front/ControlHandshake.ts"
import type { WebSocketError } from "../../domain/WebSocketClose.ts"
import { type Address, type Connection, Transport, type TransportError } from "../Transport.ts"
import { dialWebSocket, displayUrl, type WebSocketTarget } from "../transport/WebSocketDial.ts"
import * as Session from "../yamux/Session.ts"
import { makeStreamDuplex, type StreamSocket } from "../yamux/StreamDuplex.ts"
import { tunnelYamuxConfig, type YamuxConfig } from "../yamux/YamuxConfig.ts"

/** First reconnect delay by default. */
export const DefaultReconnectInitial: Duration.Duration = Duration.millis(250)
/** Longest reconnect delay by default. */
export const DefaultReconnectMax: Duration.Duration = Duration.seconds(30)
/** Growth of the reconnect delay per failed attempt. */
export const DefaultReconnectFactor = 2
/** Fraction of each delay randomised (0.2: the delay is 80%–100% of the computed value). */
export const DefaultReconnectJitter = 0.2
/** Time the gateway has to answer a `Hello`. */
export const DefaultClientHandshakeTimeout: Duration.Duration = Duration.seconds(10)
/** Time a stream has to deliver its preamble. */
export const DefaultPreambleTimeoutMs = 10_000
/** Longest wait, when a listener closes, for the gateways to confirm that its work in flight is done. */
export const DefaultDrainTimeout: Duration.Duration = Duration.seconds(30)
/** Accepted connections a listener's `Stream` holds before new ones are refused (closed). */
export const MaxPendingConnections = 256

export interface ReconnectPolicy {
  readonly initial?: Duration.Input | undefined
  readonly max?: Duration.Input | undefined
  readonly factor?: number | undefined
  readonly jitter?: number | undefined
}

/**
 * A gateway's control port: a TCP/Unix address dialed through `Transport` (over TLS when the address has
 * `tls`), or a `ws://`/`wss://` URL (the same protocol carried in WebSocket binary messages, through HTTP
 * proxies when configured).
 */
export type GatewayTarget = Address | WebSocketTarget

/** How a gateway target is shown in logs and status. */
export const describeTarget = (target: GatewayTarget): string =>
  "url" in target
    ? displayUrl(target.url)
    : `${target.tls === undefined ? "" : "tls://"}${target.path ?? `${target.host ?? "127.0.0.1"}:${target.port ?? 0}`}`

export interface TunnelClientConfig {
  /** Gateways' control ports; each gets its own connection carrying every listener. */
  readonly servers: ReadonlyArray<GatewayTarget>
  readonly token: Redacted.Redacted<string>
  /** Name shown in the gateway's logs. */
  readonly label?: string | undefined
  readonly reconnect?: ReconnectPolicy | undefined
  readonly handshakeTimeout?: Duration.Input | undefined
  /** Longest wait for gateways to drain a closing listener (default 30 s). */
  readonly drainTimeout?: Duration.Input | undefined
  readonly yamux?: Partial<YamuxConfig> | undefined
  /** Told of every failed attempt and lost session (already logged), e.g. for a status page or to give up. */
  readonly onProblem?: ((problem: GatewayProblem) => void) | undefined
  /**
   * Most gateways to keep sessions to at once (default: every one in `servers`). Fewer: the others are
   * spares, dialed when a gateway in use fails `FailoverAttempts` times in a row. More: gateways of a
   * cluster named in a `Welcome` are added until there are this many.
   */
  readonly maxGateways?: number | undefined
  /** Reads a gateway address a `Welcome` names (`host:port`, `tls://host:port`); none: they are ignored. */
  readonly targetOf?: ((text: string) => GatewayTarget | undefined) | undefined
}

/** Most gateway addresses a client keeps, given and learned. */
export const MaxLearnedGateways = 64

/** Failed attempts in a row after which a gateway in use gives its place to a spare (with `maxGateways`). */
export const FailoverAttempts = 3

/** Rejections that no retry can cure: the token or the route must change first. */
export const PermanentRejections: ReadonlySet<RejectionReason> = new Set<RejectionReason>([
  "BadToken",
  "Version",
  "PortNotAllowed",
  "DomainNotAllowed",
  "Malformed",
  "Insecure"
])

/**
 * Refusals that concern one route, not the session: a client with several routes leaves a route refused
 * this way out of its next `Hello` to that gateway, so the other routes are served, and asks for it again
 * over the session (with backoff, unless the refusal is one of `PermanentRejections`).
 */
export const RouteRejections: ReadonlySet<RejectionReason> = new Set<RejectionReason>([
  "PortNotAllowed",
  "DomainNotAllowed",
  "Conflict",
  "BindFailed",
  "Malformed"
])

/** A failed attempt or a lost session, as the client logs it. */
export interface GatewayProblem {
  readonly gateway: string
  /** The cause and what to do, as logged. */
  readonly message: string
  /** The gateway refused us for a reason a retry does not change (`PermanentRejections`). */
  readonly permanent: boolean
}

/** What an operator can do about a rejection, by reason. */
const rejectionAdvice: Record<RejectionReason, string> = {
  BadToken: "the gateway does not accept this token (wrong or revoked): check --token / SWITCHYARD_TOKEN against the gateway's tokens",
  Version: "the gateway speaks another protocol version: run the same switchyard version on both sides",
  PortNotAllowed: "the token does not allow this public port: use a port the gateway grants this token (tokens file) or ask its operator",
  DomainNotAllowed: "the token does not allow this domain: use a domain the gateway grants this token (tokens file) or ask its operator",
  Conflict: "another backend holds this route on the gateway: choose another port, path or domain, or stop the other backend",
  Limit: "a gateway limit for this token is reached: close other listeners or ask the gateway's operator",
  BindFailed: "the gateway could not bind the public port (in use or not permitted there): choose another --port",
  Malformed: "the gateway refused the route definition: check --port, --path, --domain and the TLS files",
  UnknownListener: "the gateway no longer knows the listener: it is added again on reconnect",
  Insecure: "the gateway refuses tokens over a plain connection: use tls:// or wss:// for --server"
}

/** What an operator can do about a failure that is not a rejection, from its message. */
export const failureAdvice = (error: TunnelClientError): string => {
  if (error.reason === "Rejected") {
    return error.rejection !== undefined && error.rejection in rejectionAdvice ? rejectionAdvice[error.rejection as RejectionReason] : "check the token and route"
  }
  if (error.reason === "HandshakeTimeout") return "the address answers but not as a switchyard control port: check --server"
  const m = error.message
  // a proxy's status 407, not a port or an address that contains the digits
  if (/(^|[\s:])407(\s|$)/.test(m)) return "the HTTP proxy wants credentials: put them in HTTPS_PROXY/HTTP_PROXY (http://user:pass@proxy:port) or exempt the gateway with NO_PROXY"
  if (/certificate|self.signed|CERT_|unable to verify|altname/i.test(m)) {
    return "the gateway's TLS certificate is not trusted for this name: pass its CA with --ca, or check the host name in --server"
  }
  if (/ECONNREFUSED|refused/i.test(m)) return "nothing accepts connections there: check --server and that the gateway is running"
  if (/ENOTFOUND|EAI_AGAIN|getaddrinfo/i.test(m)) return "the gateway's host name does not resolve: check --server"
  if (/closed the session|ECONNRESET|GoAway|ended/i.test(m)) return "the gateway went away (restart, shutdown or network): reconnecting"
  return "check --server and the network path to the gateway"
}

/**
 * The delay before reconnect attempt `attempt` (0 for the first retry): `initial · factor^attempt`,
 * capped at `max`, then reduced by up to `jitter` of itself using `random` in [0, 1).
 */
export const backoffDelay = (attempt: number, policy: ReconnectPolicy, random: number): Duration.Duration => {
  const initial = Duration.toMillis(Duration.fromInputUnsafe(policy.initial ?? DefaultReconnectInitial))
  const max = Duration.toMillis(Duration.fromInputUnsafe(policy.max ?? DefaultReconnectMax))
  const factor = policy.factor ?? DefaultReconnectFactor
  const jitter = policy.jitter ?? DefaultReconnectJitter
  const raw = Math.min(max, initial * Math.pow(factor, Math.min(attempt, 64)))
  return Duration.millis(Math.round(raw * (1 - jitter * random)))
}

/** A gateway refused us or the connection broke; the client retries. */
export class TunnelClientError extends Schema.TaggedError<TunnelClientError>()("TunnelClientError", {
  reason: Schema.Literals(["Rejected", "Protocol", "Io", "HandshakeTimeout"]),
  rejection: Schema.optionalKey(Schema.String),
  message: Schema.String
}) {}

/** One public connection delivered through a tunnel. */
export interface TunnelConnection {
  /** The stream, with `remoteAddress`/`remotePort` set to the public peer from the preamble. */
  readonly socket: StreamSocket
  readonly preamble: Preamble
  /** Index in `servers` of the gateway it came through. */
  readonly gateway: number
}

/** A listener in Effect form. */
export interface TunnelListener {
  readonly route: RouteDefinition
  /** Every connection delivered for the listener, from any gateway. */
  readonly connections: Stream.Stream<TunnelConnection>
  /** Succeeds once a first gateway has bound the listener; fails if one refuses it first. */
  readonly bound: Effect.Effect<void, TunnelClientError>
  /** Where the listener stands on each gateway. */
  readonly status: () => ReadonlyArray<ListenerGatewayState>
}

/** State of one gateway connection, for status displays and tests. */
export interface GatewayStatus {
  readonly address: GatewayTarget
  readonly connected: boolean
  /** Failed attempts since the last successful handshake. */
  readonly attempts: number
  readonly lastError: string | undefined
  /** Sessions established with this gateway so far (more than one means it reconnected). */
  readonly established: number
  /** `connected`, `connecting` (no session yet), `retrying` (after a failure) or `rejected` (refused for a reason a retry does not change). */
  readonly state: GatewayState["state"]
  /** When `state` last changed. */
  readonly since: Date
}

/** A listener of this process, and where it is bound. */
export interface ClientListener {
  readonly id: number
  readonly route: RouteDefinition
  /** Called for each delivered connection (plain callback: the hot path). */
  readonly onConnection: (connection: TunnelConnection) => void
  /** Called when a gateway refuses the listener. */
  readonly onRejected: (gateway: number, reason: RejectionReason, message: string) => void
  /** Called the first time a gateway binds it. */
  readonly onBound: (gateway: number, listenerId: number) => void
}

/** Where one listener stands on one gateway: bound, waiting for a session or an answer, or refused (why). */
export interface ListenerGatewayState {
  readonly gateway: string
  readonly state: "bound" | "pending" | "refused"
  readonly error?: string | undefined
}

/**
 * True when the gateway bound the route as asked. A gateway that does not know a route option (such as
 * `stripPrefix`, from an older version) drops it from the route it echoes: the route would be served
 * differently from what was asked.
 */
export const boundAsAsked = (asked: RouteDefinition, bound: RouteDefinition): boolean => {
  const strip = (r: RouteDefinition) => r._tag !== "Tcp" && r.stripPrefix === true
  return strip(asked) === strip(bound)
}

export interface TunnelClientShape {
  readonly config: TunnelClientConfig
  /** Adds a listener on every gateway (now, and after each reconnect) until the scope closes. */
  readonly addListener: (listener: Omit<ClientListener, "id">) => Effect.Effect<ClientListener, never, Scope.Scope>
  /** A new listener with its connections as a stream; it is removed (drained) when the scope closes. */
  readonly listen: (route: RouteDefinition) => Effect.Effect<TunnelListener, never, Scope.Scope>
  readonly status: () => ReadonlyArray<GatewayStatus>
  /** Where `listener` stands on each gateway, in the order of `servers`. */
  readonly listenerStatus: (listener: ClientListener) => ReadonlyArray<ListenerGatewayState>
}

export class TunnelClient extends Context.Service<TunnelClient, TunnelClientShape>()("switchyard/TunnelClient") {
  static readonly layer = (config: TunnelClientConfig): Layer.Layer<TunnelClient, never, Transport> =>
    Layer.effect(TunnelClient, make(config))
  static readonly make = (config: TunnelClientConfig): Effect.Effect<TunnelClientShape, never, Transport | Scope.Scope> =>
    make(config)
}

interface GatewayState {
  readonly index: number
  readonly address: GatewayTarget
  connected: boolean
  attempts: number
  lastError: string | undefined
  established: number
  state: "connecting" | "connected" | "retrying" | "rejected"
  since: Date
  /** Gateway listener id → local listener, for the live session. */
  readonly byGatewayId: Map<number, ClientListener>
  /** Local listener id → gateway listener id, for the live session. */
  readonly byLocalId: Map<number, number>
  /** Local listener id → why this gateway refused it last (cleared once it binds). */
  readonly refused: Map<number, string>
  /** Listeners left out of the next `Hello` because this gateway refused them while other routes were offered. */
  readonly heldBack: Set<number>
  /** Local listener id → refusals in a row over the live session, for the backoff of the next request. */
  readonly routeAttempts: Map<number, number>
  /** Sends a control request on the live session; undefined while disconnected. */
  send: ((request: { _tag: "AddListener"; route: RouteDefinition } | { _tag: "RemoveListener"; listenerId: number }, onReply: (reply: ControlReply) => void) => void) | undefined
}

/**
 * Reads a preamble from the start of `socket`, then gives the socket back with the rest unread. It is
 * paused meanwhile and flows again as soon as its next consumer attaches a `data` listener (an http
 * server's connection handler, `pipe`), whenever that happens.
 */
export const readPreamble = (socket: StreamSocket, done: (preamble: Preamble | undefined) => void) => {
  const reader = new FrameReader(MaxPreambleBytes)
  let finished = false
  const timer = setTimeout(() => finish(undefined), DefaultPreambleTimeoutMs)
  const finish = (preamble: Preamble | undefined) => {
    if (finished) return
    finished = true
    clearTimeout(timer)
    socket.off("data", onData)
    socket.off("close", onClose)
    if (preamble === undefined) {
      socket.destroy()
      return done(undefined)
    }
    socket.pause()
    const rest = reader.remainder()
    if (rest.length > 0) socket.unshift(Buffer.from(rest.buffer, rest.byteOffset, rest.length))
    const resumeOnConsumer = (event: string | symbol) => {
      if (event !== "data") return
      socket.off("newListener", resumeOnConsumer)
      queueMicrotask(() => {
        if (socket.readableFlowing === false && socket.listenerCount("data") > 0) socket.resume()
      })
    }
    socket.on("newListener", resumeOnConsumer)
    done(preamble)
  }
  const onData = (chunk: Buffer) => {
    if (reader.push(chunk) !== undefined) return finish(undefined)
    const body = reader.next()
    if (body === undefined) return
    if (body instanceof ControlProtocolError) return finish(undefined)
    const preamble = decodePreamble(body)
    finish(preamble instanceof ControlProtocolError ? undefined : preamble)
  }
  const onClose = () => finish(undefined)
  socket.on("data", onData)
  socket.once("close", onClose)
}

/**
 * Accepts every stream the peer opens on `core` until the session ends, reads each one's preamble
 * (a stream without a valid one is closed), names the socket after the preamble's public peer (`peer`
 * stands in for an empty address or port: the gateway itself, for a pooled HTTP stream) and hands it on.
 */
export const acceptWithPreamble = (
  core: Session.SessionCore,
  onStream: (socket: StreamSocket, preamble: Preamble) => void,
  peer?: { readonly host: string; readonly port: number }
): void => {
  const acceptNext = (): void => {
    core.acceptStream((s) => {
      if (s instanceof Error) return
      const socket = makeStreamDuplex(s)
      socket.on("error", () => socket.destroy())
      readPreamble(socket, (preamble) => {
        if (preamble === undefined) return
        socket.remoteAddress = preamble.remoteAddress === "" && peer !== undefined ? peer.host : preamble.remoteAddress
        socket.remotePort = preamble.remotePort === 0 && peer !== undefined ? peer.port : preamble.remotePort
        socket.localPort = preamble.localPort
        if (preamble.localAddress !== undefined) socket.localAddress = preamble.localAddress
        onStream(socket, preamble)
      })
      acceptNext()
    })
  }
  acceptNext()
}

const make = Effect.fnUntraced(function*(config: TunnelClientConfig) {
  const transport = yield* Transport
  const handshakeTimeout = config.handshakeTimeout === undefined
    ? DefaultClientHandshakeTimeout
    : Duration.fromInputUnsafe(config.handshakeTimeout)
  const drainTimeout = config.drainTimeout === undefined ? DefaultDrainTimeout : Duration.fromInputUnsafe(config.drainTimeout)
  const listeners = new Map<number, ClientListener>()
  let nextLocal = 1
  const maxGateways = Math.max(1, config.maxGateways ?? config.servers.length)
  // gateways beyond the ones in use, given or named by a cluster's Welcome, in the order they came
  const spares: Array<GatewayTarget> = config.servers.slice(maxGateways)
  const known = new Set(config.servers.map(describeTarget))
  let nextIndex = Math.min(maxGateways, config.servers.length)
  const newGateway = (address: GatewayTarget, index: number): GatewayState => ({
    index,
    address,
    connected: false,
    attempts: 0,
    established: 0,
    lastError: undefined,
    state: "connecting" as const,
    since: new Date(),
    byGatewayId: new Map(),
    byLocalId: new Map(),
    refused: new Map(),
    heldBack: new Set(),
    routeAttempts: new Map(),
    send: undefined
  })
  const gateways: Array<GatewayState> = config.servers.slice(0, maxGateways).map(newGateway)

  const setState = (g: GatewayState, state: GatewayState["state"]) => {
    if (g.state !== state) g.since = new Date()
    g.state = state
  }
  // logs from plain callbacks (control replies) with the services of the client's own fiber
  const logRun = Effect.runForkWith(yield* Effect.context<never>())
  // route requests asked again after a passing refusal; interrupted when the client closes
  const retries = yield* FiberSet.make()
  const runRetry = yield* FiberSet.runtime(retries)<never>()

  /** Records and reports a refusal of `listener` by `g`, logged with what to do. */
  const routeRefused = (g: GatewayState, listener: ClientListener, reason: RejectionReason, text: string) => {
    const error = new TunnelClientError({ reason: "Rejected", rejection: reason, message: `${reason}: ${text}` })
    const message = `gateway ${describeTarget(g.address)} refused ${describeRoute(listener.route)}: ${error.message}; ${failureAdvice(error)}`
    g.lastError = message
    g.refused.set(listener.id, message)
    config.onProblem?.({ gateway: describeTarget(g.address), message, permanent: PermanentRejections.has(reason) })
    listener.onRejected(g.index, reason, text)
    return message
  }

  const bindRemotely = (g: GatewayState, listener: ClientListener) => {
    const send = g.send
    send?.({ _tag: "AddListener", route: listener.route }, (reply) => {
      if (reply._tag === "ListenerAdded") {
        if (!listeners.has(listener.id)) {
          g.send?.({ _tag: "RemoveListener", listenerId: reply.listener.listenerId }, () => {})
          return
        }
        if (!boundAsAsked(listener.route, reply.listener.route)) {
          g.send?.({ _tag: "RemoveListener", listenerId: reply.listener.listenerId }, () => {})
          logRun(Effect.logError(routeRefused(g, listener, "Version", "the gateway does not support strip_path (it would forward the path prefix): upgrade the gateway")))
          return
        }
        g.byGatewayId.set(reply.listener.listenerId, listener)
        g.byLocalId.set(listener.id, reply.listener.listenerId)
        g.refused.delete(listener.id)
        g.heldBack.delete(listener.id)
        g.routeAttempts.delete(listener.id)
        listener.onBound(g.index, reply.listener.listenerId)
      } else if (reply._tag === "ListenerRejected") {
        const permanent = PermanentRejections.has(reply.reason)
        const attempt = g.routeAttempts.get(listener.id) ?? 0
        g.routeAttempts.set(listener.id, attempt + 1)
        const message = routeRefused(g, listener, reply.reason, reply.message)
        if (permanent) return void logRun(Effect.logError(message))
        // a passing refusal (conflict, bind failure, limit) is asked again over the same session
        runRetry(Effect.gen(function*() {
          const delay = backoffDelay(attempt, config.reconnect ?? {}, yield* Random.next)
          yield* Effect.logError(`${message}; asking again in ${(Duration.toMillis(delay) / 1000).toFixed(1)} s`)
          yield* Effect.sleep(delay)
          if (g.send === send && listeners.has(listener.id) && !g.byLocalId.has(listener.id)) bindRemotely(g, listener)
        }).pipe(Effect.annotateLogs({ component: "client" })))
      }
    })
  }

  /** Removes the listener from every gateway; `done` runs once all have confirmed (drained) it. */
  const unbindRemotely = (listener: ClientListener, done: () => void = () => {}) => {
    let waiting = 1
    const settle = () => {
      if (--waiting === 0) done()
    }
    for (const g of gateways) {
      g.refused.delete(listener.id)
      g.heldBack.delete(listener.id)
      g.routeAttempts.delete(listener.id)
      const remote = g.byLocalId.get(listener.id)
      if (remote === undefined || g.send === undefined) continue
      g.byLocalId.delete(listener.id)
      waiting++
      g.send({ _tag: "RemoveListener", listenerId: remote }, () => {
        g.byGatewayId.delete(remote)
        settle()
      })
    }
    settle()
  }

  /** One connection to a gateway, from dial to the end of its session. */
  const connectOnce = (g: GatewayState) =>
    Effect.gen(function*() {
      const target = g.address
      const dialed: Effect.Effect<Connection, TransportError | WebSocketError, Scope.Scope> = "url" in target
        ? dialWebSocket(target)
        : transport.dial(target)
      const conn = yield* dialed.pipe(
        Effect.mapError((e) => new TunnelClientError({ reason: "Io", message: e.message }))
      )
      // a route this gateway refused is left out while other routes are offered; it is asked for once the session is up
      const all = [...listeners.values()]
      const offered = all.every((l) => g.heldBack.has(l.id)) ? all : all.filter((l) => !g.heldBack.has(l.id))
      yield* writeFrame(conn, encodeHello(makeHello(config.token, offered.map((l) => l.route), config.label))).pipe(
        Effect.mapError((e) => new TunnelClientError({ reason: "Io", message: e.message }))
      )
      const { body, rest } = yield* readFrame(conn, MaxControlMessageBytes).pipe(
        Effect.timeoutOrElse({
          duration: handshakeTimeout,
          orElse: () => Effect.fail(new TunnelClientError({ reason: "HandshakeTimeout", message: "no answer to Hello" }))
        }),
        Effect.mapError((e) => e instanceof ControlProtocolError ? new TunnelClientError({ reason: "Protocol", message: e.message }) : e)
      )
      const reply = decodeHelloReply(body)
      if (reply instanceof ControlProtocolError) return yield* new TunnelClientError({ reason: "Protocol", message: reply.message })
      if (reply._tag === "Rejected") {
        const refusedListener = reply.index === undefined ? undefined : offered[reply.index]
        const which = refusedListener === undefined ? "" : ` (route ${describeRoute(refusedListener.route)})`
        if (refusedListener !== undefined) {
          g.refused.set(refusedListener.id, `gateway ${describeTarget(g.address)} refused ${describeRoute(refusedListener.route)}: ${reply.reason}: ${reply.message}`)
          refusedListener.onRejected(g.index, reply.reason, reply.message)
          if (offered.length > 1 && RouteRejections.has(reply.reason)) g.heldBack.add(refusedListener.id)
        }
        return yield* new TunnelClientError({ reason: "Rejected", rejection: reply.reason, message: `${reply.reason}: ${reply.message}${which}` })
      }
      const session = yield* Session.make(rest, { role: "server", config: tunnelYamuxConfig(config.yamux) })
      const core = session.core
      g.byGatewayId.clear()
      g.byLocalId.clear()
      g.routeAttempts.clear()
      // a route the gateway bound otherwise than asked (an option it does not know) is removed once the session runs
      const misbound: Array<{ listener: ClientListener; listenerId: number }> = []
      if (reply.gateways !== undefined) learnGateways(reply.gateways)
      reply.listeners.forEach((bound, i) => {
        const listener = offered[i]
        if (listener === undefined) return
        if (!boundAsAsked(listener.route, bound.route)) return void misbound.push({ listener, listenerId: bound.listenerId })
        g.byGatewayId.set(bound.listenerId, listener)
        g.byLocalId.set(listener.id, bound.listenerId)
        g.refused.delete(listener.id)
      })

      // control stream, opened on first use
      let control: StreamSocket | undefined
      let nextRequest = 1
      const pending = new Map<number, (reply: ControlReply) => void>()
      const controlStream = (): StreamSocket | undefined => {
        if (control !== undefined && !control.destroyed) return control
        const s = core.openStream()
        if (s instanceof Error) return undefined
        const socket = makeStreamDuplex(s)
        const reader = new FrameReader(MaxControlMessageBytes)
        socket.on("error", () => socket.destroy())
        socket.on("data", (chunk: Buffer) => {
          if (reader.push(chunk) !== undefined) return void socket.destroy()
          for (;;) {
            const frame = reader.next()
            if (frame === undefined || frame instanceof ControlProtocolError) break
            const message = decodeControlReply(frame)
            if (message instanceof ControlProtocolError) return void socket.destroy()
            const resolve = pending.get(message.requestId)
            pending.delete(message.requestId)
            resolve?.(message)
          }
        })
        control = socket
        return socket
      }
      g.send = (request, onReply) => {
        const socket = controlStream()
        if (socket === undefined) return
        const requestId = nextRequest++
        pending.set(requestId, onReply)
        socket.write(encodeControlRequest({ ...request, requestId }))
      }
      g.connected = true
      g.established++
      const failedBefore = g.attempts
      g.attempts = 0
      g.lastError = undefined
      setState(g, "connected")
      yield* g.established > 1 || failedBefore > 0
        ? Effect.logWarning(`connected to gateway ${describeTarget(g.address)} again after ${failedBefore} failed attempt(s)${g.established > 1 ? ` (session ${g.established})` : ""}`)
        : Effect.logInfo(`connected to gateway ${describeTarget(g.address)}`)
      yield* Effect.addFinalizer(() =>
        Effect.sync(() => {
          g.connected = false
          g.send = undefined
          g.byGatewayId.clear()
          g.byLocalId.clear()
          // requests that will never be answered settle now (a closing listener stops waiting)
          const unanswered = [...pending.values()]
          pending.clear()
          for (const settle of unanswered) settle({ _tag: "ListenerRemoved", requestId: 0, listenerId: 0 })
        })
      )
      for (const listener of offered) {
        const remote = g.byLocalId.get(listener.id)
        if (remote !== undefined) listener.onBound(g.index, remote)
      }
      for (const { listener, listenerId } of misbound) {
        g.send({ _tag: "RemoveListener", listenerId }, () => {})
        yield* Effect.logError(routeRefused(g, listener, "Version", "the gateway does not support strip_path (it would forward the path prefix): upgrade the gateway"))
      }
      // listeners added while the handshake was in flight, and ones removed meanwhile
      for (const listener of listeners.values()) {
        if (!offered.includes(listener) && !misbound.some((m) => m.listener === listener)) bindRemotely(g, listener)
      }
      for (const listener of offered) if (!listeners.has(listener.id)) unbindRemotely(listener)

      acceptWithPreamble(core, (socket, preamble) => {
        const listener = g.byGatewayId.get(preamble.listenerId)
        if (listener === undefined) return void socket.destroy()
        listener.onConnection({ socket, preamble, gateway: g.index })
      })
      yield* session.closed.pipe(Effect.mapError((e) => new TunnelClientError({ reason: "Io", message: e.message })))
      return yield* new TunnelClientError({ reason: "Io", message: "the gateway closed the session" })
    }).pipe(Effect.scoped)

  const supervise = (g: GatewayState): Effect.Effect<never> =>
    Effect.gen(function*() {
      for (;;) {
        const establishedBefore = g.established
        const exit = yield* Effect.exit(connectOnce(g))
        const delay = backoffDelay(g.attempts, config.reconnect ?? {}, yield* Random.next)
        if (Exit.isFailure(exit)) {
          const failure = exit.cause.reasons.find((r) => r._tag === "Fail")
          const error = failure?._tag === "Fail" ? failure.error : new TunnelClientError({ reason: "Io", message: "session ended" })
          const lost = g.established > establishedBefore
          const permanent = error.reason === "Rejected" && error.rejection !== undefined && PermanentRejections.has(error.rejection as RejectionReason)
          const gateway = describeTarget(g.address)
          const what = lost ? `lost gateway ${gateway}` : error.reason === "Rejected" ? `gateway ${gateway} refused this client` : `cannot reach gateway ${gateway}`
          const message = `${what}: ${error.message}; ${failureAdvice(error)}`
          g.lastError = message
          setState(g, permanent ? "rejected" : "retrying")
          if (!lost && g.attempts + 1 >= FailoverAttempts && spares.length > 0 && !permanent) {
            // this gateway gives its place to a spare, and becomes one itself
            g.attempts++
            yield* Effect.logWarning(`${message}; switching to gateway ${describeTarget(spares[0]!)}`)
            config.onProblem?.({ gateway, message, permanent })
            replaceBySpare(g)
            return yield* Effect.interrupt
          }
          const retry = `retrying in ${(Duration.toMillis(delay) / 1000).toFixed(1)} s (attempt ${g.attempts + 1})`
          yield* error.reason === "Rejected" ? Effect.logError(`${message}; ${retry}`) : Effect.logWarning(`${message}; ${retry}`)
          config.onProblem?.({ gateway, message, permanent })
        }
        g.attempts++
        yield* Effect.sleep(delay)
      }
    }).pipe(Effect.annotateLogs({ component: "client" }))

  const supervisors = yield* FiberSet.make()
  const runSupervisor = yield* FiberSet.runtime(supervisors)<never>()
  const startSupervising = (g: GatewayState) => void runSupervisor(supervise(g) as Effect.Effect<never>)

  /** Takes `g` out of use (its routes there are dropped with its session) and starts the first spare. */
  function replaceBySpare(g: GatewayState) {
    const spare = spares.shift()
    if (spare === undefined) return
    const at = gateways.indexOf(g)
    if (at !== -1) gateways.splice(at, 1)
    g.send = undefined
    g.byGatewayId.clear()
    g.byLocalId.clear()
    spares.push(g.address)
    const next = newGateway(spare, nextIndex++)
    gateways.push(next)
    startSupervising(next)
  }

  /** Gateways a cluster's Welcome named: kept as spares, and used at once while fewer than `maxGateways` are. */
  function learnGateways(texts: ReadonlyArray<string>) {
    if (config.targetOf === undefined) return
    for (const text of texts.slice(0, MaxLearnedGateways)) {
      const target = config.targetOf(text)
      if (target === undefined) continue
      const name = describeTarget(target)
      if (known.has(name) || known.size >= MaxLearnedGateways) continue
      known.add(name)
      logRun(Effect.logInfo(`gateway ${name} learned from a gateway of its cluster`).pipe(Effect.annotateLogs({ component: "client" })))
      if (gateways.length < maxGateways) {
        const g = newGateway(target, nextIndex++)
        gateways.push(g)
        startSupervising(g)
      } else spares.push(target)
    }
  }

  for (const g of gateways) startSupervising(g)

  const addListener = Effect.fnUntraced(function*(spec: Omit<ClientListener, "id">) {
    const listener: ClientListener = { ...spec, id: nextLocal++ }
    listeners.set(listener.id, listener)
    for (const g of gateways) bindRemotely(g, listener)
    // closing a listener waits (bounded) until the gateways have routed its traffic elsewhere and
    // finished what was in flight on it, so a deploy (start the new, stop the old) drops nothing
    yield* Effect.addFinalizer(() =>
      Effect.callback<void>((resume) => {
        listeners.delete(listener.id)
        unbindRemotely(listener, () => resume(Effect.void))
      }).pipe(Effect.timeoutOption(drainTimeout), Effect.asVoid)
    )
    return listener
  })

  const listen = Effect.fnUntraced(function*(route: RouteDefinition) {
    const queue = yield* Queue.bounded<TunnelConnection>(MaxPendingConnections)
    const bound = Deferred.makeUnsafe<void, TunnelClientError>()
    yield* Effect.addFinalizer(() => Queue.shutdown(queue))
    const added = yield* addListener({
      route,
      onConnection: (connection) => {
        // a consumer that does not keep up gets new connections refused rather than buffered
        if (!Queue.offerUnsafe(queue, connection)) connection.socket.destroy()
      },
      onRejected: (_gateway, reason, message) =>
        void Deferred.doneUnsafe(bound, Effect.fail(new TunnelClientError({ reason: "Rejected", rejection: reason, message: `${reason}: ${message}` }))),
      onBound: () => void Deferred.doneUnsafe(bound, Effect.void)
    })
    return { route, connections: Stream.fromQueue(queue), bound: Deferred.await(bound), status: () => listenerStatus(added) } satisfies TunnelListener
  })

  const listenerStatus = (listener: ClientListener): ReadonlyArray<ListenerGatewayState> =>
    gateways.map((g) => {
      const gateway = describeTarget(g.address)
      if (g.byLocalId.has(listener.id)) return { gateway, state: "bound" }
      const error = g.refused.get(listener.id)
      return error === undefined ? { gateway, state: "pending" } : { gateway, state: "refused", error }
    })

  return TunnelClient.of({
    config,
    addListener,
    listen,
    listenerStatus,
    status: () =>
      gateways.map((g) => ({
        address: g.address,
        connected: g.connected,
        attempts: g.attempts,
        lastError: g.lastError,
        established: g.established,
        state: g.state,
        since: g.since
      }))
  })
})
