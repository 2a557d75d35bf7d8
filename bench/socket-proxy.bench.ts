/**
 * `npm run bench -- socket-proxy`: the socket proxy against the same upstream (a small Node HTTP server on
 * a Unix socket, also on loopback TCP for the direct baseline), each in its own process. Small-response
 * req/s and latency with wrk (direct, switchyard, a bare Node proxy, and nginx/haproxy when installed), a 100 MiB download
 * with curl as the client (so the client is not the limit), and the proxy's RSS while a client reads a 1 GiB stream at
 * 1 MB/s. Every run is bounded in time.
 */
import { type ChildProcess, execFile, spawn, spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { setTimeout as sleep } from "node:timers/promises"
import { promisify } from "node:util"
import { freePort, report } from "./support.ts"

const SUITE = "socket-proxy"
const WRK_SECONDS = 3
const WRK_CONNECTIONS = 32
const WRK_ROUNDS = 2
const DOWNLOAD_BYTES = 100 * 1024 * 1024
const DOWNLOAD_ROUNDS = 5
/** Longest one download may take (s); a slower one fails the run. */
const DOWNLOAD_MAX_SECONDS = 30
const SLOW_STREAM_BYTES = 1024 * 1024 * 1024
const SLOW_READ_BYTES_PER_SECOND = 1_000_000
const SLOW_READ_SECONDS = 10
const main = path.resolve(import.meta.dirname, "../src/runtime/main.ts")
const exec = promisify(execFile)

/**
 * The upstream, as a script for its own process: /small (2 bytes) and /stream?bytes=N (256 KiB writes, with
 * backpressure).
 */
const UPSTREAM_SCRIPT = `
const http = require("node:http")
const chunk = Buffer.alloc(256 * 1024, 0x61)
const handler = (req, res) => {
  const url = new URL(req.url, "http://u")
  if (url.pathname.endsWith("/small")) {
    res.writeHead(200, { "content-type": "text/plain", "content-length": "2" })
    res.end("OK")
    return
  }
  const total = Number(url.searchParams.get("bytes") || "0")
  res.writeHead(200, { "content-type": "application/octet-stream", "content-length": String(total) })
  let left = total
  const pump = () => {
    while (left > 0) {
      const c = left >= chunk.length ? chunk : chunk.subarray(0, left)
      left -= c.length
      if (!res.write(c)) { res.once("drain", pump); return }
    }
    res.end()
  }
  res.on("close", () => { left = 0 })
  pump()
}
const [sock, port] = process.argv.slice(1)
let ready = 0
const up = () => { if (++ready === 2) process.stdout.write("ready\\n") }
http.createServer({ keepAliveTimeout: 60000 }, handler).listen(sock, up)
http.createServer({ keepAliveTimeout: 60000 }, handler).listen(Number(port), "127.0.0.1", up)
`

/** Spawns a process and resolves once `ready` appears in its output (bounded). */
const startProcess = (cmd: string, args: ReadonlyArray<string>, ready: (output: string) => boolean): Promise<ChildProcess> =>
  new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] })
    let output = ""
    const timer = setTimeout(() => {
      child.kill("SIGKILL")
      reject(new Error(`${cmd} did not start: ${output}`))
    }, 15_000)
    const onData = (d: Buffer) => {
      output += d.toString()
      if (ready(output)) {
        clearTimeout(timer)
        resolve(child)
      }
    }
    child.stdout!.on("data", onData)
    child.stderr!.on("data", onData)
    child.on("error", (e) => {
      clearTimeout(timer)
      reject(e)
    })
  })

/** Waits until something accepts connections on the port (bounded). */
const waitForPort = async (port: number): Promise<void> => {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, "127.0.0.1", () => {
        s.destroy()
        resolve(true)
      })
      s.on("error", () => resolve(false))
    })
    if (ok) return
    await sleep(25)
  }
  throw new Error(`nothing listening on ${port}`)
}

const stop = async (child: ChildProcess): Promise<void> => {
  if (child.exitCode !== null || child.signalCode !== null) return
  const closed = new Promise((resolve) => child.once("close", resolve))
  child.kill("SIGTERM")
  const timer = setTimeout(() => child.kill("SIGKILL"), 3_000)
  await closed
  clearTimeout(timer)
}

const hasWrk = (): boolean => spawnSync("wrk", ["--version"]).error === undefined
const hasCurl = (): boolean => spawnSync("curl", ["--version"]).error === undefined

interface WrkResult {
  readonly rps: number
  readonly p50: number
  readonly p99: number
}

const toMs = (value: string, unit: string): number => Number(value) * (unit === "us" ? 0.001 : unit === "s" ? 1000 : 1)

/** wrk against a URL; req/s and p50/p99 latency (ms). */
const wrk = async (url: string): Promise<WrkResult> => {
  const { stdout } = await exec("wrk", ["-t1", `-c${WRK_CONNECTIONS}`, `-d${WRK_SECONDS}s`, "--latency", url], { timeout: (WRK_SECONDS + 10) * 1000 })
  const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(stdout)?.[1] ?? "NaN")
  const p = (q: string) => {
    const m = new RegExp(`\\s${q}%\\s+([\\d.]+)(us|ms|s)`).exec(stdout)
    return m ? toMs(m[1]!, m[2]!) : Number.NaN
  }
  if (/Non-2xx/.test(stdout)) throw new Error(`wrk saw errors against ${url}:\n${stdout}`)
  return { rps, p50: p("50"), p99: p("99") }
}

/** Downloads `bytes` from a URL with curl (discarding the body) and returns MB/s. */
const download = async (port: number, bytes: number): Promise<number> => {
  const { stdout } = await exec(
    "curl",
    ["-s", "-S", "-f", "-o", "/dev/null", "--max-time", String(DOWNLOAD_MAX_SECONDS), "-w", "%{size_download} %{speed_download}", `http://127.0.0.1:${port}/stream?bytes=${bytes}`],
    { timeout: (DOWNLOAD_MAX_SECONDS + 5) * 1000 }
  )
  const [size, speed] = stdout.trim().split(" ").map(Number)
  if (size !== bytes) throw new Error(`short download through port ${port}: ${size} bytes`)
  return speed! / 1e6
}

const rssBytes = (pid: number): number => {
  const status = fs.readFileSync(`/proc/${pid}/status`, "utf8")
  const kb = Number(/VmRSS:\s+(\d+)\s+kB/.exec(status)?.[1] ?? "NaN")
  return kb * 1024
}

/** Reads a 1 GiB stream at ~1 MB/s for a bounded time; returns the proxy's peak RSS (MB). */
const slowReaderRss = (port: number, pid: number): Promise<number> =>
  new Promise((resolve, reject) => {
    let peak = rssBytes(pid)
    const req = http.get({ host: "127.0.0.1", port, path: `/stream?bytes=${SLOW_STREAM_BYTES}`, agent: false }, (res) => {
      const perTick = SLOW_READ_BYTES_PER_SECOND / 10
      let budget = perTick
      res.on("data", (c: Buffer) => {
        budget -= c.length
        if (budget <= 0) res.pause()
      })
      res.on("error", () => {})
      const tick = setInterval(() => {
        budget += perTick
        if (budget > 0) res.resume()
        peak = Math.max(peak, rssBytes(pid))
      }, 100)
      setTimeout(() => {
        clearInterval(tick)
        req.destroy()
        resolve(peak / 1e6)
      }, SLOW_READ_SECONDS * 1000)
    })
    req.on("error", (e) => (e.message === "socket hang up" ? undefined : reject(e)))
  })

/** The least a Node proxy does (no rules, no header filtering, no limits): the floor for Node's HTTP stack. */
const BARE_NODE_PROXY_SCRIPT = `
const http = require("node:http")
const [sock, port] = process.argv.slice(1)
const agent = new http.Agent({ keepAlive: true, maxSockets: 256 })
http.createServer((req, res) => {
  const up = http.request({ socketPath: sock, agent, method: req.method, path: req.url, headers: req.headers }, (r) => {
    res.writeHead(r.statusCode, r.headers)
    r.pipe(res)
  })
  req.pipe(up)
}).listen(Number(port), "127.0.0.1")
`

const nginxConfig = (dir: string, port: number, sock: string): string => `
worker_processes 1;
daemon off;
pid ${dir}/nginx.pid;
error_log ${dir}/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${dir}/nginx-body;
  proxy_temp_path ${dir}/nginx-proxy;
  fastcgi_temp_path ${dir}/nginx-fastcgi;
  uwsgi_temp_path ${dir}/nginx-uwsgi;
  scgi_temp_path ${dir}/nginx-scgi;
  upstream engine { server unix:${sock}; keepalive 64; }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
`

const haproxyConfig = (port: number, sock: string): string => `
global
  maxconn 4096
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:${port}
  default_backend engine
backend engine
  server s1 ${sock}
`

/** Starts a third-party proxy, or returns undefined with the reason printed. */
const startOther = async (name: string, cmd: string, args: ReadonlyArray<string>, port: number): Promise<ChildProcess | undefined> => {
  if (cmd !== process.execPath && spawnSync("which", [cmd]).status !== 0) {
    process.stdout.write(`# ${SUITE}: ${name} not installed; its figures are skipped\n`)
    return undefined
  }
  const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"] })
  try {
    await waitForPort(port)
    return child
  } catch (e) {
    child.kill("SIGKILL")
    process.stdout.write(`# ${SUITE}: ${name} did not start (${(e as Error).message}); its figures are skipped\n`)
    return undefined
  }
}

interface Target {
  readonly name: string
  readonly port: number
}

/** Best of `rounds` runs per target, interleaved so a burst of load from elsewhere hits all of them alike. */
const bestOf = async <A>(targets: ReadonlyArray<Target>, rounds: number, measure: (t: Target) => Promise<A>, better: (a: A, b: A) => boolean) => {
  const best = new Map<string, A>()
  for (let round = 0; round < rounds; round++) {
    for (const t of targets) {
      const r = await measure(t)
      const prev = best.get(t.name)
      if (prev === undefined || better(r, prev)) best.set(t.name, r)
    }
  }
  return best
}

export const run = async (): Promise<void> => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-bench-sp-"))
  const sock = path.join(dir, "engine.sock")
  const children: Array<ChildProcess> = []
  try {
    const directPort = await freePort()
    const upstream = await startProcess(process.execPath, ["-e", UPSTREAM_SCRIPT, sock, String(directPort)], (o) => o.includes("ready"))
    children.push(upstream)
    // nginx and haproxy workers may run as an unprivileged user: let them reach the upstream socket.
    fs.chmodSync(dir, 0o755)
    fs.chmodSync(sock, 0o666)
    const proxyPort = await freePort()
    const proxy = await startProcess(
      process.execPath,
      [main, "socket-proxy", "--upstream", `unix:${sock}`, "--listen", `127.0.0.1:${proxyPort}`, "--allow", "GET /**"],
      (o) => o.includes("switchyard socket-proxy:")
    )
    children.push(proxy)

    // A bare Node proxy, nginx and haproxy in front of the same upstream, one worker each.
    const nginxPort = await freePort()
    fs.writeFileSync(path.join(dir, "nginx.conf"), nginxConfig(dir, nginxPort, sock))
    const haproxyPort = await freePort()
    fs.writeFileSync(path.join(dir, "haproxy.cfg"), haproxyConfig(haproxyPort, sock))
    const barePort = await freePort()
    const targets: Array<Target> = [{ name: "direct", port: directPort }, { name: "switchyard", port: proxyPort }]
    for (const [name, cmd, args, port] of [
      ["node_bare", process.execPath, ["-e", BARE_NODE_PROXY_SCRIPT, sock, String(barePort)], barePort],
      ["nginx", "nginx", ["-c", path.join(dir, "nginx.conf"), "-p", dir], nginxPort],
      ["haproxy", "haproxy", ["-f", path.join(dir, "haproxy.cfg"), "-db"], haproxyPort]
    ] as const) {
      const child = await startOther(name, cmd, args, port)
      if (child) {
        children.push(child)
        targets.push({ name, port })
      }
    }

    if (hasWrk()) {
      const small = await bestOf(targets, WRK_ROUNDS, (t) => wrk(`http://127.0.0.1:${t.port}/v1.41/small`), (a, b) => a.rps > b.rps)
      const direct = small.get("direct")!
      for (const t of targets) {
        const r = small.get(t.name)!
        report(SUITE, `small.${t.name}`, Math.round(r.rps), "req/s")
        if (t.name !== "direct") report(SUITE, `small.${t.name}_ratio`, r.rps / direct.rps, "x direct")
        report(SUITE, `small.${t.name}_p50`, r.p50, "ms")
        report(SUITE, `small.${t.name}_p99`, r.p99, "ms")
      }
    } else {
      process.stdout.write(`# ${SUITE}: wrk not installed; req/s and latency figures are skipped\n`)
    }

    if (hasCurl()) {
      const downloads = await bestOf(targets, DOWNLOAD_ROUNDS, (t) => download(t.port, DOWNLOAD_BYTES), (a, b) => a > b)
      const directDownload = downloads.get("direct")!
      for (const t of targets) {
        const r = downloads.get(t.name)!
        report(SUITE, `download_100MiB.${t.name}`, r, "MB/s")
        if (t.name !== "direct") report(SUITE, `download_100MiB.${t.name}_ratio`, r / directDownload, "x direct")
      }
    } else {
      process.stdout.write(`# ${SUITE}: curl not installed; download figures are skipped\n`)
    }

    // RSS on a fresh proxy process, so the figure is not the heap left over from the load runs above.
    for (const child of children.slice(2)) await stop(child)
    await stop(proxy)
    const freshPort = await freePort()
    const fresh = await startProcess(
      process.execPath,
      [main, "socket-proxy", "--upstream", `unix:${sock}`, "--listen", `127.0.0.1:${freshPort}`, "--allow", "GET /**"],
      (o) => o.includes("switchyard socket-proxy:")
    )
    children.push(fresh)
    const idle = rssBytes(fresh.pid!) / 1e6
    const peak = await slowReaderRss(freshPort, fresh.pid!)
    report(SUITE, "rss.idle", idle, "MB")
    report(SUITE, "rss.slow_reader_1GiB_peak", peak, "MB")
    report(SUITE, "rss.slow_reader_growth", peak - idle, "MB")
  } finally {
    for (const child of children.reverse()) await stop(child)
    fs.rmSync(dir, { recursive: true, force: true })
  }
}
