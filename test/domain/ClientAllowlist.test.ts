import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import { type ClientAllowlist, clientAllowed, parseAllowlist } from "../../src/domain/ClientAllowlist.ts"

const list = (entries: ReadonlyArray<string>): ClientAllowlist => {
  const r = parseAllowlist(entries)
  if ("index" in r) throw new Error(r.message)
  return r
}

describe("ClientAllowlist", () => {
  it("matches IPv4, IPv6 and IPv4-mapped addresses against blocks", () => {
    const l = list(["127.0.0.1", "10.0.0.0/8", "fd00::/8", "::1"])
    assert.isTrue(clientAllowed(l, "127.0.0.1"))
    assert.isTrue(clientAllowed(l, "::ffff:127.0.0.1"))
    assert.isTrue(clientAllowed(l, "10.200.3.4"))
    assert.isTrue(clientAllowed(l, "fd12::5"))
    assert.isTrue(clientAllowed(l, "::1"))
    assert.isFalse(clientAllowed(l, "127.0.0.2"))
    assert.isFalse(clientAllowed(l, "11.0.0.1"))
    assert.isFalse(clientAllowed(l, "fe80::1"))
    assert.isFalse(clientAllowed(l, undefined))
    assert.isFalse(clientAllowed(l, "not-an-ip"))
  })

  it("names the first bad entry", () => {
    assert.deepStrictEqual(parseAllowlist(["10.0.0.0/8", "10.0.0.0/33"]), { index: 1, message: `"10.0.0.0/33" has a bad prefix length (0..32)` })
    assert.strictEqual((parseAllowlist(["300.1.1.1"]) as { index: number }).index, 0)
    assert.strictEqual((parseAllowlist(["10.0.0.0/x"]) as { index: number }).index, 0)
  })

  const Octet = Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 255 }))
  it.effect.prop("an IPv4 /n block agrees with comparing the first n bits", [Octet, Octet, Octet, Octet, Octet, Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 32 }))], ([a, b, c, d, e, n]) =>
    Effect.sync(() => {
      const net = [a, b, c, d]
      const addr = [a, e, c, (d + e) % 256]
      const toInt = (xs: ReadonlyArray<number>) => xs.reduce((acc, x) => acc * 256 + x, 0)
      const mask = n === 0 ? 0 : Math.pow(2, 32) - Math.pow(2, 32 - n)
      const expected = (toInt(net) - (toInt(net) % Math.pow(2, 32 - n))) === (toInt(addr) - (toInt(addr) % Math.pow(2, 32 - n)))
      void mask
      assert.strictEqual(clientAllowed(list([`${net.join(".")}/${n}`]), addr.join(".")), expected)
    }))
})
