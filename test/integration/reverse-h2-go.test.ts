/**
 * The reverse-HTTP/2 port in plain mode against a ptth-style backend written in Go with
 * golang.org/x/net/http2 (`Server.ServeConn` on the connection it dialled): `test/fixtures/ptth/gopeer`.
 * No switchyard code on the backend side, so these are the frames, settings and flow control of Go's
 * HTTP/2 server. In CI a peer that cannot be built fails the tests; elsewhere they are skipped.
 */
import { assert, describe, it } from "@effect/vitest"
import { type ChildProcess, spawn, spawnSync } from "node:child_process"
import { createHash, randomBytes } from "node:crypto"
import * as http from "node:http"
import * as path from "node:path"
import * as readline from "node:readline"
import { Effect, type Scope } from "effect"
import { ReverseH2 } from "../../src/services/front/ReverseH2.ts"
import { inCI } from "../support/peers.ts"
import { freePort, request, until, withGateway } from "./reverse-h2-harness.ts"

const buildScript = path.resolve(import.meta.dirname, "../fixtures/ptth/gopeer/build.sh")

const probe = (() => {
  const run = spawnSync("bash", [buildScript], { encoding: "utf8", timeout: 600_000 })
  const out = run.stdout?.trim().split("\n").pop() ?? ""
  return run.status === 0 && out !== "" ? { binary: out, reason: undefined } : { binary: undefined, reason: run.stderr?.slice(-2000) }
})()

if (probe.binary === undefined && inCI) throw new Error(`Go HTTP/2 backend could not be built: ${probe.reason}`)
const describePeer = probe.binary === undefined ? describe.skip : describe

interface GoBackend {
  readonly child: ChildProcess
  /** Lines the peer printed after `READY` (`CLOSED` once per connection the gateway ended). */
  readonly lines: Array<string>
}

/** Starts the Go backend dialling `tunnelPort` with `connections` connections; killed with the scope. */
const goBackend = (tunnelPort: number, connections = 1) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<GoBackend>((resolve, reject) => {
        const child = spawn(probe.binary!, ["-dial", `127.0.0.1:${tunnelPort}`, "-n", String(connections)], { stdio: ["ignore", "pipe", "pipe"] })
        let stderr = ""
        const lines: Array<string> = []
        child.stderr!.on("data", (c: Buffer) => void (stderr += c.toString()))
        readline.createInterface({ input: child.stdout! }).on("line", (line) => {
          if (line.startsWith("READY")) resolve({ child, lines })
          else lines.push(line)
        })
        child.once("exit", (code) => reject(new Error(`h2peer exited with ${code}: ${stderr}`)))
      })
    ),
    ({ child }) => kill(child)
  )

const kill = (child: ChildProcess) =>
  Effect.promise(() =>
    new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) return resolve()
      child.once("exit", () => resolve())
      child.kill("SIGKILL")
    })
  )

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex")

/** The Go peer's `/bytes` body: byte i is i % 251. */
const pattern = (n: number) => {
  const out = Buffer.allocUnsafe(n)
  for (let i = 0; i < n; i++) out[i] = i % 251
  return out
}

/** A public request whose body is streamed in `pieces` and whose response is read `slowly` when asked. */
const exchange = (
  port: number,
  pathname: string,
  options: { method?: string; body?: Buffer; pieces?: number; slowly?: boolean; headers?: http.OutgoingHttpHeaders; onData?: () => void } = {}
) =>
  new Promise<{ status: number; body: Buffer; trailers: NodeJS.Dict<string>; complete: boolean }>((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, path: pathname, method: options.method ?? "GET", agent: false, headers: options.headers })
    req.on("error", reject)
    req.on("response", (res) => {
      const chunks: Array<Buffer> = []
      res.on("data", (c: Buffer) => {
        chunks.push(c)
        options.onData?.()
        if (options.slowly === true) {
          // a reader much slower than the backend: the gateway must hold back, not buffer it all
          res.pause()
          setTimeout(() => res.resume(), 2)
        }
      })
      res.on("error", () => {}) // a cut response: reported through `complete`
      res.on("close", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks), trailers: res.trailers, complete: res.complete }))
    })
    const body = options.body
    if (body === undefined) return void req.end()
    const pieces = options.pieces ?? 1
    const size = Math.ceil(body.length / pieces)
    let at = 0
    const next = () => {
      while (at < body.length) {
        const piece = body.subarray(at, at + size)
        at += piece.length
        if (!req.write(piece)) return void req.once("drain", next)
      }
      req.end()
    }
    next()
  })

/**
 * A gateway whose plain-mode port serves one public route, with a Go backend of `connections`
 * connections registered on it; `body` gets the public port, the gateway and the backend.
 */
const withGoBackend = <A>(
  connections: number,
  body: (port: number, gateway: ReverseH2["Service"], backend: GoBackend) => Effect.Effect<A, never, ReverseH2 | Scope.Scope>
) =>
  Effect.gen(function*() {
    const port = yield* Effect.promise(freePort)
    return yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
      const gateway = yield* ReverseH2
      const backend = yield* goBackend(gateway.address.port, connections)
      yield* until(() => gateway.connections() === connections, "the Go backend to register")
      return yield* body(port, gateway, backend)
    }))
  })

describePeer("reverse HTTP/2 against a Go x/net/http2 backend (plain mode)", () => {
  it.effect("a Go backend that dials in serves public HTTP/1.1 requests, with the forwarding headers", () =>
    withGoBackend(1, (port) =>
      Effect.gen(function*() {
        const hello = yield* Effect.promise(() => request(port, "/hello"))
        assert.strictEqual(hello.status, 200)
        assert.strictEqual(hello.body, "hello from go")
        assert.strictEqual(hello.headers["content-type"], "text/plain")
        const info = yield* Effect.promise(() => request(port, "/info"))
        assert.strictEqual(info.body, `GET HTTP/2.0 127.0.0.1:${port} 127.0.0.1 http`)
        const missing = yield* Effect.promise(() => request(port, "/nowhere"))
        assert.strictEqual(missing.status, 404)
      })))

  it.effect("bodies cross byte for byte both ways: a streamed upload echoed back, a large download to a fast and a slow reader", () =>
    withGoBackend(1, (port) =>
      Effect.gen(function*() {
        const upload = randomBytes(3 * 1024 * 1024 + 17)
        const echoed = yield* Effect.promise(() => exchange(port, "/echo", { method: "POST", body: upload, pieces: 97 }))
        assert.strictEqual(echoed.status, 200)
        assert.isTrue(echoed.complete)
        assert.strictEqual(echoed.body.length, upload.length)
        assert.strictEqual(sha256(echoed.body), sha256(upload))
        const size = 24 * 1024 * 1024 + 5
        const expected = sha256(pattern(size))
        const fast = yield* Effect.promise(() => exchange(port, `/bytes?n=${size}`))
        assert.strictEqual(fast.status, 200)
        assert.strictEqual(fast.body.length, size)
        assert.strictEqual(sha256(fast.body), expected)
        const slowSize = 4 * 1024 * 1024 + 3
        const slow = yield* Effect.promise(() => exchange(port, `/bytes?n=${slowSize}`, { slowly: true }))
        assert.strictEqual(slow.body.length, slowSize)
        assert.strictEqual(sha256(slow.body), sha256(pattern(slowSize)))
      })))

  it.effect("trailers a Go handler sets after its body reach an HTTP/1.1 client that accepts them", () =>
    withGoBackend(1, (port) =>
      Effect.gen(function*() {
        const reply = yield* Effect.promise(() => exchange(port, "/trailers", { headers: { te: "trailers" } }))
        assert.strictEqual(reply.status, 200)
        assert.strictEqual(reply.body.toString(), "body before trailers")
        assert.strictEqual(reply.trailers["grpc-status"], "0")
        assert.strictEqual(reply.trailers["grpc-message"], "done")
      })))

  it.effect("many concurrent requests share two Go connections", () =>
    withGoBackend(2, (port) =>
      Effect.gen(function*() {
        const replies = yield* Effect.promise(() =>
          Promise.all(Array.from({ length: 48 }, (_, i) => exchange(port, `/bytes?n=${65_536 + i}`)))
        )
        for (const [i, r] of replies.entries()) {
          assert.strictEqual(r.status, 200)
          assert.strictEqual(r.body.length, 65_536 + i)
          assert.isTrue(r.body.equals(pattern(65_536 + i)))
        }
      })))

  it.effect("a Go backend killed mid-response: that response is cut, the connection pruned, and a request sent while none is there is served by the next backend", () =>
    withGoBackend(1, (port, gateway, first) =>
      Effect.gen(function*() {
        let started = false
        const held = Effect.runPromise(Effect.promise(() => exchange(port, "/hold", { onData: () => void (started = true) })))
        yield* until(() => started, "the held response to start")
        yield* kill(first.child)
        const cut = yield* Effect.promise(() => held)
        assert.strictEqual(cut.status, 200)
        assert.strictEqual(cut.body.toString(), "held")
        assert.isFalse(cut.complete, "a broken response must not look complete")
        yield* until(() => gateway.connections() === 0, "the dead connection to be pruned")
        // the route is in its grace period: this request waits for a backend instead of failing
        const waiting = Effect.runPromise(Effect.promise(() => request(port, "/hello")))
        yield* Effect.promise(() => sleep(200))
        yield* goBackend(gateway.address.port)
        const served = yield* Effect.promise(() => waiting)
        assert.strictEqual(served.status, 200)
        assert.strictEqual(served.body, "hello from go")
      })))
})
