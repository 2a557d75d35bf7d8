/**
 * The wsp-compatible client: keeps a pool of WebSocket connections to every wsp server target
 * (refilled to `poolidlesize`, at most `poolmaxsize`), performs each request the server sends after
 * checking it against the destination rules, and answers with a response head and one body message.
 * It never contacts a destination the rules refuse, and never accepts a second request on a busy connection.
 */
import { Buffer } from "node:buffer"
import { Context, Effect, FiberSet, Layer, Queue, Random, Redacted, Schema } from "effect"
import type { Scope } from "effect"
import { checkDestination, isOpen } from "../../domain/DestinationRules.ts"
import type { DestinationRules, RuleVerdict } from "../../domain/DestinationRules.ts"
import type { WspClientConfig } from "../../domain/WspConfig.ts"
import type { WspHeadLimits, WspRequestHead } from "../../domain/WspMessage.ts"
import {
  decodeRequestHead,
  defaultHeadLimits,
  encodeGreeting,
  encodeResponseHead,
  WspMessageError
} from "../../domain/WspMessage.ts"
import {
  DestinationHeadError,
  destinationMethod,
  destinationTarget,
  encodeDestinationRequestHead,
  requestBodyFraming
} from "../../domain/DestinationRequestHead.ts"
import { parseWebSocketUrl } from "../transport/WebSocketDial.ts"
import type { WebSocketEndpoint } from "../transport/WebSocketEndpoint.ts"
import { openWebSocket } from "../transport/WebSocketOpen.ts"
import type { DestinationCall, DestinationResponder } from "./DestinationExchange.ts"
import { DestinationExchange, DestinationPools } from "./DestinationExchange.ts"

/** wsp's status for a request the client could not perform. */
export const clientErrorStatus = 527
/** Status for a destination the rules refuse (switchyard's; wsp has no client-side rules). */
export const refusedStatus = 403
/** How often each target's pool is checked and refilled, ms (wsp: every second). */
export const connectorInterval = 1_000
/** How long a WebSocket handshake to a server may take, ms. */
export const handshakeTimeout = 10_000
/** Bytes queued on a WebSocket before the destination's response is paused. */
export const downloadHighWater = 4 * 1024 * 1024

/** A protocol violation by the server on one connection; that connection is closed. */
export class WspClientError extends Schema.TaggedError<WspClientError>()("WspClientError", {
  reason: Schema.Literals(["MalformedHead", "MissingBody", "UnexpectedMessage", "ResponseTooLarge", "UpstreamFailed"]),
  message: Schema.String
}) {}

/**
 * Delay before the next dial after `failures` consecutive failures: exponential from `initial`,
 * capped at `max`, with "equal jitter" (uniform in the upper half) so clients do not reconnect in step.
 * `random` is in [0, 1).
 */
export const reconnectDelay = (failures: number, initial: number, max: number, random: number): number => {
  const ceiling = Math.min(max, initial * 2 ** Math.min(Math.max(failures - 1, 0), 30))
  return Math.round(ceiling / 2 + (random * ceiling) / 2)
}

/** Connection counts for one target. */
export interface TargetStats {
  readonly target: string
  readonly connecting: number
  readonly idle: number
  readonly running: number
  readonly total: number
  /** Failed connection attempts since the last successful one. */
  readonly failedAttempts: number
  /** Connections opened to replace ones that were lost. */
  readonly reconnects: number
}

interface Target {
  readonly url: string
  readonly connections: Set<ClientConnection>
  readonly wake: Queue.Queue<void>
  /** Connections that closed right after opening without serving anything (refused by the server). */
  earlyCloses: number
  /** Open connections lost and not yet replaced. */
  lost: number
  /** Connections opened to replace lost ones. */
  reconnects: number
  /** Failed attempts since the last successful one. */
  failures: number
}

interface ClientContext {
  readonly config: WspClientConfig
  /** The destination rules in force, checked per request (a reload swaps them). */
  rules: DestinationRules
  readonly limits: WspHeadLimits
  /** Connection pools per destination. */
  readonly pools: DestinationPools
  readonly log: (message: string) => void
}

/**
 * What the rules are checked against: the method and URL as they will be used (an empty method is
 * GET; the URL in its parsed, normalised form, so the string checked names the host contacted).
 */
const ruleSubject = (head: WspRequestHead) => {
  let url = head.URL
  try {
    url = new URL(head.URL).href
  } catch {
    // an unparsable URL is refused when the request is performed
  }
  return { method: head.Method === "" ? "GET" : head.Method, url, header: head.Header }
}

/** One WebSocket to a wsp server; serves one request at a time. */
class ClientConnection {
  /** Set once the WebSocket is open. */
  endpoint: WebSocketEndpoint | undefined = undefined
  /** Abandons the opening handshake while `connecting`. */
  cancelOpen: (() => void) | undefined = undefined
  readonly target: Target
  status: "connecting" | "idle" | "running" = "connecting"
  awaitingPong = false
  private served = 0
  private readonly openedAt = Date.now()
  private head: WspRequestHead | undefined
  private verdict: RuleVerdict | undefined
  /** The destination request of the current exchange, until its response has been relayed. */
  private upstream: DestinationCall | undefined
  /** A head has arrived and its body message has not ended yet. */
  private bodyPending = false
  /** The current body is being streamed to the destination fragment by fragment. */
  private streamed = false
  /** Bytes of the current body received so far. */
  private uploaded = 0
  /** The current exchange's answer has been sent completely. */
  private answered = false
  /** An error answer waiting for the body to end (answering earlier would cut it short). */
  private deferredError: string | undefined
  /** The WebSocket is paused until the destination drains. */
  private uploadPaused = false
  private readonly ctx: ClientContext

  constructor(target: Target, ctx: ClientContext) {
    this.target = target
    this.ctx = ctx
  }

  /** The WebSocket opened: messages from the server are handled from now on. */
  attach(endpoint: WebSocketEndpoint): void {
    this.endpoint = endpoint
    this.cancelOpen = undefined
    endpoint.start({
      text: (text) => this.onHead(text),
      binaryStart: () => this.onBodyStart(),
      binaryData: (fragment) => this.onBodyFragment(fragment),
      binaryEnd: () => this.onBodyEnd(),
      pong: () => {
        this.awaitingPong = false
      },
      closed: () => this.onClose()
    })
  }

  terminate(): void {
    if (this.endpoint !== undefined) this.endpoint.terminate()
    else this.cancelOpen?.()
  }

  private onClose(): void {
    this.upstream?.destroy()
    this.upstream = undefined
    if (!this.target.connections.delete(this)) return
    if (this.status !== "connecting") this.target.lost++
    if (this.status !== "connecting" && this.served === 0 && Date.now() - this.openedAt < this.ctx.config.backoffInitial) {
      this.target.earlyCloses++
    }
    Queue.offerUnsafe(this.target.wake, undefined)
  }

  private violation(error: WspClientError): void {
    this.ctx.log(`wsp connection to ${this.target.url} closed: ${error.message}`)
    this.upstream?.destroy()
    this.upstream = undefined
    this.endpoint?.terminate()
  }

  /** A text message: the next request's head. */
  private onHead(text: string): void {
    this.served++
    if (this.bodyPending) {
      return this.violation(new WspClientError({ reason: "MissingBody", message: "expected a binary request body message" }))
    }
    if (this.status === "running") {
      return this.violation(new WspClientError({ reason: "UnexpectedMessage", message: "request received while another is running" }))
    }
    const head = decodeRequestHead(text, this.ctx.limits)
    if (head instanceof WspMessageError) {
      // as wsp: answer with an error response, then drop the connection
      this.answerError(clientErrorStatus, `Unable to deserialize json http request : ${head.message}\n`)
      return this.violation(new WspClientError({ reason: "MalformedHead", message: head.message }))
    }
    this.head = head
    this.verdict = checkDestination(this.ctx.rules, ruleSubject(head))
    this.status = "running"
    this.bodyPending = true
    Queue.offerUnsafe(this.target.wake, undefined)
    if (this.verdict._tag !== "Allowed") return
    // allowed: call the destination now and stream the body to it as it arrives
    if (this.call(head, head.ContentLength) !== undefined) this.streamed = true
  }

  /** A binary message begins: the current request's body. */
  private onBodyStart(): void {
    this.served++
    if (this.bodyPending) return
    if (this.status === "running") {
      return this.violation(new WspClientError({ reason: "UnexpectedMessage", message: "request received while another is running" }))
    }
    this.violation(new WspClientError({ reason: "MalformedHead", message: "request head is a binary message" }))
  }

  /** Part of the request body: on to the destination, or dropped when no request was made. */
  private onBodyFragment(fragment: Buffer): void {
    if (!this.bodyPending) return
    const head = this.head!
    this.uploaded += fragment.length
    if (!this.streamed) return
    if (head.ContentLength >= 0 && this.uploaded > head.ContentLength) {
      return this.violation(new WspClientError({
        reason: "MalformedHead",
        message: `http: ContentLength=${head.ContentLength} with Body length ${this.uploaded} or more`
      }))
    }
    const call = this.upstream
    if (call === undefined) return
    if (!call.write(fragment) && !this.uploadPaused) {
      this.uploadPaused = true
      this.endpoint?.pause()
    }
  }

  /** The request body's last frame has been read. */
  private onBodyEnd(): void {
    if (!this.bodyPending) return
    this.bodyPending = false
    if (this.streamed) return this.endUpload()
    const verdict = this.verdict!
    if (verdict._tag !== "Allowed") {
      this.ctx.log(`wsp refused ${this.head!.Method} ${this.head!.URL}: ${verdict.message}`)
      this.answerError(refusedStatus, verdict.message)
      return this.becomeIdle()
    }
    // allowed, but no request could be made: its answer was waiting for the body's end
    this.answerError(clientErrorStatus, this.deferredError ?? "Unable to execute request\n")
    this.becomeIdle()
  }

  private resumeUpload(): void {
    if (!this.uploadPaused) return
    this.uploadPaused = false
    this.endpoint?.resume()
  }

  /** The streamed body's last frame has been read. */
  private endUpload(): void {
    const head = this.head!
    this.resumeUpload()
    if (head.ContentLength >= 0 && this.uploaded !== head.ContentLength) {
      return this.violation(new WspClientError({
        reason: "MalformedHead",
        message: `http: ContentLength=${head.ContentLength} with Body length ${this.uploaded}`
      }))
    }
    this.upstream?.end()
    if (this.deferredError !== undefined) {
      const message = this.deferredError
      this.deferredError = undefined
      this.answerError(clientErrorStatus, message)
      return this.becomeIdle()
    }
    if (this.answered) this.becomeIdle()
  }

  /** The answer has gone out; the connection is free once its request body has ended too. */
  private answeredNow(): void {
    this.answered = true
    if (!this.bodyPending) this.becomeIdle()
  }

  private becomeIdle(): void {
    this.status = "idle"
    this.head = undefined
    this.verdict = undefined
    this.streamed = false
    this.uploaded = 0
    this.answered = false
    this.deferredError = undefined
    this.resumeUpload()
  }

  /** A response made here (wsp's 527 path): a head with an empty header map and the message as body. */
  private answerError(status: number, message: string): void {
    const body = Buffer.from(message)
    const endpoint = this.endpoint
    if (endpoint === undefined || !endpoint.open) return
    endpoint.sendText(encodeResponseHead({ StatusCode: status, Header: {}, ContentLength: body.length }))
    endpoint.sendBinary(body)
  }

  /**
   * Opens the request to the destination: HTTP/1.1 on a pooled connection (TLS for `https://`). The body follows through `write` (`contentLength` from the head, chunked when
   * unknown). A request that cannot be made is answered (527) once its body has been read. Undefined
   * when no request was made.
   */
  private call(head: WspRequestHead, contentLength: number): DestinationCall | undefined {
    const fail = (message: string): undefined => {
      this.deferredError = `Unable to execute request : ${message}\n`
      return undefined
    }
    const target = destinationTarget(head.URL)
    if (target instanceof DestinationHeadError) return fail(target.message)
    const method = destinationMethod(head.Method)
    const framing = requestBodyFraming(method, contentLength)
    const responder = this.responder()
    const requestHead = encodeDestinationRequestHead(method, target, head.Header, contentLength)
    if (requestHead instanceof DestinationHeadError) return fail(requestHead.message)
    const exchange = new DestinationExchange(this.ctx.pools, target, method, requestHead, framing, this.ctx.config.maxHeaders, responder)
    this.upstream = exchange
    this.answered = false
    responder.bind(exchange)
    // a connection may be granted (or refused) at once, so the exchange starts once it is bound
    exchange.start()
    return exchange
  }

  /**
   * Relays one destination response: its head as a text message, its body as one binary message sent
   * fragment by fragment as it is read (the last carrying FIN), pausing the destination while the
   * WebSocket has more than `downloadHighWater` bytes queued.
   */
  private responder(): DestinationResponder & { readonly bind: (call: DestinationCall) => void } {
    const endpoint = this.endpoint!
    const maxBody = this.ctx.config.maxMessageSize
    let call: DestinationCall | undefined
    let size = 0
    /** Paused while the WebSocket has `downloadHighWater` bytes or more queued. */
    let paused = false
    /** Frames written and not yet done. */
    let writing = 0
    /** Paused until every frame is written: the socket holds a payload in the buffer the next read reuses. */
    let awaitingWrites = false
    const resumeIfClear = () => {
      if (paused && endpoint.bufferedAmount < downloadHighWater) paused = false
      if (!paused && !awaitingWrites) call?.resume()
    }
    const onFrameWritten = (err?: Error | null) => {
      writing--
      if (err) return
      if (awaitingWrites && writing === 0) awaitingWrites = false
      resumeIfClear()
    }
    return {
      bind: (c) => void (call = c),
      head: (status, header, contentLength) => {
        if (call === undefined || this.upstream !== call) return
        endpoint.sendText(encodeResponseHead({ StatusCode: status, Header: header, ContentLength: contentLength }))
      },
      data: (chunk, end) => {
        if (call === undefined || this.upstream !== call) return
        size += chunk.length
        if (size > maxBody) {
          return this.violation(new WspClientError({ reason: "ResponseTooLarge", message: `response body exceeds ${maxBody} bytes` }))
        }
        writing++
        // the chunk goes out as the frame's payload (masked in place); one the socket could not write
        // at once keeps its buffer: read nothing more until it is written, so the next read reuses the
        // buffer instead of allocating one
        if (endpoint.sendFragment(chunk, end, onFrameWritten)) {
          if (end) call.holdChunk()
          else {
            awaitingWrites = true
            call.pause()
          }
        }
        if (end) {
          this.upstream = undefined
          return this.answeredNow()
        }
        if (!paused && endpoint.bufferedAmount >= downloadHighWater) {
          paused = true
          call.pause()
        }
      },
      failed: (message, responded) => {
        if (call === undefined || this.upstream !== call) return
        this.upstream = undefined
        if (responded) {
          return this.violation(new WspClientError({ reason: "UpstreamFailed", message }))
        }
        const answer = `Unable to execute request : ${message}\n`
        // while the body is still arriving, the answer waits for its end
        if (this.bodyPending) this.deferredError = answer
        else {
          this.answerError(clientErrorStatus, answer)
          this.becomeIdle()
        }
      },
      drained: () => {
        if (call !== undefined && this.upstream === call) this.resumeUpload()
      }
    }
  }
}

/** The wsp client as a running service. */
export class WspClient extends Context.Service<WspClient, {
  /** Counts per target. */
  readonly stats: () => ReadonlyArray<TargetStats>
  /** Replaces the destination rules; every request checked from then on uses them (one in progress keeps its verdict). */
  readonly replaceRules: (rules: DestinationRules) => Effect.Effect<void>
}>()("switchyard/WspClient") {
  static readonly layer = (config: WspClientConfig): Layer.Layer<WspClient> => Layer.effect(WspClient, makeWspClient(config))
}

/** Starts the client: one connector per target, a keepalive loop; everything closes with the scope. */
export const makeWspClient = Effect.fn("WspClient.make")(function*(config: WspClientConfig): Effect.fn.Return<
  WspClient["Service"],
  never,
  Scope.Scope
> {
  if (isOpen(config.rules)) {
    yield* Effect.logWarning(
      "wsp-client: no whitelist or blacklist configured, so every destination is allowed (wsp's behaviour); " +
        "add rules to keep this client from relaying to any host it can reach"
    )
  }
  const run = yield* FiberSet.makeRuntime<never, void, never>()
  const maxSockets = Math.max(1, config.poolMaxSize * Math.max(1, config.targets.length))
  const pools = new DestinationPools(maxSockets, maxSockets)
  const ctx: ClientContext = {
    config,
    rules: config.rules,
    limits: { ...defaultHeadLimits, maxHeaderCount: config.maxHeaders },
    pools,
    log: (message) => void run(Effect.logWarning(message))
  }
  const secret = Redacted.value(config.secretKey)
  const greeting = encodeGreeting({ id: config.id, size: config.poolIdleSize })
  const targets: Array<Target> = []
  for (const url of config.targets) {
    targets.push({ url, connections: new Set(), wake: yield* Queue.sliding<void>(1), earlyCloses: 0, lost: 0, reconnects: 0, failures: 0 })
  }

  yield* Effect.addFinalizer(() =>
    Effect.sync(() => {
      for (const target of targets) {
        for (const conn of target.connections) conn.terminate()
      }
      pools.close()
    })
  )

  const connectOne = (target: Target) =>
    Effect.callback<boolean>((resume) => {
      const conn = new ClientConnection(target, ctx)
      target.connections.add(conn)
      const failed = (message: string) => {
        target.connections.delete(conn)
        ctx.log(`Unable to connect to ${target.url} : ${message}`)
        resume(Effect.succeed(false))
      }
      const url = parseWebSocketUrl(target.url)
      if (!("url" in url)) {
        failed(url.message)
        return
      }
      conn.cancelOpen = openWebSocket({
        secure: url.secure,
        host: url.host,
        port: url.port,
        path: `${url.url.pathname}${url.url.search}`,
        headers: { "X-SECRET-KEY": secret },
        maskFrames: config.maskFrames,
        maxMessageBytes: config.maxMessageSize,
        // heads are text: at most the head limit, in UTF-8 (up to three bytes a code unit)
        maxTextBytes: 3 * ctx.limits.maxHeadLength,
        timeoutMs: handshakeTimeout
      }, (outcome) => {
        if (outcome._tag !== "Open") return failed(outcome.message)
        conn.attach(outcome.endpoint)
        outcome.endpoint.sendText(greeting)
        conn.status = "idle"
        if (target.lost > 0) {
          target.lost--
          target.reconnects++
        }
        resume(Effect.succeed(true))
      })
      return Effect.sync(() => conn.terminate())
    })

  const sizes = (target: Target): TargetStats => {
    let connecting = 0
    let idle = 0
    let running = 0
    for (const conn of target.connections) {
      if (conn.status === "connecting") connecting++
      else if (conn.status === "idle") idle++
      else running++
    }
    return {
      target: target.url,
      connecting,
      idle,
      running,
      total: target.connections.size,
      failedAttempts: target.failures,
      reconnects: target.reconnects
    }
  }

  const connector = (target: Target) =>
    Effect.gen(function*() {
      for (;;) {
        const s = sizes(target)
        let toCreate = config.poolIdleSize - s.idle - s.connecting
        if (s.total === 0) toCreate = 1
        toCreate = Math.min(toCreate, config.poolMaxSize - s.total)
        if (toCreate > 0) {
          const results = yield* Effect.forEach(Array.from({ length: toCreate }), () => connectOne(target), {
            concurrency: "unbounded"
          })
          const early = target.earlyCloses
          target.earlyCloses = 0
          if (results.includes(false) || early > 0) {
            target.failures++
            const delay = reconnectDelay(target.failures, config.backoffInitial, config.backoffMax, yield* Random.next)
            yield* Effect.sleep(delay)
            continue
          }
          target.failures = 0
          continue
        }
        if (target.earlyCloses > 0) {
          target.earlyCloses = 0
          target.failures++
          yield* Effect.sleep(reconnectDelay(target.failures, config.backoffInitial, config.backoffMax, yield* Random.next))
          continue
        }
        yield* Effect.raceFirst(Queue.take(target.wake), Effect.sleep(connectorInterval))
      }
    })

  for (const target of targets) yield* Effect.forkScoped(connector(target))

  if (config.pingInterval > 0) {
    yield* Effect.forkScoped(Effect.forever(Effect.andThen(
      Effect.sleep(config.pingInterval),
      Effect.sync(() => {
        for (const target of targets) {
          for (const conn of target.connections) {
            // a connection paused for a slow destination is not read, so its pongs wait too
            const endpoint = conn.endpoint
            if (conn.status === "connecting" || endpoint === undefined || endpoint.isPaused) continue
            if (conn.awaitingPong) {
              endpoint.terminate()
              continue
            }
            conn.awaitingPong = true
            endpoint.ping()
          }
        }
      })
    )))
  }

  return {
    stats: () => targets.map(sizes),
    replaceRules: (rules) => Effect.sync(() => void (ctx.rules = rules))
  }
})
