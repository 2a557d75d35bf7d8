import { assert, describe, it } from "@effect/vitest"
import { Redacted } from "effect"
import { makeTokenPolicy, parseTokenGrant, TokenGrantError } from "../../src/domain/TokenPolicy.ts"

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

  it("reads grants written as name:token:ports[:domains]", () => {
    const grant = parseTokenGrant("team-a:s3cret:8000,9000-9099:a.example.com,B.test")
    assert.notInstanceOf(grant, TokenGrantError)
    const ok = grant as Exclude<typeof grant, TokenGrantError>
    assert.strictEqual(ok.name, "team-a")
    assert.strictEqual(Redacted.value(ok.token), "s3cret")
    assert.deepStrictEqual(ok.ports, [8000, { from: 9000, to: 9099 }])
    assert.deepStrictEqual(ok.domainSuffixes, ["a.example.com", "b.test"])
    const plain = parseTokenGrant("ops:t:1-65535") as Exclude<typeof grant, TokenGrantError>
    assert.isUndefined(plain.domainSuffixes)
    for (const [text, reason] of [
      ["nope", "Malformed"],
      [":t:80", "Malformed"],
      ["a:t:0", "BadPort"],
      ["a:t:90-80", "BadPort"],
      ["a:t:70000", "BadPort"],
      ["a:t:80:bad..domain", "BadDomain"]
    ] as const) {
      const error = parseTokenGrant(text)
      assert.instanceOf(error, TokenGrantError)
      assert.strictEqual((error as TokenGrantError).reason, reason)
      assert.notInclude((error as TokenGrantError).message, ":t:")
    }
  })
})
