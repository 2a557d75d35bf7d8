/**
 * `switchyard socket-proxy` with its admin endpoint: configured from the `admin` section of its own
 * config file, it counts allowed and denied requests in `/metrics` and answers `/readyz` and `/status`.
 */
import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs"
import * as http from "node:http"
import * as os from "node:os"
import * as path from "node:path"
import { type EngineUpstream, startEngineUpstream } from "../services/EngineUpstream.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { addressAfter, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"

let dir: string
let engine: EngineUpstream
let before: HandleCounts

beforeEach(async () => {
  before = activeHandles()
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-ops-sp-"))
  engine = await startEngineUpstream()
})
afterEach(async () => {
  await engine.close()
  fs.rmSync(dir, { recursive: true, force: true })
  await expectNoLeaks(before, 5_000)
})

const getVia = (socketPath: string, p: string) =>
  new Promise<number>((resolve, reject) => {
    const req = http.get({ socketPath, path: p, agent: false }, (res) => {
      res.resume()
      res.on("end", () => resolve(res.statusCode!))
    })
    req.on("error", reject)
  })

describe("switchyard socket-proxy operations", () => {
  it.live("serves /metrics, /readyz and /status from the admin section of its config file, logs as its log section says", () =>
    Effect.promise(async () => {
      const sock = path.join(dir, "proxy.sock")
      const config = path.join(dir, "proxy.yaml")
      fs.writeFileSync(config, [
        `upstream: unix:${engine.socketPath}`,
        `listen: [unix:${sock}]`,
        "rules: [GET /_ping]",
        "admin:",
        "  address: 127.0.0.1:0",
        "log:",
        "  format: json"
      ].join("\n") + "\n")
      const proc = spawnSwitchyard(["socket-proxy", "--config", config])
      try {
        await proc.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
        await proc.waitFor("switchyard socket-proxy:")
        const admin = addressAfter(proc.output(), /admin endpoint on/)
        // the log section of the file applies: log lines are JSON
        const adminLine = proc.output().split("\n").find((l) => l.includes("admin endpoint on"))!
        assert.strictEqual(JSON.parse(adminLine).level, "INFO")
        assert.strictEqual((await get(admin.port, "/readyz")).status, 200)
        const before = (await get(admin.port, "/metrics")).body
        assert.strictEqual(await getVia(sock, "/_ping"), 200)
        assert.strictEqual(await getVia(sock, "/containers/json"), 403)
        assert.strictEqual(await getVia(sock, "/containers/json"), 403)
        const after = (await get(admin.port, "/metrics")).body
        const moved = (decision: string) =>
          sample(after, "switchyard_socket_proxy_requests_total", { decision }) - sample(before, "switchyard_socket_proxy_requests_total", { decision })
        assert.strictEqual(moved("allowed"), 1)
        assert.strictEqual(moved("denied"), 2)
        const status = JSON.parse((await get(admin.port, "/status")).body)
        assert.strictEqual(status.command, "socket-proxy")
        assert.deepInclude(status.listeners, { name: "socket-proxy", address: `unix:${sock}` })
      } finally {
        assert.strictEqual(await proc.stop("SIGTERM"), 0)
      }
    }))

  it.live("SIGHUP under load: no request lost, new rules applied, an invalid file keeps them, reloads counted", () =>
    Effect.promise(async () => {
      const sock = path.join(dir, "load.sock")
      const config = path.join(dir, "load.yaml")
      const write = (rules: string) =>
        fs.writeFileSync(config, `upstream: unix:${engine.socketPath}\nlisten: [unix:${sock}]\nrules: ${rules}\nadmin: { address: 127.0.0.1:0 }\n`)
      write("[GET /_ping]")
      const proc = spawnSwitchyard(["socket-proxy", "--config", config])
      try {
        await proc.waitFor("switchyard socket-proxy:")
        await proc.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
        assert.strictEqual(await getVia(sock, "/small"), 403)
        let stop = false
        const statuses: Array<number> = []
        const load = (async () => {
          while (!stop) statuses.push(await getVia(sock, "/_ping").catch(() => 0))
        })()
        write("[GET /_ping, GET /small]")
        proc.child.kill("SIGHUP")
        await proc.waitFor("reloaded rule set")
        assert.strictEqual(await getVia(sock, "/small"), 200)
        fs.writeFileSync(config, "rules: [\"GET nothing\"]\n")
        proc.child.kill("SIGHUP")
        await proc.waitFor("reload refused")
        assert.strictEqual(await getVia(sock, "/small"), 200)
        stop = true
        await load
        assert.isAbove(statuses.length, 0)
        assert.deepStrictEqual([...new Set(statuses)], [200])
        const admin = addressAfter(proc.output(), /admin endpoint on/)
        const metrics = (await get(admin.port, "/metrics")).body
        assert.strictEqual(sample(metrics, "switchyard_config_reloads_total", { result: "applied" }), 1)
        assert.strictEqual(sample(metrics, "switchyard_config_reloads_total", { result: "rejected" }), 1)
        const status = JSON.parse((await get(admin.port, "/status")).body)
        assert.include(status.recentErrors[0].message, "reload refused")
      } finally {
        assert.strictEqual(await proc.stop("SIGTERM"), 0)
      }
    }))

  it.live("refuses a bad admin section before binding anything, naming the file and the field", () =>
    Effect.promise(async () => {
      const sock = path.join(dir, "never.sock")
      const config = path.join(dir, "bad.yaml")
      fs.writeFileSync(config, `upstream: unix:${engine.socketPath}\nlisten: [unix:${sock}]\nrules: [GET /_ping]\nadmin:\n  enabled: maybe\n`)
      const proc = spawnSwitchyard(["socket-proxy", "--config", config])
      let bound = false
      const watch = setInterval(() => (bound ||= fs.existsSync(sock)), 1)
      const code = await proc.exited
      clearInterval(watch)
      assert.strictEqual(code, 78)
      assert.isFalse(bound)
      assert.include(proc.output(), `${config}: admin.enabled`)
      assert.isFalse(fs.existsSync(sock))
    }))
})
