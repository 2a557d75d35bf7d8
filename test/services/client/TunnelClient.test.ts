import { assert, describe, it } from "@effect/vitest"
import * as net from "node:net"
import { Context, Duration, Effect, Layer, Redacted, Schema } from "effect"
import { TestClock } from "effect/testing"
import { frame } from "../../../src/domain/ControlMessage.ts"
import * as NodeTransport from "../../../src/runtime/NodeTransport.ts"
import { backoffDelay, boundAsAsked, failureAdvice, PermanentRejections, RouteRejections, type ReconnectPolicy, TunnelClient, TunnelClientError } from "../../../src/services/client/TunnelClient.ts"
import { ControlPort } from "../../../src/services/front/ControlPort.ts"
import { Registry } from "../../../src/services/Registry.ts"
import { gateway, grants, token } from "../../integration/tunnelHarness.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"
import { freePort } from "../ListenersFixtures.ts"

const ms = (d: Duration.Duration) => Duration.toMillis(d)

/** Lets real I/O (dials, handshakes) run while virtual time stands still. */
const until = (condition: () => boolean) =>
  Effect.gen(function*() {
    for (let i = 0; i < 2_000 && !condition(); i++) {
      yield* Effect.promise(() => new Promise((resolve) => setTimeout(resolve, 2)))
    }
    assert.isTrue(condition(), "condition not reached")
  })

describe("TunnelClient backoff", () => {
  it("grows exponentially from the initial delay up to the cap", () => {
    const policy: ReconnectPolicy = { initial: "100 millis", max: "1 second", factor: 2, jitter: 0 }
    assert.deepStrictEqual([0, 1, 2, 3, 4, 5, 60].map((a) => ms(backoffDelay(a, policy, 0.5))), [100, 200, 400, 800, 1000, 1000, 1000])
  })

  it.prop(
    "stays within [(1 - jitter) · d, d] of the un-jittered delay, and never above the cap",
    [
      Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 100 })),
      Schema.Number.check(Schema.isBetween({ minimum: 0, maximum: 0.999 })),
      Schema.Number.check(Schema.isBetween({ minimum: 0, maximum: 1 }))
    ],
    ([attempt, random, jitter]) => {
      const policy: ReconnectPolicy = { initial: "50 millis", max: "30 seconds", factor: 2, jitter }
      const plain = ms(backoffDelay(attempt, { ...policy, jitter: 0 }, 0))
      const got = ms(backoffDelay(attempt, policy, random))
      assert.isAtMost(got, plain)
      assert.isAtLeast(got, Math.floor(plain * (1 - jitter)))
      assert.isAtMost(got, 30_000)
    }
  )
})

describe("TunnelClient failure advice", () => {
  const io = (message: string) => failureAdvice(new TunnelClientError({ reason: "Io", message }))
  it("names what to do for each kind of failure", () => {
    assert.match(io("dial failed: connect ECONNREFUSED 127.0.0.1:1"), /check --server and that the gateway is running/)
    assert.match(io("self-signed certificate"), /--ca/)
    assert.match(io("unable to verify the first certificate"), /--ca/)
    assert.match(io("proxy 127.0.0.1:3128: 407 Proxy Authentication Required"), /HTTPS_PROXY\/HTTP_PROXY/)
    assert.match(io("CONNECT gw.example:443 answered 407 Proxy Authentication Required"), /HTTPS_PROXY\/HTTP_PROXY/)
    // a port that contains the digits is not a proxy's answer
    assert.match(io("dial failed: connect ECONNREFUSED 127.0.0.1:40761"), /check --server and that the gateway is running/)
    assert.match(io("getaddrinfo ENOTFOUND gw.invalid"), /does not resolve/)
    assert.match(io("the gateway closed the session"), /reconnecting/)
    assert.match(failureAdvice(new TunnelClientError({ reason: "HandshakeTimeout", message: "no answer to Hello" })), /not as a switchyard control port/)
    const rejected = (rejection: string) => failureAdvice(new TunnelClientError({ reason: "Rejected", rejection, message: rejection }))
    assert.match(rejected("BadToken"), /wrong or revoked/)
    assert.match(rejected("PortNotAllowed"), /does not allow this public port/)
    assert.match(rejected("DomainNotAllowed"), /does not allow this domain/)
    assert.match(rejected("Conflict"), /another backend holds this route/)
    assert.match(rejected("BindFailed"), /could not bind the public port/)
  })

  it("tells a gateway that dropped strip_path from the route it bound (an older version) from one that kept it", () => {
    const asked = { _tag: "Http" as const, port: 8000, pathPrefix: "/app", stripPrefix: true }
    assert.isTrue(boundAsAsked(asked, asked))
    assert.isFalse(boundAsAsked(asked, { _tag: "Http", port: 8000, pathPrefix: "/app" }))
    assert.isTrue(boundAsAsked({ _tag: "Tcp", port: 1 }, { _tag: "Tcp", port: 1 }))
  })

  it("leaves out of the next Hello only the refusals that concern one route", () => {
    for (const r of ["PortNotAllowed", "DomainNotAllowed", "Conflict", "BindFailed", "Malformed"] as const) assert.isTrue(RouteRejections.has(r))
    for (const r of ["BadToken", "Version", "Insecure", "Limit"] as const) assert.isFalse(RouteRejections.has(r))
  })

  it("treats token and grant refusals as final, conflicts and bind failures as passing", () => {
    for (const r of ["BadToken", "PortNotAllowed", "DomainNotAllowed"] as const) assert.isTrue(PermanentRejections.has(r))
    for (const r of ["Conflict", "BindFailed", "Limit"] as const) assert.isFalse(PermanentRejections.has(r))
  })
})

describe("TunnelClient reconnect", () => {
  it.effect("retries with backoff in virtual time, then registers everything once a gateway appears", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.gen(function*() {
        const controlPort = yield* Effect.promise(freePort)
        const publicPort = yield* Effect.promise(freePort)
        const tunnel = Context.get(
          yield* Layer.build(
            TunnelClient.layer({
              servers: [{ host: "127.0.0.1", port: controlPort }],
              token: Redacted.make(token),
              reconnect: { initial: "1 second", max: "4 seconds", factor: 2, jitter: 0 }
            }).pipe(Layer.provide(NodeTransport.layer))
          ),
          TunnelClient
        )
        const listener = yield* tunnel.listen({ _tag: "Http", port: publicPort, pathPrefix: "/r" })
        // nothing listens on the control port: each attempt fails at once, then waits 1 s, 2 s, 4 s, 4 s
        yield* until(() => tunnel.status()[0]!.attempts === 1)
        yield* TestClock.adjust("999 millis")
        assert.strictEqual(tunnel.status()[0]!.attempts, 1)
        yield* TestClock.adjust("1 millis")
        yield* until(() => tunnel.status()[0]!.attempts === 2)
        yield* TestClock.adjust("2 seconds")
        yield* until(() => tunnel.status()[0]!.attempts === 3)
        yield* TestClock.adjust("4 seconds")
        yield* until(() => tunnel.status()[0]!.attempts === 4)
        assert.match(tunnel.status()[0]!.lastError ?? "", /ECONNREFUSED|refused|connect/i)
        // the gateway comes up on that port; the next attempt (4 s later, at the cap) connects and registers
        const gw = yield* gateway({ control: { address: { host: "127.0.0.1", port: controlPort }, tokens: grants } })
        assert.strictEqual(Context.get(gw, ControlPort).address.port, controlPort)
        yield* TestClock.adjust("4 seconds")
        yield* until(() => tunnel.status()[0]!.connected)
        yield* listener.bound
        assert.strictEqual(tunnel.status()[0]!.attempts, 0)
        assert.strictEqual(Context.get(gw, Registry).snapshot()[0]!.backends.length, 1)
      }).pipe(Effect.scoped)
      yield* Effect.promise(() => expectNoLeaks(before))
    }))
})

describe("TunnelClient keepalive", () => {
  it.effect("drops a gateway that stops answering pings, and dials again after the backoff", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.gen(function*() {
        // a gateway that completes the handshake and then goes silent (reads nothing, answers nothing)
        let accepted = 0
        const sockets = new Set<net.Socket>()
        const silent = net.createServer((socket) => {
          accepted++
          sockets.add(socket)
          socket.on("error", () => {})
          socket.once("data", () => {
            socket.write(frame(new TextEncoder().encode(JSON.stringify({ _tag: "Welcome", version: 1, sessionId: "s", listeners: [] }))))
            socket.pause()
          })
        })
        yield* Effect.acquireRelease(
          Effect.promise(() => new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve))),
          () => Effect.promise(() => new Promise<void>((resolve) => {
            for (const s of sockets) s.destroy()
            silent.close(() => resolve())
          }))
        )
        const port = (silent.address() as net.AddressInfo).port
        const tunnel = Context.get(
          yield* Layer.build(
            TunnelClient.layer({
              servers: [{ host: "127.0.0.1", port }],
              token: Redacted.make(token),
              reconnect: { initial: "1 second", max: "1 second", jitter: 0 },
              yamux: { enableKeepAlive: true, keepAliveIntervalMs: 30_000, connectionWriteTimeoutMs: 10_000 }
            }).pipe(Layer.provide(NodeTransport.layer))
          ),
          TunnelClient
        )
        yield* until(() => tunnel.status()[0]!.connected)
        // the first ping goes out after 30 s; its answer is due within 10 s
        yield* TestClock.adjust("30 seconds")
        yield* TestClock.adjust("9 seconds")
        assert.isTrue(tunnel.status()[0]!.connected)
        yield* TestClock.adjust("1 second")
        yield* until(() => !tunnel.status()[0]!.connected)
        assert.strictEqual(accepted, 1)
        yield* TestClock.adjust("1 second")
        yield* until(() => accepted === 2)
      }).pipe(Effect.scoped)
      yield* Effect.promise(() => expectNoLeaks(before))
    }))
})
