import { describe, expect, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import { LogSampler, sampledLines } from "../../src/domain/LogSampler.ts"

describe("LogSampler", () => {
  it("logs the first of each kind, then one per interval saying how many were left out", () => {
    const sampler = new LogSampler(1_000)
    expect(sampler.take("a", 0)).toBe(0)
    expect(sampler.take("a", 10)).toBeUndefined()
    expect(sampler.take("b", 10)).toBe(0)
    expect(sampler.take("a", 999)).toBeUndefined()
    expect(sampler.take("a", 1_000)).toBe(2)
    expect(sampler.take("a", 5_000)).toBe(0)
  })

  it("sampledLines writes the first line, then at most one per interval, counting the ones left out", () => {
    let t = 1_000
    const out: Array<string> = []
    const log = sampledLines(10_000, (line) => out.push(line), () => t)
    log("a")
    log("b")
    t += 9_999
    log("c")
    t += 1
    log("d")
    log("e")
    t += 10_000
    log("f")
    expect(out).toEqual(["a", "d (2 more like it since the previous line)", "f (1 more like it since the previous line)"])
  })

  it.effect.prop(
    "writes at most one line per interval and kind, and the lines account for every event once",
    { gaps: Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 5_000 }))).check(Schema.isMaxLength(300)) },
    ({ gaps }) =>
      Effect.sync(() => {
        const sampler = new LogSampler(1_000)
        let now = 0
        let lastLine = -Infinity
        let counted = 0
        let seen = 0
        let seenAtLastLine = 0
        for (const gap of gaps) {
          now += gap
          seen++
          const skipped = sampler.take("kind", now)
          if (skipped !== undefined) {
            expect(now - lastLine).toBeGreaterThanOrEqual(1_000)
            lastLine = now
            counted += skipped + 1
            seenAtLastLine = seen
          }
        }
        expect(counted).toBe(seenAtLastLine)
        if (gaps.length > 0) expect(seenAtLastLine).toBeGreaterThanOrEqual(1)
      })
  )
})
