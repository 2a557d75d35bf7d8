/**
 * One connection a wsp client registered with the wsp server: it carries one `/request` exchange at a
 * time, sending the request head as a text message and the caller's body as one fragmented binary
 * message, and relaying the response head and body back to the caller as they arrive, frame by frame.
 * It bounds what an idle connection may send, and drops itself on any violation of the exchange.
 */
import type * as http from "node:http"
import type * as net from "node:net"
import { Schema } from "effect"
import { contentLengthValues, declaredContentLength, isInvalidContentLength } from "../../domain/ContentLength.ts"
import type { WspHeadLimits, WspResponseHead } from "../../domain/WspMessage.ts"
import { decodeResponseHead, WspMessageError, withoutHopByHop } from "../../domain/WspMessage.ts"
import type { WebSocketEndpoint } from "../transport/WebSocketEndpoint.ts"

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

const NO_NAMES: ReadonlySet<string> = new Set()
const CONTENT_LENGTH: ReadonlySet<string> = new Set(["content-length"])

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
  const header = withoutHopByHop(head.Header, noBody ? NO_NAMES : CONTENT_LENGTH)
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
