/**
 * `switchyard client` as operators run it: its admin endpoint's `/readyz` follows the gateway session
 * (down when the gateway stops, up again after it reconnects) and its metrics count the reconnect;
 * SIGHUP swaps its listener over the live session.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs"
import * as http from "node:http"
import type * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { cleanupsPerTest } from "../support/leaks.ts"
import { addressAfter, freePort, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"
import { makeCertificate } from "../services/ListenersFixtures.ts"

const Token = "ops-client-token-3d9e"
const cleanups = cleanupsPerTest()

const startGateway = async (controlPort: number) => {
  const proc = spawnSwitchyard(["server", "--control", `127.0.0.1:${controlPort}`, "--no-admin"], { SWITCHYARD_TOKEN: Token })
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor("expose a local service")
  return proc
}

/** A fresh directory, removed after the test. */
const tempDir = (prefix: string): string => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix))
  cleanups.push(async () => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** The local service clients expose: answers `backend <path>`; closed after the test. Its port. */
const startBackend = async (): Promise<number> => {
  const backend = http.createServer((req, res) => res.end(`backend ${req.url}`))
  await new Promise<void>((resolve) => backend.listen(0, "127.0.0.1", () => resolve()))
  cleanups.push(() => new Promise((resolve) => backend.close(resolve)))
  return (backend.address() as net.AddressInfo).port
}

/** Polls `/readyz` until it answers `status`, bounded in attempts. */
const readyzBecomes = async (port: number, status: number) => {
  for (let i = 0; i < 300; i++) {
    const r = await get(port, "/readyz").catch(() => undefined)
    if (r?.status === status) return true
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  return false
}

describe("switchyard client", () => {
  it.live("/readyz follows the gateway session; reconnects are counted; the token never shows", () =>
    Effect.promise(async () => {
      const backendPort = await startBackend()

      const controlPort = await freePort()
      const publicPort = await freePort()
      let gateway = await startGateway(controlPort)
      const client = spawnSwitchyard(
        ["client", "--server", `127.0.0.1:${controlPort}`, "--expose", `127.0.0.1:${backendPort}`, "--port", String(publicPort)],
        { SWITCHYARD_TOKEN: Token, SWITCHYARD_ADMIN_ADDRESS: "127.0.0.1:0" }
      )
      cleanups.push(() => client.stop("SIGKILL"))
      await client.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
      const admin = addressAfter(client.output(), /admin endpoint on/)
      assert.isTrue(await readyzBecomes(admin.port, 200))
      assert.strictEqual((await get(publicPort, "/p")).body, "backend /p")
      let metrics = (await get(admin.port, "/metrics")).body
      assert.strictEqual(sample(metrics, "switchyard_gateway_up", { front_door: "control" }), 1)
      assert.strictEqual(sample(metrics, "switchyard_reconnects_total", { front_door: "control" }), 0)

      assert.strictEqual(await gateway.stop("SIGTERM"), 0)
      assert.isTrue(await readyzBecomes(admin.port, 503))
      gateway = await startGateway(controlPort)
      assert.isTrue(await readyzBecomes(admin.port, 200))
      metrics = (await get(admin.port, "/metrics")).body
      assert.strictEqual(sample(metrics, "switchyard_reconnects_total", { front_door: "control" }), 1)
      const status = JSON.parse((await get(admin.port, "/status")).body)
      assert.strictEqual(status.command, "client")
      assert.strictEqual(status.sessions[0].count, 1)

      assert.notInclude(client.output() + gateway.output() + metrics, Token)
      assert.strictEqual(await client.stop("SIGTERM"), 0)
      assert.strictEqual(await gateway.stop("SIGTERM"), 0)
    }))

  it.live("TLS: a gateway serving its control and reverse-HTTP/2 ports over TLS says how to reach them; clients with --server tls:// and --ca tunnel through both", () =>
    Effect.promise(async () => {
      const dir = tempDir("switchyard-ops-tls-")
      const cert = makeCertificate("localhost")
      fs.writeFileSync(path.join(dir, "cert.pem"), cert.cert)
      fs.writeFileSync(path.join(dir, "key.pem"), cert.key)
      const backendPort = await startBackend()
      const [controlPort, h2Port, viaControl, viaH2] = [await freePort(), await freePort(), await freePort(), await freePort()]
      const config = path.join(dir, "server.yaml")
      fs.writeFileSync(config, [
        "control:",
        `  address: 127.0.0.1:${controlPort}`,
        `  tls_cert_file: ${path.join(dir, "cert.pem")}`,
        `  tls_key_file: ${path.join(dir, "key.pem")}`,
        "reverse_h2:",
        "  enabled: true",
        `  address: 127.0.0.1:${h2Port}`,
        `  tls_cert_file: ${path.join(dir, "cert.pem")}`,
        `  tls_key_file: ${path.join(dir, "key.pem")}`,
        "admin: { enabled: false }"
      ].join("\n") + "\n")
      const gateway = spawnSwitchyard(["server", "--config", config], { SWITCHYARD_TOKEN: Token })
      cleanups.push(() => gateway.stop("SIGKILL"))
      await gateway.waitFor("expose a local service")
      assert.include(gateway.output(), `control port     tls://127.0.0.1:${controlPort}`)
      assert.include(gateway.output(), `reverse HTTP/2   tls://127.0.0.1:${h2Port}`)
      assert.include(gateway.output(), `--server tls://127.0.0.1:${controlPort} --ca <its CA or certificate file>`)
      const common = ["--ca", path.join(dir, "cert.pem"), "--expose", `127.0.0.1:${backendPort}`]
      const overControl = spawnSwitchyard(["client", "--server", `tls://localhost:${controlPort}`, ...common, "--port", String(viaControl)], { SWITCHYARD_TOKEN: Token })
      cleanups.push(() => overControl.stop("SIGKILL"))
      const overH2 = spawnSwitchyard(["client", "--h2", "--server", `tls://localhost:${h2Port}`, ...common, "--port", String(viaH2)], { SWITCHYARD_TOKEN: Token })
      cleanups.push(() => overH2.stop("SIGKILL"))
      const answer = async (port: number) => {
        for (let i = 0; i < 200; i++) {
          const r = await get(port, "/over-tls").catch(() => undefined)
          if (r?.status === 200) return r.body
          await new Promise((resolve) => setTimeout(resolve, 50))
        }
        return undefined
      }
      assert.strictEqual(await answer(viaControl), "backend /over-tls")
      assert.strictEqual(await answer(viaH2), "backend /over-tls")
      // without --ca the self-signed certificate is not trusted: the client never gets a session
      const untrusted = spawnSwitchyard(["client", "--server", `tls://localhost:${controlPort}`, "--expose", `127.0.0.1:${backendPort}`, "--port", String(await freePort())], {
        SWITCHYARD_TOKEN: Token,
        SWITCHYARD_ADMIN_ADDRESS: "127.0.0.1:0"
      })
      cleanups.push(() => untrusted.stop("SIGKILL"))
      // said at the default level, with what to do, and in the client's /status
      await untrusted.waitFor(/WARN.*cannot reach gateway tls:\/\/localhost:\d+: .*self-signed certificate.*pass its CA with --ca/)
      const untrustedStatus = JSON.parse((await get(addressAfter(untrusted.output(), /admin endpoint on/).port, "/status")).body)
      assert.strictEqual(untrustedStatus.gateways[0].state, "retrying")
      assert.match(untrustedStatus.gateways[0].lastError, /self-signed certificate.*--ca/)
      assert.notInclude(gateway.output() + overControl.output() + overH2.output(), Token)
      for (const p of [untrusted, overControl, overH2]) assert.strictEqual(await p.stop("SIGTERM"), 0)
      assert.strictEqual(await gateway.stop("SIGTERM"), 0)
    }))

  it.live("reads a config file (token from a file), with variables and flags over it", () =>
    Effect.promise(async () => {
      const dir = tempDir("switchyard-ops-client-")
      const backendPort = await startBackend()
      const controlPort = await freePort()
      const filePort = await freePort()
      const flagPort = await freePort()
      const gateway = await startGateway(controlPort)
      fs.writeFileSync(path.join(dir, "token"), Token + "\n")
      const config = path.join(dir, "client.yaml")
      fs.writeFileSync(config, [
        `server: 127.0.0.1:${controlPort}`,
        `token_file: ${path.join(dir, "token")}`,
        "expose: 127.0.0.1:1",
        `port: ${filePort}`,
        "label: from-file",
        "admin: { address: 127.0.0.1:0 }",
        "log: { format: json }"
      ].join("\n") + "\n")

      const missing = spawnSwitchyard(["client", "--check-config", "--config", config], { SWITCHYARD_EXPOSE: "nowhere" })
      assert.strictEqual(await missing.exited, 78)
      assert.include(missing.output(), "expose")
      assert.include(missing.output(), "nowhere")

      const client = spawnSwitchyard(["client", "--config", config, "--port", String(flagPort)], { SWITCHYARD_EXPOSE: `127.0.0.1:${backendPort}` })
      cleanups.push(() => client.stop("SIGKILL"))
      await client.waitFor(/"admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
      const admin = addressAfter(client.output(), /admin endpoint on/)
      assert.isTrue(await readyzBecomes(admin.port, 200))
      // the flag's port wins over the file's; the variable's expose over the file's
      let answer = await get(flagPort, "/cfg").catch(() => undefined)
      for (let i = 0; i < 100 && answer?.status !== 200; i++) {
        await new Promise((resolve) => setTimeout(resolve, 50))
        answer = await get(flagPort, "/cfg").catch(() => undefined)
      }
      assert.strictEqual(answer?.body, "backend /cfg")
      assert.isUndefined(await get(filePort, "/").catch(() => undefined))
      assert.notInclude(client.output() + gateway.output(), Token)
      assert.strictEqual(await client.stop("SIGTERM"), 0)
    }))

  it.live("SIGHUP: a changed route and expose apply over the live session, the request in flight finishes; an invalid file keeps the old listener", () =>
    Effect.promise(async () => {
      const dir = tempDir("switchyard-ops-client-")
      const held: Array<() => void> = []
      const startBackend = async (name: string) => {
        const server = http.createServer((req, res) => {
          if (req.url === "/slow") held.push(() => res.end(`${name} slow done`))
          else res.end(`${name} ${req.url}`)
        })
        await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()))
        cleanups.push(() => new Promise((resolve) => { server.closeAllConnections(); server.close(resolve) }))
        return (server.address() as net.AddressInfo).port
      }
      const [backendA, backendB] = [await startBackend("a"), await startBackend("b")]
      const controlPort = await freePort()
      const [oldPort, newPort] = [await freePort(), await freePort()]
      const gateway = await startGateway(controlPort)
      fs.writeFileSync(path.join(dir, "token"), Token + "\n")
      const config = path.join(dir, "client.yaml")
      const write = (lines: ReadonlyArray<string>) =>
        fs.writeFileSync(config, [`server: 127.0.0.1:${controlPort}`, `token_file: ${path.join(dir, "token")}`, "admin: { address: 127.0.0.1:0 }", ...lines].join("\n") + "\n")
      write([`expose: 127.0.0.1:${backendA}`, `port: ${oldPort}`])
      const client = spawnSwitchyard(["client", "--config", config])
      cleanups.push(() => client.stop("SIGKILL"))
      await client.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
      const admin = addressAfter(client.output(), /admin endpoint on/)
      assert.isTrue(await readyzBecomes(admin.port, 200))
      const answered = async (port: number, url: string) => {
        for (let i = 0; i < 200; i++) {
          const r = await get(port, url).catch(() => undefined)
          if (r?.status === 200) return r.body
          await new Promise((resolve) => setTimeout(resolve, 25))
        }
        return "no answer"
      }
      assert.strictEqual(await answered(oldPort, "/x"), "a /x")
      const slow = get(oldPort, "/slow")
      for (let i = 0; i < 200 && held.length === 0; i++) await new Promise((resolve) => setTimeout(resolve, 10))
      assert.strictEqual(held.length, 1)

      write([`expose: 127.0.0.1:${backendB}`, `port: ${newPort}`, "label: renamed"])
      client.child.kill("SIGHUP")
      await client.waitFor("configuration reloaded")
      assert.strictEqual(await answered(newPort, "/y"), "b /y")
      await client.waitFor(/label changed; the live sessions keep the old value/)
      held.shift()!()
      const finished = await slow
      assert.strictEqual(finished.status, 200)
      assert.strictEqual(finished.body, "a slow done")

      write([`expose: 127.0.0.1:${backendB}`, "port: lots"])
      client.child.kill("SIGHUP")
      await client.waitFor("reload refused")
      assert.match(client.output(), /reload refused.*port/)
      assert.strictEqual(await answered(newPort, "/z"), "b /z")

      const metrics = (await get(admin.port, "/metrics")).body
      assert.strictEqual(sample(metrics, "switchyard_config_reloads_total", { result: "applied" }), 1)
      assert.strictEqual(sample(metrics, "switchyard_config_reloads_total", { result: "rejected" }), 1)
      // one session the whole time: nothing was reconnected
      assert.strictEqual(sample(metrics, "switchyard_gateway_up", { front_door: "control" }), 1)
      assert.strictEqual(sample(metrics, "switchyard_reconnects_total", { front_door: "control" }), 0)
      assert.notInclude(client.output() + gateway.output(), Token)
      assert.strictEqual(await client.stop("SIGTERM"), 0)
    }))
})
