/**
 * `npm run bench -- socket-proxy`: `switchyard socket-proxy` against the same upstream (a small Node HTTP
 * server on a Unix socket, also on loopback TCP for the direct baseline), each in its own process, with a
 * bare Node proxy, nginx and haproxy (one worker each, when installed) in front of the same socket for
 * comparison; wrk and curl are the callers. Figures: see compare.ts (every proxy's CPU and RSS, not only
 * switchyard's). Then the RSS of a fresh switchyard proxy while a client reads a 1 GiB stream at 1 MB/s.
 * Every run is bounded in time.
 */
import * as fs from "node:fs"
import * as http from "node:http"
import * as path from "node:path"
import { comparePaths, defaultSettings, type HttpPath } from "./compare.ts"
import { type BenchProcess, startProcess, startSwitchyard, stopAll, tempDir } from "./roles.ts"
import { answered, freePort, installed, memoryMb, note, report } from "./support.ts"

const SUITE = "socket-proxy"
const SLOW_STREAM_BYTES = 1024 * 1024 * 1024
const SLOW_READ_BYTES_PER_SECOND = 1_000_000
const SLOW_READ_SECONDS = 10

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

/** Reads a 1 GiB stream at ~1 MB/s for a bounded time; returns the proxy's peak RSS (MB). */
const slowReaderRss = (port: number, pid: number): Promise<number> =>
  new Promise((resolve, reject) => {
    let peak = memoryMb(pid).rss
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
        peak = Math.max(peak, memoryMb(pid).rss)
      }, 100)
      setTimeout(() => {
        clearInterval(tick)
        req.destroy()
        resolve(peak)
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


/** The switchyard proxy in front of `sock`, listening on `port`. */
const startSwitchyardProxy = (sock: string, port: number): Promise<BenchProcess> =>
  startSwitchyard("proxy", ["socket-proxy", "--upstream", `unix:${sock}`, "--listen", `127.0.0.1:${port}`, "--allow", "GET /**"], {
    ready: /switchyard socket-proxy:/
  })

export const run = async (): Promise<void> => {
  const temp = tempDir("sp")
  const dir = temp.dir
  const sock = path.join(dir, "engine.sock")
  const started: Array<BenchProcess> = []
  const small = (port: number) => ({ url: `http://127.0.0.1:${port}/v1.41/small` })
  const download = (port: number) => ({ url: `http://127.0.0.1:${port}/stream?bytes=${defaultSettings.downloadBytes}` })
  try {
    const directPort = await freePort()
    started.push(await startProcess("upstream", process.execPath, ["-e", UPSTREAM_SCRIPT, sock, String(directPort)], { ready: /^ready$/ }))
    // nginx and haproxy workers may run as an unprivileged user: let them reach the upstream socket.
    fs.chmodSync(dir, 0o755)
    fs.chmodSync(sock, 0o666)
    const proxyPort = await freePort()
    const proxy = await startSwitchyardProxy(sock, proxyPort)
    started.push(proxy)
    const paths: Array<HttpPath> = [
      { name: "direct", small: small(directPort), download: download(directPort), parties: [] },
      { name: "switchyard", small: small(proxyPort), download: download(proxyPort), parties: [proxy] }
    ]

    // a bare Node proxy, nginx and haproxy in front of the same upstream, one worker each
    const nginxPort = await freePort()
    fs.writeFileSync(path.join(dir, "nginx.conf"), nginxConfig(dir, nginxPort, sock))
    const haproxyPort = await freePort()
    fs.writeFileSync(path.join(dir, "haproxy.cfg"), haproxyConfig(haproxyPort, sock))
    const barePort = await freePort()
    for (const [name, cmd, args, port] of [
      ["node_bare", process.execPath, ["-e", BARE_NODE_PROXY_SCRIPT, sock, String(barePort)], barePort],
      ["nginx", "nginx", ["-c", path.join(dir, "nginx.conf"), "-p", dir], nginxPort],
      ["haproxy", "haproxy", ["-f", path.join(dir, "haproxy.cfg"), "-db"], haproxyPort]
    ] as const) {
      if (cmd !== process.execPath && !installed(cmd)) {
        note(SUITE, `${name} not installed; its figures are skipped`)
        continue
      }
      try {
        const other = await startProcess(name, cmd, args, { ready: () => answered(small(port).url) })
        started.push(other)
        paths.push({ name, small: small(port), download: download(port), parties: [{ name: "proxy", pid: other.pid }] })
      } catch (e) {
        note(SUITE, `${name} did not start (${(e as Error).message.split("\n")[0]}); its figures are skipped`)
      }
    }
    await comparePaths(SUITE, paths)

    // RSS on a fresh proxy process, so the figure is not the heap left over from the load runs above
    await stopAll(started.splice(1))
    const freshPort = await freePort()
    const fresh = await startSwitchyardProxy(sock, freshPort)
    started.push(fresh)
    const idle = memoryMb(fresh.pid).rss
    const peak = await slowReaderRss(freshPort, fresh.pid)
    report(SUITE, "slow_reader_1GiB.proxy.rss_idle_mb", Math.round(idle), "MB")
    report(SUITE, "slow_reader_1GiB.proxy.rss_peak_mb", Math.round(peak), "MB")
    report(SUITE, "slow_reader_1GiB.proxy.rss_growth_mb", peak - idle, "MB")
  } finally {
    await stopAll(started)
    temp.remove()
  }
}
