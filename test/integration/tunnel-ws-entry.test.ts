/**
 * The entry points that take a WebSocket gateway URL: `listen()` for plain Node code, and the
 * `switchyard client --server ws://…` process, each serving a real HTTP server through a gateway's
 * `/tunnel` path on loopback.
 */
import { assert, describe, it } from "@effect/vitest"
import { type ChildProcess, spawn } from "node:child_process"
import * as http from "node:http"
import * as path from "node:path"
import { Effect } from "effect"
import { listen } from "../../src/runtime/listen.ts"
import { noLeaks } from "../support/leaks.ts"
import { freePort, request, serve } from "../services/ListenersFixtures.ts"
import { token } from "./tunnelHarness.ts"
import { wsGateway } from "./tunnelWsHarness.ts"

const main = path.resolve(import.meta.dirname, "../../src/runtime/main.ts")

describe("WebSocket gateway URLs at the entry points", () => {
  it.live("listen({ server: 'ws://…/tunnel' }) serves an http.Server and closes cleanly", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const port = yield* Effect.promise(freePort)
      const tunnel = yield* Effect.promise(() => listen({ port, http: { pathPrefix: "/node" } }, { server: gw.url, token, webSocket: { proxy: false } }))
      const server = tunnel.serve(http.createServer((req, res) => res.end(`node ${req.url}`)))
      yield* Effect.addFinalizer(() => Effect.sync(() => server.closeAllConnections()))
      assert.strictEqual((yield* Effect.promise(() => request(port, "/node/x"))).body, "node /node/x")
      assert.strictEqual(gw.control.sessions(), 1)
      yield* Effect.promise(() => new Promise<void>((resolve) => tunnel.close(() => resolve())))
      while (gw.control.sessions() > 0) yield* Effect.sleep("10 millis")
    })))

  it.live("switchyard client --server ws://…/tunnel exposes a local service", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const local = yield* serve(http.createServer((req, res) => res.end(`local ${req.url} ${req.headers["x-forwarded-for"]}`)))
      const publicPort = yield* Effect.promise(freePort)
      const child = yield* Effect.acquireRelease(
        Effect.sync((): ChildProcess =>
          spawn(process.execPath, [
            main, "client", "--server", gw.url, "--token", token, "--expose", `127.0.0.1:${local}`, "--port", String(publicPort), "--path", "/cli"
          ], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, HTTP_PROXY: "", http_proxy: "" } })
        ),
        (child) =>
          Effect.promise(() =>
            new Promise<void>((resolve) => {
              if (child.exitCode !== null || child.signalCode !== null) return resolve()
              child.once("exit", () => resolve())
              child.kill("SIGTERM")
            })
          )
      )
      let output = ""
      child.stdout!.on("data", (c: Buffer) => (output += c.toString()))
      child.stderr!.on("data", (c: Buffer) => (output += c.toString()))
      let reply = { status: 0, body: "" }
      for (let i = 0; i < 300 && reply.status !== 200; i++) {
        reply = yield* Effect.promise(() => request(publicPort, "/cli/x").catch(() => ({ status: 0, body: "" })))
        if (reply.status !== 200) yield* Effect.sleep("50 millis")
      }
      assert.strictEqual(reply.body, "local /cli/x 127.0.0.1", output)
      assert.match(output, /switchyard client: .* on ws:\/\/127\.0\.0\.1:\d+\/tunnel/)
    })), 60_000)
})
