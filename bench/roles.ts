/**
 * The processes of a bench: every party of a path (gateway, client side, destination) runs alone in its
 * own process, so what is measured of a process is that party's work and nothing else. Switchyard's
 * parties are the `switchyard` command itself (`startSwitchyard`, from the installed package); destinations are small Node servers
 * (`startBackend`); a bench file can also start itself in a role (`startRole`). Load comes from wrk and
 * curl, never from a measured process. `SWITCHYARD_BENCH_CPU_PROF=DIR` writes a CPU profile of every
 * Node child into DIR (on stop).
 */
import { type ChildProcess, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { createInterface } from "node:readline"
import { packAndInstall } from "../scripts/installedPackage.ts"
import { answered } from "./support.ts"

/** Names the role a bench file plays when started as a child. */
export const RoleVariable = "SWITCHYARD_BENCH_ROLE"
/** Longest wait for a child to announce something (a bound, not a figure). */
const announceTimeoutMs = 20_000
/** Longest a child may take to stop before it is killed. */
const stopTimeoutMs = 10_000
/** Output lines of a child kept for the error when it fails. */
const keptLines = 40
/**
 * The `switchyard` command as operators run it: the package this checkout packs, installed into a
 * temporary project once per bench run (removed when the bench exits). `SWITCHYARD_BENCH_FROM_SOURCES=1`
 * runs the sources instead, as `npm start` does (no build; Node's type stripping stays loaded, so about
 * 70 MB more of resident memory per process).
 */
const fromSources = process.env.SWITCHYARD_BENCH_FROM_SOURCES === "1"
/**
 * `SWITCHYARD_BENCH_CHECKOUT=DIR` runs the sources of another checkout of switchyard (an older commit,
 * with its own `npm ci`) as every measured process, so a suite compares two versions on one machine.
 */
const otherCheckout = process.env.SWITCHYARD_BENCH_CHECKOUT
let installedBin: string | undefined
const switchyardEntry = (): string => {
  if (otherCheckout !== undefined && otherCheckout !== "") return path.resolve(otherCheckout, "src/runtime/main.ts")
  if (fromSources) return path.resolve(import.meta.dirname, "../src/runtime/main.ts")
  if (installedBin === undefined) {
    const installed = packAndInstall()
    process.once("exit", () => installed.remove())
    installedBin = installed.bin
  }
  return installedBin
}
/** The Node flags the `switchyard` launcher runs with (its `#!` line), so a bench process is the command's process. */
const switchyardNodeFlags = fs.readFileSync(path.resolve(import.meta.dirname, "../bin/switchyard.js"), "utf8")
  .split("\n", 1)[0]!
  .split(/\s+/)
  .filter((word) => word.startsWith("--"))
/** Preloaded into a switchyard child that a bench asks for a full collection (SIGUSR2). */
const gcPreload = path.resolve(import.meta.dirname, "gc-on-signal.mjs")

/** A bench child: its output lines, and how to stop it. */
export interface BenchProcess {
  /** Name used in figures and errors. */
  readonly name: string
  readonly pid: number
  readonly child: ChildProcess
  /** The value of the first `key value` line with this key (waits for it, bounded). */
  readonly value: (key: string) => Promise<string>
  /** Resolves at the first output line (stdout or stderr) matching `pattern` from now on (bounded). */
  readonly nextLine: (pattern: RegExp) => Promise<string>
  /** The last lines it printed. */
  readonly output: () => string
  /** Writes one line to its stdin (a child started with `stdin`). */
  readonly send: (line: string) => void
  readonly stop: () => Promise<void>
}

/** Starts `command` as a child named `name`; resolves once it is ready (bounded). */
export const startProcess = async (
  name: string,
  command: string,
  args: ReadonlyArray<string>,
  options: {
    readonly env?: Record<string, string>
    /** A line it prints once ready, or a check that resolves once it is (for programs that print nothing). */
    readonly ready: RegExp | (() => Promise<void>)
    /** Keep its stdin open for `send`. */
    readonly stdin?: boolean
  }
): Promise<BenchProcess> => {
  const child = spawn(command, args, { env: { ...process.env, ...options.env }, stdio: [options.stdin === true ? "pipe" : "ignore", "pipe", "pipe"] })
  const lines: Array<string> = []
  const values = new Map<string, string>()
  const watchers = new Set<(line: string) => void>()
  const onLine = (line: string) => {
    lines.push(line)
    if (lines.length > keptLines) lines.shift()
    const space = line.indexOf(" ")
    const key = space < 0 ? line : line.slice(0, space)
    if (!values.has(key)) values.set(key, space < 0 ? "" : line.slice(space + 1))
    for (const w of [...watchers]) w(line)
  }
  createInterface({ input: child.stdout! }).on("line", onLine)
  createInterface({ input: child.stderr! }).on("line", onLine)
  const output = () => lines.join("\n")
  const waitFor = (what: string, match: (line: string) => string | undefined, known?: string) =>
    new Promise<string>((resolve, reject) => {
      if (known !== undefined) return resolve(known)
      const done = (f: () => void) => {
        clearTimeout(timer)
        watchers.delete(watch)
        child.off("exit", onExit)
        f()
      }
      const watch = (line: string) => {
        const found = match(line)
        if (found !== undefined) done(() => resolve(found))
      }
      const onExit = () => done(() => reject(new Error(`${name} exited before ${what}:\n${output()}`)))
      const timer = setTimeout(() => done(() => reject(new Error(`${name}: no ${what} after ${announceTimeoutMs} ms:\n${output()}`))), announceTimeoutMs)
      watchers.add(watch)
      child.once("exit", onExit)
    })
  const value = (key: string) =>
    waitFor(`"${key}"`, (line) => line === key ? "" : line.startsWith(`${key} `) ? line.slice(key.length + 1) : undefined, values.get(key))
  const nextLine = (pattern: RegExp) => waitFor(String(pattern), (line) => pattern.test(line) ? line : undefined)
  const stop = () =>
    new Promise<void>((resolve) => {
      if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return resolve()
      const timer = setTimeout(() => child.kill("SIGKILL"), stopTimeoutMs)
      child.once("exit", () => {
        clearTimeout(timer)
        resolve()
      })
      // SIGINT lets the child close its scope and exit normally, which writes a CPU profile
      child.kill("SIGINT")
    })
  try {
    await new Promise<void>((resolve, reject) => {
      child.once("spawn", resolve)
      child.once("error", reject)
    })
    const ready = options.ready
    if (typeof ready === "function") {
      const exited = new Promise<never>((_, reject) => child.once("exit", () => reject(new Error(`${name} exited:\n${output()}`))))
      exited.catch(() => {}) // the normal end, once the bench stops it
      await Promise.race([ready(), exited])
    } else if (!lines.some((l) => ready.test(l))) await nextLine(ready)
  } catch (e) {
    await stop()
    throw e
  }
  const send = (line: string) => void child.stdin!.write(`${line}\n`)
  return { name, pid: child.pid!, child, value, nextLine, output, send, stop }
}

/** Node flags that write a CPU profile of the child, when `SWITCHYARD_BENCH_CPU_PROF` asks for it. */
const profileFlags = (name: string): Array<string> => {
  const dir = process.env.SWITCHYARD_BENCH_CPU_PROF
  return dir === undefined ? [] : ["--cpu-prof", `--cpu-prof-dir=${dir}`, `--cpu-prof-name=${name}-${Date.now()}.cpuprofile`]
}

/** Starts `file` (a bench file) in role `role`; resolves once it printed `ready`. */
export const startRole = (file: string, role: string, env: Record<string, string> = {}, name = role): Promise<BenchProcess> =>
  startProcess(name, process.execPath, [...profileFlags(name), file], { env: { ...env, [RoleVariable]: role }, ready: /^ready$/, stdin: true })

/**
 * Runs `switchyard <args>` as party `name`, without its admin endpoint (several run on one host);
 * resolves once a line matches `ready`. With `gc`, SIGUSR2 makes it collect garbage (see `collectGarbage`).
 */
export const startSwitchyard = (
  name: string,
  args: ReadonlyArray<string>,
  options: { readonly ready: RegExp; readonly gc?: boolean }
): Promise<BenchProcess> =>
  startProcess(
    name,
    process.execPath,
    [
      ...switchyardNodeFlags,
      ...profileFlags(name),
      ...(options.gc === true ? ["--expose-gc", "--import", gcPreload] : []),
      switchyardEntry(),
      ...args
    ],
    { env: { SWITCHYARD_ADMIN_ENABLED: "false" }, ready: options.ready }
  )

/** The token every bench gateway grants its clients. */
export const benchToken = "bench-token"

/**
 * `switchyard client` dialling `server` (host:port or ws://…), exposing the destination on
 * `backendPort` as public port `publicPort` (`extra` flags first, e.g. `--h2`); resolves once the
 * public port answers through the tunnel.
 */
export const startExposingClient = async (
  server: string,
  backendPort: number,
  publicPort: number,
  extra: ReadonlyArray<string> = []
): Promise<BenchProcess> => {
  const client = await startSwitchyard("client", [
    "client",
    ...extra,
    "--server",
    server,
    "--token",
    benchToken,
    "--expose",
    `127.0.0.1:${backendPort}`,
    "--port",
    String(publicPort)
  ], { ready: /switchyard client:/ })
  try {
    await answered(`http://127.0.0.1:${publicPort}/`)
  } catch (e) {
    await client.stop()
    throw e
  }
  return client
}

/** A full collection in a child started with `gc` (so a memory figure is live data, not garbage). */
export const collectGarbage = async (party: BenchProcess): Promise<void> => {
  const done = party.nextLine(/^bench: gc done$/)
  party.child.kill("SIGUSR2")
  await done
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

/**
 * The destination of the HTTP suites, as a script for its own process: any path ending in `/big`
 * answers `bytes` (64 KiB writes with backpressure, Content-Length set), anything else `ok`.
 */
const backendScript = `
const http = require("node:http")
const bytes = Number(process.argv[1])
const slice = Buffer.alloc(64 * 1024, 0x5a)
const server = http.createServer({ keepAliveTimeout: 60000 }, (req, res) => {
  req.resume()
  if (!req.url.endsWith("/big")) {
    res.writeHead(200, { "content-type": "text/plain", "content-length": "2" })
    return res.end("ok")
  }
  res.writeHead(200, { "content-type": "application/octet-stream", "content-length": String(bytes) })
  let left = bytes
  const pump = () => {
    while (left > 0) {
      const c = left >= slice.length ? slice : slice.subarray(0, left)
      left -= c.length
      if (!res.write(c)) return void res.once("drain", pump)
    }
    res.end()
  }
  res.on("close", () => { left = 0 })
  pump()
})
server.listen(0, "127.0.0.1", () => process.stdout.write("port " + server.address().port + "\\nready\\n"))
process.on("SIGINT", () => process.exit(0))
`

/** Starts the destination server alone in its process; `bytes` is the size of `/big`. */
export const startBackend = async (bytes: number): Promise<{ readonly process: BenchProcess; readonly port: number }> => {
  const backend = await startProcess("backend", process.execPath, ["-e", backendScript, String(bytes)], { ready: /^ready$/ })
  return { process: backend, port: Number(await backend.value("port")) }
}

/** Stops every process, last started first. */
export const stopAll = async (processes: ReadonlyArray<BenchProcess>): Promise<void> => {
  for (const p of [...processes].reverse()) await p.stop()
}

/** A private temporary directory for config files, removed by the returned function. */
export const tempDir = (prefix: string): { readonly dir: string; readonly remove: () => void } => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `switchyard-bench-${prefix}-`))
  return { dir, remove: () => fs.rmSync(dir, { recursive: true, force: true }) }
}
