/**
 * `switchyard wsp-server` and `wsp-client` with their admin endpoints (wsp's config files, plus an
 * optional `admin` section, or `SWITCHYARD_...` variables): pool gauges, client readiness that follows
 * its connections, JSON logs, and no secret in any output; SIGHUP reloads of rules and secret key.
 */
import { assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { cleanupsPerTest } from "../support/leaks.ts"
import { addressAfter, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"

const Secret = "wsp-ops-secret-90f1"
let dir: string
const cleanups = cleanupsPerTest()

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-ops-wsp-"))
  const mine = dir
  // pushed first, so removed last, after the processes using it are gone
  cleanups.push(async () => fs.rmSync(mine, { recursive: true, force: true }))
})

const until = async (what: string, check: () => Promise<boolean>) => {
  for (let i = 0; i < 300; i++) {
    if (await check().catch(() => false)) return
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  throw new Error(`${what} did not happen`)
}

describe("wsp commands' operations", () => {
  it.live("serve /metrics, /readyz and /status; readiness follows the connections", () =>
    Effect.promise(async () => {
      // the server's admin endpoint from an admin section added to wsp's file, the client's from the environment
      fs.writeFileSync(
        path.join(dir, "wsp_server.cfg"),
        `---\nhost : 127.0.0.1\nport : 0\ntimeout : 3000\nsecretkey : ${Secret}\nadmin :\n  address : 127.0.0.1:0\n`
      )
      const server = spawnSwitchyard(["wsp-server", "--config", path.join(dir, "wsp_server.cfg")])
      cleanups.push(() => server.stop("SIGKILL"))
      await server.waitFor(/listening on http:\/\/127\.0\.0\.1:\d+/)
      await server.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
      const port = Number(/listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(server.output())![1])
      const serverAdmin = addressAfter(server.output(), /admin endpoint on/)
      assert.notInclude(server.output(), "unknown key")

      fs.writeFileSync(
        path.join(dir, "wsp_client.cfg"),
        `---\ntargets :\n - ws://127.0.0.1:${port}/register\npoolidlesize : 2\npoolmaxsize : 4\nsecretkey : ${Secret}\n`
      )
      const client = spawnSwitchyard(["wsp-client", "--config", path.join(dir, "wsp_client.cfg")], {
        SWITCHYARD_ADMIN_ADDRESS: "127.0.0.1:0",
        SWITCHYARD_LOG_FORMAT: "json"
      })
      cleanups.push(() => client.stop("SIGKILL"))
      await client.waitFor(/"admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
      const clientAdmin = addressAfter(client.output(), /admin endpoint on/)

      await until("client ready", async () => (await get(clientAdmin.port, "/readyz")).status === 200)
      await until("server pools idle connections", async () =>
        sample((await get(serverAdmin.port, "/metrics")).body, "switchyard_wsp_connections", { state: "idle" }) >= 2)
      // a registration with a wrong secret key is refused and counted
      const refused = await get(port, "/register", { "x-secret-key": "wrong" })
      assert.notStrictEqual(refused.status, 200)
      const serverMetrics = (await get(serverAdmin.port, "/metrics")).body
      assert.strictEqual(sample(serverMetrics, "switchyard_wsp_pools"), 1)
      assert.strictEqual(sample(serverMetrics, "switchyard_wsp_rejections_total", { credential: "secret_key" }), 1)
      const clientMetrics = (await get(clientAdmin.port, "/metrics")).body
      assert.strictEqual(sample(clientMetrics, "switchyard_gateway_up", { front_door: "wsp" }), 1)
      const status = JSON.parse((await get(serverAdmin.port, "/status")).body)
      assert.strictEqual(status.command, "wsp-server")
      assert.isAbove(status.sessions[0].count, 0)
      // the client's log lines are JSON
      const logLines = client.output().split("\n").filter((l) => l.startsWith("{"))
      assert.isAbove(logLines.length, 0)
      for (const line of logLines) assert.isString(JSON.parse(line).level)

      assert.strictEqual(await server.stop("SIGTERM"), 0)
      await until("client not ready", async () => (await get(clientAdmin.port, "/readyz")).status === 503)

      const everything = server.output() + client.output() + serverMetrics + clientMetrics + JSON.stringify(status)
      assert.notInclude(everything, Secret)
      assert.strictEqual(await client.stop("SIGTERM"), 0)
    }))

  it.live("SIGHUP: wsp-client swaps its destination rules, wsp-server its secret key, over the live connections; an invalid file keeps the old ones", () =>
    Effect.promise(async () => {
      const http = await import("node:http")
      const held: Array<() => void> = []
      const dest = http.createServer((req, res) => {
        if (req.url === "/slow") held.push(() => res.end("slow done"))
        else res.end(`dest ${req.url}`)
      })
      await new Promise<void>((resolve) => dest.listen(0, "127.0.0.1", () => resolve()))
      cleanups.push(() => new Promise((resolve) => { dest.closeAllConnections(); dest.close(resolve) }))
      const destPort = (dest.address() as { port: number }).port
      const NewSecret = "wsp-ops-secret-rotated-11c4"
      const serverFile = path.join(dir, "wsp_server.cfg")
      const writeServer = (secret: string, extra = "") =>
        fs.writeFileSync(serverFile, `---\nhost : 127.0.0.1\nport : 0\ntimeout : 3000\nsecretkey : ${secret}\nadmin :\n  address : 127.0.0.1:0\n${extra}`)
      writeServer(Secret)
      const server = spawnSwitchyard(["wsp-server", "--config", serverFile])
      cleanups.push(() => server.stop("SIGKILL"))
      await server.waitFor(/listening on http:\/\/127\.0\.0\.1:\d+/)
      await server.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
      const port = Number(/listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(server.output())![1])
      const serverAdmin = addressAfter(server.output(), /admin endpoint on/)

      const clientFile = path.join(dir, "wsp_client.cfg")
      const writeClient = (blacklisted: string) =>
        fs.writeFileSync(
          clientFile,
          `---\ntargets :\n - ws://127.0.0.1:${port}/register\npoolidlesize : 2\npoolmaxsize : 4\nsecretkey : ${Secret}\n` +
            `blacklist :\n - url : "${blacklisted}"\n`
        )
      writeClient("/denied")
      const client = spawnSwitchyard(["wsp-client", "--config", clientFile], { SWITCHYARD_ADMIN_ADDRESS: "127.0.0.1:0" })
      cleanups.push(() => client.stop("SIGKILL"))
      await client.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
      const clientAdmin = addressAfter(client.output(), /admin endpoint on/)
      await until("client ready", async () => (await get(clientAdmin.port, "/readyz")).status === 200)
      const through = (p: string) => get(port, "/request", { "X-Proxy-Destination": `http://127.0.0.1:${destPort}${p}` })

      assert.strictEqual((await through("/denied")).status, 403)
      assert.strictEqual((await through("/allowed")).body, "dest /allowed")
      // a request in flight across both reloads
      const slow = through("/slow")
      await until("the slow request at the destination", async () => held.length === 1)

      writeClient("/allowed")
      client.child.kill("SIGHUP")
      await client.waitFor("configuration reloaded")
      assert.strictEqual((await through("/denied")).body, "dest /denied")
      assert.strictEqual((await through("/allowed")).status, 403)
      fs.writeFileSync(clientFile, `---\ntargets :\n - ws://127.0.0.1:${port}/register\nsecretkey : ${Secret}\nblacklist :\n - url : "("\n`)
      client.child.kill("SIGHUP")
      await client.waitFor("reload refused")
      assert.match(client.output(), /reload refused.*blacklist/)
      assert.strictEqual((await through("/allowed")).status, 403)
      assert.strictEqual((await through("/denied")).body, "dest /denied")

      // the server: a new secret key for new registrations; the registered connections keep serving
      writeServer(NewSecret)
      server.child.kill("SIGHUP")
      await server.waitFor("configuration reloaded")
      const oldKey = await get(port, "/register", { "x-secret-key": Secret })
      assert.include(oldKey.body, "Invalid X-SECRET-KEY")
      const newKey = await get(port, "/register", { "x-secret-key": NewSecret })
      assert.notInclude(newKey.body, "Invalid X-SECRET-KEY")
      assert.strictEqual((await through("/denied")).body, "dest /denied")
      writeServer(NewSecret, "port : lots\n")
      server.child.kill("SIGHUP")
      await server.waitFor("reload refused")
      assert.include((await get(port, "/register", { "x-secret-key": Secret })).body, "Invalid X-SECRET-KEY")
      assert.notInclude((await get(port, "/register", { "x-secret-key": NewSecret })).body, "Invalid X-SECRET-KEY")

      held.shift()!()
      const finished = await slow
      assert.strictEqual(finished.status, 200)
      assert.strictEqual(finished.body, "slow done")

      const serverMetrics = (await get(serverAdmin.port, "/metrics")).body
      const clientMetrics = (await get(clientAdmin.port, "/metrics")).body
      for (const metrics of [serverMetrics, clientMetrics]) {
        assert.strictEqual(sample(metrics, "switchyard_config_reloads_total", { result: "applied" }), 1)
        assert.strictEqual(sample(metrics, "switchyard_config_reloads_total", { result: "rejected" }), 1)
      }
      // the client's connections were never replaced
      assert.strictEqual(sample(clientMetrics, "switchyard_reconnects_total", { front_door: "wsp" }), 0)
      assert.notInclude(server.output() + client.output() + serverMetrics + clientMetrics, Secret)
      assert.notInclude(server.output() + client.output(), NewSecret)
      assert.strictEqual(await client.stop("SIGTERM"), 0)
      assert.strictEqual(await server.stop("SIGTERM"), 0)
    }))
})
