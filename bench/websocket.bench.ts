/**
 * `npm run bench -- websocket`: the WebSocket tunnels against wrk calling the destination directly, on
 * loopback, in one run. `wsp`: wrk → `switchyard wsp-server` `/request` → pooled WebSocket →
 * `switchyard wsp-client` → destination (masked client frames, wsp's default; `wsp_unmasked` with
 * `maskframes: false`). `yamux_ws`: wrk → `switchyard server` public port → yamux stream inside one
 * WebSocket (`--ws-listen`, `ws://…/tunnel`) → `switchyard client` → destination. Each party runs alone
 * in its process, the destination being a small Node server; wrk and curl are the callers. Figures: see
 * compare.ts.
 */
import * as fs from "node:fs"
import * as path from "node:path"
import { comparePaths, defaultSettings } from "./compare.ts"
import { type BenchProcess, benchToken, startBackend, startExposingClient, startSwitchyard, stopAll, tempDir } from "./roles.ts"
import { answered, freePort } from "./support.ts"

const suite = "websocket"
const wspSecret = "bench"
/** Idle pooled WebSockets the wsp-client keeps: one per wrk connection. */
const wspPoolIdle = defaultSettings.wrk.connections
const downloadBytes = defaultSettings.downloadBytes

/** A wsp-server and a wsp-client for `backendPort`; the server's port. */
const startWsp = async (dir: string, name: string, backendPort: number, maskFrames: boolean, started: Array<BenchProcess>) => {
  const port = await freePort()
  const serverConfig = path.join(dir, `${name}_server.cfg`)
  // JSON is YAML: the files are what wsp reads, with switchyard's extra keys
  fs.writeFileSync(serverConfig, JSON.stringify({ host: "127.0.0.1", port, secretkey: wspSecret }))
  const server = await startSwitchyard("server", ["wsp-server", "--config", serverConfig], { ready: /switchyard wsp-server listening/ })
  started.push(server)
  const clientConfig = path.join(dir, `${name}_client.cfg`)
  fs.writeFileSync(clientConfig, JSON.stringify({
    id: name.replace(/_/g, "-"),
    targets: [`ws://127.0.0.1:${port}/register`],
    poolidlesize: wspPoolIdle,
    poolmaxsize: wspPoolIdle * 2,
    secretkey: wspSecret,
    // the bench destination only, so the rule check is part of what is measured
    whitelist: [{ method: "^GET$", url: `^http://127\\.0\\.0\\.1:${backendPort}/` }],
    maskframes: maskFrames
  }))
  const client = await startSwitchyard("client", ["wsp-client", "--config", clientConfig], { ready: /switchyard wsp-client/ })
  started.push(client)
  const via = (p: string) => [`X-Proxy-Destination: http://127.0.0.1:${backendPort}${p}`]
  const url = `http://127.0.0.1:${port}/request`
  await answered(url, via("/"))
  return { name, small: { url, headers: via("/") }, download: { url, headers: via("/big") }, parties: [server, client] }
}

/** `switchyard server` with its WebSocket control path, and a `switchyard client` dialling it. */
const startYamuxOverWebSocket = async (backendPort: number, started: Array<BenchProcess>) => {
  const wsPort = await freePort()
  const gateway = await startSwitchyard("gateway", [
    "server",
    "--control",
    `127.0.0.1:${await freePort()}`,
    "--ws-listen",
    `127.0.0.1:${wsPort}`,
    "--token",
    benchToken,
    "--no-admin",
    "--set",
    "drain_timeout_ms=1000"
  ], { ready: /switchyard gateway running/ })
  started.push(gateway)
  const publicPort = await freePort()
  const client = await startExposingClient(`ws://127.0.0.1:${wsPort}/tunnel`, backendPort, publicPort)
  started.push(client)
  const url = (p: string) => ({ url: `http://127.0.0.1:${publicPort}${p}` })
  return { name: "yamux_ws", small: url("/"), download: url("/big"), parties: [gateway, client] }
}

export const run = async (): Promise<void> => {
  const temp = tempDir("websocket")
  const started: Array<BenchProcess> = []
  try {
    const backend = await startBackend(downloadBytes)
    started.push(backend.process)
    const direct = (p: string) => ({ url: `http://127.0.0.1:${backend.port}${p}` })
    await comparePaths(suite, [
      { name: "direct", small: direct("/"), download: direct("/big"), parties: [] },
      await startWsp(temp.dir, "wsp", backend.port, true, started),
      await startWsp(temp.dir, "wsp_unmasked", backend.port, false, started),
      await startYamuxOverWebSocket(backend.port, started)
    ])
  } finally {
    await stopAll(started)
    temp.remove()
  }
}
