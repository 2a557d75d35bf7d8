/**
 * The lease loop in virtual time, over a lease store kept in memory with Redis' semantics for what the
 * loop uses (SET with PX, DEL, SCAN by prefix), whose expiries follow the TestClock and which can be made
 * unreachable. The same loop on a real redis-server is `test/integration/cluster-leases.test.ts`.
 */
import { assert, describe, it } from "@effect/vitest"
import { Clock, Context, Effect, Exit, Layer, Redacted, Scope } from "effect"
import { TestClock } from "effect/testing"
import { encodeLeaseValue, leaseKey, type LeaseTableDiff } from "../../../src/domain/ClusterLease.ts"
import { type ClusterConfig, makeClusterLeases, MinPublishIntervalMs } from "../../../src/services/cluster/ClusterLeases.ts"
import { type LeaseStore, LeaseStoreError } from "../../../src/services/cluster/LeaseStore.ts"
import { Registry } from "../../../src/services/Registry.ts"
import { makeTestBackend } from "../RegistryBackends.ts"

const config: ClusterConfig = {
  redisUrl: "redis://127.0.0.1:6379",
  node: "g1",
  advertise: { host: "10.0.0.1", port: 7400 },
  secret: Redacted.make("a-secret-of-enough-length"),
  leaseTtlMs: 15_000,
  heartbeatMs: 5_000
}

/** Keys with values and expiry times on the clock the store is given; `reachable` false fails every call. */
const memoryStore = (clock: Clock.Clock) => {
  const data = new Map<string, { value: string; expiresAt: number }>()
  const subscribers = new Set<(message: string) => void>()
  let reachable = true
  const live = () => {
    const now = clock.currentTimeMillisUnsafe()
    for (const [key, entry] of data) if (entry.expiresAt <= now) data.delete(key)
    return data
  }
  const guard = <A>(f: () => A) =>
    Effect.suspend(() => reachable ? Effect.sync(f) : Effect.fail(new LeaseStoreError({ reason: "Unreachable", message: "Redis SET: Connection is closed." })))
  const store: LeaseStore = {
    put: (entries, ttlMs) =>
      guard(() => {
        const now = clock.currentTimeMillisUnsafe()
        for (const [key, value] of entries) data.set(key, { value, expiresAt: now + ttlMs })
      }),
    remove: (keys) => guard(() => keys.forEach((k) => data.delete(k))),
    read: (prefix, maxKeys) =>
      guard(() => {
        const entries = [...live()].filter(([k]) => k.startsWith(prefix)).map(([k, e]) => [k, e.value] as const)
        return { entries: entries.slice(0, maxKeys), truncated: entries.length > maxKeys }
      }),
    announce: (message) => guard(() => subscribers.forEach((s) => s(message))),
    onAnnouncement: (onMessage) =>
      Effect.acquireRelease(Effect.sync(() => subscribers.add(onMessage)), () => Effect.sync(() => void subscribers.delete(onMessage))).pipe(Effect.asVoid)
  }
  return {
    store,
    keys: () => [...live().keys()].sort(),
    expiryOf: (key: string) => live().get(key)?.expiresAt,
    setReachable: (up: boolean) => void (reachable = up),
    /** Another gateway's lease, written as that gateway would. */
    putRemote: (node: string, port: number) => {
      const route = { _tag: "Http" as const, port }
      const key = leaseKey(node, route)
      data.set(key, { value: encodeLeaseValue({ v: 1, node, relay: `${node}.internal:7400`, route }), expiresAt: clock.currentTimeMillisUnsafe() + config.leaseTtlMs })
      return key
    },
    /** Writes a value that is not a lease. */
    putRaw: (key: string, value: string) => data.set(key, { value, expiresAt: clock.currentTimeMillisUnsafe() + config.leaseTtlMs })
  }
}

const withRegistry = <A, E>(self: Effect.Effect<A, E, Registry | Scope.Scope>) =>
  self.pipe(Effect.scoped, Effect.provide(Registry.layer({ gracePeriod: 30_000 }) as Layer.Layer<Registry>))

/** Lets forked fibers run their turn without moving the clock. */
const settle = Effect.gen(function*() {
  for (let i = 0; i < 5; i++) yield* Effect.yieldNow
})

describe("ClusterLeases", () => {
  it.effect("publishes a lease per locally held route, renews it each heartbeat and withdraws it when the route has no backend", () =>
    withRegistry(Effect.gen(function*() {
      const registry = yield* Registry
      const clock = yield* Clock.Clock
      const mem = memoryStore(clock)
      const backendScope = yield* Scope.make()
      yield* registry.register({ _tag: "Http", port: 8000, pathPrefix: "/a" }, makeTestBackend("a")).pipe(Scope.provide(backendScope))
      const leases = yield* makeClusterLeases({ config, store: mem.store, registry, isLocal: () => true })
      yield* settle
      const key = "switchyard:lease:g1:http:8000::/a"
      assert.deepStrictEqual(mem.keys(), [key])
      assert.strictEqual(mem.expiryOf(key), config.leaseTtlMs)
      assert.strictEqual(leases.state().store, "connected")
      assert.strictEqual(leases.state().published, 1)

      // each heartbeat sets the lease again with a full TTL
      yield* TestClock.adjust(config.heartbeatMs + MinPublishIntervalMs)
      yield* settle
      assert.strictEqual(mem.expiryOf(key), config.heartbeatMs + MinPublishIntervalMs + config.leaseTtlMs)
      // well past the first TTL, the lease is still there
      yield* TestClock.adjust(4 * (config.heartbeatMs + MinPublishIntervalMs))
      yield* settle
      assert.deepStrictEqual(mem.keys(), [key])

      // the backend leaves: the route stays in its grace period, but its lease is withdrawn at once
      yield* Scope.close(backendScope, Exit.void)
      yield* TestClock.adjust(MinPublishIntervalMs)
      yield* settle
      assert.strictEqual(registry.snapshot().length, 1)
      assert.deepStrictEqual(mem.keys(), [])
      assert.strictEqual(leases.state().published, 0)
    })))

  it.effect("backends that are not local (reached over a relay link) are not published", () =>
    withRegistry(Effect.gen(function*() {
      const registry = yield* Registry
      const mem = memoryStore(yield* Clock.Clock)
      const relayed = makeTestBackend("relay g2")
      yield* registry.register({ _tag: "Tcp", port: 2222 }, relayed)
      yield* makeClusterLeases({ config, store: mem.store, registry, isLocal: (b) => b !== relayed })
      yield* settle
      assert.deepStrictEqual(mem.keys(), [])
    })))

  it.effect("reads the other gateways' leases (not its own, not malformed ones) and reports each change", () =>
    withRegistry(Effect.gen(function*() {
      const registry = yield* Registry
      const mem = memoryStore(yield* Clock.Clock)
      const diffs: Array<LeaseTableDiff> = []
      const remote = mem.putRemote("g2", 9000)
      mem.putRaw("switchyard:lease:g3:tcp:1", "{not a lease")
      yield* registry.register({ _tag: "Tcp", port: 2222 }, makeTestBackend("a"))
      const leases = yield* makeClusterLeases({
        config,
        store: mem.store,
        registry,
        isLocal: () => true,
        onChange: (diff) => Effect.sync(() => void diffs.push(diff))
      })
      yield* settle
      assert.deepStrictEqual([...leases.table().keys()], [remote])
      assert.strictEqual(leases.table().get(remote)?.relay, "g2.internal:7400")
      assert.strictEqual(diffs.length, 1)
      assert.strictEqual(diffs[0]!.added.length, 1)

      // g2 stops renewing: its lease expires in the store and leaves the table at the next read
      yield* TestClock.adjust(config.leaseTtlMs + config.heartbeatMs)
      yield* settle
      // (g1's own lease was renewed meanwhile; g2's was not)
      assert.deepStrictEqual([...leases.table().keys()], [])
      assert.strictEqual(diffs.at(-1)!.removed[0]?.node, "g2")
    })))

  it.effect("store unreachable: the last table read stays until the TTL, then is dropped; back: everything is published again", () =>
    withRegistry(Effect.gen(function*() {
      const registry = yield* Registry
      const mem = memoryStore(yield* Clock.Clock)
      const remote = mem.putRemote("g2", 9000)
      yield* registry.register({ _tag: "Tcp", port: 2222 }, makeTestBackend("a"))
      const leases = yield* makeClusterLeases({ config, store: mem.store, registry, isLocal: () => true })
      yield* settle
      assert.strictEqual(leases.table().size, 1)

      mem.setReachable(false)
      yield* TestClock.adjust(config.heartbeatMs + MinPublishIntervalMs)
      yield* settle
      assert.strictEqual(leases.state().store, "unreachable")
      assert.isFalse(leases.state().stale)
      assert.match(leases.state().lastError ?? "", /Connection is closed/)
      assert.deepStrictEqual([...leases.table().keys()], [remote], "the last table read is still in use")

      // past the TTL since the last read, the table is dropped
      yield* TestClock.adjust(2 * (config.heartbeatMs + MinPublishIntervalMs))
      yield* settle
      assert.isTrue(leases.state().stale)
      assert.strictEqual(leases.table().size, 0)

      // the store comes back empty (a restarted Redis): the next heartbeat publishes again
      for (const key of mem.keys()) yield* mem.store.remove([key]).pipe(Effect.ignore)
      mem.setReachable(true)
      mem.putRemote("g2", 9000)
      yield* TestClock.adjust(config.heartbeatMs + MinPublishIntervalMs)
      yield* settle
      assert.strictEqual(leases.state().store, "connected")
      assert.isFalse(leases.state().stale)
      assert.include(mem.keys(), "switchyard:lease:g1:tcp:2222")
      assert.strictEqual(leases.table().size, 1)
    })))

  it.effect("withdraw: its leases are deleted and not published again, while the others' are still read", () =>
    withRegistry(Effect.gen(function*() {
      const registry = yield* Registry
      const mem = memoryStore(yield* Clock.Clock)
      const remote = mem.putRemote("g2", 9000)
      yield* registry.register({ _tag: "Tcp", port: 2222 }, makeTestBackend("a"))
      const leases = yield* makeClusterLeases({ config, store: mem.store, registry, isLocal: () => true })
      yield* settle
      assert.include(mem.keys(), "switchyard:lease:g1:tcp:2222")
      yield* leases.withdraw
      assert.deepStrictEqual(mem.keys(), [remote])
      mem.putRemote("g2", 9000)
      yield* TestClock.adjust(2 * (config.heartbeatMs + MinPublishIntervalMs))
      yield* settle
      assert.deepStrictEqual(mem.keys(), [remote])
      assert.strictEqual(leases.state().published, 0)
      assert.deepStrictEqual([...leases.table().keys()], [remote])
    })))

  it.effect("deletes leases under its own name that it does not hold (left by its previous run), and publishes each route's owner", () =>
    withRegistry(Effect.gen(function*() {
      const registry = yield* Registry
      const mem = memoryStore(yield* Clock.Clock)
      const leftOver = mem.putRemote("g1", 7000)
      const owned = Object.assign(makeTestBackend("a"), { owner: { name: "team-a", shares: false } })
      yield* registry.register({ _tag: "Tcp", port: 2222 }, owned)
      const leases = yield* makeClusterLeases({ config, store: mem.store, registry, isLocal: () => true })
      yield* settle
      assert.notInclude(mem.keys(), leftOver)
      assert.deepStrictEqual(mem.keys(), ["switchyard:lease:g1:tcp:2222"])
      assert.strictEqual(leases.table().size, 0)
      const read = yield* mem.store.read("switchyard:lease:", 10)
      assert.deepStrictEqual(JSON.parse(read.entries[0]![1]).owner, { name: "team-a", shares: false })
    })))

  it.effect("a gateway whose leases changed announces it: the others read them at once, not at their next heartbeat", () =>
    withRegistry(Effect.gen(function*() {
      const registry = yield* Registry
      const mem = memoryStore(yield* Clock.Clock)
      const other = Context.get(yield* Layer.build(Registry.layer({}) as Layer.Layer<Registry>), Registry)
      const g1 = yield* makeClusterLeases({ config, store: mem.store, registry, isLocal: () => true })
      yield* makeClusterLeases({ config: { ...config, node: "g2" }, store: mem.store, registry: other, isLocal: () => true })
      yield* settle
      assert.strictEqual(g1.table().size, 0)
      // g2 gets a backend: it publishes within MinPublishIntervalMs and announces; g1 reads it then
      yield* other.register({ _tag: "Tcp", port: 2222 }, makeTestBackend("b"))
      yield* TestClock.adjust(MinPublishIntervalMs)
      yield* settle
      yield* TestClock.adjust(MinPublishIntervalMs)
      yield* settle
      assert.deepStrictEqual([...g1.table().keys()], ["switchyard:lease:g2:tcp:2222"])
    })))

  it.effect("withdraws its leases when its scope closes", () =>
    withRegistry(Effect.gen(function*() {
      const registry = yield* Registry
      const mem = memoryStore(yield* Clock.Clock)
      yield* registry.register({ _tag: "Tcp", port: 2222 }, makeTestBackend("a"))
      const scope = yield* Scope.make()
      yield* makeClusterLeases({ config, store: mem.store, registry, isLocal: () => true }).pipe(Scope.provide(scope))
      yield* settle
      assert.deepStrictEqual(mem.keys(), ["switchyard:lease:g1:tcp:2222"])
      yield* Scope.close(scope, Exit.void)
      assert.deepStrictEqual(mem.keys(), [])
    })))
})
