/**
 * One client connection's exchange with an upstream reached by messages (`MessageUpstream`: an HTTP/2
 * stream of a reverse-HTTP/2 backend): the engine is the `ExchangeFront`. The request body goes on
 * decoded from its HTTP/1.1 framing (chunk data as views of the client's reads, trailers as fields), with
 * backpressure both ways; the response head is written with the framing the engine chooses (its length,
 * else chunked, else to the close for HTTP/1.0), the body follows, and the connection goes on to its
 * next request. An `Upgrade` gives the client connection to the upstream with the bytes read past the
 * head. Limits, the client-limit rates and the exchange's observation are the engine's, as for byte
 * upstreams.
 */
import { Buffer } from "node:buffer"
import { STATUS_CODES } from "node:http"
import type { Duplex } from "node:stream"
import { lastChunkBytes, messageResponseHeadBytes, trailerFields, unwritableField } from "../../../domain/Http1Heads.ts"
import type { RequestHead } from "../../../domain/Http1Parser.ts"
import { contentLengthValues, declaredContentLength } from "../../../domain/ContentLength.ts"
import { headerValue } from "../../../domain/HttpHeaders.ts"
import type { ExchangeFront, ExchangeRequest, MessageUpstream } from "../Exchange.ts"
import { teAcceptsTrailers } from "../Http2Upstream.ts"
import type { Http1Outgoing } from "./Admission.ts"
import { EXCHANGE } from "./ConnectionState.ts"
import { WRITE_QUEUE_PAUSE_BYTES } from "./Constants.ts"
import { RequestSide } from "./RequestSide.ts"

const CRLF = Buffer.from("\r\n", "latin1")

/** The state of one message exchange, as the engine's side of it. */
class MessageExchange {
  onData: ((chunk: Buffer) => boolean) | undefined = undefined
  onEnd: ((trailers: ReadonlyArray<string> | undefined) => void) | undefined = undefined
  /** The upstream asked for no more body until `resumeBody`. */
  bodyPaused = false
  /** The response is framed with chunked coding. */
  chunked = false
  /** No body goes to the client whatever the upstream sends (HEAD, 204, 304). */
  bodyless = false
  over = false
  readonly gone: Array<() => void> = []
  readonly drained: Array<() => void> = []

  /** The exchange ends other than by a complete response: tell the upstream, once. */
  leave(): void {
    if (this.over) return
    this.over = true
    for (const listener of this.gone.splice(0)) listener()
  }
}

/** Fields that are not to go upstream with an `Upgrade` carried as messages (the upstream frames its own). */
const withoutUpgradeFields = (headers: ReadonlyArray<string>): Array<string> => {
  const out: Array<string> = []
  for (let i = 0; i < headers.length; i += 2) {
    const lower = headers[i]!.toLowerCase()
    if (lower !== "connection" && lower !== "upgrade") out.push(headers[i]!, headers[i + 1]!)
  }
  return out
}

export abstract class MessageSide extends RequestSide {
  /** The message exchange in progress, if the upstream is reached by messages. */
  protected message: MessageExchange | undefined = undefined

  /** Starts an exchange admitted to `upstream` (the engine's phase, timers and counters already set). */
  protected startMessage(upstream: MessageUpstream, out: Http1Outgoing, request: RequestHead, upgrading: boolean): void {
    const remote = this.socket as Duplex & { encrypted?: boolean }
    const exchangeRequest: ExchangeRequest = {
      method: out.method,
      path: out.path,
      scheme: remote.encrypted === true ? "https" : "http",
      authority: request.host,
      headers: upgrading ? withoutUpgradeFields(out.headers) : out.headers,
      acceptsTrailers: teAcceptsTrailers(headerValue(request.headers, "te")),
      hasBody: !this.requestDone,
      target: request.target
    }
    if (upgrading) {
      this.giveUpgrade(upstream, exchangeRequest, request)
      return
    }
    const m = new MessageExchange()
    this.message = m
    this.phase = EXCHANGE
    if (!this.requestDone) this.startBodyClock()
    // nothing else is expected before the exchange ends: read on, so a client leaving is noticed
    else if (this.pending === undefined) this.socket.resume()
    upstream.exchange(this.frontOf(m, exchangeRequest))
  }

  /** The client connection becomes the upstream's: its `101`, then a raw pipe (see `MessageUpstream.upgrade`). */
  private giveUpgrade(upstream: MessageUpstream, exchangeRequest: ExchangeRequest, request: RequestHead): void {
    const socket = this.detach()
    const protocol = (request.upgrade ?? "").split(",")[0]!.trim().toLowerCase()
    if (this.observer !== undefined) {
      this.status = 101
      this.observed("Upgraded")
    }
    // The decision's hold (a backend lease) lasts as long as the connection.
    const onEnd = this.onEnd
    this.onEnd = undefined
    if (onEnd !== undefined) socket.once("close", onEnd)
    const pending = this.pending
    this.pending = undefined
    this.resetExchange()
    upstream.upgrade(exchangeRequest, protocol, socket, pending ?? Buffer.alloc(0))
    socket.resume()
  }

  /** The request body as the upstream reads it: chunk data and lengths framed bytes alike, as views. */
  protected feedMessageBody(chunk: Buffer, from: number): void {
    const m = this.message!
    const framer = this.requestFramer!
    if (m.onData === undefined) {
      // the upstream has not started reading (it waits for room): keep the bytes, bounded, and stop reading
      this.hold(from === 0 ? chunk : chunk.subarray(from))
      return
    }
    let flowing = true
    const onData = m.onData
    const n = framer.consume(chunk, from, (start, end) => {
      if (!onData(chunk.subarray(start, end))) flowing = false
    })
    if (typeof n !== "number") {
      this.abandon(n.status, `switchyard: ${n.message}`)
      return
    }
    this.receivedBytes += n
    if (!framer.isChunked && framer.forwardable > 0) {
      const f = framer.forwardable
      if (!onData(from === 0 && f === chunk.length ? chunk : chunk.subarray(from, from + f))) flowing = false
    }
    if (framer.done) {
      this.requestDone = true
      this.bodyTimed = false
      this.clearClientTimer()
      const restAt = from + n
      m.onEnd?.(framer.trailers === undefined ? undefined : trailerFields(framer.trailers))
      if (restAt < chunk.length) this.hold(chunk.subarray(restAt))
      return
    }
    if (!flowing) {
      m.bodyPaused = true
      this.pauseBodyClock()
      this.socket.pause()
    }
  }

  /** What the upstream of `m` sees of this connection. */
  private frontOf(m: MessageExchange, request: ExchangeRequest): ExchangeFront {
    return {
      request,
      readBody: (onData, onEnd) => {
        m.onData = onData
        m.onEnd = onEnd
        if (m.over || this.message !== m) return
        if (this.requestDone) return
        m.bodyPaused = false
        const pending = this.pending
        this.pending = undefined
        if (pending !== undefined) this.feedMessageBody(pending, 0)
        if (this.message === m && !m.bodyPaused && this.pending === undefined) this.socket.resume()
      },
      resumeBody: () => {
        if (m.over || this.message !== m || !m.bodyPaused || this.requestDone) return
        m.bodyPaused = false
        this.resumeBodyClock()
        this.socket.resume()
      },
      respond: (status, headers, bodyless) => this.messageHead(m, status, headers, bodyless),
      write: (chunk, written) => this.messageData(m, chunk, written),
      onDrain: (listener) => {
        if (!m.over) m.drained.push(listener)
      },
      end: (trailers) => this.messageEnd(m, trailers),
      fail: (status, message) => {
        if (m.over || this.message !== m) return
        if (this.responseHeadSent) this.destroy()
        else this.fail(status, message)
      },
      abort: () => {
        if (m.over || this.message !== m) return
        // what was relayed goes out (a head written this turn is still corked), then the connection is cut
        this.socket.uncork()
        this.destroy()
      },
      onGone: (listener) => {
        if (!m.over) m.gone.push(listener)
      },
      isGone: () => m.over,
      isAnswered: () => this.responseHeadSent && this.message === m
    }
  }

  private messageHead(m: MessageExchange, status: number, headers: ReadonlyArray<string>, bodyless: boolean): string | undefined {
    if (m.over || this.message !== m || this.responseHeadSent) return undefined
    if (!Number.isInteger(status) || status < 200 || status > 999) return `status ${status} as a final response`
    const unwritable = unwritableField(headers)
    if (unwritable !== undefined) return unwritable
    const request = this.request!
    m.bodyless = bodyless
    let chunked = false
    if (!bodyless) {
      const length = declaredContentLength(contentLengthValues(headers))
      if (typeof length === "object") return length.message
      if (length === undefined) {
        // without a length: chunked for an HTTP/1.1 client, to the close for an HTTP/1.0 one
        if (request.versionMinor === 1) chunked = true
        else this.closeAfter = true
      }
    }
    m.chunked = chunked
    // an answer before the whole request body: the connection cannot carry another request
    if (!this.requestDone) this.closeAfter = true
    const head = messageResponseHeadBytes(status, STATUS_CODES[status] ?? "Unknown", headers, chunked, this.closeAfter, this.extraHeaders)
    this.responseHeadSent = true
    this.responseStarted = true
    this.status = status
    this.sentBytes += head.length
    this.corkTurn()
    this.socket.write(head)
    return undefined
  }

  /** The socket is corked until the end of the current turn. */
  private corkedForTurn = false

  /**
   * Corks the client socket until the end of the current turn, so that what one upstream read brings
   * (an HTTP/2 read's HEADERS and DATA, a WebSocket read's body frames) leaves in one write.
   */
  private corkTurn(): void {
    if (this.corkedForTurn) return
    this.corkedForTurn = true
    this.socket.cork()
    queueMicrotask(this.uncorkTurn)
  }

  private readonly uncorkTurn = (): void => {
    this.corkedForTurn = false
    this.socket.uncork()
  }

  private messageData(m: MessageExchange, chunk: Buffer, written: (() => void) | undefined): boolean {
    if (m.over || this.message !== m || !this.responseHeadSent || m.bodyless || chunk.length === 0) {
      written?.()
      return true
    }
    const socket = this.socket
    this.corkTurn()
    let ok: boolean
    // a write's callback runs once the socket took its bytes, or failed them (the socket destroyed)
    if (m.chunked) {
      const size = Buffer.from(`${chunk.length.toString(16)}\r\n`, "latin1")
      this.sentBytes += size.length + chunk.length + 2
      socket.cork()
      socket.write(size)
      socket.write(chunk, written)
      ok = socket.write(CRLF)
      socket.uncork()
    } else {
      this.sentBytes += chunk.length
      ok = socket.write(chunk, written)
    }
    if (ok || socket.writableLength < WRITE_QUEUE_PAUSE_BYTES) return true
    this.upstreamPaused = true
    this.server.watch(this)
    return false
  }

  private messageEnd(m: MessageExchange, trailers: ReadonlyArray<string> | undefined): string | undefined {
    if (m.over || this.message !== m || !this.responseHeadSent) return undefined
    if (m.chunked) {
      const fields = trailers !== undefined && trailers.length > 0 ? trailers : undefined
      if (fields !== undefined) {
        const unwritable = unwritableField(fields)
        if (unwritable !== undefined) return unwritable
      }
      const last = lastChunkBytes(fields)
      this.sentBytes += last.length
      this.socket.write(last)
    }
    m.over = true
    m.gone.length = 0
    m.drained.length = 0
    this.message = undefined
    this.upstreamPaused = false
    this.stallSince = -1
    this.exchangeComplete()
    return undefined
  }

  /** The client took the queued response bytes: an upstream that was told to wait may go on. */
  protected messageDrained(): void {
    const m = this.message
    if (m === undefined || !this.upstreamPaused) return
    this.upstreamPaused = false
    for (const listener of m.drained) listener()
  }

  /** The exchange ends without its response: the upstream is told (its stream cancelled). */
  protected leaveMessage(): void {
    const m = this.message
    if (m === undefined) return
    this.message = undefined
    m.leave()
  }
}
