import { describe, expect, it } from "@effect/vitest"
import { Schema } from "effect"
import { AuthThrottle } from "../../src/domain/AuthThrottle.ts"

const LIMITS = { freeFailures: 2, baseDelayMs: 100, maxDelayMs: 1_000, refuseAfter: 6, windowMs: 60_000, maxAddresses: 3 }

describe("AuthThrottle", () => {
  it("lets the first failures through, then doubles the delay up to its cap, then refuses for the window", () => {
    const t = new AuthThrottle(LIMITS)
    const delays = [1, 2, 3, 4, 5, 6].map((i) => t.failed("a", i))
    expect(delays).toEqual([0, 0, 100, 200, 400, 800])
    expect(t.gate("a", 10)).toEqual({ _tag: "Refuse", retryAfterMs: 60_000 + 6 - 10 })
    expect(t.gate("b", 10)).toEqual({ _tag: "Allow" })
    // the window after the last failure: forgotten
    expect(t.gate("a", 6 + 60_000)).toEqual({ _tag: "Allow" })
    expect(t.failed("a", 6 + 60_000)).toBe(0)
  })

  it("caps the delay and forgets an address on success", () => {
    const t = new AuthThrottle({ ...LIMITS, refuseAfter: 100 })
    let last = 0
    for (let i = 0; i < 20; i++) last = t.failed("a", i)
    expect(last).toBe(1_000)
    t.succeeded("a")
    expect(t.failed("a", 30)).toBe(0)
  })

  it.prop(
    "remembers at most maxAddresses, and never delays longer than the cap",
    [
      Schema.Array(
        Schema.Struct({
          address: Schema.Literals(["a", "b", "c", "d", "e"]),
          ok: Schema.Boolean,
          dt: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 30_000 }))
        })
      ).check(Schema.isMaxLength(300))
    ],
    ([events]) => {
      const t = new AuthThrottle(LIMITS)
      let now = 0
      for (const e of events) {
        now += e.dt
        if (e.ok) t.succeeded(e.address)
        else {
          const delay = t.failed(e.address, now)
          expect(delay).toBeGreaterThanOrEqual(0)
          expect(delay).toBeLessThanOrEqual(LIMITS.maxDelayMs)
        }
        expect(t.size).toBeLessThanOrEqual(LIMITS.maxAddresses)
        const gate = t.gate(e.address, now)
        if (gate._tag === "Refuse") expect(gate.retryAfterMs).toBeLessThanOrEqual(LIMITS.windowMs)
      }
    }
  )
})
