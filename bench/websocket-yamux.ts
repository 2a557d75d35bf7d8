/**
 * The yamux-over-WebSocket figures of `npm run bench -- websocket`: a public caller → gateway public
 * port → yamux stream inside one WebSocket (`ws://…/tunnel`) → tunnel client → the backend's HTTP server,
 * against calling the same server directly, interleaved in one run on loopback. Small-request rate with
 * 20 concurrent keep-alive callers (median of bounded rounds) and a 100 MiB download, with masked
 * (the `ws://` default) and unmasked client frames, and the TCP control port for comparison; then the download with the far side (backend and
 * tunnel client) in a worker thread, as on another machine.
 */
import * as http from "node:http"
import type * as net from "node:net"
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads"
import { Context, Effect, Exit, Layer, Redacted, Scope, Stream } from "effect"
import * as NodeTransport from "../src/runtime/NodeTransport.ts"
import { type GatewayTarget, TunnelClient } from "../src/services/client/TunnelClient.ts"
import { ControlPort } from "../src/services/front/ControlPort.ts"
import { mbps, now, quantile, report } from "./support.ts"

const callers = 20
/** Each load round stops at whichever comes first; rounds of the paths are interleaved. */
const maxRequests = 20_000
const maxMillis = 600
const loadRounds = 5
const downloadRounds = 2
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

const download = async (port: number): Promise<number> => {
  const agent = new http.Agent({ keepAlive: false })
  const start = now()
  const n = await get(agent, port, "/big")
  const elapsed = now() - start
  agent.destroy()
  if (n !== downloadBytes) throw new Error(`downloaded ${n} bytes, expected ${downloadBytes}`)
  return mbps(n, elapsed)
}

const listenLoopback = (server: http.Server): Promise<number> =>
  new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as net.AddressInfo).port)))

const freeLoopbackPort = async (): Promise<number> => {
  const probe = http.createServer()
  const port = await listenLoopback(probe)
  await new Promise<void>((resolve) => probe.close(() => resolve()))
  return port
}

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

interface FarSideData {
  readonly yamuxFarSide: true
  readonly url: string
  readonly publicPort: number
  readonly maskFrames: boolean
}

/** Worker body: the backend and its tunnel client; stops on any message. */
const runFarSide = async (data: FarSideData): Promise<void> => {
  const scope = Effect.runSync(Scope.make())
  await startTunnelOn(scope, data.url, Redacted.make("bench"), data.maskFrames, data.publicPort)
  parentPort!.postMessage("ready")
  parentPort!.once("message", async () => {
    await Effect.runPromise(Scope.close(scope, Exit.void))
    parentPort!.close()
  })
}

if (!isMainThread && (workerData as Partial<FarSideData> | undefined)?.yamuxFarSide === true) {
  await runFarSide(workerData as FarSideData)
}

/** The 100 MiB download with the backend and tunnel client in a worker thread; best of the rounds. */
const splitDownload = async (url: string, maskFrames: boolean): Promise<number> => {
  const publicPort = await freeLoopbackPort()
  const worker = new Worker(new URL(import.meta.url), { workerData: { yamuxFarSide: true, url, publicPort, maskFrames } satisfies FarSideData })
  try {
    await new Promise<void>((resolve, reject) => {
      worker.once("message", () => resolve())
      worker.once("error", reject)
    })
    let best = 0
    // one more round than in one thread: the first also warms the worker's code
    for (let round = 0; round <= downloadRounds; round++) best = Math.max(best, await download(publicPort))
    return best
  } finally {
    await new Promise<void>((resolve) => {
      worker.once("exit", () => resolve())
      worker.postMessage("stop")
    })
  }
}

/** Runs the yamux-over-WebSocket rounds and prints its figures under `suite`. */
export const runYamuxOverWebSocket = async (suite: string): Promise<void> => {
  const direct = http.createServer(handler)
  const directPort = await listenLoopback(direct)
  const scope = Effect.runSync(Scope.make())
  try {
    const token = Redacted.make("bench")
    const gateway = await Effect.runPromise(Layer.buildWithScope(
      ControlPort.gatewayLayer({
        control: {
          address: { host: "127.0.0.1", port: 0 },
          tokens: [{ name: "bench", token, ports: [{ from: 1024, to: 65_535 }] }],
          websocket: { address: { host: "127.0.0.1", port: 0 } }
        },
        publicHost: "127.0.0.1"
      }).pipe(Layer.provide(NodeTransport.layer)),
      scope
    ))
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
    const downloads = new Map<string, Array<number>>(paths.map((p) => [p.name, []]))
    for (let round = 0; round < downloadRounds; round++) {
      for (const p of paths) downloads.get(p.name)!.push(await download(p.port))
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
    report(suite, "download_100MiB_yamux_direct", Math.max(...downloads.get("direct")!), "MB/s")
    report(suite, "download_100MiB_yamux", Math.max(...downloads.get("yamux")!), "MB/s")
    report(suite, "download_100MiB_yamux_unmasked", Math.max(...downloads.get("yamux_unmasked")!), "MB/s")
    report(suite, "download_100MiB_yamux_tcp", Math.max(...downloads.get("yamux_tcp")!), "MB/s")
    report(suite, "download_100MiB_yamux_2threads", await splitDownload(url, true), "MB/s")
    report(suite, "download_100MiB_yamux_unmasked_2threads", await splitDownload(url, false), "MB/s")
  } finally {
    await Effect.runPromise(Scope.close(scope, Exit.void))
    direct.closeAllConnections()
    await new Promise<void>((resolve) => direct.close(() => resolve()))
  }
}
