import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import { foldKey, isJsonError, JsonObject, type JsonValue, MAX_JSON_DEPTH, parseStrictJson, parseStrictJsonText } from "../../src/domain/StrictJson.ts"

/** The value as plain JSON data (objects keyed by folded name), for comparisons. */
const plain = (v: JsonValue): unknown =>
  v instanceof JsonObject
    ? Object.fromEntries([...v.entries].map(([k, x]) => [k, plain(x)]))
    : Array.isArray(v)
    ? v.map(plain)
    : v

const ok = (text: string): unknown => {
  const v = parseStrictJsonText(text)
  if (isJsonError(v)) throw new Error(`${text}: ${v.message}`)
  return plain(v)
}
const err = (text: string): string => {
  const v = parseStrictJsonText(text)
  if (!isJsonError(v)) throw new Error(`${text}: accepted`)
  return v.reason
}

describe("StrictJson", () => {
  it("folds keys as Go's encoding/json matches them to fields", () => {
    assert.strictEqual(foldKey("Privileged"), "PRIVILEGED")
    assert.strictEqual(foldKey("privileged"), "PRIVILEGED")
    assert.strictEqual(foldKey("pr\u0130vileged"), "PRIVILEGED") // İ → I
    assert.strictEqual(foldKey("\u017fysctls"), "SYSCTLS") // ſ → S
    assert.strictEqual(foldKey("\u212aernel"), "KERNEL") // Kelvin sign → K
    assert.strictEqual(foldKey("é"), "É")
  })

  it("goldens: values read", () => {
    assert.deepStrictEqual(ok(` {"a": [1, -2.5e3, true, false, null, "x\\u0041\\n\\/"], "b": {}} `), {
      A: [1, -2500, true, false, null, "xA\n/"],
      B: {}
    })
    assert.deepStrictEqual(ok(`[]`), [])
    assert.deepStrictEqual(ok(`"\\ud83d\\ude00"`), "😀")
    assert.deepStrictEqual(ok(`{"Labels":{"é":"1","x":"2"}}`), { LABELS: { "É": "1", X: "2" } })
  })

  it("goldens: duplicated keys under case folding are refused at every level", () => {
    for (
      const text of [
        `{"Privileged":false,"Privileged":true}`,
        `{"Privileged":false,"privileged":true}`,
        `{"HostConfig":{"Privileged":false,"PRIVILEGED":true}}`,
        `{"HostConfig":{"Privileged":false,"pr\u0130vileged":true}}`,
        `{"HostConfig":{"Privileged":false,"Privil\\u0065ged":true}}`,
        `{"a":[{"Sysctls":{},"\u017fysctls":{"x":"1"}}]}`,
        `{"Labels":{"a":"1","A":"2"}}`
      ]
    ) assert.strictEqual(err(text), "DuplicateKey", text)
  })

  it("goldens: what Go refuses is refused", () => {
    for (
      const text of [
        ``,
        ` `,
        `{`,
        `{"a":1,}`,
        `[1,]`,
        `{"a" 1}`,
        `{a:1}`,
        `{'a':1}`,
        `{"a":01}`,
        `{"a":1.}`,
        `{"a":.5}`,
        `{"a":+1}`,
        `{"a":-}`,
        `{"a":NaN}`,
        `{"a":True}`,
        `{"a":"\t"}`,
        `{"a":"\\x41"}`,
        `{"a":"\\u00g1"}`,
        `{"a":"unterminated}`,
        `{"a":1} {"b":2}`,
        `{"a":1}x`,
        `\u00a0{}`
      ]
    ) assert.strictEqual(err(text), "Syntax", JSON.stringify(text))
    // a byte-order mark, as bytes
    const bom = parseStrictJson(Buffer.from("\xef\xbb\xbf{}", "latin1"))
    assert.isTrue(isJsonError(bom))
  })

  it("nesting is bounded", () => {
    const deep = "[".repeat(MAX_JSON_DEPTH) + "]".repeat(MAX_JSON_DEPTH)
    assert.deepStrictEqual(isJsonError(parseStrictJsonText(deep)), false)
    assert.strictEqual(err("[".repeat(MAX_JSON_DEPTH + 1) + "]".repeat(MAX_JSON_DEPTH + 1)), "TooDeep")
    assert.strictEqual(err(`{"a":`.repeat(100_000)), "TooDeep")
  })

  it("invalid UTF-8 inside a string reads as U+FFFD", () => {
    const v = parseStrictJson(Buffer.concat([Buffer.from(`{"a":"`), Buffer.from([0xff]), Buffer.from(`"}`)]))
    assert.deepStrictEqual(plain(v as JsonValue), { A: "\ufffd" })
  })

  const between = (minimum: number, maximum: number) => Schema.Int.check(Schema.isBetween({ minimum, maximum }))

  it.effect.prop("agrees with JSON.parse on documents without duplicated keys", {
    codes: Schema.Array(between(0, 127)).check(Schema.isBetweenLength(0, 40)),
    seed: between(0, 1_000_000)
  }, ({ codes, seed }) =>
    Effect.sync(() => {
      // a random JSON value built from the seed, printed by JSON.stringify
      let s = seed
      const next = (n: number) => ((s = (s * 1103515245 + 12345) % 2147483648) >>> 12) % n
      const text = String.fromCharCode(...codes)
      const build = (depth: number): unknown => {
        switch (next(depth > 3 ? 4 : 6)) {
          case 0:
            return text
          case 1:
            return next(1000) - 500
          case 2:
            return next(2) === 0
          case 3:
            return null
          case 4:
            return Array.from({ length: next(4) }, () => build(depth + 1))
          default: {
            const o: Record<string, unknown> = {}
            for (let i = next(4); i > 0; i--) o[`k${i}${text.replace(/[a-z]/gi, "")}`] = build(depth + 1)
            return o
          }
        }
      }
      const doc = JSON.stringify(build(0))
      const fold = (v: unknown): unknown =>
        Array.isArray(v)
          ? v.map(fold)
          : v !== null && typeof v === "object"
          ? Object.fromEntries(Object.entries(v).map(([k, x]) => [foldKey(k), fold(x)]))
          : v
      assert.deepStrictEqual(ok(doc), fold(JSON.parse(doc)))
    }))

  it.effect.prop("never throws on arbitrary bytes, and accepts only what JSON.parse accepts", {
    bytes: Schema.Array(between(0, 255)).check(Schema.isBetweenLength(0, 60))
  }, ({ bytes }) =>
    Effect.sync(() => {
      const buf = Buffer.from(bytes)
      const v = parseStrictJson(buf)
      if (!isJsonError(v)) JSON.parse(new TextDecoder().decode(buf)) // throws if ours accepted non-JSON
    }))

  it("fuzz: mutated create bodies never throw and parse only when JSON.parse does", () => {
    const base = `{"Image":"busybox","Cmd":["true"],"HostConfig":{"Privileged":false,"Binds":["/a:/b"],"CapAdd":null}}`
    let s = 7
    const next = (n: number) => ((s = (s * 1103515245 + 12345) % 2147483648) >>> 12) % n
    const alphabet = `{}[]:,"\\ \tatrufn0123456789.-eEu`
    for (let i = 0; i < 20_000; i++) {
      const chars = [...base]
      for (let k = next(4) + 1; k > 0; k--) {
        const p = next(chars.length + 1)
        switch (next(3)) {
          case 0:
            chars.splice(p, 1)
            break
          case 1:
            chars.splice(p, 0, alphabet[next(alphabet.length)]!)
            break
          default:
            chars[p] = alphabet[next(alphabet.length)]!
        }
      }
      const text = chars.join("")
      const v = parseStrictJsonText(text)
      let parsed: unknown = undefined
      let accepted = true
      try {
        parsed = JSON.parse(text)
      } catch {
        accepted = false
      }
      if (!isJsonError(v)) assert.isTrue(accepted, text)
      else if (accepted) assert.strictEqual(v.reason, "DuplicateKey", `${text}: ${v.message}`)
      void parsed
    }
  })
})
