/**
 * Loopback harness for control-port tunnels carried over WebSocket: a gateway whose control port is
 * also a `/tunnel` WebSocket path (plain or TLS), tunnel clients dialing it by URL, and a small HTTP
 * CONNECT proxy (with optional Basic credentials) that counts the tunnels it opened.
 */
import * as http from "node:http"
import * as net from "node:net"
import { Context, Effect, Layer, Redacted } from "effect"
import type { Scope } from "effect"
import * as NodeTransport from "../../src/runtime/NodeTransport.ts"
import { TunnelClient, type TunnelClientConfig } from "../../src/services/client/TunnelClient.ts"
import { ControlPort, type GatewayConfig } from "../../src/services/front/ControlPort.ts"
import type { ControlWebSocketConfig } from "../../src/services/front/ControlWebSocket.ts"
import type { WebSocketTarget } from "../../src/services/transport/WebSocketDial.ts"
import { grants, token } from "./tunnelHarness.ts"

/** A gateway with its WebSocket control path on an ephemeral loopback port; returns the context and ws URL. */
export const wsGateway = (overrides: Partial<GatewayConfig> = {}, websocket: Partial<ControlWebSocketConfig> = {}) =>
  Effect.gen(function*() {
    const context = yield* Layer.build(
      ControlPort.gatewayLayer({
        publicHost: "127.0.0.1",
        ...overrides,
        control: {
          address: { host: "127.0.0.1", port: 0 },
          tokens: grants,
          ...overrides.control,
          websocket: { address: { host: "127.0.0.1", port: 0 }, ...websocket }
        }
      }).pipe(Layer.provide(NodeTransport.layer))
    )
    const control = Context.get(context, ControlPort)
    const scheme = websocket.tls === undefined ? "ws" : "wss"
    const port = control.webSocketAddress?.port
    return { context, control, url: port === undefined ? "" : `${scheme}://127.0.0.1:${port}${websocket.path ?? "/tunnel"}` }
  })

/** A tunnel client to the given WebSocket URLs (no proxy unless the overrides name one). */
export const wsClient = (
  urls: ReadonlyArray<string>,
  overrides: Partial<TunnelClientConfig> = {},
  target: Partial<WebSocketTarget> = {}
) =>
  Layer.build(
    TunnelClient.layer({
      servers: urls.map((url) => ({ url, proxy: false as const, ...target })),
      token: Redacted.make(token),
      reconnect: { initial: "20 millis", max: "200 millis" },
      ...overrides
    }).pipe(Layer.provide(NodeTransport.layer))
  ).pipe(Effect.map((c) => Context.get(c, TunnelClient)))

export interface ConnectProxy {
  readonly port: number
  /** `CONNECT` requests answered 200. */
  readonly tunnels: () => number
  /** `CONNECT` requests refused (bad credentials). */
  readonly refusals: () => number
  /** Destroys every tunnel open through the proxy, as a proxy restart or a network cut would. */
  readonly cut: () => void
}

/**
 * An HTTP proxy that only does `CONNECT` (to loopback), requiring `user:password` Basic credentials
 * when given; closed with its tunnels when the scope closes.
 */
export const connectProxy = (credentials?: string): Effect.Effect<ConnectProxy, never, Scope.Scope> =>
  Effect.gen(function*() {
    let tunnels = 0
    let refusals = 0
    const sockets = new Set<net.Socket>()
    const track = (s: net.Socket) => {
      sockets.add(s)
      s.once("close", () => sockets.delete(s))
    }
    const server = http.createServer((_req, res) => {
      res.writeHead(405)
      res.end("CONNECT only\n")
    })
    server.on("connect", (req: http.IncomingMessage, client: net.Socket, head: Buffer) => {
      track(client)
      client.on("error", () => client.destroy())
      const expected = credentials === undefined ? undefined : `Basic ${Buffer.from(credentials).toString("base64")}`
      if (expected !== undefined && req.headers["proxy-authorization"] !== expected) {
        refusals++
        client.end("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
        return
      }
      const [host, port] = (req.url ?? "").split(":")
      if (host !== "127.0.0.1" && host !== "localhost") {
        client.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        return
      }
      const upstream = net.connect({ host: "127.0.0.1", port: Number(port) }, () => {
        tunnels++
        client.write("HTTP/1.1 200 Connection Established\r\n\r\n")
        if (head.length > 0) upstream.write(head)
        upstream.pipe(client)
        client.pipe(upstream)
      })
      track(upstream)
      upstream.on("error", () => client.destroy())
      client.on("close", () => upstream.destroy())
      upstream.on("close", () => client.destroy())
    })
    const port = yield* Effect.acquireRelease(
      Effect.promise(() => new Promise<number>((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as net.AddressInfo).port)))),
      () =>
        Effect.promise(() =>
          new Promise<void>((resolve) => {
            for (const s of sockets) s.destroy()
            server.closeAllConnections()
            server.close(() => resolve())
          })
        )
    )
    return {
      port,
      tunnels: () => tunnels,
      refusals: () => refusals,
      cut: () => {
        for (const s of sockets) s.destroy()
      }
    }
  })
