import { assert, describe, it } from "@effect/vitest"
import { contentLengthValues, declaredContentLength } from "../../src/domain/ContentLength.ts"

describe("ContentLength", () => {
  it("one decimal value is a length; none is undefined", () => {
    assert.strictEqual(declaredContentLength(["0"]), 0)
    assert.strictEqual(declaredContentLength(["42"]), 42)
    assert.strictEqual(declaredContentLength(["9".repeat(15)]), 999_999_999_999_999)
    assert.isUndefined(declaredContentLength([]))
  })

  it("anything else is refused, identical lists included (never collapsed, never relayed)", () => {
    for (const values of [["abc"], ["3, 4"], ["3, 3"], ["3", "3"], ["3", "4"], [""], [" 3"], ["3 "], ["+3"], ["-1"], ["0x10"], ["1e3"], ["1".repeat(16)]]) {
      const declared = declaredContentLength(values)
      assert.strictEqual(typeof declared, "object", JSON.stringify(values))
      assert.strictEqual((declared as { _tag: string })._tag, "InvalidContentLength")
    }
  })

  it("finds the fields in a flat list whatever their case", () => {
    assert.deepStrictEqual(contentLengthValues(["Content-Length", "3", "x", "y", "content-length", "4", "content-lengthx", "5"]), ["3", "4"])
  })
})
