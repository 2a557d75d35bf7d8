/**
 * The `cluster` settings of `switchyard server`: nothing without `cluster.redis`, and a cluster needs a
 * node name, an advertised relay address, a secret of 16 characters or more, and a heartbeat of at most a
 * third of the lease TTL.
 */
import { assert, describe, it } from "@effect/vitest"
import { Redacted } from "effect"
import type { ServerFile } from "../../src/runtime/ConfigLoader.ts"
import { ConfigLoadError } from "../../src/runtime/ConfigLoader.ts"
import { clusterOf, redisDisplay } from "../../src/runtime/server/ServerConfig.ts"

const secret = Redacted.make("a-cluster-secret-of-length")
const base = { redis: "redis://10.0.0.5:6379", node: "g1", advertise: "10.0.0.11:7400", secret }
const problem = (cluster: NonNullable<ServerFile["cluster"]>): string => {
  const result = clusterOf({ cluster })
  assert.instanceOf(result, ConfigLoadError)
  return (result as ConfigLoadError).message
}

describe("cluster settings", () => {
  it("no cluster without cluster.redis; the defaults with it", () => {
    assert.isUndefined(clusterOf({}))
    assert.match(problem({ node: "g1" }), /^cluster\.redis: required with the other cluster settings/)
    const config = clusterOf({ cluster: base })
    assert.deepInclude(config, { redisUrl: "redis://10.0.0.5:6379", node: "g1", advertise: { host: "10.0.0.11", port: 7400 }, leaseTtlMs: 15_000, heartbeatMs: 5_000 })
  })

  it("refuses what a cluster cannot run with, naming the field", () => {
    assert.match(problem({ ...base, secret: undefined } as never), /^cluster\.secret: required with cluster\.redis/)
    assert.match(problem({ ...base, secret: Redacted.make("short") }), /^cluster\.secret: shorter than 16 characters/)
    assert.match(problem({ ...base, node: undefined } as never), /^cluster\.node: required/)
    assert.match(problem({ ...base, advertise: "10.0.0.11:0" }), /^cluster\.advertise: .*port other than 0/)
    assert.match(problem({ ...base, redis: "http://10.0.0.5" }), /^cluster\.redis: .*expected redis:\/\/host:port/)
    assert.match(problem({ ...base, lease_ttl_ms: 3_000, heartbeat_ms: 1_500 }), /^cluster\.heartbeat_ms: 1500 ms is more than a third/)
    assert.match(problem({ ...base, control_advertise: "nowhere" }), /^cluster\.control_advertise: /)
    // a short TTL brings the default heartbeat down with it
    assert.strictEqual((clusterOf({ cluster: { ...base, lease_ttl_ms: 3_000 } }) as { heartbeatMs: number }).heartbeatMs, 1_000)
  })

  it("a Redis URL's password is never shown", () => {
    assert.strictEqual(redisDisplay("redis://:hunter2-secret@10.0.0.5:6379"), "redis://:redacted@10.0.0.5:6379")
    assert.notInclude(problem({ ...base, redis: "http://:hunter2-secret@10.0.0.5" }), "hunter2")
  })
})
