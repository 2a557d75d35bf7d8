/**
 * The drain as a load balancer sees it: Debian's haproxy, with its default retries (no `retry-on`) and a
 * health check on `/readyz`, in front of three `switchyard server` processes that one `switchyard client`
 * process serves a route on. A separate load process sends requests over HTTP/1.1 keep-alive connections
 * to haproxy without pause; one gateway gets SIGTERM, answers `/readyz` 503, is taken out of rotation
 * within the shutdown delay, then closes its ports and exits. No request fails.
 */
import { assert, describe, it } from "@effect/vitest"
import { type ChildProcess, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import * as os from "node:os"
import * as path from "node:path"
import { Effect } from "effect"
import { type Haproxy, requireHaproxy, startHaproxy } from "../support/haproxy.ts"
import { cleanupsPerTest } from "../support/leaks.ts"
import { addressAfter, freePort, spawnSwitchyard } from "../runtime/serverProcess.ts"

const available = requireHaproxy()
const describeHaproxy = available ? describe : describe.skip

const Token = "drain-haproxy-token-61c4"
/** Longest real wait for a state the processes reach on their own (routes bound, health checks, exit). */
const WaitLimitMs = 30_000
/** haproxy's health check interval; two failures take a gateway out of rotation. */
const CheckIntervalMs = 500
/** The gateways' shutdown delay, the default: well above the 2 × 500 ms (plus a check in progress) haproxy needs to see /readyz fail. */
const ShutdownDelay = "5s"
/** Requests the load process keeps in flight (each on its own kept-alive connection). */
const LoadConnections = 8
/** The load process stops by itself after this long, whatever happens to the test. */
const LoadMaxMs = 60_000

const cleanups = cleanupsPerTest()

const until = async (what: string, check: () => Promise<boolean>, detail: () => string = () => "") => {
  const deadline = Date.now() + WaitLimitMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${detail()}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

/** One GET to `host:port` without keep-alive: its status, or 0 when it failed. */
const statusOf = (host: string, port: number, p: string): Promise<number> =>
  new Promise((resolve) => {
    const req = http.get({ host, port, path: p, agent: false }, (res) => {
      res.resume()
      res.on("end", () => resolve(res.statusCode!))
    })
    req.setTimeout(5_000, () => req.destroy())
    req.on("error", () => resolve(0))
  })

/**
 * The load loop, as its own process: `LoadConnections` loops of GETs over a keep-alive agent until it
 * reads a line on stdin (or `LoadMaxMs` passes); then prints one JSON line with the counts and the
 * first failures.
 */
const loadScript = `
const http = require("node:http")
const [port, connections, maxMs] = process.argv.slice(2).map(Number)
const agent = new http.Agent({ keepAlive: true, maxSockets: connections })
let stopping = false, ok = 0, failed = 0
const failures = []
const fail = (what) => { failed++; if (failures.length < 20) failures.push(what) }
const one = (n) => new Promise((resolve) => {
  const req = http.get({ host: "127.0.0.1", port, path: "/load/" + n, agent }, (res) => {
    let body = ""
    res.setEncoding("utf8")
    res.on("data", (c) => (body += c))
    res.on("end", () => { if (res.statusCode === 200 && body === "served /load/" + n) ok++; else fail(res.statusCode + " " + body.slice(0, 200)); resolve() })
    res.on("error", (e) => { fail("response: " + e.message); resolve() })
  })
  req.setTimeout(10000, () => req.destroy(new Error("no answer within 10 s")))
  req.on("error", (e) => { fail("request: " + (e.code || "") + " " + e.message); resolve() })
})
let next = 0
const loop = async () => { while (!stopping) await one(next++) }
const timer = setTimeout(() => (stopping = true), maxMs)
process.stdin.once("data", () => (stopping = true))
Promise.all(Array.from({ length: connections }, loop)).then(() => {
  clearTimeout(timer)
  agent.destroy()
  process.stdout.write(JSON.stringify({ ok, failed, failures }) + "\\n")
  process.exit(0)
})
process.stdout.write("started\\n")
`

interface LoadResult {
  readonly ok: number
  readonly failed: number
  readonly failures: ReadonlyArray<string>
}

const startLoad = (dir: string, port: number) => {
  const script = path.join(dir, "load.cjs")
  fs.writeFileSync(script, loadScript)
  const child: ChildProcess = spawn(process.execPath, [script, String(port), String(LoadConnections), String(LoadMaxMs)], { stdio: ["pipe", "pipe", "pipe"] })
  let out = ""
  child.stdout!.on("data", (d: Buffer) => (out += d.toString()))
  child.stderr!.on("data", (d: Buffer) => (out += d.toString()))
  const exited = new Promise<void>((resolve) => child.once("close", () => resolve()))
  cleanups.push(async () => {
    if (child.exitCode === null) child.kill("SIGKILL")
    await exited
  })
  const stop = async (): Promise<LoadResult> => {
    child.stdin!.end("stop\n")
    const timer = setTimeout(() => child.kill("SIGKILL"), WaitLimitMs)
    await exited
    clearTimeout(timer)
    const line = out.split("\n").find((l) => l.startsWith("{"))
    if (line === undefined) throw new Error(`the load process printed no result: ${out}`)
    return JSON.parse(line) as LoadResult
  }
  return { stop, started: () => out.includes("started") }
}

const haproxyConfig = (o: { front: number; stats: number; publicPort: number; admins: ReadonlyArray<number> }) => `
global
    maxconn 1000

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s

listen stats
    bind 127.0.0.1:${o.stats}
    stats enable
    stats uri /stats

frontend public
    bind 127.0.0.1:${o.front}
    default_backend switchyard

backend switchyard
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter ${CheckIntervalMs}ms fall 2 rise 2
${o.admins.map((admin, i) => `    server gw${i + 1} 127.0.0.${i + 1}:${o.publicPort} check addr 127.0.0.1 port ${admin}`).join("\n")}
`

describeHaproxy("drain behind haproxy (processes)", () => {
  it.live("SIGTERM to one of three gateways under continuous keep-alive load: haproxy with default retries and a /readyz check loses no request", () =>
    Effect.promise(async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-drain-"))
      cleanups.push(async () => fs.rmSync(dir, { recursive: true, force: true }))
      const publicPort = await freePort()

      // three gateways, each binding the public port on its own loopback address
      const gateways = [1, 2, 3].map((n) => {
        const proc = spawnSwitchyard([
          "server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--public-host", `127.0.0.${n}`,
          "--shutdown-delay", ShutdownDelay, "--token", Token
        ])
        cleanups.push(() => proc.stop("SIGKILL"))
        return proc
      })
      await Promise.all(gateways.map((g) => g.waitFor("expose a local service")))
      const controls = gateways.map((g) => addressAfter(g.output(), /control port/))
      const admins = gateways.map((g) => addressAfter(g.output(), /admin endpoint/))

      // one backend, through one client process connected to all three
      const local = http.createServer((req, res) => res.end(`served ${req.url}`))
      await new Promise<void>((resolve) => local.listen(0, "127.0.0.1", resolve))
      cleanups.push(() => new Promise<void>((resolve) => { local.closeAllConnections(); local.close(() => resolve()) }))
      const client = spawnSwitchyard([
        "client", "--server", controls.map((c) => `127.0.0.1:${c.port}`).join(","), "--token", Token,
        "--expose", `127.0.0.1:${(local.address() as { port: number }).port}`, "--port", String(publicPort), "--no-admin"
      ])
      cleanups.push(() => client.stop("SIGKILL"))
      await until("the route on all three gateways", async () =>
        (await Promise.all([1, 2, 3].map((n) => statusOf(`127.0.0.${n}`, publicPort, "/")))).every((s) => s === 200), () => client.output())

      const front = await freePort()
      const stats = await freePort()
      const haproxy: Haproxy = await startHaproxy(dir, haproxyConfig({ front, stats, publicPort, admins: admins.map((a) => a.port) }), stats)
      cleanups.push(() => haproxy.stop())
      await until("haproxy to see three healthy gateways", async () =>
        (await haproxy.servers("switchyard")).every((s) => s.status === "UP"), () => haproxy.output())

      const load = startLoad(dir, front)
      await until("the load to start", async () => load.started())
      await until("requests on every gateway", async () => (await haproxy.servers("switchyard")).every((s) => s.total >= 20))

      // one gateway stops: 503 on /readyz at once, serving on for the delay, then its ports close
      const drained = gateways[0]!
      drained.child.kill("SIGTERM")
      await drained.waitFor("stopping: /readyz answers 503")
      await until("haproxy to take gw1 out of rotation", async () =>
        (await haproxy.servers("switchyard")).find((s) => s.name === "gw1")?.status.startsWith("DOWN") === true, () => haproxy.output())
      assert.notInclude(drained.output(), "shutting down: public ports stop accepting", "gw1 was out of rotation before its ports closed")
      const exit = await Promise.race([drained.exited, new Promise<string>((r) => setTimeout(() => r("still running"), WaitLimitMs))])
      assert.strictEqual(exit, 0, drained.output())

      // the load goes on over the two others a little longer
      const servedBefore = (await haproxy.servers("switchyard")).filter((s) => s.name !== "gw1").reduce((n, s) => n + s.total, 0)
      await until("more requests on the remaining gateways", async () =>
        (await haproxy.servers("switchyard")).filter((s) => s.name !== "gw1").reduce((n, s) => n + s.total, 0) >= servedBefore + 50)
      const result = await load.stop()
      assert.deepStrictEqual({ failed: result.failed, failures: result.failures }, { failed: 0, failures: [] }, `${result.ok} requests succeeded`)
      assert.isAbove(result.ok, 100)
      assert.isAtLeast((await haproxy.servers("switchyard")).find((s) => s.name === "gw1")!.total, 20)
    }), 180_000)
})
