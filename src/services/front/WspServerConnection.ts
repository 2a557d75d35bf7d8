/**
 * One connection a wsp client registered with the wsp server, as an upstream of the forwarding core:
 * it carries one exchange at a time, sending the request head as a text message and the caller's body
 * as one fragmented binary message, and relaying the response head and body to the exchange's front as
 * they arrive, frame by frame. It bounds what an idle connection may send, and drops itself on any
 * violation of the exchange.
 */
import { Buffer } from "node:buffer"
import { Schema } from "effect"
import { contentLengthValues, declaredContentLength, isInvalidContentLength } from "../../domain/ContentLength.ts"
import type { WspHeadLimits, WspResponseHead } from "../../domain/WspMessage.ts"
import { decodeResponseHead, WspMessageError, withoutHopByHop } from "../../domain/WspMessage.ts"
import type { ExchangeFront } from "../forward/Exchange.ts"
import type { WebSocketEndpoint } from "../transport/WebSocketEndpoint.ts"

/**
 * Wire size of a client's control frame beyond its payload (2-byte header and 4-byte mask; a control
 * payload is at most 125 bytes, so no extended length): pings and pongs read while idle are taken
 * back out of the idle count, so that only data frames use up `maxIdleBytes`, however long the
 * connection stays idle.
 */
export const clientControlFrameOverheadBytes = 6
/** Bytes queued on a WebSocket before the caller's request body is paused. */
export const uploadHighWater = 4 * 1024 * 1024
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

interface Exchange {
  readonly front: ExchangeFront
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
export class ServerConnection {
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
        if (exchange !== undefined && exchange.head !== undefined) this.onBodyFragment(exchange, payload)
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
      closed: () => this.onClose(),
      // body fragments are held by the caller's socket until written, under a hold on their read
      retainsReads: true
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
    const front = exchange.front
    const head = exchange.head
    exchange.received += fragment.length
    const noBody = bodyless(exchange.method, head.StatusCode)
    if (head.ContentLength >= 0 && exchange.received > head.ContentLength && !noBody) {
      // not a byte past the promised length goes to the caller: before the head a clean error, after
      // it the response is cut (its connection closed), never relayed long
      return this.finish(lengthMismatch(exchange.received, head.ContentLength, "or more "))
    }
    if (!exchange.started) {
      const failure = startResponse(front, exchange.method, head)
      if (failure !== undefined) return this.finish(failure)
      exchange.started = true
    }
    if (noBody || front.isGone()) return
    // the front door says when the caller's queue is above its mark: the WebSocket is then read no
    // more until it drained
    if (!front.write(fragment, this.endpoint.retainRead()) && !exchange.paused) {
      exchange.paused = true
      this.endpoint.pause()
    }
  }

  /** The caller took what was queued: a WebSocket paused for it is read again. */
  private onCallerDrained(exchange: Exchange): void {
    if (!exchange.paused) return
    exchange.paused = false
    if (this.exchange === exchange) this.endpoint.resume()
  }

  /** The last frame of a streamed body has been read. */
  private endStreamedBody(exchange: Exchange, head: WspResponseHead): void {
    const noBody = bodyless(exchange.method, head.StatusCode)
    if (!noBody && head.ContentLength >= 0 && exchange.received !== head.ContentLength) {
      // the caller was promised this length: a different body cannot be delivered intact (a clean
      // error while no head went out, else the response is cut)
      return this.finish(lengthMismatch(exchange.received, head.ContentLength, ""))
    }
    if (!exchange.started) {
      const failure = startResponse(exchange.front, exchange.method, head)
      if (failure !== undefined) return this.finish(failure)
      exchange.started = true
    }
    if (!exchange.uploaded) return this.finish(unfinishedUpload())
    const problem = exchange.front.end(undefined)
    this.finish(problem === undefined ? undefined : new WspProxyError({ reason: "BadResponseHead", message: problem }))
  }

  /**
   * Carries one exchange: its head (`headText`, already encoded), then the caller's body as one
   * fragmented binary message; the response goes to `front` as it arrives. With a `responseTimeout`
   * (ms, 0 for none), the exchange fails with `ResponseTimeout` when no response head has arrived that
   * long after the head or the latest part of the body went out. `done` is called once, with the
   * failure if there was one (the connection is then closed). Returns a canceller.
   */
  exchangeOver(
    front: ExchangeFront,
    headText: string,
    maxBody: number,
    responseTimeout: number,
    done: (error: WspProxyError | undefined) => void
  ): () => void {
    const endpoint = this.endpoint
    const exchange: Exchange = {
      front,
      method: front.request.method,
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
    front.onGone(() => fail("CallerGone", "caller went away"))
    front.onDrain(() => this.onCallerDrained(exchange))
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
    const cancel = () => {
      clearTimeout(exchange.responseTimer)
      if (current()) {
        this.exchange = undefined
        this.endpoint.terminate()
      }
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
        front.resumeBody()
      }
    }
    if (!front.request.hasBody) {
      // no body follows the head: the body message is empty
      exchange.uploaded = true
      endpoint.sendFragment(Buffer.alloc(0), true, onSent)
      return cancel
    }
    front.readBody((chunk) => {
      if (!current()) return true
      sent += chunk.length
      if (sent > maxBody) {
        fail("BodyTooLarge", `request body exceeds ${maxBody} bytes`)
        return false
      }
      // a view of the front door's read, which is this exchange's to keep
      if (held !== undefined) endpoint.sendFragment(held, false, onSent)
      held = chunk
      if (!flushing) {
        flushing = true
        setImmediate(flush)
      }
      if (endpoint.bufferedAmount >= uploadHighWater) {
        paused = true
        return false
      }
      return true
    }, () => {
      if (!current()) return
      exchange.uploaded = true
      endpoint.sendFragment(held ?? Buffer.alloc(0), true, onSent)
      held = undefined
    })
    return cancel
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

const NO_NAMES: ReadonlySet<string> = new Set()
const CONTENT_LENGTH: ReadonlySet<string> = new Set(["content-length"])

const unfinishedUpload = () =>
  new WspProxyError({ reason: "UnfinishedUpload", message: "response arrived before the request body was sent" })

/**
 * Sends a streamed response's status and headers to the front: the head's `Content-Length` when it
 * states one (checked against the body at its end), else the front door frames the body itself.
 */
const startResponse = (front: ExchangeFront, method: string, head: WspResponseHead): WspProxyError | undefined => {
  if (front.isAnswered() || front.isGone()) return undefined
  const noBody = bodyless(method, head.StatusCode)
  const problem = framingProblem(head, noBody, undefined)
  if (problem !== undefined) return problem
  const header = withoutHopByHop(head.Header, noBody ? NO_NAMES : CONTENT_LENGTH)
  const fields: Array<string> = []
  for (const [name, values] of Object.entries(header)) for (const value of values) fields.push(name, value)
  if (!noBody && head.ContentLength >= 0) fields.push("Content-Length", String(head.ContentLength))
  const refused = front.respond(head.StatusCode, fields, noBody)
  return refused === undefined
    ? undefined
    : new WspProxyError({ reason: "BadResponseHead", message: `Unable to write response headers : ${refused}` })
}

/** Response heads keep their own length only where no body is sent. */
const bodyless = (method: string, status: number): boolean => method === "HEAD" || status === 204 || status === 304
