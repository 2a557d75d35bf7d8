import { assert, describe, it } from "@effect/vitest"
import { Effect, Fiber } from "effect"
import { TestClock } from "effect/testing"
import { echoServer, equalBytes, pattern, readAll, sessionPair } from "./harness.ts"

describe("yamux Session (in-memory)", () => {
  it.effect("echoes a stream end to end", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair()
      yield* echoServer(server)
      const s = yield* client.open()
      assert.strictEqual(s.id, 1)
      const data = pattern(1_000_000)
      const writer = yield* Effect.forkChild(Effect.andThen(s.write(data), s.closeWrite()))
      const got = yield* readAll(s)
      yield* Fiber.join(writer)
      assert.isTrue(equalBytes(got, data))
    }))

  it.effect("ping measures a round trip", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair()
      const rtt = yield* client.ping()
      assert.isDefined(rtt)
      yield* server.ping()
    }))

  it.effect("keepalive timeout closes a silent session", () =>
    Effect.gen(function*() {
      const { makeMemoryPair } = yield* Effect.promise(() => import("../../../src/services/Transport.ts"))
      const Session = yield* Effect.promise(() => import("../../../src/services/yamux/Session.ts"))
      const [a, b] = makeMemoryPair()
      b.start({ onData: () => {}, onEnd: () => {}, onClose: () => {} })
      const client = yield* Session.make(a, { role: "client" })
      const closed = yield* Effect.forkChild(Effect.flip(client.closed))
      yield* TestClock.adjust(30_000)
      yield* TestClock.adjust(10_000)
      const err = yield* Fiber.join(closed)
      assert.strictEqual(err.reason, "KeepAliveTimeout")
    }))
})
