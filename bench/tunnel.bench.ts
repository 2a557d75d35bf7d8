/**
 * `npm run bench -- tunnel`: the control-port tunnel (wrk → gateway public port → yamux stream → tunnel
 * client → backend HTTP server) against calling the same backend server directly, on loopback. The
 * gateway runs in a child process (this file, started with a role variable), wrk and curl in their own,
 * the tunnel clients and the backend in the bench process. Figures: small-response req/s and ratio, p50
 * and p99 added latency, a 100 MiB download, the gateway's RSS per idle backend session (1,000 sessions),
 * and the time from a backend's reconnect to the first answer to requests queued while it was away.
 * Every load is bounded in time. The gateway is set up as `switchyard server` sets it up by default: the
 * raw HTTP/1.1 engine on public ports, with the per-request instruments (metrics by route, request ids;
 * the access log stays off, as by default). `SWITCHYARD_TUNNEL_BENCH_NODE_PATH=1` runs the public ports on
 * Node's `http` objects instead (still instrumented), and `SWITCHYARD_TUNNEL_BENCH_METRICS=0` leaves the
 * instruments out (`request_metrics: false`), for comparison.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import type * as net from "node:net"
import { createInterface } from "node:readline"
import { Context, Duration, Effect, Exit, Layer, Redacted, Scope, Stream } from "effect"
import type { TunnelClientShape } from "../src/services/client/TunnelClient.ts"
import { freePort, mbps, now, report, sendInSlices } from "./support.ts"

const suite = "tunnel"
const RoleVariable = "SWITCHYARD_TUNNEL_BENCH_ROLE"
const benchToken = "bench-token"
/** wrk: one thread (two cores are shared by wrk, the gateway and the backend), bounded time. */
const wrkThreads = 1
const wrkConnections = 32
const wrkSeconds = 1
/** Interleaved load rounds per path (median reported). */
const loadRounds = 3
const downloadBytes = 100 * 1024 * 1024
const downloadRounds = 3
const sliceBytes = 64 * 1024
const smallBody = Buffer.from("ok")
/** Idle backend sessions connected for the memory figure, and how many connect at once. */
const idleSessions = 1_000
const connectBatch = 50
/** Requests queued at the gateway while the backend is away. */
const queuedRequests = 16
/** The route's grace period in the gateway (requests wait for a backend this long at most). */
const gracePeriodMs = 10_000
/** Longest wait for anything to happen in the bench (a bound, not a figure). */
const stepTimeoutMs = 60_000

// ---------------------------------------------------------------------------------------------------
// Gateway role: the whole control-port gateway, alone in its process.

const gatewayMain = async () => {
  const NodeTransport = await import("../src/runtime/NodeTransport.ts")
  const { ControlPort } = await import("../src/services/front/ControlPort.ts")
  const { dispatchObserver, instrumentHandlers } = await import("../src/runtime/commands/server.ts")
  const { makeMetrics } = await import("../src/services/Metrics.ts")
  const metrics = makeMetrics()
  const instrumented = process.env.SWITCHYARD_TUNNEL_BENCH_METRICS !== "0"
  const scope = Scope.makeUnsafe()
  const context = await Effect.runPromise(Layer.buildWithScope(
    ControlPort.gatewayLayer({
      control: {
        address: { host: "127.0.0.1", port: 0 },
        tokens: [{ name: "bench", token: Redacted.make(benchToken), ports: [{ from: 1024, to: 65_535 }] }],
        maxSessionsPerToken: idleSessions + 16
      },
      publicHost: "127.0.0.1",
      registry: { gracePeriod: Duration.millis(gracePeriodMs) },
      wrapHandlers: instrumented
        ? (handlers) => instrumentHandlers(handlers, metrics, undefined)
        : (handlers) => ({ ...handlers, observeDispatch: dispatchObserver(metrics) }),
      rawEngine: process.env.SWITCHYARD_TUNNEL_BENCH_NODE_PATH !== "1"
    }).pipe(Layer.provide(NodeTransport.layer)),
    scope
  ))
  process.stdout.write(`control ${Context.get(context, ControlPort).address.port}\n`)
  createInterface({ input: process.stdin }).on("line", (line) => {
    if (line === "gc") {
      ;(globalThis as { gc?: () => void }).gc?.()
      process.stdout.write("gc done\n")
    }
  })
  process.on("SIGTERM", () => {
    void Effect.runPromise(Scope.close(scope, Exit.void)).then(() => process.exit(0))
  })
}

if (process.env[RoleVariable] === "gateway") await gatewayMain()

// ---------------------------------------------------------------------------------------------------
// Bench role.

interface GatewayProcess {
  readonly child: ChildProcess
  readonly controlPort: number
  /** Full collection in the gateway, then its resident set from /proc, in KB. */
  readonly rssKb: () => Promise<number>
}

const startGateway = (): Promise<GatewayProcess> =>
  new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--expose-gc", import.meta.filename], {
      env: { ...process.env, [RoleVariable]: "gateway" },
      stdio: ["pipe", "pipe", "inherit"]
    })
    child.once("error", reject)
    const gcWaiters: Array<() => void> = []
    const rssKb = async () => {
      await new Promise<void>((done) => {
        gcWaiters.push(done)
        child.stdin!.write("gc\n")
      })
      const status = fs.readFileSync(`/proc/${child.pid}/status`, "utf8")
      const match = /VmRSS:\s+(\d+)\s+kB/.exec(status)
      if (match === null) throw new Error("no VmRSS in /proc status")
      return Number(match[1])
    }
    createInterface({ input: child.stdout! }).on("line", (line) => {
      if (line.startsWith("control ")) resolve({ child, controlPort: Number(line.slice(8)), rssKb })
      if (line === "gc done") gcWaiters.shift()?.()
    })
  })

const stopGateway = (gateway: GatewayProcess): Promise<void> =>
  new Promise((resolve) => {
    if (gateway.child.exitCode !== null) return resolve()
    gateway.child.once("exit", () => resolve())
    gateway.child.kill("SIGTERM")
  })

const handler = (big: Buffer): http.RequestListener => (req, res) => {
  if (req.url === "/big") return sendInSlices(res, big, sliceBytes)
  res.writeHead(200, { "content-length": String(smallBody.length) })
  res.end(smallBody)
}

interface WrkResult {
  readonly rps: number
  readonly p50Ms: number
  readonly p99Ms: number
}

const toMs = (value: string, unit: string): number => {
  const n = Number(value)
  return unit === "us" ? n / 1000 : unit === "s" ? n * 1000 : n
}

const wrk = (port: number, connections: number = wrkConnections): Promise<WrkResult> =>
  new Promise((resolve, reject) => {
    execFile(
      "wrk",
      [`-t${wrkThreads}`, `-c${connections}`, `-d${wrkSeconds}s`, "--latency", `http://127.0.0.1:${port}/`],
      (error, stdout) => {
        if (error !== null) return reject(error)
        const rps = /Requests\/sec:\s+([\d.]+)/.exec(stdout)
        const p50 = /\s50%\s+([\d.]+)(us|ms|s)\b/.exec(stdout)
        const p99 = /\s99%\s+([\d.]+)(us|ms|s)\b/.exec(stdout)
        const non2xx = /Non-2xx or 3xx responses:\s+(\d+)/.exec(stdout)
        const errors = /Socket errors:.*/.exec(stdout)
        if (rps === null || p50 === null || p99 === null) return reject(new Error(`unreadable wrk output:\n${stdout}`))
        if (non2xx !== null) return reject(new Error(`wrk saw ${non2xx[1]} failed responses`))
        if (errors !== null && /(read|write|timeout) [1-9]/.test(errors[0])) {
          return reject(new Error(`wrk saw socket errors: ${errors[0]}`))
        }
        resolve({ rps: Number(rps[1]), p50Ms: toMs(p50[1]!, p50[2]!), p99Ms: toMs(p99[1]!, p99[2]!) })
      }
    )
  })

/** One download of /big with curl, in MB/s. */
const download = async (port: number): Promise<number> => {
  const out = await new Promise<string>((resolve, reject) =>
    execFile(
      "curl",
      ["-s", "--max-time", "30", "-o", "/dev/null", "-w", "%{time_total} %{size_download} %{http_code}", `http://127.0.0.1:${port}/big`],
      (error, stdout) => error === null ? resolve(stdout) : reject(error)
    )
  )
  const [seconds, size, status] = out.trim().split(" ")
  if (Number(size) !== downloadBytes || status !== "200") throw new Error(`download failed: ${out}`)
  return mbps(downloadBytes, Number(seconds) * 1000)
}

const median = (values: ReadonlyArray<number>): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!

const withTimeout = <A>(what: string, promise: Promise<A>): Promise<A> =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what}: nothing after ${stepTimeoutMs} ms`)), stepTimeoutMs)
    promise.then((a) => {
      clearTimeout(timer)
      resolve(a)
    }, (e) => {
      clearTimeout(timer)
      reject(e)
    })
  })

/** A GET answered with its status once the whole body arrived. */
const get = (port: number): Promise<number> =>
  new Promise((resolve, reject) => {
    http.get({ host: "127.0.0.1", port, path: "/", agent: false }, (res) => {
      res.resume()
      res.on("end", () => resolve(res.statusCode ?? 0))
    }).on("error", reject)
  })

export const run = async (): Promise<void> => {
  const NodeTransport = await import("../src/runtime/NodeTransport.ts")
  const { TunnelClient } = await import("../src/services/client/TunnelClient.ts")
  const gateway = await startGateway()
  const server = { host: "127.0.0.1", port: gateway.controlPort }
  const token = Redacted.make(benchToken)
  const big = Buffer.alloc(downloadBytes, 0x5a)
  const backend = http.createServer(handler(big))
  await new Promise<void>((resolve) => backend.listen(0, "127.0.0.1", resolve))
  const directPort = (backend.address() as net.AddressInfo).port

  /** Connects one tunnel client session serving `port` with the backend server, in `scope`. */
  const connect = async (scope: Scope.Closeable, port: number, serve: boolean): Promise<void> => {
    const client: TunnelClientShape = Context.get(
      await Effect.runPromise(Layer.buildWithScope(
        TunnelClient.layer({ servers: [server], token, reconnect: { initial: Duration.millis(50), max: Duration.millis(200) } }).pipe(
          Layer.provide(NodeTransport.layer)
        ),
        scope
      )),
      TunnelClient
    )
    const listener = await Effect.runPromise(client.listen({ _tag: "Http", port }).pipe(Scope.provide(scope)))
    if (serve) {
      await Effect.runPromise(Effect.forkIn(
        Stream.runForEach(listener.connections, ({ socket }) => Effect.sync(() => backend.emit("connection", socket))),
        scope
      ))
    }
    await Effect.runPromise(listener.bound)
  }

  const scopes: Array<Scope.Closeable> = []
  try {
    const publicPort = await freePort()
    let main = Scope.makeUnsafe()
    scopes.push(main)
    await withTimeout("tunnel bound", connect(main, publicPort, true))

    // small requests: rounds interleave the paths so that machine load hits them alike
    const direct: Array<WrkResult> = []
    const tunnel: Array<WrkResult> = []
    for (let round = 0; round < loadRounds; round++) {
      direct.push(await wrk(directPort))
      tunnel.push(await wrk(publicPort))
    }
    const directRps = median(direct.map((r) => r.rps))
    const tunnelRps = median(tunnel.map((r) => r.rps))
    report(suite, "small.direct_rps", Math.round(directRps), "req/s")
    report(suite, "small.tunnel_rps", Math.round(tunnelRps), "req/s")
    report(suite, "small.tunnel_ratio", tunnelRps / directRps, "x of direct")
    const directP50 = median(direct.map((r) => r.p50Ms))
    const directP99 = median(direct.map((r) => r.p99Ms))
    report(suite, "small.direct_p50", directP50, "ms")
    report(suite, "small.direct_p99", directP99, "ms")
    report(suite, "small.added_latency_p50", median(tunnel.map((r) => r.p50Ms)) - directP50, "ms")
    report(suite, "small.added_latency_p99", median(tunnel.map((r) => r.p99Ms)) - directP99, "ms")
    // one request at a time: what the tunnel adds without queueing behind other requests
    const single = { direct: [] as Array<WrkResult>, tunnel: [] as Array<WrkResult> }
    for (let round = 0; round < loadRounds; round++) {
      single.direct.push(await wrk(directPort, 1))
      single.tunnel.push(await wrk(publicPort, 1))
    }
    report(
      suite,
      "single.added_latency_p50",
      median(single.tunnel.map((r) => r.p50Ms)) - median(single.direct.map((r) => r.p50Ms)),
      "ms"
    )
    report(
      suite,
      "single.added_latency_p99",
      median(single.tunnel.map((r) => r.p99Ms)) - median(single.direct.map((r) => r.p99Ms)),
      "ms"
    )

    let directDownload = 0
    let tunnelDownload = 0
    for (let round = 0; round < downloadRounds; round++) {
      directDownload = Math.max(directDownload, await download(directPort))
      tunnelDownload = Math.max(tunnelDownload, await download(publicPort))
    }
    report(suite, "download_100MiB.direct", Math.round(directDownload), "MB/s")
    report(suite, "download_100MiB.tunnel", Math.round(tunnelDownload), "MB/s")
    report(suite, "download_100MiB.tunnel_ratio", tunnelDownload / directDownload, "x of direct")

    // reconnect: the backend leaves, requests queue during the grace period, a new session serves them
    await Effect.runPromise(Scope.close(main, Exit.void))
    scopes.splice(scopes.indexOf(main), 1)
    const answers = Array.from({ length: queuedRequests }, () => {
      const sent = get(publicPort)
      return sent.then((status) => ({ status, at: now() }))
    })
    // the requests reach the gateway and wait there (the route is in its grace period)
    await new Promise((resolve) => setTimeout(resolve, 200))
    const reconnectAt = now()
    main = Scope.makeUnsafe()
    scopes.push(main)
    const bound = withTimeout("reconnect", connect(main, publicPort, true)).then(() => now())
    const served = await withTimeout("queued requests", Promise.all(answers))
    const boundAt = await bound
    if (served.some((a) => a.status !== 200)) throw new Error(`queued requests answered ${served.map((a) => a.status).join(",")}`)
    const first = Math.min(...served.map((a) => a.at))
    const last = Math.max(...served.map((a) => a.at))
    report(suite, "reconnect.first_queued_served", first - reconnectAt, "ms")
    report(suite, "reconnect.all_queued_served", last - reconnectAt, "ms")
    report(suite, "reconnect.bound_to_first_served", Math.max(0, first - boundAt), "ms")

    // memory: idle backend sessions, each with one HTTP listener on a shared route
    const idlePort = await freePort()
    const before = await gateway.rssKb()
    const idle = Scope.makeUnsafe()
    scopes.push(idle)
    for (let i = 0; i < idleSessions; i += connectBatch) {
      await withTimeout(
        "idle sessions",
        Promise.all(Array.from({ length: Math.min(connectBatch, idleSessions - i) }, () => connect(idle, idlePort, false)))
      )
    }
    await new Promise((resolve) => setTimeout(resolve, 500))
    const after = await gateway.rssKb()
    report(suite, "idle_sessions.gateway_rss_before", Math.round(before / 1024), "MB")
    report(suite, "idle_sessions.gateway_rss_after", Math.round(after / 1024), "MB")
    report(suite, "idle_sessions.rss_per_session", (after - before) / idleSessions, "KB")
  } finally {
    for (const scope of scopes) await Effect.runPromise(Scope.close(scope, Exit.void))
    backend.closeAllConnections()
    await new Promise<void>((resolve) => backend.close(() => resolve()))
    await stopGateway(gateway)
  }
}
