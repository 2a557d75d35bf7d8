import { assert, describe, it } from "@effect/vitest"
import { Schema } from "effect"
import {
  decodeLeaseValue,
  decodeNodeValue,
  encodeNodeValue,
  nodeKey,
  diffLeaseTables,
  encodeLeaseValue,
  isNodeName,
  type Lease,
  leaseKey,
  LeaseKeyPrefix,
  leaseRouteKey,
  leaseRouteOf,
  type LeaseRoute,
  MaxLeaseValueBytes,
  MaxNodeNameLength,
  nodeOfLeaseKey,
  tableStillValid
} from "../../src/domain/ClusterLease.ts"
import { RouteDefinition, routeKey } from "../../src/domain/Route.ts"

const lease = (node: string, route: LeaseRoute, relay = "10.0.0.1:7400"): Lease => ({ v: 1, node, relay, route })
const http8000: LeaseRoute = { _tag: "Http", port: 8000, domainSuffix: "example.com", pathPrefix: "/a" }

describe("ClusterLease", () => {
  it("pins the key layout and the lease value's JSON", () => {
    assert.strictEqual(LeaseKeyPrefix, "switchyard:lease:")
    assert.strictEqual(MaxNodeNameLength, 64)
    assert.strictEqual(MaxLeaseValueBytes, 4096)
    assert.strictEqual(leaseKey("g1", http8000), "switchyard:lease:g1:http:8000:example.com:/a")
    assert.strictEqual(leaseKey("g1", { _tag: "Tcp", port: 22 }), "switchyard:lease:g1:tcp:22")
    assert.strictEqual(
      encodeLeaseValue(lease("g1", http8000)),
      `{"v":1,"node":"g1","relay":"10.0.0.1:7400","route":{"_tag":"Http","port":8000,"domainSuffix":"example.com","pathPrefix":"/a"}}`
    )
  })

  it("node names: letters, digits, . _ -, at most 64", () => {
    assert.isTrue(isNodeName("g1"))
    assert.isTrue(isNodeName("gw-a.eu_1"))
    assert.isTrue(isNodeName("a".repeat(64)))
    for (const bad of ["", "a".repeat(65), "g:1", "g 1", "g/1", "é"]) assert.isFalse(isNodeName(bad), bad)
    assert.strictEqual(nodeOfLeaseKey("switchyard:lease:g1:tcp:22"), "g1")
    assert.strictEqual(nodeOfLeaseKey("switchyard:lease::tcp:22"), undefined)
    assert.strictEqual(nodeOfLeaseKey("other:g1:tcp:22"), undefined)
  })

  it("a lease carries a TLS route's port, name and mode, never its certificate or key", () => {
    const route = Schema.decodeUnknownSync(RouteDefinition)({
      _tag: "Tls", port: 8443, domainSuffix: "example.com", cert: "CERT", key: "KEY", then: "http", pathPrefix: "/x"
    })
    const public_ = leaseRouteOf(route)
    assert.deepStrictEqual(public_, { _tag: "Tls", port: 8443, domainSuffix: "example.com", then: "http", pathPrefix: "/x" })
    assert.notInclude(encodeLeaseValue(lease("g1", public_)), "CERT")
    assert.notInclude(encodeLeaseValue(lease("g1", public_)), "KEY")
    // the lease's route key is the routing table's
    assert.strictEqual(leaseRouteKey(public_), routeKey(route))
    assert.strictEqual(leaseRouteKey(http8000), routeKey(http8000))
  })

  it("decodes what it encodes, and refuses a value of another key, version, size or shape", () => {
    const good = lease("g2", http8000)
    const key = leaseKey("g2", http8000)
    assert.deepStrictEqual(decodeLeaseValue(key, encodeLeaseValue(good)), good)
    const problems: ReadonlyArray<[string, string]> = [
      [leaseKey("g3", http8000), encodeLeaseValue(good)],
      [key, encodeLeaseValue(good).replace(`"v":1`, `"v":2`)],
      [key, "{not json"],
      [key, JSON.stringify({ v: 1, node: "g2", relay: "x", route: { _tag: "Http", port: 70000 } })],
      [key, JSON.stringify({ ...good, relay: "r".repeat(MaxLeaseValueBytes) })]
    ]
    for (const [k, value] of problems) {
      const decoded = decodeLeaseValue(k, value)
      assert.strictEqual((decoded as { _tag: string })._tag, "LeaseValueProblem", value.slice(0, 80))
    }
  })

  it("diffs two tables into added, removed and changed leases", () => {
    const a = lease("g1", http8000)
    const b = lease("g2", { _tag: "Tcp", port: 22 })
    const c = lease("g3", http8000)
    const previous = new Map([[leaseKey("g1", http8000), a], [leaseKey("g2", b.route), b]])
    const moved = lease("g2", b.route, "10.0.0.9:7400")
    const next = new Map([[leaseKey("g2", b.route), moved], [leaseKey("g3", http8000), c]])
    const diff = diffLeaseTables(previous, next)
    assert.deepStrictEqual(diff.added, [c])
    assert.deepStrictEqual(diff.removed, [a])
    assert.deepStrictEqual(diff.changed, [{ previous: b, next: moved }])
    const same = diffLeaseTables(next, new Map(next))
    assert.deepStrictEqual(same, { added: [], removed: [], changed: [] })
  })

  it("a table read stays valid until the lease TTL has passed since the read", () => {
    assert.isFalse(tableStillValid(undefined, 1_000, 15_000))
    assert.isTrue(tableStillValid(1_000, 1_000, 15_000))
    assert.isTrue(tableStillValid(1_000, 15_999, 15_000))
    assert.isFalse(tableStillValid(1_000, 16_000, 15_000))
  })

  it("node records: where a gateway's control port is, checked against their key", () => {
    assert.strictEqual(nodeKey("g2"), "switchyard:node:g2")
    const record = { v: 1 as const, node: "g2", control: "tls://gw2.example.com:9999" }
    assert.strictEqual(encodeNodeValue(record), `{"v":1,"node":"g2","control":"tls://gw2.example.com:9999"}`)
    assert.deepStrictEqual(decodeNodeValue("switchyard:node:g2", encodeNodeValue(record)), record)
    for (const [key, value] of [
      ["switchyard:node:g3", encodeNodeValue(record)],
      ["switchyard:node:g2", JSON.stringify({ ...record, control: "" })],
      ["switchyard:node:g2", "[]"]
    ] as const) assert.strictEqual((decodeNodeValue(key, value) as { _tag?: string })._tag, "LeaseValueProblem", value)
  })
})
