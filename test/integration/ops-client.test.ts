/**
 * `switchyard client` as operators run it: its admin endpoint's `/readyz` follows the gateway session
 * (down when the gateway stops, up again after it reconnects) and its metrics count the reconnect.
 */
import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as http from "node:http"
import type * as net from "node:net"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { addressAfter, freePort, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"

const Token = "ops-client-token-3d9e"
let before: HandleCounts
const cleanups: Array<() => Promise<unknown>> = []

beforeEach(() => {
  before = activeHandles()
})
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined)
  await expectNoLeaks(before, 5_000)
})

const startGateway = async (controlPort: number) => {
  const proc = spawnSwitchyard(["server", "--control", `127.0.0.1:${controlPort}`, "--no-admin"], { SWITCHYARD_TOKEN: Token })
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor("expose a local service")
  return proc
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
      const backend = http.createServer((req, res) => res.end(`backend ${req.url}`))
      await new Promise<void>((resolve) => backend.listen(0, "127.0.0.1", () => resolve()))
      cleanups.push(() => new Promise((resolve) => backend.close(resolve)))
      const backendPort = (backend.address() as net.AddressInfo).port

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
})
