import { assert, describe, it } from "@effect/vitest"
import * as http2 from "node:http2"
import * as net from "node:net"
import { Context, Effect, Exit, Fiber, Layer, Scope } from "effect"
import * as Redacted from "effect/Redacted"
import { TestClock } from "effect/testing"
import { encodeHello, makeHello } from "../../../src/domain/ControlMessage.ts"
import { Dispatcher } from "../../../src/services/Dispatcher.ts"
import { Forwarder } from "../../../src/services/Forwarder.ts"
import { tcpUpstream } from "../../../src/services/forward/Upstream.ts"
import { Listeners } from "../../../src/services/Listeners.ts"
import { Registry } from "../../../src/services/Registry.ts"
import { ReverseH2, ReverseH2Error } from "../../../src/services/front/ReverseH2.ts"
import { serveReverseHttp2 } from "../../../src/runtime/serveReverseHttp2.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"
import { closeServer, dialBackend, freePort, gatewayLayer, type Reply, request, until, withGateway } from "../../integration/reverse-h2-harness.ts"
import { makeCertificate } from "../ListenersFixtures.ts"

/** An empty SETTINGS frame: the least a server must send to count as speaking HTTP/2. */
const EMPTY_SETTINGS = Buffer.from([0, 0, 0, 4, 0, 0, 0, 0, 0])
/** A SETTINGS acknowledgement (flag 0x1). */
const SETTINGS_ACK = Buffer.from([0, 0, 0, 4, 1, 0, 0, 0, 0])

/** A raw peer on the tunnel port that writes `bytes` once connected and never answers anything. */
const rawPeer = (port: number, bytes: Buffer | undefined) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ socket: net.Socket; closed: Promise<void> }>((resolve) => {
        const socket = net.connect(port, "127.0.0.1", () => {
          if (bytes !== undefined) socket.write(bytes)
          resolve({ socket, closed })
        })
        socket.on("error", () => {})
        socket.resume()
        const closed = new Promise<void>((done) => socket.once("close", () => done()))
      })
    ),
    ({ socket }) => Effect.sync(() => socket.destroy())
  )

describe("ReverseH2", () => {
  it("the authenticated preamble is the control port's framed Hello (golden from docs/PROTOCOL.md)", () => {
    const bytes = Buffer.from(encodeHello(makeHello(Redacted.make("s3cret"), [{ _tag: "Http", port: 8080 }])))
    assert.strictEqual(bytes.subarray(0, 4).toString("hex"), "00000057")
    assert.strictEqual(bytes.subarray(4).toString(), '{"_tag":"Hello","version":1,"token":"s3cret","listeners":[{"_tag":"Http","port":8080}]}')
  })

  it.effect("a connection that stops answering PINGs is dropped after the timeout; a healthy one stays", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }], pingInterval: "15 seconds", pingTimeout: "5 seconds" }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        let pings = 0
        const healthy = http2.createServer((_req, res) => res.end("healthy"))
        healthy.on("session", (session) => session.on("ping", () => void pings++))
        yield* closeServer(healthy)
        yield* dialBackend(gateway.address.port, healthy)
        const silent = yield* rawPeer(gateway.address.port, Buffer.concat([EMPTY_SETTINGS, SETTINGS_ACK]))
        yield* until(() => gateway.connections() === 2, "both connections")
        yield* TestClock.adjust("15 seconds")
        yield* until(() => pings === 1, "the healthy backend to be pinged")
        // give the answer time to come back before virtual time moves on
        yield* Effect.promise(() => new Promise((resolve) => setTimeout(resolve, 50)))
        yield* TestClock.adjust("5 seconds")
        yield* Effect.promise(() => silent.closed)
        yield* until(() => gateway.connections() === 1, "the silent connection to be pruned")
        assert.strictEqual(gateway.recentFailures().at(-1)?.reason, "PingTimeout")
        const reply = yield* Effect.promise(() => request(port, "/"))
        assert.strictEqual(reply.body, "healthy")
      }))
    }))

  it.effect("a peer that sends no HTTP/2 SETTINGS (plain) or no preamble (authenticated) is closed after the handshake timeout", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }], handshakeTimeout: "10 seconds" }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const quiet = yield* rawPeer(gateway.address.port, undefined)
        yield* TestClock.adjust("10 seconds")
        yield* Effect.promise(() => quiet.closed)
        yield* until(() => gateway.recentFailures().length === 1, "the failure")
        assert.strictEqual(gateway.recentFailures()[0]!.reason, "HandshakeTimeout")
        assert.isFalse((yield* Listeners).openPorts().has(port))
        // SETTINGS sent, the gateway's never acknowledged: not serving either
        const unacknowledging = yield* rawPeer(gateway.address.port, EMPTY_SETTINGS)
        yield* TestClock.adjust("9 seconds")
        assert.strictEqual(gateway.connections(), 0)
        yield* TestClock.adjust("1 second")
        yield* Effect.promise(() => unacknowledging.closed)
        yield* until(() => gateway.recentFailures().length === 2, "the second failure")
        assert.strictEqual(gateway.recentFailures()[1]!.reason, "HandshakeTimeout")
        assert.match(gateway.recentFailures()[1]!.message, /did not acknowledge the gateway's HTTP\/2 SETTINGS within 10s/)
        assert.isFalse((yield* Listeners).openPorts().has(port))
      }))
      yield* withGateway({ tokens: [{ name: "t", token: Redacted.make("s"), ports: [port] }], handshakeTimeout: "10 seconds" }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const quiet = yield* rawPeer(gateway.address.port, undefined)
        yield* TestClock.adjust("10 seconds")
        yield* Effect.promise(() => quiet.closed)
        yield* until(() => gateway.recentFailures().length === 1, "the failure")
        assert.strictEqual(gateway.recentFailures()[0]!.reason, "HandshakeTimeout")
      }))
    }))

  it.live("failed tokens from one address are answered later and later, then the address is refused unread", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      const tokens = [{ name: "t", token: Redacted.make("s"), ports: [port] }]
      yield* withGateway({ tokens, authThrottle: { freeFailures: 1, baseDelayMs: 200, refuseAfter: 3 } }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const wrong = Buffer.from(encodeHello(makeHello(Redacted.make("wrong"), [{ _tag: "Http", port }])))
        const guess = Effect.scoped(Effect.gen(function*() {
          const started = Date.now()
          const peer = yield* rawPeer(gateway.address.port, wrong)
          yield* Effect.promise(() => peer.closed)
          return Date.now() - started
        }))
        yield* guess
        assert.isAtLeast(yield* guess, 200)
        assert.isAtLeast(yield* guess, 400)
        const refusedAfter = yield* guess
        assert.isBelow(refusedAfter, 200)
        yield* until(() => gateway.recentFailures().some((f) => f.reason === "TooManyFailures"), "the refusal")
        assert.deepStrictEqual(gateway.recentFailures().map((f) => f.reason), ["Rejected", "Rejected", "Rejected", "TooManyFailures"])
      }))
    }))

  it.effect("an oversized preamble is refused before it is buffered", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ tokens: [{ name: "t", token: Redacted.make("s"), ports: [port] }], maxPreambleBytes: 1024 }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const header = Buffer.alloc(4)
        header.writeUInt32BE(1025)
        const peer = yield* rawPeer(gateway.address.port, header)
        yield* Effect.promise(() => peer.closed)
        yield* until(() => gateway.recentFailures().length === 1, "the failure")
        assert.strictEqual(gateway.recentFailures()[0]!.reason, "BadPreamble")
        assert.match(gateway.recentFailures()[0]!.message, /1025 bytes exceeds the limit of 1024/)
      }))
    }))

  it.effect("a backend at its SETTINGS_MAX_CONCURRENT_STREAMS is skipped; beyond every limit requests wait for a free stream", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const held: Array<() => void> = []
        const concurrent = [0, 0]
        const most = [0, 0]
        for (const index of [0, 1]) {
          const server = http2.createServer({ settings: { maxConcurrentStreams: 1 } }, (req, res) => {
            req.resume()
            concurrent[index]!++
            most[index] = Math.max(most[index]!, concurrent[index]!)
            held.push(() => {
              concurrent[index]!--
              res.end(`b${index}`)
            })
          })
          yield* closeServer(server)
          yield* dialBackend(gateway.address.port, server)
        }
        yield* until(() => gateway.connections() === 2, "two backends")
        const replies = [request(port, "/1"), request(port, "/2"), request(port, "/3")]
        yield* until(() => held.length === 2 && gateway.queued() === 1, "two requests served, one waiting")
        held.shift()!()
        yield* until(() => held.length === 2, "the waiting request to get the freed stream")
        held.shift()!()
        held.shift()!()
        const got = yield* Effect.promise(() => Promise.all(replies))
        assert.isTrue(got.every((r) => r.status === 200))
        assert.deepStrictEqual(most, [1, 1])
        assert.strictEqual(gateway.queued(), 0)
        assert.strictEqual(gateway.activeStreams(), 0)
      }))
    }))

  {
    it.effect("the dispatcher fills every backend's stream slots, whatever their limits, before any request waits", () =>
      Effect.gen(function*() {
        const port = yield* Effect.promise(freePort)
        yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
          const gateway = yield* ReverseH2
          const held: Array<() => void> = []
          const limits = [1, 3, 2]
          const concurrent = limits.map(() => 0)
          const most = limits.map(() => 0)
          for (const [index, limit] of limits.entries()) {
            const server = http2.createServer({ settings: { maxConcurrentStreams: limit } }, (req, res) => {
              req.resume()
              concurrent[index]!++
              most[index] = Math.max(most[index]!, concurrent[index]!)
              held.push(() => {
                concurrent[index]!--
                res.end(`b${index}`)
              })
            })
            yield* closeServer(server)
            yield* dialBackend(gateway.address.port, server)
          }
          yield* until(() => gateway.connections() === 3, "three backends")
          // one at a time, so each is leased while the earlier ones hold their streams
          const replies: Array<Promise<Reply>> = []
          for (let i = 0; i < 6; i++) {
            replies.push(request(port, `/${i}`))
            yield* until(() => held.length === i + 1, `request ${i} to start`)
          }
          assert.deepStrictEqual(concurrent, limits)
          assert.strictEqual(gateway.queued(), 0)
          replies.push(request(port, "/7"))
          yield* until(() => gateway.queued() === 1, "the seventh request to wait")
          held.shift()!()
          yield* until(() => held.length === 6, "the waiting request to get the freed stream")
          for (const release of held.splice(0)) release()
          const got = yield* Effect.promise(() => Promise.all(replies))
          assert.isTrue(got.every((r) => r.status === 200 && !r.aborted))
          assert.deepStrictEqual(most, limits)
          assert.strictEqual(gateway.queued(), 0)
          assert.strictEqual(gateway.activeStreams(), 0)
          const listeners = yield* Listeners
          yield* until(() => listeners.inFlight() === 0, "every lease to be released")
        }))
      }))
  }

  it.effect("a request finding every stream busy gets a 503 after the queue timeout, and one beyond the queue at once", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }], queueTimeoutMs: 100, maxQueuedRequests: 1 }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const held: Array<() => void> = []
        const server = http2.createServer({ settings: { maxConcurrentStreams: 1 } }, (req, res) => {
          req.resume()
          held.push(() => res.end("done"))
        })
        yield* closeServer(server)
        yield* dialBackend(gateway.address.port, server)
        yield* until(() => gateway.connections() === 1, "the backend")
        const first = request(port, "/")
        yield* until(() => held.length === 1, "the first request to hold the stream")
        const second = request(port, "/")
        yield* until(() => gateway.queued() === 1, "the second request to wait")
        const third = yield* Effect.promise(() => request(port, "/"))
        assert.strictEqual(third.status, 503)
        assert.match(third.body, /already wait for an HTTP\/2 stream/)
        const waited = yield* Effect.promise(() => second)
        assert.strictEqual(waited.status, 503)
        assert.match(waited.body, /no HTTP\/2 stream free/)
        held[0]!()
        assert.strictEqual((yield* Effect.promise(() => first)).body, "done")
      }))
    }))

  it.effect("shutting down lets the streams in flight finish (GOAWAY, bounded drain) before closing", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      const before = activeHandles()
      const scope = yield* Scope.make()
      const context = yield* Layer.buildWithScope(gatewayLayer({ routes: [{ _tag: "Http", port }] }), scope)
      const gateway = Context.get(context, ReverseH2)
      const held: Array<() => void> = []
      let goaway = false
      const server = http2.createServer((req, res) => {
        req.resume()
        held.push(() => res.end("finished"))
      })
      server.on("session", (session) => session.on("goaway", () => void (goaway = true)))
      // the backend's socket belongs to the test, not to the gateway's scope
      const socket = yield* dialBackend(gateway.address.port, server)
      yield* until(() => gateway.connections() === 1, "the backend")
      const reply = request(port, "/slow")
      yield* until(() => held.length === 1, "the request to reach the backend")
      const closing = yield* Effect.forkChild(Scope.close(scope, Exit.void))
      yield* until(() => goaway, "the GOAWAY")
      assert.strictEqual(gateway.connections(), 0)
      held[0]!()
      const got = yield* Effect.promise(() => reply)
      assert.deepInclude(got, { status: 200, body: "finished", aborted: false }, got.body)
      yield* Fiber.join(closing)
      yield* until(() => socket.destroyed, "the gateway to close the tunnel connection")
      yield* Effect.promise(() => new Promise<void>((resolve) => server.close(() => resolve())))
      yield* Effect.promise(() => expectNoLeaks(before))
    }).pipe(Effect.scoped))

  it.effect("serves the tunnel port over TLS, the backend being the TLS client", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      const certificate = makeCertificate("tunnel.test")
      yield* withGateway({
        tokens: [{ name: "t", token: Redacted.make("tls-secret"), ports: [port] }],
        tls: certificate,
        routes: [{ _tag: "Http", port }]
      }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const handle = yield* Effect.promise(() =>
          serveReverseHttp2((req, res) => res.end(`over tls ${req.url}`), {
            gateway: { host: "127.0.0.1", port: gateway.address.port },
            token: "tls-secret",
            connections: 1,
            tls: { ca: certificate.cert, servername: "tunnel.test" }
          })
        )
        yield* Effect.addFinalizer(() => Effect.promise(() => handle.close()))
        yield* until(() => gateway.connections() === 1, "the TLS connection")
        const reply = yield* Effect.promise(() => request(port, "/x"))
        assert.strictEqual(reply.body, "over tls /x")
      }))
    }))

  it.effect("replaceRoutes: live plain-mode connections serve added routes, drop removed ones after their requests finish; an invalid set changes nothing", () =>
    Effect.gen(function*() {
      const [oldPort, newPort] = [yield* Effect.promise(freePort), yield* Effect.promise(freePort)]
      yield* withGateway({ routes: [{ _tag: "Http", port: oldPort }, { _tag: "Http", port: oldPort, pathPrefix: "/kept" }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const registry = yield* Registry
        const held: Array<() => void> = []
        const server = http2.createServer((req, res) => {
          req.resume()
          if (req.url === "/slow") held.push(() => res.end("slow done"))
          else res.end(`served ${req.url}`)
        })
        yield* closeServer(server)
        yield* dialBackend(gateway.address.port, server)
        yield* until(() => gateway.connections() === 1, "the backend")
        const backendsOf = (port: number, prefix?: string) =>
          registry.routesOnPort(port).find((e) => e.route._tag === "Http" && e.route.pathPrefix === prefix)?.backends.length ?? 0
        // a request in flight on the route about to go away
        const slow = request(oldPort, "/slow")
        yield* until(() => held.length === 1, "the slow request at the backend")

        // invalid sets are refused and nothing changes
        for (const bad of [[], [{ _tag: "Tcp" as const, port: newPort }]]) {
          const refused = yield* Effect.flip(gateway.replaceRoutes(bad))
          assert.strictEqual(refused.reason, "Config")
        }
        assert.strictEqual(backendsOf(oldPort), 1)
        assert.strictEqual(gateway.routes().length, 2)

        yield* gateway.replaceRoutes([{ _tag: "Http", port: oldPort, pathPrefix: "/kept" }, { _tag: "Http", port: newPort }])
        assert.strictEqual(backendsOf(oldPort), 0)
        assert.strictEqual(backendsOf(oldPort, "/kept"), 1)
        assert.strictEqual(backendsOf(newPort), 1)
        assert.strictEqual(gateway.connections(), 1)
        assert.deepStrictEqual(gateway.routes().map((r) => r.port), [oldPort, newPort])
        const added = yield* Effect.promise(() => request(newPort, "/new"))
        assert.strictEqual(added.body, "served /new")
        const kept = yield* Effect.promise(() => request(oldPort, "/kept/x"))
        assert.strictEqual(kept.body, "served /kept/x")
        // the request forwarded before the reload still completes over the same connection
        held.shift()!()
        const finished = yield* Effect.promise(() => slow)
        assert.strictEqual(finished.status, 200)
        assert.strictEqual(finished.body, "slow done")
        assert.strictEqual(gateway.connections(), 1)
        assert.strictEqual(gateway.recentFailures().length, 0)
      }))
    }))

  it.effect("refuses configurations it cannot serve", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      const build = (config: Parameters<typeof ReverseH2.layer>[0]) =>
        Effect.gen(function*() {
          const forwarder = yield* Forwarder.make({ upstream: tcpUpstream("127.0.0.1", 9, { maxSockets: 1, maxFreeSockets: 0 }), responseTimeoutMs: 0, idleTimeoutMs: 0 })
          const core = Layer.effect(Listeners, Listeners.make({ host: "127.0.0.1", forwarder })).pipe(
            Layer.provideMerge(Dispatcher.layer()),
            Layer.provideMerge(Registry.layer())
          )
          return yield* Effect.exit(Effect.scoped(Layer.build(ReverseH2.layer({ address: { host: "127.0.0.1", port: 0 }, ...config }).pipe(Layer.provide(core)))))
        }).pipe(Effect.scoped)
      const noRoutes = yield* build({})
      const tcp = yield* build({ routes: [{ _tag: "Tcp", port }] })
      for (const exit of [noRoutes, tcp]) {
        assert.isTrue(Exit.isFailure(exit))
        if (Exit.isFailure(exit)) {
          const error = exit.cause.reasons.find((r) => r._tag === "Fail")
          assert.instanceOf(error?._tag === "Fail" ? error.error : undefined, ReverseH2Error)
        }
      }
    }))
})
