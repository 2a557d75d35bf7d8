/**
 * `switchyard client`: exposes a local service through one or more gateways' control ports. Each
 * tunnelled connection is piped to `--expose` as raw bytes (HTTP or TCP alike); the public peer's
 * address reaches HTTP services as `X-Forwarded-For`. Runs until interrupted, then drains.
 */
import * as net from "node:net"
import { Config, Console, Effect, Option, Stream } from "effect"
import { Command, Flag } from "effect/cli"
import { describeRoute } from "../../domain/Route.ts"
import { describeTarget, type GatewayTarget, TunnelClient } from "../../services/client/TunnelClient.ts"
import { isWebSocketUrl } from "../../services/transport/WebSocketDial.ts"
import { joinStreams } from "../../services/Listeners.ts"
import { registerGatewayGauges, serveOperations } from "../Admin.ts"
import { toRoute } from "../listen.ts"
import { AddressError, formatHostPort, parseHostPort } from "../NetAddress.ts"
import { exposeOverReverseHttp2 } from "../serveReverseHttp2.ts"
import * as NodeTransport from "../NodeTransport.ts"

const flags = {
  server: Flag.String("server").pipe(
    Flag.withDescription(
      "Gateway control address host:port, or ws://host[:port]/tunnel / wss://… for its WebSocket control path " +
        "(through HTTPS_PROXY/HTTP_PROXY unless NO_PROXY covers it); repeat for several gateways"
    ),
    Flag.atLeast(1)
  ),
  token: Flag.Redacted("token").pipe(
    Flag.withDescription("Token granted by the gateway (or SWITCHYARD_TOKEN)"),
    Flag.withFallbackConfig(Config.Redacted("SWITCHYARD_TOKEN"))
  ),
  expose: Flag.String("expose").pipe(Flag.withDescription("Local address to forward to, host:port")),
  port: Flag.Int("port").pipe(Flag.withDescription("Public port on the gateway")),
  path: Flag.String("path").pipe(Flag.withDescription("HTTP path prefix, e.g. /a"), Flag.optional),
  domain: Flag.String("domain").pipe(Flag.withDescription("HTTP domain suffix, e.g. example.com"), Flag.optional),
  tcp: Flag.Boolean("tcp").pipe(Flag.withDescription("Raw TCP instead of HTTP"), Flag.withDefault(false)),
  tlsCert: Flag.FileText("tls-cert").pipe(Flag.withDescription("PEM certificate: the gateway terminates TLS with it"), Flag.optional),
  tlsKey: Flag.FileText("tls-key").pipe(Flag.withDescription("PEM private key for --tls-cert"), Flag.optional),
  label: Flag.String("label").pipe(Flag.withDescription("Name shown in the gateway's logs"), Flag.optional),
  ca: Flag.FileText("ca").pipe(
    Flag.withDescription("PEM CA certificate(s) trusted for wss:// gateways, besides the system's"),
    Flag.optional
  ),
  h2: Flag.Boolean("h2").pipe(
    Flag.withDescription("--server names reverse-HTTP/2 tunnel ports: serve HTTP/2 to the gateway, forward to --expose as HTTP"),
    Flag.withDefault(false)
  )
}

export const clientCommand = Command.make("client", flags, Effect.fn(function*(f) {
  const servers = []
  const targets: Array<GatewayTarget> = []
  const ca = Option.getOrUndefined(f.ca)
  for (const text of f.server) {
    if (isWebSocketUrl(text)) {
      targets.push({ url: text.trim(), ...(ca === undefined ? {} : { ca }) })
      continue
    }
    const parsed = parseHostPort(text)
    if (parsed instanceof Error) return yield* parsed
    servers.push(parsed)
    targets.push(parsed)
  }
  const expose = parseHostPort(f.expose)
  if (expose instanceof Error) return yield* expose
  const path = Option.getOrUndefined(f.path)
  const domain = Option.getOrUndefined(f.domain)
  const cert = Option.getOrUndefined(f.tlsCert)
  const key = Option.getOrUndefined(f.tlsKey)
  const route = toRoute({
    port: f.port,
    tcp: f.tcp,
    http: { ...(domain ? { domainSuffix: domain } : {}), ...(path ? { pathPrefix: path } : {}) },
    tls: cert !== undefined && key !== undefined
      ? { domainSuffix: domain ?? "localhost", cert, key, then: f.tcp ? "tcp" : "http", ...(path ? { pathPrefix: path } : {}) }
      : undefined
  })
  if (f.h2) {
    if (servers.length !== targets.length) {
      return yield* new AddressError({ reason: "Malformed", message: "--h2 needs host:port gateways; ws:// and wss:// are for control-port tunnels" })
    }
    yield* serveOperations({ command: "client", ready: () => true })
    yield* exposeOverReverseHttp2({ gateways: servers, target: expose, token: f.token, routes: [route], label: Option.getOrUndefined(f.label) })
    yield* Console.log(`switchyard client: ${describeRoute(route)} over reverse HTTP/2 on ${f.server.join(", ")} -> ${formatHostPort(expose)}`)
    return yield* Effect.never
  }
  const client = yield* TunnelClient.make({ servers: targets, token: f.token, label: Option.getOrUndefined(f.label) })
  const gateways = () => client.status().map((g) => ({ gateway: describeTarget(g.address), connected: g.connected, attempts: g.attempts, established: g.established }))
  yield* serveOperations({
    command: "client",
    ready: () => gateways().some((g) => g.connected),
    sessions: () => [{ frontDoor: "control", count: gateways().filter((g) => g.connected).length }],
    register: (metrics) => registerGatewayGauges(metrics, "control", gateways)
  })
  const listener = yield* client.listen(route)
  yield* Console.log(`switchyard client: ${describeRoute(route)} on ${targets.map(describeTarget).join(", ")} -> ${formatHostPort(expose)}`)
  return yield* Stream.runForEach(listener.connections, ({ socket }) =>
    Effect.sync(() => {
      const local = net.createConnection({ host: expose.host, port: expose.port, allowHalfOpen: true })
      local.on("error", () => local.destroy())
      socket.on("error", () => socket.destroy())
      joinStreams(socket, local, () => {})
    }))
}, Effect.scoped, Effect.provide(NodeTransport.layer))).pipe(
  Command.withDescription("Expose a local service through a switchyard gateway's control port")
)

