/**
 * `npm run bench -- tunnel`: the control-port tunnel (wrk → gateway public port → yamux stream over TCP →
 * tunnel client → destination) against wrk calling the same destination directly, on loopback. Each
 * party runs alone in its process: `switchyard server` (the gateway), `switchyard client --expose` (the
 * backend side) and the destination, a small Node server; wrk and curl are the callers. Figures (see
 * compare.ts): req/s and ratio, latency, one-at-a-time latency, 100 MiB downloads, and each switchyard
 * process's CPU per request and per 100 MiB and its RSS idle and peak. Then the gateway's RSS per idle
 * backend session (1,000 sessions), and the time from a backend's reconnect to the first answer to
 * requests queued while it was away; the sessions of those two come from the bench process, which is
 * not measured. `SWITCHYARD_TUNNEL_BENCH_METRICS=0` runs the gateway with `request_metrics: false`.
 */
import * as http from "node:http"
import { Context, Duration, Effect, Exit, Layer, Redacted, Scope, Stream } from "effect"
import * as NodeTransport from "../src/runtime/NodeTransport.ts"
import { TunnelClient, type TunnelClientShape } from "../src/services/client/TunnelClient.ts"
import { comparePaths, defaultSettings } from "./compare.ts"
import { type BenchProcess, benchToken, collectGarbage, startBackend, startExposingClient, startSwitchyard, stopAll } from "./roles.ts"
import { freePort, memoryMb, now, report } from "./support.ts"

const suite = "tunnel"
const downloadBytes = defaultSettings.downloadBytes
/** Idle backend sessions connected for the memory figure, and how many connect at once (under the gateway's per-address handshake limit). */
const idleSessions = 1_000
const connectBatch = 25
/** Requests queued at the gateway while the backend is away. */
const queuedRequests = 16
/** The gateway's grace period (requests wait for a backend this long at most). */
const gracePeriodMs = 10_000
/** Longest wait for anything to happen in the bench (a bound, not a figure). */
const stepTimeoutMs = 60_000

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

/** A GET answered with its status once the whole body arrived (0 when it failed). */
const get = (port: number): Promise<number> =>
  new Promise((resolve) => {
    http.get({ host: "127.0.0.1", port, path: "/", agent: false }, (res) => {
      res.resume()
      res.on("end", () => resolve(res.statusCode ?? 0))
    }).on("error", () => resolve(0))
  })

/** The gateway as `switchyard server` runs by default, on `controlPort`. */
const startGateway = (controlPort: number): Promise<BenchProcess> =>
  startSwitchyard("gateway", [
    "server",
    "--control",
    `127.0.0.1:${controlPort}`,
    "--token",
    benchToken,
    "--no-admin",
    "--set",
    `grace_period_ms=${gracePeriodMs}`,
    "--set",
    "drain_timeout_ms=1000",
    "--set",
    `control.max_sessions_per_token=${idleSessions + 100}`,
    ...(process.env.SWITCHYARD_TUNNEL_BENCH_METRICS === "0" ? ["--set", "request_metrics=false"] : [])
  ], { ready: /switchyard gateway running/, gc: true })

export const run = async (): Promise<void> => {
  const started: Array<BenchProcess> = []
  const scopes: Array<Scope.Closeable> = []
  const local = http.createServer((_req, res) => res.end("ok"))
  try {
    const backend = await startBackend(downloadBytes)
    started.push(backend.process)
    const controlPort = await freePort()
    const gateway = await startGateway(controlPort)
    started.push(gateway)
    const publicPort = await freePort()
    const client = await startExposingClient(`127.0.0.1:${controlPort}`, backend.port, publicPort)
    started.push(client)

    const url = (port: number, path: string) => ({ url: `http://127.0.0.1:${port}${path}` })
    await comparePaths(suite, [
      { name: "direct", small: url(backend.port, "/"), download: url(backend.port, "/big"), parties: [] },
      { name: "yamux_tcp", small: url(publicPort, "/"), download: url(publicPort, "/big"), parties: [gateway, client] }
    ], { ...defaultSettings, oneAtATimeRounds: 2 })

    // the sessions below are the bench process's own, each serving `local`
    await new Promise<void>((resolve) => local.listen(0, "127.0.0.1", resolve))
    const server = { host: "127.0.0.1", port: controlPort }
    const token = Redacted.make(benchToken)
    /** Connects one tunnel client session serving `port` (with `local` when `serve`), in `scope`. */
    const connect = async (scope: Scope.Closeable, port: number, serve: boolean): Promise<void> => {
      const tunnel: TunnelClientShape = Context.get(
        await Effect.runPromise(Layer.buildWithScope(
          TunnelClient.layer({ servers: [server], token, reconnect: { initial: Duration.millis(50), max: Duration.millis(200) } }).pipe(
            Layer.provide(NodeTransport.layer)
          ),
          scope
        )),
        TunnelClient
      )
      const listener = await Effect.runPromise(tunnel.listen({ _tag: "Http", port }).pipe(Scope.provide(scope)))
      if (serve) {
        await Effect.runPromise(Effect.forkIn(
          Stream.runForEach(listener.connections, ({ socket }) => Effect.sync(() => local.emit("connection", socket))),
          scope
        ))
      }
      await Effect.runPromise(listener.bound)
    }

    // reconnect: the backend leaves, requests queue during the grace period, a new session serves them
    const reconnectPort = await freePort()
    const first = Scope.makeUnsafe()
    scopes.push(first)
    await withTimeout("reconnect tunnel bound", connect(first, reconnectPort, true))
    await Effect.runPromise(Scope.close(first, Exit.void))
    const answers = Array.from({ length: queuedRequests }, () => get(reconnectPort).then((status) => ({ status, at: now() })))
    // the requests reach the gateway and wait there (the route is in its grace period)
    await new Promise((resolve) => setTimeout(resolve, 200))
    const reconnectAt = now()
    const second = Scope.makeUnsafe()
    scopes.push(second)
    const bound = withTimeout("reconnect", connect(second, reconnectPort, true)).then(() => now())
    const served = await withTimeout("queued requests", Promise.all(answers))
    const boundAt = await bound
    if (served.some((a) => a.status !== 200)) throw new Error(`queued requests answered ${served.map((a) => a.status).join(",")}`)
    const firstServed = Math.min(...served.map((a) => a.at))
    report(suite, "reconnect.first_queued_served_ms", firstServed - reconnectAt, "ms")
    report(suite, "reconnect.all_queued_served_ms", Math.max(...served.map((a) => a.at)) - reconnectAt, "ms")
    report(suite, "reconnect.bound_to_first_served_ms", Math.max(0, firstServed - boundAt), "ms")

    // memory: idle backend sessions, each with one HTTP listener on a shared route
    const idlePort = await freePort()
    await collectGarbage(gateway)
    const before = memoryMb(gateway.pid).rss
    const idle = Scope.makeUnsafe()
    scopes.push(idle)
    for (let i = 0; i < idleSessions; i += connectBatch) {
      await withTimeout(
        "idle sessions",
        Promise.all(Array.from({ length: Math.min(connectBatch, idleSessions - i) }, () => connect(idle, idlePort, false)))
      )
    }
    await new Promise((resolve) => setTimeout(resolve, 500))
    await collectGarbage(gateway)
    const after = memoryMb(gateway.pid).rss
    report(suite, "idle_sessions.gateway.rss_before_mb", Math.round(before), "MB")
    report(suite, "idle_sessions.gateway.rss_after_mb", Math.round(after), "MB")
    report(suite, "idle_sessions.gateway.rss_per_session_kb", ((after - before) * 1e6) / 1024 / idleSessions, "KB")
  } finally {
    for (const scope of scopes) await Effect.runPromise(Scope.close(scope, Exit.void))
    local.closeAllConnections()
    if (local.listening) await new Promise<void>((resolve) => local.close(() => resolve()))
    await stopAll(started)
  }
}
