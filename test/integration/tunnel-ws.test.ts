/**
 * Control-port tunnels carried over WebSocket (`ws://…/tunnel`, `wss://`), end to end on loopback:
 * the same routing, balancing, deploy, restart, failure and authentication behaviour as over TCP, many
 * concurrent requests on one WebSocket, the path mounted on another HTTP server, and a CONNECT proxy on
 * the way out. Every test checks that nothing is left open.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as net from "node:net"
import { Context, Effect, Exit, Fiber, Redacted, Scope } from "effect"
import { WebSocket, WebSocketServer } from "ws"
import { allowAll } from "../../src/domain/DestinationRules.ts"
import { makeWspServer } from "../../src/services/front/WspServer.ts"
import { Registry } from "../../src/services/Registry.ts"
import { noLeaks } from "../support/leaks.ts"
import { freePort, makeCertificate, request, tcpRoundTrip } from "../services/ListenersFixtures.ts"
import { serveEcho, serveHttp } from "./tunnelHarness.ts"
import { connectProxy, wsClient, wsGateway } from "./tunnelWsHarness.ts"

/** Sequential requests from `loops` concurrent loops until `stop` resolves; returns every outcome. */
const hammer = (port: number, path: string, loops: number, stop: Promise<void>) => {
  let stopped = false
  void stop.then(() => (stopped = true))
  const outcomes: Array<string> = []
  const loop = async () => {
    for (let i = 0; i < 100_000 && !stopped; i++) {
      outcomes.push(await request(port, path).then((r) => `${r.status} ${r.body}`, (e: Error) => `error ${e.message}`))
    }
  }
  return Promise.all(Array.from({ length: loops }, loop)).then(() => outcomes)
}

describe("tunnels over WebSocket: routing", () => {
  it.live("two services share one public port by path prefix", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const publicPort = yield* Effect.promise(freePort)
      const a = yield* wsClient([gw.url], { label: "A" })
      const b = yield* wsClient([gw.url], { label: "B" })
      yield* serveHttp(a, { _tag: "Http", port: publicPort, pathPrefix: "/a" }, (_req, res) => res.end("From A"))
      yield* serveHttp(b, { _tag: "Http", port: publicPort, pathPrefix: "/b" }, (req, res) => res.end(`From B ${req.headers["x-forwarded-for"]}`))
      const [ra, rb, none] = yield* Effect.promise(() =>
        Promise.all([request(publicPort, "/a/x"), request(publicPort, "/b"), request(publicPort, "/c")])
      )
      assert.strictEqual(ra.body, "From A")
      assert.strictEqual(rb.body, "From B 127.0.0.1")
      assert.strictEqual(none.status, 404)
      assert.strictEqual(gw.control.sessions(), 2)
    })))

  it.live("routes by domain suffix, the longest one first", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const publicPort = yield* Effect.promise(freePort)
      const wide = yield* wsClient([gw.url])
      const narrow = yield* wsClient([gw.url])
      yield* serveHttp(wide, { _tag: "Http", port: publicPort, domainSuffix: "example.test" }, (_req, res) => res.end("wide"))
      yield* serveHttp(narrow, { _tag: "Http", port: publicPort, domainSuffix: "api.example.test" }, (_req, res) => res.end("narrow"))
      const [w, n, other] = yield* Effect.promise(() =>
        Promise.all([
          request(publicPort, "/", "www.example.test"),
          request(publicPort, "/", "v1.api.example.test"),
          request(publicPort, "/", "elsewhere.test")
        ])
      )
      assert.strictEqual(w.body, "wide")
      assert.strictEqual(n.body, "narrow")
      assert.strictEqual(other.status, 404)
    })))

  it.live("load-balances requests across backends of one route", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const publicPort = yield* Effect.promise(freePort)
      const route = { _tag: "Http" as const, port: publicPort, pathPrefix: "/svc" }
      for (const name of ["one", "two"]) {
        const tunnel = yield* wsClient([gw.url], { label: name })
        yield* serveHttp(tunnel, route, (_req, res) => res.end(name))
      }
      const counts: Record<string, number> = {}
      for (let i = 0; i < 20; i++) {
        const r = yield* Effect.promise(() => request(publicPort, "/svc"))
        counts[r.body] = (counts[r.body] ?? 0) + 1
      }
      assert.deepStrictEqual(counts, { one: 10, two: 10 })
    })))

  it.live("raw TCP echo, 1 MB each way", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = yield* wsClient([gw.url])
      yield* serveEcho(tunnel, { _tag: "Tcp", port: publicPort })
      let reply = ""
      for (let i = 0; i < 200 && reply === ""; i++) {
        reply = yield* Effect.promise(() => tcpRoundTrip(publicPort, "hello websocket").catch(() => ""))
        if (reply === "") yield* Effect.sleep("10 millis")
      }
      assert.strictEqual(reply, "hello websocket")
      const big = "0123456789abcdef".repeat(65_536)
      assert.strictEqual(yield* Effect.promise(() => tcpRoundTrip(publicPort, big)), big)
    })))

  it.live("a WebSocket served by the backend passes through the tunnel's WebSocket", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = yield* wsClient([gw.url])
      const server = yield* serveHttp(tunnel, { _tag: "Http", port: publicPort, pathPrefix: "/ws" }, (_req, res) => res.end("not ws"))
      const wss = new WebSocketServer({ noServer: true })
      server.on("upgrade", (req, socket, head) =>
        wss.handleUpgrade(req, socket, head, (ws) => ws.on("message", (data) => ws.send(`echo ${String(data)}`))))
      yield* Effect.addFinalizer(() => Effect.sync(() => wss.close()))
      const reply = yield* Effect.promise(() =>
        new Promise<string>((resolve, reject) => {
          const ws = new WebSocket(`ws://127.0.0.1:${publicPort}/ws/chat`)
          ws.on("open", () => ws.send("hi"))
          ws.on("message", (data) => {
            ws.close()
            resolve(String(data))
          })
          ws.on("error", reject)
        })
      )
      assert.strictEqual(reply, "echo hi")
    })))

  it.live("a public client that stops reading stalls the backend's writes; resuming delivers the whole body", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = yield* wsClient([gw.url])
      const total = 256 * 1024 * 1024
      const slice = Buffer.alloc(64 * 1024, 0x61)
      let written = 0
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (_req, res) => {
        res.writeHead(200, { "content-length": String(total) })
        const pump = () => {
          while (written < total) {
            written += slice.length
            if (!res.write(slice)) return void res.once("drain", pump)
          }
          res.end()
        }
        pump()
      })
      const socket = net.createConnection({ host: "127.0.0.1", port: publicPort })
      yield* Effect.addFinalizer(() => Effect.sync(() => socket.destroy()))
      let received = 0
      socket.on("data", (c: Buffer) => (received += c.length))
      socket.on("error", () => {})
      socket.write(`GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
      yield* Effect.promise(() => new Promise<void>((resolve) => socket.once("data", () => resolve())))
      socket.pause()
      // the backend stops making progress: every buffer on the way is bounded
      let last = -1
      for (let i = 0; i < 200 && last !== written; i++) {
        last = written
        yield* Effect.sleep("100 millis")
      }
      assert.strictEqual(last, written)
      assert.isBelow(written, 64 * 1024 * 1024, `${written} bytes written before the stall`)
      socket.resume()
      yield* Effect.promise(() => new Promise<void>((resolve) => (socket.closed ? resolve() : socket.once("close", () => resolve()))))
      assert.strictEqual(written, total)
      assert.isAbove(received, total)
    })), 60_000)

  it.live("500 concurrent requests share one WebSocket", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = yield* wsClient([gw.url])
      let concurrent = 0
      let peak = 0
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (req, res) => {
        peak = Math.max(peak, ++concurrent)
        setTimeout(() => {
          concurrent--
          res.end(`${req.url} ${"x".repeat(10_000)}`)
        }, 20)
      })
      const replies = yield* Effect.promise(() =>
        Promise.all(Array.from({ length: 500 }, (_, i) => request(publicPort, `/r${i}`)))
      )
      assert.isTrue(replies.every((r, i) => r.status === 200 && r.body === `/r${i} ${"x".repeat(10_000)}`))
      assert.strictEqual(gw.control.sessions(), 1)
      // many in flight at once on the one session, not one at a time
      assert.isAbove(peak, 10)
    })))
})

describe("tunnels over WebSocket: operations", () => {
  it.live("a deploy (start B, stop A) under continuous requests loses nothing", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const publicPort = yield* Effect.promise(freePort)
      const route = { _tag: "Http" as const, port: publicPort, pathPrefix: "/app" }
      const scopeA = yield* Scope.make()
      const tunnelA = yield* wsClient([gw.url], { label: "A" }).pipe(Scope.provide(scopeA))
      yield* serveHttp(tunnelA, route, (_req, res) => setTimeout(() => res.end("A"), 2)).pipe(Scope.provide(scopeA))
      let finish!: () => void
      const stop = new Promise<void>((resolve) => (finish = resolve))
      const traffic = hammer(publicPort, "/app", 4, stop)
      yield* Effect.sleep("100 millis")
      const tunnelB = yield* wsClient([gw.url], { label: "B" })
      yield* serveHttp(tunnelB, route, (_req, res) => setTimeout(() => res.end("B"), 2))
      yield* Effect.sleep("100 millis")
      yield* Scope.close(scopeA, Exit.void)
      yield* Effect.sleep("100 millis")
      finish()
      const outcomes = yield* Effect.promise(() => traffic)
      assert.deepStrictEqual(outcomes.filter((o) => o !== "200 A" && o !== "200 B"), [])
      assert.isTrue(outcomes.includes("200 A") && outcomes.includes("200 B"))
      assert.strictEqual(outcomes.at(-1), "200 B")
    })))

  it.live("a restart within the grace period loses nothing; after it, waiting requests get 503", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway({ registry: { gracePeriod: "2 seconds" } })
      const publicPort = yield* Effect.promise(freePort)
      const route = { _tag: "Http" as const, port: publicPort }
      const first = yield* Scope.make()
      const tunnel1 = yield* wsClient([gw.url]).pipe(Scope.provide(first))
      yield* serveHttp(tunnel1, route, (_req, res) => res.end("v1")).pipe(Scope.provide(first))
      yield* Scope.close(first, Exit.void)
      const during = request(publicPort, "/")
      yield* Effect.sleep("50 millis")
      const second = yield* Scope.make()
      const tunnel2 = yield* wsClient([gw.url]).pipe(Scope.provide(second))
      yield* serveHttp(tunnel2, route, (_req, res) => res.end("v2")).pipe(Scope.provide(second))
      const served = yield* Effect.promise(() => during)
      assert.strictEqual(`${served.status} ${served.body}`, "200 v2")
      yield* Scope.close(second, Exit.void)
      const late = yield* Effect.promise(() => request(publicPort, "/"))
      assert.strictEqual(late.status, 503)
      assert.match(late.body, /NoBackend/)
    })))

  it.live("a backend dying before its response head gives 502; mid-body the response is cut", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = yield* wsClient([gw.url])
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (req, res) => {
        if (req.url === "/before") return void req.socket.destroy()
        res.writeHead(200, { "content-length": "100" })
        res.write("x".repeat(10), () => setTimeout(() => req.socket.destroy(), 20))
      })
      const before = yield* Effect.promise(() => request(publicPort, "/before"))
      assert.strictEqual(before.status, 502)
      const mid = yield* Effect.promise(() =>
        request(publicPort, "/mid").then((r) => `complete ${r.status} ${r.body.length}`, (e: NodeJS.ErrnoException) => `aborted ${e.code ?? e.message}`)
      )
      assert.match(mid, /^aborted/)
    })))

  it.live("the backend's WebSocket cut mid-session: requests in flight fail, the client reconnects and serves again", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const registry = Context.get(gw.context, Registry)
      const proxy = yield* connectProxy()
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = yield* wsClient([gw.url], {}, { proxy: `http://127.0.0.1:${proxy.port}` })
      let hold: http.ServerResponse | undefined
      let arrived!: () => void
      const holding = new Promise<void>((resolve) => (arrived = resolve))
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (req, res) => {
        if (req.url === "/hold") {
          hold = res
          return arrived()
        }
        res.end("alive")
      })
      const held = request(publicPort, "/hold").then((r) => `${r.status}`, (e: Error) => `error ${e.message}`)
      yield* Effect.promise(() => holding)
      // the proxy on the way cuts the WebSocket's TCP connection
      proxy.cut()
      assert.strictEqual(yield* Effect.promise(() => held), "502")
      hold?.destroy()
      while (!tunnel.status()[0]!.connected || registry.snapshot().length === 0) yield* Effect.sleep("10 millis")
      let body = ""
      for (let i = 0; i < 200 && body !== "alive"; i++) {
        body = (yield* Effect.promise(() => request(publicPort, "/"))).body
        if (body !== "alive") yield* Effect.sleep("10 millis")
      }
      assert.strictEqual(body, "alive")
    })))

  it.live("a gateway shutting down stops accepting and lets requests in flight finish over the WebSocket", () =>
    noLeaks(Effect.gen(function*() {
      const gwScope = yield* Scope.make()
      const gw = yield* wsGateway().pipe(Scope.provide(gwScope))
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = yield* wsClient([gw.url])
      let started!: () => void
      const requestArrived = new Promise<void>((resolve) => (started = resolve))
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (_req, res) => {
        started()
        setTimeout(() => res.end("finished"), 200)
      })
      const inFlight = request(publicPort, "/")
      yield* Effect.promise(() => requestArrived)
      const closing = yield* Effect.forkChild(Scope.close(gwScope, Exit.void))
      yield* Effect.sleep("50 millis")
      const refused = yield* Effect.promise(() => request(publicPort, "/").then((r) => `answered ${r.status}`, (e: NodeJS.ErrnoException) => e.code))
      assert.strictEqual(refused, "ECONNREFUSED")
      const finished = yield* Effect.promise(() => inFlight)
      assert.strictEqual(`${finished.status} ${finished.body}`, "200 finished")
      yield* Fiber.join(closing)
      assert.strictEqual(gw.control.sessions(), 0)
    })))

  it.live("a wrong token is refused and registers nothing", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const registry = Context.get(gw.context, Registry)
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = yield* wsClient([gw.url], { token: Redacted.make("wrong") })
      const rejected: Array<string> = []
      yield* tunnel.addListener({
        route: { _tag: "Http", port: publicPort },
        onConnection: ({ socket }) => socket.destroy(),
        onRejected: (_g, reason) => rejected.push(reason),
        onBound: () => rejected.push("bound")
      })
      while (tunnel.status()[0]!.lastError === undefined) yield* Effect.sleep("10 millis")
      assert.match(tunnel.status()[0]!.lastError!, /BadToken/)
      assert.isFalse(tunnel.status()[0]!.connected)
      assert.strictEqual(registry.snapshot().length, 0)
      assert.notInclude(rejected, "bound")
      assert.strictEqual(gw.control.sessions(), 0)
    })))

  it.live("a wrong path answers 404 and the client keeps retrying with the reason", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const wrong = gw.url.replace("/tunnel", "/elsewhere")
      const tunnel = yield* wsClient([wrong])
      while (tunnel.status()[0]!.attempts < 2) yield* Effect.sleep("10 millis")
      assert.match(tunnel.status()[0]!.lastError!, /404/)
      const plain = yield* Effect.promise(() => request(gw.control.webSocketAddress!.port!, "/tunnel"))
      assert.strictEqual(plain.status, 404)
    })))
})

describe("tunnels over WebSocket: TLS, proxies, mounting", () => {
  it.live("wss:// with the gateway's certificate verified by the client, also inside a CONNECT tunnel", () =>
    noLeaks(Effect.gen(function*() {
      const cert = makeCertificate("localhost")
      const gw = yield* wsGateway({}, { tls: cert })
      const url = gw.url.replace("127.0.0.1", "localhost")
      const publicPort = yield* Effect.promise(freePort)
      const untrusted = yield* wsClient([url])
      while (untrusted.status()[0]!.lastError === undefined) yield* Effect.sleep("10 millis")
      assert.match(untrusted.status()[0]!.lastError!, /certificate/i)
      assert.isFalse(untrusted.status()[0]!.connected)
      const direct = yield* wsClient([url], {}, { ca: cert.cert })
      yield* serveHttp(direct, { _tag: "Http", port: publicPort, pathPrefix: "/direct" }, (_req, res) => res.end("over wss"))
      const proxy = yield* connectProxy()
      const proxied = yield* wsClient([url], {}, { ca: cert.cert, proxy: `http://127.0.0.1:${proxy.port}` })
      yield* serveHttp(proxied, { _tag: "Http", port: publicPort, pathPrefix: "/proxied" }, (_req, res) => res.end("over wss via proxy"))
      assert.strictEqual((yield* Effect.promise(() => request(publicPort, "/direct"))).body, "over wss")
      assert.strictEqual((yield* Effect.promise(() => request(publicPort, "/proxied"))).body, "over wss via proxy")
      assert.strictEqual(proxy.tunnels(), 1)
    })))

  it.live("through an HTTP CONNECT proxy with credentials from the proxy URL; wrong credentials are a 407", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const proxy = yield* connectProxy("alice:s3cret/+")
      const publicPort = yield* Effect.promise(freePort)
      const refused = yield* wsClient([gw.url], {}, { proxy: `http://alice:wrong@127.0.0.1:${proxy.port}` })
      while (refused.status()[0]!.lastError === undefined) yield* Effect.sleep("10 millis")
      assert.match(refused.status()[0]!.lastError!, /407/)
      // the cause and what to do, without the credentials
      assert.match(refused.status()[0]!.lastError!, /the HTTP proxy wants credentials: put them in HTTPS_PROXY\/HTTP_PROXY/)
      assert.notInclude(refused.status()[0]!.lastError!, "wrong")
      assert.strictEqual(refused.status()[0]!.state, "retrying")
      assert.isAbove(proxy.refusals(), 0)
      const tunnel = yield* wsClient([gw.url], {}, { proxy: `http://alice:${encodeURIComponent("s3cret/+")}@127.0.0.1:${proxy.port}` })
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (_req, res) => res.end("via proxy"))
      const replies = yield* Effect.promise(() => Promise.all(Array.from({ length: 20 }, () => request(publicPort, "/"))))
      assert.isTrue(replies.every((r) => r.body === "via proxy"))
      assert.strictEqual(proxy.tunnels(), 1)
    })))

  it.live("the proxy comes from HTTP_PROXY unless NO_PROXY covers the gateway", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const proxy = yield* connectProxy()
      const publicPort = yield* Effect.promise(freePort)
      const saved = { http: process.env["HTTP_PROXY"], no: process.env["NO_PROXY"] }
      yield* Effect.addFinalizer(() =>
        Effect.sync(() => {
          if (saved.http === undefined) delete process.env["HTTP_PROXY"]
          else process.env["HTTP_PROXY"] = saved.http
          if (saved.no === undefined) delete process.env["NO_PROXY"]
          else process.env["NO_PROXY"] = saved.no
        })
      )
      process.env["HTTP_PROXY"] = `http://127.0.0.1:${proxy.port}`
      process.env["NO_PROXY"] = "example.internal"
      const viaEnv = yield* wsClient([gw.url], {}, { proxy: undefined })
      yield* serveHttp(viaEnv, { _tag: "Http", port: publicPort, pathPrefix: "/env" }, (_req, res) => res.end("env"))
      assert.strictEqual(proxy.tunnels(), 1)
      process.env["NO_PROXY"] = "127.0.0.1"
      const direct = yield* wsClient([gw.url], {}, { proxy: undefined })
      yield* serveHttp(direct, { _tag: "Http", port: publicPort, pathPrefix: "/direct" }, (_req, res) => res.end("direct"))
      assert.strictEqual(proxy.tunnels(), 1)
      assert.strictEqual((yield* Effect.promise(() => request(publicPort, "/direct"))).body, "direct")
    })))

  it.live("the /tunnel path shares the wsp server's port; wsp's own paths are unchanged", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway({}, { listen: false })
      const wsp = yield* makeWspServer({
        host: "127.0.0.1",
        port: 0,
        timeout: 5000,
        idleTimeout: 60_000,
        secretKey: Redacted.make("wsp-secret"),
        rules: allowAll,
        requestKey: undefined,
        maxMessageSize: 1024 * 1024,
        maxHeaders: 100,
        maxConcurrentRequests: 100,
        maxConnectionsPerPool: 10,
        maxPools: 10,
        pingInterval: 30_000,
        responseTimeout: 60_000,
        openRegistration: false
      }, { upgrade: gw.control.handleUpgrade })
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = yield* wsClient([`ws://127.0.0.1:${wsp.address.port}/tunnel`])
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (_req, res) => res.end("beside wsp"))
      assert.strictEqual((yield* Effect.promise(() => request(publicPort, "/"))).body, "beside wsp")
      assert.strictEqual((yield* Effect.promise(() => request(wsp.address.port, "/status"))).body, "ok")
      const other = yield* Effect.promise(() =>
        new Promise<string>((resolve) => {
          const ws = new WebSocket(`ws://127.0.0.1:${wsp.address.port}/elsewhere`)
          ws.on("unexpected-response", (_req, res) => resolve(String(res.statusCode)))
          ws.on("error", () => {})
        })
      )
      assert.strictEqual(other, "404")
    })))

  it.live("the /tunnel path mounted on another HTTP server's port", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway({}, { listen: false })
      assert.isUndefined(gw.control.webSocketAddress)
      const server = http.createServer((_req, res) => res.end("the other server"))
      server.on("upgrade", (req, socket, head) => {
        if (!gw.control.handleUpgrade(req, socket, head)) socket.destroy()
      })
      const port = yield* Effect.acquireRelease(
        Effect.promise(() => new Promise<number>((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as { port: number }).port)))),
        () => Effect.promise(() => new Promise<void>((resolve) => {
          server.closeAllConnections()
          server.close(() => resolve())
        }))
      )
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = yield* wsClient([`ws://127.0.0.1:${port}/tunnel`])
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (_req, res) => res.end("mounted"))
      assert.strictEqual((yield* Effect.promise(() => request(publicPort, "/"))).body, "mounted")
      assert.strictEqual((yield* Effect.promise(() => request(port, "/"))).body, "the other server")
    })))
})

