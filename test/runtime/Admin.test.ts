import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Cause, Deferred, Effect, Exit, Scope } from "effect"
import * as net from "node:net"
import { DefaultAdminAddress, DefaultAdminAddresses, MaxAdminConnections, makeRecentErrors, serveAdmin, serveOperations } from "../../src/runtime/Admin.ts"
import { fetchStatus, renderStatus, table } from "../../src/runtime/commands/status.ts"
import { onHangup, teardown } from "../../src/runtime/Lifecycle.ts"
import { makeMetrics } from "../../src/services/Metrics.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { get, sample } from "./serverProcess.ts"

/** Resolves with `promise`, or rejects once `ms` have passed without it. */
const within = <A>(ms: number, what: string, promise: Promise<A>): Promise<A> => {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms)
  })
  return Promise.race([promise, late]).finally(() => clearTimeout(timer))
}

/** Opens a TCP connection to the port and resolves once it is connected. */
const connectIdle = (port: number): Promise<net.Socket> =>
  new Promise((resolve, reject) => {
    const s = net.connect(port, "127.0.0.1", () => resolve(s))
    s.on("error", () => undefined)
    s.once("error", reject)
  })

/** Polls `check` every 20 ms until it holds, failing after `ms`. */
const until = async (ms: number, what: string, check: () => Promise<boolean>): Promise<void> => {
  const deadline = Date.now() + ms
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what} within ${ms} ms`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

let before: HandleCounts
beforeEach(() => {
  before = activeHandles()
})
afterEach(() => expectNoLeaks(before))

describe("admin endpoint", () => {
  it.live("serves /healthz, /readyz (flipping), /metrics, /status; refuses other paths and methods", () =>
    Effect.gen(function*() {
      let ready = false
      const metrics = makeMetrics()
      const errors = makeRecentErrors(2)
      for (const m of ["one", "two", "three"]) errors.add(m)
      const address = yield* serveAdmin({
        address: { host: "127.0.0.1", port: 0 },
        ready: () => ready,
        metrics: metrics.registry,
        status: () => ({ command: "server", version: "0", startedAt: "t", ready, listeners: [], sessions: [], routes: [], recentErrors: errors.list() })
      })
      const call = (p: string) => Effect.promise(() => get(address.port, p))
      assert.strictEqual((yield* call("/healthz")).status, 200)
      assert.strictEqual((yield* call("/readyz")).status, 503)
      ready = true
      assert.strictEqual((yield* call("/readyz")).status, 200)
      metrics.protocolErrors.labels("control", "BadFrame").inc()
      const scraped = yield* call("/metrics")
      assert.strictEqual(scraped.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
      assert.include(scraped.body, "switchyard_protocol_errors_total{front_door=\"control\",kind=\"BadFrame\"} 1")
      for (const name of ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds", "nodejs_heap_used_bytes"]) {
        assert.match(scraped.body, new RegExp(`\\n${name} [0-9.e+]+\\n`))
      }
      const status = yield* fetchStatus(address)
      assert.deepStrictEqual(status.recentErrors.map((e) => e.message), ["two", "three"])
      assert.strictEqual((yield* call("/nope")).status, 404)
      const posted = yield* Effect.promise(() =>
        new Promise<number>((resolve, reject) => {
          const s = net.connect(address.port, "127.0.0.1", () => s.write("POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
          let text = ""
          s.on("data", (d) => (text += d))
          s.on("end", () => resolve(Number(text.split(" ")[1])))
          s.on("error", reject)
        })
      )
      assert.strictEqual(posted, 405)
    }).pipe(Effect.scoped))

  it("default admin ports stay clear of Prometheus, Pushgateway and Alertmanager (9090-9094)", () => {
    assert.deepStrictEqual(Object.values(DefaultAdminAddresses).map((a) => a.port), [7090, 7091, 7092, 7093, 7094])
    assert.deepStrictEqual(DefaultAdminAddress, DefaultAdminAddresses.server)
  })

  it.live("serveOperations: a taken default port is a warning, a taken configured port an error, off means off", () =>
    Effect.gen(function*() {
      const blocker = net.createServer()
      yield* Effect.acquireRelease(
        Effect.promise(() => new Promise<void>((resolve) => blocker.listen(DefaultAdminAddresses["wsp-client"].port, "127.0.0.1", () => resolve()))).pipe(Effect.ignore),
        () => Effect.promise(() => new Promise<void>((resolve) => blocker.close(() => resolve())))
      )
      const byDefault = yield* serveOperations({ command: "wsp-client", ready: () => true })
      assert.isUndefined(byDefault.admin)
      const port = (blocker.address() as net.AddressInfo | null)?.port ?? DefaultAdminAddresses["wsp-client"].port
      const explicit = yield* Effect.exit(serveOperations({ command: "wsp-client", ops: { admin: { address: `127.0.0.1:${port}` } }, ready: () => true }))
      assert.isTrue(Exit.isFailure(explicit))
      // the error says which flag moves it
      assert.include(String(Exit.isFailure(explicit) ? explicit.cause.reasons.map((r) => r._tag === "Fail" ? (r.error as Error).message : "") : ""), "--admin host:port")
      // --admin wins over the file's address
      const flagged = yield* serveOperations({
        command: "wsp-client",
        ops: { admin: { address: `127.0.0.1:${port}` } },
        flags: [{ path: ["admin", "address"], value: "127.0.0.1:0", flag: "--admin" }],
        ready: () => true
      })
      assert.notStrictEqual(flagged.admin?.port, port)
      const off = yield* serveOperations({ command: "client", ops: { admin: { enabled: false } }, ready: () => true })
      assert.isUndefined(off.admin)
      const on = yield* serveOperations({
        command: "client",
        ops: { admin: { address: "127.0.0.1:0" } },
        ready: () => false,
        sessions: () => [{ frontDoor: "control", count: 0 }],
        register: (m) => m.registry.sampledGauge({ name: "t_sample", help: "t", collect: () => [[[], 42]] })
      })
      assert.strictEqual((yield* Effect.promise(() => get(on.admin!.port, "/readyz"))).status, 503)
      assert.include((yield* Effect.promise(() => get(on.admin!.port, "/metrics"))).body, "t_sample 42")
      on.recordError("lost the gateway")
      const status = yield* fetchStatus(on.admin!)
      assert.strictEqual(status.command, "client")
      assert.strictEqual(status.recentErrors[0]!.message, "lost the gateway")
      assert.include(renderStatus(status), "NOT READY")
      assert.notInclude(renderStatus(status), "GATEWAY")
      const withGateways = renderStatus({
        ...status,
        gateways: [{ gateway: "127.0.0.1:9999", state: "rejected", since: "2026-01-01T00:00:00.000Z", attempts: 3, lastError: "BadToken: check --token" }]
      })
      assert.match(withGateways, /GATEWAY\s+STATE\s+SINCE\s+ATTEMPTS\s+LAST ERROR/)
      assert.match(withGateways, /127\.0\.0\.1:9999\s+rejected\s+2026-01-01T00:00:00\.000Z\s+3\s+BadToken: check --token/)
    }).pipe(Effect.scoped))

  it.live("idle and trickling connections beyond the budget do not keep /healthz and /readyz from answering", () =>
    Effect.gen(function*() {
      const metrics = makeMetrics()
      const address = yield* serveAdmin({ address: { host: "127.0.0.1", port: 0 }, ready: () => true, metrics: metrics.registry })
      const sockets: Array<net.Socket> = []
      const trickles: Array<NodeJS.Timeout> = []
      yield* Effect.addFinalizer(() =>
        Effect.sync(() => {
          trickles.forEach(clearInterval)
          sockets.forEach((s) => s.destroy())
        })
      )
      const evicted = async () => sample((await get(address.port, "/metrics")).body, "switchyard_admin_connections_closed_total", { reason: "evicted" })
      yield* Effect.promise(async () => {
        // connections that send a partial head a byte at a time, then idle ones beyond the budget
        const head = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
        for (let i = 0; i < 8; i++) {
          const s = await connectIdle(address.port)
          sockets.push(s)
          let at = 0
          trickles.push(setInterval(() => s.destroyed || s.write(head[at++ % head.length]!), 100))
        }
        for (let i = 0; i < MaxAdminConnections + 16; i++) sockets.push(await connectIdle(address.port))
      })
      // the server has seen them all: the oldest waiting ones made room for the newest
      yield* Effect.promise(() => until(2_000, "connections beyond the budget evicted", async () => (await evicted()) >= 8))
      for (let round = 0; round < 3; round++) {
        const health = yield* Effect.promise(() => within(2_000, "/healthz", get(address.port, "/healthz")))
        assert.strictEqual(health.status, 200)
        const ready = yield* Effect.promise(() => within(2_000, "/readyz", get(address.port, "/readyz")))
        assert.strictEqual(ready.status, 200)
        // more idle connections keep arriving between the checks
        for (let i = 0; i < 16; i++) sockets.push(yield* Effect.promise(() => connectIdle(address.port)))
      }
      // what the server closed reaches the clients: at most the budget stays open
      const open = () => sockets.filter((s) => !s.destroyed && !s.readableEnded).length
      yield* Effect.promise(() => until(2_000, "at most the budget open", async () => open() <= MaxAdminConnections))
    }).pipe(Effect.scoped))

  it.live("a connection that sends no complete head within the head timeout is closed and counted", () =>
    Effect.gen(function*() {
      const metrics = makeMetrics()
      const address = yield* serveAdmin({
        address: { host: "127.0.0.1", port: 0 },
        ready: () => true,
        metrics: metrics.registry,
        connections: { headTimeoutMs: 200 }
      })
      const closedAfter = yield* Effect.promise(async () => {
        const silent = await connectIdle(address.port)
        const partial = await connectIdle(address.port)
        partial.write("GET /healthz HTTP/1.1\r\n")
        const started = Date.now()
        const closed = (s: net.Socket) => new Promise<void>((resolve) => (s.destroyed ? resolve() : s.once("close", () => resolve())))
        await within(2_000, "idle connections closed", Promise.all([closed(silent), closed(partial)]))
        return Date.now() - started
      })
      assert.isAtLeast(closedAfter, 150)
      const text = (yield* Effect.promise(() => get(address.port, "/metrics"))).body
      assert.strictEqual(sample(text, "switchyard_admin_connections_closed_total", { reason: "head_timeout" }), 2)
      assert.strictEqual((yield* Effect.promise(() => get(address.port, "/healthz"))).status, 200)
    }).pipe(Effect.scoped))

  it.effect("fetchStatus fails with a typed error when nothing listens", () =>
    Effect.gen(function*() {
      const error = yield* Effect.flip(fetchStatus({ host: "127.0.0.1", port: 1 }))
      assert.strictEqual(error.reason, "Unreachable")
    }))
})

describe("switchyard status rendering", () => {
  it("lays out tables", () => {
    assert.strictEqual(table(["A", "LONG"], [["xx", "y"]]), "A   LONG\n--  ----\nxx  y")
    const text = renderStatus({
      command: "server",
      version: "1.0.0",
      startedAt: "2026-01-01T00:00:00.000Z",
      ready: true,
      listeners: [{ name: "control", address: "127.0.0.1:9999" }],
      sessions: [{ frontDoor: "control", count: 2 }],
      routes: [{ route: "http:8000:/a", backends: ["s1 svc#1", "s2 svc#1"], inFlight: 3 }],
      recentErrors: []
    })
    assert.include(text, "switchyard server 1.0.0, up since 2026-01-01T00:00:00.000Z, ready")
    assert.include(text, "http:8000:/a  s1 svc#1, s2 svc#1  3")
    assert.include(text, "no recent errors")
  })
})

describe("Lifecycle", () => {
  it("an interruption (a drained SIGTERM) exits 0; failures keep their codes", () => {
    const codes: Array<number> = []
    teardown(Exit.failCause(Cause.interrupt()), (c) => codes.push(c))
    teardown(Exit.succeed(1), (c) => codes.push(c))
    teardown(Exit.fail(new Error("x")), (c) => codes.push(c))
    assert.deepStrictEqual(codes, [0, 0, 1])
  })

  it.live("runs the reload on SIGHUP, coalescing signals that arrive during one, until the scope closes", () =>
    Effect.gen(function*() {
      let started = 0
      let finished = 0
      const gate = yield* Deferred.make<void>()
      const scope = yield* Scope.make()
      const reload = Effect.sync(() => started++).pipe(Effect.andThen(Deferred.await(gate)), Effect.andThen(Effect.sync(() => finished++)))
      yield* onHangup(reload).pipe(Scope.provide(scope))
      const listenersBefore = process.listenerCount("SIGHUP")
      process.emit("SIGHUP", "SIGHUP")
      yield* Effect.yieldNow
      process.emit("SIGHUP", "SIGHUP")
      process.emit("SIGHUP", "SIGHUP")
      assert.strictEqual(started, 1)
      yield* Deferred.succeed(gate, undefined)
      for (let i = 0; i < 1_000 && finished < 2; i++) yield* Effect.yieldNow
      assert.strictEqual(started, 2)
      assert.strictEqual(finished, 2)
      yield* Scope.close(scope, Exit.void)
      assert.strictEqual(process.listenerCount("SIGHUP"), listenersBefore - 1)
    }))
})
