import { assert, describe, it } from "@effect/vitest"
import { Redacted } from "effect"
import { makeTokenPolicy } from "../../src/domain/TokenPolicy.ts"

const policy = makeTokenPolicy([
  { name: "team-a", token: Redacted.make("alpha"), ports: [8000, { from: 9000, to: 9009 }], domainSuffixes: ["a.test"] },
  { name: "ops", token: Redacted.make("omega"), ports: [{ from: 1, to: 65_535 }] }
])

describe("TokenPolicy", () => {
  it("authenticates only exact tokens", () => {
    assert.strictEqual(policy.authenticate(Redacted.make("alpha"))?.name, "team-a")
    assert.strictEqual(policy.authenticate(Redacted.make("omega"))?.name, "ops")
    assert.isUndefined(policy.authenticate(Redacted.make("alph")))
    assert.isUndefined(policy.authenticate(Redacted.make("alphaa")))
    assert.isUndefined(policy.authenticate(Redacted.make("")))
  })

  it("limits ports and domain suffixes per token", () => {
    const a = policy.authenticate(Redacted.make("alpha"))!
    assert.isUndefined(policy.authorize(a, { _tag: "Http", port: 8000, domainSuffix: "x.a.test" }))
    assert.isUndefined(policy.authorize(a, { _tag: "Http", port: 9005, domainSuffix: "a.test" }))
    assert.deepStrictEqual(policy.authorize(a, { _tag: "Http", port: 8001, domainSuffix: "a.test" }), { _tag: "PortNotAllowed", port: 8001 })
    assert.deepStrictEqual(policy.authorize(a, { _tag: "Http", port: 8000, domainSuffix: "b.test" }), { _tag: "DomainNotAllowed", domainSuffix: "b.test" })
    assert.deepStrictEqual(policy.authorize(a, { _tag: "Http", port: 8000, domainSuffix: "aa.test" }), { _tag: "DomainNotAllowed", domainSuffix: "aa.test" })
    assert.deepStrictEqual(policy.authorize(a, { _tag: "Http", port: 8000 }), { _tag: "DomainNotAllowed", domainSuffix: undefined })
    assert.deepStrictEqual(policy.authorize(a, { _tag: "Tcp", port: 8000 }), { _tag: "DomainNotAllowed", domainSuffix: undefined })
    const ops = policy.authenticate(Redacted.make("omega"))!
    assert.isUndefined(policy.authorize(ops, { _tag: "Tcp", port: 22 }))
  })
})
