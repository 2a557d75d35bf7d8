import { assert, describe, it } from "@effect/vitest"
import { decide, parseRule, RuleSyntaxError } from "../../src/domain/AccessRule.ts"
import { DEFAULT_BODY_POLICY } from "../../src/domain/BodyPolicy.ts"
import { Learned, learnBody, learnMessage, learnRules, MAX_LEARNED_REQUESTS, pathGlob, readLearnLog, renderLearnedRules } from "../../src/domain/RuleLearning.ts"

describe("RuleLearning", () => {
  it("generalises ids and names, keeps calls of their own", () => {
    const cases: ReadonlyArray<readonly [string, string]> = [
      ["/containers/json", "/containers/json"],
      ["/containers/create", "/containers/create"],
      ["/containers/abc/json", "/containers/*/json"],
      ["/containers/abc", "/containers/*"],
      ["/containers/abc/attach/ws", "/containers/*/attach/ws"],
      ["/exec/abc/start", "/exec/*/start"],
      ["/images/docker.io/library/busybox:latest/json", "/images/**/json"],
      ["/images/busybox", "/images/**"],
      ["/images/json", "/images/json"],
      ["/images/create", "/images/create"],
      ["/distribution/docker.io/x/json", "/distribution/**/json"],
      ["/networks/n1/connect", "/networks/*/connect"],
      ["/networks/create", "/networks/create"],
      ["/libpod/containers/abc/json", "/libpod/containers/*/json"],
      ["/_ping", "/_ping"],
      ["/containers/a b/json", "~^/containers/a\\u0020b/json$"]
    ]
    for (const [path, glob] of cases) assert.strictEqual(pathGlob(path), glob, path)
  })

  it("reads records back from logfmt and JSON logs, skipping other lines", () => {
    const rule = { _tag: "Rule", method: "GET", path: "/containers/abc/json" } as const
    const body = { _tag: "Body", method: "POST", path: "/containers/create", field: "HostConfig.Privileged", check: "allowPrivileged", reason: "a privileged container" } as const
    const m1 = learnMessage("rs", "no rule matched", rule)
    const m2 = learnMessage("rs", "refused", body)
    const logfmt = `timestamp=t level=WARN message=${JSON.stringify(m1)} component=x`
    const json = JSON.stringify({ timestamp: "t", level: "WARN", message: m2 })
    const text = ["garbage", logfmt, "level=INFO message=hello", json, `message="learn: would refuse {bad"`].join("\n")
    assert.deepStrictEqual(readLearnLog(text), [rule, body])
  })

  it("suggests the fewest rules, methods merged per path, and the body switches; they allow what was seen", () => {
    const seen = [
      { _tag: "Rule", method: "GET", path: "/containers/a/json" },
      { _tag: "Rule", method: "HEAD", path: "/containers/b/json" },
      { _tag: "Rule", method: "POST", path: "/containers/create" },
      { _tag: "Rule", method: "DELETE", path: "/containers/a" },
      { _tag: "Rule", method: "GET", path: "/containers/a/json" },
      { _tag: "Body", method: "POST", path: "/containers/create", field: "HostConfig.Privileged", check: "allowPrivileged", reason: "x" },
      { _tag: "Body", method: "POST", path: "/containers/create", field: "HostConfig.CapAdd", check: "allowCapabilities", reason: "x", value: "NET_ADMIN" },
      { _tag: "Body", method: "POST", path: "/containers/create", field: "HostConfig.Binds[0]", check: "allowBindSources", reason: "x", value: "/srv/a" },
      { _tag: "Body", method: "POST", path: "/containers/create", field: "HostConfig.CapAdd", check: "allowCapabilities", reason: "x", value: "CHOWN" }
    ] as const
    const learned = learnRules(seen)
    assert.deepStrictEqual(learned.rules, ["DELETE /containers/*", "POST /containers/create", "GET,HEAD /containers/*/json"].sort((a, b) => a.split(" ")[1]! < b.split(" ")[1]! ? -1 : 1))
    assert.deepStrictEqual(learned.bodySwitches, ["allowPrivileged"])
    assert.deepStrictEqual(learned.bodyLists, [{ check: "allowBindSources", values: ["/srv/a"] }, { check: "allowCapabilities", values: ["CHOWN", "NET_ADMIN"] }])
    const rules = learned.rules.map((r) => parseRule(r))
    for (const r of rules) assert.notInstanceOf(r, RuleSyntaxError)
    const ruleSet = { name: "learned", rules: rules as never }
    for (const s of seen) if (s._tag === "Rule") assert.isTrue(decide(ruleSet, { method: s.method, path: s.path, query: "" }).allowed, s.path)
    assert.isFalse(decide(ruleSet, { method: "POST", path: "/containers/a/start", query: "" }).allowed)
    const text = renderLearnedRules(learned, "learned")
    assert.include(text, "rules:\n  - \"DELETE /containers/*\"")
    assert.include(text, "bodyPolicy:\n  allowPrivileged: true\n  allowBindSources: [\"/srv/a\"]\n  allowCapabilities: [\"CHOWN\", \"NET_ADMIN\"]")
  })

  it("learnBody finds every switch a body needs, and stops at what no switch allows", () => {
    const body = Buffer.from(JSON.stringify({ Image: "x", HostConfig: { Privileged: true, CapAdd: ["NET_ADMIN", "chown"], Binds: ["/srv/a:/a", "/srv/b/c:/c"], PidMode: "host" } }))
    const learned = learnBody(DEFAULT_BODY_POLICY, "ContainerCreate", body)
    assert.deepStrictEqual(learned.verdict, { _tag: "Allow" })
    assert.deepStrictEqual(learned.refusals.map((r) => [r.verdict.check, r.value]).sort(), [
      ["allowBindSources", "/srv/a"],
      ["allowBindSources", "/srv/b/c"],
      ["allowCapabilities", "NET_ADMIN"],
      ["allowCapabilities", "chown"],
      ["allowHostNamespaces", undefined],
      ["allowPrivileged", undefined]
    ])
    const socket = learnBody(DEFAULT_BODY_POLICY, "ContainerCreate", Buffer.from(JSON.stringify({ HostConfig: { Privileged: true, Binds: ["/run:/r"] } })))
    assert.strictEqual(socket.verdict._tag, "Refuse")
    assert.strictEqual(socket.refusals.length, 1)
    assert.strictEqual(learnBody(DEFAULT_BODY_POLICY, "ContainerCreate", Buffer.from("{")).verdict._tag, "Refuse")
  })

  it("keeps at most MAX_LEARNED_REQUESTS distinct requests, one per method and glob", () => {
    const learned = new Learned()
    learned.add({ _tag: "Rule", method: "GET", path: "/containers/a/json" })
    learned.add({ _tag: "Rule", method: "GET", path: "/containers/b/json" })
    assert.strictEqual([...learned.values()].length, 1)
    for (let i = 0; i < MAX_LEARNED_REQUESTS + 5; i++) learned.add({ _tag: "Rule", method: "GET", path: `/x${i}` })
    assert.strictEqual([...learned.values()].length, MAX_LEARNED_REQUESTS)
    assert.strictEqual(learned.dropped, 6)
  })
})
