/**
 * `npm run bench -- websocket`: the wsp-compatible path (caller → wsp-server → WebSocket pool →
 * wsp-client → destination) against calling the same destination directly, in one run, on loopback.
 * Figures: small-response requests per second with 20 concurrent callers, and a 100 MiB download,
 * all in one thread, and the download again with the far side (destination and wsp-client) in a
 * worker thread, as it runs on another machine in a deployment. Then the control-port protocol over one
 * WebSocket (yamux over WebSocket) against direct, from `websocket-yamux.ts`.
 */
import * as http from "node:http"
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads"
import { Effect, Exit, Redacted, Scope } from "effect"
import { allowAll, compileRules, RulePatternError } from "../src/domain/DestinationRules.ts"
import type { DestinationRules } from "../src/domain/DestinationRules.ts"
import { makeWspClient } from "../src/services/client/WspClient.ts"
import { makeWspServer } from "../src/services/front/WspServer.ts"
import { mbps, now, quantile, report } from "./support.ts"
import { runYamuxOverWebSocket } from "./websocket-yamux.ts"

const suite = "websocket"
const callers = 20
/** Each load round stops at whichever comes first; rounds of the paths are interleaved. */
const maxRequests = 20_000
const maxMillis = 600
const loadRounds = 5
const downloadRounds = 2
const downloadBytes = 100 * 1024 * 1024
const smallBody = Buffer.from("ok")

const destinationOnly = (port: number): DestinationRules => {
  const rules = compileRules({ whitelist: [{ method: "^GET$", url: `^http://127\\.0\\.0\\.1:${port}/` }] })
  if (rules instanceof RulePatternError) throw new Error(rules.message)
  return rules
}

const startDestination = async () => {
  const big = Buffer.alloc(downloadBytes, 0x5a)
  const server = http.createServer((req, res) => {
    if (req.url === "/big") {
      res.writeHead(200, { "Content-Length": String(big.length) })
      // written in 64 KiB slices, as a real upstream would stream it
      let offset = 0
      const write = () => {
        while (offset < big.length) {
          const end = Math.min(offset + 65536, big.length)
          const ok = res.write(big.subarray(offset, end))
          offset = end
          if (!ok) return void res.once("drain", write)
        }
        res.end()
      }
      write()
      return
    }
    res.writeHead(200, { "Content-Length": String(smallBody.length) })
    res.end(smallBody)
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  return { server, port: (server.address() as { port: number }).port }
}

const get = (agent: http.Agent, port: number, path: string, headers: Record<string, string>): Promise<number> =>
  new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, path, agent, headers }, (res) => {
      let n = 0
      res.on("data", (c: Buffer) => (n += c.length))
      res.on("end", () => (res.statusCode === 200 ? resolve(n) : reject(new Error(`status ${res.statusCode}`))))
      res.on("error", reject)
    })
    req.on("error", reject)
    req.end()
  })

/** Requests per second with `callers` concurrent loops, bounded in count and time. */
const load = async (port: number, path: string, headers: Record<string, string>): Promise<number> => {
  const agent = new http.Agent({ keepAlive: true, maxSockets: callers })
  let issued = 0
  let done = 0
  const start = now()
  const loop = async () => {
    while (issued < maxRequests && now() - start < maxMillis) {
      issued++
      await get(agent, port, path, headers)
      done++
    }
  }
  await Promise.all(Array.from({ length: callers }, loop))
  const elapsed = now() - start
  agent.destroy()
  return done / (elapsed / 1000)
}

const download = async (port: number, path: string, headers: Record<string, string>): Promise<number> => {
  const agent = new http.Agent({ keepAlive: false })
  const start = now()
  const n = await get(agent, port, path, headers)
  const elapsed = now() - start
  agent.destroy()
  if (n !== downloadBytes) throw new Error(`downloaded ${n} bytes, expected ${downloadBytes}`)
  return mbps(n, elapsed)
}

const serverSettings = {
  host: "127.0.0.1",
  port: 0,
  timeout: 5000,
  idleTimeout: 60_000,
  secretKey: Redacted.make("bench"),
  rules: allowAll,
  requestKey: undefined,
  maxMessageSize: 256 * 1024 * 1024,
  maxHeaders: 256,
  maxConcurrentRequests: 1024,
  maxConnectionsPerPool: 1000,
  maxPools: 10,
  pingInterval: 30_000
}

const clientSettings = (serverPort: number, destinationPort: number, maskFrames: boolean) => ({
  id: "bench",
  targets: [`ws://127.0.0.1:${serverPort}/register`],
  poolIdleSize: callers,
  poolMaxSize: callers * 2,
  secretKey: Redacted.make("bench"),
  // the bench destination only, so the rule check is part of what is measured
  rules: destinationOnly(destinationPort),
  maxMessageSize: 256 * 1024 * 1024,
  maxHeaders: 256,
  pingInterval: 30_000,
  backoffInitial: 100,
  backoffMax: 1000,
  maskFrames
})

/** Starts a wsp-server and a wsp-client for the destination on `scope`; resolves once the pool is full. */
const startTunnel = async (scope: Scope.Scope, destinationPort: number, maskFrames: boolean) => {
  const server = await Effect.runPromise(makeWspServer(serverSettings).pipe(Scope.provide(scope)))
  await Effect.runPromise(
    makeWspClient(clientSettings(server.address.port, destinationPort, maskFrames)).pipe(Scope.provide(scope))
  )
  const deadline = Date.now() + 5000
  while (server.stats().idle < callers && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10))
  return server.address.port
}

/** What the far-side worker reports once it is up. */
interface FarSideReady {
  readonly destinationPort: number
}

/** Worker body: a destination and, when given a server port, a wsp-client for it. Stops on any message. */
const runFarSide = async (serverPort: number | undefined): Promise<void> => {
  const dest = await startDestination()
  const scope = Effect.runSync(Scope.make())
  if (serverPort !== undefined) {
    await Effect.runPromise(makeWspClient(clientSettings(serverPort, dest.port, true)).pipe(Scope.provide(scope)))
  }
  parentPort!.postMessage({ destinationPort: dest.port } satisfies FarSideReady)
  parentPort!.once("message", async () => {
    await Effect.runPromise(Scope.close(scope, Exit.void))
    dest.server.closeAllConnections()
    dest.server.close(() => parentPort!.close())
  })
}

const startFarSide = async (serverPort: number | undefined) => {
  const worker = new Worker(new URL(import.meta.url), { workerData: { farSide: true, serverPort } })
  const ready = await new Promise<FarSideReady>((resolve, reject) => {
    worker.once("message", resolve)
    worker.once("error", reject)
  })
  return {
    destinationPort: ready.destinationPort,
    stop: () =>
      new Promise<void>((resolve) => {
        worker.once("exit", () => resolve())
        worker.postMessage("stop")
      })
  }
}

if (!isMainThread && (workerData as { farSide?: boolean } | undefined)?.farSide === true) {
  await runFarSide((workerData as { serverPort?: number }).serverPort)
}

/** The 100 MiB download with the far side in a worker: direct, then through the tunnel. */
const splitDownloads = async (): Promise<{ direct: number; wsp: number }> => {
  // best of the rounds, the first of which also warms the worker's code
  const plain = await startFarSide(undefined)
  let direct = 0
  for (let round = 0; round < downloadRounds; round++) direct = Math.max(direct, await download(plain.destinationPort, "/big", {}))
  await plain.stop()
  const scope = Effect.runSync(Scope.make())
  try {
    const server = await Effect.runPromise(makeWspServer(serverSettings).pipe(Scope.provide(scope)))
    const far = await startFarSide(server.address.port)
    try {
      const deadline = Date.now() + 5000
      while (server.stats().idle < callers && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10))
      const via = { "X-Proxy-Destination": `http://127.0.0.1:${far.destinationPort}/big` }
      let wsp = 0
      for (let round = 0; round < downloadRounds; round++) wsp = Math.max(wsp, await download(server.address.port, "/request", via))
      return { direct, wsp }
    } finally {
      await far.stop()
    }
  } finally {
    await Effect.runPromise(Scope.close(scope, Exit.void))
  }
}

export const run = async (): Promise<void> => {
  const dest = await startDestination()
  const via = { "X-Proxy-Destination": `http://127.0.0.1:${dest.port}/small` }
  const viaBig = { "X-Proxy-Destination": `http://127.0.0.1:${dest.port}/big` }
  const scope = Effect.runSync(Scope.make())
  try {
    const masked = await startTunnel(scope, dest.port, true)
    const unmasked = await startTunnel(scope, dest.port, false)
    const paths = [
      { name: "direct", port: dest.port, path: "/small", big: "/big", headers: {}, bigHeaders: {} },
      { name: "wsp", port: masked, path: "/request", big: "/request", headers: via, bigHeaders: viaBig },
      { name: "wsp_unmasked", port: unmasked, path: "/request", big: "/request", headers: via, bigHeaders: viaBig }
    ]
    // rounds alternate between the paths so that load from elsewhere on the machine hits all alike
    const rates = new Map<string, Array<number>>(paths.map((p) => [p.name, []]))
    for (const p of paths) await load(p.port, p.path, p.headers)
    for (let round = 0; round < loadRounds; round++) {
      for (const p of paths) rates.get(p.name)!.push(await load(p.port, p.path, p.headers))
    }
    const downloads = new Map<string, Array<number>>(paths.map((p) => [p.name, []]))
    for (let round = 0; round < downloadRounds; round++) {
      for (const p of paths) downloads.get(p.name)!.push(await download(p.port, p.big, p.bigHeaders))
    }
    const direct = quantile(rates.get("direct")!, 0.5)
    report(suite, "small_direct", direct, "req/s")
    for (const name of ["wsp", "wsp_unmasked"]) {
      const rate = quantile(rates.get(name)!, 0.5)
      report(suite, `small_${name}`, rate, "req/s")
      report(suite, `small_${name}_ratio`, rate / direct, "x direct")
    }
    for (const p of paths) report(suite, `download_100MiB_${p.name}`, Math.max(...downloads.get(p.name)!), "MB/s")
    const split = await splitDownloads()
    report(suite, "download_100MiB_direct_2threads", split.direct, "MB/s")
    report(suite, "download_100MiB_wsp_2threads", split.wsp, "MB/s")
    await runYamuxOverWebSocket(suite)
  } finally {
    await Effect.runPromise(Scope.close(scope, Exit.void))
    await new Promise<void>((resolve) => {
      dest.server.close(() => resolve())
      dest.server.closeAllConnections()
    })
  }
}
