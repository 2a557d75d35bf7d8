import { assert, describe, it } from "@effect/vitest"
import { Cause, Effect, Redacted } from "effect"
import * as http from "node:http"
import {
  accessLogger,
  CommandLineLogging,
  ensureRequestId,
  formatAccess,
  layer,
  MaxRequestIdLength,
  RequestIdHeader,
  useInThisFiber
} from "../../src/runtime/Logging.ts"

const fakeRequest = (headers: Record<string, string>, rawHeaders: Array<string>) =>
  ({ headers: { ...headers }, rawHeaders: [...rawHeaders] }) as unknown as http.IncomingMessage

describe("Logging", () => {
  it.effect("writes JSON lines at or above the configured level; secrets stay redacted", () =>
    Effect.gen(function*() {
      const lines: Array<string> = []
      const secret = Redacted.make("hunter2")
      yield* Effect.gen(function*() {
        yield* Effect.logDebug("hidden")
        yield* Effect.logInfo("started", secret)
        yield* Effect.logWarning("careful").pipe(Effect.annotateLogs({ component: "test" }))
      }).pipe(Effect.provide(layer({ format: "json", level: "info" }, (l) => lines.push(l))))
      assert.strictEqual(lines.length, 2)
      const first = JSON.parse(lines[0]!)
      assert.strictEqual(first.level, "INFO")
      assert.include(JSON.stringify(first.message), "started")
      assert.notInclude(lines.join("\n"), "hunter2")
      // one flat schema: the annotations are keys of their own
      assert.deepStrictEqual(Object.keys(JSON.parse(lines[1]!)), ["timestamp", "level", "message", "component"])
      assert.strictEqual(JSON.parse(lines[1]!).component, "test")
      assert.strictEqual(JSON.parse(lines[1]!).message, "careful")
    }))

  it.effect("writes one line per entry, a failure's cause as one error field", () =>
    Effect.gen(function*() {
      const lines: Array<string> = []
      const entry = Effect.logError("failed", Cause.fail(new Error("first\nsecond"))).pipe(Effect.annotateLogs({ component: "test", peer: "a b" }))
      yield* entry.pipe(Effect.provide(layer({ format: "logfmt" }, (l) => lines.push(l))))
      yield* entry.pipe(Effect.provide(layer({ format: "json" }, (l) => lines.push(l))))
      for (const line of lines) assert.notInclude(line, "\n")
      assert.match(lines[0]!, /^timestamp=\S+ level=ERROR message=failed component=test peer="a b" error=/)
      assert.notInclude(lines[0]!, "fiber=")
      const json = JSON.parse(lines[1]!)
      assert.deepStrictEqual(Object.keys(json), ["timestamp", "level", "message", "component", "peer", "error"])
    }))

  it.effect("--log-format and --log-level win over the configuration", () =>
    Effect.gen(function*() {
      const lines: Array<string> = []
      yield* Effect.gen(function*() {
        yield* useInThisFiber({ format: "logfmt", level: "error" }, (l) => lines.push(l))
        yield* Effect.logDebug("shown")
      }).pipe(Effect.provideService(CommandLineLogging, { format: "json", level: "debug" }))
      assert.strictEqual(lines.length, 1)
      assert.strictEqual(JSON.parse(lines[0]!).message, "shown")
    }))

  it.effect("useInThisFiber switches the running fiber's logger and level", () =>
    Effect.gen(function*() {
      const lines: Array<string> = []
      yield* useInThisFiber({ format: "json", level: "warn" }, (l) => lines.push(l))
      yield* Effect.logInfo("filtered")
      yield* Effect.logWarning("kept")
      assert.strictEqual(lines.length, 1)
      assert.strictEqual(JSON.parse(lines[0]!).level, "WARN")
    }))

  it.effect("writes logfmt by default", () =>
    Effect.gen(function*() {
      const lines: Array<string> = []
      yield* Effect.logError("boom").pipe(Effect.provide(layer({}, (l) => lines.push(l))))
      assert.match(lines[0]!, /^timestamp=\S+ level=ERROR .*message=boom/)
    }))

  it("keeps a sane client request id and replaces a missing or odd one, in headers and raw headers", () => {
    const kept = fakeRequest({ [RequestIdHeader]: "abc-1" }, ["X-Request-Id", "abc-1"])
    assert.strictEqual(ensureRequestId(kept), "abc-1")
    assert.deepStrictEqual(kept.rawHeaders, ["X-Request-Id", "abc-1"])

    const none = fakeRequest({}, ["Host", "x"])
    const id = ensureRequestId(none)
    assert.match(id, /^[0-9a-f-]{36}$/)
    assert.deepStrictEqual(none.rawHeaders, ["Host", "x", "X-Request-Id", id])

    const odd = "x".repeat(MaxRequestIdLength + 1)
    const long = fakeRequest({ [RequestIdHeader]: odd }, ["x-request-id", odd, "Host", "x"])
    const replaced = ensureRequestId(long)
    assert.notStrictEqual(replaced, odd)
    assert.deepStrictEqual(long.rawHeaders, ["Host", "x", "X-Request-Id", replaced])
    assert.notStrictEqual(ensureRequestId(fakeRequest({ [RequestIdHeader]: "a b\r\n" }, [])), "a b\r\n")
  })

  it("formats access lines without the query string", () => {
    const entry = {
      frontDoor: "control",
      method: "GET",
      path: "/a?token=secret",
      route: "http:8000:/",
      status: 200,
      receivedBytes: 10,
      sentBytes: 20,
      durationMs: 1.23456,
      requestId: "r1",
      peer: "127.0.0.1"
    }
    const at = new Date("2026-01-01T00:00:00Z")
    assert.strictEqual(
      formatAccess("logfmt", entry, at),
      "timestamp=2026-01-01T00:00:00.000Z level=INFO log=access front_door=control method=GET path=/a route=http:8000:/ status=200 received_bytes=10 sent_bytes=20 duration_ms=1.235 request_id=r1 peer=127.0.0.1"
    )
    assert.strictEqual(JSON.parse(formatAccess("json", entry, at)).path, "/a")
    assert.isUndefined(accessLogger({ accessLog: false }))
    const out: Array<string> = []
    accessLogger({ accessLog: true, format: "json" }, (l) => out.push(l))!(entry)
    assert.strictEqual(JSON.parse(out[0]!).request_id, "r1")
  })
})
