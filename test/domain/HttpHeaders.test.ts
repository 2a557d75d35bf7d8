import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import {
  canonicalTarget,
  type CanonicalTarget,
  headerValue,
  isTargetRejection,
  requestHeaders,
  responseHeaders
} from "../../src/domain/HttpHeaders.ts"

const names = (flat: ReadonlyArray<string>) => flat.filter((_, i) => i % 2 === 0).map((n) => n.toLowerCase())

const ok = (target: string): CanonicalTarget => {
  const r = canonicalTarget(target)
  if (isTargetRejection(r)) throw new Error(`${target}: ${r.detail}`)
  return r
}

describe("hop-by-hop headers", () => {
  it("removes RFC 9110 hop-by-hop headers and those named in Connection", () => {
    const raw = [
      "Host", "docker",
      "Connection", "keep-alive, X-Secret",
      "Keep-Alive", "timeout=5",
      "TE", "trailers",
      "Transfer-Encoding", "chunked",
      "X-Secret", "s",
      "Proxy-Authorization", "Basic x",
      "Upgrade", "tcp",
      "Expect", "100-continue",
      "User-Agent", "Docker-Client"
    ]
    assert.deepStrictEqual(names(requestHeaders(raw, false, "off", undefined)), ["host", "user-agent"])
    const up = requestHeaders(raw, true, "off", undefined)
    assert.deepStrictEqual(names(up), ["host", "user-agent", "connection", "upgrade"])
    assert.strictEqual(headerValue(up, "upgrade"), "tcp")
    assert.deepStrictEqual(
      names(responseHeaders(["Content-Type", "a", "Connection", "close, X-Hop", "X-Hop", "1", "Trailer", "X-Sum"])),
      ["content-type", "trailer"]
    )
  })

  it("writes X-Forwarded-* in replace and append modes, nothing when off", () => {
    const raw = ["Host", "h", "X-Forwarded-For", "10.0.0.1", "X-Forwarded-Proto", "https"]
    const info = { clientAddress: "192.0.2.7", proto: "http", host: "h" }
    const replaced = requestHeaders(raw, false, "replace", info)
    assert.strictEqual(headerValue(replaced, "x-forwarded-for"), "192.0.2.7")
    assert.strictEqual(headerValue(replaced, "x-forwarded-proto"), "http")
    assert.strictEqual(headerValue(replaced, "x-forwarded-host"), "h")
    const appended = requestHeaders(raw, false, "append", info)
    assert.strictEqual(headerValue(appended, "x-forwarded-for"), "10.0.0.1, 192.0.2.7")
    assert.strictEqual(headerValue(appended, "x-forwarded-proto"), "https")
    assert.deepStrictEqual(requestHeaders(raw, false, "off", undefined), raw)
  })
})

// What is dropped, written the plain way (every name lower-cased and looked up): the reference the
// header rewriting is compared with.
const HOP = new Set(["connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade", "proxy-authorization", "proxy-authenticate", "http2-settings"])
const nominatedBy = (raw: ReadonlyArray<string>): Set<string> => {
  const named = new Set<string>()
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i]!.toLowerCase() !== "connection") continue
    for (const t of raw[i + 1]!.split(",")) if (t.trim().length > 0) named.add(t.trim().toLowerCase())
  }
  return named
}
/** `raw` without hop-by-hop fields, those `Connection` names, and those `alsoDropped` names (lower-cased). */
const reference = (raw: ReadonlyArray<string>, alsoDropped: ReadonlySet<string>): Array<string> => {
  const named = nominatedBy(raw)
  const out: Array<string> = []
  for (let i = 0; i < raw.length; i += 2) {
    const lower = raw[i]!.toLowerCase()
    if (!HOP.has(lower) && !alsoDropped.has(lower) && !named.has(lower)) out.push(raw[i]!, raw[i + 1]!)
  }
  return out
}
const NAME_POOL = [
  "Connection", "CONNECTION", "Keep-Alive", "keep-alive", "TE", "te", "Upgrade", "Transfer-Encoding", "Proxy-Connection",
  "Proxy-Authorization", "Proxy-Authenticate", "HTTP2-Settings", "Expect", "Host", "Date", "Content-Type", "Content-Length",
  "X-Secret", "x-secret", "X-A", "X-Hop", "User-Agent", "A-Very-Long-Field-Name-Over-Thirty-One", "a-very-long-field-name-over-thirty-one",
  "\u212aeep-alive", "\u0130x", "x\u0130", "\u0130abc"
]
const TOKEN_POOL = ["keep-alive", "close", "x-secret", "X-SECRET", " x-a ", "x-hop", "\u0130x", "i\u0307x", "i\u0307abc", "\u0130ABC", "upgrade", "date", "a-very-long-field-name-over-thirty-one", "", "\u212aeep-alive"]

describe("hop-by-hop headers, against the plain reading", () => {
  it.prop(
    "request and response fields are dropped exactly as by name-by-name lookup",
    [
      Schema.Array(
        Schema.Struct({
          name: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: NAME_POOL.length - 1 })),
          tokens: Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: TOKEN_POOL.length - 1 }))).check(Schema.isMaxLength(3))
        })
      ).check(Schema.isMaxLength(10))
    ],
    ([fields]) => {
      const raw: Array<string> = []
      for (const f of fields) {
        const name = NAME_POOL[f.name]!
        raw.push(name, name.toLowerCase() === "connection" ? f.tokens.map((t) => TOKEN_POOL[t]).join(",") : "v")
      }
      assert.deepStrictEqual(responseHeaders(raw), reference(raw, new Set()))
      assert.deepStrictEqual(requestHeaders(raw, false, "off", undefined), reference(raw, new Set(["expect"])))
    },
    { arbitrary: { runs: 2000 } }
  )
})

describe("canonicalTarget", () => {
  it("strips the API version and keeps the query", () => {
    const t = ok("/v1.41/containers/json?all=1")
    assert.strictEqual(t.path, "/containers/json")
    assert.strictEqual(t.apiVersion, "1.41")
    assert.strictEqual(t.query, "all=1")
    assert.strictEqual(t.upstreamTarget, "/v1.41/containers/json?all=1")
    assert.strictEqual(ok("/_ping").path, "/_ping")
    assert.strictEqual(ok("/v1.41").path, "/")
    assert.strictEqual(ok("/version").apiVersion, undefined)
  })

  it("strips Podman's N.N.N version before /libpod/ only", () => {
    const t = ok("/v4.3.1/libpod/containers/json?all=true")
    assert.strictEqual(t.path, "/libpod/containers/json")
    assert.strictEqual(t.apiVersion, "4.3.1")
    assert.strictEqual(t.upstreamTarget, "/v4.3.1/libpod/containers/json?all=true")
    assert.strictEqual(ok("/v4.0/libpod/info").path, "/libpod/info")
    assert.strictEqual(ok("/libpod/info").path, "/libpod/info")
    for (const bad of ["/v4.3.1/containers/json", "/v4.3.1/libpodx/info", "/v4.3.1.1/libpod/info", "/v4.3.1/libpod"]) {
      assert.isTrue(isTargetRejection(canonicalTarget(bad)), bad)
    }
  })

  it("collapses // and decodes harmless escapes, forwarding what it matched", () => {
    const t = ok("//v1.41//containers/%6Aso%6E")
    assert.strictEqual(t.path, "/containers/json")
    assert.strictEqual(t.upstreamTarget, "/v1.41/containers/json")
    assert.strictEqual(ok("/images/a%3Ab/json").path, "/images/a:b/json")
  })

  it.each([
    { target: "/v1.41/../containers/x/exec", problem: "DotSegment" },
    { target: "/containers/./x", problem: "DotSegment" },
    { target: "/containers/%2e%2e/x", problem: "DotSegment" },
    { target: "/containers/x%2Fexec", problem: "EncodedSeparator" },
    { target: "/containers/x%5Cexec", problem: "EncodedSeparator" },
    { target: "/containers/%zz", problem: "BadPercentEncoding" },
    { target: "/containers/%00", problem: "ControlCharacter" },
    { target: "http://evil/containers/json", problem: "NotOriginForm" },
    { target: "*", problem: "NotOriginForm" },
    { target: "/a#b", problem: "ControlCharacter" },
    { target: "/v1.41.0/containers/x/archive", problem: "BadApiVersion" },
    { target: "/v1.41./containers/x/export", problem: "BadApiVersion" },
    { target: "/v./containers/json", problem: "BadApiVersion" }
  ])("refuses $target ($problem)", ({ target, problem }) => {
    const r = canonicalTarget(target)
    assert.isTrue(isTargetRejection(r))
    assert.strictEqual((r as { problem: string }).problem, problem)
  })

  const Seg = Schema.Literals(["a", "B", "x y", "é", "a:b", "v1.41", "", "%41", "c@d"])
  it.effect.prop("canonical paths are fixed points with no // and no dot segments", [Schema.Array(Seg).check(Schema.isMaxLength(5))], ([segs]) =>
    Effect.sync(() => {
      const target = "/" + segs.map((s) => (s.includes(" ") || s === "é" ? encodeURIComponent(s) : s)).join("/")
      const t = ok(target)
      assert.notInclude(t.path, "//")
      const again = ok(t.upstreamTarget)
      assert.strictEqual(again.upstreamTarget, t.upstreamTarget)
      assert.strictEqual(again.path, t.path)
    }))

  it.effect.prop("percent-encoding a segment never changes the matched path", [Schema.Array(Schema.Literals(["containers", "json", "x1", "_ping"])).check(Schema.isMaxLength(4))], ([segs]) =>
    Effect.sync(() => {
      const plain = "/" + segs.join("/")
      const encoded = "/" + segs.map((s) => [...s].map((c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join("")).join("/")
      assert.strictEqual(ok(encoded).path, ok(plain).path)
    }))
})
