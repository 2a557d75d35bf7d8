import { assert, describe, it } from "@effect/vitest"
import * as http2 from "node:http2"
import * as net from "node:net"
import * as tls from "node:tls"
import { Effect, Exit, Layer, Scope } from "effect"
import { TestClock } from "effect/testing"
import { Dispatcher } from "../../src/services/Dispatcher.ts"
import type { Backend } from "../../src/services/Backend.ts"
import { Forwarder } from "../../src/services/Forwarder.ts"
import { tcpUpstream } from "../../src/services/forward/Upstream.ts"
import { ListenerError, Listeners } from "../../src/services/Listeners.ts"
import { Registry } from "../../src/services/Registry.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import {
  directBackend,
  echoServer,
  freePort,
  makeCertificate,
  request,
  tcpRoundTrip,
  textServer
} from "./ListenersFixtures.ts"

/** Registry + Dispatcher + Listeners forwarding through the shared Forwarder, on loopback. */
const makeGatewayLayer = (maxWaiting?: number) =>
  Layer.unwrap(Effect.gen(function*() {
    const forwarder = yield* Forwarder.make({
      // every request is directed to its leased backend; this default is never used for routed traffic
      upstream: tcpUpstream("127.0.0.1", 9, { maxSockets: 1, maxFreeSockets: 0 }),
      responseTimeoutMs: 0,
      idleTimeoutMs: 0
    })
    return Layer.effect(
      Listeners,
      Listeners.make({ host: "127.0.0.1", forwarder })
    )
  })).pipe(Layer.provideMerge(Dispatcher.layer({ maxWaiting })), Layer.provideMerge(Registry.layer({ gracePeriod: "30 seconds" })))

/** Lets I/O run until `n` requests wait for a backend. */
const untilWaiting = (n: number) =>
  Effect.gen(function*() {
    const dispatcher = yield* Dispatcher
    while (dispatcher.waiting() < n) yield* Effect.promise(() => new Promise((resolve) => setImmediate(resolve)))
  })

for (const engine of [true]) {
  /** Runs `body` with a fresh gateway, then checks that nothing it opened is left. */
  const withGateway = <A, E>(body: Effect.Effect<A, E, Listeners | Registry | Dispatcher | Scope.Scope>, maxWaiting?: number) =>
    Effect.gen(function*() {
      const before = activeHandles()
      const result = yield* body.pipe(Effect.scoped, Effect.provide(makeGatewayLayer(maxWaiting)))
      yield* Effect.promise(() => expectNoLeaks(before))
      return result
    })

  describe(engine ? "Listeners (raw HTTP/1.1 engine)" : "Listeners", () => {
    it.effect("routes one HTTP port by path prefix and domain suffix, 404 otherwise", () =>
      withGateway(Effect.gen(function*() {
        const listeners = yield* Listeners
        const port = yield* Effect.promise(freePort)
        const a = yield* directBackend("a", yield* textServer("From A"))
        const b = yield* directBackend("b", yield* textServer("From B"))
        const c = yield* directBackend("c", yield* textServer("From C"))
        yield* listeners.bind({ _tag: "Http", port, pathPrefix: "/a" }, a)
        yield* listeners.bind({ _tag: "Http", port, pathPrefix: "/b" }, b)
        yield* listeners.bind({ _tag: "Http", port, domainSuffix: "c.test" }, c)
        assert.deepStrictEqual([...listeners.openPorts()], [[port, "http"]])
        const got = yield* Effect.promise(() =>
          Promise.all([
            request(port, "/a"),
            request(port, "/a/x?y=1"),
            request(port, "/b"),
            request(port, "/a", "www.C.test:80"),
            request(port, "/ab")
          ])
        )
        assert.deepStrictEqual(got.map((r) => r.body), ["From A", "From A", "From B", "From C", got[4]!.body])
        assert.strictEqual(got[1]!.headers["x-path"], "/a/x?y=1")
        assert.strictEqual(got[4]!.status, 404)
        assert.match(got[4]!.body, /NoRoute/)
      })))

    it.effect("forwards a route's path prefix, or strips it when the route says so (query kept)", () =>
      withGateway(Effect.gen(function*() {
        const listeners = yield* Listeners
        const port = yield* Effect.promise(freePort)
        const kept = yield* directBackend("kept", yield* textServer("kept"))
        const stripped = yield* directBackend("stripped", yield* textServer("stripped"))
        yield* listeners.bind({ _tag: "Http", port, pathPrefix: "/keep" }, kept)
        yield* listeners.bind({ _tag: "Http", port, pathPrefix: "/app/v1", stripPrefix: true }, stripped)
        const got = yield* Effect.promise(() =>
          Promise.all(["/keep/x", "/app/v1/x/y?q=1", "/app/v1", "/app/v1?q=/app/v1", "/app/v1/../v1/z"].map((p) => request(port, p)))
        )
        assert.deepStrictEqual(got.map((r) => [r.body, r.headers["x-path"]]), [
          ["kept", "/keep/x"],
          ["stripped", "/x/y?q=1"],
          ["stripped", "/"],
          ["stripped", "/?q=/app/v1"],
          ["stripped", "/z"]
        ])
      })))

    it.effect("pipes raw TCP to the backend, half-close included", () =>
      withGateway(Effect.gen(function*() {
        const listeners = yield* Listeners
        const port = yield* Effect.promise(freePort)
        const echo = yield* directBackend("echo", yield* echoServer())
        yield* listeners.bind({ _tag: "Tcp", port }, echo)
        const replies = yield* Effect.promise(() => Promise.all([tcpRoundTrip(port, "hello"), tcpRoundTrip(port, "x".repeat(200_000))]))
        assert.strictEqual(replies[0], "hello")
        assert.strictEqual(replies[1]!.length, 200_000)
      })))

    it.effect("serves two TLS names on one port with their own certificates", () =>
      withGateway(Effect.gen(function*() {
        const listeners = yield* Listeners
        const port = yield* Effect.promise(freePort)
        const certA = makeCertificate("a.test")
        const certB = makeCertificate("b.test")
        const httpA = yield* directBackend("a", yield* textServer("From A"))
        const echoB = yield* directBackend("b", yield* echoServer())
        yield* listeners.bind({ _tag: "Tls", port, domainSuffix: "a.test", ...certA, then: "http" }, httpA)
        yield* listeners.bind({ _tag: "Tls", port, domainSuffix: "b.test", ...certB, then: "tcp" }, echoB)
        const viaA = yield* Effect.promise(() =>
          new Promise<string>((resolve, reject) => {
            const socket = tls.connect({ host: "127.0.0.1", port, servername: "www.a.test", ca: certA.cert, ALPNProtocols: ["http/1.1"] }, () => {
              socket.write("GET /x HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
            })
            const chunks: Array<Buffer> = []
            socket.on("data", (c: Buffer) => chunks.push(c))
            socket.on("end", () => resolve(Buffer.concat(chunks).toString()))
            socket.on("error", reject)
          })
        )
        assert.match(viaA, /^HTTP\/1\.1 200/)
        assert.include(viaA, "From A")
        const viaB = yield* Effect.promise(() =>
          new Promise<string>((resolve, reject) => {
            const socket = tls.connect({ host: "127.0.0.1", port, servername: "b.test", ca: certB.cert }, () => socket.end("ping"))
            const chunks: Array<Buffer> = []
            socket.on("data", (c: Buffer) => chunks.push(c))
            socket.on("end", () => resolve(Buffer.concat(chunks).toString()))
            socket.on("error", reject)
          })
        )
        assert.strictEqual(viaB, "ping")
        // the certificate of the other name does not verify
        const wrong = yield* Effect.promise(() =>
          new Promise<string>((resolve) => {
            const socket = tls.connect({ host: "127.0.0.1", port, servername: "b.test", ca: certA.cert }, () => resolve("connected"))
            socket.on("error", (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message))
          })
        )
        assert.notStrictEqual(wrong, "connected")
        // unknown names get no certificate
        const unknown = yield* Effect.promise(() =>
          new Promise<string>((resolve) => {
            const socket = tls.connect({ host: "127.0.0.1", port, servername: "c.test", rejectUnauthorized: false }, () => resolve("connected"))
            socket.on("error", () => resolve("refused"))
          })
        )
        assert.strictEqual(unknown, "refused")
        // HTTP/2 clients get h2 by ALPN on HTTP routes, forwarded to the HTTP/1.1 backend
        const viaH2 = yield* Effect.promise(() =>
          new Promise<string>((resolve, reject) => {
            const session = http2.connect(`https://127.0.0.1:${port}`, { ca: certA.cert, servername: "www.a.test" })
            session.on("error", reject)
            const stream = session.request({ ":path": "/h2?q=1", ":authority": "www.a.test" })
            let status = 0
            let path = ""
            stream.on("response", (headers) => {
              status = Number(headers[":status"])
              path = String(headers["x-path"])
            })
            const chunks: Array<Buffer> = []
            stream.on("data", (c: Buffer) => chunks.push(c))
            stream.on("end", () => {
              session.close()
              resolve(`${status} ${path} ${Buffer.concat(chunks).toString()} ${(session.socket as tls.TLSSocket).alpnProtocol}`)
            })
            stream.on("error", reject)
            stream.end()
          })
        )
        assert.strictEqual(viaH2, "200 /h2?q=1 From A h2")
        // a host field naming another host than :authority: refused, never routed by one and read by the backend as the other
        const conflicting = yield* Effect.promise(() =>
          new Promise<number>((resolve, reject) => {
            const session = http2.connect(`https://127.0.0.1:${port}`, { ca: certA.cert, servername: "www.a.test" })
            session.on("error", reject)
            const stream = session.request({ ":path": "/h2", ":authority": "www.a.test", host: "www.b.test" })
            let status = 0
            stream.on("response", (headers) => void (status = Number(headers[":status"])))
            stream.resume()
            stream.on("end", () => {
              session.close()
              resolve(status)
            })
            stream.on("error", reject)
            stream.end()
          })
        )
        assert.strictEqual(conflicting, 400)
      })))

    it.effect("keeps the port through the grace period, serves a returning backend, then closes it", () =>
      withGateway(Effect.gen(function*() {
        const listeners = yield* Listeners
        const port = yield* Effect.promise(freePort)
        const first = yield* Scope.make()
        const a = yield* directBackend("a", yield* textServer("old"))
        yield* listeners.bind({ _tag: "Http", port, pathPrefix: "/a" }, a).pipe(Scope.provide(first))
        yield* Scope.close(first, Exit.void)
        // a request now waits for a backend instead of failing
        const pending = request(port, "/a")
        yield* untilWaiting(1)
        yield* TestClock.adjust("10 seconds")
        const second = yield* Scope.make()
        const b = yield* directBackend("b", yield* textServer("new"))
        yield* listeners.bind({ _tag: "Http", port, pathPrefix: "/a" }, b).pipe(Scope.provide(second))
        assert.strictEqual((yield* Effect.promise(() => pending)).body, "new")
        yield* Scope.close(second, Exit.void)
        yield* TestClock.adjust("29 seconds")
        assert.isTrue(listeners.openPorts().has(port))
        const waiting = request(port, "/a/late")
        yield* untilWaiting(1)
        yield* TestClock.adjust("1 second")
        const late = yield* Effect.promise(() => waiting)
        assert.strictEqual(late.status, 503)
        assert.match(late.body, /NoBackend/)
        yield* Effect.yieldNow
        assert.isFalse(listeners.openPorts().has(port))
        const refused = yield* Effect.promise(() => request(port, "/a").then(() => "open", (e: NodeJS.ErrnoException) => e.code))
        assert.strictEqual(refused, "ECONNREFUSED")
      })))

    it.effect("refuses a conflicting kind and a port that is taken, leaving nothing open", () =>
      withGateway(Effect.gen(function*() {
        const listeners = yield* Listeners
        const port = yield* Effect.promise(freePort)
        const a = yield* directBackend("a", yield* textServer("A"))
        yield* listeners.bind({ _tag: "Http", port }, a)
        const conflict = yield* Effect.flip(listeners.bind({ _tag: "Tcp", port }, a))
        assert.instanceOf(conflict, ListenerError)
        assert.strictEqual(conflict.reason, "Conflict")
        const taken = net.createServer()
        const takenPort = yield* Effect.promise(() =>
          new Promise<number>((resolve) => taken.listen(0, "127.0.0.1", () => resolve((taken.address() as net.AddressInfo).port)))
        )
        const failed = yield* Effect.flip(listeners.bind({ _tag: "Tcp", port: takenPort }, a))
        assert.strictEqual(failed.reason, "BindFailed")
        assert.isFalse(listeners.openPorts().has(takenPort))
        yield* Effect.promise(() => new Promise<void>((resolve) => taken.close(() => resolve())))
      })))
  })
}

/** A raw keep-alive client connection that collects what it receives. */
const rawClient = (port: number) => {
  const socket = net.connect({ host: "127.0.0.1", port })
  let received = ""
  socket.setEncoding("latin1")
  socket.on("data", (d: string) => (received += d))
  socket.on("error", () => {})
  const closed = new Promise<void>((resolve) => socket.on("close", () => resolve()))
  return {
    socket,
    closed,
    text: () => received,
    /** Lets I/O run until the received text satisfies `done`. */
    until: (done: (text: string) => boolean) =>
      Effect.gen(function*() {
        while (!done(received)) yield* Effect.promise(() => new Promise((resolve) => setImmediate(resolve)))
        return received
      })
  }
}

const answers = (text: string): number => text.split("HTTP/1.1 200").length - 1

describe("Listeners on the raw HTTP/1.1 engine", () => {
  const withEngine = <A, E>(body: Effect.Effect<A, E, Listeners | Registry | Dispatcher | Scope.Scope>, maxWaiting?: number) =>
    Effect.gen(function*() {
      const before = activeHandles()
      const result = yield* body.pipe(Effect.scoped, Effect.provide(makeGatewayLayer(maxWaiting)))
      yield* Effect.promise(() => expectNoLeaks(before))
      return result
    })

  it.effect("a keep-alive connection's next request waits through the grace period and goes to the returning backend", () =>
    withEngine(Effect.gen(function*() {
      const listeners = yield* Listeners
      const port = yield* Effect.promise(freePort)
      const first = yield* Scope.make()
      const a = yield* directBackend("a", yield* textServer("old"))
      yield* listeners.bind({ _tag: "Http", port }, a).pipe(Scope.provide(first))
      const c = rawClient(port)
      c.socket.write("GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
      yield* c.until((t) => t.includes("old") && t.endsWith("0\r\n\r\n"))
      assert.strictEqual(a.inFlight, 0)
      yield* Scope.close(first, Exit.void)
      c.socket.write("GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
      yield* untilWaiting(1)
      yield* TestClock.adjust("10 seconds")
      assert.strictEqual(answers(c.text()), 1)
      const b = yield* directBackend("b", yield* textServer("new"))
      yield* listeners.bind({ _tag: "Http", port }, b)
      const text = yield* c.until((t) => t.includes("new") && t.endsWith("0\r\n\r\n"))
      assert.strictEqual(answers(text), 2)
      assert.notInclude(text, "Connection: close")
      assert.strictEqual(b.inFlight, 0)
      c.socket.destroy()
      yield* Effect.promise(() => c.closed)
    })))

  it.effect("a client leaving while its request waits gives up its place", () =>
    withEngine(Effect.gen(function*() {
      const listeners = yield* Listeners
      const dispatcher = yield* Dispatcher
      const port = yield* Effect.promise(freePort)
      const first = yield* Scope.make()
      yield* listeners.bind({ _tag: "Http", port }, yield* directBackend("a", yield* textServer("a"))).pipe(Scope.provide(first))
      yield* Scope.close(first, Exit.void)
      const c = rawClient(port)
      c.socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
      yield* untilWaiting(1)
      c.socket.destroy()
      yield* Effect.promise(() => c.closed)
      while (dispatcher.waiting() > 0) yield* Effect.promise(() => new Promise((resolve) => setImmediate(resolve)))
      assert.strictEqual(c.text(), "")
    })))

  it.effect("beyond the dispatcher's wait queue a request is answered 503 at once", () =>
    withEngine(
      Effect.gen(function*() {
        const listeners = yield* Listeners
        const port = yield* Effect.promise(freePort)
        const first = yield* Scope.make()
        yield* listeners.bind({ _tag: "Http", port }, yield* directBackend("a", yield* textServer("a"))).pipe(Scope.provide(first))
        yield* Scope.close(first, Exit.void)
        const waiting = rawClient(port)
        waiting.socket.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield* untilWaiting(1)
        const refused = yield* Effect.promise(() => request(port, "/"))
        assert.strictEqual(refused.status, 503)
        assert.match(refused.body, /QueueFull/)
        waiting.socket.destroy()
        yield* Effect.promise(() => waiting.closed)
      }),
      1
    ))

  it.effect("a backend reached by messages gets each exchange from the engine, request after request", () =>
    withEngine(Effect.gen(function*() {
      const listeners = yield* Listeners
      const port = yield* Effect.promise(freePort)
      const direct = yield* directBackend("own", yield* textServer("unused"))
      let leases = 0
      const own: Backend = {
        ...direct,
        messages: {
          exchange: (front, lease) => {
            leases++
            const chunks: Array<Buffer> = []
            front.readBody((chunk) => {
              chunks.push(Buffer.from(chunk))
              return true
            }, (trailers) => {
              const text = `own ${front.request.path} ${Buffer.concat(chunks).toString("latin1")}${trailers === undefined ? "" : ` ${trailers.join("=")}`}`
              // chunked toward the client: no length given
              front.respond(200, ["x-kind", "message"], false)
              front.write(Buffer.from(text, "latin1"))
              front.end(["x-done", "yes"])
              lease.release()
            })
          },
          upgrade: (_request, _protocol, socket) => void socket.destroy()
        }
      }
      yield* listeners.bind({ _tag: "Http", port }, own)
      const c = rawClient(port)
      c.socket.write("POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
      const first = yield* c.until((t) => t.endsWith("0\r\nx-done: yes\r\n\r\n"))
      assert.match(first, /^HTTP\/1\.1 200 OK\r\n/)
      assert.match(first, /x-kind: message\r\n/)
      assert.match(first, /Transfer-Encoding: chunked\r\n/)
      assert.include(first, "own /first hello")
      c.socket.write("POST /second HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n")
      const text = yield* c.until((t) => t.split("x-done: yes").length === 3)
      assert.include(text, "own /second abcde X-T=1")
      assert.strictEqual(answers(text), 2)
      assert.strictEqual(leases, 2)
      c.socket.destroy()
      yield* Effect.promise(() => c.closed)
    })))
})
