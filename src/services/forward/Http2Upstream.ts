/**
 * Forwards one public HTTP/1.1 request (or `Upgrade`) onto a stream of a `ClientHttp2Session`: headers
 * converted both ways with the core's hop-by-hop rules, bodies streamed with HTTP/2 flow control and
 * backpressure, trailers both ways. It picks no backend and never retries on its own: a stream the
 * backend refused before answering is handed back to the caller (`onRefused`) with the body read so far
 * (bounded), so the caller may resend it elsewhere.
 */
import { createHash } from "node:crypto"
import type * as http from "node:http"
import * as http2 from "node:http2"
import type { Duplex } from "node:stream"
import { type ForwardedMode, HOP_BY_HOP, headerValue, requestHeaders, responseHeaders } from "../../domain/HttpHeaders.ts"
import { type ErrorRenderer, STATUS_TEXT, sendError, writeRawError } from "./ErrorResponse.ts"

const {
  NGHTTP2_CANCEL,
  NGHTTP2_REFUSED_STREAM,
  HTTP2_HEADER_METHOD,
  HTTP2_HEADER_PATH,
  HTTP2_HEADER_SCHEME,
  HTTP2_HEADER_AUTHORITY,
  HTTP2_HEADER_STATUS
} = http2.constants

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

/** One backend reached over an HTTP/2 session, as the forwarding functions need it. */
export interface H2Target {
  readonly session: http2.ClientHttp2Session
  /** For errors and logs (e.g. `h2 127.0.0.1:50432`). */
  readonly describe: string
}

export interface H2ForwardOptions {
  readonly forwardedMode: ForwardedMode
  /** Time allowed for the response head (ms); then 504. 0 = none. */
  readonly responseTimeoutMs: number
  /** No bytes either way for this long ends the exchange (ms). 0 = none. */
  readonly idleTimeoutMs: number
  readonly errors: ErrorRenderer
  /** Called with a one-line description of each upstream failure. */
  readonly onError: (message: string) => void
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
  /** Body chunks read from the public request so far, in order. */
  readonly chunks: ReadonlyArray<Buffer>
  /** Whether the public request's body has ended (its trailers are then in `req.rawTrailers`). */
  readonly ended: boolean
}

/** Lower-cased, hop-by-hop free request headers for HTTP/2, with the pseudo-headers first. */
export const h2RequestHeaders = (
  req: http.IncomingMessage,
  method: string,
  forwardedMode: ForwardedMode,
  extendedConnectProtocol: string | undefined
): Array<string> => {
  const socket = req.socket as Duplex & { remoteAddress?: string; encrypted?: boolean }
  const scheme = socket.encrypted ? "https" : "http"
  const authority = req.headers.host ?? "localhost"
  const flat = requestHeaders(
    req.rawHeaders,
    false,
    forwardedMode,
    forwardedMode === "off" ? undefined : { clientAddress: socket.remoteAddress, proto: scheme, host: req.headers.host }
  )
  const out: Array<string> = [HTTP2_HEADER_METHOD, method, HTTP2_HEADER_PATH, req.url ?? "/", HTTP2_HEADER_SCHEME, scheme, HTTP2_HEADER_AUTHORITY, authority]
  if (extendedConnectProtocol !== undefined) out.push(HTTP2_HEADER_PROTOCOL, extendedConnectProtocol)
  for (let i = 0; i < flat.length; i += 2) {
    const lower = flat[i]!.toLowerCase()
    if (H2_REPLACED.has(lower)) continue
    if (extendedConnectProtocol !== undefined && WS_HANDSHAKE_ONLY.has(lower)) continue
    out.push(lower, flat[i + 1]!)
  }
  // `TE: trailers` is the one TE value HTTP/2 carries; gRPC servers look for it
  const te = headerValue(req.rawHeaders, "te")
  if (te !== undefined && /(?:^|,)\s*trailers\s*(?:;|,|$)/i.test(te)) out.push("te", "trailers")
  return out
}

/** HTTP/1.1 response headers from an HTTP/2 raw list: pseudo-headers and hop-by-hop headers removed. */
export const h1ResponseHeaders = (raw: ReadonlyArray<string>): Array<string> => {
  const plain: Array<string> = []
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.charCodeAt(0) !== 58 /* : */) plain.push(raw[i]!, raw[i + 1]!)
  }
  return responseHeaders(plain)
}

/** Trailer fields as an HTTP/2 header object: lower-cased, hop-by-hop and pseudo fields dropped. */
export const h2Trailers = (raw: ReadonlyArray<string>): http2.OutgoingHttpHeaders => {
  const out: Record<string, string | Array<string>> = Object.create(null)
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!.toLowerCase()
    if (HOP_BY_HOP.has(name) || name.charCodeAt(0) === 58) continue
    const previous = out[name]
    if (previous === undefined) out[name] = raw[i + 1]!
    else if (Array.isArray(previous)) previous.push(raw[i + 1]!)
    else out[name] = [previous, raw[i + 1]!]
  }
  return out
}

/** HTTP/2 trailers (as received) as `[name, value]` pairs for `res.addTrailers`. */
const h1Trailers = (trailers: http2.IncomingHttpHeaders): Array<[string, string]> => {
  const out: Array<[string, string]> = []
  for (const name of Object.keys(trailers)) {
    if (name.charCodeAt(0) === 58 || HOP_BY_HOP.has(name)) continue
    const value = trailers[name]
    if (Array.isArray(value)) for (const v of value) out.push([name, v])
    else if (value !== undefined) out.push([name, String(value)])
  }
  return out
}

/** Whether the public request has a body to stream: a request without a length or coding has none (RFC 9112 §6.3). */
const hasBody = (req: http.IncomingMessage): boolean => {
  if (req.headers["transfer-encoding"] !== undefined) return true
  const length = req.headers["content-length"]
  return length !== undefined && length !== "0"
}

const describeStreamFailure = (stream: http2.ClientHttp2Stream, error: (Error & { code?: string }) | undefined): string => {
  if (error !== undefined) return error.code ?? error.message
  return stream.rstCode !== undefined && stream.rstCode !== 0 ? `stream reset (code ${stream.rstCode})` : "stream closed"
}

/** True when the backend refused the stream without processing it (RFC 9113 §8.7). */
const wasRefused = (stream: http2.ClientHttp2Stream, error: (Error & { code?: string }) | undefined): boolean =>
  stream.rstCode === NGHTTP2_REFUSED_STREAM || error?.code === "ERR_HTTP2_GOAWAY_SESSION"

/**
 * Forwards `req` onto a new stream of `target`. The response (or a 502/504, or an aborted response when
 * the stream breaks after its head) goes to `res`; the public client leaving resets the stream (CANCEL).
 */
export const forwardToH2 = (
  target: H2Target,
  req: http.IncomingMessage,
  res: http.ServerResponse,
  options: H2ForwardOptions,
  replay?: RequestReplay
): void => {
  const method = req.method ?? "GET"
  const te = req.headers["transfer-encoding"]
  if (te !== undefined && te.trim().toLowerCase() !== "chunked") {
    sendError(res, options.errors, 501, `switchyard: unsupported Transfer-Encoding "${te}"`)
    options.onDone()
    return
  }
  const withBody = hasBody(req)
  const chunked = te !== undefined
  let stream: http2.ClientHttp2Stream
  try {
    stream = target.session.request(h2RequestHeaders(req, method, options.forwardedMode, undefined), {
      endStream: !withBody,
      waitForTrailers: chunked
    })
  } catch (error) {
    const code = (error as Error & { code?: string }).code
    const text = code ?? (error as Error).message
    options.onDone()
    // the session was already gone or going away: nothing was sent, another connection may take it
    const again: RequestReplay = replay ?? { chunks: [], ended: !withBody }
    if ((code === "ERR_HTTP2_INVALID_SESSION" || code === "ERR_HTTP2_GOAWAY_SESSION") && options.onRefused?.(again) === true) return
    options.onError(`backend ${target.describe} refused a request: ${text}`)
    sendError(res, options.errors, 502, `switchyard: backend ${target.describe} unreachable (${text})`)
    return
  }
  let phase: "head" | "body" | "done" = "head"
  // the body read so far, kept while a refusal could still ask for it again (until the response head)
  let kept: Array<Buffer> | undefined = replay === undefined ? [] : [...replay.chunks]
  let keptBytes = 0
  for (const chunk of kept) keptBytes += chunk.length
  let bodyEnded = replay?.ended ?? !withBody
  let failure: (Error & { code?: string }) | undefined
  let trailers: http2.IncomingHttpHeaders | undefined
  // a declared response length (-1 when none), checked against what arrived
  let expected = -1
  let received = 0

  const finish = () => {
    if (phase === "done") return
    phase = "done"
    kept = undefined
    req.off("data", onBodyData)
    req.off("end", onBodyEnd)
    options.onDone()
  }
  const onBodyData = (chunk: Buffer) => {
    if (kept !== undefined) {
      if (keptBytes + chunk.length <= MaxReplayBodyBytes) {
        kept.push(chunk)
        keptBytes += chunk.length
      } else {
        kept = undefined
      }
    }
    if (!stream.write(chunk)) req.pause()
  }
  let requestTrailers: http2.OutgoingHttpHeaders = {}
  const onBodyEnd = () => {
    bodyEnded = true
    if (req.rawTrailers.length > 0) requestTrailers = h2Trailers(req.rawTrailers)
    if (!stream.destroyed) stream.end()
  }

  stream.on("error", (error: Error & { code?: string }) => {
    failure ??= error
  })
  if (options.responseTimeoutMs > 0) stream.setTimeout(options.responseTimeoutMs)
  stream.on("timeout", () => {
    if (phase === "head") {
      options.onError(`backend ${target.describe} did not answer in time: ${method} ${req.url}`)
      sendError(res, options.errors, 504, `switchyard: backend ${target.describe} timed out before answering`)
    } else {
      options.onError(`backend ${target.describe} was idle too long: ${method} ${req.url}`)
      res.destroy()
    }
    stream.close(NGHTTP2_CANCEL)
    finish()
  })

  stream.on("response", (headers, _flags, rawHeaders: Array<string>) => {
    if (phase !== "head") return
    phase = "body"
    // answered: a refusal can no longer happen, the kept body is not needed
    kept = undefined
    if (options.idleTimeoutMs !== options.responseTimeoutMs) stream.setTimeout(options.idleTimeoutMs)
    const status = Number(headers[HTTP2_HEADER_STATUS] ?? 502)
    const out = h1ResponseHeaders(rawHeaders)
    try {
      res.writeHead(status, out)
    } catch (error) {
      // a head HTTP/1.1 cannot carry (control characters HTTP/2 lets through, an odd status)
      const why = (error as Error & { code?: string }).code ?? (error as Error).message
      options.onError(`backend ${target.describe} sent a response head HTTP/1.1 cannot carry: ${why}`)
      sendError(res, options.errors, 502, `switchyard: backend ${target.describe} sent an invalid response head (${why})`)
      stream.close(NGHTTP2_CANCEL)
      finish()
      return
    }
    // without a length the response is a stream (events, gRPC): send its head now
    const length = headers["content-length"]
    if (length === undefined) res.flushHeaders()
    else if (method !== "HEAD" && status !== 204 && status !== 304) expected = Number(length)
    // a plain data handler with pause/resume (lighter than pipe): the stream stops reading, and so
    // stops granting the backend window, while the client's socket is full
    stream.on("data", (chunk: Buffer) => {
      received += chunk.length
      if (!res.write(chunk)) stream.pause()
    })
    res.on("drain", () => stream.resume())
  })
  stream.on("trailers", (received: http2.IncomingHttpHeaders) => {
    trailers = received
  })
  stream.on("end", () => {
    if (phase !== "body") return
    // Node also ends the readable side when the stream dies: a destroyed stream, a reset code or a
    // short body means the response was cut, and the client must see it aborted
    if (stream.destroyed || stream.rstCode || failure !== undefined || (expected >= 0 && received !== expected)) {
      options.onError(`backend ${target.describe} broke a response: ${describeStreamFailure(stream, failure)}`)
      res.destroy()
    } else {
      if (trailers !== undefined) {
        try {
          res.addTrailers(h1Trailers(trailers))
        } catch (error) {
          // trailers HTTP/1.1 cannot carry: the response cannot be completed faithfully
          options.onError(`backend ${target.describe} sent invalid trailers: ${(error as Error).message}`)
          res.destroy()
          finish()
          return
        }
      }
      res.end()
    }
    finish()
  })
  stream.on("close", () => {
    if (phase === "done") return
    if (phase === "head") {
      const again: RequestReplay | undefined = kept === undefined ? undefined : { chunks: kept, ended: bodyEnded }
      if (again !== undefined && !res.destroyed && wasRefused(stream, failure) && options.onRefused !== undefined) {
        finish()
        // nothing was processed: the caller may take the request over (a retry on another connection)
        if (options.onRefused(again)) return
      }
      if (!res.headersSent && !res.destroyed) {
        const why = describeStreamFailure(stream, failure)
        options.onError(`backend ${target.describe} failed before answering: ${why}`)
        sendError(res, options.errors, 502, `switchyard: backend ${target.describe} unreachable (${why})`)
      }
    } else {
      // broken after the head: the client must see an aborted response, never a short success
      options.onError(`backend ${target.describe} broke a response: ${describeStreamFailure(stream, failure)}`)
      res.destroy()
    }
    finish()
  })

  // The public client went away before the exchange finished: cancel the stream.
  res.on("close", () => {
    if (!res.writableFinished && !stream.closed) stream.close(NGHTTP2_CANCEL)
    if (res.writableFinished || phase !== "head") finish()
  })
  req.on("error", () => {
    if (!stream.closed) stream.close(NGHTTP2_CANCEL)
  })

  if (!withBody) {
    req.resume()
    return
  }
  stream.once("wantTrailers", () => {
    if (!stream.destroyed) stream.sendTrailers(requestTrailers)
  })
  stream.on("drain", () => req.resume())
  // a resent request first sends what the refused attempt had read
  if (replay !== undefined) for (const chunk of replay.chunks) stream.write(chunk)
  if (bodyEnded) {
    onBodyEnd()
    return
  }
  req.on("data", onBodyData)
  req.on("end", onBodyEnd)
  req.resume()
}

/** `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2). */
export const webSocketAccept = (key: string): string => createHash("sha1").update(key + WebSocketAcceptGuid).digest("base64")

/**
 * Carries an HTTP/1.1 `Upgrade` request as RFC 8441 extended CONNECT: the backend's 2xx becomes a 101 for
 * the client (with `Sec-WebSocket-Accept` computed here for WebSocket), then bytes flow both ways. The
 * caller checks that the backend advertised `SETTINGS_ENABLE_CONNECT_PROTOCOL` first.
 */
export const upgradeToH2 = (
  target: H2Target,
  req: http.IncomingMessage,
  socket: Duplex,
  head: Buffer,
  options: H2ForwardOptions
): void => {
  const protocol = (headerValue(req.rawHeaders, "upgrade") ?? "").split(",")[0]!.trim().toLowerCase()
  let stream: http2.ClientHttp2Stream
  try {
    stream = target.session.request(h2RequestHeaders(req, "CONNECT", options.forwardedMode, protocol))
  } catch (error) {
    const text = (error as Error & { code?: string }).code ?? (error as Error).message
    writeRawError(socket, options.errors, 502, `switchyard: backend ${target.describe} unreachable (${text})`)
    options.onDone()
    return
  }
  let answered = false
  let done = false
  let failure: (Error & { code?: string }) | undefined
  const finish = () => {
    if (done) return
    done = true
    options.onDone()
  }
  stream.on("error", (error: Error & { code?: string }) => {
    failure ??= error
  })
  if (options.responseTimeoutMs > 0) {
    stream.setTimeout(options.responseTimeoutMs, () => {
      if (answered) return
      answered = true
      writeRawError(socket, options.errors, 504, `switchyard: backend ${target.describe} timed out before answering`)
      stream.close(NGHTTP2_CANCEL)
    })
  }
  socket.on("error", () => socket.destroy())
  socket.on("close", () => {
    if (!stream.closed) stream.close(NGHTTP2_CANCEL)
    finish()
  })
  stream.on("close", () => {
    if (!answered) {
      answered = true
      writeRawError(socket, options.errors, 502, `switchyard: backend ${target.describe} unreachable (${describeStreamFailure(stream, failure)})`)
    } else if (!socket.writableFinished) {
      socket.destroy()
    }
    finish()
  })
  stream.on("response", (headers, _flags, rawHeaders: Array<string>) => {
    answered = true
    const status = Number(headers[HTTP2_HEADER_STATUS] ?? 502)
    const relayed = h1ResponseHeaders(rawHeaders)
    if (status < 200 || status > 299) {
      // declined: relay the ordinary answer and close
      let text = `HTTP/1.1 ${status} ${STATUS_TEXT[status] ?? "Declined"}\r\n`
      for (let i = 0; i < relayed.length; i += 2) text += `${relayed[i]}: ${relayed[i + 1]}\r\n`
      socket.write(text + "Connection: close\r\n\r\n")
      stream.pipe(socket)
      return
    }
    stream.setTimeout(options.idleTimeoutMs, () => {
      options.onError(`tunnel to ${target.describe} idle too long: ${req.url}`)
      stream.close(NGHTTP2_CANCEL)
      socket.destroy()
    })
    let text = `HTTP/1.1 101 Switching Protocols\r\nUpgrade: ${protocol}\r\nConnection: Upgrade\r\n`
    const key = headerValue(req.rawHeaders, "sec-websocket-key")
    if (protocol === "websocket" && key !== undefined) text += `Sec-WebSocket-Accept: ${webSocketAccept(key.trim())}\r\n`
    for (let i = 0; i < relayed.length; i += 2) {
      if (!NOT_ON_SWITCH.has(relayed[i]!.toLowerCase())) text += `${relayed[i]}: ${relayed[i + 1]}\r\n`
    }
    socket.write(text + "\r\n")
    if (head.length > 0) stream.write(head)
    // pipe() ends the other side when one side ends: half-close carries over both ways
    socket.pipe(stream)
    stream.pipe(socket)
  })
}
