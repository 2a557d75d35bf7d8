/**
 * Runs `switchyard server` (or another command) as a child process on loopback for process-level tests:
 * waits for its start banner, reads the bound addresses from it, and stops it with a signal.
 */
import { type ChildProcess, spawn } from "node:child_process"
import * as http from "node:http"
import * as path from "node:path"

export const mainScript = path.resolve(import.meta.dirname, "../../src/runtime/main.ts")
/** Longest wait for a child to print its banner or to exit. */
export const ProcessTimeoutMs = 30_000

export interface RunningProcess {
  readonly child: ChildProcess
  /** stdout and stderr so far. */
  readonly output: () => string
  /** Resolves when the output contains `text`. */
  readonly waitFor: (text: string | RegExp, timeoutMs?: number) => Promise<void>
  /** Sends `signal` and resolves with the exit code. */
  readonly stop: (signal?: NodeJS.Signals) => Promise<number | null>
  /** The exit code once it exited. */
  readonly exited: Promise<number | null>
}

/** Spawns `node src/runtime/main.ts ...args` with Node 24 (the test runner's own node). */
export const spawnSwitchyard = (args: ReadonlyArray<string>, env: Record<string, string> = {}): RunningProcess => {
  const child = spawn(process.execPath, [mainScript, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    // no shutdown delay unless a test asks for one: a stop then drains at once
    env: { ...process.env, SWITCHYARD_TOKEN: "", SWITCHYARD_TOKEN_FILE: "", SWITCHYARD_SHUTDOWN_DELAY_MS: "0", ...env }
  })
  let out = ""
  const listeners = new Set<() => void>()
  const onData = (d: Buffer) => {
    out += d.toString()
    for (const l of listeners) l()
  }
  child.stdout!.on("data", onData)
  child.stderr!.on("data", onData)
  const exited = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)))
  const timer = setTimeout(() => child.kill("SIGKILL"), 5 * ProcessTimeoutMs)
  void exited.then(() => clearTimeout(timer))
  const waitFor = (text: string | RegExp, timeoutMs = ProcessTimeoutMs) =>
    new Promise<void>((resolve, reject) => {
      const check = () => {
        if (typeof text === "string" ? out.includes(text) : text.test(out)) {
          done()
          resolve()
        }
      }
      const t = setTimeout(() => {
        done()
        reject(new Error(`no ${String(text)} in output within ${timeoutMs} ms:\n${out}`))
      }, timeoutMs)
      const done = () => {
        clearTimeout(t)
        listeners.delete(check)
        void exited.then(() => undefined)
      }
      listeners.add(check)
      void exited.then(() => {
        if (listeners.has(check)) {
          done()
          reject(new Error(`exited before printing ${String(text)}:\n${out}`))
        }
      })
      check()
    })
  const stop = async (signal: NodeJS.Signals = "SIGTERM") => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal)
    return exited
  }
  return { child, output: () => out, waitFor, stop, exited }
}

/** The `host:port` printed after `label` in the banner. */
export const addressAfter = (output: string, label: RegExp): { host: string; port: number } => {
  const m = new RegExp(label.source + String.raw`\s+(?:http://)?(127\.0\.0\.1):(\d+)`).exec(output)
  if (!m) throw new Error(`no address for ${label} in:\n${output}`)
  return { host: m[1]!, port: Number(m[2]) }
}

/** A port free at the time of the call (for public ports a backend asks for). */
export { freePort } from "../support/ports.ts"

export interface Answer {
  readonly status: number
  readonly headers: http.IncomingHttpHeaders
  readonly body: string
}

/** One GET (no keep-alive). */
export const get = (port: number, p: string, headers: Record<string, string> = {}): Promise<Answer> =>
  new Promise((resolve, reject) => {
    const req = http.get({ host: "127.0.0.1", port, path: p, headers, agent: false }, (res) => {
      let body = ""
      res.setEncoding("utf8")
      res.on("data", (c) => (body += c))
      res.on("end", () => resolve({ status: res.statusCode!, headers: res.headers, body }))
      res.on("error", reject)
    })
    req.on("error", reject)
  })

/** The value of a sample in a Prometheus exposition (0 when absent). */
export const sample = (text: string, name: string, labels: Record<string, string> = {}): number => {
  const wanted = Object.entries(labels).map(([k, v]) => `${k}="${v}"`)
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$/.exec(line)
    if (!m || m[1] !== name) continue
    const set = m[2] ?? ""
    if (wanted.every((w) => set.includes(w))) return Number(m[3])
  }
  return 0
}
