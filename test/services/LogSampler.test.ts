import { assert, describe, it } from "@effect/vitest"
import { makeLogSampler } from "../../src/services/LogSampler.ts"

describe("makeLogSampler", () => {
  it("writes the first line, then at most one per interval, counting the ones left out", () => {
    let t = 1_000
    const out: Array<string> = []
    const log = makeLogSampler(10_000, (line) => out.push(line), () => t)
    log("a")
    log("b")
    t += 9_999
    log("c")
    t += 1
    log("d")
    log("e")
    t += 10_000
    log("f")
    assert.deepStrictEqual(out, ["a", "d (2 more like it since the previous line)", "f (1 more like it since the previous line)"])
  })
})
