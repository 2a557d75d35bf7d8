import { assert, describe, it } from "@effect/vitest"
import { Schema } from "effect"
import {
  CLIENT_LIMIT_DEFAULTS,
  clientKey,
  DEFAULT_MIN_REQUEST_BODY_BYTES_PER_SECOND,
  DEFAULT_MIN_RESPONSE_BYTES_PER_SECOND,
  DEFAULT_REQUEST_BODY_GRACE_PERIOD_MS,
  DEFAULT_RESPONSE_GRACE_PERIOD_MS,
  DEFAULT_UPSTREAM_SLOT_WAIT_MS,
  RATE_CHECK_INTERVAL_MS,
  requestBodyTooSlow,
  responseTakeDeadlineMs,
  SLOTS_PER_CLIENT_DIVISOR,
  slotsPerClient
} from "../../src/domain/ClientLimits.ts"

const Bytes = Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 1_000_000_000 }))
const Ms = Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 86_400_000 }))
const Rate = Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 100_000_000 }))

describe("ClientLimits", () => {
  it("pins the defaults (Kestrel's MinRequestBodyDataRate: 240 B/s after 5 s)", () => {
    assert.strictEqual(DEFAULT_MIN_REQUEST_BODY_BYTES_PER_SECOND, 240)
    assert.strictEqual(DEFAULT_REQUEST_BODY_GRACE_PERIOD_MS, 5_000)
    assert.strictEqual(DEFAULT_MIN_RESPONSE_BYTES_PER_SECOND, 240)
    assert.strictEqual(DEFAULT_RESPONSE_GRACE_PERIOD_MS, 5_000)
    assert.strictEqual(DEFAULT_UPSTREAM_SLOT_WAIT_MS, 5_000)
    assert.strictEqual(SLOTS_PER_CLIENT_DIVISOR, 4)
    assert.strictEqual(RATE_CHECK_INTERVAL_MS, 1_000)
    assert.deepStrictEqual(CLIENT_LIMIT_DEFAULTS, {
      minRequestBodyBytesPerSecond: 240,
      requestBodyGracePeriodMs: 5_000,
      minResponseBytesPerSecond: 240,
      responseGracePeriodMs: 5_000,
      maxUpstreamSlotsPerClient: undefined,
      upstreamSlotWaitMs: 5_000
    })
  })

  it("a request body is too slow only past the grace period and below the average rate", () => {
    // 240 B/s, 5 s grace: one byte every 5 s
    assert.isFalse(requestBodyTooSlow(240, 5_000, 1, 5_000))
    assert.isTrue(requestBodyTooSlow(240, 5_000, 1, 5_001))
    // exactly at the rate is enough
    assert.isFalse(requestBodyTooSlow(240, 5_000, 2_400, 10_000))
    assert.isTrue(requestBodyTooSlow(240, 5_000, 2_399, 10_000))
    // 0 disables the check
    assert.isFalse(requestBodyTooSlow(0, 0, 0, 1_000_000))
  })

  it.prop(
    "a body at or above the minimum rate is never too slow; one below it is once past the grace period",
    { rate: Rate, grace: Ms, elapsed: Ms },
    ({ elapsed, grace, rate }) => {
      const enough = Math.ceil((rate * elapsed) / 1000)
      assert.isFalse(requestBodyTooSlow(rate, grace, enough, elapsed))
      if (enough > 0) assert.strictEqual(requestBodyTooSlow(rate, grace, enough - 1, elapsed), elapsed > grace)
    }
  )

  it.prop(
    "more bytes or less time never makes a body slower",
    { rate: Rate, grace: Ms, bytes: Bytes, elapsed: Ms, more: Bytes, less: Ms },
    ({ bytes, elapsed, grace, less, more, rate }) => {
      if (!requestBodyTooSlow(rate, grace, bytes, elapsed)) {
        assert.isFalse(requestBodyTooSlow(rate, grace, bytes + more, Math.max(0, elapsed - less)))
      }
    }
  )

  it("a client has the grace period plus the queued bytes at the minimum rate to take them", () => {
    assert.strictEqual(responseTakeDeadlineMs(240, 5_000, 2_400), 15_000)
    assert.strictEqual(responseTakeDeadlineMs(1_000_000, 0, 512 * 1024), 524.288)
    assert.strictEqual(responseTakeDeadlineMs(0, 5_000, 1), Infinity)
  })

  it.prop(
    "a client reading at the minimum rate takes any queue before its deadline",
    { rate: Rate, grace: Ms, queued: Bytes },
    ({ grace, queued, rate }) => {
      const takesMs = (queued * 1000) / rate
      assert.isAtLeast(responseTakeDeadlineMs(rate, grace, queued), takesMs + grace)
    }
  )

  it("slots per client: a quarter of the pool by default (at least one), a number as given, 0 = no cap", () => {
    assert.strictEqual(slotsPerClient(undefined, 256), 64)
    assert.strictEqual(slotsPerClient(undefined, 4), 1)
    assert.strictEqual(slotsPerClient(undefined, 1), 1)
    assert.strictEqual(slotsPerClient(10, 256), 10)
    assert.strictEqual(slotsPerClient(0, 256), Infinity)
  })

  it.prop(
    "the default share leaves most of any pool of two or more to other clients",
    { pool: Schema.Int.check(Schema.isBetween({ minimum: 2, maximum: 65_536 })) },
    ({ pool }) => {
      const share = slotsPerClient(undefined, pool)
      assert.isAtLeast(share, 1)
      assert.isAtMost(share, pool / 2)
    }
  )

  it("client keys: IPv4-mapped addresses count as IPv4; peers without an address are not counted", () => {
    assert.strictEqual(clientKey("::ffff:127.0.0.2"), "127.0.0.2")
    assert.strictEqual(clientKey("127.0.0.2"), "127.0.0.2")
    assert.strictEqual(clientKey("::1"), "::1")
    assert.strictEqual(clientKey(undefined), undefined)
    assert.strictEqual(clientKey(""), undefined)
  })
})
