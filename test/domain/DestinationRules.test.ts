import { describe, expect, it } from "@effect/vitest"
import { Schema } from "effect"
import {
  checkDestination,
  compileGoPattern,
  compileRules,
  isOpen,
  RulePatternError
} from "../../src/domain/DestinationRules.ts"
import type { DestinationRules, RuleSpec } from "../../src/domain/DestinationRules.ts"

const compiled = (lists: { blacklist?: Array<RuleSpec>; whitelist?: Array<RuleSpec> }): DestinationRules => {
  const r = compileRules(lists)
  if (r instanceof RulePatternError) throw new Error(r.message)
  return r
}

const get = (url: string, header: Record<string, Array<string>> | null = null) => ({ method: "GET", url, header })

describe("destination rules", () => {
  it("allows everything when no rule is configured (wsp's behaviour)", () => {
    const rules = compiled({})
    expect(isOpen(rules)).toBe(true)
    expect(checkDestination(rules, get("http://169.254.169.254/latest/meta-data"))._tag).toBe("Allowed")
    expect(checkDestination(rules, { method: "DELETE", url: "", header: null })._tag).toBe("Allowed")
  })

  it("refuses on any blacklist match before looking at the whitelist", () => {
    const rules = compiled({
      blacklist: [{ method: ".*", url: ".*forbidden.*" }],
      whitelist: [{ url: ".*" }]
    })
    const verdict = checkDestination(rules, get("http://a/forbidden/x"))
    expect(verdict).toMatchObject({ _tag: "Forbidden", message: "Destination is forbidden" })
    expect(checkDestination(rules, get("http://a/fine"))._tag).toBe("Allowed")
  })

  it("requires one whitelist rule to match: method, URL and every named header", () => {
    const rules = compiled({
      whitelist: [{ method: "^GET$", url: "^https?://internal\\.example\\.net/", headers: { "x-custom-header": "^value$" } }]
    })
    expect(checkDestination(rules, get("http://internal.example.net/a", { "X-Custom-Header": ["value"] }))._tag).toBe("Allowed")
    expect(checkDestination(rules, get("http://internal.example.net/a", { "X-Custom-Header": ["other"] }))).toMatchObject({
      _tag: "NotAllowed",
      message: "Destination is not allowed"
    })
    expect(checkDestination(rules, get("http://internal.example.net/a"))._tag).toBe("NotAllowed")
    expect(checkDestination(rules, { method: "POST", url: "http://internal.example.net/a", header: { "X-Custom-Header": ["value"] } })._tag)
      .toBe("NotAllowed")
    expect(checkDestination(rules, get("http://internal.example.net.evil/a", { "X-Custom-Header": ["value"] }))._tag).toBe("NotAllowed")
  })

  it("matches unanchored, like Go's MatchString, and understands a leading (?i)", () => {
    const rules = compiled({ whitelist: [{ url: "(?i)EXAMPLE" }] })
    expect(checkDestination(rules, get("http://www.example.com/"))._tag).toBe("Allowed")
    expect(compileGoPattern("url", "(?U)a+")).toBeInstanceOf(RulePatternError)
  })

  it("names the field of a pattern that does not compile", () => {
    const r = compileRules({ whitelist: [{ url: "ok" }, { method: "(" }] })
    expect(r).toBeInstanceOf(RulePatternError)
    expect((r as RulePatternError).field).toBe("whitelist[1].method")
  })

  it.prop("a blacklisted URL is never allowed, whatever the whitelist", [Schema.String, Schema.String], ([path, other]) => {
    const rules = compiled({ blacklist: [{ url: "/private/" }], whitelist: [{ url: other.replace(/[^a-z]/g, "") }] })
    expect(checkDestination(rules, get(`http://h/private/${path}`))._tag).toBe("Forbidden")
  })
})
