/**
 * A request and response of Node's servers seen as an `ExchangeFront`: the HTTP/2 public port's
 * compatibility objects (Node parses and frames HTTP/2; switchyard does everything after that), and
 * `http.Server`'s where a front door serves HTTP/1.1 with Node. The request's fields go through the same
 * header rules as the engine's (`requestHeaders`), pseudo-headers left out and `:authority` standing for
 * `Host`. It never retries and never picks a backend.
 */
import { Buffer } from "node:buffer"
import type * as http from "node:http"
import type * as http2 from "node:http2"
import { ErrorCode } from "../../domain/Http2Frame.ts"
import { type ForwardedMode, headerValue, requestHeaders } from "../../domain/HttpHeaders.ts"
import { type ErrorRenderer, sendError } from "./ErrorResponse.ts"
import type { ExchangeFront, ExchangeRequest } from "./Exchange.ts"
import { teAcceptsTrailers } from "./Http2Upstream.ts"

/**
 * Bytes queued toward the client below which a written response chunk counts as taken at once (an
 * upstream's window is then granted back); above it, once the stream drains.
 */
export const NodeFrontQueueBytes = 512 * 1024

/** The request fields of an HTTP/2 request without its pseudo-headers, flat. */
const plainFields = (raw: ReadonlyArray<string>): Array<string> => {
  const out: Array<string> = []
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.charCodeAt(0) !== 58 /* : */) out.push(raw[i]!, raw[i + 1]!)
  }
  return out
}

/** A field list without its `host` fields. */
const withoutHost = (fields: ReadonlyArray<string>): Array<string> => {
  const out: Array<string> = []
  for (let i = 0; i < fields.length; i += 2) {
    if (!(fields[i]!.length === 4 && fields[i]!.toLowerCase() === "host")) out.push(fields[i]!, fields[i + 1]!)
  }
  return out
}

/**
 * Why an HTTP/2 request cannot be routed: a `host` field that names another host than its `:authority`
 * (RFC 9113 §8.3.1 asks that they agree; routing and a backend must not read different ones).
 */
export const authorityConflict = (req: http2.Http2ServerRequest, normalize: (host: string | undefined) => string): string | undefined => {
  const authority = req.authority
  if (!authority) return undefined
  const raw = req.rawHeaders
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.length === 4 && raw[i]!.toLowerCase() === "host" && normalize(raw[i + 1]) !== normalize(authority)) {
      return "a host field that differs from :authority"
    }
  }
  return undefined
}

/** Trailer fields as the object `addTrailers` takes (repeated names joined, as HTTP allows for lists). */
const trailerObject = (fields: ReadonlyArray<string>): Record<string, string> => {
  const out: Record<string, string> = {}
  for (let i = 0; i < fields.length; i += 2) {
    const name = fields[i]!.toLowerCase()
    out[name] = out[name] === undefined ? fields[i + 1]! : `${out[name]}, ${fields[i + 1]!}`
  }
  return out
}

export interface NodeFrontOptions {
  readonly forwardedMode: ForwardedMode
  readonly errors: ErrorRenderer
  /** The routed target (origin form), when routing rewrote the client's. */
  readonly path: string
  /** Headers set on the request sent upstream (flat), each replacing the client's of the same name. */
  readonly requestHeaders?: ReadonlyArray<string> | undefined
  /** Headers set on the response head (flat), each replacing the upstream's of the same name. */
  readonly responseHeaders?: ReadonlyArray<string> | undefined
}

/** Drops fields named in `set` from `headers` (case-insensitive) and appends `set`. */
export const replaceFields = (headers: Array<string>, set: ReadonlyArray<string> | undefined): Array<string> => {
  if (set === undefined) return headers
  const names = new Set<string>()
  for (let i = 0; i < set.length; i += 2) names.add(set[i]!.toLowerCase())
  const out: Array<string> = []
  for (let i = 0; i < headers.length; i += 2) {
    if (!names.has(headers[i]!.toLowerCase())) out.push(headers[i]!, headers[i + 1]!)
  }
  for (const v of set) out.push(v)
  return out
}

/** Whether an HTTP/1.1 request has a body: a length other than 0, or a coding (RFC 9112 §6.3). */
const http1HasBody = (req: http.IncomingMessage): boolean => {
  if (req.headers["transfer-encoding"] !== undefined) return true
  const length = req.headers["content-length"]
  return length !== undefined && length !== "0"
}

/** A request of Node's `http` or `http2` server and its response as the front of one exchange. */
export const nodeExchangeFront = (
  req: http.IncomingMessage | http2.Http2ServerRequest,
  res: http.ServerResponse | http2.Http2ServerResponse,
  options: NodeFrontOptions
): ExchangeFront => {
  const h2 = "stream" in req ? req : undefined
  const h2res = "stream" in res ? res : undefined
  // HTTP/2: `:authority` is the Host the request was routed by; a `host` field beside it (which must
  // agree, see `authorityConflict`) is not forwarded, so no upstream reads another one
  const fields = h2 !== undefined && h2.authority ? withoutHost(plainFields(req.rawHeaders)) : plainFields(req.rawHeaders)
  const authority = (h2?.authority || undefined) ?? headerValue(fields, "host")
  const socket = req.socket as { remoteAddress?: string; encrypted?: boolean }
  const scheme = socket.encrypted === true ? "https" : "http"
  const request: ExchangeRequest = {
    method: req.method ?? "GET",
    path: options.path,
    scheme,
    authority,
    headers: replaceFields(
      requestHeaders(
        fields,
        false,
        options.forwardedMode,
        options.forwardedMode === "off" ? undefined : { clientAddress: socket.remoteAddress, proto: scheme, host: authority }
      ),
      options.requestHeaders
    ),
    acceptsTrailers: teAcceptsTrailers(headerValue(fields, "te")),
    // HTTP/2 says "no body" with END_STREAM on the head, whatever the fields say
    hasBody: h2 !== undefined ? !h2.stream.endAfterHeaders : http1HasBody(req as http.IncomingMessage),
    target: req.url ?? "/"
  }
  /** Cuts the response: an HTTP/2 stream is reset (a bare end would read as complete), a connection closed. */
  const cut = () => {
    if (h2res !== undefined) {
      if (!h2res.stream.destroyed) h2res.stream.close(ErrorCode.INTERNAL_ERROR)
    } else res.destroy()
  }
  let over = false
  const gone: Array<() => void> = []
  // the exchange ends other than by a complete response: tell the upstream once
  const leave = () => {
    if (over) return
    over = true
    for (const listener of gone.splice(0)) listener()
  }
  res.once("close", () => {
    if (!res.writableFinished) leave()
    over = true
  })
  const isGone = () => over || res.destroyed || res.writableEnded
  // the body's current reader: a request moved to another upstream reads on where the last one stopped
  let onData: ((chunk: Buffer) => boolean) | undefined
  let onEnd: ((trailers: ReadonlyArray<string> | undefined) => void) | undefined
  let reading = false
  return {
    request,
    readBody: (data, end) => {
      onData = data
      onEnd = end
      if (!reading) {
        reading = true
        req.on("data", (chunk: Buffer) => {
          if (!onData!(chunk)) req.pause()
        })
        req.once("end", () => onEnd!(req.rawTrailers.length > 0 ? req.rawTrailers : undefined))
      }
      req.resume()
    },
    resumeBody: () => void req.resume(),
    respond: (status, headers, _bodyless) => {
      if (isGone()) return undefined
      try {
        const head = replaceFields([...headers], options.responseHeaders) as unknown as http.OutgoingHttpHeaders
        if (h2res !== undefined) h2res.writeHead(status, head)
        else {
          const h1 = res as http.ServerResponse
          h1.writeHead(status, head)
          // a stream without a length (events, gRPC) starts now rather than with its first chunk
          if (h1.getHeader("content-length") === undefined) h1.flushHeaders()
        }
      } catch (error) {
        return (error as Error & { code?: string }).code ?? (error as Error).message
      }
      return undefined
    },
    write: (chunk, written) => {
      if (isGone()) {
        written?.()
        return true
      }
      // the stream's callback runs once Node is done with the chunk (sent, or failed)
      return (res as http.ServerResponse).write(chunk, written === undefined ? undefined : () => written()) ||
        res.writableLength < NodeFrontQueueBytes
    },
    onDrain: (listener) => void res.on("drain", listener),
    end: (trailers) => {
      if (isGone()) return undefined
      if (trailers !== undefined && trailers.length > 0) {
        try {
          res.addTrailers(trailerObject(trailers))
        } catch (error) {
          return (error as Error).message
        }
      }
      over = true
      gone.length = 0
      res.end()
      return undefined
    },
    fail: (status, message) => {
      if (isGone()) return
      leave()
      if (res.headersSent) return cut()
      const body = options.errors.render(message, status)
      if (h2res !== undefined) {
        h2res.writeHead(status, { "content-type": options.errors.contentType, "content-length": Buffer.byteLength(body) })
        h2res.end(body)
      } else sendError(res as http.ServerResponse, options.errors, status, message)
    },
    abort: () => {
      leave()
      cut()
    },
    onGone: (listener) => {
      if (!over) gone.push(listener)
    },
    isGone,
    isAnswered: () => res.headersSent
  }
}

/** An `Upgrade` request of Node's `http.Server` as an upstream reached by messages reads it. */
export const nodeUpgradeRequest = (req: http.IncomingMessage, path: string, forwardedMode: ForwardedMode): ExchangeRequest => {
  const socket = req.socket as { remoteAddress?: string; encrypted?: boolean }
  const scheme = socket.encrypted === true ? "https" : "http"
  const authority = req.headers.host
  return {
    method: req.method ?? "GET",
    path,
    scheme,
    authority,
    headers: requestHeaders(
      req.rawHeaders,
      false,
      forwardedMode,
      forwardedMode === "off" ? undefined : { clientAddress: socket.remoteAddress, proto: scheme, host: authority }
    ),
    acceptsTrailers: false,
    hasBody: http1HasBody(req),
    target: req.url ?? "/"
  }
}

/** The protocol an `Upgrade` field asks for first (lower-cased). */
export const upgradeProtocol = (value: string | undefined): string => (value ?? "").split(",")[0]!.trim().toLowerCase()

/**
 * Why a request of Node's `http.Server` cannot go on as an exchange: a transfer coding other than
 * chunked alone (answered 501), which no upstream kind can be given faithfully.
 */
export const unsupportedCoding = (req: http.IncomingMessage | http2.Http2ServerRequest): string | undefined => {
  const te = req.headers["transfer-encoding"]
  if (te === undefined || te.trim().toLowerCase() === "chunked") return undefined
  return `switchyard: unsupported Transfer-Encoding "${te}"`
}

/** The fields of a request of Node's `http2` server without its pseudo-headers, flat. */
export const http2Fields = (req: http2.Http2ServerRequest): Array<string> => plainFields(req.rawHeaders)

/** How an exchange went, as `observeFront` reports it. */
export interface ObservedExchange {
  readonly status: number
  /** Body bytes read from the client and written to it. */
  readonly receivedBytes: number
  readonly sentBytes: number
  readonly end: "Complete" | "Aborted" | "Refused"
}

/** `front`, reporting once, when the exchange is over, its status, body bytes and how it ended. */
export const observeFront = (front: ExchangeFront, observe: (exchange: ObservedExchange) => void): ExchangeFront => {
  let status = 0
  let received = 0
  let sent = 0
  let reported = false
  const report = (end: ObservedExchange["end"]) => {
    if (reported) return
    reported = true
    observe({ status: end === "Aborted" && !front.isAnswered() ? 0 : status, receivedBytes: received, sentBytes: sent, end })
  }
  front.onGone(() => report("Aborted"))
  return {
    ...front,
    readBody: (onData, onEnd) =>
      front.readBody((chunk) => {
        received += chunk.length
        return onData(chunk)
      }, onEnd),
    respond: (s, headers, bodyless) => {
      const refused = front.respond(s, headers, bodyless)
      if (refused === undefined) status = s
      return refused
    },
    write: (chunk, written) => {
      sent += chunk.length
      return front.write(chunk, written)
    },
    end: (trailers) => {
      const refused = front.end(trailers)
      report(refused === undefined ? "Complete" : "Aborted")
      return refused
    },
    fail: (s, message) => {
      if (!front.isGone() && !front.isAnswered()) {
        // reported as refused before the front tells its listeners the exchange is gone
        reported = true
        status = s
        front.fail(s, message)
        observe({ status: s, receivedBytes: received, sentBytes: sent, end: "Refused" })
      } else front.fail(s, message)
    }
  }
}
