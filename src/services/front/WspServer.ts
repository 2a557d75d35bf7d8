/**
 * The wsp-compatible server: wsp clients register pooled WebSocket connections on `/register`;
 * callers send HTTP requests to `/request` with `X-Proxy-Destination`, each carried over one idle
 * connection as a JSON head message plus one binary body message, answered the same way.
 * It does not perform requests itself and never puts two requests on one connection at a time.
 */
import { createHash, timingSafeEqual } from "node:crypto"
import * as http from "node:http"
import type { Duplex } from "node:stream"
import { Context, Effect, FiberSet, Layer, Redacted, Schema } from "effect"
import type { Scope } from "effect"
import { checkDestination } from "../../domain/DestinationRules.ts"
import type { WspServerConfig } from "../../domain/WspConfig.ts"
import { checkRequestFields } from "../../domain/Http1Parser.ts"
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
import { acceptWebSocket } from "../transport/WebSocketOpen.ts"

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
export { clientControlFrameOverheadBytes, responseHighWater, uploadHighWater, WspProxyError } from "./WspServerConnection.ts"

/** Shortest interval between two log lines about refused registrations, or about failed requests (ms). */
export const failureLogInterval = 10_000
/** Body of the answer to `/register` when no `secretkey` is set and open registration is off. */
export const registrationClosedMessage = "Registration closed: the server has no secretkey configured"
/** Most headers Node parses on an incoming request before switchyard counts them itself. */
const nodeHeaderParseLimit = 4096

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

const sendError = (res: http.ServerResponse, status: number, message: string, extra?: Record<string, string>): void => {
  if (res.destroyed) return
  if (res.headersSent) {
    res.destroy()
    return
  }
  res.writeHead(status, { "Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff", ...extra })
  res.end(`${message}\n`)
}

/** The caller's headers as Go's server would hold them, without Host and hop-by-hop fields. */
const requestHeader = (req: http.IncomingMessage): GoHeader => {
  const out: Record<string, Array<string>> = Object.create(null)
  for (const [name, values] of Object.entries(req.headersDistinct)) {
    if (name === "host" || values === undefined) continue
    const canonical = canonicalHeaderName(name)
    const existing = out[canonical]
    if (existing === undefined) out[canonical] = [...values]
    else existing.push(...values)
  }
  return withoutHopByHop(out)
}

const requestContentLength = (req: http.IncomingMessage): number => {
  const declared = req.headers["content-length"]
  if (declared !== undefined && /^[0-9]+$/.test(declared)) return Number(declared)
  return req.headers["transfer-encoding"] !== undefined ? -1 : 0
}

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
  readonly upgrade?: ((req: http.IncomingMessage, socket: Duplex, head: Buffer) => boolean) | undefined
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

  const refuseUpgrade = (socket: Duplex, status: number, reason: string, message: string): void => {
    const body = `${message}\n`
    socket.end(
      `HTTP/1.1 ${status} ${reason}\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n` +
        `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`
    )
  }

  const pathOf = (req: http.IncomingMessage): string => {
    const url = req.url ?? "/"
    const q = url.indexOf("?")
    return q >= 0 ? url.slice(0, q) : url
  }

  const onUpgrade = (req: http.IncomingMessage, socket: Duplex, head: Buffer): void => {
    socket.on("error", () => socket.destroy())
    if (pathOf(req) !== "/register") {
      if (extras.upgrade?.(req, socket, head) === true) return
      return refuseUpgrade(socket, 404, "Not Found", "404 page not found")
    }
    if (registrationClosed()) {
      refuseClosedRegistration()
      return refuseUpgrade(socket, 403, "Forbidden", registrationClosedMessage)
    }
    const address = req.socket.remoteAddress ?? "unknown"
    if (throttled(address)) return refuseUpgrade(socket, 429, "Too Many Requests", "too many failed credentials from this address")
    const given = req.headers["x-secret-key"]
    if (!secretMatches(typeof given === "string" ? given : "", secret)) {
      rejected.secretKey++
      return afterFailure(address, () => refuseUpgrade(socket, proxyErrorStatus, "Proxy Error", "Invalid X-SECRET-KEY"), () => socket.destroy())
    }
    authThrottle.succeeded(address)
    const peer = `${req.socket.remoteAddress}:${req.socket.remotePort}`
    if (greeting.size >= maxPendingGreetings) {
      refused("tooManyGreetings", `${peer}: ${maxPendingGreetings} registrations already wait for their greeting; refused with 503`)
      return refuseUpgrade(socket, 503, "Service Unavailable", "too many registrations in progress")
    }
    // heads are text: at most the head limit, in UTF-8 (up to three bytes a code unit)
    const endpoint = acceptWebSocket(req, socket, head, { maxMessageBytes: config.maxMessageSize, maxTextBytes: 3 * limits.maxHeadLength })
    if (endpoint !== undefined) onRegistered(endpoint, peer, head.length)
  }

  /** A request that passed every check, ready to go over a connection. */
  interface Prepared {
    readonly headText: string
  }

  /** Checks a `/request` and builds its head; answers the caller itself and returns undefined on refusal. */
  const prepare = (req: http.IncomingMessage, res: http.ServerResponse): Prepared | undefined => {
    if (requestKey !== undefined) {
      const address = req.socket.remoteAddress ?? "unknown"
      if (throttled(address)) return void sendError(res, 429, "too many failed credentials from this address")
      const auth = bearer.exec(req.headers["proxy-authorization"] ?? "")
      if (!secretMatches(auth === null ? "" : auth[1]!.trim(), requestKey)) {
        rejected.requestKey++
        return void afterFailure(address, () => sendError(res, 401, "Invalid Proxy-Authorization", { "Proxy-Authenticate": "Bearer" }), () => res.destroy())
      }
      authThrottle.succeeded(address)
    }
    const rawDestination = req.headers["x-proxy-destination"]
    const destination = Array.isArray(rawDestination) ? rawDestination[0] : rawDestination
    if (destination === undefined || destination === "") {
      return void sendError(res, proxyErrorStatus, "Missing X-PROXY-DESTINATION header")
    }
    let url: URL
    try {
      url = new URL(destination)
    } catch {
      return void sendError(res, proxyErrorStatus, "Unable to parse X-PROXY-DESTINATION header")
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      return void sendError(res, proxyErrorStatus, "Unable to parse X-PROXY-DESTINATION header")
    }
    if (Object.keys(req.headersDistinct).length > config.maxHeaders) {
      return void sendError(res, 431, `more than ${config.maxHeaders} request headers`)
    }
    const ambiguous = checkRequestFields(req.rawHeaders)
    if (ambiguous !== undefined) return void sendError(res, 400, ambiguous.message)
    const header = requestHeader(req)
    const method = req.method ?? "GET"
    const verdict = checkDestination(config.rules, { method, url: url.href, header })
    if (verdict._tag !== "Allowed") return void sendError(res, proxyErrorStatus, verdict.message)
    const contentLength = requestContentLength(req)
    if (contentLength > config.maxMessageSize) {
      return void sendError(res, 413, `request body exceeds ${config.maxMessageSize} bytes`)
    }
    return { headText: encodeRequestHead({ Method: method, URL: destination, Header: header, ContentLength: contentLength }) }
  }

  /** What happens to a connection once its exchange is over. */
  const settle = (conn: ServerConnection, res: http.ServerResponse, error: WspProxyError | undefined): void => {
    if (error === undefined) return pool.releaseNow(conn)
    pool.remove(conn)
    conn.close(error.message)
    failures[error.reason] = (failures[error.reason] ?? 0) + 1
    if (error.reason !== "CallerGone") warnFailure(`wsp /request failed, connection of pool ${conn.poolId} dropped (${error.reason}): ${error.message}`)
    // nothing more to tell a caller that left or that already has its whole response
    if (error.reason === "CallerGone" || res.writableEnded) return
    sendError(res, error.reason === "BodyTooLarge" ? 413 : proxyErrorStatus, error.message)
  }

  /** The slow path: no idle connection, so wait (up to `timeout`) in a fiber the caller can cancel. */
  const waitAndProxy = Effect.fnUntraced(function*(req: http.IncomingMessage, res: http.ServerResponse, prepared: Prepared) {
    const conn = yield* pool.take.pipe(
      Effect.catch((e: PoolError) => Effect.sync(() => (sendError(res, proxyErrorStatus, e.message), undefined)))
    )
    if (conn === undefined) return
    yield* Effect.callback<void>((resume) => {
      let settled = false
      const cancel = conn.proxy(req, res, prepared.headText, config.maxMessageSize, config.responseTimeout, (error) => {
        settled = true
        settle(conn, res, error)
        resume(Effect.void)
      })
      return Effect.sync(() => {
        if (settled) return
        cancel()
        pool.remove(conn)
        conn.close("interrupted")
      })
    })
  })

  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    const path = pathOf(req)
    if (path === "/status") {
      res.writeHead(200, { "Content-Type": "text/plain; charset=utf-8" })
      res.end("ok")
      return
    }
    if (path === "/register") {
      if (registrationClosed()) {
        refuseClosedRegistration()
        return sendError(res, 403, registrationClosedMessage)
      }
      const given = req.headers["x-secret-key"]
      if (!secretMatches(typeof given === "string" ? given : "", secret)) {
        rejected.secretKey++
        return sendError(res, proxyErrorStatus, "Invalid X-SECRET-KEY")
      }
      return sendError(res, proxyErrorStatus, "HTTP upgrade error : not a WebSocket upgrade request")
    }
    if (path !== "/request") return sendError(res, 404, "404 page not found")
    if (inFlight >= config.maxConcurrentRequests) {
      return sendError(res, proxyErrorStatus, `Too many concurrent requests (limit ${config.maxConcurrentRequests})`)
    }
    inFlight++
    res.once("close", () => inFlight--)
    const prepared = prepare(req, res)
    if (prepared === undefined) return
    // the fast path, plain callbacks: an idle connection is there now
    const conn = pool.tryTake()
    if (conn !== undefined) {
      conn.proxy(req, res, prepared.headText, config.maxMessageSize, config.responseTimeout, (error) => settle(conn, res, error))
      return
    }
    if (pool.stats().pools === 0) return sendError(res, proxyErrorStatus, "No proxy available")
    const fiber = run(waitAndProxy(req, res, prepared))
    // a caller that leaves while waiting for a connection stops waiting; mid-exchange, the
    // exchange itself notices and throws the connection away
    res.once("close", () => {
      if (!res.writableFinished) fiber.interruptUnsafe()
    })
  }

  const server = http.createServer({ maxHeadersCount: nodeHeaderParseLimit } as http.ServerOptions, onRequest)
  server.on("upgrade", onUpgrade)
  server.on("clientError", (_err, socket) => socket.destroy())

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
        server.closeAllConnections()
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
    replaceCredentials: (credentials) =>
      Effect.sync(() => {
        secret = Redacted.value(credentials.secretKey)
        requestKey = credentials.requestKey === undefined ? undefined : Redacted.value(credentials.requestKey)
      })
  }
})
