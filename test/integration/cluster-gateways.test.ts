/**
 * A client of a cluster learns the other gateways from its gateway's Welcome: `switchyard client
 * --gateways 3` given one gateway keeps sessions to all three, so its route survives the loss of the one
 * it was given; `--gateways 1` given two keeps one session and moves to the other when the first fails.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import type * as net from "node:net"
import { Effect } from "effect"
import { addressAfter, freePort, get, spawnSwitchyard } from "../runtime/serverProcess.ts"
import { requireRedis } from "../support/redis.ts"
import { cleanups, type Gateway, ServedWithinMs, servedThrough, startGateway, Token, withRedis } from "./clusterHarness.ts"

const startLocalServer = async (): Promise<number> => {
  const server = http.createServer((req, res) => res.end(`ok ${req.url}`))
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  cleanups.push(() => new Promise<void>((resolve) => server.close(() => resolve())))
  server.on("connection", (s: net.Socket) => cleanups.push(async () => void s.destroy()))
  return (server.address() as net.AddressInfo).port
}

const startClient = async (gateways: ReadonlyArray<Gateway>, expose: number, port: number, keep: number) => {
  const proc = spawnSwitchyard(
    ["client", "--server", gateways.map((g) => `127.0.0.1:${g.control.port}`).join(","), "--gateways", String(keep), "--expose", `127.0.0.1:${expose}`, "--port", String(port)],
    { SWITCHYARD_TOKEN: Token, SWITCHYARD_ADMIN_ADDRESS: "127.0.0.1:0" }
  )
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
  return { proc, admin: addressAfter(proc.output(), /admin endpoint on/) }
}

/** Waits until `g` lists a local (not relayed) backend for the route on `port`, or fails after `ServedWithinMs`. */
const localBackendOn = async (g: Gateway, port: number, wanted = true): Promise<void> => {
  const deadline = Date.now() + ServedWithinMs
  let last = ""
  while (Date.now() < deadline) {
    const routes = JSON.parse((await get(g.admin.port, "/status")).body).routes as Array<{ route: string; backends: Array<string> }>
    const backends = routes.find((r) => r.route === `http:${port}::/`)?.backends ?? []
    last = JSON.stringify(backends)
    if (backends.some((b) => !b.startsWith("relay ")) === wanted) return
    await new Promise((r) => setTimeout(r, 50))
  }
  throw new Error(`${g.node}: local backend ${wanted ? "not there" : "still there"} after ${ServedWithinMs} ms: ${last}`)
}

describe.runIf(requireRedis())("cluster gateways told to clients", () => {
  it.live("--gateways 3 given g1 only: sessions to g1, g2 and g3 (learned from the Welcome), the route survives g1", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const [g1, g2, g3] = await Promise.all([0, 1, 2].map((i) => startGateway(redis, i)))
      // the gateways read each other's records within a heartbeat; a client connecting then learns them
      const deadline = Date.now() + ServedWithinMs
      while ((JSON.parse((await get(g1!.admin.port, "/status")).body).cluster.gateways ?? []).length < 2) {
        assert.isBelow(Date.now(), deadline, "g1 does not know the other gateways")
        await new Promise((r) => setTimeout(r, 50))
      }
      const expose = await startLocalServer()
      const port = await freePort()
      const client = await startClient([g1!], expose, port, 3)
      for (const g of [g1!, g2!, g3!]) await localBackendOn(g, port)
      await client.proc.waitFor(/gateway 127\.0\.0\.1:\d+ learned from a gateway of its cluster/)
      await g1!.stop("SIGKILL")
      for (const g of [g2!, g3!]) assert.strictEqual((await servedThrough(g.host, port, "/after")).body, "ok /after")
    }))

  it.live("--gateways 1 given g1 and g2: one session, moved to g2 when g1 fails", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const [g1, g2] = await Promise.all([0, 1].map((i) => startGateway(redis, i)))
      const expose = await startLocalServer()
      const port = await freePort()
      const client = await startClient([g1!, g2!], expose, port, 1)
      await localBackendOn(g1!, port)
      // g2 relays the route to g1: the client has no session to it
      assert.strictEqual((await servedThrough(g2!.host, port, "/relayed")).body, "ok /relayed")
      await localBackendOn(g2!, port, false)
      await g1!.stop("SIGKILL")
      await client.proc.waitFor(/switching to gateway 127\.0\.0\.1:\d+/, ServedWithinMs)
      await localBackendOn(g2!, port)
      assert.strictEqual((await servedThrough(g2!.host, port, "/moved")).body, "ok /moved")
    }))
})
