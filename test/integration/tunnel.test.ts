import { assert, describe, it } from "@effect/vitest"
import { fork } from "node:child_process"
import * as http from "node:http"
import * as https from "node:https"
import * as crypto from "node:crypto"
import * as net from "node:net"
import * as tls from "node:tls"
import { Context, Effect, Exit, Fiber, Redacted, Scope } from "effect"
import { WebSocket, WebSocketServer } from "ws"
import { Registry } from "../../src/services/Registry.ts"
import { describeTarget, TunnelClient } from "../../src/services/client/TunnelClient.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { noLeaks } from "../support/leaks.ts"
import { freePort, makeCertificate, request, tcpRoundTrip } from "../services/ListenersFixtures.ts"
import { client, gateway, grants, serveEcho, serveHttp, token } from "./tunnelHarness.ts"

describe("control-port tunnels", () => {
  it.live("two services share one public port by path prefix", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway()
      const control = Context.get(gw, ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const tunnelA = Context.get(yield* client([control.address.port!], { label: "A" }), TunnelClient)
      const tunnelB = Context.get(yield* client([control.address.port!], { label: "B" }), TunnelClient)
      yield* serveHttp(tunnelA, { _tag: "Http", port: publicPort, pathPrefix: "/a" }, (_req, res) => res.end("From A"))
      yield* serveHttp(tunnelB, { _tag: "Http", port: publicPort, pathPrefix: "/b" }, (req, res) =>
        res.end(`From B ${req.headers["x-forwarded-for"]}`))
      const [a, b, none] = yield* Effect.promise(() =>
        Promise.all([request(publicPort, "/a/x"), request(publicPort, "/b"), request(publicPort, "/c")])
      )
      assert.strictEqual(a.body, "From A")
      assert.strictEqual(b.body, "From B 127.0.0.1")
      assert.strictEqual(none.status, 404)
    })))

  it.live("raw TCP echo through the tunnel", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway()
      const control = Context.get(gw, ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
      yield* serveEcho(tunnel, { _tag: "Tcp", port: publicPort })
      // the listener binds asynchronously: wait for the port to answer
      let reply = ""
      for (let i = 0; i < 200 && reply === ""; i++) {
        reply = yield* Effect.promise(() => tcpRoundTrip(publicPort, "hello tunnel").catch(() => ""))
        if (reply === "") yield* Effect.sleep("10 millis")
      }
      assert.strictEqual(reply, "hello tunnel")
      const big = yield* Effect.promise(() => tcpRoundTrip(publicPort, "z".repeat(1_000_000)))
      assert.strictEqual(big.length, 1_000_000)
    })))
})

/** Sequential requests from `loops` concurrent loops until `stop` resolves; returns every outcome. */
const hammer = (port: number, path: string, loops: number, stop: Promise<void>) => {
  let stopped = false
  void stop.then(() => (stopped = true))
  const outcomes: Array<string> = []
  const loop = async () => {
    for (let i = 0; i < 100_000 && !stopped; i++) {
      const r = await request(port, path).then((r) => `${r.status} ${r.body}`, (e: Error) => `error ${e.message}`)
      outcomes.push(r)
    }
  }
  return Promise.all(Array.from({ length: loops }, loop)).then(() => outcomes)
}

describe("control-port tunnels: operations", () => {
  it.live("load-balances requests across backends of one route", () =>
    noLeaks(Effect.gen(function*() {
      const control = Context.get(yield* gateway(), ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const route = { _tag: "Http" as const, port: publicPort, pathPrefix: "/svc" }
      for (const name of ["one", "two"]) {
        const tunnel = Context.get(yield* client([control.address.port!], { label: name }), TunnelClient)
        yield* serveHttp(tunnel, route, (_req, res) => res.end(name))
      }
      const counts: Record<string, number> = {}
      for (let i = 0; i < 20; i++) {
        const r = yield* Effect.promise(() => request(publicPort, "/svc"))
        counts[r.body] = (counts[r.body] ?? 0) + 1
      }
      assert.deepStrictEqual(counts, { one: 10, two: 10 })
    })))

  it.live("a deploy (start B, stop A) under continuous requests loses nothing", () =>
    noLeaks(Effect.gen(function*() {
      const control = Context.get(yield* gateway(), ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const route = { _tag: "Http" as const, port: publicPort, pathPrefix: "/app" }
      const scopeA = yield* Scope.make()
      const tunnelA = Context.get(yield* client([control.address.port!], { label: "A" }).pipe(Scope.provide(scopeA)), TunnelClient)
      yield* serveHttp(tunnelA, route, (_req, res) => setTimeout(() => res.end("A"), 2)).pipe(Scope.provide(scopeA))
      let finish!: () => void
      const stop = new Promise<void>((resolve) => (finish = resolve))
      const traffic = hammer(publicPort, "/app", 4, stop)
      yield* Effect.sleep("100 millis")
      const tunnelB = Context.get(yield* client([control.address.port!], { label: "B" }), TunnelClient)
      yield* serveHttp(tunnelB, route, (_req, res) => setTimeout(() => res.end("B"), 2))
      yield* Effect.sleep("100 millis")
      yield* Scope.close(scopeA, Exit.void)
      yield* Effect.sleep("100 millis")
      finish()
      const outcomes = yield* Effect.promise(() => traffic)
      const failures = outcomes.filter((o) => o !== "200 A" && o !== "200 B")
      assert.deepStrictEqual(failures, [])
      assert.isTrue(outcomes.includes("200 A") && outcomes.includes("200 B"))
      assert.strictEqual(outcomes.at(-1), "200 B")
    })))

  it.live("a restart within the grace period loses nothing; after it, waiting requests get 503", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway({ registry: { gracePeriod: "2 seconds" } })
      const control = Context.get(gw, ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const route = { _tag: "Http" as const, port: publicPort }
      const first = yield* Scope.make()
      const tunnel1 = Context.get(yield* client([control.address.port!]).pipe(Scope.provide(first)), TunnelClient)
      yield* serveHttp(tunnel1, route, (_req, res) => res.end("v1")).pipe(Scope.provide(first))
      yield* Scope.close(first, Exit.void)
      // down: this request waits for the next backend
      const during = request(publicPort, "/")
      yield* Effect.sleep("50 millis")
      const second = yield* Scope.make()
      const tunnel2 = Context.get(yield* client([control.address.port!]).pipe(Scope.provide(second)), TunnelClient)
      yield* serveHttp(tunnel2, route, (_req, res) => res.end("v2")).pipe(Scope.provide(second))
      const served = yield* Effect.promise(() => during)
      assert.strictEqual(`${served.status} ${served.body}`, "200 v2")
      yield* Scope.close(second, Exit.void)
      const late = yield* Effect.promise(() => request(publicPort, "/"))
      assert.strictEqual(late.status, 503)
      assert.match(late.body, /NoBackend/)
    })))

  it.live("a backend dying before its response head gives 502; mid-body the response is cut, never a short 200", () =>
    noLeaks(Effect.gen(function*() {
      const control = Context.get(yield* gateway(), ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
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

  it.live("a wrong token is refused and registers nothing", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway()
      const control = Context.get(gw, ControlPort)
      const registry = Context.get(gw, Registry)
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = Context.get(yield* client([control.address.port!], { token: Redacted.make("wrong") }), TunnelClient)
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
      assert.strictEqual(control.sessions(), 0)
    })))

  it.live("handshake garbage is closed without disturbing the gateway", () =>
    noLeaks(Effect.gen(function*() {
      const control = Context.get(yield* gateway(), ControlPort)
      const closed = yield* Effect.promise(() =>
        new Promise<string>((resolve) => {
          const socket = net.createConnection({ host: "127.0.0.1", port: control.address.port! }, () =>
            socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
          const chunks: Array<Buffer> = []
          socket.on("data", (c: Buffer) => chunks.push(c))
          socket.on("close", () => resolve(Buffer.concat(chunks).toString()))
          socket.on("error", () => {})
        })
      )
      assert.strictEqual(closed, "")
      const bad = yield* Effect.promise(() =>
        new Promise<string>((resolve) => {
          const socket = net.createConnection({ host: "127.0.0.1", port: control.address.port! }, () => {
            const body = Buffer.from('{"_tag":"Hello","version":1,"token":"x","listeners":[{"_tag":"Http","port":0}]}')
            const head = Buffer.alloc(4)
            head.writeUInt32BE(body.length)
            socket.write(Buffer.concat([head, body]))
          })
          const chunks: Array<Buffer> = []
          socket.on("data", (c: Buffer) => chunks.push(c))
          socket.on("close", () => resolve(Buffer.concat(chunks).subarray(4).toString()))
          socket.on("error", () => {})
        })
      )
      assert.match(bad, /"_tag":"Rejected","reason":"Malformed"/)
      // the control port still serves a good client
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (_req, res) => res.end("fine"))
      assert.strictEqual((yield* Effect.promise(() => request(publicPort, "/"))).body, "fine")
    })))

  it.live("WebSocket upgrades pass through the tunnel", () =>
    noLeaks(Effect.gen(function*() {
      const control = Context.get(yield* gateway(), ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
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

  it.live("TLS: two names on one public port, certificates verified by the client", () =>
    noLeaks(Effect.gen(function*() {
      const control = Context.get(yield* gateway(), ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const certA = makeCertificate("a.test")
      const certB = makeCertificate("b.test")
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
      yield* serveHttp(tunnel, { _tag: "Tls", port: publicPort, domainSuffix: "a.test", ...certA, then: "http" }, (req, res) =>
        res.end(`A ${req.headers["x-forwarded-proto"]}`))
      yield* serveEcho(tunnel, { _tag: "Tls", port: publicPort, domainSuffix: "b.test", ...certB, then: "tcp" })
      const viaA = yield* Effect.promise(() =>
        new Promise<string>((resolve, reject) => {
          const req = https.request({ host: "127.0.0.1", port: publicPort, servername: "a.test", ca: certA.cert, headers: { host: "a.test" }, agent: false, path: "/" }, (res) => {
            const chunks: Array<Buffer> = []
            res.on("data", (c: Buffer) => chunks.push(c))
            res.on("end", () => resolve(Buffer.concat(chunks).toString()))
          })
          req.on("error", reject)
          req.end()
        })
      )
      assert.strictEqual(viaA, "A https")
      let viaB = ""
      for (let i = 0; i < 200 && viaB === ""; i++) {
        viaB = yield* Effect.promise(() =>
          new Promise<string>((resolve) => {
            const socket = tls.connect({ host: "127.0.0.1", port: publicPort, servername: "b.test", ca: certB.cert }, () => socket.end("over tls"))
            const chunks: Array<Buffer> = []
            socket.on("data", (c: Buffer) => chunks.push(c))
            socket.on("end", () => resolve(Buffer.concat(chunks).toString()))
            socket.on("error", () => resolve(""))
          })
        )
        if (viaB === "") yield* Effect.sleep("10 millis")
      }
      assert.strictEqual(viaB, "over tls")
    })))

  it.live("TLS on the control port: a client that trusts its certificate tunnels through it, one that does not is never connected", () =>
    noLeaks(Effect.gen(function*() {
      const cert = makeCertificate("gateway.test")
      const control = Context.get(yield* gateway({ control: { address: { host: "127.0.0.1", port: 0 }, tokens: grants, tls: cert } }), ControlPort)
      const port = control.address.port!
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = Context.get(
        yield* client([], { servers: [{ host: "127.0.0.1", port, tls: { ca: cert.cert, servername: "gateway.test" } }] }),
        TunnelClient
      )
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort, pathPrefix: "/" }, (_req, res) => res.end("through a TLS control port"))
      assert.strictEqual((yield* Effect.promise(() => request(publicPort, "/"))).body, "through a TLS control port")
      assert.strictEqual(describeTarget(tunnel.status()[0]!.address), `tls://127.0.0.1:${port}`)
      // a client that does not trust the certificate keeps failing to connect, with the reason
      const untrusted = Context.get(yield* client([], { servers: [{ host: "127.0.0.1", port, tls: { servername: "gateway.test" } }] }), TunnelClient)
      for (let i = 0; i < 200 && untrusted.status()[0]!.lastError === undefined; i++) yield* Effect.sleep("10 millis")
      assert.isFalse(untrusted.status()[0]!.connected)
      assert.match(untrusted.status()[0]!.lastError ?? "", /self-signed certificate/)
      // a plain-TCP client speaking the control protocol gets no answer, and the gateway keeps serving
      const plain = yield* Effect.promise(() =>
        new Promise<string>((resolve) => {
          const socket = net.createConnection({ host: "127.0.0.1", port }, () => {
            const body = Buffer.from(`{"_tag":"Hello","version":1,"token":"${token}","listeners":[]}`)
            const head = Buffer.alloc(4)
            head.writeUInt32BE(body.length)
            socket.write(Buffer.concat([head, body]))
          })
          const chunks: Array<Buffer> = []
          socket.on("data", (c: Buffer) => chunks.push(c))
          socket.on("close", () => resolve(Buffer.concat(chunks).toString("latin1")))
          socket.on("error", () => {})
        })
      )
      assert.notInclude(plain, "Welcome")
      assert.strictEqual(control.sessions(), 1)
      assert.strictEqual((yield* Effect.promise(() => request(publicPort, "/"))).body, "through a TLS control port")
    })))

  it.live("TLS: a backend deployed with a renewed certificate serves it at once, beside the backend it replaces", () =>
    noLeaks(Effect.gen(function*() {
      const control = Context.get(yield* gateway(), ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const old = makeCertificate("app.test")
      const renewed = makeCertificate("app.test")
      const route = (cert: { cert: string; key: string }) => ({ _tag: "Tls" as const, port: publicPort, domainSuffix: "app.test", ...cert, then: "http" as const })
      /** The certificate the gateway presents, as its PEM-decoded fingerprint. */
      const presented = () =>
        Effect.promise(() =>
          new Promise<string>((resolve, reject) => {
            const socket = tls.connect({ host: "127.0.0.1", port: publicPort, servername: "app.test", rejectUnauthorized: false }, () => {
              resolve(socket.getPeerX509Certificate()?.fingerprint256 ?? "")
              socket.end()
            })
            socket.on("error", reject)
          })
        )
      const fingerprint = (pem: string) => new crypto.X509Certificate(pem).fingerprint256
      const first = Context.get(yield* client([control.address.port!], { label: "old" }), TunnelClient)
      yield* serveHttp(first, route(old), (_req, res) => res.end("old"))
      assert.strictEqual(yield* presented(), fingerprint(old.cert))
      const second = Context.get(yield* client([control.address.port!], { label: "new" }), TunnelClient)
      yield* serveHttp(second, route(renewed), (_req, res) => res.end("new"))
      assert.strictEqual(yield* presented(), fingerprint(renewed.cert), "the renewed certificate while both backends are live")
    })))

  it.live("1,000 backends connected at once", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway()
      const control = Context.get(gw, ControlPort)
      const registry = Context.get(gw, Registry)
      const publicPort = yield* Effect.promise(freePort)
      const count = 1_000
      // one client object holding 1,000 control connections to the same gateway
      const tunnel = Context.get(
        yield* client(Array.from({ length: count }, () => control.address.port!), { yamux: { enableKeepAlive: false } }),
        TunnelClient
      )
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (_req, res) => res.end("ok"))
      assert.strictEqual(control.sessions(), count)
      assert.strictEqual(registry.snapshot()[0]!.backends.length, count)
      const replies = yield* Effect.promise(() => Promise.all(Array.from({ length: 50 }, () => request(publicPort, "/"))))
      assert.isTrue(replies.every((r) => r.body === "ok"))
    })), 120_000)
})

describe("control-port tunnels: several gateways", () => {
  it.live("one client serves through two gateways; losing one leaves the other serving", () =>
    noLeaks(Effect.gen(function*() {
      // two gateways on two loopback addresses, as two machines would be
      const gw1Scope = yield* Scope.make()
      const gw1 = Context.get(yield* gateway({ publicHost: "127.0.0.1" }).pipe(Scope.provide(gw1Scope)), ControlPort)
      const gw2 = Context.get(yield* gateway({ publicHost: "127.0.0.2" }), ControlPort)
      const port = yield* Effect.promise(freePort)
      const tunnel = Context.get(yield* client([gw1.address.port!, gw2.address.port!]), TunnelClient)
      yield* serveHttp(tunnel, { _tag: "Http", port }, (req, res) => res.end(`served for ${req.headers.host}`))
      assert.strictEqual(tunnel.status().filter((s) => s.connected).length, 2)
      assert.strictEqual((yield* Effect.promise(() => request(port, "/", "one", "127.0.0.1"))).body, "served for one")
      assert.strictEqual((yield* Effect.promise(() => request(port, "/", "two", "127.0.0.2"))).body, "served for two")
      yield* Scope.close(gw1Scope, Exit.void)
      while (tunnel.status()[0]!.connected) yield* Effect.sleep("5 millis")
      assert.isTrue(tunnel.status()[1]!.connected)
      assert.strictEqual((yield* Effect.promise(() => request(port, "/", "two", "127.0.0.2"))).body, "served for two")
    })))
})

describe("control-port tunnels: a backend process killed", () => {
  it.live("requests in flight fail (502 before the head, cut after it) and the route empties", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway({ registry: { gracePeriod: "1 second" } })
      const control = Context.get(gw, ControlPort)
      const registry = Context.get(gw, Registry)
      const publicPort = yield* Effect.promise(freePort)
      const child = yield* Effect.acquireRelease(
        Effect.sync(() =>
          fork(new URL("./tunnelBackendProcess.ts", import.meta.url).pathname, [String(control.address.port), String(publicPort)], {
            stdio: ["ignore", "pipe", "inherit", "ipc"]
          })
        ),
        (child) => Effect.sync(() => void (child.exitCode === null && child.kill("SIGKILL")))
      )
      yield* Effect.promise(() => new Promise<void>((resolve) => child.stdout!.once("data", () => resolve())))
      const hanging = request(publicPort, "/hang").then((r) => `complete ${r.status}`, (e: Error) => `error ${e.message}`)
      const cut = new Promise<string>((resolve) => {
        const req = http.get({ host: "127.0.0.1", port: publicPort, path: "/slow", agent: false }, (res) => {
          let received = 0
          res.on("data", (c: Buffer) => {
            received += c.length
            if (received >= 500) child.kill("SIGKILL")
          })
          res.on("end", () => resolve(`complete ${res.statusCode} ${received}`))
          res.on("error", (e) => resolve(`cut ${res.statusCode} ${received} ${e.message}`))
          res.on("aborted", () => resolve(`cut ${res.statusCode} ${received}`))
        })
        req.on("error", (e) => resolve(`error ${e.message}`))
      })
      const [slow, hang] = yield* Effect.promise(() => Promise.all([cut, hanging]))
      assert.match(slow, /^cut 200 500/)
      assert.strictEqual(hang, "complete 502")
      while ((registry.snapshot()[0]?.backends.length ?? 0) > 0) yield* Effect.sleep("5 millis")
      assert.strictEqual(control.sessions(), 0)
    })))
})

describe("control-port tunnels: gateway shutdown", () => {
  it.live("a gateway shutting down stops accepting and lets requests in flight finish", () =>
    noLeaks(Effect.gen(function*() {
      const gwScope = yield* Scope.make()
      const control = Context.get(yield* gateway().pipe(Scope.provide(gwScope)), ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
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
    })))
})
