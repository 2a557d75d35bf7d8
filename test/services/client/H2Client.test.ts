import { assert, describe, it } from "@effect/vitest"
import * as http2 from "node:http2"
import * as net from "node:net"
import { Duration, Effect, Logger } from "effect"
import * as Redacted from "effect/Redacted"
import { TestClock } from "effect/testing"
import { backoffDelay, H2Client } from "../../../src/services/client/H2Client.ts"
import { ReverseH2 } from "../../../src/services/front/ReverseH2.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"
import { freePort, request, until, withGateway } from "../../integration/reverse-h2-harness.ts"

/** Lets the client's fibers reach their sleep before virtual time moves. */
const settle = Effect.promise(() => new Promise((resolve) => setTimeout(resolve, 20)))

describe("H2Client", () => {
  it("backoff grows by the factor from the initial delay, is capped, and jitter only shortens it", () => {
    const config = { initial: "1 second", max: "10 seconds", factor: 2, jitter: 0.5 } as const
    const ms = (failures: number, random: number) => Duration.toMillis(backoffDelay(failures, config, random))
    assert.deepStrictEqual([1, 2, 3, 4, 5, 6].map((n) => ms(n, 0)), [1000, 2000, 4000, 8000, 10000, 10000])
    assert.strictEqual(ms(3, 1), 2000)
    assert.strictEqual(ms(3, 0.5), 3000)
  })

  it.effect("retries an unreachable gateway with capped exponential backoff, in virtual time", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      const port = yield* Effect.promise(freePort)
      const server = http2.createServer()
      yield* Effect.gen(function*() {
        const client = yield* H2Client
        yield* until(() => client.attempts() === 1 && client.lastError() !== undefined, "the first attempt")
        assert.strictEqual(client.lastError()!.reason, "Dial")
        const steps = [1000, 2000, 4000, 4000]
        for (let i = 0; i < steps.length; i++) {
          yield* settle
          yield* TestClock.adjust(steps[i]! - 1)
          yield* settle
          assert.strictEqual(client.attempts(), i + 1, `no attempt before ${steps[i]} ms`)
          yield* TestClock.adjust(1)
          yield* until(() => client.attempts() === i + 2, `attempt ${i + 2}`)
        }
        assert.strictEqual(client.connected(), 0)
      }).pipe(
        Effect.provide(H2Client.layer(server, {
          gateway: { host: "127.0.0.1", port },
          connections: 1,
          backoff: { initial: "1 second", max: "4 seconds", factor: 2, jitter: 0 }
        })),
        Effect.scoped
      )
      yield* Effect.promise(() => expectNoLeaks(before))
    }))

  it.effect("a gateway that accepts and drops connections at once gets growing delays, not a tight loop", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      const dropper = net.createServer((socket) => socket.destroy())
      const port = yield* Effect.promise(() =>
        new Promise<number>((resolve) => dropper.listen(0, "127.0.0.1", () => resolve((dropper.address() as net.AddressInfo).port)))
      )
      const server = http2.createServer()
      yield* Effect.gen(function*() {
        const client = yield* H2Client
        yield* until(() => client.attempts() === 1 && client.connected() === 0, "the first connection to be dropped")
        for (const [step, expected] of [[1000, 2], [1000, 2], [1000, 3], [3999, 3], [1, 4]] as const) {
          yield* settle
          yield* TestClock.adjust(step)
          if (expected > client.attempts()) yield* until(() => client.attempts() === expected && client.connected() === 0, `attempt ${expected}`)
          else yield* settle
          assert.strictEqual(client.attempts(), expected)
        }
      }).pipe(
        Effect.provide(H2Client.layer(server, {
          gateway: { host: "127.0.0.1", port },
          connections: 1,
          backoff: { initial: "1 second", max: "30 seconds", factor: 2, jitter: 0 }
        })),
        Effect.scoped
      )
      yield* Effect.promise(() => new Promise<void>((resolve) => dropper.close(() => resolve())))
      yield* Effect.promise(() => expectNoLeaks(before))
    }))

  it.effect("keeps N connections and replaces one the gateway lost", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const sessions: Array<http2.ServerHttp2Session> = []
        const server = http2.createServer((_req, res) => res.end("up"))
        server.on("session", (s) => sessions.push(s))
        yield* Effect.gen(function*() {
          const client = yield* H2Client
          yield* until(() => gateway.connections() === 3 && client.connected() === 3, "three connections")
          sessions[0]!.destroy()
          yield* until(() => gateway.connections() === 2 && client.connected() === 2, "one connection lost")
          assert.strictEqual((yield* Effect.promise(() => request(port, "/"))).body, "up")
          yield* settle
          yield* TestClock.adjust("1 second")
          yield* until(() => gateway.connections() === 3 && client.connected() === 3, "the lost connection replaced")
          assert.strictEqual(client.attempts(), 4)
        }).pipe(
          Effect.provide(H2Client.layer(server, {
            gateway: { host: "127.0.0.1", port: gateway.address.port },
            connections: 3,
            backoff: { initial: "1 second", jitter: 0 }
          })),
          Effect.scoped
        )
        server.close()
      }))
    }))

  it.effect("a refused token is reported and retried with backoff, never served", () =>
    Effect.gen(function*() {
      const port = yield* Effect.promise(freePort)
      yield* withGateway({ tokens: [{ name: "t", token: Redacted.make("right"), ports: [port] }], routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        const server = http2.createServer()
        yield* Effect.gen(function*() {
          const client = yield* H2Client
          yield* until(() => client.lastError() !== undefined, "the refusal")
          assert.strictEqual(client.lastError()!.reason, "Rejected")
          assert.match(client.lastError()!.message, /BadToken/)
          assert.strictEqual(client.connected(), 0)
          assert.strictEqual(gateway.connections(), 0)
          yield* settle
          yield* TestClock.adjust("1 second")
          yield* until(() => client.attempts() === 2, "a second attempt")
        }).pipe(
          Effect.provide(H2Client.layer(server, {
            gateway: { host: "127.0.0.1", port: gateway.address.port },
            token: Redacted.make("wrong"),
            connections: 1,
            backoff: { initial: "1 second", jitter: 0 }
          })),
          Effect.scoped
        )
      }))
    }))

  it.effect("each failed attempt is a warning (an error when refused) with the cause, what to check, the next delay and the attempt", () =>
    Effect.gen(function*() {
      const messages: Array<string> = []
      const capture = Logger.make((options) => void messages.push(`${options.logLevel} ${String(options.message)}`))
      const port = yield* Effect.promise(freePort)
      const server = http2.createServer()
      yield* Effect.gen(function*() {
        const client = yield* H2Client
        yield* until(() => client.attempts() === 2 && client.lastError() !== undefined, "the first attempt of each slot")
        yield* settle
        yield* TestClock.adjust("1 second")
        yield* until(() => messages.filter((m) => m.includes("cannot reach")).length >= 2, "the second attempt")
      }).pipe(
        Effect.provide(H2Client.layer(server, {
          gateway: { host: "127.0.0.1", port },
          connections: 2,
          backoff: { initial: "1 second", max: "4 seconds", factor: 2, jitter: 0 }
        })),
        Effect.scoped,
        Effect.provide(Logger.layer([capture]))
      )
      const failures = messages.filter((m) => m.includes("cannot reach"))
      // one line per attempt of the first connection slot, not one per slot
      assert.isAtLeast(failures.length, 2)
      assert.match(failures[0]!, new RegExp(`^Warn cannot reach 127\\.0\\.0\\.1:${port}: ECONNREFUSED; check --server .*--reverse-h2.*; retrying in 1s \\(attempt 1\\)$`))
      assert.match(failures[1]!, /retrying in 2s \(attempt 2\)$/)

      const refused: Array<string> = []
      const captureRefusal = Logger.make((options) => void refused.push(`${options.logLevel} ${String(options.message)}`))
      const gatewayPort = yield* Effect.promise(freePort)
      yield* withGateway({ tokens: [{ name: "t", token: Redacted.make("right"), ports: [gatewayPort] }], routes: [{ _tag: "Http", port: gatewayPort }] }, Effect.gen(function*() {
        const gateway = yield* ReverseH2
        yield* Effect.gen(function*() {
          const client = yield* H2Client
          yield* until(() => client.lastError() !== undefined && refused.some((m) => m.includes("refused")), "the refusal")
        }).pipe(
          Effect.provide(H2Client.layer(http2.createServer(), {
            gateway: { host: "127.0.0.1", port: gateway.address.port },
            token: Redacted.make("wrong"),
            connections: 1,
            backoff: { initial: "1 second", jitter: 0 }
          })),
          Effect.scoped,
          Effect.provide(Logger.layer([captureRefusal]))
        )
      }))
      const line = refused.find((m) => m.includes("refused"))!
      assert.match(line, /^Error .*BadToken.*; check the token \(--token, --token-file\).*; retrying in 1s \(attempt 1\)$/)
    }))
})

