/**
 * `switchyard client` says what goes wrong at the default log level: an unreachable, lost or refusing
 * gateway, a token or route it does not accept, a public port it cannot bind, a local service that
 * refuses. Each is a warn/error line naming the cause and what to do, and shows in the client's own
 * `/status` (per gateway: state, since when, last error) and in `switchyard status` against it.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { cleanupsPerTest } from "../support/leaks.ts"
import { addressAfter, freePort, get, mainScript, type RunningProcess, spawnSwitchyard } from "../runtime/serverProcess.ts"

const Token = "client-reports-token-7c1f"
const cleanups = cleanupsPerTest()

const tempDir = (prefix: string): string => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix))
  cleanups.push(async () => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

const startGateway = async (controlPort: number, args: ReadonlyArray<string> = []) => {
  const proc = spawnSwitchyard(["server", "--control", `127.0.0.1:${controlPort}`, "--no-admin", ...args], { SWITCHYARD_TOKEN: Token })
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor("expose a local service")
  return proc
}

const startBackend = async (): Promise<number> => {
  const backend = http.createServer((req, res) => res.end(`backend ${req.url}`))
  await new Promise<void>((resolve) => backend.listen(0, "127.0.0.1", () => resolve()))
  cleanups.push(() => new Promise((resolve) => backend.close(resolve)))
  return (backend.address() as net.AddressInfo).port
}

/** A client with its admin endpoint on a free port; resolves once that endpoint is up. */
const startClient = async (args: ReadonlyArray<string>, env: Record<string, string> = {}) => {
  const proc = spawnSwitchyard(["client", ...args], { SWITCHYARD_TOKEN: Token, SWITCHYARD_ADMIN_ADDRESS: "127.0.0.1:0", ...env })
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
  return { proc, admin: addressAfter(proc.output(), /admin endpoint on/).port }
}

interface Gateway {
  readonly gateway: string
  readonly state: string
  readonly since: string
  readonly attempts: number
  readonly lastError?: string
}

const statusOf = async (admin: number) => JSON.parse((await get(admin, "/status")).body)

/** Polls the client's `/status` until its first gateway is in `state`. */
const gatewayBecomes = async (admin: number, state: string): Promise<Gateway> => {
  let last: Gateway | undefined
  for (let i = 0; i < 200; i++) {
    last = (await statusOf(admin)).gateways[0]
    if (last?.state === state) return last
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  throw new Error(`gateway never ${state}: ${JSON.stringify(last)}`)
}

/** `switchyard status` against the client's admin endpoint. */
const statusText = (admin: number): string =>
  spawnSync(process.execPath, [mainScript, "status", "--admin", `127.0.0.1:${admin}`], { encoding: "utf8" }).stdout

const lines = (proc: RunningProcess, pattern: RegExp) => proc.output().split("\n").filter((l) => pattern.test(l))

describe("switchyard client reports", () => {
  it.live("an unreachable gateway, then its session, its loss and the reconnect", () =>
    Effect.promise(async () => {
      const backendPort = await startBackend()
      const controlPort = await freePort()
      const publicPort = await freePort()
      const { proc: client, admin } = await startClient(["--server", `127.0.0.1:${controlPort}`, "--expose", `127.0.0.1:${backendPort}`, "--port", String(publicPort)])
      await client.waitFor(/attempt 2\)/)
      const [line] = lines(client, /cannot reach gateway/)
      assert.match(line!, /WARN/)
      assert.match(line!, new RegExp(`cannot reach gateway 127\\.0\\.0\\.1:${controlPort}: .*ECONNREFUSED.*check --server and that the gateway is running; retrying in`))
      let status = await statusOf(admin)
      assert.strictEqual(status.gateways[0].state, "retrying")
      assert.match(status.gateways[0].lastError, /ECONNREFUSED/)
      assert.match(status.recentErrors[0].message, /cannot reach gateway/)
      // its own route is listed while it has no session
      assert.deepStrictEqual(status.routes, [{ route: `http :${publicPort} */`, backends: [`127.0.0.1:${backendPort}`], inFlight: 0, state: "pending" }])
      const text = statusText(admin)
      assert.match(text, /GATEWAY\s+STATE\s+SINCE\s+ATTEMPTS\s+LAST ERROR/)
      assert.match(text, new RegExp(`127\\.0\\.0\\.1:${controlPort}\\s+retrying\\s+\\S+\\s+\\d+\\s+cannot reach gateway`))
      assert.include(text, `http :${publicPort} */`)
      assert.notInclude(text, "no routes")

      let gateway = await startGateway(controlPort)
      await client.waitFor(/connected to gateway .* again after \d+ failed attempt/)
      const up = await gatewayBecomes(admin, "connected")
      assert.isUndefined(up.lastError)
      assert.strictEqual((await get(publicPort, "/x")).body, "backend /x")

      assert.strictEqual(await gateway.stop("SIGTERM"), 0)
      await client.waitFor(/lost gateway 127\.0\.0\.1:\d+: .*reconnecting|lost gateway/)
      assert.match(lines(client, /lost gateway/)[0]!, /WARN/)
      // the loss, then each failed attempt to reach it again
      assert.match((await gatewayBecomes(admin, "retrying")).lastError!, /lost gateway|cannot reach gateway/)
      assert.isTrue((await statusOf(admin)).recentErrors.some((e: { message: string }) => /^lost gateway 127\.0\.0\.1:\d+: /.test(e.message)))
      gateway = await startGateway(controlPort)
      await client.waitFor(/\(session 2\)/)
      await gatewayBecomes(admin, "connected")
      assert.match(statusText(admin), new RegExp(`127\\.0\\.0\\.1:${controlPort}\\s+connected`))
      assert.strictEqual(await client.stop("SIGTERM"), 0)
      assert.strictEqual(await gateway.stop("SIGTERM"), 0)
    }))

  it.live("a wrong token: an error line per attempt, state rejected; --exit-on-reject exits 77", () =>
    Effect.promise(async () => {
      const controlPort = await freePort()
      const gateway = await startGateway(controlPort)
      const args = ["--server", `127.0.0.1:${controlPort}`, "--expose", "127.0.0.1:1", "--port", String(await freePort())]
      const { proc: client, admin } = await startClient(args, { SWITCHYARD_TOKEN: "not-the-token" })
      await client.waitFor(/attempt 2\)/)
      const refused = lines(client, /refused this client/)
      assert.isAtLeast(refused.length, 2)
      for (const l of refused) {
        assert.match(l, /ERROR/)
        assert.match(l, /BadToken: .*wrong or revoked.*check --token/)
      }
      const g = await gatewayBecomes(admin, "rejected")
      assert.match(g.lastError!, /BadToken/)
      assert.match(statusText(admin), /rejected\s+\S+\s+\d+\s+gateway 127\.0\.0\.1:\d+ refused this client: BadToken/)
      assert.notInclude(client.output(), "not-the-token")
      assert.strictEqual(await client.stop("SIGTERM"), 0)

      const exiting = spawnSwitchyard(["client", ...args, "--exit-on-reject"], { SWITCHYARD_TOKEN: "not-the-token", SWITCHYARD_ADMIN_ENABLED: "false" })
      cleanups.push(() => exiting.stop("SIGKILL"))
      assert.strictEqual(await exiting.exited, 77)
      assert.match(exiting.output(), /BadToken/)
      assert.include(exiting.output(), "exiting with code 77")
      assert.strictEqual(await gateway.stop("SIGTERM"), 0)
    }))

  it.live("a port the token does not allow (exit_on_reject from the environment), a route another backend holds, a public port that does not bind", () =>
    Effect.promise(async () => {
      const dir = tempDir("switchyard-client-reports-")
      const controlPort = await freePort()
      const allowed = await freePort()
      const config = path.join(dir, "server.yaml")
      fs.writeFileSync(config, [
        "control:",
        `  address: 127.0.0.1:${controlPort}`,
        "  tokens:",
        "    - name: narrow",
        `      token: ${Token}`,
        `      ports: [${allowed}, "20000-60000"]`
      ].join("\n"))
      const gateway = spawnSwitchyard(["server", "--config", config, "--no-admin"])
      cleanups.push(() => gateway.stop("SIGKILL"))
      await gateway.waitFor("expose a local service")
      const backendPort = await startBackend()
      const common = ["--server", `127.0.0.1:${controlPort}`, "--expose", `127.0.0.1:${backendPort}`]

      const { proc: notAllowed, admin } = await startClient([...common, "--port", "1999"])
      await notAllowed.waitFor(/PortNotAllowed/)
      assert.match(lines(notAllowed, /PortNotAllowed/)[0]!, /ERROR.*does not allow this public port/)
      assert.match((await gatewayBecomes(admin, "rejected")).lastError!, /PortNotAllowed/)
      assert.strictEqual(await notAllowed.stop("SIGTERM"), 0)
      const exiting = spawnSwitchyard(["client", ...common, "--port", "1999"], { SWITCHYARD_TOKEN: Token, SWITCHYARD_ADMIN_ENABLED: "false", SWITCHYARD_EXIT_ON_REJECT: "true" })
      cleanups.push(() => exiting.stop("SIGKILL"))
      assert.strictEqual(await exiting.exited, 77)

      const holder = await startClient([...common, "--port", String(allowed)])
      await holder.proc.waitFor(/connected to gateway/)
      const { proc: second, admin: secondAdmin } = await startClient([...common, "--tcp", "--port", String(allowed)])
      await second.waitFor(/attempt 2\)/)
      assert.match(lines(second, /Conflict/)[0]!, /ERROR.*another backend holds this route/)
      // a conflict may clear: it retries, it is not refused for good
      assert.match((await gatewayBecomes(secondAdmin, "retrying")).lastError!, /Conflict/)

      const taken = net.createServer()
      await new Promise<void>((resolve) => taken.listen(0, "127.0.0.1", () => resolve()))
      cleanups.push(() => new Promise((resolve) => taken.close(() => resolve(undefined))))
      const takenPort = (taken.address() as net.AddressInfo).port
      const { proc: unbound, admin: unboundAdmin } = await startClient([...common, "--port", String(takenPort)])
      await unbound.waitFor(/BindFailed/)
      assert.match(lines(unbound, /BindFailed/)[0]!, /ERROR.*could not bind the public port.*choose another --port/)
      assert.match((await gatewayBecomes(unboundAdmin, "retrying")).lastError!, /BindFailed/)
      for (const p of [second, unbound, holder.proc]) assert.strictEqual(await p.stop("SIGTERM"), 0)
      assert.strictEqual(await gateway.stop("SIGTERM"), 0)
    }))

  it.live("a local service that refuses: the client warns, the caller gets a 502", () =>
    Effect.promise(async () => {
      const controlPort = await freePort()
      const gateway = await startGateway(controlPort)
      const publicPort = await freePort()
      const closedPort = await freePort()
      const { proc: client } = await startClient(["--server", `127.0.0.1:${controlPort}`, "--expose", `127.0.0.1:${closedPort}`, "--port", String(publicPort)])
      await client.waitFor(/connected to gateway/)
      const answer = await get(publicPort, "/nobody")
      assert.strictEqual(answer.status, 502)
      // a plain body: no session id, no backend address; the detail is in the gateway's log
      assert.strictEqual(answer.body, "switchyard: bad gateway (the backend could not be reached or its answer could not be relayed)\n")
      await gateway.waitFor(/WARN.*control-port tunnel: upstream .*s\d+/)
      await client.waitFor(/local service/)
      assert.match(lines(client, /local service/)[0]!, new RegExp(`WARN.*local service 127\\.0\\.0\\.1:${closedPort} failed a connection.*: .*ECONNREFUSED.*check that --expose is running`))
      assert.strictEqual(await client.stop("SIGTERM"), 0)
      assert.strictEqual(await gateway.stop("SIGTERM"), 0)
    }))

  it.live("a backend that dies with a request in flight: the gateway warns, the caller gets a plain 502", () =>
    Effect.promise(async () => {
      const controlPort = await freePort()
      const gateway = await startGateway(controlPort)
      const publicPort = await freePort()
      const held: Array<http.ServerResponse> = []
      const backend = http.createServer((_req, res) => void held.push(res))
      await new Promise<void>((resolve) => backend.listen(0, "127.0.0.1", () => resolve()))
      cleanups.push(() => new Promise((resolve) => (backend.closeAllConnections(), backend.close(resolve))))
      const backendPort = (backend.address() as net.AddressInfo).port
      const { proc: client } = await startClient(["--server", `127.0.0.1:${controlPort}`, "--expose", `127.0.0.1:${backendPort}`, "--port", String(publicPort)])
      await client.waitFor(/connected to gateway/)
      const pending = get(publicPort, "/slow")
      while (held.length === 0) await new Promise((resolve) => setTimeout(resolve, 20))
      await client.stop("SIGKILL")
      const answer = await pending
      assert.strictEqual(answer.status, 502)
      assert.notMatch(answer.body, /\bs\d+\b|127\.0\.0\.1/)
      await gateway.waitFor(/WARN.*control session s\d+.* ended with 1 request\(s\) or connection\(s\) in flight/)
      assert.strictEqual(await gateway.stop("SIGTERM"), 0)
    }))

  it.live("route definitions are checked before dialling: exit 78 with one line", () =>
    Effect.promise(async () => {
      const dir = tempDir("switchyard-client-routes-")
      fs.writeFileSync(path.join(dir, "cert.pem"), "not used")
      const base = ["client", "--server", "127.0.0.1:1", "--expose", "127.0.0.1:2", "--port", "8000"]
      const cases: ReadonlyArray<readonly [ReadonlyArray<string>, RegExp]> = [
        [["--path", "api"], /path: "api" must start with \//],
        [["--domain", "exa mple.com"], /domain: "exa mple.com" is not a host name/],
        [["--domain", "https://example.com"], /is not a host name/],
        [["--tls-cert", path.join(dir, "cert.pem")], /tls_key: tls_cert needs its private key/]
      ]
      for (const [extra, message] of cases) {
        const run = spawnSync(process.execPath, [mainScript, ...base, ...extra], { encoding: "utf8", env: { ...process.env, SWITCHYARD_TOKEN: Token } })
        assert.strictEqual(run.status, 78, run.stderr)
        const out = (run.stdout + run.stderr).trim().split("\n")
        assert.strictEqual(out.length, 1, run.stdout + run.stderr)
        assert.match(out[0]!, message)
      }
    }))

  it.live("client --h2: an unreachable gateway, then connected, in /status and switchyard status; a wrong token is an error and rejected", () =>
    Effect.promise(async () => {
      const backendPort = await startBackend()
      const h2Port = await freePort()
      const publicPort = await freePort()
      const { proc, admin } = await startClient(["--h2", "--server", `127.0.0.1:${h2Port}`, "--expose", `127.0.0.1:${backendPort}`, "--port", String(publicPort)])
      const retrying = await gatewayBecomes(admin, "retrying")
      assert.strictEqual(retrying.gateway, `127.0.0.1:${h2Port}`)
      assert.match(retrying.lastError ?? "", /cannot reach 127\.0\.0\.1:\d+: ECONNREFUSED/)
      // /status can say it before the line is through the process's stdout
      await proc.waitFor(/level=WARN.*cannot reach.*--reverse-h2.*retrying in .*\(attempt \d+\)/)
      assert.strictEqual((await statusOf(admin)).routes[0].state, "pending")
      const controlPort = await freePort()
      await startGateway(controlPort, ["--reverse-h2", `127.0.0.1:${h2Port}`])
      await gatewayBecomes(admin, "connected")
      await proc.waitFor(/connected to gateway 127\.0\.0\.1:\d+ \(reverse HTTP\/2\)/)
      const status = await statusOf(admin)
      assert.strictEqual(status.routes[0].state, "bound")
      assert.deepStrictEqual(status.routes[0].backends, [`127.0.0.1:${backendPort}`])
      assert.match(statusText(admin), /GATEWAY[\s\S]*127\.0\.0\.1:\d+\s+connected/)
      assert.strictEqual((await get(publicPort, "/x")).body, "backend /x")

      const wrong = await startClient(["--h2", "--server", `127.0.0.1:${h2Port}`, "--expose", `127.0.0.1:${backendPort}`, "--port", String(publicPort)], {
        SWITCHYARD_TOKEN: "not-the-token"
      })
      const rejected = await gatewayBecomes(wrong.admin, "rejected")
      assert.match(rejected.lastError ?? "", /BadToken/)
      await wrong.proc.waitFor(/level=ERROR.*BadToken.*check the token/)
      assert.match((await statusOf(wrong.admin)).routes[0].state, /^refused: /)
    }), 120_000)

  it.live("an HTTP proxy that wants credentials (407): a warning naming it and what to set, in /status too", () =>
    Effect.promise(async () => {
      const backendPort = await startBackend()
      // a CONNECT proxy that refuses every tunnel for want of credentials
      const proxy = http.createServer((_req, res) => res.writeHead(405).end())
      proxy.on("connect", (_req: http.IncomingMessage, socket: net.Socket) => {
        socket.on("error", () => socket.destroy())
        socket.end("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n")
      })
      await new Promise<void>((resolve) => proxy.listen(0, "127.0.0.1", () => resolve()))
      cleanups.push(() => new Promise((resolve) => proxy.close(() => resolve(undefined))))
      const proxyPort = (proxy.address() as net.AddressInfo).port
      const { proc, admin } = await startClient(
        ["--server", "ws://gateway.example.test:9999/tunnel", "--expose", `127.0.0.1:${backendPort}`, "--port", String(await freePort())],
        { HTTPS_PROXY: "", https_proxy: "", HTTP_PROXY: `http://127.0.0.1:${proxyPort}`, http_proxy: "", NO_PROXY: "", no_proxy: "" }
      )
      const retrying = await gatewayBecomes(admin, "retrying")
      assert.match(retrying.lastError ?? "", /407/)
      await proc.waitFor(/level=WARN.*407.*HTTPS_PROXY\/HTTP_PROXY/)
      const warned = lines(proc, /level=WARN.*407.*HTTPS_PROXY\/HTTP_PROXY/)
      assert.isAtLeast(warned.length, 1, proc.output())
    }), 120_000)
})
