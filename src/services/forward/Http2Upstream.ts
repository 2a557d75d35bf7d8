/**
 * The HTTP/2-stream kind of upstream: one exchange (`ExchangeFront`, whatever the front door) or one
 * `Upgrade` carried on a stream of an `H2ClientConnection`: pseudo-headers built from the exchange's
 * request, bodies streamed with HTTP/2 flow control and backpressure (response bytes are granted back to
 * the backend only once the client's queue took them), trailers both ways. It picks no backend and never retries on its own: a stream the backend refused
 * before answering is handed back to the caller (`onRefused`) with the body read so far (bounded), so the
 * caller may resend it elsewhere.
 */
import { Buffer } from "node:buffer"
import { createHash } from "node:crypto"
import type { Duplex } from "node:stream"
import { ErrorCode } from "../../domain/Http2Frame.ts"
import { headerValue, relayableTrailer, responseHeaders } from "../../domain/HttpHeaders.ts"
import { type ErrorRenderer, STATUS_TEXT, writeRawError } from "./ErrorResponse.ts"
import type { ExchangeFront, ExchangeRequest } from "./Exchange.ts"
import { type H2ClientConnection, type H2ClientStream, H2ConnectionError, type H2StreamClose } from "./H2ClientConnection.ts"

const HTTP2_HEADER_METHOD = ":method"
const HTTP2_HEADER_PATH = ":path"
const HTTP2_HEADER_SCHEME = ":scheme"
const HTTP2_HEADER_AUTHORITY = ":authority"

/**
 * Bytes queued on the public socket below which relayed response bytes count as consumed at once (and
 * the backend's window is granted back); above it they are granted once the socket drains.
 */
export const PublicWriteQueueBytes = 512 * 1024

/** The extended CONNECT pseudo-header (RFC 8441 §4). */
const HTTP2_HEADER_PROTOCOL = ":protocol"
/** The GUID RFC 6455 mixes into `Sec-WebSocket-Accept`. */
export const WebSocketAcceptGuid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

/** Request headers that HTTP/2 forbids or that the pseudo-headers replace (RFC 9113 §8.2.2, §8.3.1). */
const H2_REPLACED: ReadonlySet<string> = new Set(["host", "http2-settings"])
/** Headers RFC 8441 drops when a WebSocket handshake travels as extended CONNECT. */
const WS_HANDSHAKE_ONLY: ReadonlySet<string> = new Set(["sec-websocket-key", "sec-websocket-accept"])
/** Response headers not relayed on a 101 built by the gateway. */
const NOT_ON_SWITCH: ReadonlySet<string> = new Set(["content-length", "sec-websocket-accept"])

/** One backend reached over an HTTP/2 connection, as the forwarding functions need it. */
export interface H2Target {
  readonly session: H2ClientConnection
  /** For errors and logs (e.g. `h2 127.0.0.1:50432`). */
  readonly describe: string
}

export interface H2ForwardOptions {
  /** Time allowed for the response head (ms); then 504. 0 = none. */
  readonly responseTimeoutMs: number
  /** No bytes either way for this long ends the exchange (ms). 0 = none. */
  readonly idleTimeoutMs: number
  readonly errors: ErrorRenderer
  /** Called with a one-line description of each upstream failure. */
  readonly onError: (message: string) => void
  /**
   * Also called, with the same description, when the failure is the backend breaking the protocol on
   * the stream (a malformed response head, a body disagreeing with its content-length): for counting.
   */
  readonly onViolation?: ((message: string) => void) | undefined
  /** Called once when the exchange is over, whatever the outcome (stream slots, counters). */
  readonly onDone: () => void
  /**
   * The backend refused the stream before answering (REFUSED_STREAM, or beyond its GOAWAY): nothing was
   * processed, and the body read so far is in `replay` (at most `MaxReplayBodyBytes`; beyond that the
   * request cannot be resent and this is not called). Return true to take the request over, e.g. by
   * calling `forwardToH2` again on another connection with `replay`.
   */
  readonly onRefused?: ((replay: RequestReplay) => boolean) | undefined
}

/** Most request-body bytes kept, until the response head arrives, to resend a refused request. */
export const MaxReplayBodyBytes = 64 * 1024

/** What a refused attempt had read of the public request, for the next attempt to send first. */
export interface RequestReplay {
  /** Body chunks read from the public request so far, in order (a chunk arriving meanwhile is added). */
  readonly chunks: Array<Buffer>
  /** Whether the public request's body has ended. */
  ended: boolean
  /** The request's trailers, when it ended with some. */
  trailers: ReadonlyArray<string> | undefined
}

/** Lower-cased request headers for HTTP/2, with the pseudo-headers first (RFC 9113 §8.3.1). */
export const h2RequestHeaders = (request: ExchangeRequest, method: string, extendedConnectProtocol: string | undefined): Array<string> => {
  const out: Array<string> = [
    HTTP2_HEADER_METHOD,
    method,
    HTTP2_HEADER_PATH,
    request.path,
    HTTP2_HEADER_SCHEME,
    request.scheme,
    HTTP2_HEADER_AUTHORITY,
    request.authority ?? "localhost"
  ]
  if (extendedConnectProtocol !== undefined) out.push(HTTP2_HEADER_PROTOCOL, extendedConnectProtocol)
  const flat = request.headers
  for (let i = 0; i < flat.length; i += 2) {
    const lower = flat[i]!.toLowerCase()
    if (H2_REPLACED.has(lower)) continue
    if (extendedConnectProtocol !== undefined && WS_HANDSHAKE_ONLY.has(lower)) continue
    out.push(lower, flat[i + 1]!)
  }
  // `TE: trailers` is the one TE value HTTP/2 carries; gRPC servers look for it
  if (request.acceptsTrailers) out.push("te", "trailers")
  return out
}

/** Whether a `TE` field value lists `trailers` (RFC 9110 §10.1.4). */
export const teAcceptsTrailers = (te: string | undefined): boolean =>
  te !== undefined && /(?:^|,)\s*trailers\s*(?:;|,|$)/i.test(te)

/** HTTP/1.1 response headers from an HTTP/2 raw list: pseudo-headers and hop-by-hop headers removed. */
export const h1ResponseHeaders = (raw: ReadonlyArray<string>): Array<string> => {
  const plain: Array<string> = []
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.charCodeAt(0) !== 58 /* : */) plain.push(raw[i]!, raw[i + 1]!)
  }
  return responseHeaders(plain)
}

/**
 * Trailer fields for HTTP/2, flat `[name, value, ...]`: lower-cased; hop-by-hop, pseudo and forbidden
 * trailer fields (`relayableTrailer`) dropped.
 */
export const h2Trailers = (raw: ReadonlyArray<string>): Array<string> => {
  const out: Array<string> = []
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!.toLowerCase()
    if (name.charCodeAt(0) === 58 || !relayableTrailer(name)) continue
    out.push(name, raw[i + 1]!)
  }
  return out
}

/** Whether a connection refused a new stream without sending anything (another connection may take it). */
const openRefused = (error: H2ConnectionError): boolean =>
  error.reason === "Closed" || error.reason === "GoingAway" || error.reason === "NoStreamSlot"

/** Ends a stream that is still open (CANCEL), unless it is completing on its own. */
const cancel = (stream: H2ClientStream): void => {
  if (!stream.closed && !(stream.localEnded && stream.remoteEnded)) stream.reset(ErrorCode.CANCEL)
}

/** Whether a response to `method` with `status` has no body whatever its head says (RFC 9110 §6.4.1). */
const bodylessResponse = (method: string, status: number): boolean => method === "HEAD" || status === 204 || status === 304

/**
 * Forwards the request of `front` onto a new stream of `target`. The response (or a 502/504, or an
 * aborted response when the stream breaks after its head) goes to the front; the client leaving resets
 * the stream (CANCEL).
 */
export const forwardToH2 = (target: H2Target, front: ExchangeFront, options: H2ForwardOptions, replay?: RequestReplay): void => {
  const request = front.request
  const method = request.method
  const withBody = request.hasBody
  let phase: "head" | "body" | "done" = "head"
  // the body read so far, kept while a refusal could still ask for it again (until the response head)
  let kept: Array<Buffer> | undefined = replay === undefined ? [] : [...replay.chunks]
  let keptBytes = 0
  for (const chunk of kept) keptBytes += chunk.length
  let bodyEnded = replay?.ended ?? !withBody
  let requestTrailers = replay?.trailers
  let trailers: ReadonlyArray<string> | undefined
  // what a refusal handed back for the next attempt: body bytes still arriving go there
  let handedOver: RequestReplay | undefined
  // response bytes written to the client but not yet granted back (waiting for its drain)
  let owed = 0
  let timer: NodeJS.Timeout | undefined

  const finish = () => {
    if (phase === "done") return
    phase = "done"
    kept = undefined
    if (timer !== undefined) clearTimeout(timer)
    timer = undefined
    cancel(stream)
    options.onDone()
  }
  const onDrain = () => {
    if (owed > 0) {
      const n = owed
      owed = 0
      stream.consumed(n)
    }
  }
  // `finish` comes before what is told to the front: the stream is then cancelled as this exchange's
  // end, not read as a reset of a live response
  const onTimeout = () => {
    timer = undefined
    const answered = phase !== "head"
    finish()
    if (!answered) {
      options.onError(`backend ${target.describe} did not answer in time: ${method} ${request.target}`)
      front.fail(504, `switchyard: backend ${target.describe} timed out before answering`)
    } else {
      options.onError(`backend ${target.describe} was idle too long: ${method} ${request.target}`)
      front.abort()
    }
  }

  const opened = target.session.request(h2RequestHeaders(request, method, undefined), !withBody, {
    response: (status, headers) => {
      if (phase !== "head") return
      phase = "body"
      // answered: a refusal can no longer happen, the kept body is not needed
      kept = undefined
      if (timer !== undefined) clearTimeout(timer)
      timer = options.idleTimeoutMs > 0 ? setTimeout(onTimeout, options.idleTimeoutMs) : undefined
      const bodyless = bodylessResponse(method, status)
      const refused = front.respond(status, h1ResponseHeaders(headers), bodyless)
      if (refused !== undefined) {
        // a head HTTP/1.1 cannot carry (control characters HTTP/2 lets through, an odd status)
        finish()
        options.onError(`backend ${target.describe} sent a response head that cannot be relayed: ${refused}`)
        front.fail(502, `switchyard: backend ${target.describe} sent an invalid response head (${refused})`)
      }
      // a length is one valid value and the body matches it, or the connection resets the stream before
      // handing on a byte that disagrees (the response is then aborted, below in `close`)
    },
    data: (chunk, release) => {
      if (phase !== "body") return
      timer?.refresh()
      // a slow client: the bytes are granted back once its queue drains, which holds the backend. The
      // read goes back once the front door wrote the chunk out
      if (front.write(chunk, release)) stream.consumed(chunk.length, true)
      else owed += chunk.length
    },
    dataMany: (chunks, bytes, release) => {
      if (phase !== "body") return
      timer?.refresh()
      let flowing = true
      const last = chunks.length - 1
      // the front door writes them in order: the last one written means all were
      for (let i = 0; i <= last; i++) flowing = front.write(chunks[i]!, i === last ? release : undefined)
      if (flowing) stream.consumed(bytes, true)
      else owed += bytes
    },
    trailers: (fields) => {
      trailers = fields
    },
    end: () => {
      if (phase !== "body") return
      const refused = front.end(trailers === undefined ? undefined : h2Trailers(trailers))
      finish()
      if (refused !== undefined) {
        // trailers HTTP/1.1 cannot carry: the response cannot be completed faithfully
        options.onError(`backend ${target.describe} sent invalid trailers: ${refused}`)
        front.abort()
      }
    },
    close: (info: H2StreamClose) => {
      if (phase === "done") return
      if (phase === "head") {
        const again: RequestReplay | undefined = kept === undefined ? undefined : { chunks: kept, ended: bodyEnded, trailers: requestTrailers }
        if (again !== undefined && !front.isGone() && info.refused && options.onRefused !== undefined) {
          handedOver = again
          finish()
          // nothing was processed: the caller may take the request over (a retry on another connection)
          if (options.onRefused(again)) return
        }
        if (!front.isAnswered() && !front.isGone()) {
          const why = info.reason ?? "stream closed"
          if (info.violation === true) {
            const message = `backend ${target.describe} sent a malformed response: ${why}`
            options.onError(message)
            options.onViolation?.(message)
            front.fail(502, `switchyard: backend ${target.describe} sent an invalid response (${why})`)
          } else {
            options.onError(`backend ${target.describe} failed before answering: ${why}`)
            front.fail(502, `switchyard: backend ${target.describe} unreachable (${why})`)
          }
        }
      } else {
        // broken after the head (a reset, or a body disagreeing with its length): the client must see an
        // aborted response and a closed connection, never a short or long one on a kept-alive connection
        const what = info.violation === true ? "sent a malformed response" : "broke a response"
        const message = `backend ${target.describe} ${what}: ${info.reason ?? "stream closed"}`
        options.onError(message)
        if (info.violation === true) options.onViolation?.(message)
        front.abort()
      }
      finish()
    },
    writable: () => front.resumeBody()
  })
  if (opened instanceof H2ConnectionError) {
    phase = "done"
    options.onDone()
    // nothing was sent: another connection may take it
    const again: RequestReplay = replay ?? { chunks: [], ended: !withBody, trailers: undefined }
    if (openRefused(opened) && options.onRefused?.(again) === true) return
    options.onError(`backend ${target.describe} refused a request: ${opened.message}`)
    front.fail(502, `switchyard: backend ${target.describe} unreachable (${opened.message})`)
    return
  }
  const stream: H2ClientStream = opened
  if (options.responseTimeoutMs > 0) timer = setTimeout(onTimeout, options.responseTimeoutMs)
  front.onDrain(onDrain)
  // The client went away, or the front door ended the exchange, before it finished: cancel the stream.
  front.onGone(finish)
  if (!withBody) return
  // a resent request first sends what the refused attempt had read
  if (replay !== undefined) for (const chunk of replay.chunks) stream.write(chunk)
  const onBodyEnd = (fields: ReadonlyArray<string> | undefined) => {
    if (phase === "done") {
      if (handedOver !== undefined) {
        handedOver.ended = true
        handedOver.trailers = fields
      }
      return
    }
    bodyEnded = true
    requestTrailers = fields
    stream.end(fields !== undefined && fields.length > 0 ? h2Trailers(fields) : undefined)
  }
  if (bodyEnded) {
    onBodyEnd(requestTrailers)
    return
  }
  front.readBody((chunk) => {
    if (phase === "done") {
      // refused: the chunk waits for the next attempt, and no more come until it starts
      if (handedOver !== undefined && !handedOver.ended) handedOver.chunks.push(chunk)
      return false
    }
    if (kept !== undefined) {
      if (keptBytes + chunk.length <= MaxReplayBodyBytes) {
        kept.push(chunk)
        keptBytes += chunk.length
      } else {
        kept = undefined
      }
    }
    return stream.write(chunk)
  }, onBodyEnd)
}

/** `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2). */
export const webSocketAccept = (key: string): string => createHash("sha1").update(key + WebSocketAcceptGuid).digest("base64")

/**
 * Carries an HTTP/1.1 `Upgrade` request as RFC 8441 extended CONNECT: the backend's 2xx becomes a 101 for
 * the client (with `Sec-WebSocket-Accept` computed here for WebSocket), then bytes flow both ways with
 * half-close. The caller checks that the backend advertised `SETTINGS_ENABLE_CONNECT_PROTOCOL` first.
 */
export const upgradeToH2 = (
  target: H2Target,
  request: ExchangeRequest,
  protocol: string,
  socket: Duplex,
  head: Buffer,
  options: H2ForwardOptions
): void => {
  let answered = false
  let tunnel = false
  let done = false
  let owed = 0
  let timer: NodeJS.Timeout | undefined
  const finish = () => {
    if (done) return
    done = true
    if (timer !== undefined) clearTimeout(timer)
    timer = undefined
    socket.off("data", onSocketData)
    socket.off("end", onSocketEnd)
    socket.off("drain", onDrain)
    options.onDone()
  }
  const onDrain = () => {
    if (owed > 0) {
      const n = owed
      owed = 0
      stream.consumed(n)
    }
  }
  const onSocketData = (chunk: Buffer) => {
    timer?.refresh()
    if (!stream.write(chunk)) socket.pause()
  }
  const onSocketEnd = () => stream.end()
  const opened = target.session.request(h2RequestHeaders(request, "CONNECT", protocol), false, {
    response: (status, headers) => {
      answered = true
      if (timer !== undefined) clearTimeout(timer)
      timer = undefined
      const relayed = h1ResponseHeaders(headers)
      if (status < 200 || status > 299) {
        // declined: relay the ordinary answer and close
        let text = `HTTP/1.1 ${status} ${STATUS_TEXT[status] ?? "Declined"}\r\n`
        for (let i = 0; i < relayed.length; i += 2) text += `${relayed[i]}: ${relayed[i + 1]}\r\n`
        socket.write(text + "Connection: close\r\n\r\n")
        tunnel = true
        return
      }
      if (options.idleTimeoutMs > 0) {
        timer = setTimeout(() => {
          timer = undefined
          options.onError(`tunnel to ${target.describe} idle too long: ${request.target}`)
          cancel(stream)
          socket.destroy()
        }, options.idleTimeoutMs)
      }
      let text = `HTTP/1.1 101 Switching Protocols\r\nUpgrade: ${protocol}\r\nConnection: Upgrade\r\n`
      const key = headerValue(request.headers, "sec-websocket-key")
      if (protocol === "websocket" && key !== undefined) text += `Sec-WebSocket-Accept: ${webSocketAccept(key.trim())}\r\n`
      for (let i = 0; i < relayed.length; i += 2) {
        if (!NOT_ON_SWITCH.has(relayed[i]!.toLowerCase())) text += `${relayed[i]}: ${relayed[i + 1]}\r\n`
      }
      socket.write(text + "\r\n")
      tunnel = true
      if (head.length > 0) stream.write(head)
      // half-close carries over both ways: the client's end ends the stream, the stream's end the socket
      socket.on("data", onSocketData)
      socket.on("end", onSocketEnd)
      socket.on("drain", onDrain)
      socket.resume()
    },
    data: (chunk, release) => {
      if (!tunnel) return false
      timer?.refresh()
      const s = socket as Duplex & { writableLength: number }
      if (socket.write(chunk, () => release()) || s.writableLength < PublicWriteQueueBytes) stream.consumed(chunk.length, true)
      else owed += chunk.length
      return s.writableLength > 0
    },
    trailers: () => {},
    end: () => {
      if (tunnel) socket.end()
    },
    close: (info) => {
      if (!answered) {
        answered = true
        writeRawError(socket, options.errors, 502, `switchyard: backend ${target.describe} unreachable (${info.reason ?? "stream closed"})`)
      } else if (info.code !== ErrorCode.NO_ERROR && !socket.writableFinished) {
        socket.destroy()
      }
      finish()
    },
    writable: () => socket.resume()
  })
  if (opened instanceof H2ConnectionError) {
    writeRawError(socket, options.errors, 502, `switchyard: backend ${target.describe} unreachable (${opened.message})`)
    options.onDone()
    return
  }
  const stream: H2ClientStream = opened
  if (options.responseTimeoutMs > 0) {
    timer = setTimeout(() => {
      timer = undefined
      if (answered) return
      answered = true
      writeRawError(socket, options.errors, 504, `switchyard: backend ${target.describe} timed out before answering`)
      cancel(stream)
    }, options.responseTimeoutMs)
  }
  socket.on("error", () => socket.destroy())
  socket.on("close", () => {
    cancel(stream)
    finish()
  })
}
