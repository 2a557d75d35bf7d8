import { assert, describe, it } from "@effect/vitest"
import { Schema } from "effect"
import { isValidRateLimit, perSecond, type RateLimit, TokenBucket, takeTokens, tokensAt } from "../../src/domain/RateLimit.ts"

const int = (minimum: number, maximum: number) => Schema.Int.check(Schema.isBetween({ minimum, maximum }))

/** A schedule of takes: gaps between them (ms) and how many tokens each asks for. */
const Takes = Schema.Array(Schema.Struct({ gap: int(0, 2_000), n: int(1, 50) })).check(Schema.isBetweenLength(1, 200))

describe("RateLimit token bucket", () => {
  it("starts full, refuses what is not there, and refills at the rate up to the burst", () => {
    const limit: RateLimit = { perSecond: 10, burst: 5 }
    const bucket = new TokenBucket(limit, 1_000)
    assert.isTrue(bucket.take(1_000, 5))
    assert.isFalse(bucket.take(1_000, 1))
    assert.isFalse(bucket.take(1_099, 1)) // 0.99 tokens
    assert.isTrue(bucket.take(1_100, 1))
    assert.strictEqual(bucket.available(60_000), 5)
    assert.strictEqual(tokensAt(limit, 2, 5_000, 4_000), 2) // a clock going back refills nothing
    assert.strictEqual(takeTokens(limit, 0, 0, 100, 2), -1)
    assert.deepStrictEqual(perSecond(7), { perSecond: 7, burst: 7 })
    assert.isFalse(isValidRateLimit({ perSecond: 0, burst: 1 }))
    assert.isFalse(isValidRateLimit({ perSecond: 1, burst: 0.5 }))
    assert.isFalse(isValidRateLimit({ perSecond: Infinity, burst: 1 }))
    assert.isTrue(isValidRateLimit(perSecond(1)))
  })

  it.prop(
    "over any schedule, what is granted never exceeds the burst plus the rate times the time elapsed",
    [int(1, 10_000), int(1, 10_000), Takes],
    ([rate, burst, takes]) => {
      const limit: RateLimit = { perSecond: rate, burst }
      const bucket = new TokenBucket(limit, 0)
      let now = 0
      let granted = 0
      for (const { gap, n } of takes) {
        now += gap
        if (bucket.take(now, n)) granted += n
        assert.isAtMost(granted, burst + (rate * now) / 1000 + 1e-6)
        assert.isAtMost(bucket.available(now), burst)
        assert.isAtLeast(bucket.available(now), 0)
      }
    }
  )

  it.prop(
    "a demand at or below the rate, in takes no larger than the burst, is never refused",
    [int(1, 100_000), int(1, 1_000), int(1, 300)],
    ([rate, intervalMs, count]) => {
      // each take asks for what flowed in since the previous one (at least one token), spaced evenly
      const n = Math.max(1, Math.floor((rate * intervalMs) / 1000))
      const limit: RateLimit = { perSecond: rate, burst: Math.max(n, rate) }
      const spacing = Math.ceil((n * 1000) / rate)
      const bucket = new TokenBucket(limit, 0)
      for (let i = 0; i < count; i++) assert.isTrue(bucket.take(i * spacing, n), `take ${i} of ${n}`)
    }
  )

  it.prop(
    "a refused take changes nothing: the next take sees the same tokens as without it",
    [int(1, 1_000), int(1, 100), Takes],
    ([rate, burst, takes]) => {
      const limit: RateLimit = { perSecond: rate, burst }
      const probed = new TokenBucket(limit, 0)
      const plain = new TokenBucket(limit, 0)
      let now = 0
      for (const { gap, n } of takes) {
        now += gap
        // an impossible take first, on one bucket only
        assert.isFalse(probed.take(now, burst + 1))
        assert.strictEqual(probed.take(now, n), plain.take(now, n))
        assert.closeTo(probed.available(now), plain.available(now), 1e-9)
      }
    }
  )
})
