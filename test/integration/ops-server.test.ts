/**
 * `switchyard server` as operators run it: a child process, a backend tunnelled in with `listen()`,
 * traffic through a public port, the admin endpoint scraped, SIGTERM drains, SIGHUP reloads tokens and
 * reverse-HTTP/2 routes.
 */
import { assert, beforeEach, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as http from "node:http"
import * as http2 from "node:http2"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { Effect, Redacted } from "effect"
import { encodeHello, ProtocolVersion } from "../../src/domain/ControlMessage.ts"
import { listen, type TunnelServer } from "../../src/runtime/listen.ts"
import { cleanupsPerTest } from "../support/leaks.ts"
import { addressAfter, freePort, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"

const Token = "ops-test-token-5f1c9a"
const OtherToken = "ops-test-token-second-77b2"

let dir: string
const cleanups = cleanupsPerTest()

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-ops-"))
  const mine = dir
  // pushed first, so removed last, after the processes using it are gone
  cleanups.push(async () => fs.rmSync(mine, { recursive: true, force: true }))
})

const startServer = async (args: ReadonlyArray<string>, env: Record<string, string> = {}) => {
  const proc = spawnSwitchyard(["server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", ...args], env)
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor("expose a local service")
  return {
    proc,
    control: addressAfter(proc.output(), /control port/),
    admin: addressAfter(proc.output(), /admin endpoint/)
  }
}

/** A backend HTTP server reached through the gateway. */
const startBackend = async (
  control: { port: number },
  token: string,
  port: number,
  handler: http.RequestListener = (req, res) => res.end(`hello ${req.url} id=${req.headers["x-request-id"]}`),
  pathPrefix = "/"
): Promise<TunnelServer> => {
  const tunnel = await listen({ port, http: { pathPrefix } }, { server: `127.0.0.1:${control.port}`, token, timeoutMs: 20_000 })
  const server = tunnel.serve(http.createServer(handler))
  cleanups.push(() => new Promise<void>((resolve) => tunnel.close(() => { server.close(); resolve() })))
  return tunnel
}

/** Sends one `Hello` with `token` and returns the gateway's answer as text. */
const helloWith = (port: number, token: string): Promise<{ message: string }> =>
  new Promise((resolve, reject) => {
    const socket = net.connect({ host: "127.0.0.1", port }, () => {
      socket.write(encodeHello({ _tag: "Hello", version: ProtocolVersion, token: Redacted.make(token), listeners: [] }))
    })
    let answer = ""
    socket.on("data", (d) => (answer += d.toString("latin1")))
    socket.on("error", reject)
    socket.on("close", () => resolve({ message: answer }))
  })

/** Runs a promise-returning test body inside `it.live`. */
const promiseEffect = (body: () => Promise<void>) => Effect.promise(body)

/** Authenticates, then breaks the yamux protocol (a frame with version 9); resolves when the gateway hangs up. */
const breakProtocol = (port: number, token: string): Promise<void> =>
  new Promise((resolve, reject) => {
    const socket = net.connect({ host: "127.0.0.1", port }, () => {
      socket.write(encodeHello({ _tag: "Hello", version: ProtocolVersion, token: Redacted.make(token), listeners: [] }))
    })
    socket.once("data", () => socket.write(Buffer.from([9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])))
    socket.on("error", reject)
    socket.on("close", () => resolve())
  })

const scrape = async (admin: { port: number }) => (await get(admin.port, "/metrics")).body

describe("switchyard server", () => {
  it.live("serves a tunnelled backend on a public port, counts it, and stops with exit 0 on SIGTERM", () =>
    promiseEffect(async () => {
      const { proc, control, admin } = await startServer([], { SWITCHYARD_TOKEN: Token, SWITCHYARD_LOG_ACCESS_LOG: "true" })
      assert.strictEqual((await get(admin.port, "/readyz")).status, 200)
      assert.strictEqual((await get(admin.port, "/healthz")).body, "ok\n")
      const before = await scrape(admin)
      const port = await freePort()
      await startBackend(control, Token, port)

      const plain = await get(port, "/x?q=1")
      assert.strictEqual(plain.status, 200)
      assert.match(plain.body, /^hello \/x\?q=1 id=[0-9a-f-]{36}$/)
      assert.strictEqual(plain.body.split("id=")[1], plain.headers["x-request-id"])
      const given = await get(port, "/y", { "x-request-id": "abc-123" })
      assert.strictEqual(given.body, "hello /y id=abc-123")
      assert.strictEqual(given.headers["x-request-id"], "abc-123")

      const after = await scrape(admin)
      const route = /switchyard_route_backends\{route="([^"]+)"\} 1/.exec(after)?.[1]
      assert.isDefined(route)
      assert.strictEqual(sample(after, "switchyard_requests_total", { route: route!, status_class: "2xx" }) - sample(before, "switchyard_requests_total", { route: route!, status_class: "2xx" }), 2)
      assert.strictEqual(sample(after, "switchyard_sessions", { front_door: "control" }), 1)
      assert.strictEqual(sample(after, "switchyard_routes"), 1)
      assert.strictEqual(sample(after, "switchyard_open_ports"), 1)
      assert.strictEqual(sample(after, "switchyard_request_duration_seconds_count", { route: route! }), 2)
      assert.strictEqual(sample(after, "switchyard_queue_wait_seconds_count", { front_door: "public" }), 2)
      assert.isAbove(sample(after, "switchyard_received_bytes_total", { route: route! }), 40)
      assert.isAbove(sample(after, "switchyard_sent_bytes_total", { route: route! }), 40)

      const status = JSON.parse((await get(admin.port, "/status")).body)
      assert.strictEqual(status.ready, true)
      assert.strictEqual(status.routes.length, 1)
      assert.strictEqual(status.routes[0].backends.length, 1)

      // `switchyard status` prints the same as tables; an unreachable endpoint is one line and exit 69
      const table = spawnSwitchyard(["status", "--admin", `127.0.0.1:${admin.port}`])
      assert.strictEqual(await table.exited, 0)
      assert.match(table.output(), new RegExp(`ROUTE\\s+BACKENDS\\s+IN FLIGHT[\\s\\S]*${route!.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`))
      const unreachable = spawnSwitchyard(["status", "--admin", "127.0.0.1:1"])
      assert.strictEqual(await unreachable.exited, 69)
      assert.strictEqual(unreachable.output().trim().split("\n").length, 1)

      // the access log has the request id, not the query string
      await proc.waitFor(/log=access .*path=\/y .*request_id=abc-123/)
      assert.notInclude(proc.output(), "q=1")
      // secrets never printed, logged, nor exposed
      assert.notInclude(proc.output(), Token)
      assert.notInclude(after, Token)
      assert.notInclude(JSON.stringify(status), Token)

      assert.strictEqual(await proc.stop("SIGTERM"), 0)
    }))

  it.live("generates a private token when none is configured and prints how to use it", () =>
    promiseEffect(async () => {
      const { proc, control } = await startServer([])
      const file = /generated one in (\S+)/.exec(proc.output())?.[1]
      assert.isDefined(file)
      assert.strictEqual(fs.statSync(file!).mode & 0o777, 0o600)
      const token = fs.readFileSync(file!, "utf8").trim()
      assert.notInclude(proc.output(), token)
      assert.include(proc.output(), `SWITCHYARD_TOKEN="$(cat ${file})" npx switchyard client --server 127.0.0.1:${control.port}`)
      const port = await freePort()
      await startBackend(control, token, port)
      assert.strictEqual((await get(port, "/")).status, 200)
      assert.strictEqual(await proc.stop("SIGINT"), 0)
      assert.isFalse(fs.existsSync(file!))
    }))

  it.live("counts refused handshakes by reason", () =>
    promiseEffect(async () => {
      const { proc, control, admin } = await startServer([], { SWITCHYARD_TOKEN: Token })
      const refused = await helloWith(control.port, "wrong-token")
      assert.match(String(refused?.message), /BadToken/)
      const metrics = await scrape(admin)
      assert.strictEqual(sample(metrics, "switchyard_handshake_rejections_total", { front_door: "control", reason: "BadToken" }), 1)
      assert.include(JSON.parse((await get(admin.port, "/status")).body).recentErrors[0].message, "BadToken")
      assert.notInclude(proc.output() + metrics, "wrong-token")

      // a request no route matches is counted as a 4xx of "(no route)"
      const port = await freePort()
      await startBackend(control, Token, port, undefined, "/app")
      assert.strictEqual((await get(port, "/app/x")).status, 200)
      assert.strictEqual((await get(port, "/elsewhere")).status, 404)
      const after = await scrape(admin)
      assert.strictEqual(sample(after, "switchyard_requests_total", { route: "(no route)", status_class: "4xx" }), 1)

      // a session that breaks the yamux protocol is counted by kind
      await breakProtocol(control.port, Token)
      let protocolErrors = 0
      for (let i = 0; i < 100 && protocolErrors === 0; i++) {
        protocolErrors = sample(await scrape(admin), "switchyard_protocol_errors_total", { front_door: "control", kind: "ProtocolError" })
      }
      assert.strictEqual(protocolErrors, 1)
      assert.strictEqual(await proc.stop(), 0)
    }))

  it.live("drains on SIGTERM: /readyz turns 503, requests in flight finish, the process exits 0", () =>
    promiseEffect(async () => {
      const { proc, control, admin } = await startServer([], { SWITCHYARD_TOKEN: Token })
      const port = await freePort()
      let arrived = 0
      let allArrived!: () => void
      const arrivedAll = new Promise<void>((resolve) => (allArrived = resolve))
      const InFlight = 20
      await startBackend(control, Token, port, (req, res) => {
        if (++arrived === InFlight) allArrived()
        setTimeout(() => res.end(`done ${req.url}`), 1_500)
      })
      const requests = Array.from({ length: InFlight }, (_, i) => get(port, `/r${i}`))
      await arrivedAll
      proc.child.kill("SIGTERM")
      let sawNotReady = false
      for (let i = 0; i < 50 && !sawNotReady; i++) {
        const r = await get(admin.port, "/readyz").catch(() => undefined)
        if (r?.status === 503) sawNotReady = true
        else await new Promise((r) => setTimeout(r, 20))
      }
      const answers = await Promise.all(requests)
      assert.isTrue(sawNotReady)
      assert.deepStrictEqual(answers.map((a) => a.status), answers.map(() => 200))
      assert.deepStrictEqual(answers.map((a) => a.body), answers.map((_, i) => `done /r${i}`))
      assert.strictEqual(await proc.exited, 0)
    }))
})

describe("SIGHUP reload", () => {
  const writeConfig = (file: string, tokens: ReadonlyArray<string>) =>
    fs.writeFileSync(file, [
      "control:",
      "  tokens:",
      ...tokens.flatMap((name) => [`    - name: ${name}`, `      token_file: ${path.join(dir, name)}`, `      ports: ["1-65535"]`])
    ].join("\n") + "\n")

  it.live("applies new tokens without dropping sessions or requests; an invalid file keeps the old ones", () =>
    promiseEffect(async () => {
      fs.writeFileSync(path.join(dir, "a"), Token + "\n")
      fs.writeFileSync(path.join(dir, "b"), OtherToken + "\n")
      const config = path.join(dir, "server.yaml")
      writeConfig(config, ["a"])
      const { proc, control, admin } = await startServer(["--config", config])
      const portA = await freePort()
      await startBackend(control, Token, portA)

      // load on the existing session while reloading
      let stop = false
      const failures: Array<string> = []
      let served = 0
      const load = (async () => {
        while (!stop) {
          const r = await get(portA, "/load").catch((e: Error) => ({ status: 0, body: e.message }))
          if (r.status === 200) served++
          else failures.push(`${r.status} ${r.body}`)
        }
      })()

      const portB = await freePort()
      const refused = await helloWith(control.port, OtherToken)
      assert.match(String(refused?.message), /BadToken/)

      writeConfig(config, ["a", "b"])
      proc.child.kill("SIGHUP")
      await proc.waitFor("configuration reloaded")
      await startBackend(control, OtherToken, portB)
      assert.strictEqual((await get(portB, "/b")).status, 200)

      fs.writeFileSync(config, "control:\n  tokens: [ { name: c, ports: [\"x\"] } ]\n")
      proc.child.kill("SIGHUP")
      await proc.waitFor("reload refused")
      assert.match(proc.output(), /reload refused.*control\.tokens\.0\.token/)
      const portC = await freePort()
      await startBackend(control, OtherToken, portC)
      assert.strictEqual((await get(portC, "/c")).status, 200)

      stop = true
      await load
      assert.deepStrictEqual(failures, [])
      assert.isAbove(served, 0)
      const metrics = await scrape(admin)
      assert.strictEqual(sample(metrics, "switchyard_config_reloads_total", { result: "applied" }), 1)
      assert.strictEqual(sample(metrics, "switchyard_config_reloads_total", { result: "rejected" }), 1)
      // b and c share one control session (listen() shares it per gateway and token)
      assert.strictEqual(sample(metrics, "switchyard_sessions", { front_door: "control" }), 2)
      assert.notInclude(proc.output() + metrics, Token)
      assert.notInclude(proc.output() + metrics, OtherToken)
      assert.strictEqual(await proc.stop(), 0)
    }))
})

describe("SIGHUP reload of reverse-HTTP/2 routes", () => {
  const writeConfig = (file: string, ports: ReadonlyArray<number>) =>
    fs.writeFileSync(file, [
      "control:",
      `  token_file: ${path.join(dir, "a")}`,
      "reverse_h2:",
      "  enabled: true",
      "  address: 127.0.0.1:0",
      "  plain: true",
      `  routes: [${ports.map((port) => `{ port: ${port} }`).join(", ")}]`
    ].join("\n") + "\n")

  it.live("a plain-mode backend serves the new routes over its live connection; its request in flight finishes; an invalid file keeps the old routes", () =>
    promiseEffect(async () => {
      fs.writeFileSync(path.join(dir, "a"), Token + "\n")
      const config = path.join(dir, "server.yaml")
      const [oldPort, newPort] = [await freePort(), await freePort()]
      writeConfig(config, [oldPort])
      const { proc, admin } = await startServer(["--config", config])
      const tunnel = addressAfter(proc.output(), /reverse HTTP\/2/)

      // a ptth-style backend: an HTTP/2 server on a socket it dialed to the tunnel port
      const held: Array<() => void> = []
      const backend = http2.createServer((req, res) => {
        req.resume()
        if (req.url === "/slow") held.push(() => res.end("slow done"))
        else res.end(`h2 ${req.url}`)
      })
      const socket = net.connect({ host: "127.0.0.1", port: tunnel.port })
      socket.on("error", () => socket.destroy())
      await new Promise<void>((resolve) => socket.once("connect", () => resolve()))
      backend.emit("connection", socket)
      cleanups.push(() => new Promise<void>((resolve) => { socket.destroy(); backend.close(() => resolve()) }))
      const firstReply = async (port: number, url: string) => {
        for (let i = 0; i < 200; i++) {
          const r = await get(port, url).catch(() => undefined)
          if (r?.status === 200) return r
          await new Promise((r) => setTimeout(r, 20))
        }
        throw new Error(`no answer on ${port}${url}`)
      }
      assert.strictEqual((await firstReply(oldPort, "/x")).body, "h2 /x")
      const slow = get(oldPort, "/slow")
      for (let i = 0; i < 200 && held.length === 0; i++) await new Promise((r) => setTimeout(r, 10))
      assert.strictEqual(held.length, 1)

      writeConfig(config, [newPort])
      proc.child.kill("SIGHUP")
      await proc.waitFor("configuration reloaded")
      assert.match(proc.output(), /configuration reloaded: .*1 reverse-HTTP\/2 route/)
      const added = await get(newPort, "/y")
      assert.strictEqual(added.status, 200)
      assert.strictEqual(added.body, "h2 /y")
      held.shift()!()
      const finished = await slow
      assert.strictEqual(finished.status, 200)
      assert.strictEqual(finished.body, "slow done")

      writeConfig(config, [])
      proc.child.kill("SIGHUP")
      await proc.waitFor("reload refused")
      assert.match(proc.output(), /reload refused.*reverse_h2\.routes/)
      assert.strictEqual((await get(newPort, "/z")).body, "h2 /z")

      const metrics = await scrape(admin)
      assert.strictEqual(sample(metrics, "switchyard_config_reloads_total", { result: "applied" }), 1)
      assert.strictEqual(sample(metrics, "switchyard_config_reloads_total", { result: "rejected" }), 1)
      assert.strictEqual(sample(metrics, "switchyard_sessions", { front_door: "reverse_h2" }), 1)
      assert.strictEqual(await proc.stop(), 0)
    }))
})

describe("configuration errors", () => {
  it.live("exit 78 before binding, naming the source, the field and the value", () =>
    promiseEffect(async () => {
      const file = path.join(dir, "bad.yaml")
      fs.writeFileSync(file, "control:\n  max_sessions: lots\n")
      const fromFile = spawnSwitchyard(["server", "--config", file])
      assert.strictEqual(await fromFile.exited, 78)
      assert.include(fromFile.output(), `${file}: control.max_sessions: Expected number (got "lots")`)

      const fromEnv = spawnSwitchyard(["server", "--config", file], { SWITCHYARD_CONTROL_MAX_SESSIONS: "0" })
      assert.strictEqual(await fromEnv.exited, 78)
      assert.include(fromEnv.output(), "SWITCHYARD_CONTROL_MAX_SESSIONS: control.max_sessions")
      assert.include(fromEnv.output(), "(got 0)")

      const fromFlag = spawnSwitchyard(["server", "--admin", "nowhere", "--token", Token])
      assert.strictEqual(await fromFlag.exited, 78)
      assert.include(fromFlag.output(), "admin.address")
      assert.include(fromFlag.output(), "nowhere")
      assert.notInclude(fromFlag.output(), Token)

      // a port in use is one line and a non-zero exit, not a stack trace
      const blocker = net.createServer()
      await new Promise<void>((resolve) => blocker.listen(0, "127.0.0.1", () => resolve()))
      const taken = (blocker.address() as net.AddressInfo).port
      const busy = spawnSwitchyard(["server", "--control", `127.0.0.1:${taken}`, "--admin", "127.0.0.1:0", "--token", Token])
      const busyCode = await busy.exited
      await new Promise<void>((resolve) => blocker.close(() => resolve()))
      assert.strictEqual(busyCode, 1)
      assert.match(busy.output().trim(), /^switchyard server: cannot start the gateway: .*EADDRINUSE/)
      assert.strictEqual(busy.output().trim().split("\n").length, 1)

      const ok = spawnSwitchyard(["server", "--check-config", "--set", "control.max_sessions=5", "--token", Token])
      assert.strictEqual(await ok.exited, 0)
      assert.include(ok.output(), "configuration OK")
      assert.notInclude(ok.output(), Token)
    }))
})
