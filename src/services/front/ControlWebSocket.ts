/**
 * The control port as a WebSocket path (default `/tunnel`) on an HTTP or HTTPS port, for backends
 * behind networks that only let HTTP(S) out. Each upgraded WebSocket is handed on as a Connection; the
 * handshake, tokens and sessions are ControlPort's. Other paths answer 404; nothing else is served.
 */
import { Buffer } from "node:buffer"
import * as http from "node:http"
import * as https from "node:https"
import type * as net from "node:net"
import type { Duplex } from "node:stream"
import { Duration, Effect } from "effect"
import type { Scope } from "effect"
import { type Address, TransportError } from "../Transport.ts"
import type { AdmissionRefusal, HandshakeTicket } from "./HandshakeAdmission.ts"
import { DefaultMaxPayload, type WebSocketConnectionOptions } from "../transport/WebSocketConnection.ts"
import type { WebSocketEndpoint } from "../transport/WebSocketEndpoint.ts"
import { acceptWebSocket, type UpgradeRequest } from "../transport/WebSocketOpen.ts"

/** The path the control port answers on by default. */
export const DefaultTunnelPath = "/tunnel"
/** Where the WebSocket control port listens by default. */
export const DefaultWebSocketControlAddress: Address = { host: "127.0.0.1", port: 9998 }
/** Time a client has to send its upgrade request's head. */
export const DefaultUpgradeHeadersTimeout: Duration.Duration = Duration.seconds(10)

export interface ControlWebSocketConfig extends Omit<WebSocketConnectionOptions, "localAddress" | "remoteAddress"> {
  /** HTTP(S) address of its own (default 127.0.0.1:9998); leave it out to only mount it elsewhere. */
  readonly address?: Address | undefined
  /** Upgrade path (default `/tunnel`). */
  readonly path?: string | undefined
  /** Serve `wss://` with this certificate and key (PEM). */
  readonly tls?: { readonly cert: string; readonly key: string } | undefined
  /** Set to false to mount the path on another server only (see `ControlPort.handleUpgrade`). */
  readonly listen?: boolean | undefined
}

/** An accepted tunnel WebSocket, with the peer as the TCP connection saw it. */
export interface AcceptedWebSocket {
  readonly endpoint: WebSocketEndpoint
  readonly remoteAddress: Address
  readonly localAddress: Address
  /** The connection under the WebSocket. */
  readonly socket: net.Socket
  /** Came in over TLS (`wss://`, here or on the server it is mounted on). */
  readonly secure: boolean
  /** Held from the upgrade until the peer authenticated (from `admit`); release it then or on close. */
  readonly ticket: HandshakeTicket
  /**
   * Tells `onBytes` the size of every read of the connection (TLS: decrypted) from now on, whoever
   * consumes it, until the returned function is called: a byte budget before authentication.
   */
  readonly watchReads: (onBytes: (bytes: number) => void) => () => void
}

/** How upgrades are admitted before any WebSocket is made for them. */
export interface UpgradeAdmission {
  /** A ticket for a handshake from `remote`, or why not (answered with 503). */
  readonly admit: (remote: Address) => HandshakeTicket | AdmissionRefusal
  /** Called for each upgrade refused by `admit`. */
  readonly onRefused?: ((refusal: AdmissionRefusal, remote: Address) => void) | undefined
}

const noTicket: HandshakeTicket = { release: () => {} }

const pathOf = (url: string | undefined): string => {
  const u = url ?? "/"
  const q = u.indexOf("?")
  return q >= 0 ? u.slice(0, q) : u
}

const refuse = (socket: Duplex, status: number, text: string): void => {
  const body = `${text}\n`
  socket.end(`HTTP/1.1 ${status} ${http.STATUS_CODES[status] ?? ""}\r\nContent-Type: text/plain; charset=utf-8\r\n` +
    `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`)
}

/** An upgrade handler for `path`; returns false (touching nothing) for other paths. */
export interface UpgradeHandler {
  (req: UpgradeRequest, socket: Duplex, head: Buffer): boolean
  /** Terminates every WebSocket it accepted. */
  readonly close: () => void
}

/** Accepts WebSocket upgrades on the configured path and passes each to `onWebSocket`. */
export const makeUpgradeHandler = (
  config: ControlWebSocketConfig,
  onWebSocket: (accepted: AcceptedWebSocket) => void,
  admission?: UpgradeAdmission | undefined
): UpgradeHandler => {
  const path = config.path ?? DefaultTunnelPath
  const maxMessageBytes = config.maxPayload ?? DefaultMaxPayload
  const accepted = new Set<WebSocketEndpoint>()
  const handler = (req: UpgradeRequest, socket: Duplex, head: Buffer): boolean => {
    if (pathOf(req.url) !== path) return false
    socket.on("error", () => socket.destroy())
    const s = req.socket
    const secure = (s as { encrypted?: boolean }).encrypted === true
    const remoteAddress: Address = { host: s.remoteAddress, port: s.remotePort }
    const localAddress: Address = { host: s.localAddress, port: s.localPort }
    const admitted = admission === undefined ? noTicket : admission.admit(remoteAddress)
    if (typeof admitted === "string") {
      admission?.onRefused?.(admitted, remoteAddress)
      refuse(socket, 503, "too many tunnel handshakes in progress")
      return true
    }
    // a connection that closes before it authenticated gives its place back
    socket.once("close", admitted.release)
    const endpoint = acceptWebSocket(req, socket, head, { maxMessageBytes, maxSendMessageBytes: config.maxMessageBytes, binaryOnly: true })
    if (endpoint === undefined) return true
    accepted.add(endpoint)
    socket.once("close", () => accepted.delete(endpoint))
    const watchReads = (onBytes: (bytes: number) => void): (() => void) => {
      let watching = true
      // (a listener removed while a read is being handed out would still hear that read)
      const onData = (chunk: Buffer) => watching && onBytes(chunk.length)
      s.on("data", onData)
      return () => {
        watching = false
        s.off("data", onData)
      }
    }
    onWebSocket({ endpoint, remoteAddress, localAddress, socket: s, secure, ticket: admitted, watchReads })
    return true
  }
  return Object.assign(handler, {
    close: () => {
      for (const endpoint of accepted) endpoint.terminate()
      accepted.clear()
    }
  })
}

/**
 * Listens on `address` over HTTP or HTTPS: upgrades on the path go to `handler`, every other request
 * gets 404. Stops, closing every connection, when the scope closes. Returns the bound address.
 */
export const listenControlWebSocket = (
  config: ControlWebSocketConfig,
  handler: UpgradeHandler
): Effect.Effect<Address, TransportError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.callback<{ server: http.Server; bound: Address }, TransportError>((resume) => {
      const onRequest: http.RequestListener = (req, res) => {
        req.resume()
        res.writeHead(404, { "content-type": "text/plain; charset=utf-8" })
        res.end(`switchyard: tunnels connect with a WebSocket upgrade on ${config.path ?? DefaultTunnelPath}\n`)
      }
      const options = { headersTimeout: Duration.toMillis(DefaultUpgradeHeadersTimeout) }
      const server: http.Server = config.tls === undefined
        ? http.createServer(options, onRequest)
        : https.createServer({ ...options, cert: config.tls.cert, key: config.tls.key }, onRequest)
      server.on("upgrade", (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
        if (!handler(req, socket, head)) {
          socket.on("error", () => socket.destroy())
          refuse(socket, 404, "404 page not found")
        }
      })
      server.on("clientError", (_e, socket) => socket.destroy())
      const address = config.address ?? DefaultWebSocketControlAddress
      server.once("error", (e) => resume(Effect.fail(new TransportError({ reason: "Listen", message: `websocket control port: listen failed: ${e.message}` }))))
      server.listen(address.port ?? 0, address.host ?? "127.0.0.1", () => {
        const a = server.address() as net.AddressInfo
        resume(Effect.succeed({ server, bound: { host: a.address, port: a.port } }))
      })
    }),
    ({ server }) =>
      Effect.callback<void>((resume) => {
        handler.close()
        server.close(() => resume(Effect.void))
        server.closeAllConnections()
      })
  ).pipe(Effect.map((r) => r.bound))

