import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import { encodeHeaderBlock, HpackDecoder, HpackError, huffmanDecode, huffmanEncode, StaticTable } from "../../src/domain/Hpack.ts"

const hex = (text: string): Buffer => Buffer.from(text.replace(/\s+/g, ""), "hex")
const decodeOk = (decoder: HpackDecoder, block: Buffer): Array<string> => {
  const out = decoder.decode(block)
  if (out instanceof HpackError) throw out
  return out
}

describe("Hpack", () => {
  it("pins the static table's ends", () => {
    assert.strictEqual(StaticTable.length, 61)
    assert.deepStrictEqual(StaticTable[0], [":authority", ""])
    assert.deepStrictEqual(StaticTable[7], [":status", "200"])
    assert.deepStrictEqual(StaticTable[60], ["www-authenticate", ""])
  })

  it("C.2: literal fields with, without and never indexed; an indexed field", () => {
    const d = new HpackDecoder(64 * 1024)
    assert.deepStrictEqual(decodeOk(d, hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")), ["custom-key", "custom-header"])
    assert.strictEqual(d.size, 55)
    const e = new HpackDecoder(64 * 1024)
    assert.deepStrictEqual(decodeOk(e, hex("040c 2f73 616d 706c 652f 7061 7468")), [":path", "/sample/path"])
    assert.strictEqual(e.size, 0)
    assert.deepStrictEqual(decodeOk(e, hex("1008 7061 7373 776f 7264 0673 6563 7265 74")), ["password", "secret"])
    assert.strictEqual(e.size, 0)
    assert.deepStrictEqual(decodeOk(e, hex("82")), [":method", "GET"])
  })

  it("C.3: requests without Huffman share the dynamic table", () => {
    const d = new HpackDecoder(64 * 1024)
    assert.deepStrictEqual(decodeOk(d, hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d")), [
      ":method", "GET", ":scheme", "http", ":path", "/", ":authority", "www.example.com"
    ])
    assert.strictEqual(d.size, 57)
    assert.deepStrictEqual(decodeOk(d, hex("8286 84be 5808 6e6f 2d63 6163 6865")), [
      ":method", "GET", ":scheme", "http", ":path", "/", ":authority", "www.example.com", "cache-control", "no-cache"
    ])
    assert.strictEqual(d.size, 110)
    assert.deepStrictEqual(decodeOk(d, hex("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65")), [
      ":method", "GET", ":scheme", "https", ":path", "/index.html", ":authority", "www.example.com", "custom-key", "custom-value"
    ])
    assert.strictEqual(d.size, 164)
  })

  it("C.4: requests with Huffman", () => {
    const d = new HpackDecoder(64 * 1024)
    assert.deepStrictEqual(decodeOk(d, hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")), [
      ":method", "GET", ":scheme", "http", ":path", "/", ":authority", "www.example.com"
    ])
    assert.deepStrictEqual(decodeOk(d, hex("8286 84be 5886 a8eb 1064 9cbf")).slice(-2), ["cache-control", "no-cache"])
    assert.deepStrictEqual(decodeOk(d, hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf")).slice(-2), ["custom-key", "custom-value"])
    assert.strictEqual(d.size, 164)
  })

  it("C.6: responses with Huffman and eviction in a 256-byte table", () => {
    const d = new HpackDecoder(64 * 1024, 256)
    assert.deepStrictEqual(
      decodeOk(d, hex("4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3")),
      [":status", "302", "cache-control", "private", "date", "Mon, 21 Oct 2013 20:13:21 GMT", "location", "https://www.example.com"]
    )
    assert.strictEqual(d.size, 222)
    assert.deepStrictEqual(decodeOk(d, hex("4883 640e ffc1 c0bf")), [
      ":status", "307", "cache-control", "private", "date", "Mon, 21 Oct 2013 20:13:21 GMT", "location", "https://www.example.com"
    ])
    assert.strictEqual(d.size, 222)
    assert.deepStrictEqual(
      decodeOk(
        d,
        hex(
          "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07"
        )
      ),
      [
        ":status", "200", "cache-control", "private", "date", "Mon, 21 Oct 2013 20:13:22 GMT", "location", "https://www.example.com",
        "content-encoding", "gzip", "set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
      ]
    )
    assert.strictEqual(d.size, 215)
    assert.strictEqual(d.table.length, 3)
  })

  it("table size updates: honoured at the start of a block, refused above the setting or after a field", () => {
    const d = new HpackDecoder(64 * 1024)
    decodeOk(d, hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"))
    // size update to 0 empties the table; index 62 is then out of range
    assert.deepStrictEqual(decodeOk(d, hex("20 82")), [":method", "GET"])
    assert.strictEqual(d.size, 0)
    const gone = d.decode(hex("be"))
    assert.instanceOf(gone, HpackError)
    const above = new HpackDecoder(64 * 1024).decode(hex("3fe2 1f"))
    assert.instanceOf(above, HpackError)
    const late = new HpackDecoder(64 * 1024).decode(hex("82 20"))
    assert.instanceOf(late, HpackError)
  })

  it("malformed blocks are compression errors; an oversized list is refused but keeps the table in step", () => {
    for (const bad of ["80", "ff", "ff ff ff ff ff ff 7f", "40 0a 63", "0f 7f", "41 85 ff ff ff ff ff", "41 81 00"]) {
      const out = new HpackDecoder(64 * 1024).decode(hex(bad))
      assert.instanceOf(out, HpackError, bad)
      if (out instanceof HpackError) assert.strictEqual(out.reason, "Compression")
    }
    const small = new HpackDecoder(40)
    const over = small.decode(hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"))
    assert.instanceOf(over, HpackError)
    if (over instanceof HpackError) assert.strictEqual(over.reason, "HeaderListTooLarge")
    assert.strictEqual(small.size, 55)
  })

  it("Huffman padding longer than 7 bits or not all ones is refused", () => {
    const www = huffmanEncode("www")
    assert.strictEqual(huffmanDecode(www, 0, www.length), "www")
    assert.isUndefined(huffmanDecode(Buffer.from([0xff, 0xff]), 0, 2))
    assert.isUndefined(huffmanDecode(Buffer.from([0x00]), 0, 1))
  })

  const between = (minimum: number, maximum: number) => Schema.Int.check(Schema.isBetween({ minimum, maximum }))
  const latin1 = (codes: ReadonlyArray<number>) => Buffer.from(codes).toString("latin1")

  it.effect.prop("what the encoder writes decodes to the same list", {
    fields: Schema.Array(Schema.Tuple([Schema.Array(between(97, 122)).check(Schema.isBetweenLength(1, 20)), Schema.Array(between(32, 255)).check(Schema.isBetweenLength(0, 300))])).check(Schema.isBetweenLength(0, 20))
  }, ({ fields }) =>
    Effect.sync(() => {
      const flat = fields.flatMap(([name, value]) => [latin1(name), latin1(value)])
      // names from the static table too, with and without their value
      flat.push(":method", "GET", "content-type", "text/plain", ":status", "204")
      assert.deepStrictEqual(decodeOk(new HpackDecoder(1 << 20), encodeHeaderBlock(flat)), flat)
    }))

  it.effect.prop("Huffman coding round-trips any latin1 string", { bytes: Schema.Array(between(0, 255)).check(Schema.isBetweenLength(0, 200)) }, ({ bytes }) =>
    Effect.sync(() => {
      const text = latin1(bytes)
      const coded = huffmanEncode(text)
      assert.strictEqual(huffmanDecode(coded, 0, coded.length), text)
    }))
})
