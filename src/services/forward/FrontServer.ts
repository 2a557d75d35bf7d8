/**
 * The client-facing HTTP/1.1 server for front doors that work with Node's request objects (the socket
 * proxy uses the raw engine in `Http1Engine.ts` instead): Node's parser in strict mode (it
 * rejects CL+TE, duplicate Content-Length, obs-fold and malformed lines) with named limits on header
 * size, count and time, and clear one-line 400/408/431 answers to what it rejects. It does not bind.
 */
import * as http from "node:http"
import type { Duplex } from "node:stream"
import { type ErrorRenderer, sendError, writeRawError } from "./ErrorResponse.ts"

export interface HttpLimits {
  /** Largest request head (bytes). */
  readonly maxHeaderSize: number
  /** Most request headers kept. More is a 431. */
  readonly maxHeadersCount: number
  /** Time to receive a request head (ms). */
  readonly headersTimeoutMs: number
  /** Time to receive a whole request (ms); 0 = none. */
  readonly requestTimeoutMs: number
  /** Idle time of a keep-alive client connection between requests (ms). */
  readonly keepAliveTimeoutMs: number
  /**
   * Most client connections open at once; more are closed on arrival. With one request in flight per
   * connection, this also bounds the requests waiting for a pooled upstream connection.
   */
  readonly maxConnections: number
}

/**
 * Buffer size at which a client socket reports backpressure (bytes). Larger than Node's 16 KiB default so
 * a 64 KiB upstream read is written without pausing the upstream on every chunk; one per connection.
 */
export const STREAM_HIGH_WATER_MARK = 256 * 1024

/** How often Node checks the header and request timeouts (ms). */
export const TIMEOUT_CHECK_INTERVAL_MS = 1_000

const clientErrorStatus = (code: string | undefined): readonly [number, string] => {
  switch (code) {
    case "HPE_HEADER_OVERFLOW":
      return [431, "request head too large"]
    case "ERR_HTTP_REQUEST_TIMEOUT":
      return [408, "request not received in time"]
    case "HPE_INVALID_TRANSFER_ENCODING":
    case "HPE_UNEXPECTED_CONTENT_LENGTH":
    case "HPE_INVALID_CONTENT_LENGTH":
      return [400, "ambiguous message length (Content-Length and Transfer-Encoding)"]
    case "HPE_INVALID_HEADER_TOKEN":
      return [400, "malformed header (obs-fold or bad characters)"]
    default:
      return [400, "malformed request"]
  }
}

/** Every socket a front server accepted, upgraded ones included (Node stops tracking those). */
const connections = new WeakMap<http.Server, Set<Duplex>>()

/**
 * Stops listening, lets requests in flight finish for up to `drainMs`, then destroys every connection
 * left, upgraded tunnels included; resolves once closed. (`server.close` alone would wait for hijacked
 * connections, which Node no longer manages, and for streams that never end.)
 */
export const closeFrontServer = (server: http.Server, drainMs = 0): Promise<void> =>
  new Promise((resolve) => {
    const destroyAll = () => {
      server.closeAllConnections()
      for (const socket of connections.get(server) ?? []) socket.destroy()
    }
    const timer = drainMs > 0 ? setTimeout(destroyAll, drainMs) : undefined
    server.close(() => {
      if (timer !== undefined) clearTimeout(timer)
      resolve()
    })
    if (timer === undefined) destroyAll()
    else server.closeIdleConnections()
  })

/** An HTTP server with the limits applied and client errors answered; handlers are the caller's. */
export const makeFrontServer = (
  limits: HttpLimits,
  errors: ErrorRenderer,
  onRequest: (req: http.IncomingMessage, res: http.ServerResponse) => void,
  onUpgrade: (req: http.IncomingMessage, socket: Duplex, head: Buffer) => void
): http.Server => {
  const server = http.createServer({
    maxHeaderSize: limits.maxHeaderSize,
    headersTimeout: limits.headersTimeoutMs,
    requestTimeout: limits.requestTimeoutMs,
    keepAliveTimeout: limits.keepAliveTimeoutMs,
    connectionsCheckingInterval: TIMEOUT_CHECK_INTERVAL_MS,
    requireHostHeader: true,
    insecureHTTPParser: false,
    joinDuplicateHeaders: false,
    noDelay: true,
    highWaterMark: STREAM_HIGH_WATER_MARK
  }, (req, res) => {
    if (req.rawHeaders.length > limits.maxHeadersCount * 2) {
      sendError(res, errors, 431, `switchyard: more than ${limits.maxHeadersCount} request headers`)
      return
    }
    onRequest(req, res)
  })
  // One more than the limit is kept so that exceeding it is seen and refused, not silently truncated.
  server.maxHeadersCount = limits.maxHeadersCount + 1
  server.maxConnections = limits.maxConnections
  const open = new Set<Duplex>()
  connections.set(server, open)
  server.on("connection", (socket: Duplex) => {
    open.add(socket)
    socket.once("close", () => open.delete(socket))
  })
  server.on("upgrade", (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    // Node hands an upgraded socket over without an error listener: a reset must not become an exception.
    socket.on("error", () => socket.destroy())
    if (req.rawHeaders.length > limits.maxHeadersCount * 2) {
      writeRawError(socket, errors, 431, `switchyard: more than ${limits.maxHeadersCount} request headers`)
      return
    }
    onUpgrade(req, socket, head)
  })
  server.on("clientError", (err: Error & { code?: string }, socket: Duplex) => {
    if (err.code === "ECONNRESET" || !socket.writable) {
      socket.destroy()
      return
    }
    const [status, what] = clientErrorStatus(err.code)
    writeRawError(socket, errors, status, `switchyard: ${what}`)
  })
  return server
}
