/**
 * The wsp-compatible server: wsp clients register pooled WebSocket connections on `/register`;
 * callers send HTTP requests to `/request` with `X-Proxy-Destination`, each carried over one idle
 * connection as a JSON head message plus one binary body message, answered the same way.
 * Every request and upgrade on its port is served by the forwarding core's HTTP/1.1 engine (the same
 * parser, limits and header rules as every other front door); a registered connection is an upstream
 * reached by messages (`WspServerConnection.ts`), and the pick among clients is the dispatcher's.
 * It does not perform requests itself and never puts two requests on one connection at a time.
 */
import { Buffer } from "node:buffer"
import { createHash, timingSafeEqual } from "node:crypto"
import * as net from "node:net"
import type { Duplex } from "node:stream"
import { Context, Effect, FiberSet, Layer, Redacted, Schema } from "effect"
import type { Scope } from "effect"
import { checkDestination } from "../../domain/DestinationRules.ts"
import type { WspServerConfig } from "../../domain/WspConfig.ts"
import { headerValue } from "../../domain/HttpHeaders.ts"
import type { GoHeader, WspHeadLimits } from "../../domain/WspMessage.ts"
import {
  canonicalHeaderName,
  decodeGreeting,
  defaultHeadLimits,
  encodeRequestHead,
  WspMessageError,
  withoutHopByHop
} from "../../domain/WspMessage.ts"
import type { PoolHandle, PoolStats } from "../Pool.ts"
import { AuthThrottle, DefaultAuthThrottleLimits } from "../../domain/AuthThrottle.ts"
import { LogSampler, sampledLines } from "../../domain/LogSampler.ts"
import { skippedNote } from "./HandshakeAdmission.ts"
import { defaultCleanInterval, makePool, PoolError } from "../Pool.ts"
import type { WebSocketEndpoint } from "../transport/WebSocketEndpoint.ts"
import { ServerConnection, WspProxyError } from "./WspServerConnection.ts"
import { acceptWebSocket, type UpgradeRequest } from "../transport/WebSocketOpen.ts"
import { plainErrors, writeRawError } from "../forward/ErrorResponse.ts"
import type { ExchangeFront, ExchangeRequest, MessageUpstream } from "../forward/Exchange.ts"
import type { Admission, Http1Request, PendingAdmission } from "../forward/http1/Admission.ts"
import type { HttpLimits } from "../forward/HttpLimits.ts"
import { refusedConnection, streamUpstream } from "../forward/Upstream.ts"
import { makeForwarder } from "../Forwarder.ts"
import { makeClientLimitReporter } from "../forward/ClientLimitReporter.ts"
import type { ClientLimitKind } from "../../domain/ClientLimits.ts"

/** wsp's status for every proxy-side failure. */
export const proxyErrorStatus = 526
/** How long a registering connection has to send its greeting, ms. */
export const greetingTimeout = 10_000
/** Most connections upgraded but not yet greeted; further upgrades are refused with 503. */
export const maxPendingGreetings = 256
/** Longest pool id accepted in a greeting. */
export const maxPoolIdLength = 256
/**
 * Bytes a registering connection may send from its upgrade until its greeting is accepted (a greeting
 * of `maxPoolIdLength` characters in UTF-8, its frame header, a ping or two); past it, it is terminated.
 * Counted on the socket, so `ws` never assembles more than this (plus one socket read) of a greeting.
 */
export const defaultMaxGreetingBytes = 4 * 1024
/**
 * Bytes a registered connection may send while it carries no request (pongs, pings, a close); past it,
 * it is terminated, before `ws` assembles a message up to `maxmessagesize` that wsp would refuse anyway.
 */
export const defaultMaxIdleBytes = 64 * 1024
export { clientControlFrameOverheadBytes, uploadHighWater, WspProxyError } from "./WspServerConnection.ts"

/** Shortest interval between two log lines about refused registrations, or about failed requests (ms). */
export const failureLogInterval = 10_000
/** Body of the answer to `/register` when no `secretkey` is set and open registration is off. */
export const registrationClosedMessage = "Registration closed: the server has no secretkey configured"
/** Largest request head a caller or a registering client may send, bytes. */
export const maxRequestHeadBytes = 16 * 1024
/** Time a caller has to send a request head, ms. */
export const requestHeadTimeout = 60_000
/** Idle time of a caller's keep-alive connection between requests, ms. */
export const callerKeepAliveTimeout = 5_000
/** Most connections open on the port at once (callers and registered clients); more are closed on arrival. */
export const maxPortConnections = 16_384

/** The server could not start. */
export class WspServerError extends Schema.TaggedError<WspServerError>()("WspServerError", {
  reason: Schema.Literals(["ListenFailed"]),
  message: Schema.String
}) {}

/** Constant-time secret comparison (hashing first makes the time independent of the lengths). */
export const secretMatches = (given: string, expected: string): boolean =>
  timingSafeEqual(createHash("sha256").update(given).digest(), createHash("sha256").update(expected).digest())

// ---------------------------------------------------------------------------------------------
// Requests from callers

/** Flat `[name, value, ...]` fields as Go's server would hold them, without Host and hop-by-hop fields. */
const goHeader = (fields: ReadonlyArray<string>): GoHeader => {
  const out: Record<string, Array<string>> = Object.create(null)
  for (let i = 0; i < fields.length; i += 2) {
    const name = fields[i]!
    if (name.toLowerCase() === "host") continue
    const canonical = canonicalHeaderName(name)
    const existing = out[canonical]
    if (existing === undefined) out[canonical] = [fields[i + 1]!]
    else existing.push(fields[i + 1]!)
  }
  return withoutHopByHop(out)
}

/** The body length wsp is told: the declared length, -1 for a chunked body, 0 for none. */
const requestContentLength = (fields: ReadonlyArray<string>): number => {
  const declared = headerValue(fields, "content-length")
  if (declared !== undefined && /^[0-9]+$/.test(declared)) return Number(declared)
  return headerValue(fields, "transfer-encoding") !== undefined ? -1 : 0
}

/** Header values by lower-case name, as the WebSocket handshake check reads them. */
const headerRecord = (fields: ReadonlyArray<string>): Record<string, Array<string>> => {
  const out: Record<string, Array<string>> = Object.create(null)
  for (let i = 0; i < fields.length; i += 2) (out[fields[i]!.toLowerCase()] ??= []).push(fields[i + 1]!)
  return out
}

/**
 * An upgrade's fields as the WebSocket handshake reads them: the engine keeps `Upgrade` and `Connection`
 * out of the fields it passes on, and says what was asked for in `protocol`.
 */
const upgradeHeaders = (request: ExchangeRequest, protocol: string): Record<string, Array<string>> => ({
  ...headerRecord(request.headers),
  upgrade: [protocol],
  connection: ["Upgrade"]
})

/** A refusal, answered by the engine with a one-line body; the caller's connection closes after it. */
const refuse = (status: number, message: string): Admission => ({ _tag: "Refuse", status, message })

/**
 * An answer the wsp server gives itself (`/status`, a 401 with its challenge). A request body is not
 * read: the engine closes such a caller's connection after the answer.
 */
const localAnswer = (status: number, body: string, fields: ReadonlyArray<string> = []): MessageUpstream => ({
  exchange: (front) => {
    const bytes = Buffer.from(body, "utf8")
    front.respond(status, ["Content-Type", "text/plain; charset=utf-8", "Content-Length", String(bytes.length), ...fields], false)
    front.write(bytes)
    front.end(undefined)
  },
  upgrade: (_request, _protocol, socket) => void socket.destroy()
})

/** The engine's default upstream: every admitted request names its own, so this answers like none. */
const noUpstream = streamUpstream({
  describe: "no wsp connection",
  limits: { maxSockets: 1, maxFreeSockets: 0 },
  connect: () => refusedConnection("no wsp connection")
})

const bearer = /^Bearer\s+(.+)$/i

/** The wsp server as a running service. */
export class WspServer extends Context.Service<WspServer, {
  /** The address the HTTP listener is bound to. */
  readonly address: { readonly host: string; readonly port: number }
  /** Pool counts (client ids, idle and busy connections). */
  readonly stats: () => PoolStats
  /**
   * Refused credentials so far: a wrong `X-SECRET-KEY` on `/register`, a wrong request key on `/request`,
   * and registrations refused because no `secretkey` is set (`registrationClosed`).
   */
  readonly rejected: () => { readonly secretKey: number; readonly requestKey: number; readonly registrationClosed: number; readonly throttled: number }
  /** Callers refused or cut by the client limits (slow bodies, slow readers, head timeouts), by limit. */
  readonly clientLimited: () => Readonly<Record<ClientLimitKind, number>>
  /** `/request` exchanges that failed after a connection was taken, by reason (the connection was dropped). */
  readonly failures: () => Readonly<Partial<Record<WspProxyError["reason"], number>>>
  /**
   * Connections refused or cut so far: a greeting over `maxGreetingBytes`, more than `maxIdleBytes`
   * read while carrying no request, `/register` upgrades beyond `maxPendingGreetings` waiting to greet.
   */
  readonly refusals: () => WspRefusals
  /**
   * Replaces `secretkey` and the optional request credential (a reload). Checked on every `/register`
   * and `/request` from then on; connections already registered stay in their pools.
   */
  readonly replaceCredentials: (credentials: {
    readonly secretKey: Redacted.Redacted<string>
    readonly requestKey: Redacted.Redacted<string> | undefined
  }) => Effect.Effect<void>
}>()("switchyard/WspServer") {
  static readonly layer = (config: WspServerConfig): Layer.Layer<WspServer, WspServerError> =>
    Layer.effect(WspServer, makeWspServer(config))
}

/** Connections the wsp server refused or cut for what they sent before or between requests. */
export interface WspRefusals {
  readonly greetingTooLarge: number
  readonly idleOverflow: number
  readonly tooManyGreetings: number
}

/** What a gateway running other front doors can mount on the wsp server's port. */
export interface WspServerExtras {
  /**
   * Offered every upgrade whose path is not `/register`; returns true when it took the socket (e.g. the
   * control port's `handleUpgrade` for its `/tunnel` path). Others still get wsp's 404.
   */
  readonly upgrade?: ((req: UpgradeRequest, socket: Duplex, head: Buffer) => boolean) | undefined
}

/** Starts the server; it stops, closing every connection, when the scope closes. */
export const makeWspServer = Effect.fn("WspServer.make")(function*(config: WspServerConfig, extras: WspServerExtras = {}): Effect.fn.Return<
  WspServer["Service"],
  WspServerError,
  Scope.Scope
> {
  const limits: WspHeadLimits = { ...defaultHeadLimits, maxHeaderCount: config.maxHeaders }
  const pool: PoolHandle<ServerConnection> = yield* makePool<ServerConnection>({
    timeout: config.timeout,
    idleTimeout: config.idleTimeout,
    cleanInterval: defaultCleanInterval,
    maxPools: config.maxPools,
    maxConnectionsPerPool: config.maxConnectionsPerPool,
    maxWaiters: config.maxConcurrentRequests
  })
  const run = yield* FiberSet.makeRuntime<never, void, never>()
  let secret = Redacted.value(config.secretKey)
  // refused credentials and failed exchanges, for metrics
  const rejected = { secretKey: 0, requestKey: 0, registrationClosed: 0, throttled: 0 }
  const failures: Partial<Record<WspProxyError["reason"], number>> = {}
  const warnRegistrationClosed = sampledLines(failureLogInterval, (line) => run(Effect.logWarning(line)))
  const warnFailure = sampledLines(failureLogInterval, (line) => run(Effect.logWarning(line)))
  /** With no `secretkey`, registration is closed unless the configuration opens it. */
  const registrationClosed = (): boolean => secret === "" && !config.openRegistration
  const refuseClosedRegistration = (): void => {
    rejected.registrationClosed++
    warnRegistrationClosed("wsp /register refused: no secretkey is configured (set secretkey, or insecureopenregistration: true to accept any client)")
  }
  let requestKey = config.requestKey === undefined ? undefined : Redacted.value(config.requestKey)
  /** Upgraded connections waiting for their greeting, and every registered one. */
  const greeting = new Set<WebSocketEndpoint>()
  const registered = new Set<WebSocketEndpoint>()
  const maxGreetingBytes = config.maxGreetingBytes ?? defaultMaxGreetingBytes
  const maxIdleBytes = config.maxIdleBytes ?? defaultMaxIdleBytes
  // connections cut for what they sent or refused for the pending cap, for metrics
  const refusals = { greetingTooLarge: 0, idleOverflow: 0, tooManyGreetings: 0 }
  // one log line per kind and interval: thousands of refused connections must not flood the log
  const sampler = new LogSampler()
  const refused = (kind: keyof typeof refusals, message: string): void => {
    refusals[kind]++
    const skipped = sampler.take(kind, Date.now())
    if (skipped !== undefined) run(Effect.logWarning(`wsp-server: ${message}${skippedNote(skipped)}`))
  }
  let inFlight = 0

  const onRegistered = (endpoint: WebSocketEndpoint, peer: string, headBytes: number): void => {
    const socket = endpoint.socket
    greeting.add(endpoint)
    const timer = setTimeout(() => endpoint.terminate(), greetingTimeout)
    // every byte counts until the greeting is accepted, frames and all, however the peer splits them
    let read = headBytes
    let greeted = false
    const countGreeting = (chunk: Buffer) => {
      if (greeted) return
      read += chunk.length
      if (read <= maxGreetingBytes) return
      greeted = true
      socket.off("data", countGreeting)
      refused("greetingTooLarge", `${peer}: sent more than ${maxGreetingBytes} bytes before its greeting was accepted; terminated`)
      endpoint.terminate()
    }
    socket.prependListener("data", countGreeting)
    const endGreeting = () => {
      clearTimeout(timer)
      greeting.delete(endpoint)
      greeted = true
      socket.off("data", countGreeting)
    }
    const refuseGreeting = (message: string) => {
      endGreeting()
      endpoint.close(1008, message.slice(0, 120))
    }
    const noop = () => {}
    endpoint.start({
      text: (text) => {
        endGreeting()
        const parsed = decodeGreeting(text, maxPoolIdLength)
        if (parsed instanceof WspMessageError) return refuseGreeting(parsed.message)
        registered.add(endpoint)
        const conn = new ServerConnection(endpoint, parsed.id, limits, (c) => {
          registered.delete(endpoint)
          pool.remove(c)
        }, {
          maxBytes: maxIdleBytes,
          onOverflow: () => refused("idleOverflow", `${peer}: pool ${parsed.id}: sent more than ${maxIdleBytes} bytes while carrying no request; terminated`)
        })
        run(
          pool.register(parsed.id, parsed.size, conn).pipe(
            Effect.catch((e: PoolError) =>
              Effect.sync(() => endpoint.close(1013, e.message.slice(0, 120))).pipe(Effect.andThen(Effect.logWarning(`wsp registration refused: ${e.message}`)))
            )
          )
        )
      },
      binaryStart: () => refuseGreeting("greeting must be a text message"),
      binaryData: noop,
      binaryEnd: noop,
      closed: endGreeting
    })
  }

  // failed credentials per address: answered later and later, then refused for a while
  const authThrottle = new AuthThrottle({ ...DefaultAuthThrottleLimits, ...config.authThrottle })
  /** Refusals waiting for their delay, with how to drop each connection if the server closes first. */
  const delayedAnswers = new Map<NodeJS.Timeout, () => void>()
  /**
   * Runs `answer` after the delay this address's failure earned (at once within the free failures);
   * `drop` ends the waiting connection if the server closes before.
   */
  const afterFailure = (address: string, answer: () => void, drop: () => void): void => {
    const delay = authThrottle.failed(address, Date.now())
    if (delay === 0) return answer()
    const timer = setTimeout(() => {
      delayedAnswers.delete(timer)
      answer()
    }, delay)
    delayedAnswers.set(timer, drop)
  }
  /** Whether `address` failed too often to be heard now (counted and logged, sampled). */
  const throttled = (address: string): boolean => {
    const gate = authThrottle.gate(address, Date.now())
    if (gate._tag === "Allow") return false
    rejected.throttled++
    const skipped = sampler.take("throttled", Date.now())
    if (skipped !== undefined) {
      run(Effect.logWarning(`wsp-server: ${address}: too many failed credentials; refused for ${Math.ceil(gate.retryAfterMs / 1000)} s more${skippedNote(skipped)}`))
    }
    return true
  }

  const pathOf = (target: string): string => {
    const q = target.indexOf("?")
    return q >= 0 ? target.slice(0, q) : target
  }

  /**
   * A refusal after the delay this address's failed credential earned (at once within the free
   * failures); the caller's connection reads nothing meanwhile, and is dropped if the server closes.
   */
  const refuseAfterFailure = (address: string, admission: Admission): PendingAdmission => ({
    _tag: "Pending",
    wait: (decide) => {
      let waiting = true
      afterFailure(address, () => {
        if (waiting) decide(admission)
      }, () => {
        if (waiting) decide(refuse(503, "wsp-server: shutting down"))
      })
      return () => void (waiting = false)
    }
  })

  /** The registration upgrade: the WebSocket handshake on the caller's connection, then the greeting. */
  const registration = (peer: string, versionMinor: number): MessageUpstream => ({
    exchange: (front) => front.fail(proxyErrorStatus, "HTTP upgrade error : not a WebSocket upgrade request"),
    upgrade: (request: ExchangeRequest, protocol: string, socket: Duplex, head: Buffer) => {
      socket.on("error", () => socket.destroy())
      // heads are text: at most the head limit, in UTF-8 (up to three bytes a code unit)
      const endpoint = acceptWebSocket(
        { method: request.method, httpVersion: `1.${versionMinor}`, headers: upgradeHeaders(request, protocol) },
        socket,
        head,
        { maxMessageBytes: config.maxMessageSize, maxTextBytes: 3 * limits.maxHeadLength }
      )
      if (endpoint !== undefined) onRegistered(endpoint, peer, head.length)
    }
  })

  /** An upgrade offered to what is mounted on the port; one it does not take gets wsp's 404. */
  const mountedUpgrade = (mounted: NonNullable<WspServerExtras["upgrade"]>, versionMinor: number): MessageUpstream => ({
    exchange: (front) => front.fail(404, "404 page not found"),
    upgrade: (request, protocol, socket, head) => {
      const taken = mounted(
        { method: request.method, url: request.path, httpVersion: `1.${versionMinor}`, headers: upgradeHeaders(request, protocol), socket: socket as net.Socket },
        socket,
        head
      )
      if (!taken) writeRawError(socket, plainErrors, 404, "404 page not found")
    }
  })

  const admitRegistration = (request: Http1Request, address: string): Admission | PendingAdmission => {
    if (registrationClosed()) {
      refuseClosedRegistration()
      return refuse(403, registrationClosedMessage)
    }
    if (throttled(address)) return refuse(429, "too many failed credentials from this address")
    if (!secretMatches(headerValue(request.headers, "x-secret-key") ?? "", secret)) {
      rejected.secretKey++
      return refuseAfterFailure(address, refuse(proxyErrorStatus, "Invalid X-SECRET-KEY"))
    }
    authThrottle.succeeded(address)
    if (request.upgrade === undefined) return refuse(proxyErrorStatus, "HTTP upgrade error : not a WebSocket upgrade request")
    const remote = request.socket as net.Socket
    const peer = `${remote.remoteAddress}:${remote.remotePort}`
    if (greeting.size >= maxPendingGreetings) {
      refused("tooManyGreetings", `${peer}: ${maxPendingGreetings} registrations already wait for their greeting; refused with 503`)
      return refuse(503, "too many registrations in progress")
    }
    return { _tag: "Forward", message: registration(peer, request.versionMinor) }
  }

  /** What happens to a connection once its exchange is over. */
  const settle = (conn: ServerConnection, front: ExchangeFront, error: WspProxyError | undefined): void => {
    if (error === undefined) return pool.releaseNow(conn)
    pool.remove(conn)
    conn.close(error.message)
    failures[error.reason] = (failures[error.reason] ?? 0) + 1
    if (error.reason !== "CallerGone") warnFailure(`wsp /request failed, connection of pool ${conn.poolId} dropped (${error.reason}): ${error.message}`)
    // a caller with part of its response is cut; one with none is told why
    if (front.isAnswered()) front.abort()
    else front.fail(error.reason === "BodyTooLarge" ? 413 : proxyErrorStatus, error.message)
  }

  /**
   * One `/request` carried over `conn`, which goes back to the pool (or is dropped) when it is over. The
   * returned `unused` gives the connection back when the exchange never started (the caller left as the
   * connection was handed over).
   */
  const overConnection = (conn: ServerConnection, headText: string): { readonly message: MessageUpstream; readonly unused: () => void } => {
    let started = false
    return {
      message: {
        exchange: (front) => {
          started = true
          conn.exchangeOver(front, headText, config.maxMessageSize, config.responseTimeout, (error) => settle(conn, front, error))
        },
        upgrade: (_request, _protocol, socket) => {
          // a `/request` upgrade is refused at admission; a connection taken for one goes straight back
          started = true
          pool.releaseNow(conn)
          socket.destroy()
        }
      },
      unused: () => {
        if (started) return
        started = true
        pool.releaseNow(conn)
      }
    }
  }

  const admitRequest = (request: Http1Request, address: string): Admission | PendingAdmission => {
    if (requestKey !== undefined) {
      if (throttled(address)) return refuse(429, "too many failed credentials from this address")
      const auth = bearer.exec(headerValue(request.headers, "proxy-authorization") ?? "")
      if (!secretMatches(auth === null ? "" : auth[1]!.trim(), requestKey)) {
        rejected.requestKey++
        const answer = localAnswer(401, "Invalid Proxy-Authorization\n", ["Proxy-Authenticate", "Bearer"])
        return refuseAfterFailure(address, { _tag: "Forward", message: answer })
      }
      authThrottle.succeeded(address)
    }
    if (request.upgrade !== undefined) return refuse(proxyErrorStatus, "/request does not take an Upgrade")
    const destination = headerValue(request.headers, "x-proxy-destination")
    if (destination === undefined || destination === "") return refuse(proxyErrorStatus, "Missing X-PROXY-DESTINATION header")
    let url: URL
    try {
      url = new URL(destination)
    } catch {
      return refuse(proxyErrorStatus, "Unable to parse X-PROXY-DESTINATION header")
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") return refuse(proxyErrorStatus, "Unable to parse X-PROXY-DESTINATION header")
    const header = goHeader(request.headers)
    const method = request.method
    const verdict = checkDestination(config.rules, { method, url: url.href, header })
    if (verdict._tag !== "Allowed") return refuse(proxyErrorStatus, verdict.message)
    const contentLength = requestContentLength(request.headers)
    if (contentLength > config.maxMessageSize) return refuse(413, `request body exceeds ${config.maxMessageSize} bytes`)
    if (inFlight >= config.maxConcurrentRequests) {
      return refuse(proxyErrorStatus, `Too many concurrent requests (limit ${config.maxConcurrentRequests})`)
    }
    const headText = encodeRequestHead({ Method: method, URL: destination, Header: header, ContentLength: contentLength })
    inFlight++
    let counted = true
    const uncount = () => {
      if (!counted) return
      counted = false
      inFlight--
    }
    const forward = (conn: ServerConnection): Admission => {
      const over = overConnection(conn, headText)
      return {
        _tag: "Forward",
        message: over.message,
        onEnd: () => {
          over.unused()
          uncount()
        }
      }
    }
    // the fast path: an idle connection is there now
    const conn = pool.tryTake()
    if (conn !== undefined) return forward(conn)
    if (pool.stats().pools === 0) {
      uncount()
      return refuse(proxyErrorStatus, "No proxy available")
    }
    // no idle connection: wait (up to `timeout`) for the first one freed, in a fiber the caller's
    // departure interrupts (a connection handed over meanwhile goes back to the pool)
    return {
      _tag: "Pending",
      wait: (decide) => {
        const fiber = run(pool.take.pipe(
          Effect.matchEffect({
            onFailure: (e: PoolError) =>
              Effect.sync(() => {
                uncount()
                decide(refuse(proxyErrorStatus, e.message))
              }),
            onSuccess: (taken) => Effect.sync(() => decide(forward(taken)))
          })
        ))
        return () => {
          uncount()
          fiber.interruptUnsafe()
        }
      }
    }
  }

  const admit = (request: Http1Request): Admission | PendingAdmission => {
    const path = pathOf(request.originTarget)
    const address = (request.socket as net.Socket).remoteAddress ?? "unknown"
    if (path === "/register") return admitRegistration(request, address)
    if (request.upgrade !== undefined && path !== "/request") {
      const mounted = extras.upgrade
      if (mounted === undefined) return refuse(404, "404 page not found")
      return { _tag: "Forward", message: mountedUpgrade(mounted, request.versionMinor) }
    }
    if (path === "/status") return { _tag: "Forward", message: localAnswer(200, "ok") }
    if (path === "/request") return admitRequest(request, address)
    return refuse(404, "404 page not found")
  }

  const httpLimits: HttpLimits = {
    maxHeaderSize: maxRequestHeadBytes,
    maxHeadersCount: config.maxHeaders,
    headersTimeoutMs: requestHeadTimeout,
    requestTimeoutMs: 0,
    keepAliveTimeoutMs: callerKeepAliveTimeout,
    maxConnections: maxPortConnections
  }
  const forwarder = yield* makeForwarder({
    upstream: noUpstream,
    // wsp hands the caller's fields on as they came, without adding its own
    forwardedHeaders: "off",
    responseTimeoutMs: 0,
    idleTimeoutMs: 0,
    onUpstreamError: (message) => warnFailure(`wsp /request: ${message}`)
  })
  // slow callers are held to the client limits every engine front door applies; refusals are counted and
  // logged (sampled)
  const limited = makeClientLimitReporter((line) => run(Effect.logWarning(`wsp-server: ${line}`)))
  const engine = forwarder.serveHttp1({ limits: httpLimits, admit, onClientLimit: limited.onClientLimit })
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    socket.on("error", () => socket.destroy())
    engine.accept(socket)
  })

  const address = yield* Effect.acquireRelease(
    Effect.callback<{ host: string; port: number }, WspServerError>((resume) => {
      const onError = (err: Error) => resume(Effect.fail(new WspServerError({ reason: "ListenFailed", message: `cannot listen on ${config.host}:${config.port}: ${err.message}` })))
      server.once("error", onError)
      server.listen(config.port, config.host, () => {
        server.off("error", onError)
        const a = server.address()
        resume(Effect.succeed(typeof a === "object" && a !== null ? { host: a.address, port: a.port } : { host: config.host, port: config.port }))
      })
    }),
    () =>
      Effect.callback<void>((resume) => {
        for (const [timer, drop] of delayedAnswers) {
          clearTimeout(timer)
          drop()
        }
        delayedAnswers.clear()
        for (const endpoint of greeting) endpoint.terminate()
        for (const endpoint of registered) endpoint.terminate()
        server.close(() => resume(Effect.void))
        void engine.close(0)
      })
  )

  if (config.pingInterval > 0) {
    yield* Effect.forkScoped(Effect.forever(Effect.andThen(
      Effect.sleep(config.pingInterval),
      Effect.sync(() => {
        for (const conn of pool.members()) {
          // a connection paused for a slow caller is not read, so its pongs wait too: not a failure
          if (conn.endpoint.isPaused) continue
          if (conn.awaitingPong) {
            pool.remove(conn)
            conn.close("keepalive timeout")
            continue
          }
          conn.awaitingPong = true
          conn.endpoint.ping()
        }
      })
    )))
  }

  return {
    address,
    stats: pool.stats,
    rejected: () => ({ ...rejected }),
    refusals: () => ({ ...refusals }),
    failures: () => ({ ...failures }),
    clientLimited: limited.counts,
    replaceCredentials: (credentials) =>
      Effect.sync(() => {
        secret = Redacted.value(credentials.secretKey)
        requestKey = credentials.requestKey === undefined ? undefined : Redacted.value(credentials.requestKey)
      })
  }
})
