/**
 * The reverse-HTTP/2 tunnel port: a backend dials it (TCP, or TLS with the backend as TLS client) and
 * serves HTTP/2 on the connection; the gateway is the HTTP/2 client. Each connection is a backend whose
 * room is its free stream slots, so the Dispatcher's picks spread requests over them (this module picks
 * nothing itself); it adds PING health checks, GOAWAY drains and pruning of dead connections. Plain
 * mode takes any h2 server (routes from config); authenticated mode reads a framed `Hello` first. It
 * does not forward bytes itself (`forward/Http2Upstream` does) nor open public ports.
 */
import { Buffer } from "node:buffer"
import * as net from "node:net"
import { type Duplex, PassThrough } from "node:stream"
import * as tls from "node:tls"
import { Context, Duration, Effect, Exit, FiberSet, Layer, Option, Schema, Scope, Semaphore } from "effect"
import {
  type BoundListener,
  decodeHello,
  encodeHelloReply,
  type Hello,
  ProtocolVersion,
  type Rejected,
  type RejectionReason
} from "../../domain/ControlMessage.ts"
import { readSocketFrame } from "./ControlHandshake.ts"
import { skippedNote } from "./HandshakeAdmission.ts"
import { AuthThrottle, type AuthThrottleLimits, DefaultAuthThrottleLimits } from "../../domain/AuthThrottle.ts"
import { LogSampler } from "../../domain/LogSampler.ts"
import type { ForwardedMode } from "../../domain/HttpHeaders.ts"
import { describeRoute, type RouteDefinition } from "../../domain/Route.ts"
import { makeTokenPolicy, type TokenGrant } from "../../domain/TokenPolicy.ts"
import { type Backend, type BackendLease, BackendUnavailable } from "../Backend.ts"
import { plainErrors, withoutUpstreamDetail, writeRawError } from "../forward/ErrorResponse.ts"
import type { ExchangeFront, ExchangeRequest } from "../forward/Exchange.ts"
import { closeAfterFlush } from "../forward/Flush.ts"
import { H2ClientConnection, type H2ConnectionError } from "../forward/H2ClientConnection.ts"
import { forwardToH2, type H2ForwardOptions, type RequestReplay, upgradeToH2 } from "../forward/Http2Upstream.ts"
import { streamUpstream, type Upstream } from "../forward/Upstream.ts"
import { type ListenerError, Listeners } from "../Listeners.ts"

/** Where the tunnel port listens by default (loopback: exposing it is the operator's choice). */
export const DefaultTunnelAddress = { host: "127.0.0.1", port: 9443 } as const
/** Time a new connection has for its preamble (authenticated mode) and the backend's first SETTINGS. */
export const DefaultHandshakeTimeout: Duration.Duration = Duration.seconds(10)
/** Largest preamble (`Hello`) accepted; room for a few TLS routes with certificate chains. */
export const DefaultMaxPreambleBytes = 256 * 1024
/** How often each backend connection is PINGed. */
export const DefaultPingInterval: Duration.Duration = Duration.seconds(15)
/** How long a PING may go unanswered before the connection is dropped. */
export const DefaultPingTimeout: Duration.Duration = Duration.seconds(10)
/** Most backend connections on the tunnel port at once. */
export const DefaultMaxConnections = 4_096
/** Most concurrent streams the gateway opens on one connection, whatever the backend allows. */
export const DefaultMaxStreamsPerConnection = 1_024
/** Most public requests waiting for a free stream slot, over the whole port. */
export const DefaultMaxQueuedRequests = 1_024
/** How long a request waits for a free stream slot before a 503 (ms). */
export const DefaultQueueTimeoutMs = 30_000
/** Receive window the gateway grants per stream at first (bytes): what one response can have in flight. */
export const DefaultStreamWindowBytes = 1024 * 1024
/**
 * Largest a stream's receive window grows to while its public client takes every byte as it comes
 * (bytes); a slow client's stream keeps the window it has, so this bounds what a fast download has in
 * flight and the connection window still bounds them all.
 */
export const DefaultMaxStreamWindowBytes = 4 * 1024 * 1024
/** Receive window the gateway grants per connection (bytes). */
export const DefaultConnectionWindowBytes = 16 * 1024 * 1024
/** Largest DATA frame the gateway lets a backend send (bytes; HTTP/2's default is 16 KiB). */
export const DefaultMaxFrameBytes = 256 * 1024
/** Largest header block the gateway accepts from a backend (bytes). */
export const DefaultMaxHeaderListBytes = 64 * 1024
/** Most header fields in a backend's response head. */
export const MaxHeaderPairs = 2_048
/** How long shutting down waits for streams in flight on each connection. */
export const DefaultDrainTimeout: Duration.Duration = Duration.seconds(10)
/** Times a request refused unprocessed (GOAWAY race, REFUSED_STREAM) is tried on another connection. */
export const MaxRefusedRetries = 3
/** Recent connection failures kept for inspection. */
export const MaxRecentFailures = 32

export interface ReverseH2Config {
  /** Where the tunnel port listens (default `127.0.0.1:9443`; port 0 picks one). */
  readonly address?: { readonly host?: string | undefined; readonly port?: number | undefined } | undefined
  /**
   * Routes every plain-mode connection serves, and an authenticated connection whose `Hello` names none.
   * HTTP routes only (`Http`, or `Tls` with `then: "http"`).
   */
  readonly routes?: ReadonlyArray<RouteDefinition> | undefined
  /**
   * Failed authentications per peer address (authenticated mode): free ones, then a doubling delay before
   * each rejection, then refusal for a while (default `DefaultAuthThrottleLimits`).
   */
  readonly authThrottle?: Partial<AuthThrottleLimits> | undefined
  /** Grants for authenticated mode; when absent the port runs in plain mode (no preamble). */
  readonly tokens?: ReadonlyArray<TokenGrant> | undefined
  /** Serve the tunnel port over TLS (the backend is the TLS client); PEM texts. */
  readonly tls?: { readonly cert: string; readonly key: string } | undefined
  /** Accept tokens over plain TCP from non-loopback peers (off by default: use TLS). */
  readonly allowTokensOverPlainTcp?: boolean | undefined
  readonly handshakeTimeout?: Duration.Input | undefined
  readonly maxPreambleBytes?: number | undefined
  readonly pingInterval?: Duration.Input | undefined
  readonly pingTimeout?: Duration.Input | undefined
  readonly maxConnections?: number | undefined
  /** How long shutting down waits for streams in flight before closing connections. */
  readonly drainTimeout?: Duration.Input | undefined
  readonly maxStreamsPerConnection?: number | undefined
  readonly maxQueuedRequests?: number | undefined
  readonly queueTimeoutMs?: number | undefined
  readonly streamWindowBytes?: number | undefined
  /** Largest a stream's window grows to while its client keeps up (at least `streamWindowBytes`). */
  readonly maxStreamWindowBytes?: number | undefined
  readonly connectionWindowBytes?: number | undefined
  /** Largest DATA frame a backend may send (16 KiB to 16 MiB − 1). */
  readonly maxFrameBytes?: number | undefined
  /** Time allowed for a backend's response head (ms, 0 = none). */
  readonly responseTimeoutMs?: number | undefined
  /** Idle limit on responses and upgraded streams (ms, 0 = none). */
  readonly idleTimeoutMs?: number | undefined
  /** `X-Forwarded-*` handling toward backends (default `replace`). */
  readonly forwardedHeaders?: ForwardedMode | undefined
  /** Called for each connection failure, with its reason (for metrics). */
  readonly onFailure?: ((reason: ReverseH2Error["reason"]) => void) | undefined
  /**
   * Called for each stream reset because its backend broke the protocol on it (a malformed response
   * head, a body disagreeing with its content-length), with what happened (for metrics); also logged.
   */
  readonly onStreamViolation?: ((message: string) => void) | undefined
}

/** A tunnel connection or the port itself failed; the connection is closed, the port keeps serving. */
export class ReverseH2Error extends Schema.TaggedError<ReverseH2Error>()("ReverseH2Error", {
  reason: Schema.Literals(["Config", "Listen", "HandshakeTimeout", "BadPreamble", "BadPreface", "Rejected", "Insecure", "TooManyFailures", "PingTimeout", "Bind"]),
  message: Schema.String
}) {}

export interface ReverseH2Shape {
  /** The bound tunnel address. */
  readonly address: { readonly host: string; readonly port: number }
  /** Whether connections must authenticate with a preamble. */
  readonly authenticated: boolean
  /** Live backend connections (registered and serving). */
  readonly connections: () => number
  /** Streams open toward backends. */
  readonly activeStreams: () => number
  /** Public requests waiting for a free stream slot. */
  readonly queued: () => number
  /** The latest connection failures, oldest first (at most `MaxRecentFailures`). */
  readonly recentFailures: () => ReadonlyArray<ReverseH2Error>
  /** Replaces the grants for new connections (authenticated mode); live connections keep theirs. */
  readonly replaceTokens: (tokens: ReadonlyArray<TokenGrant>) => Effect.Effect<void>
  /**
   * Replaces the configured routes. Live plain-mode connections start serving the added routes and stop
   * serving the removed ones (requests already in flight on them finish); unchanged routes stay bound.
   * New connections (and authenticated ones whose `Hello` names no route) get the new set. Fails with
   * `Config`, changing nothing, when a route is not an HTTP route or a plain port would be left with none.
   * A route that cannot be bound on a live connection (a conflict, a port that will not open) is logged
   * and recorded as a `Bind` failure; the others still apply.
   */
  readonly replaceRoutes: (routes: ReadonlyArray<RouteDefinition>) => Effect.Effect<void, ReverseH2Error>
  /** The routes new connections serve (the configured set). */
  readonly routes: () => ReadonlyArray<RouteDefinition>
}

export class ReverseH2 extends Context.Service<ReverseH2, ReverseH2Shape>()("switchyard/ReverseH2") {
  /** The tunnel port; its connections' routes are bound on the shared public listeners. */
  static readonly layer = (config: ReverseH2Config): Layer.Layer<ReverseH2, ReverseH2Error, Listeners> =>
    Layer.effect(ReverseH2, make(config))
}

/** Whether a route can be served by an HTTP/2 backend (the gateway speaks HTTP to it). */
export const isHttpRoute = (route: RouteDefinition): boolean =>
  route._tag === "Http" || (route._tag === "Tls" && route.then === "http")

/** Identity of a route across reloads (a TLS route with a new certificate is a new route). */
const routeKey = (route: RouteDefinition): string =>
  route._tag === "Tls" ? `${describeRoute(route)}\n${route.cert}\n${route.key}` : describeRoute(route)

const isLoopback = (address: string | undefined): boolean =>
  address === "127.0.0.1" || address === "::1" || address === "::ffff:127.0.0.1" || (address?.startsWith("127.") ?? false)

/** One backend connection: its session, stream slots and state. */
interface H2Connection {
  readonly backend: Backend
  readonly describe: string
  session: H2ClientConnection | undefined
  /** Streams the gateway has open on it. */
  active: number
  /** min(backend's SETTINGS_MAX_CONCURRENT_STREAMS, the configured cap). */
  maxStreams: number
  /** The backend advertised SETTINGS_ENABLE_CONNECT_PROTOCOL. */
  extendedConnect: boolean
  ready: boolean
  draining: boolean
  closed: boolean
}

/** Whether the connection is gone or going (its session may close before its fiber notices). */
const isGone = (c: H2Connection): boolean =>
  c.closed || c.draining || (c.session !== undefined && (c.session.goingAway || c.session.destroyed))

const hasCapacity = (c: H2Connection): boolean => c.ready && c.active < c.maxStreams && c.session!.canOpen() && !isGone(c)

/** A public request waiting for a stream slot on its route. */
interface Waiter {
  /** Starts the request if its leased connection, or another the dispatcher picks, has a free slot. */
  readonly tryStart: () => boolean
  readonly expire: () => void
  timer: ReturnType<typeof setTimeout> | undefined
}

/** The `Upstream` every reverse-HTTP/2 backend carries: never used, its requests go through `messages`. */
const unusedUpstream = (): Upstream =>
  streamUpstream({
    describe: "reverse-h2",
    limits: { maxSockets: 1, maxFreeSockets: 0 },
    connect: () => {
      const s = new PassThrough()
      queueMicrotask(() => s.destroy(new Error("reverse-HTTP/2 backends take requests over HTTP/2")))
      return s
    }
  })

const make = Effect.fnUntraced(function*(config: ReverseH2Config) {
  const listeners = yield* Listeners
  const authenticated = config.tokens !== undefined
  let policy = makeTokenPolicy(config.tokens ?? [])
  const checkRoutes = (routes: ReadonlyArray<RouteDefinition>): ReverseH2Error | undefined => {
    const badRoute = routes.find((r) => !isHttpRoute(r))
    if (badRoute !== undefined) {
      return new ReverseH2Error({ reason: "Config", message: `reverse-HTTP/2 routes must be HTTP routes, not ${describeRoute(badRoute)}` })
    }
    if (!authenticated && routes.length === 0) {
      return new ReverseH2Error({ reason: "Config", message: "a plain reverse-HTTP/2 port needs at least one route" })
    }
    return undefined
  }
  let defaultRoutes: ReadonlyArray<RouteDefinition> = config.routes ?? []
  const invalidRoutes = checkRoutes(defaultRoutes)
  if (invalidRoutes !== undefined) return yield* invalidRoutes
  // plain-mode connections, each with one scope per bound route (so a reload can unbind one route);
  // a connection and a reload change these bindings one at a time
  const plainBindings = new Map<H2Connection, { readonly scope: Scope.Scope; readonly routes: Map<string, Scope.Closeable> }>()
  const bindingLock = yield* Semaphore.make(1)
  const handshakeTimeout = Duration.fromInputUnsafe(config.handshakeTimeout ?? DefaultHandshakeTimeout)
  const maxPreambleBytes = config.maxPreambleBytes ?? DefaultMaxPreambleBytes
  const pingInterval = Duration.fromInputUnsafe(config.pingInterval ?? DefaultPingInterval)
  const pingTimeout = Duration.fromInputUnsafe(config.pingTimeout ?? DefaultPingTimeout)
  const drainTimeout = Duration.fromInputUnsafe(config.drainTimeout ?? DefaultDrainTimeout)
  const maxStreamsCap = config.maxStreamsPerConnection ?? DefaultMaxStreamsPerConnection
  const maxQueued = config.maxQueuedRequests ?? DefaultMaxQueuedRequests
  const queueTimeoutMs = config.queueTimeoutMs ?? DefaultQueueTimeoutMs
  const streamWindow = config.streamWindowBytes ?? DefaultStreamWindowBytes
  const maxStreamWindow = Math.max(streamWindow, config.maxStreamWindowBytes ?? DefaultMaxStreamWindowBytes)
  const connectionWindow = config.connectionWindowBytes ?? DefaultConnectionWindowBytes
  const maxFrameBytes = config.maxFrameBytes ?? DefaultMaxFrameBytes
  // what a public caller reads when an upgrade fails: no backend address (the detail goes to the log)
  const errors = withoutUpstreamDetail(plainErrors)
  const upstream = unusedUpstream()

  const byBackend = new WeakMap<Backend, H2Connection>()
  // what a connection's SETTINGS and GOAWAY also tell, once the connection is serving
  const sessionHooks = new WeakMap<H2ClientConnection, { readonly onSettings: Array<() => void>; readonly onGoaway: Array<() => void> }>()
  const live = new Set<H2Connection>()
  const waiters: Array<Waiter> = []
  const failures: Array<ReverseH2Error> = []
  let streams = 0
  let nextId = 0

  // one line per reason and interval: a flood of refused connections must not flood the log
  const failureLog = new LogSampler()
  const authThrottle = new AuthThrottle({ ...DefaultAuthThrottleLimits, ...config.authThrottle })
  const recordFailure = (error: ReverseH2Error) =>
    Effect.suspend(() => {
      if (failures.length >= MaxRecentFailures) failures.shift()
      failures.push(error)
      config.onFailure?.(error.reason)
      const skipped = failureLog.take(error.reason, Date.now())
      return skipped === undefined ? Effect.void : Effect.logWarning(`reverse-h2: ${error.reason}: ${error.message}${skippedNote(skipped)}`)
    })

  // ---------------------------------------------------------------------------------------------
  // Serving a request on the connection the dispatcher leased, or on another the dispatcher picks when
  // that one has no free stream slot; waiting, bounded, when none has.

  /**
   * The dispatcher's view of a connection's room: leases count, not only open streams, so requests
   * leased but not yet started take their slot.
   */
  const hasRoomForLease = (conn: H2Connection): boolean => hasCapacity(conn) && conn.backend.inFlight < conn.maxStreams

  /** Whether `backend` is one of this port's connections (and can carry an extended CONNECT). */
  const isH2Backend = (needConnect: boolean) => (backend: Backend): boolean => {
    const conn = byBackend.get(backend)
    return conn !== undefined && (!needConnect || conn.extendedConnect)
  }

  /**
   * A connection to start on now: the leased one when it has a free slot, else the one of a new lease
   * from the dispatcher (the caller then gives up the old lease); `undefined` when none has a slot.
   */
  const connectionFor = (lease: BackendLease, needConnect: boolean): { conn: H2Connection; lease: BackendLease } | undefined => {
    const own = byBackend.get(lease.backend)
    if (own !== undefined && hasCapacity(own) && (!needConnect || own.extendedConnect)) return { conn: own, lease }
    const next = lease.another(isH2Backend(needConnect))
    if (next === undefined) return undefined
    const conn = byBackend.get(next.backend)
    if (conn === undefined || !hasCapacity(conn)) {
      next.release()
      return undefined
    }
    return { conn, lease: next }
  }

  /** Ends a lease; the dispatcher then sees its connection's room, which a waiting request may take. */
  const releaseLease = (lease: BackendLease): void => {
    lease.release()
    if (waiters.length > 0) serveWaiters()
  }

  const serveWaiters = () => {
    for (let i = 0; i < waiters.length;) {
      const waiter = waiters[i]!
      waiters.splice(i, 1)
      if (waiter.tryStart()) {
        if (waiter.timer !== undefined) clearTimeout(waiter.timer)
        continue
      }
      waiters.splice(i, 0, waiter)
      i++
    }
  }

  const enqueue = (front: ExchangeFront, tryStart: () => boolean): void => {
    if (waiters.length >= maxQueued) {
      front.fail(503, `switchyard: ${maxQueued} requests already wait for an HTTP/2 stream; try again later`)
      return
    }
    const waiter: Waiter = {
      tryStart,
      expire: () => {
        remove()
        front.fail(503, `switchyard: no HTTP/2 stream free on the route's backends within ${queueTimeoutMs} ms`)
      },
      timer: undefined
    }
    const remove = () => {
      const index = waiters.indexOf(waiter)
      if (index !== -1) waiters.splice(index, 1)
      if (waiter.timer !== undefined) clearTimeout(waiter.timer)
    }
    if (queueTimeoutMs > 0) waiter.timer = setTimeout(waiter.expire, queueTimeoutMs)
    waiters.push(waiter)
    front.onGone(remove)
  }

  const forwardOptions = (conn: H2Connection, onDone: () => void, onRefused?: (replay: RequestReplay) => boolean): H2ForwardOptions => ({
    responseTimeoutMs: config.responseTimeoutMs ?? 0,
    idleTimeoutMs: config.idleTimeoutMs ?? 0,
    errors,
    onError: (message) => void run(Effect.logInfo(`reverse-h2 ${conn.describe}: ${message}`)),
    onViolation: config.onStreamViolation,
    onDone,
    onRefused
  })

  /**
   * Serves one exchange on the leased connection; when it has no free slot (or refused the request
   * unprocessed), on the connection of a new lease from the dispatcher, else once one has a slot.
   */
  const exchange = (front: ExchangeFront, lease: BackendLease): void => {
    // the lease the request is served under; the one the dispatcher gave is released by the front door too
    let current = lease
    let attempts = 0
    front.onGone(() => releaseLease(current))
    const start = (conn: H2Connection, replay?: RequestReplay): void => {
      conn.active++
      streams++
      let over = false
      /** The stream is over: its slot is free again (false when it was already). */
      const streamOver = (): boolean => {
        if (over) return false
        over = true
        conn.active--
        streams--
        return true
      }
      forwardToH2(conn as H2Connection & { session: H2ClientConnection }, front, forwardOptions(conn, () => {
        if (!streamOver()) return
        // a response written whole (or cut) needs the backend no more: its lease ends before waiting
        // requests look for a slot, so the dispatcher sees this connection's room; a request refused
        // unprocessed keeps its lease for the next attempt
        if (front.isGone()) current.release()
        if (waiters.length > 0) serveWaiters()
      }, (again) => {
        streamOver()
        if (++attempts > MaxRefusedRetries) return false
        route(again)
        return true
      }), replay)
    }
    const tryStart = (replay?: RequestReplay): boolean => {
      if (front.isGone()) return true
      const found = connectionFor(current, false)
      if (found === undefined) return false
      if (found.lease !== current) {
        current.release()
        current = found.lease
      }
      start(found.conn, replay)
      return true
    }
    const route = (replay?: RequestReplay) => {
      if (!tryStart(replay)) enqueue(front, () => tryStart(replay))
    }
    route()
  }

  const upgrade = (request: ExchangeRequest, protocol: string, socket: Duplex, head: Buffer, lease: BackendLease): void => {
    const found = connectionFor(lease, true)
    if (found === undefined) {
      const anyConnect = lease.route.backends.some((b) => byBackend.get(b)?.extendedConnect === true)
      if (anyConnect) writeRawError(socket, errors, 503, "switchyard: no HTTP/2 stream free for an upgrade on the route's backends")
      else {
        writeRawError(
          socket,
          errors,
          501,
          `switchyard: the route's HTTP/2 backends cannot carry "Upgrade: ${protocol}" (no SETTINGS_ENABLE_CONNECT_PROTOCOL)`
        )
      }
      closeAfterFlush(socket)
      return
    }
    const { conn } = found
    if (found.lease !== lease) lease.release()
    socket.once("close", () => releaseLease(found.lease))
    conn.active++
    streams++
    upgradeToH2(conn as H2Connection & { session: H2ClientConnection }, request, protocol, socket, head, forwardOptions(conn, () => {
      conn.active--
      streams--
      if (waiters.length > 0) serveWaiters()
    }))
  }

  // ---------------------------------------------------------------------------------------------
  // One tunnel connection, from accept to close.

  const fail = (reason: ReverseH2Error["reason"], message: string) => new ReverseH2Error({ reason, message })

  /** Reads the framed `Hello`; hands back bytes read past it. */
  const readHello = (socket: net.Socket) =>
    readSocketFrame(socket, maxPreambleBytes).pipe(
      Effect.mapError((e) => fail("BadPreamble", e.reason === "Truncated" ? "the connection closed before its preamble" : e.message)),
      Effect.flatMap((body) => {
        const hello = decodeHello(body)
        return "_tag" in hello && hello._tag === "Hello"
          ? Effect.succeed(hello)
          : Effect.fail(fail("BadPreamble", (hello as { message: string }).message))
      })
    )

  const writeReply = (socket: net.Socket, reply: Parameters<typeof encodeHelloReply>[0]) =>
    Effect.callback<void>((resume) => {
      socket.write(encodeHelloReply(reply), () => resume(Effect.void))
    })

  const reject = (socket: net.Socket, reason: RejectionReason, message: string, index?: number) =>
    Effect.gen(function*() {
      const rejected: Rejected = index === undefined
        ? { _tag: "Rejected", reason, message }
        : { _tag: "Rejected", reason, message, index }
      yield* writeReply(socket, rejected).pipe(Effect.timeoutOption(handshakeTimeout))
      socket.end()
      return yield* fail("Rejected", `${reason}: ${message}`)
    })

  /** Which routes an authenticated `Hello` may serve, or the rejection to send. */
  const authorize = (hello: Hello): ReadonlyArray<RouteDefinition> | { reason: RejectionReason; message: string; index?: number } => {
    if (hello.version !== ProtocolVersion) return { reason: "Version", message: `protocol version ${ProtocolVersion} expected, got ${hello.version}` }
    const grant = policy.authenticate(hello.token)
    if (grant === undefined) return { reason: "BadToken", message: "unknown token" }
    const routes = hello.listeners.length > 0 ? hello.listeners : defaultRoutes
    if (routes.length === 0) return { reason: "Malformed", message: "no routes asked for and none configured" }
    for (let index = 0; index < routes.length; index++) {
      const route = routes[index]!
      if (!isHttpRoute(route)) return { reason: "Malformed", message: `reverse-HTTP/2 serves HTTP routes only, not ${describeRoute(route)}`, index }
      const refusal = policy.authorize(grant, route)
      if (refusal !== undefined) {
        return refusal._tag === "PortNotAllowed"
          ? { reason: "PortNotAllowed", message: `port ${refusal.port} is not granted to this token`, index }
          : { reason: "DomainNotAllowed", message: `domain ${refusal.domainSuffix ?? "(none)"} is not granted to this token`, index }
      }
    }
    return routes
  }

  const bindAll = (conn: H2Connection, routes: ReadonlyArray<RouteDefinition>) =>
    Effect.forEach(routes, (route, index) =>
      listeners.bind(route, conn.backend).pipe(
        Effect.map((bound): BoundListener => ({ listenerId: index, route: bound.route })),
        Effect.mapError((error: ListenerError) => ({ error, index }))
      ))

  /**
   * Starts the HTTP/2 client on the socket and waits for the backend's first SETTINGS and its
   * acknowledgement of the gateway's (RFC 9113 §6.5.3: until then the backend may still be using the
   * default window and frame size; one that never acknowledges them is dropped at the handshake timeout).
   */
  const startSession = (conn: H2Connection, socket: net.Socket) =>
    Effect.callback<H2ClientConnection, ReverseH2Error>((resume) => {
      let settled = false
      const settleWhenHandshaken = () => {
        if (!settled && session.ready && session.acknowledged) {
          settled = true
          resume(Effect.succeed(session))
        }
      }
      const onSettings: Array<() => void> = []
      const onGoaway: Array<() => void> = []
      const session = new H2ClientConnection(socket, {
        maxFrameBytes,
        streamWindowBytes: streamWindow,
        maxStreamWindowBytes: maxStreamWindow,
        connectionWindowBytes: connectionWindow,
        maxHeaderListBytes: DefaultMaxHeaderListBytes,
        maxHeaderPairs: MaxHeaderPairs
      }, {
        settings: () => {
          settleWhenHandshaken()
          for (const f of onSettings) f()
        },
        acknowledged: settleWhenHandshaken,
        goaway: () => {
          for (const f of onGoaway) f()
        },
        close: (error: H2ConnectionError | undefined) => {
          if (settled) {
            if (error !== undefined) void run(Effect.logInfo(`reverse-h2 ${conn.describe}: ${error.message}`))
            return
          }
          settled = true
          resume(Effect.fail(fail("BadPreface", `${conn.describe} did not speak HTTP/2: ${error?.message ?? "closed before sending HTTP/2 SETTINGS"}`)))
        }
      })
      sessionHooks.set(session, { onSettings, onGoaway })
      conn.session = session
      session.start()
    })

  const ping = (session: H2ClientConnection) =>
    Effect.callback<boolean>((resume) => {
      if (!session.ping((ok) => resume(Effect.succeed(ok)))) resume(Effect.succeed(false))
    })

  /** PINGs every interval; fails when one is not answered in time (or cannot be sent). */
  const healthLoop = (conn: H2Connection, session: H2ClientConnection) =>
    Effect.gen(function*() {
      for (;;) {
        yield* Effect.sleep(pingInterval)
        // a draining connection is closing on its own; its streams are not cut for a missed PING
        if (conn.draining) continue
        const answered = yield* ping(session).pipe(Effect.timeoutOption(pingTimeout))
        if (Option.isNone(answered) || !answered.value) {
          return yield* fail("PingTimeout", `${conn.describe} did not answer a PING within ${Duration.format(pingTimeout)}`)
        }
      }
    })

  /** Completes when the connection has closed. */
  const awaitClose = (session: H2ClientConnection) =>
    Effect.callback<void>((resume) => {
      session.whenClosed(() => resume(Effect.void))
    })

  const serveConnection = (socket: net.Socket, secure: boolean) =>
    Effect.gen(function*() {
      yield* Effect.addFinalizer(() => Effect.sync(() => socket.destroy()))
      socket.setNoDelay(true)
      const remote = `${socket.remoteAddress ?? "?"}:${socket.remotePort ?? 0}`
      const id = `h2-${++nextId}`
      let label = `h2 ${remote}`
      let routes = defaultRoutes
      let hello = false
      if (authenticated) {
        if (!secure && !config.allowTokensOverPlainTcp && !isLoopback(socket.remoteAddress)) {
          return yield* fail("Insecure", `${remote}: tokens are not accepted over plain TCP from non-loopback peers`)
        }
        const address = socket.remoteAddress ?? "unknown"
        const gate = authThrottle.gate(address, Date.now())
        if (gate._tag === "Refuse") {
          return yield* fail("TooManyFailures", `${remote}: too many failed authentications from ${address}; refused for ${Math.ceil(gate.retryAfterMs / 1000)} s more`)
        }
        const got = yield* readHello(socket).pipe(
          Effect.timeoutOrElse({
            duration: handshakeTimeout,
            orElse: () => Effect.fail(fail("HandshakeTimeout", `${remote} sent no preamble within ${Duration.format(handshakeTimeout)}`))
          })
        )
        const decided = authorize(got)
        if (!Array.isArray(decided)) {
          const refusal = decided as { reason: RejectionReason; message: string; index?: number }
          if (refusal.reason === "BadToken") {
            // each failure beyond the free ones is answered later than the one before
            const delay = authThrottle.failed(address, Date.now())
            if (delay > 0) yield* Effect.sleep(Duration.millis(delay))
          }
          return yield* reject(socket, refusal.reason, refusal.message, refusal.index)
        }
        authThrottle.succeeded(address)
        routes = decided
        if (got.label !== undefined) label = `h2 ${remote} "${got.label}"`
        hello = true
      }
      const conn: H2Connection = {
        backend: undefined as unknown as Backend,
        describe: label,
        session: undefined,
        active: 0,
        maxStreams: 0,
        extendedConnect: false,
        ready: false,
        draining: false,
        closed: false
      }
      const backend: Backend = {
        id,
        label,
        inFlight: 0,
        upstream,
        connect: () =>
          Effect.fail(new BackendUnavailable({ reason: "OpenFailed", message: `${label} serves HTTP routes only; raw TCP is not carried` })),
        isClosed: () => isGone(conn),
        hasCapacity: () => hasRoomForLease(conn),
        messages: { exchange, upgrade }
      }
      ;(conn as { backend: Backend }).backend = backend
      byBackend.set(backend, conn)
      yield* Effect.addFinalizer((exit) =>
        Effect.gen(function*() {
          conn.closed = true
          live.delete(conn)
          const session = conn.session
          // the gateway shutting down (not a failed connection): GOAWAY, let the streams in flight
          // finish for a bounded time, then close
          if (session !== undefined && !session.destroyed && session.active > 0 && Exit.hasInterrupts(exit)) {
            session.close()
            yield* awaitClose(session).pipe(Effect.timeoutOption(drainTimeout))
          }
          session?.destroy()
          // requests waiting for this connection may find another one, or keep waiting
          if (waiters.length > 0) serveWaiters()
        })
      )
      const bindOrReject = (announce: boolean) =>
        bindAll(conn, routes).pipe(
          Effect.catch(({ error, index }) =>
            announce
              ? reject(socket, error.reason === "BindFailed" ? "BindFailed" : error.reason === "Limit" ? "Limit" : "Conflict", error.message, index)
              : Effect.fail(fail("Bind", error.message))
          )
        )
      if (hello) {
        // authenticated: bind first so the Welcome can say what was bound, then start HTTP/2
        const bound = yield* bindOrReject(true)
        yield* writeReply(socket, { _tag: "Welcome", version: ProtocolVersion, sessionId: id, listeners: bound })
      }
      const session = yield* startSession(conn, socket).pipe(
        Effect.timeoutOrElse({
          duration: handshakeTimeout,
          orElse: () =>
            Effect.fail(fail(
              "HandshakeTimeout",
              conn.session?.ready === true
                ? `${label} did not acknowledge the gateway's HTTP/2 SETTINGS within ${Duration.format(handshakeTimeout)}`
                : `${label} sent no HTTP/2 SETTINGS within ${Duration.format(handshakeTimeout)}`
            ))
        })
      )
      const applySettings = () => {
        conn.maxStreams = Math.min(session.remote.maxConcurrentStreams, maxStreamsCap)
        conn.extendedConnect = session.remote.enableConnectProtocol
        if (waiters.length > 0) serveWaiters()
      }
      applySettings()
      const hooks = sessionHooks.get(session)!
      hooks.onSettings.push(applySettings)
      hooks.onGoaway.push(() => {
        // a graceful drain: streams in flight finish, new requests go to other connections
        conn.draining = true
      })
      if (!hello) {
        const bindings = { scope: yield* Effect.scope, routes: new Map<string, Scope.Closeable>() }
        yield* Effect.addFinalizer(() => Effect.sync(() => void plainBindings.delete(conn)))
        // the first binding must succeed as a whole (as at any connection); later reloads bind per route.
        // Under the lock, so a reload sees the connection only with its routes bound.
        yield* bindingLock.withPermits(1)(Effect.gen(function*() {
          plainBindings.set(conn, bindings)
          routes = defaultRoutes
          for (const route of routes) {
            const routeScope = yield* Scope.fork(bindings.scope)
            bindings.routes.set(routeKey(route), routeScope)
            yield* listeners.bind(route, conn.backend).pipe(
              Scope.provide(routeScope),
              Effect.mapError((error: ListenerError) => fail("Bind", error.message))
            )
          }
        }))
      }
      conn.ready = true
      live.add(conn)
      if (waiters.length > 0) serveWaiters()
      yield* Effect.logDebug(`reverse-h2: ${label} serving ${routes.map(describeRoute).join(", ")}`)
      yield* Effect.raceFirst(awaitClose(session), healthLoop(conn, session))
    })

  // ---------------------------------------------------------------------------------------------
  // The port.

  const sockets = new Set<net.Socket>()
  let portClosed: Promise<void> = Promise.resolve()
  // runs last, once the connections have drained: drop what is left and wait for the port to close
  yield* Effect.addFinalizer(() =>
    Effect.promise(() => {
      for (const socket of sockets) socket.destroy()
      return portClosed
    })
  )
  const fibers = yield* FiberSet.make()
  const run = yield* FiberSet.runtime(fibers)<never>()

  const accept = (socket: net.Socket, secure: boolean) => {
    sockets.add(socket)
    socket.on("error", () => socket.destroy())
    socket.once("close", () => sockets.delete(socket))
    const fiber = run(
      serveConnection(socket, secure).pipe(
        Effect.scoped,
        Effect.catch((error: ReverseH2Error) => recordFailure(error))
      )
    )
    fiber.addObserver((exit) => {
      if (Exit.isFailure(exit)) socket.destroy()
    })
  }

  const server: net.Server = config.tls === undefined
    ? net.createServer({ noDelay: true }, (socket) => accept(socket, false))
    : tls.createServer({
      cert: config.tls.cert,
      key: config.tls.key,
      ALPNProtocols: ["h2"],
      handshakeTimeout: Duration.toMillis(handshakeTimeout)
    }).on("secureConnection", (socket: tls.TLSSocket) => accept(socket, true))
      .on("tlsClientError", (_error: Error, socket: net.Socket) => socket.destroy())
  server.maxConnections = config.maxConnections ?? DefaultMaxConnections
  const host = config.address?.host ?? DefaultTunnelAddress.host
  const port = config.address?.port ?? DefaultTunnelAddress.port
  const bound = yield* Effect.acquireRelease(
    Effect.callback<net.AddressInfo, ReverseH2Error>((resume) => {
      const onError = (error: NodeJS.ErrnoException) =>
        resume(Effect.fail(fail("Listen", `cannot listen on ${host}:${port}: ${error.code ?? error.message}`)))
      server.once("error", onError)
      server.listen({ host, port }, () => {
        server.off("error", onError)
        server.on("error", () => {})
        resume(Effect.succeed(server.address() as net.AddressInfo))
      })
    }),
    // stop accepting at once; connections drain as their fibers are interrupted
    () => Effect.sync(() => void (portClosed = new Promise<void>((resolve) => server.close(() => resolve()))))
  )
  yield* Effect.addFinalizer(() =>
    Effect.sync(() => {
      for (const waiter of waiters.splice(0)) {
        if (waiter.timer !== undefined) clearTimeout(waiter.timer)
        waiter.expire()
      }
    })
  )

  /** Brings one plain-mode connection's bindings to `next`: unbinds what went away, binds what is new. */
  const rebind = (conn: H2Connection, bindings: { readonly scope: Scope.Scope; readonly routes: Map<string, Scope.Closeable> }, next: ReadonlyArray<RouteDefinition>) =>
    Effect.gen(function*() {
      const wanted = new Map(next.map((route) => [routeKey(route), route] as const))
      for (const [key, routeScope] of [...bindings.routes]) {
        if (wanted.has(key)) continue
        bindings.routes.delete(key)
        // unregisters the backend from the route; requests already forwarded to it keep their stream
        yield* Scope.close(routeScope, Exit.void)
      }
      for (const [key, route] of wanted) {
        if (bindings.routes.has(key) || isGone(conn)) continue
        const routeScope = yield* Scope.fork(bindings.scope)
        const bound = yield* listeners.bind(route, conn.backend).pipe(Scope.provide(routeScope), Effect.result)
        if (bound._tag === "Failure") {
          yield* Scope.close(routeScope, Exit.void)
          const error = fail("Bind", `${conn.describe} cannot serve ${describeRoute(route)} after a reload: ${bound.failure.message}`)
          yield* recordFailure(error)
          continue
        }
        bindings.routes.set(key, routeScope)
      }
    })

  const replaceRoutes = (next: ReadonlyArray<RouteDefinition>): Effect.Effect<void, ReverseH2Error> =>
    Effect.gen(function*() {
      const invalid = checkRoutes(next)
      if (invalid !== undefined) return yield* invalid
      yield* bindingLock.withPermits(1)(Effect.gen(function*() {
        defaultRoutes = [...next]
        for (const [conn, bindings] of [...plainBindings]) yield* rebind(conn, bindings, defaultRoutes)
      }))
    })

  return ReverseH2.of({
    address: { host: bound.address, port: bound.port },
    authenticated,
    connections: () => live.size,
    activeStreams: () => streams,
    queued: () => waiters.length,
    recentFailures: () => [...failures],
    replaceTokens: (tokens) => Effect.sync(() => void (policy = makeTokenPolicy(tokens))),
    replaceRoutes,
    routes: () => defaultRoutes
  })
})

/** For callers that build scopes by hand. */
export const makeReverseH2 = (config: ReverseH2Config): Effect.Effect<ReverseH2Shape, ReverseH2Error, Listeners | Scope.Scope> => make(config)
