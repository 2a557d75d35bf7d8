import { assert, describe, it } from "@effect/vitest"
import {
  labelBody,
  labelsInScope,
  parseContainerLabel,
  pinnedTarget,
  scopedCall,
  scopeFilters
} from "../../src/domain/LabelScope.ts"

const label = { key: "sy.scope", value: "a" }
const rewritten = (body: string): string => {
  const r = labelBody(Buffer.from(body), label)
  if (r._tag !== "Rewritten") throw new Error(`${body}: ${JSON.stringify(r)}`)
  return r.body.toString()
}

describe("LabelScope", () => {
  it("parses KEY=VALUE labels and refuses the rest", () => {
    assert.deepStrictEqual(parseContainerLabel("a=b"), { key: "a", value: "b" })
    assert.deepStrictEqual(parseContainerLabel("a=b=c"), { key: "a", value: "b=c" })
    assert.deepStrictEqual(parseContainerLabel("a="), { key: "a", value: "" })
    for (const bad of ["", "=b", "ab", "a b=c", "a=\n", `${"k".repeat(300)}=v`]) assert.isString(parseContainerLabel(bad), bad)
  })

  it("a container is in scope only with the exact key and value", () => {
    assert.isTrue(labelsInScope(label, { "sy.scope": "a", x: "y" }))
    for (const labels of [undefined, null, {}, { "sy.scope": "A" }, { "SY.SCOPE": "a" }, { "sy.scope": "a " }, ["sy.scope=a"], "sy.scope=a"]) {
      assert.isFalse(labelsInScope(label, labels), JSON.stringify(labels))
    }
    assert.isFalse(labelsInScope(label, JSON.parse(`{"__proto__":{"sy.scope":"a"}}`)))
  })

  it("classifies calls: lists filtered, creates labelled, containers and execs resolved, unscoped calls refused", () => {
    assert.deepStrictEqual(scopedCall("GET", "/containers/json"), { _tag: "Filter" })
    assert.deepStrictEqual(scopedCall("GET", "/libpod/containers/json"), { _tag: "Filter" })
    assert.deepStrictEqual(scopedCall("GET", "/events"), { _tag: "Filter" })
    assert.deepStrictEqual(scopedCall("POST", "/containers/prune"), { _tag: "Filter" })
    assert.deepStrictEqual(scopedCall("GET", "/volumes"), { _tag: "Filter" })
    assert.deepStrictEqual(scopedCall("POST", "/containers/create"), { _tag: "Label" })
    assert.deepStrictEqual(scopedCall("POST", "/networks/create"), { _tag: "Label" })
    assert.deepStrictEqual(scopedCall("GET", "/containers/abc/json"), { _tag: "Container", prefix: "", name: "abc", action: "json" })
    assert.deepStrictEqual(scopedCall("GET", "/containers/json/json"), { _tag: "Container", prefix: "", name: "json", action: "json" })
    // the Engine reads names across segments (link aliases): the whole middle is the name
    assert.deepStrictEqual(scopedCall("GET", "/containers/parent/alias/archive"), { _tag: "Container", prefix: "", name: "parent/alias", action: "archive" })
    assert.deepStrictEqual(scopedCall("GET", "/containers/x/attach/ws"), { _tag: "Container", prefix: "", name: "x", action: "attach/ws" })
    assert.deepStrictEqual(scopedCall("DELETE", "/containers/x/json"), { _tag: "Container", prefix: "", name: "x/json", action: "" })
    assert.deepStrictEqual(scopedCall("POST", "/libpod/containers/x/start"), { _tag: "Container", prefix: "/libpod", name: "x", action: "start" })
    assert.deepStrictEqual(scopedCall("POST", "/exec/e1/start"), { _tag: "Exec", prefix: "", id: "e1", action: "start" })
    for (const [method, path] of [["POST", "/commit"], ["POST", "/networks/n/connect"], ["POST", "/libpod/containers/create"], ["POST", "/libpod/pods/create"], ["GET", "/containers/create"], ["POST", "/containers/x"], ["POST", "/exec/e1"], ["GET", "/libpod/containers/stats"]]) {
      assert.strictEqual(scopedCall(method!, path!)._tag, "Refuse", `${method} ${path}`)
    }
    assert.deepStrictEqual(scopedCall("GET", "/images/json"), { _tag: "Pass" })
    assert.deepStrictEqual(scopedCall("GET", "/_ping"), { _tag: "Pass" })
  })

  it("pins a call to the full id, keeping the version, action and query", () => {
    const id = "a".repeat(64)
    assert.strictEqual(pinnedTarget("1.41", "", "containers", id, "stop", "t=1", true), `/v1.41/containers/${id}/stop?t=1`)
    assert.strictEqual(pinnedTarget(undefined, "/libpod", "containers", id, "", "", false), `/libpod/containers/${id}`)
    assert.strictEqual(pinnedTarget("1.41", "", "exec", id, "start", "", true), `/v1.41/exec/${id}/start?`)
  })

  it("adds the label to filters in either of Docker's forms, keeps other parameters, refuses ambiguity", () => {
    const filtersOf = (q: string) => JSON.parse(new URLSearchParams(q).get("filters")!)
    assert.deepStrictEqual(filtersOf(scopeFilters("", label) as string), { label: ["sy.scope=a"] })
    assert.strictEqual(new URLSearchParams(scopeFilters("all=1&size=0", label) as string).get("all"), "1")
    const both = `filters=${encodeURIComponent(JSON.stringify({ label: { "x=y": true }, status: ["running"] }))}`
    assert.deepStrictEqual(filtersOf(scopeFilters(both, label) as string), { label: ["x=y", "sy.scope=a"], status: ["running"] })
    const already = `filters=${encodeURIComponent(JSON.stringify({ label: ["sy.scope=a"] }))}`
    assert.deepStrictEqual(filtersOf(scopeFilters(already, label) as string), { label: ["sy.scope=a"] })
    // `+` is a space in a form value
    assert.deepStrictEqual(filtersOf(scopeFilters("filters=%7B%22name%22:%5B%22a+b%22%5D%7D", label) as string), { name: ["a b"], label: ["sy.scope=a"] })
    for (const q of ["filters=1&filters=2", "a;b", "filters=%E0", "filters=[1]", `filters=${encodeURIComponent(`{"label":"x"}`)}`, `filters=${encodeURIComponent(`{"label":[],"label":[]}`)}`]) {
      assert.strictEqual((scopeFilters(q, label) as { _tag?: string })._tag, "QueryRejection", q)
    }
  })

  it("labels a create body by inserting bytes, keeping every other byte", () => {
    assert.strictEqual(rewritten(`{"Image":"x"}`), `{"Labels":{"sy.scope":"a"},"Image":"x"}`)
    assert.strictEqual(rewritten(` { } `), ` {"Labels":{"sy.scope":"a"} } `)
    assert.strictEqual(rewritten(`{"Image":"x","Labels":null}`), `{"Image":"x","Labels":{"sy.scope":"a"}}`)
    assert.strictEqual(rewritten(`{"labels":{ },"Image":"x"}`), `{"labels":{"sy.scope":"a" },"Image":"x"}`)
    assert.strictEqual(rewritten(`{"Image":"{\\"Labels\\":1}","LABELS":{"k":"v"}}`), `{"Image":"{\\"Labels\\":1}","LABELS":{"sy.scope":"a","k":"v"}}`)
    // Go matches `Labels` in any case, `ſ` folding to `s`
    assert.strictEqual(rewritten(`{"Labelſ":{}}`), `{"Labelſ":{"sy.scope":"a"}}`)
    assert.deepStrictEqual(labelBody(Buffer.from(`{"Labels":{"sy.scope":"a"}}`), label), { _tag: "Unchanged" })
    assert.strictEqual((labelBody(Buffer.from(`{"Labels":{"sy.scope":"b"}}`), label) as { status?: number }).status, 403)
    for (const bad of [`{"Labels":[]}`, `{"Labels":"x"}`, `[]`, `{"Labels":{},"labels":{}}`, `{"a":1}x`, ``]) {
      assert.strictEqual((labelBody(Buffer.from(bad), label) as { status?: number }).status, 400, bad)
    }
  })

  it("random bodies: the rewrite reads as the body with the label set, and is the body with one run inserted", () => {
    let s = 11
    const next = (n: number) => ((s = (s * 1103515245 + 12345) % 2147483648) >>> 12) % n
    const values: ReadonlyArray<unknown> = [1, "s", "{\"Labels\":", null, true, [1, { a: "}" }], { Labels: { x: "y" } }, "é\u2028"]
    for (let round = 0; round < 300; round++) {
      const doc: Record<string, unknown> = {}
      for (let k = next(5); k > 0; k--) doc[`k${next(8)}`] = values[next(values.length)]
      const which = next(4)
      if (which === 1) doc["Labels"] = null
      if (which === 2) doc[next(2) === 0 ? "Labels" : "labels"] = { [`l${next(3)}`]: "v" }
      if (which === 3) doc["Labels"] = {}
      const body = Buffer.from(JSON.stringify(doc, null, next(3)))
      const r = labelBody(body, label)
      assert.strictEqual(r._tag, "Rewritten", `${body}`)
      const out = (r as { body: Buffer }).body
      const key = Object.keys(doc).find((k) => k.toLowerCase() === "labels") ?? "Labels"
      assert.deepStrictEqual(JSON.parse(out.toString()), { ...doc, [key]: { ...(doc[key] as object ?? {}), "sy.scope": "a" } }, `${body}`)
      let prefix = 0
      while (prefix < body.length && body[prefix] === out[prefix]) prefix++
      let suffix = 0
      while (suffix < body.length - prefix && body[body.length - 1 - suffix] === out[out.length - 1 - suffix]) suffix++
      assert.include(["", "null"], body.subarray(prefix, body.length - suffix).toString(), `${body} -> ${out}`)
    }
  })
})
