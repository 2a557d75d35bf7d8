import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import {
  type AccessRule,
  compileGlob,
  decide,
  denialMessage,
  parseRule,
  PRESETS,
  presetRules,
  ruleMatches,
  RuleSyntaxError
} from "../../src/domain/AccessRule.ts"

const rule = (text: string): AccessRule => {
  const r = parseRule(text)
  if (r instanceof RuleSyntaxError) throw new Error(r.message)
  return r
}

const req = (method: string, path: string, query = "") => ({ method, path, query })

describe("parseRule", () => {
  it("reads action, methods, glob path and query", () => {
    const r = rule("deny POST,PUT /containers/*/archive?path=/etc/*&!noOverwriteDirNonDir")
    assert.strictEqual(r.action, "deny")
    assert.deepStrictEqual([...r.methods!], ["POST", "PUT"])
    assert.isTrue(ruleMatches(r, req("PUT", "/containers/abc/archive", "path=/etc/passwd")))
    assert.isFalse(ruleMatches(r, req("PUT", "/containers/abc/archive", "path=/tmp/x")))
    assert.isFalse(ruleMatches(r, req("PUT", "/containers/abc/archive", "path=/etc/x&noOverwriteDirNonDir=1")))
    assert.isFalse(ruleMatches(r, req("GET", "/containers/abc/archive", "path=/etc/passwd")))
  })

  it("defaults to allow and takes * for any method", () => {
    const r = rule("* /_ping")
    assert.strictEqual(r.action, "allow")
    assert.strictEqual(r.methods, undefined)
    assert.isTrue(ruleMatches(r, req("OPTIONS", "/_ping")))
  })

  it("ignores a version prefix written in the pattern", () => {
    for (const text of ["GET /v*/containers/json", "GET /v1.41/containers/json", "GET /containers/json"]) {
      assert.isTrue(ruleMatches(rule(text), req("GET", "/containers/json")), text)
    }
  })

  it("accepts regex paths with a separate query part", () => {
    const r = rule("GET ~^/containers/[0-9a-f]{12,64}/logs$ ?follow=1")
    assert.isTrue(ruleMatches(r, req("GET", "/containers/0123456789ab/logs", "follow=1&stdout=1")))
    assert.isFalse(ruleMatches(r, req("GET", "/containers/name/logs", "follow=1")))
    assert.isFalse(ruleMatches(r, req("GET", "/containers/0123456789ab/logs", "follow=0")))
  })

  it("judges a repeated key by its first value, as the Engine does", () => {
    const r = rule("deny DELETE /containers/*?force=1")
    assert.isTrue(ruleMatches(r, req("DELETE", "/containers/x", "force=1&force=0")))
    assert.isFalse(ruleMatches(r, req("DELETE", "/containers/x", "force=0&force=1")))
  })

  it("matches query presence and value globs", () => {
    const r = rule("GET /images/json?filters&all=*")
    assert.isTrue(ruleMatches(r, req("GET", "/images/json", "filters=%7B%7D&all=1")))
    assert.isFalse(ruleMatches(r, req("GET", "/images/json", "all=1")))
  })

  it.each(([
    ["", "Empty"],
    ["permit GET /x", "BadAction"],
    ["get /x", "BadAction"],
    ["GET", "BadPath"],
    ["GET containers/json", "BadPath"],
    ["G3T /x", "BadMethod"],
    ["GET ~([", "BadRegex"],
    ["GET /a/../b", "BadPath"],
    ["GET /a//b", "BadPath"],
    ["GET /x?=1", "BadQuery"],
    ["GET /x?a=1 ?b=2", "BadQuery"],
    ["GET /x extra", "BadQuery"]
  ] as const).map(([text, reason]) => ({ text, reason })))("rejects $text ($reason)", ({ text, reason }) => {
    const r = parseRule(text)
    assert.instanceOf(r, RuleSyntaxError)
    assert.strictEqual((r as RuleSyntaxError).reason, reason)
  })
})

describe("glob semantics", () => {
  it("* stays within a segment, ** spans segments", () => {
    assert.isTrue(compileGlob("/containers/*/json").test("/containers/abc/json"))
    assert.isFalse(compileGlob("/containers/*/json").test("/containers/a/b/json"))
    assert.isTrue(compileGlob("/images/**/json").test("/images/library/nginx:latest/json"))
    assert.isTrue(compileGlob("/images/**/json").test("/images/json"))
    assert.isTrue(compileGlob("/**").test("/anything/at/all"))
    assert.isFalse(compileGlob("/containers/json").test("/containers/jsonx"))
    assert.isFalse(compileGlob("/a.b").test("/axb"))
  })

  it("in a deny rule, * spans segments as the Engine's {name:.*} does", () => {
    const deny = rule("deny GET /containers/*/archive")
    assert.isTrue(ruleMatches(deny, req("GET", "/containers/web/archive")))
    assert.isTrue(ruleMatches(deny, req("GET", "/containers/parent/alias/archive")))
    const allow = rule("allow GET /containers/*/archive")
    assert.isFalse(ruleMatches(allow, req("GET", "/containers/parent/alias/archive")))
    const readOnly = presetRules("read-only")
    if (readOnly instanceof RuleSyntaxError) throw new Error(readOnly.message)
    const d = decide({ name: "p", rules: [deny, ...readOnly] }, req("GET", "/containers/parent/alias/archive"))
    assert.isFalse(d.allowed)
  })
})

const Segment = Schema.Literals(["a", "b", "ab", "*"])
const PathSegment = Schema.Literals(["a", "b", "ab", "x"])
const Segs = (s: typeof Segment | typeof PathSegment) => Schema.Array(s).check(Schema.isMaxLength(4))

/** Reference for deny rules: `*` any run of characters, `/` included. */
const refSpan = (pattern: ReadonlyArray<string>, path: ReadonlyArray<string>): boolean =>
  new RegExp("^/" + pattern.map((p) => (p === "*" ? ".*" : p)).join("/") + "$").test("/" + path.join("/"))

/** Reference glob: segment-wise, `*` any one segment (possibly empty), literals equal. */
const refGlob = (pattern: ReadonlyArray<string>, path: ReadonlyArray<string>): boolean => {
  // "/" is the root: one empty segment.
  const pat = pattern.length === 0 ? [""] : pattern
  const segs = path.length === 0 ? [""] : path
  return pat.length === segs.length && pat.every((p, i) => p === "*" || p === segs[i])
}

const Method = Schema.Literals(["GET", "POST", "DELETE"])
const RuleSpec = Schema.Struct({ action: Schema.Literals(["allow", "deny"]), method: Method, path: Segs(Segment) })

describe("rule matching properties", () => {
  it.effect.prop("a glob agrees with segment-wise matching", [Segs(Segment), Segs(PathSegment)], ([pattern, path]) =>
    Effect.sync(() => {
      const got = compileGlob("/" + pattern.join("/")).test("/" + path.join("/"))
      assert.strictEqual(got, refGlob(pattern, path))
    }))

  it.effect.prop("/prefix/** matches exactly the paths under the prefix", [Segs(PathSegment), Segs(PathSegment)], ([prefix, path]) =>
    Effect.sync(() => {
      const glob = compileGlob("/" + [...prefix, "**"].join("/"))
      const expected = prefix.length <= path.length && prefix.every((s, i) => path[i] === s)
      // "/**" is the whole tree, "/" included

      assert.strictEqual(glob.test("/" + path.join("/")), expected)
    }))

  it.effect.prop(
    "first match wins and no match denies",
    [Schema.Array(RuleSpec).check(Schema.isMaxLength(6)), Method, Segs(PathSegment)],
    ([specs, method, path]) =>
      Effect.sync(() => {
        const rules = specs.map((s) => rule(`${s.action} ${s.method} /${s.path.join("/")}`))
        const request = req(method, "/" + path.join("/"))
        const first = specs.findIndex((s) => s.method === method && (s.action === "deny" ? refSpan(s.path, path) : refGlob(s.path, path)))
        const decision = decide({ name: "p", rules }, request)
        if (first === -1) {
          assert.isFalse(decision.allowed)
          assert.strictEqual(decision.rule, undefined)
        } else {
          assert.strictEqual(decision.allowed, specs[first]!.action === "allow")
          assert.strictEqual(decision.rule, rules[first])
        }
      })
  )

  it.effect.prop(
    "query constraints: present, absent and exact value",
    [Schema.Literals(["k", "!k", "k=1", "k=*"]), Schema.Array(Schema.Literals(["k=1", "k=2", "k=", "j=1"])).check(Schema.isMaxLength(3))],
    ([constraint, params]) =>
      Effect.sync(() => {
        const r = rule(`GET /x?${constraint}`)
        const values = params.filter((p) => p.startsWith("k=")).map((p) => p.slice(2))
        const expected = constraint === "k" || constraint === "k=*"
          ? values.length > 0
          : constraint === "!k"
          ? values.length === 0
          : values[0] === "1" // the Engine reads the first value

        assert.strictEqual(ruleMatches(r, req("GET", "/x", params.join("&"))), expected)
      })
  )
})

describe("presets and denials", () => {
  it("every preset compiles", () => {
    for (const name of Object.keys(PRESETS)) {
      const rules = presetRules(name)
      assert.notInstanceOf(rules, RuleSyntaxError, name)
    }
    assert.instanceOf(presetRules("nope"), RuleSyntaxError)
    assert.instanceOf(presetRules("constructor"), RuleSyntaxError)
  })

  it("libpod paths match like Docker's: versions in patterns ignored; libpod-read-only reads metadata only", () => {
    for (const pattern of ["/v*/libpod/containers/json", "/v4.3.1/libpod/containers/json", "/libpod/containers/json"]) {
      const rule = parseRule(`GET ${pattern}`) as AccessRule
      assert.isTrue(decide({ name: "r", rules: [rule] }, req("GET", "/libpod/containers/json")).allowed, pattern)
    }
    const libpod = { name: "lp", rules: presetRules("libpod-read-only") as ReadonlyArray<AccessRule> }
    for (const p of ["/libpod/_ping", "/libpod/info", "/libpod/containers/json", "/libpod/containers/abc/json", "/libpod/images/docker.io/library/x:1/json", "/libpod/pods/json", "/libpod/events"]) {
      assert.isTrue(decide(libpod, req("GET", p)).allowed, p)
    }
    for (const [m, p] of [["POST", "/libpod/containers/abc/start"], ["GET", "/libpod/containers/abc/export"], ["GET", "/libpod/containers/abc/archive"], ["GET", "/libpod/generate/abc/kube"], ["DELETE", "/libpod/containers/abc"], ["GET", "/containers/json"]]) {
      assert.isFalse(decide(libpod, req(m!, p!)).allowed, `${m} ${p}`)
    }
  })

  it("read-only allows reads only; traefik allows what Traefik needs and no writes", () => {
    const readOnly = { name: "ro", rules: presetRules("read-only") as ReadonlyArray<AccessRule> }
    assert.isTrue(decide(readOnly, req("GET", "/containers/abc/json")).allowed)
    assert.isTrue(decide(readOnly, req("HEAD", "/_ping")).allowed)
    assert.isFalse(decide(readOnly, req("POST", "/containers/create")).allowed)
    const traefik = { name: "traefik", rules: presetRules("traefik") as ReadonlyArray<AccessRule> }
    for (const p of ["/_ping", "/version", "/events", "/containers/json", "/containers/abc/json", "/services", "/tasks", "/networks"]) {
      assert.isTrue(decide(traefik, req("GET", p)).allowed, p)
    }
    assert.isFalse(decide(traefik, req("GET", "/containers/abc/logs")).allowed)
    assert.isFalse(decide(traefik, req("POST", "/containers/abc/exec")).allowed)
    assert.isFalse(decide(traefik, req("GET", "/secrets")).allowed)
  })

  it("the denial names the rule set and the deciding rule", () => {
    const rs = { name: "ci", rules: [rule("deny POST /containers/*/exec"), rule("POST /**")] }
    const r = req("POST", "/containers/x/exec")
    const message = denialMessage(rs, r, decide(rs, r))
    assert.include(message, `rule set "ci"`)
    assert.include(message, "deny POST /containers/*/exec")
    const g = req("GET", "/info")
    assert.include(denialMessage(rs, g, decide(rs, g)), "no rule matched")
  })
})
