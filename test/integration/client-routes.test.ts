/**
 * Several routes per client, token-owned routes, `switchyard route test` and strip_path, with real
 * processes: a gateway and clients as `switchyard` commands, HTTP backends and callers on loopback.
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
import { addressAfter, type Answer, freePort, get, mainScript, type RunningProcess, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"

/** Each test starts several `switchyard` processes: on a loaded machine that takes longer than the default 60 s. */
const ProcessTestTimeoutMs = 150_000

const TokenA = "client-routes-token-a-51c9"
const TokenB = "client-routes-token-b-0d3e"
const cleanups = cleanupsPerTest()

const tempDir = (): string => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-client-routes-"))
  cleanups.push(async () => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/** A backend that answers `name url`, or holds `/slow` until released. */
const startBackend = async (name: string, held: Array<() => void> = []): Promise<number> => {
  const server = http.createServer((req, res) => {
    if (req.url === "/slow") held.push(() => res.end(`${name} slow done`))
    else res.end(`${name} ${req.url}`)
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()))
  cleanups.push(() => new Promise((resolve) => (server.closeAllConnections(), server.close(resolve))))
  return (server.address() as net.AddressInfo).port
}

/** A gateway from a config file (tokens team-a and team-b), with its admin endpoint on a free port. */
const startGateway = async (dir: string, controlPort: number, tokens: ReadonlyArray<string>, top: ReadonlyArray<string> = []) => {
  const file = path.join(dir, "server.yaml")
  const write = (grants: ReadonlyArray<string>, more: ReadonlyArray<string> = []) =>
    fs.writeFileSync(file, [...top, "control:", `  address: 127.0.0.1:${controlPort}`, ...more, "  tokens:", ...grants].join("\n") + "\n")
  write(tokens)
  const proc = spawnSwitchyard(["server", "--config", file, "--admin", "127.0.0.1:0"])
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor("expose a local service")
  return { proc, admin: addressAfter(proc.output(), /admin endpoint/).port, write }
}

const grant = (name: string, token: string, ...more: ReadonlyArray<string>) => [`    - name: ${name}`, `      token: ${token}`, `      ports: ["20000-65000"]`, ...more.map((m) => `      ${m}`)]

/** A client from a config file, with its admin endpoint on a free port. */
const startClient = async (file: string, env: Record<string, string> = {}) => {
  const proc = spawnSwitchyard(["client", "--config", file], { SWITCHYARD_ADMIN_ADDRESS: "127.0.0.1:0", ...env })
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
  return { proc, admin: addressAfter(proc.output(), /admin endpoint on/).port }
}

/** GETs `url` until it answers `status` (the route may still be binding), bounded. */
const answers = async (port: number, url: string, status = 200, headers: Record<string, string> = {}): Promise<Answer> => {
  let last: Answer | undefined
  for (let i = 0; i < 400; i++) {
    last = await get(port, url, headers).catch(() => undefined)
    if (last?.status === status) return last
    await sleep(50)
  }
  throw new Error(`${url} on :${port} never answered ${status}: ${JSON.stringify(last)}`)
}

interface RouteRow {
  readonly route: string
  readonly backends: ReadonlyArray<string>
  readonly inFlight: number
  readonly state: string
}

const routesOf = async (admin: number): Promise<ReadonlyArray<RouteRow>> => JSON.parse((await get(admin, "/status")).body).routes

/** Polls the client's `/status` until `check` holds for its routes. */
const routesBecome = async (admin: number, check: (routes: ReadonlyArray<RouteRow>) => boolean): Promise<ReadonlyArray<RouteRow>> => {
  let last: ReadonlyArray<RouteRow> = []
  for (let i = 0; i < 400; i++) {
    last = await routesOf(admin)
    if (check(last)) return last
    await sleep(50)
  }
  throw new Error(`routes never as expected: ${JSON.stringify(last)}`)
}

/** Polls until connections to `port` are refused (its last route is gone), bounded. */
const portCloses = async (port: number): Promise<void> => {
  for (let i = 0; i < 400; i++) {
    const error = await get(port, "/").then(() => undefined, (e: NodeJS.ErrnoException) => e.code)
    if (error === "ECONNREFUSED") return
    await sleep(50)
  }
  throw new Error(`port ${port} still accepts connections`)
}

const run = (args: ReadonlyArray<string>, env: Record<string, string> = {}) =>
  spawnSync(process.execPath, [mainScript, ...args], { encoding: "utf8", env: { ...process.env, SWITCHYARD_TOKEN: "", ...env } })

const lines = (proc: RunningProcess, pattern: RegExp) => proc.output().split("\n").filter((l) => pattern.test(l))

describe("switchyard client routes", () => {
  it.live("two routes over one session, one stripping its prefix; SIGHUP adds and removes routes, the kept route's request in flight finishes", () =>
    Effect.promise(async () => {
      const dir = tempDir()
      const held: Array<() => void> = []
      const [api, web, extra] = [await startBackend("api", held), await startBackend("web", held), await startBackend("extra")]
      const controlPort = await freePort()
      const [apiPort, webPort] = [await freePort(), await freePort()]
      // a removed route keeps its place for the grace period: kept short here
      const gateway = await startGateway(dir, controlPort, grant("team-a", TokenA), ["grace_period_ms: 300"])
      const file = path.join(dir, "client.yaml")
      const write = (routes: ReadonlyArray<string>) =>
        fs.writeFileSync(file, [`server: 127.0.0.1:${controlPort}`, `token: ${TokenA}`, "routes:", ...routes].join("\n") + "\n")
      const apiRoute = [`  - expose: 127.0.0.1:${api}`, `    port: ${apiPort}`, "    path: /api", "    strip_path: true"]
      const webRoute = [`  - expose: 127.0.0.1:${web}`, `    port: ${webPort}`, "    domain: web.example.com"]
      write([...apiRoute, ...webRoute])
      const { proc: client, admin } = await startClient(file)

      await routesBecome(admin, (rs) => rs.length === 2 && rs.every((r) => r.state === "bound"))
      // both served over the one session; /api/users reaches the backend as /users, /api as /
      assert.strictEqual((await answers(apiPort, "/api/users?id=1")).body, "api /users?id=1")
      assert.strictEqual((await answers(apiPort, "/api")).body, "api /")
      assert.strictEqual((await get(apiPort, "/other")).status, 404)
      assert.strictEqual((await answers(webPort, "/x", 200, { host: "web.example.com" })).body, "web /x")
      assert.strictEqual((await get(webPort, "/x", { host: "other.example.com" })).status, 404)
      const routes = await routesBecome(admin, (rs) => rs.length === 2 && rs.every((r) => r.state === "bound"))
      assert.deepStrictEqual(routes.map((r) => [r.route, r.backends]), [
        [`http :${apiPort} */api (prefix stripped)`, [`127.0.0.1:${api}`]],
        [`http :${webPort} web.example.com/`, [`127.0.0.1:${web}`]]
      ])
      const table = run(["status", "--admin", `127.0.0.1:${admin}`]).stdout
      assert.match(table, /ROUTE\s+BACKENDS\s+IN FLIGHT\s+STATE/)
      assert.match(table, new RegExp(`http :${webPort} web\\.example\\.com/\\s+127\\.0\\.0\\.1:${web}\\s+\\d+\\s+bound`))
      const clientMetrics = (await get(admin, "/metrics")).body
      assert.strictEqual(sample(clientMetrics, "switchyard_gateway_up", { front_door: "control" }), 1)
      assert.strictEqual(JSON.parse((await get(gateway.admin, "/status")).body).sessions[0].count, 1)

      // a request in flight on the web route while the file changes: the api route goes, a new one comes
      const slow = get(webPort, "/slow", { host: "web.example.com" })
      for (let i = 0; i < 200 && held.length === 0; i++) await sleep(10)
      assert.strictEqual(held.length, 1)
      const extraPort = await freePort()
      write([...webRoute, `  - expose: 127.0.0.1:${extra}`, `    port: ${extraPort}`, "    tcp: true"])
      client.child.kill("SIGHUP")
      await client.waitFor("configuration reloaded")
      assert.match(lines(client, /configuration reloaded/)[0]!, new RegExp(`now serving tcp :${extraPort} -> 127\\.0\\.0\\.1:${extra}; no longer serving http :${apiPort} \\*/api`))
      // raw TCP: the bytes reach the backend as sent
      const raw = await new Promise<string>((resolve, reject) => {
        const socket = net.connect(extraPort, "127.0.0.1", () => socket.write("GET /raw HTTP/1.1\r\nHost: x\r\n\r\n"))
        let text = ""
        const timer = setTimeout(() => (socket.destroy(), reject(new Error(`no answer on the raw TCP route: ${JSON.stringify(text)}`))), 10_000)
        socket.on("data", (d) => {
          text += d.toString()
          if (text.endsWith("extra /raw")) (clearTimeout(timer), socket.destroy(), resolve(text))
        })
        socket.on("error", (e) => (clearTimeout(timer), reject(e)))
      })
      assert.match(raw, /^HTTP\/1\.1 200 OK\r\n[\s\S]*extra \/raw$/)
      await portCloses(apiPort)
      held.shift()!()
      const finished = await slow
      assert.strictEqual(finished.status, 200)
      assert.strictEqual(finished.body, "web slow done")
      assert.strictEqual((await get(webPort, "/y", { host: "web.example.com" })).body, "web /y")
      await routesBecome(admin, (rs) => rs.length === 2 && rs[1]!.route === `tcp :${extraPort}` && rs.every((r) => r.state === "bound"))
      // one session throughout
      assert.strictEqual(sample((await get(admin, "/metrics")).body, "switchyard_reconnects_total", { front_door: "control" }), 0)
      assert.strictEqual(await client.stop("SIGTERM"), 0)
      assert.strictEqual(await gateway.proc.stop("SIGTERM"), 0)
    }), ProcessTestTimeoutMs)

  it.live("a route another token owns is refused with Conflict; the client's other routes are served; route test names the owner", () =>
    Effect.promise(async () => {
      const dir = tempDir()
      const [a, b, bOwn] = [await startBackend("a"), await startBackend("b"), await startBackend("b-own")]
      const controlPort = await freePort()
      const [shared, own] = [await freePort(), await freePort()]
      const gateway = await startGateway(dir, controlPort, [...grant("team-a", TokenA), ...grant("team-b", TokenB)])
      const clientFile = (name: string, token: string, routes: ReadonlyArray<string>) => {
        const file = path.join(dir, `${name}.yaml`)
        fs.writeFileSync(file, [`server: 127.0.0.1:${controlPort}`, `token: ${token}`, `label: ${name}`, "routes:", ...routes].join("\n") + "\n")
        return file
      }
      const sharedRoute = (backend: number) => [`  - expose: 127.0.0.1:${backend}`, `    port: ${shared}`, "    domain: a.example.com"]
      const { proc: clientA } = await startClient(clientFile("a", TokenA, sharedRoute(a)))
      await answers(shared, "/", 200, { host: "a.example.com" })
      const { proc: clientB, admin: adminB } = await startClient(
        clientFile("b", TokenB, [...sharedRoute(b), `  - expose: 127.0.0.1:${bOwn}`, `    port: ${own}`])
      )
      // b's own route is served; the owned one is refused, and asked for again
      assert.strictEqual((await answers(own, "/mine")).body, "b-own /mine")
      await clientB.waitFor(/asking again in/)
      // first the whole session is refused naming the route, then it is left out and asked for again over the session
      assert.match(lines(clientB, /Conflict/)[0]!, /ERROR.*refused this client: Conflict: .*belongs to another token.*\(route http :\d+ a\.example\.com\/\)/)
      assert.match(lines(clientB, /asking again in/)[0]!, /ERROR.*refused http :\d+ a\.example\.com\/: Conflict: .*belongs to another token.*another backend holds this route.*asking again in/)
      const rows = await routesBecome(adminB, (rs) => rs[0]!.state.startsWith("refused") && rs[1]!.state === "bound")
      assert.match(rows[0]!.state, /Conflict/)
      await gateway.proc.waitFor(/WARN.*\(token team-b\): http :\d+ a\.example\.com\/ refused: Conflict/)
      assert.isAtLeast(sample((await get(gateway.admin, "/metrics")).body, "switchyard_route_refusals_total", { reason: "Conflict" }), 2)
      const clientMetrics = (await get(adminB, "/metrics")).body
      assert.strictEqual(sample(clientMetrics, "switchyard_client_routes", { state: "refused" }), 1)
      assert.strictEqual(sample(clientMetrics, "switchyard_client_routes", { state: "bound" }), 1)
      for (let i = 0; i < 6; i++) assert.strictEqual((await get(shared, "/", { host: "a.example.com" })).body, "a /")
      const routeTest = run(["route", "test", `http://a.example.com:${shared}/x`, "--admin", `127.0.0.1:${gateway.admin}`])
      assert.strictEqual(routeTest.status, 0, routeTest.stderr)
      assert.match(routeTest.stdout, /OWNER\s+token team-a/)
      assert.match(routeTest.stdout, /s\d+ a#1\s+0\s+live/)
      assert.notMatch(routeTest.stdout, / b#/)
      for (const p of [clientA, clientB]) assert.strictEqual(await p.stop("SIGTERM"), 0)
      assert.strictEqual(await gateway.proc.stop("SIGTERM"), 0)
    }), ProcessTestTimeoutMs)

  it.live("tokens that both have share_routes serve one route together; close_revoked_sessions closes a removed token's session on reload", () =>
    Effect.promise(async () => {
      const [a, b] = [await startBackend("a"), await startBackend("b")]
      const dir2 = tempDir()
      const controlPort2 = await freePort()
      const shared2 = await freePort()
      const sharing = await startGateway(dir2, controlPort2, [...grant("team-a", TokenA, "share_routes: true"), ...grant("team-b", TokenB, "share_routes: true")])
      const route2 = (backend: number) => [`  - expose: 127.0.0.1:${backend}`, `    port: ${shared2}`, "    domain: a.example.com"]
      const file2 = (name: string, token: string, backend: number) => {
        const file = path.join(dir2, `${name}.yaml`)
        fs.writeFileSync(file, [`server: 127.0.0.1:${controlPort2}`, `token: ${token}`, `label: ${name}`, "routes:", ...route2(backend)].join("\n") + "\n")
        return file
      }
      const { proc: sharerA } = await startClient(file2("a", TokenA, a))
      await answers(shared2, "/", 200, { host: "a.example.com" })
      const { proc: sharerB, admin: sharerBAdmin } = await startClient(file2("b", TokenB, b))
      await routesBecome(sharerBAdmin, (rs) => rs[0]!.state === "bound")
      const seen = new Set<string>()
      for (let i = 0; i < 8; i++) seen.add((await get(shared2, "/", { host: "a.example.com" })).body)
      assert.deepStrictEqual([...seen].sort(), ["a /", "b /"])

      // team-b removed, with close_revoked_sessions: its session is closed, its backend leaves the route
      sharing.write(grant("team-a", TokenA, "share_routes: true"), ["  close_revoked_sessions: true"])
      sharing.proc.child.kill("SIGHUP")
      await sharing.proc.waitFor(/configuration reloaded: 1 token\(s\); sessions already up keep their grants; 1 session\(s\) of removed tokens closed/)
      assert.match(lines(sharing.proc, /was removed; closing the session/)[0]!, /WARN.*token team-b was removed/)
      await sharerB.waitFor(/lost gateway/)
      await sharerB.waitFor(/BadToken/)
      for (let i = 0; i < 6; i++) assert.strictEqual((await get(shared2, "/", { host: "a.example.com" })).body, "a /")
      for (const p of [sharerA, sharerB]) assert.strictEqual(await p.stop("SIGTERM"), 0)
      assert.strictEqual(await sharing.proc.stop("SIGTERM"), 0)
    }), ProcessTestTimeoutMs)

  it.live("switchyard route test: the route, the forwarded path and backends of a URL; no route exits 1", () =>
    Effect.promise(async () => {
      const dir = tempDir()
      const backend = await startBackend("app")
      const controlPort = await freePort()
      const publicPort = await freePort()
      const gateway = await startGateway(dir, controlPort, grant("team-a", TokenA))
      const file = path.join(dir, "client.yaml")
      fs.writeFileSync(file, [
        `server: 127.0.0.1:${controlPort}`,
        `token: ${TokenA}`,
        `expose: 127.0.0.1:${backend}`,
        `port: ${publicPort}`,
        "path: /app",
        "strip_path: true",
        "label: svc"
      ].join("\n") + "\n")
      const { proc: client } = await startClient(file)
      await answers(publicPort, "/app/x")
      const adminFlag = ["--admin", `http://127.0.0.1:${gateway.admin}/`]

      const hit = run(["route", "test", `http://anything.example:${publicPort}/app/x/../y?q=1`, ...adminFlag])
      assert.strictEqual(hit.status, 0, hit.stderr)
      assert.match(hit.stdout, new RegExp(`ROUTE\\s+http :${publicPort} \\*/app \\(prefix stripped\\)`))
      assert.match(hit.stdout, /FORWARDED AS\s+\/y\?q=1/)
      assert.match(hit.stdout, /OWNER\s+token team-a/)
      assert.match(hit.stdout, /VERDICT\s+served by its backend/)
      assert.match(hit.stdout, /BACKEND\s+IN FLIGHT\s+STATE\n-+.*\ns\d+ svc#1\s+0\s+live/)
      // what else a route test says is covered against a live Registry in test/runtime/RouteTest.test.ts
      const miss = run(["route", "test", `http://x:${publicPort}/elsewhere`, ...adminFlag])
      assert.strictEqual(miss.status, 1)
      assert.match(miss.stdout, new RegExp(`VERDICT\\s+no route matches: 404 \\(port ${publicPort} serves http :${publicPort} \\*/app \\(prefix stripped\\)\\)`))
      const unreachable = run(["route", "test", "http://x/", "--admin", "127.0.0.1:1"])
      assert.strictEqual(unreachable.status, 69)
      assert.match(unreachable.stderr, /only the gateway's admin endpoint answers route tests/)
      assert.strictEqual(await client.stop("SIGTERM"), 0)
      assert.strictEqual(await gateway.proc.stop("SIGTERM"), 0)
    }), ProcessTestTimeoutMs)

  it.live("a routes list is checked before dialling: both forms at once, strip_path without a prefix: exit 78 with one line", () =>
    Effect.promise(async () => {
      const dir = tempDir()
      // each check is covered in-process in test/runtime/clientRoutes.test.ts; here, the command's exit and its one line
      const file = path.join(dir, "client.yaml")
      fs.writeFileSync(file, ["server: 127.0.0.1:1", "port: 8000", "routes:", "  - { expose: 127.0.0.1:2, port: 8001 }", "  - { expose: 127.0.0.1:2, port: 8002, path: api }"].join("\n") + "\n")
      const both = run(["client", "--config", file], { SWITCHYARD_TOKEN: TokenA })
      assert.strictEqual(both.status, 78, both.stdout + both.stderr)
      assert.deepStrictEqual((both.stdout + both.stderr).trim().split("\n"), [
        "switchyard client: routes: set either routes or the single-route fields, not both (port is set too: move it into a route)"
      ])
      const single = run(["client", "--server", "127.0.0.1:1", "--expose", "127.0.0.1:2", "--port", "8000", "--strip-path"], { SWITCHYARD_TOKEN: TokenA })
      assert.strictEqual(single.status, 78)
      assert.match(single.stderr, /strip_path: needs a path prefix to strip \(--path, path\)/)
    }), ProcessTestTimeoutMs)
})
