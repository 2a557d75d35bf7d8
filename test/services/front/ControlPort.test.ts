import { assert, describe, it } from "@effect/vitest"
import * as net from "node:net"
import { Context, Effect, Exit, Redacted, Scope } from "effect"
import { TestClock } from "effect/testing"
import { encodeHello, FrameHeaderBytes, makeHello } from "../../../src/domain/ControlMessage.ts"
import type { RouteDefinition } from "../../../src/domain/Route.ts"
import { TunnelClient } from "../../../src/services/client/TunnelClient.ts"
import { ControlPort, isLoopbackPeer } from "../../../src/services/front/ControlPort.ts"
import { Registry } from "../../../src/services/Registry.ts"
import { noLeaks } from "../../support/leaks.ts"
import { client, gateway, serveHttp, token } from "../../integration/tunnelHarness.ts"
import { freePort, request } from "../ListenersFixtures.ts"

/** Lets real I/O run for a moment (the TestClock does not move). */
const tick = Effect.promise(() => new Promise((resolve) => setTimeout(resolve, 5)))

/** Sends `bytes` to the control port and collects the answer until the gateway closes the connection. */
const exchange = (port: number, bytes: Uint8Array | undefined) => {
  let closed = false
  const answer = new Promise<Buffer>((resolve) => {
    const socket = net.createConnection({ host: "127.0.0.1", port }, () => {
      if (bytes !== undefined) socket.write(bytes)
    })
    const chunks: Array<Buffer> = []
    socket.on("data", (c: Buffer) => chunks.push(c))
    socket.on("error", () => {})
    socket.on("close", () => {
      closed = true
      resolve(Buffer.concat(chunks))
    })
  })
  return { answer, isClosed: () => closed }
}

const helloWith = (token: string, listeners: ReadonlyArray<RouteDefinition>, version?: number) => {
  const hello = makeHello(Redacted.make(token), listeners)
  return encodeHello(version === undefined ? hello : { ...hello, version })
}

const replyOf = (bytes: Buffer) => JSON.parse(bytes.subarray(FrameHeaderBytes).toString()) as Record<string, unknown>

describe("ControlPort", () => {
  /** Advances virtual time a second at a time, letting real I/O run in between, until `done` (at most 60 s). */
  const secondsUntil = (done: () => boolean) =>
    Effect.gen(function*() {
      let seconds = 0
      while (!done() && seconds < 60) {
        for (let i = 0; i < 3; i++) yield* tick
        if (done()) break
        yield* TestClock.adjust("1 second")
        seconds++
      }
      return seconds
    })

  it.effect("closes a connection whose Hello does not complete within the handshake timeout", () =>
    noLeaks(Effect.gen(function*() {
      const control = Context.get(yield* gateway({ control: { address: { host: "127.0.0.1", port: 0 }, tokens: [], handshakeTimeout: "10 seconds" } }), ControlPort)
      // one byte of a length prefix: not silent, so only the handshake timeout applies
      const stalled = exchange(control.address.port!, new Uint8Array([0]))
      const seconds = yield* secondsUntil(stalled.isClosed)
      assert.isTrue(stalled.isClosed())
      assert.isAtLeast(seconds, 10)
      assert.isAtMost(seconds, 11)
      const answer = yield* Effect.promise(() => stalled.answer)
      assert.strictEqual(answer.length, 0)
    })))

  it.effect("closes a connection that sends nothing after the first-byte timeout, before the handshake timeout", () =>
    noLeaks(Effect.gen(function*() {
      const rejected: Array<string> = []
      const control = Context.get(
        yield* gateway({
          control: {
            address: { host: "127.0.0.1", port: 0 },
            tokens: [],
            handshakeTimeout: "10 seconds",
            firstByteTimeout: "2 seconds",
            onRejected: (reason) => rejected.push(reason)
          }
        }),
        ControlPort
      )
      const silent = exchange(control.address.port!, undefined)
      const seconds = yield* secondsUntil(silent.isClosed)
      assert.isTrue(silent.isClosed())
      assert.isAtLeast(seconds, 2)
      assert.isAtMost(seconds, 3)
      assert.deepStrictEqual(rejected, ["FirstByteTimeout"])
    })))

  it.effect("rejects a bad token, an unknown version, a port or domain outside the grant, with typed reasons", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway({
        control: {
          address: { host: "127.0.0.1", port: 0 },
          tokens: [{ name: "team", token: Redacted.make("good"), ports: [9100], domainSuffixes: ["team.test"] }]
        }
      })
      const port = Context.get(gw, ControlPort).address.port!
      const cases: Array<[Uint8Array, string, number | undefined]> = [
        [helloWith("bad", [{ _tag: "Http", port: 9100, domainSuffix: "team.test" }]), "BadToken", undefined],
        [helloWith("good", [{ _tag: "Http", port: 9100, domainSuffix: "team.test" }], 2), "Version", undefined],
        [helloWith("good", [{ _tag: "Http", port: 9100, domainSuffix: "team.test" }, { _tag: "Tcp", port: 9101 }]), "PortNotAllowed", 1],
        [helloWith("good", [{ _tag: "Http", port: 9100, domainSuffix: "other.test" }]), "DomainNotAllowed", 0]
      ]
      for (const [bytes, reason, index] of cases) {
        const reply = replyOf(yield* Effect.promise(() => exchange(port, bytes).answer))
        assert.strictEqual(reply["_tag"], "Rejected")
        assert.strictEqual(reply["reason"], reason)
        assert.strictEqual(reply["index"], index)
      }
      assert.strictEqual(Context.get(gw, Registry).snapshot().length, 0)
      assert.strictEqual(Context.get(gw, ControlPort).sessions(), 0)
    })))

  it.effect("refuses a conflicting listener and binds nothing of that Hello", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway()
      const port = Context.get(gw, ControlPort).address.port!
      const publicPort = yield* Effect.promise(freePort)
      const reply = replyOf(yield* Effect.promise(() =>
        exchange(port, helloWith("test-token", [{ _tag: "Http", port: publicPort }, { _tag: "Tcp", port: publicPort }])).answer
      ))
      assert.strictEqual(reply["reason"], "Conflict")
      assert.strictEqual(reply["index"], 1)
      // the first listener of the refused Hello was unbound with its session (kept only for the grace period)
      const entry = Context.get(gw, Registry).snapshot()[0]
      assert.strictEqual(entry?.backends.length ?? 0, 0)
    })))
})

describe("ControlPort control stream", () => {
  it.live("adds and removes listeners on a live session", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway({ registry: { gracePeriod: "50 millis" } })
      const control = Context.get(gw, ControlPort)
      const registry = Context.get(gw, Registry)
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
      while (!tunnel.status()[0]!.connected) yield* Effect.sleep("5 millis")
      const publicPort = yield* Effect.promise(freePort)
      // added after the handshake: this goes over a control stream (AddListener)
      const listenerScope = yield* Scope.make()
      yield* serveHttp(tunnel, { _tag: "Http", port: publicPort, pathPrefix: "/late" }, (_req, res) => res.end("late")).pipe(
        Scope.provide(listenerScope)
      )
      assert.strictEqual((yield* Effect.promise(() => request(publicPort, "/late"))).body, "late")
      assert.strictEqual(registry.snapshot()[0]!.backends.length, 1)
      // RemoveListener: unregistered, the session stays
      yield* Scope.close(listenerScope, Exit.void)
      assert.strictEqual(registry.snapshot()[0]?.backends.length ?? 0, 0)
      assert.strictEqual(control.sessions(), 1)
      assert.isTrue(tunnel.status()[0]!.connected)
    })))
})

describe("ControlPort grants on the control stream", () => {
  it.live("refuses AddListener for a port outside the token's grant", () =>
    noLeaks(Effect.gen(function*() {
      const allowed = yield* Effect.promise(freePort)
      const gw = yield* gateway({
        control: {
          address: { host: "127.0.0.1", port: 0 },
          tokens: [{ name: "narrow", token: Redacted.make(token), ports: [allowed] }]
        }
      })
      const control = Context.get(gw, ControlPort)
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
      while (!tunnel.status()[0]!.connected) yield* Effect.sleep("5 millis")
      const other = yield* Effect.promise(freePort)
      const refused = yield* tunnel.listen({ _tag: "Http", port: other })
      const error = yield* Effect.flip(refused.bound)
      assert.strictEqual(error.rejection, "PortNotAllowed")
      const accepted = yield* tunnel.listen({ _tag: "Http", port: allowed })
      yield* accepted.bound
      assert.deepStrictEqual(Context.get(gw, Registry).snapshot().map((e) => e.route.port), [allowed])
    })))
})

describe("ControlPort peers", () => {
  it("accepts tokens from loopback peers only, unless remote peers are allowed", () => {
    assert.isTrue(isLoopbackPeer({ host: "127.0.0.1", port: 1 }))
    assert.isTrue(isLoopbackPeer({ host: "127.8.9.10", port: 1 }))
    assert.isTrue(isLoopbackPeer({ host: "::1", port: 1 }))
    assert.isTrue(isLoopbackPeer({ host: "::ffff:127.0.0.1", port: 1 }))
    assert.isTrue(isLoopbackPeer({ path: "/run/switchyard.sock" }))
    assert.isFalse(isLoopbackPeer({ host: "10.0.0.1", port: 1 }))
    assert.isFalse(isLoopbackPeer({ host: "::ffff:10.0.0.1", port: 1 }))
    assert.isFalse(isLoopbackPeer(undefined))
  })
})
