/**
 * Child processes for the download figures of the websocket and http2 benches: each side of a path
 * (gateway, far side, destination) runs alone in its own Node process, started from a bench file with
 * a role variable, and curl downloads, so the figure is the product's and not one process doing every
 * leg. `SWITCHYARD_BENCH_CPU_PROF=DIR` writes a CPU profile of every child into DIR (on stop).
 */
import { type ChildProcess, execFile, spawn } from "node:child_process"
import { createInterface } from "node:readline"

/** Names the role a bench file plays when started as a child. */
export const RoleVariable = "SWITCHYARD_BENCH_ROLE"
/** Longest wait for a child to announce something (a bound, not a figure). */
const announceTimeoutMs = 20_000
/** Longest a child may take to stop before it is killed. */
const stopTimeoutMs = 10_000
/** Longest one curl download may take. */
const downloadMaxSeconds = 30

/** A bench child: the `key value` lines it announced, and how to stop it. */
export interface RoleProcess {
  readonly child: ChildProcess
  /** The value of the first `key value` line with this key (waits for it, bounded). */
  readonly value: (key: string) => Promise<string>
  readonly stop: () => Promise<void>
}

/** Starts `file` in role `role`; resolves once it printed `ready`. */
export const startRole = async (file: string, role: string, env: Record<string, string> = {}): Promise<RoleProcess> => {
  const profileDir = process.env.SWITCHYARD_BENCH_CPU_PROF
  const flags = profileDir === undefined ? [] : ["--cpu-prof", `--cpu-prof-dir=${profileDir}`, `--cpu-prof-name=${role}-${Date.now()}.cpuprofile`]
  const child = spawn(process.execPath, [...flags, file], {
    env: { ...process.env, ...env, [RoleVariable]: role },
    stdio: ["ignore", "pipe", "inherit"]
  })
  const values = new Map<string, string>()
  const waiters = new Map<string, Array<(v: string) => void>>()
  createInterface({ input: child.stdout! }).on("line", (line) => {
    const space = line.indexOf(" ")
    const key = space < 0 ? line : line.slice(0, space)
    const value = space < 0 ? "" : line.slice(space + 1)
    if (!values.has(key)) values.set(key, value)
    for (const w of waiters.get(key) ?? []) w(value)
    waiters.delete(key)
  })
  const value = (key: string) =>
    new Promise<string>((resolve, reject) => {
      const known = values.get(key)
      if (known !== undefined) return resolve(known)
      const timer = setTimeout(() => reject(new Error(`${role}: no "${key}" after ${announceTimeoutMs} ms`)), announceTimeoutMs)
      const onExit = () => reject(new Error(`${role} exited before announcing "${key}"`))
      child.once("exit", onExit)
      waiters.set(key, [...(waiters.get(key) ?? []), (v) => {
        clearTimeout(timer)
        child.off("exit", onExit)
        resolve(v)
      }])
    })
  const stop = () =>
    new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) return resolve()
      const timer = setTimeout(() => child.kill("SIGKILL"), stopTimeoutMs)
      child.once("exit", () => {
        clearTimeout(timer)
        resolve()
      })
      // SIGINT lets the child close its scope and exit normally, which writes a CPU profile
      child.kill("SIGINT")
    })
  try {
    await value("ready")
  } catch (e) {
    await stop()
    throw e
  }
  return { child, value, stop }
}

/** In a child: prints one `key value` line for the bench. */
export const announce = (key: string, value: string | number = ""): void => {
  process.stdout.write(value === "" ? `${key}\n` : `${key} ${value}\n`)
}

/** In a child: runs `close` on SIGINT or SIGTERM, then exits. */
export const closeOnSignal = (close: () => Promise<void>): void => {
  const onSignal = () => {
    void close().finally(() => process.exit(0))
  }
  process.once("SIGINT", onSignal)
  process.once("SIGTERM", onSignal)
}

/** Downloads `url` with curl (headers as `Name: value`); the speed in MB/s, checked for size and status. */
export const curlDownload = async (url: string, expectedBytes: number, headers: ReadonlyArray<string> = []): Promise<number> => {
  const args = ["-s", "--max-time", String(downloadMaxSeconds), "-o", "/dev/null", "-w", "%{speed_download} %{size_download} %{http_code}"]
  for (const h of headers) args.push("-H", h)
  const out = await new Promise<string>((resolve, reject) =>
    execFile("curl", [...args, url], (error, stdout) => error === null ? resolve(stdout) : reject(new Error(`curl ${url}: ${error.message} ${stdout}`)))
  )
  const [speed, size, status] = out.trim().split(" ")
  if (Number(size) !== expectedBytes || status !== "200") throw new Error(`download of ${url} failed: ${out}`)
  return Number(speed) / 1e6
}
