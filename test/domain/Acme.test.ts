import { assert, describe, it } from "@effect/vitest"
import { Clock, Effect, Redacted, Schema } from "effect"
import { TestClock } from "effect/testing"
import {
  AcmeBackoffInitialMs,
  AcmeBackoffJitter,
  AcmeBackoffMaxMs,
  AcmeRateLimitBackoffMs,
  AcmeRetryAfterMaxMs,
  AcmeUnusedGraceMs,
  backoffMs,
  DefaultRenewBeforeMs,
  HttpChallengePrefix,
  httpChallengeToken,
  isRateLimited,
  MinRenewalIntervalMs,
  parseRetryAfter,
  renewAt,
  stillOrdered,
  storedFiles
} from "../../src/domain/Acme.ts"
import { decodeHello, encodeHello, ProtocolVersion } from "../../src/domain/ControlMessage.ts"
import { RouteDefinition, tlsCertificateProblem, usesAcme } from "../../src/domain/Route.ts"

const day = 24 * 60 * 60 * 1000

describe("Acme (pure)", () => {
  it("pins the numbers operators read about", () => {
    assert.strictEqual(DefaultRenewBeforeMs, 30 * day)
    assert.strictEqual(AcmeBackoffInitialMs, 60_000)
    assert.strictEqual(AcmeBackoffMaxMs, 6 * 60 * 60 * 1000)
    assert.strictEqual(AcmeRateLimitBackoffMs, 60 * 60 * 1000)
    assert.strictEqual(AcmeBackoffJitter, 0.2)
    assert.strictEqual(MinRenewalIntervalMs, 60 * 60 * 1000)
    assert.strictEqual(AcmeRetryAfterMaxMs, 24 * 60 * 60 * 1000)
    assert.strictEqual(AcmeUnusedGraceMs, 10 * 60 * 1000)
    assert.strictEqual(HttpChallengePrefix, "/.well-known/acme-challenge/")
  })

  it("backoff doubles from one minute, is capped at 6 hours, and adds at most 20 % jitter", () => {
    assert.strictEqual(backoffMs(1, 0), 60_000)
    assert.strictEqual(backoffMs(2, 0), 120_000)
    assert.strictEqual(backoffMs(3, 0), 240_000)
    assert.strictEqual(backoffMs(50, 0), AcmeBackoffMaxMs)
    assert.strictEqual(backoffMs(1_000_000, 0), AcmeBackoffMaxMs)
    assert.strictEqual(backoffMs(1, 0.5), 66_000)
    assert.strictEqual(backoffMs(50, 0.999999), Math.round(AcmeBackoffMaxMs * (1 + 0.2 * 0.999999)))
    for (let failures = 1; failures < 40; failures++) {
      for (const r of [0, 0.3, 0.99]) {
        const wait = backoffMs(failures, r)
        assert.isAtLeast(wait, AcmeBackoffInitialMs)
        assert.isAtMost(wait, AcmeBackoffMaxMs * 1.2)
      }
    }
  })

  it("the CA's Retry-After is waited for, up to a day; a rate limit without one waits an hour", () => {
    const hour = 60 * 60 * 1000
    assert.strictEqual(backoffMs(1, 0, {}), AcmeBackoffInitialMs)
    assert.strictEqual(backoffMs(1, 0, { rateLimited: true }), AcmeRateLimitBackoffMs)
    // the CA's Retry-After, rate limited or not, shorter or longer than the hour and the 6-hour cap
    assert.strictEqual(backoffMs(1, 0, { rateLimited: true, retryAfterMs: 2 * hour }), 2 * hour)
    assert.strictEqual(backoffMs(1, 0, { rateLimited: true, retryAfterMs: 5 * 60_000 }), 5 * 60_000)
    assert.strictEqual(backoffMs(1, 0, { retryAfterMs: 10 * hour }), 10 * hour)
    assert.strictEqual(backoffMs(1, 0, { retryAfterMs: 100 * hour }), AcmeRetryAfterMaxMs)
    // never sooner than the exponential backoff, and jitter only lengthens it
    assert.strictEqual(backoffMs(3, 0, { retryAfterMs: 1_000 }), 240_000)
    assert.strictEqual(backoffMs(1, 0, { retryAfterMs: -5 }), AcmeBackoffInitialMs)
    assert.strictEqual(backoffMs(1, 0.5, { retryAfterMs: 2 * hour }), Math.round(2 * hour * 1.1))
    // a longer exponential wait is kept
    assert.strictEqual(backoffMs(9, 0, { rateLimited: true }), Math.min(AcmeBackoffMaxMs, 60_000 * 2 ** 8))
    assert.isTrue(isRateLimited("urn:ietf:params:acme:error:rateLimited: too many certificates already issued"))
    assert.isFalse(isRateLimited("urn:ietf:params:acme:error:connection: Fetching http://a.test/: connection refused"))
  })

  it.effect("Retry-After: seconds, or an HTTP date read against the clock", () =>
    Effect.gen(function*() {
      yield* TestClock.setTime(Date.parse("2026-03-01T12:00:00Z"))
      const now = yield* Clock.currentTimeMillis
      assert.strictEqual(parseRetryAfter("120", now), 120_000)
      assert.strictEqual(parseRetryAfter(" 0 ", now), 0)
      assert.strictEqual(parseRetryAfter("Sun, 01 Mar 2026 13:30:00 GMT", now), 90 * 60_000)
      // a date already past is no wait at all
      assert.strictEqual(parseRetryAfter("Sun, 01 Mar 2026 11:00:00 GMT", now), 0)
      yield* TestClock.adjust("1 hour")
      assert.strictEqual(parseRetryAfter("Sun, 01 Mar 2026 13:30:00 GMT", yield* Clock.currentTimeMillis), 30 * 60_000)
      for (const bad of ["", "-5", "1.5", "soon", "2026-03-01T13:30:00Z", "9".repeat(65)]) {
        assert.isUndefined(parseRetryAfter(bad, now), bad)
      }
      // what the manager waits after a 429 with Retry-After: 7200 at the first failure
      assert.strictEqual(backoffMs(1, 0, { rateLimited: true, retryAfterMs: parseRetryAfter("7200", now) }), 2 * 60 * 60 * 1000)
    }))

  it.effect("a name no route wants is still ordered for the grace, then not", () =>
    Effect.gen(function*() {
      assert.isTrue(stillOrdered(undefined, yield* Clock.currentTimeMillis))
      const gone = yield* Clock.currentTimeMillis
      yield* TestClock.adjust(AcmeUnusedGraceMs - 1)
      assert.isTrue(stillOrdered(gone, yield* Clock.currentTimeMillis))
      yield* TestClock.adjust(1)
      assert.isFalse(stillOrdered(gone, yield* Clock.currentTimeMillis))
    }))

  it("renewal: renewBefore ahead of expiry, a third of the lifetime for short certificates, never within an hour of issuing", () => {
    const notBeforeMs = 0
    assert.strictEqual(renewAt({ notBeforeMs, notAfterMs: 90 * day }, 30 * day), 60 * day)
    // a 7-day certificate with a 30-day renewBefore: renewed when a third of its life is left
    assert.strictEqual(renewAt({ notBeforeMs, notAfterMs: 6 * day }, 30 * day), 4 * day)
    // a certificate already due when it was obtained waits at least MinRenewalIntervalMs
    const issuedAtMs = 89 * day
    assert.strictEqual(renewAt({ notBeforeMs, notAfterMs: 90 * day }, 30 * day, issuedAtMs), issuedAtMs + MinRenewalIntervalMs)
    assert.strictEqual(renewAt({ notBeforeMs, notAfterMs: 90 * day }, 30 * day, 1 * day), 60 * day)
  })

  it("challenge paths: only well-formed tokens under the prefix", () => {
    assert.strictEqual(httpChallengeToken("/.well-known/acme-challenge/abc-DEF_123"), "abc-DEF_123")
    assert.isUndefined(httpChallengeToken("/.well-known/acme-challenge/"))
    assert.isUndefined(httpChallengeToken("/.well-known/acme-challenge/../secret"))
    assert.isUndefined(httpChallengeToken("/.well-known/acme-challenge/a?b=c"))
    assert.isUndefined(httpChallengeToken("/.well-known/acme-challenge/a/b"))
    assert.isUndefined(httpChallengeToken("/well-known/acme-challenge/abc"))
    assert.isUndefined(httpChallengeToken(HttpChallengePrefix + "x".repeat(257)))
  })

  it("store layout: one directory per name", () => {
    assert.deepStrictEqual(storedFiles("app.example.com"), {
      dir: "app.example.com",
      cert: "app.example.com/fullchain.pem",
      key: "app.example.com/key.pem"
    })
  })
})

describe("TLS routes with acme", () => {
  const decode = Schema.decodeUnknownExit(RouteDefinition)

  it("take acme or cert and key, never both nor neither", () => {
    assert.isUndefined(tlsCertificateProblem({ acme: true }))
    assert.isUndefined(tlsCertificateProblem({ cert: "c", key: "k" }))
    assert.match(tlsCertificateProblem({ acme: true, cert: "c", key: "k" })!, /either/)
    assert.match(tlsCertificateProblem({})!, /needs/)
    assert.match(tlsCertificateProblem({ cert: "c" })!, /together/)
    const ok = decode({ _tag: "Tls", port: 443, domainSuffix: "app.test", acme: true, then: "http" })
    assert.strictEqual(ok._tag, "Success")
    if (ok._tag === "Success") assert.isTrue(usesAcme(ok.value))
    assert.strictEqual(decode({ _tag: "Tls", port: 443, domainSuffix: "app.test", then: "http" })._tag, "Failure")
    assert.strictEqual(decode({ _tag: "Tls", port: 443, domainSuffix: "app.test", acme: true, cert: "c", key: "k", then: "http" })._tag, "Failure")
    assert.strictEqual(decode({ _tag: "Tls", port: 443, domainSuffix: "app.test", acme: false, then: "http" })._tag, "Failure")
  })

  it("travel in a Hello", () => {
    const route = { _tag: "Tls" as const, port: 443, domainSuffix: "app.test", acme: true as const, then: "tcp" as const }
    const framed = encodeHello({ _tag: "Hello", version: ProtocolVersion, token: Redacted.make("t"), listeners: [route] })
    const decoded = decodeHello(framed.subarray(4))
    assert.notInstanceOf(decoded, Error)
    if (!(decoded instanceof Error)) assert.deepStrictEqual(decoded.listeners, [route])
  })
})
