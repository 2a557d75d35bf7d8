/**
 * The HTTP-forwarding core shared by every front door: streams a client request to an `Upstream` and the
 * response back (no buffering, backpressure through pipes), strips hop-by-hop headers, writes
 * `X-Forwarded-*`, carries trailers, turns upgrades (WebSocket, Docker's `Upgrade: tcp` hijack) into a raw
 * half-closable pipe, and maps failures to 502/504. It does not route or authorise: callers decide first.
 * Two front sides: `forward`/`upgrade` for callers holding Node's request objects (HTTP/2, wsp), and
 * `serveHttp1` for callers that accept client sockets themselves, served by the raw HTTP/1.1 engine.
 * The per-request path is plain Node callbacks; the agent, pools and live tunnels belong to the service's scope.
 */
import { Context, Effect, Layer } from "effect"
import type { Scope } from "effect"
import * as http from "node:http"
import type { Duplex } from "node:stream"
import {
  type ForwardedMode,
  headerValue,
  requestHeaders,
  responseHeaders,
  trailerPairs
} from "../domain/HttpHeaders.ts"
import { abortResponse, type ErrorRenderer, plainErrors, sendError, writeRawError } from "./forward/ErrorResponse.ts"
import { closeAfterFlush } from "./forward/Flush.ts"
import type { HeadLimits } from "../domain/Http1Parser.ts"
import type { ExchangeFront } from "./forward/Exchange.ts"
import { exchangeOverHttp1 } from "./forward/Http1MessageUpstream.ts"
import type { Http1Front, Http1Server } from "./forward/http1/Admission.ts"
import { makeHttp1Server } from "./forward/Http1Engine.ts"
import type { Upstream } from "./forward/Upstream.ts"
import { UpstreamPool } from "./forward/UpstreamPool.ts"

/** The request about to be sent upstream; a `Director` may rewrite any field. */
export interface OutgoingRequest {
  method: string
  /** Origin-form target: path and query. */
  path: string
  /** Flat `[name, value, ...]` list, hop-by-hop headers already removed. Host is the client's. */
  headers: Array<string>
  /** Where to send it (transport and scheme); defaults to the forwarder's upstream. */
  upstream: Upstream
}

/** Rewrites the outgoing request (scheme via `upstream`, host, path, headers). Runs once per request. */
export type Director = (outgoing: OutgoingRequest, incoming: http.IncomingMessage) => void

export interface ForwardOptions {
  readonly director?: Director | undefined
  /** Overrides the forwarder's idle limit for this request (ms; 0 = none). */
  readonly idleTimeoutMs?: number | undefined
  /** Overrides the time allowed for the response head (ms; 0 = none). */
  readonly responseTimeoutMs?: number | undefined
  /** Overrides the client's target (e.g. a canonicalised path). */
  readonly path?: string | undefined
}

export interface ForwarderConfig {
  readonly upstream: Upstream
  /** Default: `off` toward a local Unix-socket API, `replace` otherwise. */
  readonly forwardedHeaders?: ForwardedMode | undefined
  /** No bytes either way for this long before the response head (ms) is a 504. 0 = none. */
  readonly responseTimeoutMs: number
  /** No bytes either way on a response or tunnel for this long closes it (ms). 0 = none. */
  readonly idleTimeoutMs: number
  /** How error bodies look (default plain text). */
  readonly errors?: ErrorRenderer | undefined
  /** Called with a one-line description of each upstream failure (for logs). */
  readonly onUpstreamError?: ((message: string) => void) | undefined
}

export interface ForwarderShape {
  readonly upstream: Upstream
  /** What it does with `X-Forwarded-*` fields, for front doors that reach upstreams by messages. */
  readonly forwardedMode: ForwardedMode
  /** How its error answers look. */
  readonly errors: ErrorRenderer
  /** Forwards an ordinary request; the response (or a 502/504) goes to `res`. */
  readonly forward: (req: http.IncomingMessage, res: http.ServerResponse, options?: ForwardOptions) => void
  /** Forwards an upgrade request; after the upstream's 101 the two sockets are piped raw. */
  readonly upgrade: (req: http.IncomingMessage, socket: Duplex, head: Buffer, options?: ForwardOptions) => void
  /**
   * Serves client connections the caller accepts (`net.Server` `connection`) with the raw HTTP/1.1
   * engine: heads parsed and rewritten, bodies moved unchanged, pooled raw upstream connections
   * (`upstream.connect()`). Closed with the forwarder's scope.
   */
  readonly serveHttp1: (front: Http1Front) => Http1Server
  /**
   * Carries one exchange of a front door whose requests are messages (the HTTP/2 public port) on a
   * pooled HTTP/1.1 connection to `upstream` (see `Http1MessageUpstream`).
   */
  readonly exchange: (front: ExchangeFront, upstream: Upstream, limits: HeadLimits) => void
  /** Requests and tunnels in flight (for metrics and leak checks). */
  readonly active: () => { readonly requests: number; readonly tunnels: number }
}

/** Methods for which Node's client would not invent a chunked body. */
const BODYLESS_BY_DEFAULT: ReadonlySet<string> = new Set(["GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"])

/**
 * A request with neither Content-Length nor Transfer-Encoding has no body (RFC 9112 §6.3); say so
 * explicitly, or Node's client would send an empty chunked body the upstream may read as stream data.
 */
const markEmptyBody = (out: OutgoingRequest, te: string | undefined): void => {
  if (te === undefined && !BODYLESS_BY_DEFAULT.has(out.method) && headerValue(out.headers, "content-length") === undefined) {
    out.headers.push("Content-Length", "0")
  }
}

/** Whether `req` came over HTTP/2 with DATA to follow its HEADERS (no END_STREAM on them). */
const http2BodyFollows = (req: http.IncomingMessage): boolean =>
  req.httpVersionMajor === 2 && (req as unknown as { readonly stream?: { readonly endAfterHeaders?: boolean } }).stream?.endAfterHeaders === false

/** Largest body an upgrade request may carry (exec start sends a small JSON object). */
export const MAX_UPGRADE_BODY = 64 * 1024

/** Time allowed for an upgrade request's body to arrive (ms), without progress. */
export const UPGRADE_BODY_TIMEOUT_MS = 30_000

export { TUNNEL_FLUSH_GRACE_MS } from "./forward/Flush.ts"

/** Most pooled connections per upstream for the HTTP/1.1 engine when the upstream's agent sets no limit. */
export const ENGINE_DEFAULT_MAX_SOCKETS = 256

const errorText = (err: Error & { code?: string }): string => err.code ?? err.message

/** Whether a client's `Transfer-Encoding` can be forwarded as is (only plain `chunked`). */
const unsupportedCoding = (te: string | undefined): boolean => te !== undefined && te.trim().toLowerCase() !== "chunked"

/** Builds the forwarding core; the agent (when owned) and every live tunnel close with the scope. */
export const makeForwarder: (config: ForwarderConfig) => Effect.Effect<ForwarderShape, never, Scope.Scope> = Effect.fn(
  "Forwarder.make"
)(function*(config: ForwarderConfig) {
  const upstream = config.upstream
  const errors = config.errors ?? plainErrors
  const forwardedMode: ForwardedMode = config.forwardedHeaders ?? (upstream.local ? "off" : "replace")
  const tunnels = new Set<Duplex>()
  let requests = 0
  let closed = false
  const report = config.onUpstreamError ?? (() => {})

  const pools = new Map<Upstream, UpstreamPool>()
  const servers = new Set<Http1Server>()

  yield* Effect.addFinalizer(() =>
    Effect.promise(async () => {
      closed = true
      await Promise.all([...servers].map((s) => s.close(0)))
      servers.clear()
      for (const s of tunnels) s.destroy()
      tunnels.clear()
      for (const p of pools.values()) p.close()
      pools.clear()
      if (upstream.owned) upstream.agent.destroy()
    })
  )

  const engineCore = {
    upstream,
    forwardedMode,
    responseTimeoutMs: config.responseTimeoutMs,
    idleTimeoutMs: config.idleTimeoutMs,
    errors,
    report,
    poolFor: (target: Upstream): UpstreamPool => {
      let pool = pools.get(target)
      if (pool === undefined) {
        const agent = target.agent
        const maxSockets = Number.isFinite(agent.maxSockets) ? agent.maxSockets : ENGINE_DEFAULT_MAX_SOCKETS
        const maxFree = Number.isFinite(agent.maxFreeSockets) ? Math.min(agent.maxFreeSockets, maxSockets) : maxSockets
        pool = new UpstreamPool(target, maxSockets, maxFree, (empty) => {
          if (pools.get(empty.upstream) === empty) pools.delete(empty.upstream)
        }, (bytes) => report(`upstream ${target.describe} sent ${bytes} bytes on an idle connection; the connection is dropped`))
        pools.set(target, pool)
      }
      return pool
    },
    tunnels,
    requestStarted: () => void requests++,
    requestFinished: () => void requests--,
    isClosed: () => closed
  }

  const exchange = (front: ExchangeFront, target: Upstream, limits: HeadLimits): void => {
    if (closed) {
      front.fail(503, "switchyard: shutting down")
      return
    }
    requests++
    exchangeOverHttp1(engineCore.poolFor(target), front, {
      limits,
      responseTimeoutMs: config.responseTimeoutMs ?? 0,
      idleTimeoutMs: config.idleTimeoutMs ?? 0,
      report,
      onDone: () => void requests--
    })
  }

  const serveHttp1 = (front: Http1Front): Http1Server => {
    const server = makeHttp1Server(engineCore, front)
    servers.add(server)
    // A closed server is forgotten (listeners come and go with their ports).
    return { ...server, close: (drainMs) => server.close(drainMs).finally(() => servers.delete(server)) }
  }

  const outgoing = (req: http.IncomingMessage, upgrade: boolean, options: ForwardOptions | undefined): OutgoingRequest => {
    const socket = req.socket as Duplex & { remoteAddress?: string; encrypted?: boolean }
    const out: OutgoingRequest = {
      method: req.method ?? "GET",
      path: options?.path ?? req.url ?? "/",
      headers: requestHeaders(
        req.rawHeaders,
        upgrade,
        forwardedMode,
        forwardedMode === "off"
          ? undefined
          : { clientAddress: socket.remoteAddress, proto: socket.encrypted ? "https" : "http", host: req.headers.host }
      ),
      upstream
    }
    options?.director?.(out, req)
    return out
  }

  /** Builds the outgoing request; a throwing director is answered with a 502, never an exception. */
  const tryOutgoing = (
    req: http.IncomingMessage,
    upgrade: boolean,
    options: ForwardOptions | undefined,
    fail: (message: string) => void
  ): OutgoingRequest | undefined => {
    try {
      return outgoing(req, upgrade, options)
    } catch (e) {
      report(`director failed: ${(e as Error).message}`)
      fail("switchyard: the request could not be prepared for the upstream")
      return undefined
    }
  }

  const forward = (req: http.IncomingMessage, res: http.ServerResponse, options?: ForwardOptions): void => {
    if (closed) {
      sendError(res, errors, 503, "switchyard: shutting down")
      return
    }
    const te = headerValue(req.rawHeaders, "transfer-encoding")
    if (unsupportedCoding(te)) {
      sendError(res, errors, 501, `switchyard: unsupported Transfer-Encoding "${te}"`)
      return
    }
    const out = tryOutgoing(req, false, options, (message) => sendError(res, errors, 502, message))
    if (out === undefined) return
    // An HTTP/2 request needs neither a length nor a coding for its body: one without a length goes chunked.
    const h2Body = te === undefined && headerValue(req.rawHeaders, "content-length") === undefined && http2BodyFollows(req)
    if (te !== undefined || h2Body) out.headers.push("Transfer-Encoding", "chunked")
    else markEmptyBody(out, te)
    const length = headerValue(out.headers, "content-length")
    const bodyless = te === undefined && !h2Body && (length === undefined || length === "0")
    const target = out.upstream
    const responseTimeout = options?.responseTimeoutMs ?? config.responseTimeoutMs
    const idleTimeout = options?.idleTimeoutMs ?? config.idleTimeoutMs
    let phase: "head" | "body" | "done" = "head"
    let cancelled = false
    let upReq: http.ClientRequest | undefined
    requests++
    const finish = () => {
      if (phase !== "done") {
        phase = "done"
        requests--
      }
    }

    const onResponse = (upRes: http.IncomingMessage): void => {
      phase = "body"
      upReq?.setTimeout(idleTimeout)
      try {
        res.writeHead(upRes.statusCode ?? 502, upRes.statusMessage, responseHeaders(upRes.rawHeaders))
      } catch (e) {
        // Node refuses some heads it can parse (e.g. a Trailer header toward an HTTP/1.0 client).
        upRes.destroy()
        report(`upstream ${target.describe} sent a response head that cannot be relayed: ${(e as Error).message}`)
        sendError(res, errors, 502, `switchyard: upstream ${target.describe} sent a response that cannot be relayed`)
        finish()
        return
      }
      // A response without a length is a stream (events, logs, progress): send its head now.
      if (headerValue(upRes.rawHeaders, "content-length") === undefined) res.flushHeaders()
      upRes.pipe(res, { end: false })
      upRes.on("end", () => {
        if (upRes.rawTrailers.length > 0) {
          try {
            res.addTrailers(trailerPairs(upRes.rawTrailers))
          } catch {
            // trailers this response cannot carry are dropped; the body is complete
          }
        }
        res.end()
        finish()
      })
      upRes.on("error", () => abortResponse(res))
      upRes.on("close", () => {
        if (!upRes.complete) abortResponse(res)
      })
    }

    const send = (retry: boolean): void => {
      try {
        upReq = http.request({
          ...target.target,
          agent: target.agent,
          method: out.method,
          path: out.path,
          headers: out.headers,
          setHost: false
        })
      } catch (e) {
        // Node refuses some targets or header values it would have to write (a director's mistake).
        report(`request for ${target.describe} refused by Node: ${(e as Error).message}`)
        sendError(res, errors, 502, "switchyard: the request could not be sent to the upstream")
        finish()
        return
      }
      const sent = upReq
      sent.on("timeout", () => {
        const what = phase === "head" ? "did not answer in time" : "was idle too long"
        report(`upstream ${target.describe} ${what}: ${out.method} ${out.path}`)
        sent.destroy(Object.assign(new Error(what), { code: phase === "head" ? "SWITCHYARD_TIMEOUT" : "SWITCHYARD_IDLE" }))
      })
      if (responseTimeout > 0) sent.setTimeout(responseTimeout)
      sent.on("error", (err: Error & { code?: string }) => {
        if (cancelled) {
          finish()
          return
        }
        if (res.headersSent) {
          abortResponse(res)
        } else if (retry && bodyless && sent.reusedSocket && err.code === "ECONNRESET") {
          // A pooled connection the upstream closed while idle: nothing was processed; try once more.
          send(false)
          return
        } else if (err.code === "SWITCHYARD_TIMEOUT") {
          sendError(res, errors, 504, `switchyard: upstream ${target.describe} timed out before answering`)
        } else {
          report(`upstream ${target.describe} unreachable: ${errorText(err)}`)
          sendError(res, errors, 502, `switchyard: upstream ${target.describe} unreachable (${errorText(err)})`)
        }
        finish()
      })
      sent.on("response", onResponse)
      if (bodyless) {
        sent.end()
      } else {
        req.pipe(sent, { end: false })
        req.on("end", () => {
          if (req.rawTrailers.length > 0) sent.addTrailers(trailerPairs(req.rawTrailers))
          sent.end()
        })
      }
    }

    // The client went away before the exchange finished: cancel the upstream request.
    res.on("close", () => {
      if (!res.writableFinished) {
        cancelled = true
        upReq?.destroy()
      }
      finish()
    })
    req.on("error", () => {
      cancelled = true
      upReq?.destroy()
    })
    send(true)
  }

  const upgrade = (req: http.IncomingMessage, socket: Duplex, head: Buffer, options?: ForwardOptions): void => {
    // Node hands an upgraded socket over without an error listener: a reset must not become an exception.
    socket.on("error", () => socket.destroy())
    if (closed) {
      writeRawError(socket, errors, 503, "switchyard: shutting down")
      return
    }
    if (headerValue(req.rawHeaders, "transfer-encoding") !== undefined) {
      writeRawError(socket, errors, 400, "switchyard: an upgrade request with a body needs a Content-Length")
      return
    }
    const declared = headerValue(req.rawHeaders, "content-length")
    const bodyLength = declared === undefined ? 0 : Number(declared)
    if (bodyLength > MAX_UPGRADE_BODY) {
      writeRawError(socket, errors, 413, `switchyard: an upgrade request body may have at most ${MAX_UPGRADE_BODY} bytes`)
      return
    }
    const out = tryOutgoing(req, true, options, (message) => writeRawError(socket, errors, 502, message))
    if (out === undefined) return
    markEmptyBody(out, undefined)
    if (head.length >= bodyLength) {
      openTunnel(socket, out, options, head.subarray(0, bodyLength), head.subarray(bodyLength))
      return
    }
    // The Engine reads a hijack's body (e.g. exec start's JSON) before it answers 101: collect it first.
    const parts: Array<Buffer> = [head]
    let have = head.length
    const onData = (chunk: Buffer) => {
      parts.push(chunk)
      have += chunk.length
      if (have < bodyLength) return
      socket.off("data", onData)
      socket.off("close", onClose)
      socket.pause()
      if (typeof timed.setTimeout === "function") timed.setTimeout(0)
      const all = Buffer.concat(parts, have)
      openTunnel(socket, out, options, all.subarray(0, bodyLength), all.subarray(bodyLength))
    }
    const onClose = () => socket.off("data", onData)
    const timed = socket as Duplex & { setTimeout?: (ms: number, cb?: () => void) => unknown }
    if (typeof timed.setTimeout === "function") timed.setTimeout(UPGRADE_BODY_TIMEOUT_MS, () => socket.destroy())
    socket.on("data", onData)
    socket.once("close", onClose)
  }

  /** Sends an upgrade request (with its body) upstream and, after the 101, pipes the two sockets raw. */
  const openTunnel = (
    socket: Duplex,
    out: OutgoingRequest,
    options: ForwardOptions | undefined,
    body: Buffer,
    rest: Buffer
  ): void => {
    const target = out.upstream
    const responseTimeout = options?.responseTimeoutMs ?? config.responseTimeoutMs
    const idleTimeout = options?.idleTimeoutMs ?? config.idleTimeoutMs
    tunnels.add(socket)
    let upSocket: Duplex | undefined
    const teardown = () => {
      tunnels.delete(socket)
      socket.destroy()
      if (upSocket) {
        tunnels.delete(upSocket)
        upSocket.destroy()
      }
    }
    let upReq: http.ClientRequest
    try {
      upReq = http.request({
        ...target.target,
        createConnection: target.connect as never,
        method: out.method,
        path: out.path,
        headers: out.headers,
        setHost: false
      })
    } catch (e) {
      report(`request for ${target.describe} refused by Node: ${(e as Error).message}`)
      writeRawError(socket, errors, 502, "switchyard: the request could not be sent to the upstream")
      tunnels.delete(socket)
      return
    }
    let answered = false
    let cancelled = false
    if (responseTimeout > 0) {
      upReq.setTimeout(responseTimeout, () => {
        if (answered) return
        answered = true
        writeRawError(socket, errors, 504, `switchyard: upstream ${target.describe} timed out before answering`)
        upReq.destroy()
        tunnels.delete(socket)
      })
    }
    upReq.on("error", (err: Error & { code?: string }) => {
      if (answered || cancelled) return
      answered = true
      report(`upstream ${target.describe} unreachable: ${errorText(err)}`)
      writeRawError(socket, errors, 502, `switchyard: upstream ${target.describe} unreachable (${errorText(err)})`)
      tunnels.delete(socket)
    })
    socket.on("error", () => teardown())
    socket.on("close", () => {
      if (!answered) {
        cancelled = true
        upReq.destroy()
      }
      tunnels.delete(socket)
    })
    upReq.on("upgrade", (upRes: http.IncomingMessage, up: Duplex, upHead: Buffer) => {
      answered = true
      upSocket = up
      tunnels.add(up)
      // Socket-backed connections count bytes both ways; other duplexes (tunnel streams) bring their own limits.
      const timed = up as Duplex & { setTimeout?: (ms: number) => unknown }
      if (typeof timed.setTimeout === "function") timed.setTimeout(idleTimeout)
      up.on("timeout", () => {
        report(`tunnel to ${target.describe} idle too long: ${out.method} ${out.path}`)
        teardown()
      })
      let headText = `HTTP/1.1 ${upRes.statusCode} ${upRes.statusMessage ?? ""}\r\n`
      const raw = upRes.rawHeaders
      for (let i = 0; i < raw.length; i += 2) headText += `${raw[i]}: ${raw[i + 1]}\r\n`
      socket.write(headText + "\r\n")
      if (upHead.length > 0) socket.write(upHead)
      if (rest.length > 0) up.write(rest)
      up.on("error", () => teardown())
      // One side gone for good: the other may still be flushing what it was given, so let it finish
      // (bounded by TUNNEL_FLUSH_GRACE_MS without progress) and then close it.
      up.on("close", () => {
        tunnels.delete(up)
        closeAfterFlush(socket)
      })
      socket.on("close", () => closeAfterFlush(up))
      // pipe() ends the other side's writable when one side's readable ends: half-close carries over.
      socket.pipe(up)
      up.pipe(socket)
    })
    upReq.on("response", (upRes: http.IncomingMessage) => {
      // The upstream declined the upgrade: relay its ordinary answer and close.
      answered = true
      let headText = `HTTP/1.1 ${upRes.statusCode} ${upRes.statusMessage ?? ""}\r\n`
      const raw = responseHeaders(upRes.rawHeaders)
      for (let i = 0; i < raw.length; i += 2) headText += `${raw[i]}: ${raw[i + 1]}\r\n`
      socket.write(headText + "Connection: close\r\n\r\n")
      upRes.pipe(socket)
      upRes.on("close", () => {
        tunnels.delete(socket)
        if (!upRes.complete) socket.destroy()
      })
    })
    if (body.length > 0) upReq.write(body)
    upReq.end()
  }

  return {
    upstream,
    forward,
    upgrade,
    serveHttp1,
    exchange,
    forwardedMode,
    errors,
    active: () => ({ requests, tunnels: tunnels.size })
  } satisfies ForwarderShape
})

/** The forwarding core as a service, for front doors that forward to one upstream. */
export class Forwarder extends Context.Service<Forwarder, ForwarderShape>()("switchyard/Forwarder") {
  static readonly make = makeForwarder
  static readonly layer = (config: ForwarderConfig): Layer.Layer<Forwarder> => Layer.effect(Forwarder, makeForwarder(config))
}
