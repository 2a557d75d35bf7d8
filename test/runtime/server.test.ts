/**
 * `runGateway` in-process: the control port and the reverse-HTTP/2 port serve through one set of public
 * listeners, the admin endpoint reports both, and closing the scope leaves no handle open.
 */
import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import * as fs from "node:fs"
import * as http from "node:http"
import { runGateway } from "../../src/runtime/server/runGateway.ts"
import type { ServerFile } from "../../src/runtime/ConfigLoader.ts"
import { listen } from "../../src/runtime/listen.ts"
import { Metrics } from "../../src/services/Metrics.ts"
import { serveReverseHttp2 } from "../../src/runtime/serveReverseHttp2.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { freePort, get, sample } from "./serverProcess.ts"

const Token = "in-process-token-81aa"
let before: HandleCounts
beforeEach(() => {
  before = activeHandles()
})
afterEach(() => expectNoLeaks(before, 5_000))

describe("runGateway", () => {
  it.live("serves control-port and reverse-HTTP/2 backends, reports them, and closes everything with its scope", () =>
    Effect.gen(function*() {
      const handle = yield* runGateway({
        control: { address: "127.0.0.1:0", token: Redacted.make(Token) },
        reverse_h2: { enabled: true, address: "127.0.0.1:0" },
        admin: { address: "127.0.0.1:0" },
        drain_timeout_ms: 1_000,
        grace_period_ms: 0
      })
      assert.isUndefined(handle.generatedTokenFile)
      const controlPort = yield* Effect.promise(freePort)
      const h2Port = yield* Effect.promise(freePort)

      const tunnel = yield* Effect.acquireRelease(
        Effect.promise(() => listen({ port: controlPort, http: {} }, { server: `127.0.0.1:${handle.control.port}`, token: Token })),
        (t) => Effect.promise(() => new Promise<void>((resolve) => t.close(() => resolve())))
      )
      const app = tunnel.serve(http.createServer((req, res) => res.end(`control ${req.headers["x-request-id"] !== undefined}`)))
      yield* Effect.addFinalizer(() => Effect.sync(() => app.close()))

      const h2 = yield* Effect.acquireRelease(
        Effect.promise(() =>
          serveReverseHttp2((_req, res) => res.end("h2"), {
            gateway: handle.reverseH2!,
            token: Token,
            routes: [{ _tag: "Http", port: h2Port }]
          })
        ),
        (h) => Effect.promise(() => h.close())
      )
      for (let i = 0; i < 200 && h2.connected() === 0; i++) yield* Effect.sleep("10 millis")

      assert.strictEqual((yield* Effect.promise(() => get(controlPort, "/"))).body, "control true")
      let answer = yield* Effect.promise(() => get(h2Port, "/").catch(() => undefined))
      for (let i = 0; i < 200 && answer?.status !== 200; i++) {
        yield* Effect.sleep("10 millis")
        answer = yield* Effect.promise(() => get(h2Port, "/").catch(() => undefined))
      }
      assert.strictEqual(answer?.body, "h2")

      const metrics = (yield* Effect.promise(() => get(handle.admin!.port, "/metrics"))).body
      assert.strictEqual(sample(metrics, "switchyard_sessions", { front_door: "control" }), 1)
      assert.isAtLeast(sample(metrics, "switchyard_sessions", { front_door: "reverse_h2" }), 1)
      assert.strictEqual(sample(metrics, "switchyard_routes"), 2)
      assert.strictEqual(sample(metrics, "switchyard_requests_total", { front_door: "control", status_class: "2xx" }), 1)
      assert.isAtLeast(sample(metrics, "switchyard_requests_total", { front_door: "reverse_h2", status_class: "2xx" }), 1)
      assert.notInclude(metrics, Token)
      // a reverse-HTTP/2 backend with a wrong token is refused and counted
      const refused = yield* Effect.acquireRelease(
        Effect.promise(() =>
          serveReverseHttp2((_req, res) => res.end("never"), {
            gateway: handle.reverseH2!,
            token: "not-the-token",
            routes: [{ _tag: "Http", port: h2Port }],
            backoff: { initial: "1 second" }
          })
        ),
        (h) => Effect.promise(() => h.close())
      )
      let rejected = 0
      for (let i = 0; i < 300 && rejected === 0; i++) {
        yield* Effect.sleep("10 millis")
        rejected = sample((yield* Effect.promise(() => get(handle.admin!.port, "/metrics"))).body, "switchyard_handshake_rejections_total", { front_door: "reverse_h2" })
      }
      assert.isAtLeast(rejected, 1)
      assert.strictEqual(refused.connected(), 0)
      const status = JSON.parse((yield* Effect.promise(() => get(handle.admin!.port, "/status"))).body)
      assert.include(JSON.stringify(status.recentErrors), "reverse-HTTP/2 connection failed")
      assert.notInclude(JSON.stringify(status), "not-the-token")
      assert.deepStrictEqual(status.listeners.map((l: { name: string }) => l.name), ["admin", "control", "reverse_h2"])
    }).pipe(Effect.scoped))

  it.live("its admin endpoint's /metrics shows the gateway's families in the Prometheus text format", () =>
    Effect.gen(function*() {
      const handle = yield* runGateway({ control: { address: "127.0.0.1:0", token: Redacted.make(Token) }, admin: { address: "127.0.0.1:0" } })
      const port = yield* Effect.promise(freePort)
      const tunnel = yield* Effect.acquireRelease(
        Effect.promise(() => listen({ port, http: { pathPrefix: "/app" } }, { server: `127.0.0.1:${handle.control.port}`, token: Token })),
        (t) => Effect.promise(() => new Promise<void>((resolve) => t.close(() => resolve())))
      )
      const app = tunnel.serve(http.createServer((_req, res) => res.end("ok")))
      yield* Effect.addFinalizer(() => Effect.sync(() => app.close()))
      assert.strictEqual((yield* Effect.promise(() => get(port, "/app"))).body, "ok")
      assert.strictEqual((yield* Effect.promise(() => get(port, "/other"))).status, 404)

      const scraped = yield* Effect.promise(() => get(handle.admin!.port, "/metrics"))
      assert.strictEqual(scraped.status, 200)
      assert.strictEqual(scraped.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
      const types = new Map(scraped.body.split("\n").filter((l) => l.startsWith("# TYPE ")).map((l) => l.split(" ").slice(2) as [string, string]))
      const expected: Record<string, string> = {
        switchyard_sessions: "gauge",
        switchyard_streams_open: "gauge",
        switchyard_routes: "gauge",
        switchyard_route_backends: "gauge",
        switchyard_queued_requests: "gauge",
        switchyard_open_ports: "gauge",
        switchyard_requests_total: "counter",
        switchyard_request_duration_seconds: "histogram",
        switchyard_received_bytes_total: "counter",
        switchyard_sent_bytes_total: "counter",
        switchyard_queue_wait_seconds: "histogram",
        switchyard_client_limit_refusals_total: "counter",
        switchyard_admin_connections_closed_total: "counter",
        process_resident_memory_bytes: "gauge",
        process_cpu_seconds_total: "counter",
        process_start_time_seconds: "gauge",
        nodejs_heap_used_bytes: "gauge"
      }
      for (const [name, type] of Object.entries(expected)) assert.strictEqual(types.get(name), type, name)
      for (const name of types.keys()) assert.include(scraped.body, `# HELP ${name} `)
      const body = scraped.body
      assert.strictEqual(sample(body, "switchyard_sessions", { front_door: "control" }), 1)
      assert.strictEqual(sample(body, "switchyard_route_backends", { route: `http:${port}::/app` }), 1)
      assert.strictEqual(sample(body, "switchyard_requests_total", { front_door: "control", status_class: "2xx" }), 1)
      assert.strictEqual(sample(body, "switchyard_requests_total", { front_door: "public", route: "(no route)", status_class: "4xx" }), 1)
      assert.strictEqual(sample(body, "switchyard_request_duration_seconds_count", { front_door: "control" }), 1)
      assert.strictEqual(sample(body, "switchyard_request_duration_seconds_bucket", { front_door: "control", le: "+Inf" }), 1)
      assert.strictEqual(sample(body, "switchyard_queue_wait_seconds_count", { front_door: "public" }), 2)
      assert.isAbove(sample(body, "switchyard_received_bytes_total"), 0)
      assert.strictEqual(sample(body, "switchyard_admin_connections_closed_total", { reason: "evicted" }), 0)
      assert.match(body, /\nprocess_resident_memory_bytes [0-9.e+]+\n/)
    }).pipe(Effect.scoped))

  it.live("SIGHUP swaps the tokens of both tunnel ports; a reload without any token is refused", () =>
    Effect.gen(function*() {
      let next: ServerFile = { control: { token: Redacted.make("second-token") } }
      const handle = yield* runGateway(
        { control: { address: "127.0.0.1:0", token: Redacted.make(Token) }, reverse_h2: { enabled: true, address: "127.0.0.1:0" }, admin: { enabled: false } },
        { reload: Effect.sync(() => next) }
      )
      const reloads = (result: string) => sample(handle.metrics.registry.render(), "switchyard_config_reloads_total", { result })
      process.emit("SIGHUP", "SIGHUP")
      for (let i = 0; i < 500 && reloads("applied") === 0; i++) yield* Effect.yieldNow
      assert.strictEqual(reloads("applied"), 1)

      const h2Port = yield* Effect.promise(freePort)
      const h2 = yield* Effect.acquireRelease(
        Effect.promise(() => serveReverseHttp2((_req, res) => res.end("h2"), { gateway: handle.reverseH2!, token: "second-token", routes: [{ _tag: "Http", port: h2Port }] })),
        (h) => Effect.promise(() => h.close())
      )
      for (let i = 0; i < 300 && h2.connected() === 0; i++) yield* Effect.sleep("10 millis")
      assert.isAtLeast(h2.connected(), 1)
      const controlPort = yield* Effect.promise(freePort)
      const tunnel = yield* Effect.acquireRelease(
        Effect.promise(() => listen({ port: controlPort, http: {} }, { server: `127.0.0.1:${handle.control.port}`, token: "second-token" })),
        (t) => Effect.promise(() => new Promise<void>((resolve) => t.close(() => resolve())))
      )
      assert.isTrue(tunnel.listening)

      next = { control: {} }
      process.emit("SIGHUP", "SIGHUP")
      for (let i = 0; i < 500 && reloads("rejected") === 0; i++) yield* Effect.yieldNow
      assert.strictEqual(reloads("rejected"), 1)
    }).pipe(Effect.scoped))

  it.live("with request_metrics off, public ports run the raw engine and dispatch metrics still move", () =>
    Effect.gen(function*() {
      const handle = yield* runGateway({ control: { address: "127.0.0.1:0", token: Redacted.make(Token) }, admin: { enabled: false }, request_metrics: false })
      const port = yield* Effect.promise(freePort)
      const tunnel = yield* Effect.acquireRelease(
        Effect.promise(() => listen({ port, http: { pathPrefix: "/app" } }, { server: `127.0.0.1:${handle.control.port}`, token: Token })),
        (t) => Effect.promise(() => new Promise<void>((resolve) => t.close(() => resolve())))
      )
      const app = tunnel.serve(http.createServer((_req, res) => res.end("raw")))
      yield* Effect.addFinalizer(() => Effect.sync(() => app.close()))
      assert.strictEqual((yield* Effect.promise(() => get(port, "/app"))).body, "raw")
      assert.strictEqual((yield* Effect.promise(() => get(port, "/other"))).status, 404)
      const metrics = handle.metrics.registry.render()
      assert.strictEqual(sample(metrics, "switchyard_queue_wait_seconds_count", { front_door: "public" }), 2)
      assert.strictEqual(sample(metrics, "switchyard_requests_total", { route: "(no route)", status_class: "4xx" }), 1)
      assert.strictEqual(sample(metrics, "switchyard_request_duration_seconds_count"), 0)
      const refused = yield* Effect.flip(runGateway({ control: { token: Redacted.make(Token) }, request_metrics: false, log: { access_log: true } }))
      assert.include(refused.message, "log.access_log")
    }).pipe(Effect.scoped))

  it.live("registers its metrics on a Metrics service the embedding app provides", () =>
    Effect.gen(function*() {
      const shared = yield* Metrics
      const handle = yield* runGateway({ control: { address: "127.0.0.1:0", token: Redacted.make(Token) }, admin: { enabled: false } })
      assert.strictEqual(handle.metrics, shared)
      assert.include(shared.registry.render(), "switchyard_sessions{front_door=\"control\"} 0")
    }).pipe(Effect.scoped, Effect.provide(Metrics.layer)))

  it.live("generates a private token file when none is configured and removes it with the scope", () =>
    Effect.gen(function*() {
      const file = yield* Effect.scoped(Effect.gen(function*() {
        const handle = yield* runGateway({ control: { address: "127.0.0.1:0" }, admin: { enabled: false } })
        assert.isDefined(handle.generatedTokenFile)
        assert.isTrue(fs.existsSync(handle.generatedTokenFile!))
        assert.strictEqual(fs.statSync(handle.generatedTokenFile!).mode & 0o777, 0o600)
        assert.isUndefined(handle.admin)
        return handle.generatedTokenFile!
      }))
      assert.isFalse(fs.existsSync(file))
    }))

  it.effect("refuses bad addresses and port ranges before binding", () =>
    Effect.gen(function*() {
      const bad = yield* Effect.flip(runGateway({ control: { address: "here" } }))
      assert.include(bad.message, "control.address")
      const range = yield* Effect.flip(runGateway({ control: { tokens: [{ name: "a", token: Redacted.make("t"), ports: ["9-1"] }] } }))
      assert.include(range.message, "control.tokens.0.ports")
      const openPlain = yield* Effect.flip(runGateway({ control: { token: Redacted.make("t") }, reverse_h2: { enabled: true, plain: true, address: "0.0.0.0:0" } }))
      assert.include(openPlain.message, "reverse_h2.plain")
    }).pipe(Effect.scoped))
})
