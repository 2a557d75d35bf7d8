/**
 * switchyard's public API for embedding: the gateway and client Layers of every front door, the plain-Node
 * entry points (`listen`, `serveReverseHttp2`), yamux sessions and the Node transport. Deeper modules are
 * implementation and may change between versions.
 */

// Control-port tunnels: the gateway (TCP and WebSocket control paths) and the backend side.
export {
  ControlPort,
  type ControlPortConfig,
  ControlPortError,
  type GatewayConfig
} from "./services/front/ControlPort.ts"
export type { ControlWebSocketConfig } from "./services/front/ControlWebSocket.ts"
export { TunnelClient, type TunnelClientConfig } from "./services/client/TunnelClient.ts"
export { listen, type ListenDefinition, type ListenOptions, TunnelServer } from "./runtime/listen.ts"
export {
  encodeProxyHeader,
  type ProxiedConnection,
  type ProxyProtocolVersion
} from "./domain/ProxyProtocol.ts"

// Routing core shared by the tunnel front doors.
export { Registry, type RegistryConfig } from "./services/Registry.ts"
export { DispatchError, Dispatcher, type DispatcherConfig } from "./services/Dispatcher.ts"
export { Listeners, type ListenersConfig } from "./services/Listeners.ts"
export type { RouteDefinition } from "./domain/Route.ts"
export { parseTokenGrant, type TokenGrant } from "./domain/TokenPolicy.ts"

// HTTP forwarding core.
export { Forwarder, type ForwarderConfig, makeForwarder } from "./services/Forwarder.ts"
export { streamUpstream, tcpUpstream, type Upstream, unixUpstream } from "./services/forward/Upstream.ts"
export { CLIENT_LIMIT_DEFAULTS, type ClientLimitKind, type ClientLimits } from "./domain/ClientLimits.ts"
export type { ClientLimitEvent } from "./services/forward/http1/Admission.ts"

// Docker socket proxy.
export { SocketProxy, SocketProxyError } from "./services/front/SocketProxy.ts"
export type { SocketProxyConfig } from "./domain/SocketProxyConfig.ts"

// wsp-compatible WebSocket tunnels.
export { WspServer, WspServerError } from "./services/front/WspServer.ts"
export { WspClient, WspClientError } from "./services/client/WspClient.ts"
export type { WspClientConfig, WspServerConfig } from "./domain/WspConfig.ts"

// Reverse HTTP/2.
export { ReverseH2, type ReverseH2Config, ReverseH2Error } from "./services/front/ReverseH2.ts"
export { H2Client, type H2ClientConfig } from "./services/client/H2Client.ts"
export { serveReverseHttp2 } from "./runtime/serveReverseHttp2.ts"

// yamux and transports.
export * as YamuxSession from "./services/yamux/Session.ts"
export { YamuxStream } from "./services/yamux/Stream.ts"
export { YamuxError } from "./services/yamux/YamuxError.ts"
export { startSession } from "./services/yamux/NodeSession.ts"
export { type Address, type Connection, Transport, TransportError } from "./services/Transport.ts"
export * as NodeTransport from "./runtime/NodeTransport.ts"

// Operations.
export { Metrics } from "./services/Metrics.ts"
