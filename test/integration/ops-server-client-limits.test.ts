/**
 * `switchyard server` as a process under trickling uploads: more uploads from one address than a
 * backend's pool of tunnel streams holds (257 of 256, the case, plus a few) while another address
 * keeps being served; the client limits come from the environment, refusals show on `/metrics`.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as net from "node:net"
import { setTimeout as sleep } from "node:timers/promises"
import { Effect } from "effect"
import { listen } from "../../src/runtime/listen.ts"
import { cleanupsPerTest } from "../support/leaks.ts"
import { addressAfter, freePort, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"
import { getFrom } from "../support/clients.ts"

const Token = "limits-test-token-3d0e"
const cleanups = cleanupsPerTest()

/** Waits until `cond` holds, at most `ms`. */
const waitFor = async (what: string, ms: number, cond: () => boolean): Promise<void> => {
  const until = performance.now() + ms
  while (performance.now() < until) {
    if (cond()) return
    await sleep(20)
  }
  throw new Error(`not within ${ms} ms: ${what}`)
}

describe("switchyard server (process): slow public clients", () => {
  it.live("260 trickling uploads from one address; another address keeps being served", () =>
    Effect.promise(async () => {
      const proc = spawnSwitchyard(["server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0"], {
        SWITCHYARD_TOKEN: Token,
        // a request waits 500 ms for a stream; the body rate's grace period is long, so the per-address
        // share (a quarter of the backend's 256 streams: 64) alone keeps the route shared
        SWITCHYARD_CLIENT_LIMITS_UPSTREAM_SLOT_WAIT_MS: "500",
        SWITCHYARD_CLIENT_LIMITS_REQUEST_BODY_GRACE_PERIOD_MS: "60000"
      })
      cleanups.push(() => proc.stop("SIGKILL"))
      await proc.waitFor("expose a local service")
      const control = addressAfter(proc.output(), /control port/)
      const admin = addressAfter(proc.output(), /admin endpoint/)
      const port = await freePort()
      const tunnel = await listen({ port, http: {} }, { server: `127.0.0.1:${control.port}`, token: Token, timeoutMs: 20_000 })
      const server = tunnel.serve(http.createServer((req, res) => {
        if (req.url !== "/upload") return void res.end("pong")
        let n = 0
        req.on("data", (c: Buffer) => (n += c.length))
        req.on("end", () => res.end(`got ${n}`))
      }))
      cleanups.push(() => new Promise<void>((resolve) => tunnel.close(() => { server.close(); resolve() })))

      const uploads = Array.from({ length: 260 }, () => {
        const socket = net.connect({ port, host: "127.0.0.1", localAddress: "127.0.0.1" })
        let received = ""
        socket.on("data", (d: Buffer) => (received += d.toString("latin1")))
        socket.on("error", () => {})
        socket.write("POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 10000\r\n\r\nx")
        const timer = setInterval(() => {
          if (socket.writable) socket.write("x")
        }, 1_000)
        socket.once("close", () => clearInterval(timer))
        cleanups.push(async () => void socket.destroy())
        return { socket, text: () => received }
      })
      await waitFor("196 uploads answered 503", 15_000, () => uploads.filter((u) => u.text().startsWith("HTTP/1.1 503")).length === 196)
      for (let i = 0; i < 10; i++) {
        assert.deepStrictEqual(await getFrom(port, "/ping", "127.0.0.2", 5_000), { status: 200, body: "pong" })
        await sleep(100)
      }
      // the 64 holding this address's share still trickle on
      assert.strictEqual(uploads.filter((u) => u.text() === "" && !u.socket.destroyed).length, 64)
      const metrics = (await get(admin.port, "/metrics")).body
      assert.strictEqual(sample(metrics, "switchyard_client_limit_refusals_total", { front_door: "public", limit: "client_slots" }), 196)
      await proc.waitFor("client 127.0.0.1: already holds its share of upstream connections", 5_000)
    }), 30_000)
})
