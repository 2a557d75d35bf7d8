/**
 * Loopback harness for control-port tunnel tests: a gateway (control port + public listeners) and
 * tunnel clients serving real `http` servers, all on 127.0.0.1 and all closed with the test's scope.
 */
import * as http from "node:http"
import { Effect, Layer, Redacted, Scope, Stream } from "effect"
import type { RouteDefinition } from "../../src/domain/Route.ts"
import type { TokenGrant } from "../../src/domain/TokenPolicy.ts"
import * as NodeTransport from "../../src/runtime/NodeTransport.ts"
import { TunnelClient, type TunnelClientConfig } from "../../src/services/client/TunnelClient.ts"
import { ControlPort, type GatewayConfig } from "../../src/services/front/ControlPort.ts"
import { Dispatcher } from "../../src/services/Dispatcher.ts"
import { Listeners } from "../../src/services/Listeners.ts"
import { Registry } from "../../src/services/Registry.ts"

export const token = "test-token"
export const grants: ReadonlyArray<TokenGrant> = [
  { name: "tests", token: Redacted.make(token), ports: [{ from: 1024, to: 65_535 }] }
]

export type Gateway = ControlPort | Listeners | Registry | Dispatcher

/** Builds a gateway on loopback (control port on an ephemeral port) for the scope. */
export const gateway = (overrides: Partial<GatewayConfig> = {}) =>
  Layer.build(
    ControlPort.gatewayLayer({
      control: { address: { host: "127.0.0.1", port: 0 }, tokens: grants, ...overrides.control },
      publicHost: "127.0.0.1",
      ...overrides
    }).pipe(Layer.provide(NodeTransport.layer))
  )

/** A tunnel client to the given control ports. */
export const client = (ports: ReadonlyArray<number>, overrides: Partial<TunnelClientConfig> = {}) =>
  Layer.build(
    TunnelClient.layer({
      servers: ports.map((port) => ({ host: "127.0.0.1", port })),
      token: Redacted.make(token),
      reconnect: { initial: "20 millis", max: "200 millis" },
      ...overrides
    }).pipe(Layer.provide(NodeTransport.layer))
  )

/**
 * Serves `handler` through `tunnel` on `route` until the scope closes; resolves once every gateway bound
 * the route.
 */
export const serveHttp = (
  tunnel: TunnelClient["Service"],
  route: RouteDefinition,
  handler: http.RequestListener
): Effect.Effect<http.Server, never, Scope.Scope> =>
  Effect.gen(function*() {
    const server = http.createServer(handler)
    yield* Effect.addFinalizer(() => Effect.sync(() => server.closeAllConnections()))
    let boundCount = 0
    const gateways = tunnel.config.servers.length
    let resolveBound!: () => void
    let rejectBound!: (e: Error) => void
    const boundPromise = new Promise<void>((resolve, reject) => {
      resolveBound = resolve
      rejectBound = reject
    })
    yield* tunnel.addListener({
      route,
      onConnection: ({ socket }) => server.emit("connection", socket),
      onRejected: (_g, reason, message) => rejectBound(new Error(`${reason}: ${message}`)),
      onBound: () => {
        if (++boundCount === gateways) resolveBound()
      }
    })
    yield* Effect.promise(() => boundPromise)
    return server
  })

/** Serves a TCP echo through `tunnel` on `route`, using the connections stream. */
export const serveEcho = (tunnel: TunnelClient["Service"], route: RouteDefinition) =>
  Effect.gen(function*() {
    const listener = yield* tunnel.listen(route)
    yield* Effect.forkScoped(Stream.runForEach(listener.connections, ({ socket }) =>
      Effect.sync(() => {
        socket.on("error", () => socket.destroy())
        socket.pipe(socket)
      })))
    yield* listener.bound
  })
