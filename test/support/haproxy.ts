/**
 * Debian's `haproxy` for the load-balancer tests: located like the other peers (in CI, `CI=true`, a
 * missing haproxy fails the tests; elsewhere they are skipped with the reason), started in the foreground
 * with a configuration of the test, and read through its CSV statistics page.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import * as path from "node:path"
import { inCI, type PeerProbe } from "./peers.ts"
import { recordSkip } from "./skipReasons.ts"

/** Longest wait for haproxy to answer its statistics page after it starts. */
export const HaproxyStartTimeoutMs = 15_000

/** Whether `haproxy` can be run: its path, or why not. */
export const haproxyBinary = (): PeerProbe<string> => {
  const run = spawnSync("haproxy", ["-v"], { encoding: "utf8" })
  if (run.error !== undefined || run.status !== 0) {
    return { value: undefined, reason: `haproxy is not installed (apt-get install -y haproxy): ${run.error?.message ?? run.stderr}` }
  }
  return { value: "haproxy", reason: undefined }
}

/** Fails in CI when haproxy is missing; elsewhere records and tells why the tests are skipped. */
export const requireHaproxy = (): boolean => {
  const probe = haproxyBinary()
  if (probe.value !== undefined) return true
  if (inCI) throw new Error(probe.reason)
  recordSkip(probe.reason!)
  console.warn(`skipping the haproxy tests: ${probe.reason}`)
  return false
}

/** One server line of haproxy's CSV statistics. */
export interface HaproxyServerStat {
  readonly name: string
  /** `UP`, `DOWN`, `UP 1/2`, `DOWN 1/2`, `MAINT`, … */
  readonly status: string
  /** Sessions (requests in HTTP mode with keep-alive to the client) sent to it in total. */
  readonly total: number
}

export interface Haproxy {
  readonly output: () => string
  /** The servers of `backend` as the statistics page lists them. */
  readonly servers: (backend: string) => Promise<ReadonlyArray<HaproxyServerStat>>
  readonly stop: () => Promise<void>
}

/**
 * Starts haproxy with `config` (written to `dir`), whose statistics are served on `statsPort` at
 * `/stats` (the config must declare it); resolves once that page answers.
 */
export const startHaproxy = async (dir: string, config: string, statsPort: number): Promise<Haproxy> => {
  const file = path.join(dir, "haproxy.cfg")
  fs.writeFileSync(file, config)
  let output = ""
  const child: ChildProcess = spawn("haproxy", ["-f", file, "-db"], { stdio: ["ignore", "pipe", "pipe"] })
  const onData = (chunk: Buffer) => void (output = (output + chunk.toString("utf8")).slice(-20_000))
  child.stdout!.on("data", onData)
  child.stderr!.on("data", onData)
  const exited = new Promise<void>((resolve) => child.once("close", () => resolve()))
  const csv = () =>
    new Promise<string>((resolve, reject) => {
      const req = http.get({ host: "127.0.0.1", port: statsPort, path: "/stats;csv", agent: false }, (res) => {
        let body = ""
        res.setEncoding("utf8")
        res.on("data", (c) => (body += c))
        res.on("end", () => resolve(body))
        res.on("error", reject)
      })
      req.setTimeout(5_000, () => req.destroy(new Error("haproxy's statistics did not answer within 5 s")))
      req.on("error", reject)
    })
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM")
    await exited
  }
  const deadline = Date.now() + HaproxyStartTimeoutMs
  for (;;) {
    try {
      await csv()
      break
    } catch (e) {
      if (child.exitCode !== null || Date.now() > deadline) {
        await stop()
        throw new Error(`haproxy did not start: ${(e as Error).message}\n${output}`)
      }
      await new Promise((r) => setTimeout(r, 100))
    }
  }
  const servers = async (backend: string) => {
    const lines = (await csv()).split("\n")
    const header = lines[0]!.replace(/^# /, "").split(",")
    const at = (name: string) => header.indexOf(name)
    return lines.slice(1).map((l) => l.split(",")).filter((f) => f[0] === backend && f[1] !== "BACKEND" && f[1] !== "FRONTEND").map((f) => ({
      name: f[1]!,
      status: f[at("status")]!,
      total: Number(f[at("stot")])
    }))
  }
  return { output: () => output, servers, stop }
}
