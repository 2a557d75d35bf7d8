/**
 * The wsp-compatible server: wsp clients register pooled WebSocket connections on `/register`;
 * callers send HTTP requests to `/request` with `X-Proxy-Destination`, each carried over one idle
 * connection as a JSON head message plus one binary body message, answered the same way.
 * It does not perform requests itself and never puts two requests on one connection at a time.
 */
import { createHash, timingSafeEqual } from "node:crypto"
import * as http from "node:http"
import type * as net from "node:net"
import type { Duplex } from "node:stream"
import { Context, Effect, FiberSet, Layer, Redacted, Schema } from "effect"
import type { Scope } from "effect"
import { contentLengthValues, declaredContentLength, isInvalidContentLength } from "../../domain/ContentLength.ts"
import { checkDestination } from "../../domain/DestinationRules.ts"
import type { WspServerConfig } from "../../domain/WspConfig.ts"
import { checkRequestFields } from "../../domain/Http1Parser.ts"
import type { GoHeader, WspHeadLimits, WspResponseHead } from "../../domain/WspMessage.ts"
import {
  canonicalHeaderName,
  decodeGreeting,
  decodeResponseHead,
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
/**
 * Wire size of a client's control frame beyond its payload (2-byte header and 4-byte mask; a control
 * payload is at most 125 bytes, so no extended length): pings and pongs read while idle are taken
 * back out of the idle count, so that only data frames use up `maxIdleBytes`, however long the
 * connection stays idle.
 */
export const clientControlFrameOverheadBytes = 6
/** Bytes queued toward a caller before the WebSocket carrying its response is paused. */
export const responseHighWater = 1024 * 1024
/** Bytes queued on a WebSocket before the caller's request body is paused. */
export const uploadHighWater = 4 * 1024 * 1024
/** Shortest interval between two log lines about refused registrations, or about failed requests (ms). */
export const failureLogInterval = 10_000
/** Body of the answer to `/register` when no `secretkey` is set and open registration is off. */
export const registrationClosedMessage = "Registration closed: the server has no secretkey configured"
/** Most headers Node parses on an incoming request before switchyard counts them itself. */
const nodeHeaderParseLimit = 4096

/** A `/request` that failed after a connection was taken; the connection is then closed. */
export class WspProxyError extends Schema.TaggedError<WspProxyError>()("WspProxyError", {
  reason: Schema.Literals([
    "SendFailed",
    "BodyTooLarge",
    "ConnectionClosed",
    "BadResponseHead",
    "MissingBody",
    "BadStatus",
    "CallerGone",
    "UnexpectedMessage",
    "UnfinishedUpload",
    "ResponseTimeout"
  ]),
  message: Schema.String
}) {}

/** The server could not start. */
export class WspServerError extends Schema.TaggedError<WspServerError>()("WspServerError", {
  reason: Schema.Literals(["ListenFailed"]),
  message: Schema.String
}) {}

/** Constant-time secret comparison (hashing first makes the time independent of the lengths). */
export const secretMatches = (given: string, expected: string): boolean =>
  timingSafeEqual(createHash("sha256").update(given).digest(), createHash("sha256").update(expected).digest())

// ---------------------------------------------------------------------------------------------
// One registered connection

interface Exchange {
  readonly res: http.ServerResponse
  readonly method: string
  readonly done: (error: WspProxyError | undefined) => void
  head: WspResponseHead | undefined
  /** The request body message has been sent completely (its FIN is out). */
  uploaded: boolean
  /** The response head has been written to the caller. */
  started: boolean
  /** Response body bytes written to the caller so far. */
  received: number
  /** The WebSocket is paused until the caller drains. */
  paused: boolean
  /** Fails the exchange when no response head arrives in time (restarted while the request body moves). */
  responseTimer: NodeJS.Timeout | undefined
}

/** One pooled WebSocket from a wsp client; carries at most one exchange at a time. */
class ServerConnection {
  readonly endpoint: WebSocketEndpoint
  readonly poolId: string
  /** Set by ping, cleared by pong: a connection that misses a whole interval is dropped. */
  awaitingPong = false
  private exchange: Exchange | undefined
  private readonly limits: WspHeadLimits
  private readonly onGone: (conn: ServerConnection) => void
  /** Bytes read since the last exchange ended (or since the greeting), bounded by `maxIdleBytes`. */
  private idleBytes = 0
  private readonly maxIdleBytes: number
  private readonly onIdleOverflow: (conn: ServerConnection) => void
  /** The caller's socket, corked while one read's body parts are written to it. */
  private corked: net.Socket | undefined = undefined

  constructor(
    endpoint: WebSocketEndpoint,
    poolId: string,
    limits: WspHeadLimits,
    onGone: (conn: ServerConnection) => void,
    idle: {
      readonly maxBytes: number
      readonly onOverflow: (conn: ServerConnection) => void
    }
  ) {
    this.endpoint = endpoint
    this.poolId = poolId
    this.limits = limits
    this.onGone = onGone
    this.maxIdleBytes = idle.maxBytes
    this.onIdleOverflow = idle.onOverflow
    // reads are counted from a listener of their own, first, so that a read is judged by the state
    // before the endpoint handles it (it may end an exchange)
    const socket = endpoint.socket
    const count = (chunk: Buffer) => void this.countIdle(chunk.length)
    socket.prependListener("data", count)
    socket.once("close", () => socket.off("data", count))
    endpoint.replaceHandlers({
      text: (text) => this.onText(text),
      binaryStart: () => this.onBodyStart(),
      binaryData: (payload) => {
        const exchange = this.exchange
        if (exchange === undefined || exchange.head === undefined) return
        // the parts of a body in one read go to the caller in one write
        const socket = exchange.res.socket
        if (this.corked === undefined && socket !== null && !socket.destroyed) {
          socket.cork()
          this.corked = socket
        }
        this.onBodyFragment(exchange, payload)
      },
      readDone: () => {
        const corked = this.corked
        if (corked === undefined) return
        this.corked = undefined
        corked.uncork()
      },
      binaryEnd: () => {
        const exchange = this.exchange
        if (exchange !== undefined && exchange.head !== undefined) this.endStreamedBody(exchange, exchange.head)
      },
      pong: (payload) => {
        this.awaitingPong = false
        this.controlFrameRead(payload)
      },
      ping: (payload) => this.controlFrameRead(payload),
      closed: () => this.onClose()
    })
  }

  /** A ping or pong read: its bytes do not count toward the idle limit. */
  private controlFrameRead(payload: Buffer): void {
    if (this.exchange !== undefined) return
    this.idleBytes = Math.max(0, this.idleBytes - clientControlFrameOverheadBytes - payload.length)
  }

  /** Counts bytes read while no exchange runs; false (the connection is terminated) past the limit. */
  private countIdle(bytes: number): boolean {
    if (this.exchange !== undefined) return true
    this.idleBytes += bytes
    if (this.idleBytes <= this.maxIdleBytes) return true
    if (!this.endpoint.closed) {
      this.onIdleOverflow(this)
      this.endpoint.terminate()
    }
    return false
  }

  close(_reason: string): void {
    this.endpoint.terminate()
  }

  private finish(error: WspProxyError | undefined): void {
    const exchange = this.exchange
    if (exchange === undefined) return
    this.exchange = undefined
    clearTimeout(exchange.responseTimer)
    if (error !== undefined) this.endpoint.terminate()
    else if (exchange.paused) {
      exchange.paused = false
      this.endpoint.resume()
    }
    exchange.done(error)
  }

  private onClose(): void {
    this.finish(new WspProxyError({ reason: "ConnectionClosed", message: "Unable to get http response reader : connection closed" }))
    this.onGone(this)
  }

  /** A text message: the response head, where one is expected. */
  private onText(text: string): void {
    const exchange = this.exchange
    // wsp: a message on a connection that is not serving a request ends it
    if (exchange === undefined) return this.endpoint.terminate()
    if (exchange.head !== undefined) return this.finish(missingBody())
    const head = decodeResponseHead(text, this.limits)
    if (head instanceof WspMessageError) {
      return this.finish(new WspProxyError({ reason: "BadResponseHead", message: `Unable to unserialize http response : ${head.message}` }))
    }
    if (head.StatusCode < 200 || head.StatusCode > 999) {
      return this.finish(new WspProxyError({ reason: "BadStatus", message: `invalid response status ${head.StatusCode}` }))
    }
    exchange.head = head
    clearTimeout(exchange.responseTimer)
    exchange.responseTimer = undefined
  }

  /** A binary message begins: the response body, streamed to the caller as it is read. */
  private onBodyStart(): void {
    const exchange = this.exchange
    if (exchange === undefined) return this.endpoint.terminate()
    if (exchange.head === undefined) {
      return this.finish(new WspProxyError({ reason: "BadResponseHead", message: "Unable to unserialize http response : head is a binary message" }))
    }
  }

  /** One fragment of a streamed response body: the head goes out with the first one. */
  private onBodyFragment(exchange: Exchange, fragment: Buffer): void {
    if (this.exchange !== exchange || exchange.head === undefined) return
    const res = exchange.res
    const head = exchange.head
    exchange.received += fragment.length
    if (head.ContentLength >= 0 && exchange.received > head.ContentLength && !bodyless(exchange.method, head.StatusCode)) {
      // not a byte past the promised length goes to the caller: before the head a clean error, after
      // it the response is cut (its connection closed), never relayed long
      if (exchange.started) res.destroy()
      return this.finish(lengthMismatch(exchange.received, head.ContentLength, "or more "))
    }
    if (!exchange.started) {
      const failure = startResponse(res, exchange.method, head)
      if (failure !== undefined) return this.finish(failure)
      exchange.started = true
    }
    const socket = res.socket
    // a destroyed socket takes no more writes (and would never call back)
    if (bodyless(exchange.method, exchange.head.StatusCode) || res.destroyed || socket === null || socket.destroyed) return
    // Node reports a full buffer past 16 KiB; pausing the WebSocket for every fragment would cost a
    // round trip each, so the caller's buffer may grow to `responseHighWater` first
    const ok = res.write(fragment)
    if (!ok && !exchange.paused && res.writableLength >= responseHighWater) {
      exchange.paused = true
      this.endpoint.pause()
      res.once("drain", () => {
        if (!exchange.paused) return
        exchange.paused = false
        if (this.exchange === exchange) this.endpoint.resume()
      })
    }
  }

  /** The last frame of a streamed body has been read. */
  private endStreamedBody(exchange: Exchange, head: WspResponseHead): void {
    const res = exchange.res
    const noBody = bodyless(exchange.method, head.StatusCode)
    if (!noBody && head.ContentLength >= 0 && exchange.received !== head.ContentLength) {
      // the caller was promised this length: a different body cannot be delivered intact (a clean
      // error while no head went out, else the response is cut)
      if (exchange.started) res.destroy()
      return this.finish(lengthMismatch(exchange.received, head.ContentLength, ""))
    }
    if (!exchange.started) {
      const failure = startResponse(res, exchange.method, head)
      if (failure !== undefined) return this.finish(failure)
      exchange.started = true
    }
    res.end()
    this.finish(exchange.uploaded ? undefined : unfinishedUpload())
  }

  /**
   * Sends one request (head, then the caller's body as one fragmented binary message). With a
   * `responseTimeout` (ms, 0 for none), the exchange fails with `ResponseTimeout` when no response head
   * has arrived that long after the head or the latest part of the body went out.
   */
  proxy(
    req: http.IncomingMessage,
    res: http.ServerResponse,
    headText: string,
    maxBody: number,
    responseTimeout: number,
    done: (error: WspProxyError | undefined) => void
  ): () => void {
    const endpoint = this.endpoint
    const exchange: Exchange = {
      res,
      method: req.method ?? "GET",
      done,
      head: undefined,
      uploaded: false,
      started: false,
      received: 0,
      paused: false,
      responseTimer: undefined
    }
    this.exchange = exchange
    this.idleBytes = 0
    // late callbacks of this exchange must never touch a later one on the same connection
    const current = () => this.exchange === exchange
    const fail = (reason: WspProxyError["reason"], message: string) => {
      if (current()) this.finish(new WspProxyError({ reason, message }))
    }
    const onCallerGone = () => fail("CallerGone", "caller went away")
    res.once("close", onCallerGone)
    if (!endpoint.sendText(headText)) {
      fail("SendFailed", "Unable to write request : connection not open")
      return () => undefined
    }
    if (responseTimeout > 0) {
      exchange.responseTimer = setTimeout(
        () => fail("ResponseTimeout", `Unable to get http response : no response within ${responseTimeout} ms`),
        responseTimeout
      )
    }
    let sent = 0
    let paused = false
    // the latest chunk is held back until the next turn of the event loop, so that when the end
    // follows at once the last chunk carries FIN (no empty closing frame) while a body that pauses
    // still has every chunk sent without delay
    let held: Buffer | undefined
    let flushing = false
    const flush = () => {
      flushing = false
      if (held === undefined || !current()) return
      endpoint.sendFragment(held, false, onSent)
      held = undefined
    }
    const onSent = (err?: Error | null) => {
      if (err) return fail("SendFailed", `Unable to pipe request body : ${err.message}`)
      // the body is moving: the wait for the response counts from its latest part
      if (current() && exchange.head === undefined) exchange.responseTimer?.refresh()
      if (paused && endpoint.bufferedAmount < uploadHighWater) {
        paused = false
        req.resume()
      }
    }
    req.on("data", (chunk: Buffer) => {
      if (!current()) return
      sent += chunk.length
      if (sent > maxBody) {
        req.pause()
        return fail("BodyTooLarge", `request body exceeds ${maxBody} bytes`)
      }
      if (held !== undefined) endpoint.sendFragment(held, false, onSent)
      held = chunk
      if (!flushing) {
        flushing = true
        setImmediate(flush)
      }
      if (endpoint.bufferedAmount >= uploadHighWater) {
        paused = true
        req.pause()
      }
    })
    req.once("end", () => {
      if (!current()) return
      exchange.uploaded = true
      endpoint.sendFragment(held ?? Buffer.alloc(0), true, onSent)
      held = undefined
    })
    req.once("error", (err) => fail("CallerGone", `Unable to pipe request body : ${err.message}`))
    return () => {
      res.off("close", onCallerGone)
      clearTimeout(exchange.responseTimer)
      if (current()) {
        this.exchange = undefined
        this.endpoint.terminate()
      }
    }
  }
}

const missingBody = () =>
  new WspProxyError({ reason: "MissingBody", message: "Unable to get http response body reader : expected a binary body message" })

const lengthMismatch = (received: number, declared: number, orMore: string) =>
  new WspProxyError({ reason: "BadResponseHead", message: `response body of ${received} bytes ${orMore}does not match ContentLength ${declared}` })

/**
 * The head's framing checked: a `Content-Length` in its `Header` must be one decimal value, and agree
 * with `ContentLength` (or, for a body already whole, with its length) where the response has a body.
 */
const framingProblem = (head: WspResponseHead, noBody: boolean, bodyLength: number | undefined): WspProxyError | undefined => {
  const fields: Array<string> = []
  if (head.Header !== null) for (const [name, values] of Object.entries(head.Header)) for (const v of values) fields.push(name, v)
  const declared = declaredContentLength(contentLengthValues(fields))
  if (isInvalidContentLength(declared)) {
    return new WspProxyError({ reason: "BadResponseHead", message: `response head with ${declared.message}` })
  }
  if (noBody) return undefined
  if (bodyLength !== undefined && head.ContentLength >= 0 && head.ContentLength !== bodyLength) {
    return lengthMismatch(bodyLength, head.ContentLength, "")
  }
  const expected = head.ContentLength >= 0 ? head.ContentLength : bodyLength
  if (declared !== undefined && expected !== undefined && declared !== expected) {
    return new WspProxyError({ reason: "BadResponseHead", message: `response head with Content-Length ${declared} but a body of ${expected} bytes` })
  }
  return undefined
}

const unfinishedUpload = () =>
  new WspProxyError({ reason: "UnfinishedUpload", message: "response arrived before the request body was sent" })

/**
 * Writes a streamed response's status and headers: the head's `Content-Length` when it states one
 * (checked against the body at its end), chunked otherwise.
 */
const startResponse = (res: http.ServerResponse, method: string, head: WspResponseHead): WspProxyError | undefined => {
  if (res.headersSent || res.destroyed) return undefined
  const noBody = bodyless(method, head.StatusCode)
  const problem = framingProblem(head, noBody, undefined)
  if (problem !== undefined) return problem
  const header = withoutHopByHop(head.Header, noBody ? new Set() : new Set(["content-length"]))
  try {
    for (const [name, values] of Object.entries(header)) {
      if (values.length > 0) res.setHeader(name, values as Array<string>)
    }
    if (!noBody && head.ContentLength >= 0) res.setHeader("Content-Length", head.ContentLength)
    res.writeHead(head.StatusCode)
  } catch (e) {
    for (const name of res.getHeaderNames()) res.removeHeader(name)
    return new WspProxyError({ reason: "BadResponseHead", message: `Unable to write response headers : ${(e as Error).message}` })
  }
  return undefined
}

/** Response heads keep their own length only where no body is sent. */
const bodyless = (method: string, status: number): boolean => method === "HEAD" || status === 204 || status === 304

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
