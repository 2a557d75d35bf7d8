import { assert, describe, it } from "@effect/vitest"
import { clientLimitLogLine } from "../../../src/domain/ClientLimits.ts"
import { makeClientLimitReporter } from "../../../src/services/forward/ClientLimitReporter.ts"

describe("ClientLimitReporter", () => {
  it("counts every refusal by limit and logs the first of a burst once per limit", () => {
    const lines: Array<string> = []
    const reporter = makeClientLimitReporter((line) => lines.push(line))
    for (let i = 0; i < 100; i++) reporter.onClientLimit({ limit: "slot_wait", client: "10.0.0.9", method: "GET", target: "/x" })
    reporter.onClientLimit({ limit: "request_body_rate", client: "10.0.0.8", method: "POST", target: "/upload" })
    assert.deepStrictEqual(reporter.counts(), { request_body_rate: 1, response_rate: 0, client_slots: 0, slot_wait: 100, head_timeout: 0 })
    assert.deepStrictEqual(lines, [
      `client 10.0.0.9: no upstream connection came free in time: 503 (GET "/x")`,
      `client 10.0.0.8: request body below the minimum data rate: 408, connection closed (POST "/upload")`
    ])
  })

  it("a line says how many refusals it stands for and keeps a long target short", () => {
    assert.strictEqual(
      clientLimitLogLine("head_timeout", "::1", "", "", 3),
      "client ::1: request head not received in time: 408; 2 more since the last line"
    )
    const line = clientLimitLogLine("response_rate", "127.0.0.1", "GET", "/" + "a".repeat(1_000), 1)
    assert.isBelow(line.length, 320)
    assert.include(line, `aaa..."`)
  })
})
