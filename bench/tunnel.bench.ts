/**
 * Control-port tunnel figures against a direct baseline measured in the same run, all on loopback:
 * request rate and latency (keep-alive clients, fixed concurrency) and bulk response throughput.
 * Every loop is bounded in count and time.
 */
import * as http from "node:http"
import type * as net from "node:net"
import { Context, Effect, Exit, Layer, Redacted, Scope, Stream } from "effect"
import * as NodeTransport from "../src/runtime/NodeTransport.ts"
import { TunnelClient } from "../src/services/client/TunnelClient.ts"
import { ControlPort } from "../src/services/front/ControlPort.ts"
import { mbps, now, quantile, report } from "./support.ts"

const suite = "tunnel"
const Requests = 4_000
const Concurrency = 16
const TimeBudgetMs = 10_000
const BulkBytes = 64 * 1024 * 1024
const BulkChunk = Buffer.alloc(64 * 1024, 120)

const handler: http.RequestListener = (req, res) => {
  if (req.url === "/bulk") {
    res.writeHead(200, { "content-length": BulkBytes })
    let sent = 0
    const pump = () => {
      while (sent < BulkBytes) {
        sent += BulkChunk.length
        if (!res.write(BulkChunk)) return void res.once("drain", pump)
      }
      res.end()
    }
    return pump()
  }
  res.end("ok")
}

/** Request rate and latency against `port` with keep-alive connections. */
const load = async (port: number) => {
  const agent = new http.Agent({ keepAlive: true, maxSockets: Concurrency })
  const latencies: Array<number> = []
  const deadline = now() + TimeBudgetMs
  let issued = 0
  const worker = async () => {
    while (issued < Requests && now() < deadline) {
      issued++
      const start = now()
      await new Promise<void>((resolve, reject) => {
        http.get({ host: "127.0.0.1", port, path: "/", agent }, (res) => {
          res.resume()
          res.on("end", resolve)
        }).on("error", reject)
      })
      latencies.push(now() - start)
    }
  }
  const start = now()
  await Promise.all(Array.from({ length: Concurrency }, worker))
  const elapsed = now() - start
  agent.destroy()
  return { rps: latencies.length / (elapsed / 1000), p50: quantile(latencies, 0.5), p99: quantile(latencies, 0.99) }
}

/** Megabytes per second of one bulk response from `port`. */
const bulk = (port: number) =>
  new Promise<number>((resolve, reject) => {
    const start = now()
    let received = 0
    http.get({ host: "127.0.0.1", port, path: "/bulk", agent: false }, (res) => {
      res.on("data", (c: Buffer) => (received += c.length))
      res.on("end", () => resolve(mbps(received, now() - start)))
    }).on("error", reject)
  })

export const run = async (): Promise<void> => {
  const direct = http.createServer(handler)
  await new Promise<void>((resolve) => direct.listen(0, "127.0.0.1", resolve))
  const directPort = (direct.address() as net.AddressInfo).port

  const scope = Scope.makeUnsafe()
  const token = Redacted.make("bench")
  const gateway = await Effect.runPromise(Layer.buildWithScope(
    ControlPort.gatewayLayer({
      control: { address: { host: "127.0.0.1", port: 0 }, tokens: [{ name: "bench", token, ports: [{ from: 1024, to: 65_535 }] }] },
      publicHost: "127.0.0.1"
    }).pipe(Layer.provide(NodeTransport.layer)),
    scope
  ))
  const controlPort = Context.get(gateway, ControlPort).address.port!
  const client = Context.get(
    await Effect.runPromise(Layer.buildWithScope(
      TunnelClient.layer({ servers: [{ host: "127.0.0.1", port: controlPort }], token }).pipe(Layer.provide(NodeTransport.layer)),
      scope
    )),
    TunnelClient
  )
  const probe = http.createServer()
  await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve))
  const publicPort = (probe.address() as net.AddressInfo).port
  await new Promise<void>((resolve) => probe.close(() => resolve()))
  const tunnelled = http.createServer(handler)
  const listener = await Effect.runPromise(client.listen({ _tag: "Http", port: publicPort }).pipe(Scope.provide(scope)))
  await Effect.runPromise(
    Effect.forkIn(
      Stream.runForEach(listener.connections, ({ socket }) => Effect.sync(() => tunnelled.emit("connection", socket))),
      scope
    )
  )
  await Effect.runPromise(listener.bound)

  const baseline = await load(directPort)
  const viaTunnel = await load(publicPort)
  report(suite, "direct.requests_per_s", baseline.rps, "req/s")
  report(suite, "tunnel.requests_per_s", viaTunnel.rps, "req/s")
  report(suite, "tunnel.requests_ratio", viaTunnel.rps / baseline.rps, "x of direct")
  report(suite, "direct.latency_p50", baseline.p50, "ms")
  report(suite, "tunnel.latency_p50", viaTunnel.p50, "ms")
  report(suite, "tunnel.latency_p99", viaTunnel.p99, "ms")
  const bulkDirect = await bulk(directPort)
  const bulkTunnel = await bulk(publicPort)
  report(suite, "direct.bulk_throughput", bulkDirect, "MB/s")
  report(suite, "tunnel.bulk_throughput", bulkTunnel, "MB/s")
  report(suite, "tunnel.bulk_ratio", bulkTunnel / bulkDirect, "x of direct")

  tunnelled.closeAllConnections()
  direct.closeAllConnections()
  await Effect.runPromise(Scope.close(scope, Exit.void))
  await new Promise<void>((resolve) => direct.close(() => resolve()))
}
