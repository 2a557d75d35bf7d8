import { assert, describe, it } from "@effect/vitest"
import { Schema } from "effect"
import { encodeProxyHeader, encodeProxyV1, encodeProxyV2, ProxyV2Signature } from "../../src/domain/ProxyProtocol.ts"

const hex = (b: Buffer) => b.toString("hex")

/** The 16 bytes of a v2 IPv6 address field, as the compressed text form URL parsing gives. */
const ipv6Text = (bytes: Buffer): string => {
  const groups: Array<string> = []
  for (let i = 0; i < 16; i += 2) groups.push(bytes.readUInt16BE(i).toString(16))
  return new URL(`http://[${groups.join(":")}]/`).hostname.slice(1, -1)
}

describe("PROXY protocol", () => {
  it("version 1: the specification's lines for TCP4 and TCP6, UNKNOWN when the ends cannot be written", () => {
    assert.strictEqual(
      encodeProxyV1({ sourceAddress: "192.168.0.1", sourcePort: 56324, destinationAddress: "192.168.0.11", destinationPort: 443 }).toString("latin1"),
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert.strictEqual(
      encodeProxyV1({ sourceAddress: "2001:db8::1", sourcePort: 65535, destinationAddress: "::1", destinationPort: 8443 }).toString("latin1"),
      "PROXY TCP6 2001:db8::1 ::1 65535 8443\r\n"
    )
    // an IPv4 peer on a dual-stack socket is written as IPv4
    assert.strictEqual(
      encodeProxyV1({ sourceAddress: "::ffff:10.0.0.7", sourcePort: 4000, destinationAddress: "::ffff:10.0.0.1", destinationPort: 5432 }).toString("latin1"),
      "PROXY TCP4 10.0.0.7 10.0.0.1 4000 5432\r\n"
    )
    for (const odd of [
      { sourceAddress: "10.0.0.7", sourcePort: 1, destinationAddress: "::1", destinationPort: 2 },
      { sourceAddress: "", sourcePort: 1, destinationAddress: "10.0.0.1", destinationPort: 2 },
      { sourceAddress: "10.0.0.7", sourcePort: 70_000, destinationAddress: "10.0.0.1", destinationPort: 2 }
    ]) {
      assert.strictEqual(encodeProxyV1(odd).toString("latin1"), "PROXY UNKNOWN\r\n")
    }
  })

  it("version 2: signature, PROXY over TCP, length, addresses and ports in network order", () => {
    const v4 = encodeProxyV2({ sourceAddress: "192.168.0.1", sourcePort: 56324, destinationAddress: "192.168.0.11", destinationPort: 443 })
    assert.strictEqual(hex(v4), hex(ProxyV2Signature) + "21" + "11" + "000c" + "c0a80001" + "c0a8000b" + "dc04" + "01bb")
    const v6 = encodeProxyV2({ sourceAddress: "2001:db8::ff00:42:8329", sourcePort: 1, destinationAddress: "::1", destinationPort: 2 })
    assert.strictEqual(
      hex(v6),
      hex(ProxyV2Signature) + "21" + "21" + "0024" + "20010db8000000000000ff0000428329" + "00000000000000000000000000000001" + "0001" + "0002"
    )
    const unknown = encodeProxyV2({ sourceAddress: "10.0.0.7", sourcePort: 1, destinationAddress: "", destinationPort: 2 })
    assert.strictEqual(hex(unknown), hex(ProxyV2Signature) + "21" + "00" + "0000")
    assert.strictEqual(hex(encodeProxyHeader("v1", { sourceAddress: "1.2.3.4", sourcePort: 5, destinationAddress: "6.7.8.9", destinationPort: 10 })), Buffer.from("PROXY TCP4 1.2.3.4 6.7.8.9 5 10\r\n").toString("hex"))
  })

  const Group = Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 0xffff }))
  const Ipv6Arb = Schema.Struct({
    groups: Schema.Array(Group).check(Schema.isMinLength(8), Schema.isMaxLength(8)),
    zeros: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 8 })),
    at: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 8 })),
    port: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 65_535 }))
  })

  it.prop("version 2 writes any IPv6 address (written compressed or not) as the 16 bytes it names", [Ipv6Arb], ([a]) => {
    const groups = a.groups.map((g, i) => (i >= a.at && i < a.at + a.zeros ? 0 : g))
    const full = groups.map((g) => g.toString(16)).join(":")
    // the URL parser's canonical (compressed) form of the same address
    const canonical = new URL(`http://[${full}]/`).hostname.slice(1, -1)
    for (const text of [full, canonical]) {
      const header = encodeProxyV2({ sourceAddress: text, sourcePort: a.port, destinationAddress: "::", destinationPort: 1 })
      if (header[13] !== 0x21) return false
      if (ipv6Text(header.subarray(16, 32)) !== canonical) return false
      if (header.readUInt16BE(48) !== a.port) return false
    }
    return true
  })
})
