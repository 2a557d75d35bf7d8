/**
 * `npm run bench -- http2`: the reverse-HTTP/2 path (wrk → public port → gateway → HTTP/2 tunnel →
 * backend) against calling the same backend process directly over HTTP/1.1, in one run, on loopback.
 * The gateway and the backend each run in a child process (this file, started with a role variable),
 * wrk and curl in their own, so each process only does its own side's work. Figures: small-response req/s with 1 and 4
 * tunnel connections, the ratio to direct, p99 added latency (32 concurrent, and one at a time), a
 * 100 MiB download, and the gateway's CPU per request and per download (read from `/proc`, steadier than
 * rates on a shared machine). Then the same with a ptth-style Go backend on a plain-mode port
 * (`go_backend.*`: small req/s against the Go server over HTTP/1.1, the download and the gateway's CPU),
 * left out with a note when Go and `golang.org/x/net` cannot be had.
 */
import { type ChildProcess, execFile, execFileSync, spawn, spawnSync } from "node:child_process"
import { readFileSync } from "node:fs"
import { createInterface } from "node:readline"
import * as http from "node:http"
import type * as http2 from "node:http2"
import { Context, Effect, Exit, Layer, Redacted, Scope } from "effect"
import { Dispatcher } from "../src/services/Dispatcher.ts"
import { Forwarder } from "../src/services/Forwarder.ts"
import { tcpUpstream } from "../src/services/forward/Upstream.ts"
import { ReverseH2 } from "../src/services/front/ReverseH2.ts"
import { forwardingHandlers, Listeners } from "../src/services/Listeners.ts"
import { Registry } from "../src/services/Registry.ts"
import { announce, closeOnSignal, curlDownload, type RoleProcess, RoleVariable, startRole } from "./roles.ts"
import { freePort, report, sendInSlices } from "./support.ts"

const suite = "http2"
/** wrk settings: one thread (two cores are shared with the gateway and the backend), bounded time. */
const wrkThreads = 1
const wrkConnections = 32
const wrkSeconds = 1
/** Interleaved load rounds per path (median reported). */
const loadRounds = 3
/** Tunnel configurations measured: connections from the backend process. */
const backendCounts = [1, 4] as const
const benchToken = "bench-token"
const downloadBytes = 100 * 1024 * 1024
const downloadRounds = 2
const sliceBytes = 64 * 1024
const smallBody = Buffer.from("ok")

// ---------------------------------------------------------------------------------------------------
// Backend role: an HTTP/1.1 server for the direct baseline and the same handler over reverse HTTP/2.

type Res = Pick<http.ServerResponse, "writeHead" | "write" | "end" | "once">

const handle = (url: string | undefined, res: Res, big: Buffer) => {
  if (url === "/big") return sendInSlices(res, big, sliceBytes)
  res.writeHead(200, { "content-length": String(smallBody.length) })
  res.end(smallBody)
}

const backendMain = async () => {
  closeOnSignal(async () => {
    await Promise.all(tunnels.map((t) => t.close()))
  })
  const { serveReverseHttp2 } = await import("../src/runtime/serveReverseHttp2.ts")
  const big = Buffer.alloc(downloadBytes, 0x5a)
  const direct = http.createServer((req, res) => handle(req.url, res, big))
  await new Promise<void>((resolve) => direct.listen(0, "127.0.0.1", resolve))
  announce("direct", (direct.address() as { port: number }).port)
  const handleH2 = (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => {
    req.resume()
    handle(req.url, res as unknown as Res, big)
  }
  // one tunnel client per configuration, each asking for its own public port
  const gateway = { host: "127.0.0.1", port: Number(process.env.SWITCHYARD_HTTP2_BENCH_GATEWAY) }
  const tunnels = await Promise.all(backendCounts.map((connections) => {
    const port = Number(process.env[`SWITCHYARD_HTTP2_BENCH_PORT_${connections}`])
    return serveReverseHttp2(handleH2, { gateway, token: benchToken, routes: [{ _tag: "Http", port }], connections })
  }))
  const ready = setInterval(() => {
    if (tunnels.every((t, i) => t.connected() === backendCounts[i])) {
      clearInterval(ready)
      announce("ready")
    }
  }, 10)
}

if (process.env[RoleVariable] === "h2-backend") await backendMain()

// ---------------------------------------------------------------------------------------------------
// Gateway role: the reverse-HTTP/2 gateway alone in its process.

const gatewayMain = async () => {
  const publicPorts = (process.env.SWITCHYARD_HTTP2_BENCH_PUBLIC_PORTS ?? "").split(",").map(Number)
  const scope = Scope.makeUnsafe()
  const plain = process.env.SWITCHYARD_HTTP2_BENCH_PLAIN_PORT
  const context = await Effect.runPromise(Layer.buildWithScope(gatewayLayer(publicPorts, plain === undefined ? undefined : Number(plain)), scope))
  announce("port", Context.get(context, ReverseH2).address.port)
  announce("ready")
  closeOnSignal(() => Effect.runPromise(Scope.close(scope, Exit.void)))
}

// ---------------------------------------------------------------------------------------------------
// Bench role: starts the gateway and the backend processes, runs wrk and curl against them.

interface WrkResult {
  readonly rps: number
  readonly p99Ms: number
  readonly requests: number
}

/** Clock ticks per second of `/proc/<pid>/stat` times. */
const clockTicks = (): number => {
  try {
    return Number(execFileSync("getconf", ["CLK_TCK"]).toString().trim()) || 100
  } catch {
    return 100
  }
}

/** CPU seconds (user + system) a child has used so far; NaN where `/proc` is not there. */
const cpuSeconds = (role: RoleProcess, ticks: number): number => {
  try {
    const fields = readFileSync(`/proc/${role.child.pid}/stat`, "utf8").split(") ")[1]!.split(" ")
    return (Number(fields[11]) + Number(fields[12])) / ticks
  } catch {
    return Number.NaN
  }
}

const toMs = (value: string, unit: string): number => {
  const n = Number(value)
  return unit === "us" ? n / 1000 : unit === "s" ? n * 1000 : n
}

const wrk = (port: number, path: string, connections: number = wrkConnections): Promise<WrkResult> =>
  new Promise((resolve, reject) => {
    execFile(
      "wrk",
      [`-t${wrkThreads}`, `-c${connections}`, `-d${wrkSeconds}s`, "--latency", `http://127.0.0.1:${port}${path}`],
      (error, stdout) => {
        if (error !== null) return reject(error)
        const rps = /Requests\/sec:\s+([\d.]+)/.exec(stdout)
        const p99 = /\s99%\s+([\d.]+)(us|ms|s)\b/.exec(stdout)
        const non2xx = /Non-2xx or 3xx responses:\s+(\d+)/.exec(stdout)
        const requests = /(\d+) requests in/.exec(stdout)
        if (rps === null || p99 === null || requests === null) return reject(new Error(`unreadable wrk output:\n${stdout}`))
        if (non2xx !== null) return reject(new Error(`wrk saw ${non2xx[1]} failed responses`))
        resolve({ rps: Number(rps[1]), p99Ms: toMs(p99[1]!, p99[2]!), requests: Number(requests[1]) })
      }
    )
  })

/** One download of /big with curl, in MB/s. */
const download = (port: number): Promise<number> => curlDownload(`http://127.0.0.1:${port}/big`, downloadBytes)

const gatewayLayer = (publicPorts: ReadonlyArray<number>, plainPort: number | undefined) => {
  const core = Layer.unwrap(Effect.gen(function*() {
    const forwarder = yield* Forwarder.make({
      upstream: tcpUpstream("127.0.0.1", 9, { maxSockets: 1, maxFreeSockets: 0 }),
      responseTimeoutMs: 0,
      idleTimeoutMs: 0
    })
    return Layer.effect(Listeners, Listeners.make({ host: "127.0.0.1", ...forwardingHandlers(forwarder) }))
  })).pipe(Layer.provideMerge(Dispatcher.layer()), Layer.provideMerge(Registry.layer()))
  // plain mode (no preamble, routes from config) for a backend with no switchyard code in it
  const config = plainPort === undefined
    ? { tokens: [{ name: "bench", token: Redacted.make(benchToken), ports: [...publicPorts] }] }
    : { routes: [{ _tag: "Http" as const, port: plainPort }] }
  return ReverseH2.layer({ address: { host: "127.0.0.1", port: 0 }, ...config }).pipe(Layer.provideMerge(core))
}

if (process.env[RoleVariable] === "h2-gateway") await gatewayMain()

const median = (values: ReadonlyArray<number>): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!

export const run = async (): Promise<void> => {
  const publicPorts = new Map<number, number>()
  for (const n of backendCounts) publicPorts.set(n, await freePort())
  const file = import.meta.filename
  const gateway = await startRole(file, "h2-gateway", { SWITCHYARD_HTTP2_BENCH_PUBLIC_PORTS: [...publicPorts.values()].join(",") })
  let backend: RoleProcess | undefined
  try {
    backend = await startRole(file, "h2-backend", {
      SWITCHYARD_HTTP2_BENCH_GATEWAY: await gateway.value("port"),
      ...Object.fromEntries([...publicPorts].map(([n, port]) => [`SWITCHYARD_HTTP2_BENCH_PORT_${n}`, String(port)]))
    })
    const directPort = Number(await backend.value("direct"))
    // rounds interleave the paths so that machine load hits them alike
    const rps = new Map<string, Array<number>>()
    const p99 = new Map<string, Array<number>>()
    const paths: Array<readonly [string, number]> = [["direct", directPort], ...[...publicPorts].map(([n, port]) => [`h2_${n}`, port] as const)]
    const ticks = clockTicks()
    // the gateway's CPU over the 1-connection rounds, and the requests they served
    let gatewayCpu = 0
    let gatewayRequests = 0
    for (let round = 0; round < loadRounds; round++) {
      for (const [name, port] of paths) {
        const before = cpuSeconds(gateway, ticks)
        const result = await wrk(port, "/")
        if (name === "h2_1") {
          gatewayCpu += cpuSeconds(gateway, ticks) - before
          gatewayRequests += result.requests
        }
        rps.set(name, [...(rps.get(name) ?? []), result.rps])
        p99.set(name, [...(p99.get(name) ?? []), result.p99Ms])
      }
    }
    const directRps = median(rps.get("direct")!)
    report(suite, "direct_rps", Math.round(directRps), "req/s")
    for (const n of backendCounts) {
      const name = `reverse_h2_${n}_backend${n === 1 ? "" : "s"}`
      const value = median(rps.get(`h2_${n}`)!)
      report(suite, `${name}_rps`, Math.round(value), "req/s")
      report(suite, `${name}_ratio`, value / directRps, "x of direct")
    }
    report(suite, "gateway_cpu_per_request", Math.round((1e6 * gatewayCpu) / gatewayRequests), "us")
    report(suite, "direct_p99", median(p99.get("direct")!), "ms")
    report(suite, "p99_added_latency", Math.max(0, median(p99.get("h2_1")!) - median(p99.get("direct")!)), "ms")
    // one request at a time: the latency the gateway itself adds, without queueing behind other requests
    const single = { direct: [] as Array<number>, h2: [] as Array<number> }
    for (let round = 0; round < loadRounds; round++) {
      single.direct.push((await wrk(directPort, "/", 1)).p99Ms)
      single.h2.push((await wrk(publicPorts.get(1)!, "/", 1)).p99Ms)
    }
    report(suite, "direct_p99_one_at_a_time", median(single.direct), "ms")
    report(suite, "p99_added_latency_one_at_a_time", Math.max(0, median(single.h2) - median(single.direct)), "ms")
    let directDownload = 0
    let tunnelDownload = 0
    let downloadCpu = Number.POSITIVE_INFINITY
    for (let round = 0; round < downloadRounds; round++) {
      directDownload = Math.max(directDownload, await download(directPort))
      const before = cpuSeconds(gateway, ticks)
      tunnelDownload = Math.max(tunnelDownload, await download(publicPorts.get(1)!))
      downloadCpu = Math.min(downloadCpu, cpuSeconds(gateway, ticks) - before)
    }
    report(suite, "direct_download_100MiB", Math.round(directDownload), "MB/s")
    report(suite, "reverse_h2_download_100MiB", Math.round(tunnelDownload), "MB/s")
    report(suite, "gateway_cpu_per_100MiB", downloadCpu, "s")
  } finally {
    await backend?.stop()
    await gateway.stop()
  }
  await runGoBackend()
}

// ---------------------------------------------------------------------------------------------------
// The same path with a ptth-style Go backend (golang.org/x/net/http2, `test/fixtures/ptth/gopeer`) on a
// plain-mode port: the gateway's figures without Node's `http2` server as the backend.

/** Builds the Go backend; its path, or undefined (with the reason on stderr) when it cannot be built. */
const goBackendBinary = (): string | undefined => {
  const script = new URL("../test/fixtures/ptth/gopeer/build.sh", import.meta.url).pathname
  const run = spawnSync("bash", [script], { encoding: "utf8", timeout: 600_000 })
  const out = run.stdout?.trim().split("\n").pop() ?? ""
  if (run.status === 0 && out !== "") return out
  process.stderr.write(`http2: the Go backend could not be built, its figures are left out: ${run.stderr?.slice(-500)}\n`)
  return undefined
}

/** Starts the Go backend dialling `tunnelPort`; resolves with it and its direct HTTP/1.1 port. */
const startGoBackend = (binary: string, tunnelPort: string) =>
  new Promise<{ readonly child: ChildProcess; readonly directPort: number }>((resolve, reject) => {
    const child = spawn(binary, ["-dial", `127.0.0.1:${tunnelPort}`, "-listen", "127.0.0.1:0", "-n", "1"], { stdio: ["ignore", "pipe", "inherit"] })
    let directPort = 0
    createInterface({ input: child.stdout! }).on("line", (line) => {
      if (line.startsWith("LISTEN ")) directPort = Number(line.slice(line.lastIndexOf(":") + 1))
      else if (line.startsWith("READY")) resolve({ child, directPort })
    })
    child.once("exit", (code) => reject(new Error(`the Go backend exited with ${code}`)))
  })

/** Resolves once `port` answers `path` with 200 (the backend's route is bound), within 10 s. */
const answering = async (port: number, path: string): Promise<void> => {
  for (let i = 0; i < 200; i++) {
    const status = await new Promise<number>((resolve) =>
      http.get({ host: "127.0.0.1", port, path, agent: false }, (res) => {
        res.resume()
        res.on("end", () => resolve(res.statusCode ?? 0))
      }).on("error", () => resolve(0))
    )
    if (status === 200) return
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  throw new Error(`port ${port} never answered ${path}`)
}

const runGoBackend = async (): Promise<void> => {
  const binary = goBackendBinary()
  if (binary === undefined) return
  const publicPort = await freePort()
  const gateway = await startRole(import.meta.filename, "h2-gateway", {
    SWITCHYARD_HTTP2_BENCH_PUBLIC_PORTS: "",
    SWITCHYARD_HTTP2_BENCH_PLAIN_PORT: String(publicPort)
  })
  let go: ChildProcess | undefined
  try {
    const started = await startGoBackend(binary, await gateway.value("port"))
    go = started.child
    await answering(publicPort, "/hello")
    const ticks = clockTicks()
    const rps = { direct: [] as Array<number>, h2: [] as Array<number> }
    for (let round = 0; round < loadRounds; round++) {
      rps.direct.push((await wrk(started.directPort, "/hello")).rps)
      rps.h2.push((await wrk(publicPort, "/hello")).rps)
    }
    const directRps = median(rps.direct)
    report(suite, "go_backend.direct_rps", Math.round(directRps), "req/s")
    report(suite, "go_backend.reverse_h2_rps", Math.round(median(rps.h2)), "req/s")
    report(suite, "go_backend.reverse_h2_ratio", median(rps.h2) / directRps, "x of direct")
    const path = `/bytes?n=${downloadBytes}`
    let directDownload = 0
    let tunnelDownload = 0
    let downloadCpu = Number.POSITIVE_INFINITY
    for (let round = 0; round < downloadRounds; round++) {
      directDownload = Math.max(directDownload, await curlDownload(`http://127.0.0.1:${started.directPort}${path}`, downloadBytes))
      const before = cpuSeconds(gateway, ticks)
      tunnelDownload = Math.max(tunnelDownload, await curlDownload(`http://127.0.0.1:${publicPort}${path}`, downloadBytes))
      downloadCpu = Math.min(downloadCpu, cpuSeconds(gateway, ticks) - before)
    }
    report(suite, "go_backend.direct_download_100MiB", Math.round(directDownload), "MB/s")
    report(suite, "go_backend.reverse_h2_download_100MiB", Math.round(tunnelDownload), "MB/s")
    report(suite, "go_backend.gateway_cpu_per_100MiB", downloadCpu, "s")
  } finally {
    if (go !== undefined && go.exitCode === null) {
      const exited = new Promise((resolve) => go!.once("exit", resolve))
      go.kill("SIGTERM")
      await exited
    }
    await gateway.stop()
  }
}
