/**
 * The gateway's stop as a load balancer sees it: on SIGTERM `/readyz` answers 503 at once while the public
 * ports keep serving (new connections and kept-alive ones) for `shutdown_delay_ms`; then the ports stop
 * accepting, idle kept-alive connections are closed and the process exits 0. The delay's timing is
 * `stopSequence`'s, tested on the TestClock.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as net from "node:net"
import { Deferred, Effect, Fiber } from "effect"
import { TestClock } from "effect/testing"
import { listen } from "../../src/runtime/listen.ts"
import { durationMs } from "../../src/runtime/commands/server.ts"
import { stopSequence } from "../../src/runtime/server/runGateway.ts"
import { cleanupsPerTest } from "../support/leaks.ts"
import { addressAfter, freePort, get, spawnSwitchyard } from "../runtime/serverProcess.ts"

const Token = "shutdown-delay-token-3a9e"
const cleanups = cleanupsPerTest()

describe("stopSequence", () => {
  it.effect("turns readiness off first, waits out the delay on the clock, then lets the drain begin", () =>
    Effect.gen(function*() {
      let ready = true
      const fiber = yield* Effect.forkChild(stopSequence({ shutdownDelayMs: 5_000, drainTimeoutMs: 30_000, notReady: () => void (ready = false) }))
      yield* Effect.yieldNow
      assert.isFalse(ready)
      yield* TestClock.adjust(4_999)
      assert.isUndefined(fiber.pollUnsafe())
      yield* TestClock.adjust(1)
      yield* Fiber.join(fiber)
    }))

  it.effect("ends the delay early when told to (SIGINT, a second SIGTERM), and skips it when told before or when it is 0", () =>
    Effect.gen(function*() {
      const skip = yield* Deferred.make<void>()
      const fiber = yield* Effect.forkChild(stopSequence({ shutdownDelayMs: 5_000, drainTimeoutMs: 1, skipDelay: skip, notReady: () => {} }))
      yield* TestClock.adjust(1_000)
      assert.isUndefined(fiber.pollUnsafe())
      yield* Deferred.succeed(skip, undefined)
      yield* Fiber.join(fiber)
      // already told before the stop began (SIGINT): no delay at all, on a clock that never moves
      yield* stopSequence({ shutdownDelayMs: 5_000, drainTimeoutMs: 1, skipDelay: skip, notReady: () => {} })
      let calls = 0
      yield* stopSequence({ shutdownDelayMs: 0, drainTimeoutMs: 1, notReady: () => void calls++ })
      assert.strictEqual(calls, 1)
    }))

  it("reads --shutdown-delay as 5s, 500ms or milliseconds", () => {
    assert.strictEqual(durationMs("5s"), 5_000)
    assert.strictEqual(durationMs("1.5s"), 1_500)
    assert.strictEqual(durationMs("500ms"), 500)
    assert.strictEqual(durationMs("250"), 250)
    assert.isUndefined(durationMs("5m"))
    assert.isUndefined(durationMs("-1"))
    assert.isUndefined(durationMs(""))
  })
})

/** One GET on a kept-alive connection of `agent`. */
const getWith = (agent: http.Agent, port: number, path: string): Promise<{ status: number; body: string }> =>
  new Promise((resolve, reject) => {
    const req = http.get({ host: "127.0.0.1", port, path, agent }, (res) => {
      let body = ""
      res.setEncoding("utf8")
      res.on("data", (c) => (body += c))
      res.on("end", () => resolve({ status: res.statusCode!, body }))
      res.on("error", reject)
    })
    req.on("error", reject)
  })

/** Resolves when a fresh TCP connection to `port` is refused or closed without an answer. */
const refusesConnections = (port: number): Promise<string> =>
  new Promise((resolve) => {
    const socket = net.connect({ host: "127.0.0.1", port })
    socket.on("error", (e) => resolve((e as NodeJS.ErrnoException).code ?? e.message))
    socket.on("connect", () => {
      socket.write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      let data = ""
      socket.on("data", (d) => (data += d.toString()))
      socket.on("close", () => resolve(data === "" ? "closed" : `answered: ${data.split("\r\n")[0]}`))
    })
  })

describe("switchyard server on SIGTERM", () => {
  it.live("answers /readyz 503 at once, keeps serving for the shutdown delay, then closes its ports and exits 0", () =>
    Effect.promise(async () => {
      const proc = spawnSwitchyard(
        ["server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--shutdown-delay", "5s"],
        { SWITCHYARD_TOKEN: Token }
      )
      cleanups.push(() => proc.stop("SIGKILL"))
      await proc.waitFor("expose a local service")
      const control = addressAfter(proc.output(), /control port/)
      const admin = addressAfter(proc.output(), /admin endpoint/)
      const port = await freePort()
      const tunnel = await listen({ port, http: { pathPrefix: "/" } }, { server: `127.0.0.1:${control.port}`, token: Token, timeoutMs: 20_000 })
      const backend = tunnel.serve(http.createServer((req, res) => res.end(`served ${req.url}`)))
      cleanups.push(() => new Promise<void>((resolve) => tunnel.close(() => { backend.close(); resolve() })))
      const agent = new http.Agent({ keepAlive: true, maxSockets: 1 })
      cleanups.push(async () => agent.destroy())
      assert.strictEqual((await get(admin.port, "/readyz")).status, 200)
      assert.deepStrictEqual(await getWith(agent, port, "/before"), { status: 200, body: "served /before" })
      const keptAlive = Object.values(agent.freeSockets).flat()[0]
      assert.isDefined(keptAlive)
      const keptAliveClosed = new Promise<void>((resolve) => keptAlive!.once("close", () => resolve()))

      proc.child.kill("SIGTERM")
      await proc.waitFor("stopping: /readyz answers 503")
      assert.strictEqual((await get(admin.port, "/readyz")).status, 503)
      // still serving, on a new connection and on the kept-alive one, before the ports close
      const fresh = await get(port, "/during")
      const reused = await getWith(agent, port, "/during-kept-alive")
      assert.notInclude(proc.output(), "shutting down: public ports stop accepting", "the requests must be answered within the delay")
      assert.deepStrictEqual({ status: fresh.status, body: fresh.body }, { status: 200, body: "served /during" })
      assert.deepStrictEqual(reused, { status: 200, body: "served /during-kept-alive" })

      await proc.waitFor("shutting down: public ports stop accepting")
      await keptAliveClosed
      assert.notStrictEqual(await refusesConnections(port), "answered: HTTP/1.1 200 OK")
      assert.strictEqual(await proc.exited, 0)
    }))
})
