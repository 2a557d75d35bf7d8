/**
 * `npm run bench -- websocket`: the wsp-compatible path (caller → wsp-server → WebSocket pool →
 * wsp-client → destination) against calling the same destination directly, in one run, on loopback.
 * Figures: small-response requests per second with 20 concurrent Node callers, everything in the bench
 * process; and a 100 MiB download by curl, with the destination, the wsp-server and the wsp-client each
 * in its own process, as in a deployment, with the CPU time the wsp-server and wsp-client processes spend
 * per download (user + system, from /proc). Then the control-port protocol over one WebSocket (yamux over
 * WebSocket) against direct, from `websocket-yamux.ts`.
 */
import { readFileSync } from "node:fs"
import * as http from "node:http"
import { Effect, Exit, Redacted, Scope } from "effect"
import { allowAll, compileRules, RulePatternError } from "../src/domain/DestinationRules.ts"
import type { DestinationRules } from "../src/domain/DestinationRules.ts"
import { makeWspClient } from "../src/services/client/WspClient.ts"
import { makeWspServer } from "../src/services/front/WspServer.ts"
import { announce, closeOnSignal, curlDownload, type RoleProcess, RoleVariable, startRole } from "./roles.ts"
import { now, quantile, report } from "./support.ts"
import { runYamuxOverWebSocket } from "./websocket-yamux.ts"

const suite = "websocket"
const callers = 20
/** Each load round stops at whichever comes first; rounds of the paths are interleaved. */
const maxRequests = 20_000
const maxMillis = 600
const loadRounds = 5
/** Download rounds per path, interleaved (the best is reported; the first also warms the processes). */
const downloadRounds = 3
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
  pingInterval: 30_000,
  responseTimeout: 60_000,
  openRegistration: false
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

// ---------------------------------------------------------------------------------------------------
// Child roles for the downloads: the destination, a wsp-server, a wsp-client, each in its own process.

const role = process.env[RoleVariable]
if (role === "ws-destination") {
  const dest = await startDestination()
  announce("port", dest.port)
  announce("ready")
  closeOnSignal(() =>
    new Promise<void>((resolve) => {
      dest.server.close(() => resolve())
      dest.server.closeAllConnections()
    })
  )
}
if (role === "wsp-server") {
  const scope = Scope.makeUnsafe()
  const server = await Effect.runPromise(makeWspServer(serverSettings).pipe(Scope.provide(scope)))
  announce("port", server.address.port)
  announce("ready")
  const poll = setInterval(() => {
    if (server.stats().idle >= callers) {
      clearInterval(poll)
      announce("pool")
    }
  }, 10)
  closeOnSignal(() => {
    clearInterval(poll)
    return Effect.runPromise(Scope.close(scope, Exit.void))
  })
}
if (role === "wsp-client") {
  const scope = Scope.makeUnsafe()
  const settings = clientSettings(
    Number(process.env.SWITCHYARD_WSP_BENCH_SERVER),
    Number(process.env.SWITCHYARD_WSP_BENCH_DESTINATION),
    process.env.SWITCHYARD_WSP_BENCH_MASK === "1"
  )
  await Effect.runPromise(makeWspClient(settings).pipe(Scope.provide(scope)))
  announce("ready")
  closeOnSignal(() => Effect.runPromise(Scope.close(scope, Exit.void)))
}

/** CPU seconds (user + system) a child process has used so far, from `/proc/<pid>/stat`; NaN where unreadable. */
const cpuSeconds = (pid: number | undefined): number => {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ")
    return (Number(fields[11]) + Number(fields[12])) / clockTicksPerSecond
  } catch {
    return Number.NaN
  }
}
/** Linux's USER_HZ, the unit of `/proc/<pid>/stat` times. */
const clockTicksPerSecond = 100

/**
 * The 100 MiB downloads with curl: directly from the destination process, and through a wsp-server
 * process and a wsp-client process (masked and unmasked client frames); best of interleaved rounds.
 * Also the CPU time the wsp-server and wsp-client processes spend per masked download (median).
 */
const processDownloads = async (): Promise<Map<string, number>> => {
  const file = import.meta.filename
  const started: Array<RoleProcess> = []
  try {
    const dest = await startRole(file, "ws-destination")
    started.push(dest)
    const destinationPort = await dest.value("port")
    const tunnel = async (mask: boolean) => {
      const server = await startRole(file, "wsp-server")
      started.push(server)
      const port = await server.value("port")
      const client = await startRole(file, "wsp-client", {
        SWITCHYARD_WSP_BENCH_SERVER: port,
        SWITCHYARD_WSP_BENCH_DESTINATION: destinationPort,
        SWITCHYARD_WSP_BENCH_MASK: mask ? "1" : "0"
      })
      started.push(client)
      await server.value("pool")
      return { port, pids: [server.child.pid, client.child.pid] }
    }
    const via = [`X-Proxy-Destination: http://127.0.0.1:${destinationPort}/big`]
    const masked = await tunnel(true)
    const unmasked = await tunnel(false)
    const paths = [
      { name: "direct", url: `http://127.0.0.1:${destinationPort}/big`, headers: [] as Array<string>, pids: [] as Array<number | undefined> },
      { name: "wsp", url: `http://127.0.0.1:${masked.port}/request`, headers: via, pids: masked.pids },
      { name: "wsp_unmasked", url: `http://127.0.0.1:${unmasked.port}/request`, headers: via, pids: unmasked.pids }
    ]
    const best = new Map<string, number>(paths.map((p) => [p.name, 0]))
    const cpu = { server: [] as Array<number>, client: [] as Array<number> }
    for (let round = 0; round < downloadRounds; round++) {
      for (const p of paths) {
        const before = p.pids.map(cpuSeconds)
        best.set(p.name, Math.max(best.get(p.name)!, await curlDownload(p.url, downloadBytes, p.headers)))
        if (p.name !== "wsp") continue
        const after = p.pids.map(cpuSeconds)
        cpu.server.push(after[0]! - before[0]!)
        cpu.client.push(after[1]! - before[1]!)
      }
    }
    best.set("wsp_server_cpu", quantile(cpu.server, 0.5))
    best.set("wsp_client_cpu", quantile(cpu.client, 0.5))
    return best
  } finally {
    for (const p of started.reverse()) await p.stop()
  }
}

export const run = async (): Promise<void> => {
  const dest = await startDestination()
  const via = { "X-Proxy-Destination": `http://127.0.0.1:${dest.port}/small` }
  const scope = Effect.runSync(Scope.make())
  try {
    const masked = await startTunnel(scope, dest.port, true)
    const unmasked = await startTunnel(scope, dest.port, false)
    const paths = [
      { name: "direct", port: dest.port, path: "/small", headers: {} },
      { name: "wsp", port: masked, path: "/request", headers: via },
      { name: "wsp_unmasked", port: unmasked, path: "/request", headers: via }
    ]
    // rounds alternate between the paths so that load from elsewhere on the machine hits all alike
    const rates = new Map<string, Array<number>>(paths.map((p) => [p.name, []]))
    for (const p of paths) await load(p.port, p.path, p.headers)
    for (let round = 0; round < loadRounds; round++) {
      for (const p of paths) rates.get(p.name)!.push(await load(p.port, p.path, p.headers))
    }
    const direct = quantile(rates.get("direct")!, 0.5)
    report(suite, "small_direct", direct, "req/s")
    for (const name of ["wsp", "wsp_unmasked"]) {
      const rate = quantile(rates.get(name)!, 0.5)
      report(suite, `small_${name}`, rate, "req/s")
      report(suite, `small_${name}_ratio`, rate / direct, "x direct")
    }
    for (const [name, value] of await processDownloads()) {
      report(suite, `download_100MiB_${name}`, value, name.endsWith("_cpu") ? "s" : "MB/s")
    }
    await runYamuxOverWebSocket(suite)
  } finally {
    await Effect.runPromise(Scope.close(scope, Exit.void))
    await new Promise<void>((resolve) => {
      dest.server.close(() => resolve())
      dest.server.closeAllConnections()
    })
  }
}
