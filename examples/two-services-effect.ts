/**
 * Two services on one public port, with Effect: the gateway and two tunnel clients are Layers, each
 * service's connections are a Stream fed to an `http.Server`. Run with
 * `npm exec -- node examples/two-services-effect.ts`; it prints the answers for /a and /b and exits,
 * closing every scope (gateway, clients, listeners) on the way out.
 */
import * as http from "node:http"
import { Context, Effect, Layer, Redacted, Stream } from "effect"
import type { RouteDefinition } from "../src/domain/Route.ts"
import * as NodeTransport from "../src/runtime/NodeTransport.ts"
import { TunnelClient } from "../src/services/client/TunnelClient.ts"
import { ControlPort } from "../src/services/front/ControlPort.ts"

const token = Redacted.make("demo-token")

const Gateway = ControlPort.gatewayLayer({
  control: { address: { host: "127.0.0.1", port: 0 }, tokens: [{ name: "demo", token, ports: [8000] }] },
  publicHost: "127.0.0.1"
}).pipe(Layer.provide(NodeTransport.layer))

/** Serves `text` on `route` through a tunnel client of its own. */
const service = (controlPort: number, route: RouteDefinition, text: string) =>
  Effect.gen(function*() {
    const context = yield* Layer.build(
      TunnelClient.layer({ servers: [{ host: "127.0.0.1", port: controlPort }], token, label: text }).pipe(Layer.provide(NodeTransport.layer))
    )
    const client = Context.get(context, TunnelClient)
    const server = http.createServer((_req, res) => res.end(`${text}\n`))
    yield* Effect.addFinalizer(() => Effect.sync(() => server.closeAllConnections()))
    const listener = yield* client.listen(route)
    yield* Effect.forkScoped(Stream.runForEach(listener.connections, ({ socket }) => Effect.sync(() => server.emit("connection", socket))))
    yield* listener.bound
  })

const get = (path: string) =>
  Effect.promise(() =>
    new Promise<string>((resolve, reject) => {
      http.get({ host: "127.0.0.1", port: 8000, path, agent: false }, (res) => {
        let body = ""
        res.on("data", (c: Buffer) => (body += c))
        res.on("end", () => resolve(`${res.statusCode} ${body.trim()}`))
      }).on("error", reject)
    })
  )

const program = Effect.gen(function*() {
  const control = yield* ControlPort
  const port = control.address.port!
  yield* service(port, { _tag: "Http", port: 8000, pathPrefix: "/a" }, "From A")
  yield* service(port, { _tag: "Http", port: 8000, pathPrefix: "/b" }, "From B")
  for (const path of ["/a", "/b", "/b/deeper"]) yield* Effect.log(`GET ${path} -> ${yield* get(path)}`)
})

Effect.runPromise(program.pipe(Effect.scoped, Effect.provide(Gateway)))
