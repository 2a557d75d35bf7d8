/**
 * The yamux-over-WebSocket figures of `npm run bench -- websocket`: a public caller → gateway public
 * port → yamux stream inside one WebSocket (`ws://…/tunnel`) → tunnel client → the backend's HTTP server,
 * against calling the same server directly, interleaved in one run on loopback. Small-request rate with
 * 20 concurrent keep-alive Node callers (median of bounded rounds, everything in the bench process),
 * with masked (the `ws://` default) and unmasked client frames and the TCP control port for comparison;
 * then a 100 MiB download by curl with the gateway and the far side (tunnel client and backend) each in
 * its own process, against the backend alone in its process.
 */
import * as http from "node:http"
import type * as net from "node:net"
import { Context, Effect, Exit, Layer, Redacted, Scope, Stream } from "effect"
import * as NodeTransport from "../src/runtime/NodeTransport.ts"
import { type GatewayTarget, TunnelClient } from "../src/services/client/TunnelClient.ts"
import { ControlPort } from "../src/services/front/ControlPort.ts"
import { announce, closeOnSignal, curlDownload, type RoleProcess, RoleVariable, startRole } from "./roles.ts"
import { now, quantile, report } from "./support.ts"

const callers = 20
/** Each load round stops at whichever comes first; rounds of the paths are interleaved. */
const maxRequests = 20_000
const maxMillis = 600
const loadRounds = 5
/** Download rounds per path, interleaved (the best is reported; the first also warms the processes). */
const downloadRounds = 3
const downloadBytes = 100 * 1024 * 1024
const sliceBytes = 64 * 1024
const smallBody = Buffer.from("ok")

const handler: http.RequestListener = (req, res) => {
  if (req.url === "/big") {
    const big = Buffer.alloc(sliceBytes, 0x5a)
    res.writeHead(200, { "Content-Length": String(downloadBytes) })
    let sent = 0
    const pump = () => {
      while (sent < downloadBytes) {
        sent += big.length
        if (!res.write(big)) return void res.once("drain", pump)
      }
      res.end()
    }
    return pump()
  }
  res.writeHead(200, { "Content-Length": String(smallBody.length) })
  res.end(smallBody)
}

const get = (agent: http.Agent, port: number, path: string): Promise<number> =>
  new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, path, agent }, (res) => {
      let n = 0
      res.on("data", (c: Buffer) => (n += c.length))
      res.on("end", () => (res.statusCode === 200 ? resolve(n) : reject(new Error(`status ${res.statusCode}`))))
      res.on("error", reject)
    })
    req.on("error", reject)
    req.end()
  })

const load = async (port: number): Promise<number> => {
  const agent = new http.Agent({ keepAlive: true, maxSockets: callers })
  let issued = 0
  let done = 0
  const start = now()
  const loop = async () => {
    while (issued < maxRequests && now() - start < maxMillis) {
      issued++
      await get(agent, port, "/small")
      done++
    }
  }
  await Promise.all(Array.from({ length: callers }, loop))
  const elapsed = now() - start
  agent.destroy()
  return done / (elapsed / 1000)
}

const listenLoopback = (server: http.Server): Promise<number> =>
  new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as net.AddressInfo).port)))

const freeLoopbackPort = async (): Promise<number> => {
  const probe = http.createServer()
  const port = await listenLoopback(probe)
  await new Promise<void>((resolve) => probe.close(() => resolve()))
  return port
}

const benchToken = Redacted.make("bench")

const gatewayLayer = ControlPort.gatewayLayer({
  control: {
    address: { host: "127.0.0.1", port: 0 },
    tokens: [{ name: "bench", token: benchToken, ports: [{ from: 1024, to: 65_535 }] }],
    websocket: { address: { host: "127.0.0.1", port: 0 } }
  },
  publicHost: "127.0.0.1"
}).pipe(Layer.provide(NodeTransport.layer))

/** A tunnel client serving `handler` on a fresh public port of the gateway; resolves to that port. */
const startTunnel = async (scope: Scope.Scope, url: string, token: Redacted.Redacted<string>, maskFrames: boolean) =>
  startTunnelOn(scope, url, token, maskFrames, await freeLoopbackPort())

/** `url` is a `ws://` control path, or `host:port` of the TCP control port (the comparison path). */
const startTunnelOn = async (scope: Scope.Scope, url: string, token: Redacted.Redacted<string>, maskFrames: boolean, publicPort: number) => {
  const [host, port] = url.split(":")
  const server: GatewayTarget = url.startsWith("ws") ? { url, proxy: false, maskFrames } : { host: host!, port: Number(port) }
  const client = Context.get(
    await Effect.runPromise(Layer.buildWithScope(
      TunnelClient.layer({ servers: [server], token }).pipe(Layer.provide(NodeTransport.layer)),
      scope
    )),
    TunnelClient
  )
  const backend = http.createServer(handler)
  await Effect.runPromise(Scope.addFinalizer(scope, Effect.sync(() => backend.closeAllConnections())))
  const listener = await Effect.runPromise(client.listen({ _tag: "Http", port: publicPort }).pipe(Scope.provide(scope)))
  await Effect.runPromise(Effect.forkIn(
    Stream.runForEach(listener.connections, ({ socket }) => Effect.sync(() => backend.emit("connection", socket))),
    scope
  ))
  await Effect.runPromise(listener.bound)
  return publicPort
}

// ---------------------------------------------------------------------------------------------------
// Child roles for the downloads: the gateway, a tunnel client with its backend, the backend alone.

const role = process.env[RoleVariable]
if (role === "yamux-gateway") {
  const scope = Scope.makeUnsafe()
  const gateway = Context.get(await Effect.runPromise(Layer.buildWithScope(gatewayLayer, scope)), ControlPort)
  announce("ws", gateway.webSocketAddress!.port)
  announce("control", gateway.address.port)
  announce("ready")
  closeOnSignal(() => Effect.runPromise(Scope.close(scope, Exit.void)))
}
if (role === "yamux-far-side") {
  const scope = Scope.makeUnsafe()
  await startTunnelOn(
    scope,
    process.env.SWITCHYARD_YAMUX_BENCH_URL!,
    benchToken,
    process.env.SWITCHYARD_YAMUX_BENCH_MASK === "1",
    Number(process.env.SWITCHYARD_YAMUX_BENCH_PUBLIC_PORT)
  )
  announce("ready")
  closeOnSignal(() => Effect.runPromise(Scope.close(scope, Exit.void)))
}
if (role === "yamux-backend") {
  const backend = http.createServer(handler)
  announce("port", await listenLoopback(backend))
  announce("ready")
  closeOnSignal(() =>
    new Promise<void>((resolve) => {
      backend.close(() => resolve())
      backend.closeAllConnections()
    })
  )
}

/**
 * The 100 MiB downloads with curl: directly from a backend process, and through a gateway process and a
 * tunnel client process (its backend in the same process, as a deployment runs it) over a masked and an
 * unmasked WebSocket and over the TCP control port; best of interleaved rounds.
 */
const processDownloads = async (): Promise<Map<string, number>> => {
  const file = import.meta.filename
  const started: Array<RoleProcess> = []
  try {
    const backend = await startRole(file, "yamux-backend")
    started.push(backend)
    const gateway = await startRole(file, "yamux-gateway")
    started.push(gateway)
    const wsUrl = `ws://127.0.0.1:${await gateway.value("ws")}/tunnel`
    const tcp = `127.0.0.1:${await gateway.value("control")}`
    const farSide = async (url: string, mask: boolean) => {
      const publicPort = await freeLoopbackPort()
      started.push(await startRole(file, "yamux-far-side", {
        SWITCHYARD_YAMUX_BENCH_URL: url,
        SWITCHYARD_YAMUX_BENCH_MASK: mask ? "1" : "0",
        SWITCHYARD_YAMUX_BENCH_PUBLIC_PORT: String(publicPort)
      }))
      return publicPort
    }
    const paths = [
      { name: "yamux_direct", port: Number(await backend.value("port")) },
      { name: "yamux", port: await farSide(wsUrl, true) },
      { name: "yamux_unmasked", port: await farSide(wsUrl, false) },
      { name: "yamux_tcp", port: await farSide(tcp, false) }
    ]
    const best = new Map<string, number>(paths.map((p) => [p.name, 0]))
    for (let round = 0; round < downloadRounds; round++) {
      for (const p of paths) best.set(p.name, Math.max(best.get(p.name)!, await curlDownload(`http://127.0.0.1:${p.port}/big`, downloadBytes)))
    }
    return best
  } finally {
    for (const p of started.reverse()) await p.stop()
  }
}

/** Runs the yamux-over-WebSocket rounds and prints its figures under `suite`. */
export const runYamuxOverWebSocket = async (suite: string): Promise<void> => {
  const direct = http.createServer(handler)
  const directPort = await listenLoopback(direct)
  const scope = Effect.runSync(Scope.make())
  try {
    const token = benchToken
    const gateway = await Effect.runPromise(Layer.buildWithScope(gatewayLayer, scope))
    const wsPort = Context.get(gateway, ControlPort).webSocketAddress!.port
    const url = `ws://127.0.0.1:${wsPort}/tunnel`
    const masked = await startTunnel(scope, url, token, true)
    const unmasked = await startTunnel(scope, url, token, false)
    const overTcp = await startTunnel(scope, `127.0.0.1:${Context.get(gateway, ControlPort).address.port}`, token, false)
    const paths = [
      { name: "direct", port: directPort },
      { name: "yamux", port: masked },
      { name: "yamux_unmasked", port: unmasked },
      { name: "yamux_tcp", port: overTcp }
    ]
    const rates = new Map<string, Array<number>>(paths.map((p) => [p.name, []]))
    for (const p of paths) await load(p.port)
    for (let round = 0; round < loadRounds; round++) {
      for (const p of paths) rates.get(p.name)!.push(await load(p.port))
    }
    const baseline = quantile(rates.get("direct")!, 0.5)
    const yamux = quantile(rates.get("yamux")!, 0.5)
    const yamuxUnmasked = quantile(rates.get("yamux_unmasked")!, 0.5)
    report(suite, "yamux_direct_req_per_s", baseline, "req/s")
    report(suite, "yamux_req_per_s", yamux, "req/s")
    report(suite, "yamux_ratio", yamux / baseline, "x direct")
    report(suite, "yamux_unmasked_req_per_s", yamuxUnmasked, "req/s")
    report(suite, "yamux_unmasked_ratio", yamuxUnmasked / baseline, "x direct")
    report(suite, "yamux_tcp_ratio", quantile(rates.get("yamux_tcp")!, 0.5) / baseline, "x direct")
    for (const [name, value] of await processDownloads()) report(suite, `download_100MiB_${name}`, value, "MB/s")
  } finally {
    await Effect.runPromise(Scope.close(scope, Exit.void))
    direct.closeAllConnections()
    await new Promise<void>((resolve) => direct.close(() => resolve()))
  }
}
