/**
 * Opening WebSockets on Node's public HTTP APIs: a server accepts an upgrade Node's `http` server
 * handed over (`acceptWebSocket`), a client sends one with `http.request`/`https.request` and takes the
 * socket from its `upgrade` event (`openWebSocket`). Either way the result is a `WebSocketEndpoint`
 * that switchyard reads and writes itself. The handshake's rules are `domain/WebSocketHandshake.ts`.
 */
import { Buffer } from "node:buffer"
import * as http from "node:http"
import * as https from "node:https"
import * as net from "node:net"
import type { Duplex } from "node:stream"
import * as tls from "node:tls"
import {
  acceptResponse,
  checkUpgradeRequest,
  checkUpgradeResponse,
  newHandshakeKey,
  refusalResponse,
  upgradeRequestHeaders
} from "../../domain/WebSocketHandshake.ts"
import { type EndpointOptions, WebSocketEndpoint } from "./WebSocketEndpoint.ts"

/**
 * An upgrade request as a server hands it over: Node's `http.IncomingMessage` from its `upgrade` event
 * is one; so is the request the forwarding core's engine passes to a front door that takes upgrades.
 */
export interface UpgradeRequest {
  readonly method?: string | undefined
  /** The request target (origin form). */
  readonly url?: string | undefined
  readonly httpVersion: string
  /** Values by lower-case field name. */
  readonly headers: Readonly<Record<string, string | ReadonlyArray<string> | undefined>>
  /** The client's connection (for its addresses). */
  readonly socket: net.Socket
}

/**
 * Accepts the upgrade request `req` on `socket` (with `head`, what Node read past the request): the
 * 101 answer goes out and the endpoint reads from the first frame on. A request that is not a valid
 * WebSocket upgrade is answered 400 (426 for another version) and closed; `undefined` then.
 */
export const acceptWebSocket = (
  req: Pick<UpgradeRequest, "method" | "httpVersion" | "headers">,
  socket: Duplex,
  head: Buffer,
  options: Omit<EndpointOptions, "masking">
): WebSocketEndpoint | undefined => {
  const check = checkUpgradeRequest(req.method ?? "", req.httpVersion, req.headers)
  if (check._tag === "Refuse") {
    if (socket.writable) socket.end(refusalResponse(check.status, check.message))
    else socket.destroy()
    return undefined
  }
  if (!socket.writable || socket.destroyed) {
    socket.destroy()
    return undefined
  }
  socket.write(acceptResponse(check.key))
  return new WebSocketEndpoint(socket as net.Socket, head, { ...options, masking: "none" })
}

/** Where and how a client opens a WebSocket. */
export interface OpenWebSocketOptions extends Omit<EndpointOptions, "masking"> {
  readonly secure: boolean
  readonly host: string
  readonly port: number
  /** Path and query of the request. */
  readonly path: string
  /** Masking of this client's frames: random keys (RFC 6455), or the all-zero key when an operator turns it off. */
  readonly maskFrames?: boolean | undefined
  readonly headers?: Readonly<Record<string, string>> | undefined
  /** Trusted CAs for `wss://` (the system's are used when absent). */
  readonly ca?: ReadonlyArray<string> | undefined
  readonly rejectUnauthorized?: boolean | undefined
  /** A connection already open to the server (through an HTTP proxy's CONNECT), used instead of dialing. */
  readonly tunnel?: net.Socket | undefined
  /** Longest the whole handshake may take. */
  readonly timeoutMs: number
}

/** A client's WebSocket is open, or why it could not be. */
export type OpenOutcome =
  | { readonly _tag: "Open"; readonly endpoint: WebSocketEndpoint; readonly response: http.IncomingMessage }
  /** An HTTP answer other than 101; `status` is the server's. */
  | { readonly _tag: "Refused"; readonly status: number; readonly message: string }
  | { readonly _tag: "Failed"; readonly message: string }

/**
 * Opens a WebSocket; `done` is called once with the outcome. Returns a function that abandons the
 * attempt (the connection is destroyed; `done` is not called after it).
 */
export const openWebSocket = (options: OpenWebSocketOptions, done: (outcome: OpenOutcome) => void): () => void => {
  let settled = false
  const key = newHandshakeKey()
  const tlsOptions: tls.ConnectionOptions = {
    ...(options.ca === undefined ? {} : { ca: [...tls.rootCertificates, ...options.ca] }),
    rejectUnauthorized: options.rejectUnauthorized ?? true,
    ...(net.isIP(options.host) ? {} : { servername: options.host }),
    ALPNProtocols: ["http/1.1"]
  }
  const createConnection = (): net.Socket => {
    const tunnel = options.tunnel
    if (options.secure) return tls.connect(tunnel === undefined ? { ...tlsOptions, host: options.host, port: options.port } : { ...tlsOptions, socket: tunnel })
    return tunnel ?? net.connect({ host: options.host, port: options.port })
  }
  const request = (options.secure ? https : http).request({
    host: options.host,
    port: options.port,
    path: options.path,
    method: "GET",
    headers: { ...options.headers, ...upgradeRequestHeaders(key) },
    createConnection
  })
  const settle = (outcome: OpenOutcome) => {
    if (settled) return
    settled = true
    clearTimeout(timer)
    done(outcome)
  }
  const fail = (message: string) => {
    if (settled) return
    request.destroy()
    settle({ _tag: "Failed", message })
  }
  const timer = setTimeout(() => fail(`no WebSocket handshake within ${options.timeoutMs} ms`), options.timeoutMs)
  request.on("error", (e) => fail(e.message))
  request.once("response", (res) => {
    res.resume()
    request.destroy()
    settle({
      _tag: "Refused",
      status: res.statusCode ?? 0,
      message: `the server answered ${res.statusCode ?? 0} ${res.statusMessage ?? ""}`.trim() + " instead of switching to WebSocket"
    })
  })
  request.once("upgrade", (res, socket, head) => {
    if (settled) return void socket.destroy()
    const s = socket as net.Socket
    if (res.statusCode !== 101) {
      s.destroy()
      return fail(`the server answered ${res.statusCode ?? 0} to the upgrade`)
    }
    const problem = checkUpgradeResponse(key, res.headers)
    if (problem !== undefined) {
      s.destroy()
      return fail(problem)
    }
    const endpoint = new WebSocketEndpoint(s, head, {
      maxMessageBytes: options.maxMessageBytes,
      maxSendMessageBytes: options.maxSendMessageBytes,
      closeTimeout: options.closeTimeout,
      binaryOnly: options.binaryOnly,
      maxTextBytes: options.maxTextBytes,
      masking: (options.maskFrames ?? true) ? "random" : "zero"
    })
    settle({ _tag: "Open", endpoint, response: res })
  })
  request.end()
  return () => {
    if (settled) return
    settled = true
    clearTimeout(timer)
    request.destroy()
  }
}
