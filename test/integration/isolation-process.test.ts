/**
 * Isolation at process level: switchyard commands started as processes, each with a healthy tenant
 * beside a peer that tries to degrade it. The admin endpoint under a flood of idle and trickling
 * connections keeps answering `/healthz` and `/readyz`; a signed-in wsp client that never answers costs
 * callers at most the response timeout and loses its connections, while a healthy wsp client keeps
 * serving; `/register` without a `secretkey` is refused unless registration is opened by flag.
 */
import { assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { WebSocket } from "ws"
import { MaxAdminConnections } from "../../src/runtime/Admin.ts"
import { cleanupsPerTest } from "../support/leaks.ts"
import { addressAfter, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"
import { call } from "./wspSupport.ts"

const Secret = "wsp-isolation-secret-5e1a"
let dir: string
const cleanups = cleanupsPerTest()

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-isolation-"))
  const mine = dir
  cleanups.push(async () => fs.rmSync(mine, { recursive: true, force: true }))
})

/** Resolves with `promise`, or rejects once `ms` have passed without it. */
const within = <A>(ms: number, what: string, promise: Promise<A>): Promise<A> => {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms)
  })
  return Promise.race([promise, late]).finally(() => clearTimeout(timer))
}

const until = async (what: string, check: () => Promise<boolean>, timeoutMs = 15_000) => {
  const deadline = Date.now() + timeoutMs
  while (!(await check().catch(() => false))) {
    if (Date.now() > deadline) throw new Error(`${what} did not happen within ${timeoutMs} ms`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

/** Starts `wsp-server` on a free port with `extra` YAML lines and an admin endpoint; resolves with both ports. */
const startWspServer = async (extra: string, args: ReadonlyArray<string> = []) => {
  const file = path.join(dir, "wsp_server.cfg")
  fs.writeFileSync(file, `---\nhost : 127.0.0.1\nport : 0\ntimeout : 3000\n${extra}admin :\n  address : 127.0.0.1:0\n`)
  const server = spawnSwitchyard(["wsp-server", "--config", file, ...args])
  cleanups.push(() => server.stop("SIGKILL"))
  await server.waitFor(/listening on http:\/\/127\.0\.0\.1:\d+/)
  await server.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
  const port = Number(/listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(server.output())![1])
  return { server, port, admin: addressAfter(server.output(), /admin endpoint on/) }
}

/** A WebSocket registration attempt: "opened" (then closed) or ws's error message. */
const tryRegister = (port: number, headers: Record<string, string>) =>
  new Promise<string>((resolve) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/register`, { headers })
    ws.on("error", (e) => resolve(e.message))
    ws.on("open", () => {
      ws.terminate()
      resolve("opened")
    })
  })

describe("isolation between peers, as processes", () => {
  it.live("admin endpoint: /healthz and /readyz answer within 2 s while idle and trickling connections flood the port", () =>
    Effect.promise(async () => {
      const { server, admin } = await startWspServer(`secretkey : ${Secret}\n`)
      const sockets: Array<net.Socket> = []
      const trickles: Array<NodeJS.Timeout> = []
      cleanups.push(async () => {
        trickles.forEach(clearInterval)
        sockets.forEach((s) => s.destroy())
      })
      const open = () =>
        new Promise<net.Socket>((resolve) => {
          const s = net.connect(admin.port, "127.0.0.1", () => resolve(s))
          s.on("error", () => resolve(s))
          sockets.push(s)
        })
      const head = "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: "
      for (let i = 0; i < 10; i++) {
        const s = await open()
        let at = 0
        trickles.push(setInterval(() => s.destroyed || s.write(head[at++ % head.length]!), 200))
      }
      for (let i = 0; i < 2 * MaxAdminConnections; i++) await open()
      // the orchestrator's probes, with more idle connections arriving between them
      for (let round = 0; round < 5; round++) {
        const started = Date.now()
        assert.strictEqual((await within(2_000, "/healthz", get(admin.port, "/healthz"))).status, 200)
        assert.strictEqual((await within(2_000, "/readyz", get(admin.port, "/readyz"))).status, 200)
        assert.isBelow(Date.now() - started, 2_000)
        for (let i = 0; i < 20; i++) await open()
      }
      const metrics = (await within(2_000, "/metrics", get(admin.port, "/metrics"))).body
      assert.isAbove(sample(metrics, "switchyard_admin_connections_closed_total", { reason: "evicted" }), MaxAdminConnections)
      await until("the eviction warning", async () => server.output().includes("admin endpoint closed connections that held it"))
      assert.strictEqual(await server.stop("SIGTERM"), 0)
    }))

  it.live("wsp: a signed-in client that never answers costs callers at most responsetimeout; the healthy client keeps serving", () =>
    Effect.promise(async () => {
      const destination = http.createServer((_req, res) => res.end("hello"))
      await new Promise<void>((resolve) => destination.listen(0, "127.0.0.1", () => resolve()))
      cleanups.push(() => new Promise<void>((resolve) => (destination.closeAllConnections(), destination.close(() => resolve()))))
      const destinationUrl = `http://127.0.0.1:${(destination.address() as net.AddressInfo).port}/x`
      const responseTimeout = 500
      const { server, port, admin } = await startWspServer(`secretkey : ${Secret}\nresponsetimeout : ${responseTimeout}\n`)

      const clientFile = path.join(dir, "wsp_client.cfg")
      fs.writeFileSync(clientFile, `---\ntargets :\n - ws://127.0.0.1:${port}/register\npoolidlesize : 2\npoolmaxsize : 4\nsecretkey : ${Secret}\n`)
      const client = spawnSwitchyard(["wsp-client", "--config", clientFile], { SWITCHYARD_ADMIN_ENABLED: "false" })
      cleanups.push(() => client.stop("SIGKILL"))
      await until("the healthy client's connections pooled", async () =>
        sample((await get(admin.port, "/metrics")).body, "switchyard_wsp_connections", { state: "idle" }) >= 2)
      assert.strictEqual((await within(2_000, "healthy request", call(port, { destination: destinationUrl }))).status, 200)

      // the attacker: registers with the secret, takes requests, never answers
      const attackers: Array<WebSocket> = []
      cleanups.push(async () => attackers.forEach((ws) => ws.terminate()))
      for (let i = 0; i < 3; i++) {
        const ws = new WebSocket(`ws://127.0.0.1:${port}/register`, { headers: { "X-SECRET-KEY": Secret } })
        ws.on("error", () => undefined)
        await new Promise<void>((resolve, reject) => (ws.once("open", () => resolve()), ws.once("error", reject)))
        ws.send("attacker_3")
        attackers.push(ws)
      }
      await until("the attacker's connections pooled", async () =>
        sample((await get(admin.port, "/metrics")).body, "switchyard_wsp_pools") === 2)

      // the tenant's callers: none waits much beyond the response timeout, and once the attacker's
      // connections are dropped every request succeeds
      const statuses: Array<number> = []
      for (let i = 0; i < 12; i++) {
        const started = Date.now()
        const reply = await within(responseTimeout + 1_500, "a caller", call(port, { destination: destinationUrl }))
        statuses.push(reply.status)
        if (reply.status !== 200) {
          assert.strictEqual(reply.status, 526)
          assert.strictEqual(reply.body.toString(), `Unable to get http response : no response within ${responseTimeout} ms\n`)
          assert.isAtLeast(Date.now() - started, responseTimeout - 50)
        }
      }
      const failed = statuses.filter((s) => s !== 200).length
      assert.isAtMost(failed, attackers.length, `statuses: ${statuses.join(",")}`)
      assert.deepStrictEqual(statuses.slice(-6), [200, 200, 200, 200, 200, 200])
      for (let i = 0; i < 5; i++) {
        assert.strictEqual((await within(1_000, "healthy request after", call(port, { destination: destinationUrl }))).status, 200)
      }
      const metrics = (await get(admin.port, "/metrics")).body
      assert.strictEqual(sample(metrics, "switchyard_wsp_request_failures_total", { reason: "ResponseTimeout" }), failed)
      if (failed > 0) await until("the failure warning", async () => server.output().includes("(ResponseTimeout)"))
      // every connection that timed out was the attacker's, and it was closed
      assert.isAtLeast(failed, 1)
      await until("the attacker's timed-out connections closed", async () =>
        attackers.filter((ws) => ws.readyState === WebSocket.OPEN).length === attackers.length - failed)
      assert.notInclude(server.output() + client.output(), Secret)
    }))

  it.live("wsp: without a secretkey /register is refused (403) and start-up says why; --insecure-open-registration opens it, loudly", () =>
    Effect.promise(async () => {
      const closed = await startWspServer("")
      assert.match(closed.server.output(), /no secretkey is configured, so \/register refuses every wsp client/)
      assert.strictEqual(await tryRegister(closed.port, {}), "Unexpected server response: 403")
      const plain = await get(closed.port, "/register")
      assert.strictEqual(plain.status, 403)
      assert.strictEqual(plain.body, "Registration closed: the server has no secretkey configured\n")
      await until("the refusal counted", async () =>
        sample((await get(closed.admin.port, "/metrics")).body, "switchyard_wsp_rejections_total", { credential: "registration_closed" }) === 2)
      assert.match(closed.server.output(), /wsp \/register refused: no secretkey is configured/)
      assert.strictEqual(await closed.server.stop("SIGTERM"), 0)

      const open = await startWspServer("", ["--insecure-open-registration"])
      assert.match(open.server.output(), /INSECURE: no secretkey and open registration/)
      assert.strictEqual(await tryRegister(open.port, {}), "opened")
      assert.strictEqual(await open.server.stop("SIGTERM"), 0)
    }))
})
