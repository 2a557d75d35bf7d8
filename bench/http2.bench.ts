/**
 * `npm run bench -- http2`: the reverse-HTTP/2 path (wrk → gateway public port → HTTP/2 tunnel →
 * `switchyard client --h2` → destination over HTTP/1.1) against wrk calling the same destination
 * directly, on loopback. Each party runs alone in its process: `switchyard server --reverse-h2`, the
 * `client --h2` (its default two tunnel connections) and the destination, a small Node server; wrk and
 * curl are the callers. Figures: see compare.ts. Then the same gateway in plain mode with a ptth-style Go
 * backend (`golang.org/x/net/http2`, `test/fixtures/ptth/gopeer`) in place of the client and the
 * destination (`go_direct` is wrk against the Go server over HTTP/1.1), left out with a note when Go and
 * `golang.org/x/net` cannot be had.
 */
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import { comparePaths, defaultSettings } from "./compare.ts"
import { type BenchProcess, benchToken, startBackend, startExposingClient, startProcess, startSwitchyard, stopAll, tempDir } from "./roles.ts"
import { answered, freePort, note } from "./support.ts"

const suite = "http2"
const downloadBytes = defaultSettings.downloadBytes

/** `switchyard server` with a reverse-HTTP/2 port (`config`: a config file, for plain mode). */
const startGateway = async (config: string | undefined): Promise<{ readonly gateway: BenchProcess; readonly tunnelPort: number }> => {
  const tunnelPort = await freePort()
  const args = config === undefined
    ? ["--control", `127.0.0.1:${await freePort()}`, "--reverse-h2", `127.0.0.1:${tunnelPort}`, "--token", benchToken]
    : ["--config", config, "--set", `reverse_h2.address=127.0.0.1:${tunnelPort}`, "--set", `control.address=127.0.0.1:${await freePort()}`]
  const gateway = await startSwitchyard("gateway", ["server", ...args, "--no-admin", "--set", "drain_timeout_ms=1000"], {
    ready: /switchyard gateway running/
  })
  return { gateway, tunnelPort }
}

export const run = async (): Promise<void> => {
  const started: Array<BenchProcess> = []
  try {
    const backend = await startBackend(downloadBytes)
    started.push(backend.process)
    const { gateway, tunnelPort } = await startGateway(undefined)
    started.push(gateway)
    const publicPort = await freePort()
    const client = await startExposingClient(`127.0.0.1:${tunnelPort}`, backend.port, publicPort, ["--h2"])
    started.push(client)
    const url = (port: number, p: string) => ({ url: `http://127.0.0.1:${port}${p}` })
    await comparePaths(suite, [
      { name: "direct", small: url(backend.port, "/"), download: url(backend.port, "/big"), parties: [] },
      { name: "h2", small: url(publicPort, "/"), download: url(publicPort, "/big"), parties: [gateway, client] }
    ], { ...defaultSettings, oneAtATimeRounds: 2 })
  } finally {
    await stopAll(started.splice(0))
  }
  await runGoBackend()
}

// ---------------------------------------------------------------------------------------------------
// The gateway with a ptth-style Go backend on a plain-mode port: its figures without a Node backend side.

/** Builds the Go backend; its path, or undefined (with a note) when it cannot be built. */
const goBackendBinary = (): string | undefined => {
  const script = path.resolve(import.meta.dirname, "../test/fixtures/ptth/gopeer/build.sh")
  const built = spawnSync("bash", [script], { encoding: "utf8", timeout: 600_000 })
  const out = built.stdout?.trim().split("\n").pop() ?? ""
  if (built.status === 0 && out !== "") return out
  note(suite, `the Go backend could not be built, its figures are left out: ${built.stderr?.slice(-300)}`)
  return undefined
}

const runGoBackend = async (): Promise<void> => {
  const binary = goBackendBinary()
  if (binary === undefined) return
  const temp = tempDir("http2")
  const started: Array<BenchProcess> = []
  try {
    const publicPort = await freePort()
    const config = path.join(temp.dir, "server.json")
    fs.writeFileSync(config, JSON.stringify({ reverse_h2: { enabled: true, plain: true, routes: [{ port: publicPort }] } }))
    const { gateway, tunnelPort } = await startGateway(config)
    started.push(gateway)
    const go = await startProcess("go-backend", binary, ["-dial", `127.0.0.1:${tunnelPort}`, "-listen", "127.0.0.1:0", "-n", "1"], { ready: /^READY/ })
    started.push(go)
    const listen = await go.value("LISTEN")
    const directPort = Number(listen.slice(listen.lastIndexOf(":") + 1))
    await answered(`http://127.0.0.1:${publicPort}/hello`)
    const url = (port: number, p: string) => ({ url: `http://127.0.0.1:${port}${p}` })
    const big = `/bytes?n=${downloadBytes}`
    await comparePaths(suite, [
      { name: "go_direct", small: url(directPort, "/hello"), download: url(directPort, big), parties: [] },
      { name: "go_h2", small: url(publicPort, "/hello"), download: url(publicPort, big), parties: [gateway] }
    ])
  } finally {
    await stopAll(started)
    temp.remove()
  }
}
