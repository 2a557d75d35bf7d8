/**
 * Shared helpers for `npm run bench`: every figure is printed as `<suite>.<figure>: <value> <unit>`, one
 * per line, so runs can be compared and recorded in docs/PERFORMANCE.md. Also the load tools (wrk for
 * small requests, curl for downloads, both separate processes) and the meter that reads what each
 * measured process spent from /proc. Nothing here starts a measured process (see roles.ts).
 */
import { execFile, execFileSync } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import { performance } from "node:perf_hooks"

/** A port that was free on 127.0.0.1 a moment ago. */
export const freePort = (): Promise<number> =>
  new Promise((resolve) => {
    const server = net.createServer()
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as net.AddressInfo).port
      server.close(() => resolve(port))
    })
  })

/** Prints one figure. */
export const report = (suite: string, figure: string, value: number, unit: string): void => {
  const shown = Number.isInteger(value) ? String(value) : value.toFixed(Math.abs(value) >= 100 ? 1 : 3)
  process.stdout.write(`${suite}.${figure}: ${shown} ${unit}\n`)
}

/** Prints a note (a skipped figure, a warning) that is not a figure. */
export const note = (suite: string, text: string): void => {
  process.stdout.write(`# ${suite}: ${text}\n`)
}

/** The value at quantile `q` (0..1) of `samples`. */
export const quantile = (samples: ReadonlyArray<number>, q: number): number => {
  if (samples.length === 0) return Number.NaN
  const sorted = [...samples].sort((a, b) => a - b)
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))
  return sorted[i]!
}

/** Milliseconds since an arbitrary origin, with sub-millisecond precision. */
export const now = (): number => performance.now()

/** Megabytes (10^6 bytes) per second. */
export const mbps = (bytes: number, ms: number): number => bytes / 1e6 / (ms / 1000)

// ---------------------------------------------------------------------------------------------------
// What a process spent, from /proc.

/** Bytes in the unit of the download CPU figure (CPU seconds per 100 MiB). */
const hundredMiB = 100 * 1024 * 1024
/** How often the meter samples VmRSS during a load phase (besides VmHWM). */
const rssSampleMs = 100

let ticks: number | undefined
/** Clock ticks per second of `/proc/<pid>/stat` times: `getconf CLK_TCK`, normally 100. */
export const clockTicks = (): number => {
  if (ticks === undefined) {
    try {
      ticks = Number(execFileSync("getconf", ["CLK_TCK"]).toString().trim()) || 100
    } catch {
      ticks = 100
    }
  }
  return ticks
}

/** User + system CPU seconds of `pid` so far (utime + stime of `/proc/<pid>/stat`); NaN where unreadable. */
export const cpuSeconds = (pid: number): number => {
  try {
    // the command name in parentheses may hold spaces: fields are counted after its closing one
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8")
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name
    return (Number(fields[11]) + Number(fields[12])) / clockTicks()
  } catch {
    return Number.NaN
  }
}

/** VmRSS and VmHWM (peak resident set) of `pid`, in MB (10^6 bytes); NaN where unreadable. */
export const memoryMb = (pid: number): { readonly rss: number; readonly peak: number } => {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, "utf8")
    const kb = (field: string) => Number(new RegExp(`${field}:\\s+(\\d+)\\s+kB`).exec(status)?.[1] ?? "NaN")
    return { rss: (kb("VmRSS") * 1024) / 1e6, peak: (kb("VmHWM") * 1024) / 1e6 }
  } catch {
    return { rss: Number.NaN, peak: Number.NaN }
  }
}

/** Restarts VmHWM from the current resident set (`5` into `/proc/<pid>/clear_refs`); false where refused. */
const restartPeak = (pid: number): boolean => {
  try {
    fs.writeFileSync(`/proc/${pid}/clear_refs`, "5")
    return true
  } catch {
    return false
  }
}

/** `pid` and its descendants (nginx and haproxy serve from child processes). */
const withDescendants = (pid: number): Array<number> => {
  const out = [pid]
  for (let i = 0; i < out.length; i++) {
    try {
      for (const task of fs.readdirSync(`/proc/${out[i]}/task`)) {
        const children = fs.readFileSync(`/proc/${out[i]}/task/${task}/children`, "utf8").trim()
        if (children !== "") out.push(...children.split(" ").map(Number))
      }
    } catch {
      // gone, or no children file: nothing more to add
    }
  }
  return out
}

/** A measured process, by the name its figures carry (`gateway`, `client`, `proxy`). */
export interface Party {
  readonly name: string
  readonly pid: number
}

/**
 * What the processes serving one path spend: CPU over its small-request phases (per request) and its
 * downloads (per 100 MiB), resident set before the first phase (idle) and its peak over all phases
 * (VmHWM restarted at the start, and VmRSS sampled, whichever is higher). A process and its
 * descendants count as one party.
 */
export interface PathMeter {
  /** Runs a small-request phase; its CPU is charged to `requests(result)` requests. */
  readonly requests: <A>(run: () => Promise<A>, requests: (a: A) => number) => Promise<A>
  /** Runs a phase that moves bytes (a download); its CPU is charged to `bytes(result)` bytes. */
  readonly transfer: <A>(run: () => Promise<A>, bytes: (a: A) => number) => Promise<A>
  /** Runs a phase that is charged to nothing (a warm-up), still counted for the peak. */
  readonly unmetered: <A>(run: () => Promise<A>) => Promise<A>
  /** Prints `<suite>.<path>.<party>.cpu_us_per_request`, `.cpu_s_per_100MiB`, `.rss_idle_mb`, `.rss_peak_mb`. */
  readonly report: () => void
}

export const meterPath = (suite: string, path: string, parties: ReadonlyArray<Party>): PathMeter => {
  const members = parties.map((p) => ({ ...p, pids: withDescendants(p.pid) }))
  const cpu = (pids: ReadonlyArray<number>) => pids.reduce((n, pid) => n + cpuSeconds(pid), 0)
  const rss = (pids: ReadonlyArray<number>) => pids.reduce((n, pid) => n + memoryMb(pid).rss, 0)
  const hwmRestarted = members.every((m) => m.pids.every(restartPeak))
  const idle = members.map((m) => rss(m.pids))
  const peak = [...idle]
  const requestCpu = members.map(() => 0)
  const byteCpu = members.map(() => 0)
  let requests = 0
  let bytes = 0
  const phase = async <A>(run: () => Promise<A>): Promise<{ readonly result: A; readonly spent: Array<number> }> => {
    const before = members.map((m) => cpu(m.pids))
    const sample = () => members.forEach((m, i) => (peak[i] = Math.max(peak[i]!, rss(m.pids))))
    const sampler = setInterval(sample, rssSampleMs)
    try {
      const result = await run()
      sample()
      return { result, spent: members.map((m, i) => cpu(m.pids) - before[i]!) }
    } finally {
      clearInterval(sampler)
    }
  }
  return {
    requests: async (run, count) => {
      const { result, spent } = await phase(run)
      spent.forEach((s, i) => (requestCpu[i]! += s))
      requests += count(result)
      return result
    },
    transfer: async (run, size) => {
      const { result, spent } = await phase(run)
      const moved = size(result)
      // a phase that moved nothing (it failed) is charged to nothing
      if (moved > 0) spent.forEach((s, i) => (byteCpu[i]! += s))
      bytes += moved
      return result
    },
    unmetered: async (run) => (await phase(run)).result,
    report: () => {
      const perRequest = requestCpu.map((s) => (1e6 * s) / requests)
      const perHundredMiB = byteCpu.map((s) => s / (bytes / hundredMiB))
      members.forEach((m, i) => {
        if (requests > 0) report(suite, `${path}.${m.name}.cpu_us_per_request`, Math.round(perRequest[i]!), "us")
        if (bytes > 0) report(suite, `${path}.${m.name}.cpu_s_per_100MiB`, perHundredMiB[i]!, "s")
        const hwm = hwmRestarted ? m.pids.reduce((n, pid) => n + memoryMb(pid).peak, 0) : 0
        report(suite, `${path}.${m.name}.rss_idle_mb`, Math.round(idle[i]!), "MB")
        report(suite, `${path}.${m.name}.rss_peak_mb`, Math.round(Math.max(peak[i]!, hwm)), "MB")
      })
      if (members.length > 1) {
        const sum = (xs: ReadonlyArray<number>) => xs.reduce((a, b) => a + b, 0)
        if (requests > 0) report(suite, `${path}.cpu_us_per_request`, Math.round(sum(perRequest)), "us")
        if (bytes > 0) report(suite, `${path}.cpu_s_per_100MiB`, sum(perHundredMiB), "s")
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Load from separate processes.

export interface WrkResult {
  readonly rps: number
  /** Requests wrk completed (the divisor of the CPU per request). */
  readonly requests: number
  readonly p50Ms: number
  readonly p99Ms: number
  /** Requests wrk gave up on after its 2 s timeout (counted, not failed: a slow path under load has some). */
  readonly timeouts: number
}

export interface WrkOptions {
  readonly threads: number
  readonly connections: number
  readonly seconds: number
  /** `Name: value` request headers. */
  readonly headers?: ReadonlyArray<string>
}

const toMs = (value: string, unit: string): number => Number(value) * (unit === "us" ? 0.001 : unit === "s" ? 1000 : 1)

/** wrk against `url`: req/s, requests, p50 and p99 latency. Fails on any non-2xx answer or connect, read or write error. */
export const wrk = (url: string, options: WrkOptions): Promise<WrkResult> =>
  new Promise((resolve, reject) => {
    const args = [`-t${options.threads}`, `-c${options.connections}`, `-d${options.seconds}s`, "--latency"]
    for (const h of options.headers ?? []) args.push("-H", h)
    execFile("wrk", [...args, url], { timeout: (options.seconds + 15) * 1000 }, (error, stdout) => {
      if (error !== null) return reject(new Error(`wrk ${url}: ${error.message}`))
      const rps = /Requests\/sec:\s+([\d.]+)/.exec(stdout)
      const requests = /(\d+) requests in/.exec(stdout)
      const p = (q: string) => new RegExp(`\\s${q}%\\s+([\\d.]+)(us|ms|s)\\b`).exec(stdout)
      const p50 = p("50")
      const p99 = p("99")
      if (rps === null || requests === null || p50 === null || p99 === null) return reject(new Error(`unreadable wrk output:\n${stdout}`))
      const non2xx = /Non-2xx or 3xx responses:\s+(\d+)/.exec(stdout)
      if (non2xx !== null) return reject(new Error(`wrk saw ${non2xx[1]} failed responses from ${url}`))
      const errors = /Socket errors:.*/.exec(stdout)
      if (errors !== null && /(connect|read|write) [1-9]/.test(errors[0])) return reject(new Error(`wrk against ${url}: ${errors[0]}`))
      const timeouts = Number(/timeout (\d+)/.exec(errors?.[0] ?? "")?.[1] ?? "0")
      resolve({ rps: Number(rps[1]), requests: Number(requests[1]), p50Ms: toMs(p50[1]!, p50[2]!), p99Ms: toMs(p99[1]!, p99[2]!), timeouts })
    })
  })

/** Longest wait for a path to answer before its load starts (a bound, not a figure). */
const answerTimeoutMs = 30_000

/** Resolves once a GET of `url` (with `Name: value` headers) answers 200: the path is up end to end. */
export const answered = async (url: string, headers: ReadonlyArray<string> = []): Promise<void> => {
  const deadline = Date.now() + answerTimeoutMs
  const fields = Object.fromEntries(headers.map((h) => [h.slice(0, h.indexOf(":")), h.slice(h.indexOf(":") + 1).trim()]))
  while (Date.now() < deadline) {
    const status = await new Promise<number>((resolve) =>
      http.get(url, { headers: fields, agent: false }, (res) => {
        res.resume()
        res.on("end", () => resolve(res.statusCode ?? 0))
      }).on("error", () => resolve(0))
    )
    if (status === 200) return
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  throw new Error(`${url} did not answer 200 within ${answerTimeoutMs} ms`)
}

/** Longest one curl download may take. */
const downloadMaxSeconds = 30

/** Downloads `url` with curl (headers as `Name: value`); the speed in MB/s, checked for size and status. */
export const curlDownload = async (url: string, expectedBytes: number, headers: ReadonlyArray<string> = []): Promise<number> => {
  const args = ["-s", "--max-time", String(downloadMaxSeconds), "-o", "/dev/null", "-w", "%{speed_download} %{size_download} %{http_code}"]
  for (const h of headers) args.push("-H", h)
  const out = await new Promise<string>((resolve, reject) =>
    execFile("curl", [...args, url], (error, stdout) => error === null ? resolve(stdout) : reject(new Error(`curl ${url} (exit ${error.code}): ${stdout}`)))
  )
  const [speed, size, status] = out.trim().split(" ")
  if (Number(size) !== expectedBytes || status !== "200") throw new Error(`download of ${url} failed: ${out}`)
  return Number(speed) / 1e6
}

/** Whether `command` can be run (wrk, curl, nginx…). */
export const installed = (command: string): boolean => {
  try {
    execFileSync("which", [command], { stdio: "ignore" })
    return true
  } catch {
    return false
  }
}
