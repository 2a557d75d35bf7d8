/**
 * Gateways in a cluster on Debian's `redis-server`: the settings are refused without a secret; each
 * gateway publishes the routes its backends hold as leases and reads the other gateways'; a route whose
 * backend leaves is withdrawn; a gateway killed with -9 has its leases expire within the TTL; a Redis
 * restart is said in `/readyz` and `/status`, and the leases are published again once it is back.
 */
import { assert, beforeEach, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as http from "node:http"
import * as os from "node:os"
import * as path from "node:path"
import { Effect } from "effect"
import { listen, type TunnelServer } from "../../src/runtime/listen.ts"
import { addressAfter, freePort, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"
import { cleanupsPerTest } from "../support/leaks.ts"
import { type RedisServer, requireRedis, startRedis } from "../support/redis.ts"

const Token = "cluster-test-token-3b9e1d"
const Secret = "cluster-test-secret-8c41f27a"
const LeaseTtlMs = 1_500
const HeartbeatMs = 250
/** Longest wait for a change to be seen through another gateway's `/status`. */
const SeenWithinMs = 10_000

const cleanups = cleanupsPerTest()
let dir: string

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-cluster-"))
  const mine = dir
  cleanups.push(async () => fs.rmSync(mine, { recursive: true, force: true }))
})

const withRedis = async (): Promise<RedisServer> => {
  const redis = await startRedis()
  cleanups.push(() => redis.cleanup())
  return redis
}

const startGateway = async (redis: RedisServer, node: string) => {
  const relay = await freePort()
  const proc = spawnSwitchyard([
    "server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--token", Token,
    "--cluster-redis", redis.url, "--cluster-node", node, "--cluster-advertise", `127.0.0.1:${relay}`,
    "--set", `cluster.lease_ttl_ms=${LeaseTtlMs}`, "--set", `cluster.heartbeat_ms=${HeartbeatMs}`
  ], { SWITCHYARD_CLUSTER_SECRET: Secret })
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor("expose a local service")
  return { proc, control: addressAfter(proc.output(), /control port/), admin: addressAfter(proc.output(), /admin endpoint/) }
}

const startBackend = async (control: { port: number }, port: number): Promise<TunnelServer> => {
  const tunnel = await listen({ port, http: { pathPrefix: "/" } }, { server: `127.0.0.1:${control.port}`, token: Token, timeoutMs: 20_000 })
  const server = tunnel.serve(http.createServer((req, res) => res.end(`hello ${req.url}`)))
  cleanups.push(() => new Promise<void>((resolve) => tunnel.close(() => { server.close(); resolve() })))
  return tunnel
}

interface ClusterStatus {
  readonly node: string
  readonly store: string
  readonly stale: boolean
  readonly published: number
  readonly leases: ReadonlyArray<{ readonly node: string; readonly route: string; readonly relay: string }>
}

const clusterOf = async (admin: { port: number }): Promise<ClusterStatus> => JSON.parse((await get(admin.port, "/status")).body).cluster

/** Polls until `check` holds, failing with the last status after `SeenWithinMs`. */
const eventually = async (admin: { port: number }, what: string, check: (s: ClusterStatus) => boolean): Promise<ClusterStatus> => {
  const deadline = Date.now() + SeenWithinMs
  let last: ClusterStatus | undefined
  while (Date.now() < deadline) {
    last = await clusterOf(admin)
    if (check(last)) return last
    await new Promise((r) => setTimeout(r, 50))
  }
  throw new Error(`not within ${SeenWithinMs} ms: ${what}; last /status cluster: ${JSON.stringify(last)}`)
}

/** The remaining lifetime of a key in ms, as Redis says it (-2: no such key). */
const redisPttl = async (redis: RedisServer, key: string): Promise<number> => {
  const { Redis } = await import("ioredis")
  const client = new Redis(redis.url, { lazyConnect: true, maxRetriesPerRequest: 0 })
  try {
    await client.connect()
    return await client.pttl(key)
  } finally {
    client.disconnect()
  }
}

const hasLease = (node: string, route: string) => (s: ClusterStatus) => s.leases.some((l) => l.node === node && l.route === route)

describe("cluster settings", () => {
  it.live("a cluster without a secret is refused before anything is bound (exit 78, one line)", () =>
    Effect.promise(async () => {
      const proc = spawnSwitchyard([
        "server", "--check-config", "--cluster-redis", "redis://127.0.0.1:1", "--cluster-node", "g1", "--cluster-advertise", "127.0.0.1:7400"
      ], { SWITCHYARD_CLUSTER_SECRET: "" })
      const code = await proc.exited
      assert.strictEqual(code, 78)
      const lines = proc.output().trim().split("\n")
      assert.strictEqual(lines.length, 1, proc.output())
      assert.match(lines[0]!, /cluster\.secret: required with cluster\.redis/)
    }))

  it.live("a short secret, a bad node name and a Redis URL of another scheme are refused", () =>
    Effect.promise(async () => {
      const cases: ReadonlyArray<[ReadonlyArray<string>, Record<string, string>, RegExp]> = [
        [["--cluster-node", "g1"], { SWITCHYARD_CLUSTER_SECRET: "short" }, /cluster\.secret: shorter than 16/],
        [["--cluster-node", "g 1"], { SWITCHYARD_CLUSTER_SECRET: Secret }, /cluster\.node: "g 1" is not a node name/]
      ]
      for (const [args, env, expected] of cases) {
        const proc = spawnSwitchyard(["server", "--check-config", "--cluster-redis", "redis://127.0.0.1:1", "--cluster-advertise", "127.0.0.1:7400", ...args], env)
        assert.strictEqual(await proc.exited, 78, proc.output())
        assert.match(proc.output(), expected)
      }
      const http = spawnSwitchyard(["server", "--check-config", "--cluster-redis", "http://127.0.0.1:1", "--cluster-node", "g1", "--cluster-advertise", "127.0.0.1:7400"], {
        SWITCHYARD_CLUSTER_SECRET: Secret
      })
      assert.strictEqual(await http.exited, 78)
      assert.match(http.output(), /cluster\.redis: .*expected redis:\/\/host:port/)
    }))
})

describe.runIf(requireRedis())("cluster leases on redis-server", () => {
  it.live("each gateway publishes its backends' routes and reads the others'; a route whose backend left is withdrawn", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const g1 = await startGateway(redis, "g1")
      const g2 = await startGateway(redis, "g2")
      const port = await freePort()
      const tunnel = await startBackend(g1.control, port)
      const route = `http:${port}::/`
      const seen = await eventually(g2.admin, "g2 reads g1's lease", hasLease("g1", route))
      assert.strictEqual(seen.store, "connected")
      assert.match(seen.leases.find((l) => l.node === "g1")!.relay, /^127\.0\.0\.1:\d+$/)
      const own = await eventually(g1.admin, "g1 publishes one lease", (s) => s.published === 1)
      // a gateway does not list its own leases among the others'
      assert.deepStrictEqual(own.leases, [])
      const metrics = (await get(g2.admin.port, "/metrics")).body
      assert.strictEqual(sample(metrics, "switchyard_cluster_store_up"), 1)
      assert.strictEqual(sample(metrics, "switchyard_cluster_leases", { side: "remote" }), 1)

      await new Promise<void>((resolve) => tunnel.close(() => resolve()))
      await eventually(g2.admin, "g1's lease withdrawn", (s) => !hasLease("g1", route)(s))
      await eventually(g1.admin, "g1 publishes none", (s) => s.published === 0)
    }))

  it.live("a gateway killed with -9 has its leases expire within the lease TTL", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const g1 = await startGateway(redis, "g1")
      const g2 = await startGateway(redis, "g2")
      const port = await freePort()
      await startBackend(g1.control, port)
      const route = `http:${port}::/`
      await eventually(g2.admin, "g2 reads g1's lease", hasLease("g1", route))
      await g1.proc.stop("SIGKILL")
      // the lease outlives its gateway by at most its TTL: Redis holds it with that expiry
      const ttl = await redisPttl(redis, `switchyard:lease:g1:${route}`)
      assert.isTrue(ttl === -2 || (ttl > 0 && ttl <= LeaseTtlMs), `PTTL ${ttl}`)
      await eventually(g2.admin, "g1's lease expired", (s) => !hasLease("g1", route)(s))
      assert.strictEqual(await redisPttl(redis, `switchyard:lease:g1:${route}`), -2)
    }))

  it.live("Redis stopped: /readyz and /status say so, the table stays until the TTL; restarted: leases are published again", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const g1 = await startGateway(redis, "g1")
      const g2 = await startGateway(redis, "g2")
      const port = await freePort()
      await startBackend(g1.control, port)
      const route = `http:${port}::/`
      await eventually(g2.admin, "g2 reads g1's lease", hasLease("g1", route))
      await redis.stop()
      const down = await eventually(g2.admin, "store unreachable", (s) => s.store === "unreachable")
      const ready = await get(g2.admin.port, "/readyz")
      // the gateway still serves (its local routes): ready, with the reason beside it
      assert.strictEqual(ready.status, 200)
      assert.match(ready.body, /cluster store unreachable/)
      if (!down.stale) assert.isTrue(hasLease("g1", route)(down), "the last table read stays in use until the TTL")
      const stale = await eventually(g2.admin, "table dropped after the TTL", (s) => s.stale && s.leases.length === 0)
      assert.strictEqual(stale.store, "unreachable")
      assert.match((await get(g2.admin.port, "/readyz")).body, /longer than the lease TTL: serving local routes only/)
      await g2.proc.waitFor(/level=warn.*cluster store unreachable for longer than the lease TTL/i, SeenWithinMs)

      await redis.restart()
      const back = await eventually(g2.admin, "g1's lease read again after the restart", (s) => s.store === "connected" && hasLease("g1", route)(s))
      assert.isFalse(back.stale)
      assert.notMatch((await get(g2.admin.port, "/readyz")).body, /unreachable/)
    }))
})
