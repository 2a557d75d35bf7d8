/**
 * The cluster's certificate store: its commands on a real redis-server (the lock taken once, renewed and
 * deleted only with its holder's token, expiring with its lease; entries sealed, bounded and bound to the
 * secret; challenges handed over and acknowledged), and the lock holder's lease renewal in virtual time
 * over a lock kept in memory whose expiry follows the TestClock.
 */
import { assert, describe, it } from "@effect/vitest"
import { generateKeyPairSync } from "node:crypto"
import { Clock, Deferred, Effect, Exit, Fiber, Redacted } from "effect"
import { TestClock } from "effect/testing"
import { certificateKey, type ChallengeMessage, MaxSharedCertificateBytes, orderLockKey } from "../../../src/domain/AcmeShared.ts"
import { holdingLock, redisSharedCertificates, type SharedCertificatesShape } from "../../../src/services/acme/SharedCertificates.ts"
import { requireRedis, startRedis } from "../../support/redis.ts"

const key = generateKeyPairSync("ec", { namedCurve: "prime256v1" }).privateKey.export({ type: "pkcs8", format: "pem" }).toString()
const certificate = { cert: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", key }
const secret = Redacted.make("a-cluster-secret-of-enough-length")
/** Longest real wait in these tests. */
const WaitLimitMs = 10_000

const withRedis = Effect.acquireRelease(Effect.promise(() => startRedis()), (r) => Effect.promise(() => r.cleanup()))
const rawClient = (url: string) =>
  Effect.acquireRelease(
    Effect.promise(async () => {
      const { Redis } = await import("ioredis")
      const redis = new Redis(url, { maxRetriesPerRequest: 0 })
      await redis.ping()
      return redis
    }),
    (redis) => Effect.sync(() => redis.disconnect(false))
  )

const until = (what: string, check: () => Promise<boolean> | boolean) =>
  Effect.promise(async () => {
    const deadline = Date.now() + WaitLimitMs
    while (!(await check())) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
      await new Promise((r) => setTimeout(r, 20))
    }
  })

describe.runIf(requireRedis())("the cluster's certificate store on redis-server", () => {
  it.live("the order lock: taken once, renewed and deleted only with its token, expiring with its lease", () =>
    Effect.gen(function*() {
      const redis = yield* withRedis
      const raw = yield* rawClient(redis.url)
      const g1 = yield* redisSharedCertificates({ url: redis.url, node: "g1", secret, commandTimeoutMs: 2_000, lockLeaseMs: 300 })
      const g2 = yield* redisSharedCertificates({ url: redis.url, node: "g2", secret, commandTimeoutMs: 2_000, lockLeaseMs: 300 })
      const t1 = g1.token()
      const t2 = g2.token()
      assert.match(t1, /^g1:/)
      assert.isTrue(yield* g1.lock("a.test", t1))
      assert.isFalse(yield* g2.lock("a.test", t2))
      assert.strictEqual(yield* Effect.promise(() => raw.get(orderLockKey("a.test"))), t1)
      assert.isFalse(yield* g2.extend("a.test", t2))
      assert.isFalse(yield* g2.unlock("a.test", t2))
      assert.isTrue(yield* g1.extend("a.test", t1))
      assert.isTrue(yield* g1.unlock("a.test", t1))
      assert.strictEqual(yield* Effect.promise(() => raw.exists(orderLockKey("a.test"))), 0)
      // a holder that stops renewing: the lock goes with its lease and another takes it
      assert.isTrue(yield* g1.lock("b.test", t1))
      yield* until("the lease to run out", async () => (await raw.exists(orderLockKey("b.test"))) === 0)
      assert.isTrue(yield* g2.lock("b.test", t2))
      assert.isFalse(yield* g1.unlock("b.test", t1), "the old holder cannot delete the new holder's lock")
      assert.strictEqual(yield* Effect.promise(() => raw.get(orderLockKey("b.test"))), t2)
    }).pipe(Effect.scoped))

  it.live("entries: the key sealed (no PRIVATE KEY in Redis), expiring with the certificate, announced; another secret or an oversized entry is refused", () =>
    Effect.gen(function*() {
      const redis = yield* withRedis
      const raw = yield* rawClient(redis.url)
      const g1 = yield* redisSharedCertificates({ url: redis.url, node: "g1", secret, commandTimeoutMs: 2_000 })
      const g2 = yield* redisSharedCertificates({ url: redis.url, node: "g2", secret, commandTimeoutMs: 2_000 })
      const stored: Array<string> = []
      const challenges: Array<ChallengeMessage> = []
      yield* g2.subscribe({ onStored: (name) => stored.push(name), onChallenge: (m) => challenges.push(m) })
      yield* g1.subscribe({ onStored: () => {}, onChallenge: () => {} })
      yield* until("the subscriptions", async () => (await raw.pubsub("NUMSUB", "switchyard:acme-certificates"))[1] === 2)
      assert.isUndefined(yield* g2.read("c.test"))
      yield* g1.write("c.test", certificate, 60_000)
      const value = yield* Effect.promise(() => raw.get(certificateKey("c.test")))
      assert.include(value!, "BEGIN CERTIFICATE")
      assert.notInclude(value!, "PRIVATE KEY")
      const pttl = yield* Effect.promise(() => raw.pttl(certificateKey("c.test")))
      assert.isAbove(pttl, 0)
      assert.isAtMost(pttl, 60_000)
      assert.deepStrictEqual(yield* g2.read("c.test"), certificate)
      yield* until("the announcement", () => stored.includes("c.test"))
      // a gateway with another secret cannot open it
      const other = yield* redisSharedCertificates({ url: redis.url, node: "g3", secret: Redacted.make("another-secret-of-enough-length"), commandTimeoutMs: 2_000 })
      const refused = yield* Effect.exit(other.read("c.test"))
      assert.isTrue(Exit.isFailure(refused))
      assert.match(JSON.stringify(refused), /not decryptable with this cluster's secret/)
      // a value larger than an entry may be is refused without being read whole
      yield* Effect.promise(() => raw.set(certificateKey("big.test"), "x".repeat(MaxSharedCertificateBytes * 4)))
      const big = yield* Effect.exit(g1.read("big.test"))
      assert.match(JSON.stringify(big), /is too large/)
      const oversized = yield* Effect.exit(g1.write("huge.test", { cert: "x".repeat(MaxSharedCertificateBytes), key }, 60_000))
      assert.match(JSON.stringify(oversized), /larger than/)
      // a challenge handed over is acknowledged by every gateway subscribed before the CA is asked to validate
      const acknowledged = yield* g1.shareChallenge("add", { type: "http-01", token: "tok", keyAuthorization: "tok.thumb" })
      assert.strictEqual(acknowledged, 2)
      assert.deepStrictEqual(challenges.map((m) => [m.node, m.op, m.challenge]), [["g1", "add", { type: "http-01", token: "tok", keyAuthorization: "tok.thumb" }]])
    }).pipe(Effect.scoped))
})

/** A lock with Redis' semantics for what `holdingLock` uses, its expiry on `clock`; counts renewals. */
const memoryLock = (clock: Clock.Clock, lockLeaseMs: number) => {
  const locks = new Map<string, { token: string; expiresAt: number }>()
  let renewals = 0
  const live = (name: string) => {
    const lock = locks.get(name)
    if (lock !== undefined && lock.expiresAt <= clock.currentTimeMillisUnsafe()) locks.delete(name)
    return locks.get(name)
  }
  const unused = () => Effect.die(new Error("not used by holdingLock"))
  const store: SharedCertificatesShape = {
    node: "g1",
    lockLeaseMs,
    token: () => `g1:${Math.random()}`,
    lock: (name, token) =>
      Effect.sync(() => {
        if (live(name) !== undefined) return false
        locks.set(name, { token, expiresAt: clock.currentTimeMillisUnsafe() + lockLeaseMs })
        return true
      }),
    extend: (name, token) =>
      Effect.sync(() => {
        const lock = live(name)
        if (lock?.token !== token) return false
        renewals++
        lock.expiresAt = clock.currentTimeMillisUnsafe() + lockLeaseMs
        return true
      }),
    unlock: (name, token) =>
      Effect.sync(() => {
        if (live(name)?.token !== token) return false
        locks.delete(name)
        return true
      }),
    read: unused,
    write: unused,
    shareChallenge: unused,
    subscribe: () => Effect.void
  }
  return { store, holder: (name: string) => live(name)?.token, renewals: () => renewals }
}

describe("holdingLock (virtual time)", () => {
  it.effect("the holder renews its lease every third of it while the order runs: the lock outlives many leases; interrupted, it is deleted", () =>
    Effect.gen(function*() {
      const clock = yield* Clock.Clock
      const lease = 60_000
      const { store, holder, renewals } = memoryLock(clock, lease)
      const token = "g1:one"
      assert.isTrue(yield* store.lock("d.test", token))
      const done = yield* Deferred.make<string>()
      const order = yield* Effect.forkChild(holdingLock(store, "d.test", token, Deferred.await(done)))
      for (let i = 0; i < 10; i++) yield* TestClock.adjust(lease / 3)
      assert.strictEqual(renewals(), 10)
      assert.strictEqual(holder("d.test"), token, "still held after ten thirds of a lease")
      assert.isFalse(yield* store.lock("d.test", "g2:other"))
      yield* Deferred.succeed(done, "issued")
      assert.strictEqual(yield* Fiber.join(order), "issued")
      // no renewal once the order ended: the lease runs out (the caller deletes it after storing the certificate)
      yield* TestClock.adjust(lease)
      assert.strictEqual(renewals(), 10)
      assert.isUndefined(holder("d.test"))

      assert.isTrue(yield* store.lock("e.test", token))
      const stuck = yield* Effect.forkChild(holdingLock(store, "e.test", token, Effect.never))
      yield* TestClock.adjust(lease / 3)
      yield* Fiber.interrupt(stuck)
      assert.isUndefined(holder("e.test"), "an interrupted holder deletes its lock")
    }))

  it.effect("a holder whose lease ran out (stalled past it) finds the lock taken by another and does not take it back", () =>
    Effect.gen(function*() {
      const clock = yield* Clock.Clock
      const lease = 3_000
      const { store, holder, renewals } = memoryLock(clock, lease)
      assert.isTrue(yield* store.lock("f.test", "g1:one"))
      // the lease ran out before the holder's first renewal (a stalled process): another gateway takes the name
      yield* TestClock.adjust(lease)
      assert.isTrue(yield* store.lock("f.test", "g2:two"))
      const order = yield* Effect.forkChild(holdingLock(store, "f.test", "g1:one", Effect.sleep("2 seconds")))
      yield* TestClock.adjust(2_000)
      yield* Fiber.join(order)
      assert.strictEqual(renewals(), 0, "the old holder's renewals found another token and changed nothing")
      assert.strictEqual(holder("f.test"), "g2:two")
    }))
})
