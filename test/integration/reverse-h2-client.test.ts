import { assert, describe, it } from "@effect/vitest"
import { type ChildProcess, spawn } from "node:child_process"
import * as http from "node:http"
import type * as net from "node:net"
import { Effect } from "effect"
import * as Redacted from "effect/Redacted"
import { H2ClientError } from "../../src/services/client/H2Client.ts"
import { ReverseH2 } from "../../src/services/front/ReverseH2.ts"
import { exposeOverReverseHttp2 } from "../../src/runtime/serveReverseHttp2.ts"
import { freePort, request, until, withGateway } from "./reverse-h2-harness.ts"

/** A local HTTP/1.1 service echoing what it saw, with a trailer on chunked answers. */
const localService = Effect.acquireRelease(
  Effect.promise(() =>
    new Promise<{ server: http.Server; port: number }>((resolve) => {
      const server = http.createServer((req, res) => {
        const parts: Array<Buffer> = []
        req.on("data", (c: Buffer) => parts.push(c))
        req.on("end", () => {
          res.writeHead(200, { "content-type": "text/plain", trailer: "x-sum" })
          res.write(`${req.method} ${req.url} host=${req.headers.host} xff=${req.headers["x-forwarded-for"]} body=${Buffer.concat(parts).toString()}`)
          res.addTrailers({ "x-sum": "9" })
          res.end()
        })
      })
      server.listen(0, "127.0.0.1", () => resolve({ server, port: (server.address() as net.AddressInfo).port }))
    })
  ),
  ({ server }) =>
    Effect.promise(() =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      })
    )
)

describe("switchyard client --h2", () => {
  it.effect("exposes a local HTTP service through the reverse-HTTP/2 port", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ tokens: [{ name: "svc", token: Redacted.make("tok"), ports: [port] }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const local = yield* localService
        yield* exposeOverReverseHttp2({
          gateways: [{ host: "127.0.0.1", port: gateway.address.port }],
          target: { host: "127.0.0.1", port: local.port },
          token: Redacted.make("tok"),
          routes: [{ _tag: "Http", port, pathPrefix: "/app" }],
          connections: 2
        })
        yield* until(() => gateway.connections() === 2, "two connections")
        const reply = yield* Effect.promise(() =>
          request(port, "/app/x?y=1", { method: "POST", headers: { host: "app.test", "content-type": "text/plain" }, body: "hello" })
        )
        assert.strictEqual(reply.status, 200)
        assert.strictEqual(reply.body, "POST /app/x?y=1 host=app.test xff=127.0.0.1 body=hello")
        assert.strictEqual(reply.trailers["x-sum"], "9")
      }))
    }))

  it.effect("a raw TCP route is refused with a typed error before dialing", () =>
    Effect.gen(function*() {
      const error = yield* exposeOverReverseHttp2({
        gateways: [{ host: "127.0.0.1", port: 9 }],
        target: { host: "127.0.0.1", port: 9 },
        token: Redacted.make("t"),
        routes: [{ _tag: "Tcp", port: 7000 }]
      }).pipe(Effect.scoped, Effect.flip)
      assert.instanceOf(error, H2ClientError)
      assert.strictEqual(error.reason, "Config")
    }))

  /** `switchyard client --h2` as a process, stopped with the scope; `output` is what it printed so far. */
  const spawnClient = (gatewayPort: number, exposePort: number, port: number) =>
    Effect.gen(function*() {
      const child = yield* Effect.acquireRelease(
        Effect.sync(() =>
          spawn(process.execPath, [
            "src/runtime/main.ts",
            "client",
            "--h2",
            "--server",
            `127.0.0.1:${gatewayPort}`,
            "--expose",
            `127.0.0.1:${exposePort}`,
            "--port",
            String(port),
            "--label",
            "cli"
          ], { env: { ...process.env, SWITCHYARD_TOKEN: "cli-token" }, stdio: ["ignore", "pipe", "pipe"] })
        ),
        (c: ChildProcess) =>
          Effect.promise(() =>
            new Promise<void>((resolve) => {
              if (c.exitCode !== null) return resolve()
              c.once("exit", () => resolve())
              c.kill("SIGTERM")
            })
          )
      )
      let output = ""
      child.stdout!.on("data", (d: Buffer) => void (output += d.toString()))
      child.stderr!.on("data", (d: Buffer) => void (output += d.toString()))
      return { child, output: () => output }
    })

  it.effect("the command line's --h2 flag serves the route until the process is stopped", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ tokens: [{ name: "svc", token: Redacted.make("cli-token"), ports: [port] }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const local = yield* localService
        const { child, output } = yield* spawnClient(gateway.address.port, local.port, port)
        yield* until(() => gateway.connections() === 2 || child.exitCode !== null, "the client's connections", 1500)
        assert.strictEqual(gateway.connections(), 2, output())
        const reply = yield* Effect.promise(() => request(port, "/z"))
        assert.match(reply.body, /^GET \/z host=127\.0\.0\.1:\d+ xff=127\.0\.0\.1 body=$/)
        assert.match(output(), /over reverse HTTP\/2/)
      }))
    }))

  it.effect("a local service that cannot be reached: the caller gets a 502 naming it, the client warns once", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      const closed = yield* Effect.promise(freePort)
      yield* withGateway({ tokens: [{ name: "svc", token: Redacted.make("cli-token"), ports: [port] }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const { child, output } = yield* spawnClient(gateway.address.port, closed, port)
        yield* until(() => gateway.connections() === 2 || child.exitCode !== null, "the client's connections", 1500)
        for (const p of ["/a", "/b", "/c"]) {
          const reply = yield* Effect.promise(() => request(port, p))
          assert.strictEqual(reply.status, 502)
          assert.match(reply.body, new RegExp(`upstream 127\\.0\\.0\\.1:${closed} unreachable \\(ECONNREFUSED\\)`))
        }
        yield* until(() => /WARN/.test(output()), "the warning", 1500)
        const warnings = output().split("\n").filter((l) => /WARN.*unreachable.*the local service --expose names/.test(l))
        assert.strictEqual(warnings.length, 1, output())
        assert.include(warnings[0]!, `127.0.0.1:${closed}`)
      }))
    }))
})
