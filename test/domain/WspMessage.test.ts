import { describe, expect, it } from "@effect/vitest"
import { Schema } from "effect"
import {
  CANONICAL_NAME_CACHE_ENTRIES,
  canonicalHeaderName,
  decodeGreeting,
  decodeRequestHead,
  decodeResponseHead,
  defaultHeadLimits,
  encodeGoString,
  encodeGreeting,
  encodeRequestHead,
  encodeResponseHead,
  goHeaderGet,
  withoutHopByHop,
  WspMessageError
} from "../../src/domain/WspMessage.ts"

describe("request and response heads in Go's JSON shape", () => {
  it("encodes a request head byte for byte as Go's json.Marshal does (fields in struct order, keys sorted)", () => {
    const text = encodeRequestHead({
      Method: "POST",
      URL: "http://127.0.0.1:8081/echo?a=1&b=<2>",
      Header: { "User-Agent": ["curl/8.5.0"], Accept: ["*/*"], "X-Proxy-Destination": ["http://127.0.0.1:8081/echo?a=1&b=<2>"], "Content-Length": ["5"] },
      ContentLength: 5
    })
    expect(text).toBe(
      "{\"Method\":\"POST\",\"URL\":\"http://127.0.0.1:8081/echo?a=1\\u0026b=\\u003c2\\u003e\"," +
        "\"Header\":{\"Accept\":[\"*/*\"],\"Content-Length\":[\"5\"],\"User-Agent\":[\"curl/8.5.0\"]," +
        "\"X-Proxy-Destination\":[\"http://127.0.0.1:8081/echo?a=1\\u0026b=\\u003c2\\u003e\"]},\"ContentLength\":5}"
    )
  })

  it("encodes a response head, a nil header as null and wsp's error response with an empty map", () => {
    expect(encodeResponseHead({ StatusCode: 200, Header: { "Content-Type": ["text/plain"] }, ContentLength: -1 }))
      .toBe("{\"StatusCode\":200,\"Header\":{\"Content-Type\":[\"text/plain\"]},\"ContentLength\":-1}")
    expect(encodeResponseHead({ StatusCode: 527, Header: {}, ContentLength: 12 }))
      .toBe("{\"StatusCode\":527,\"Header\":{},\"ContentLength\":12}")
    expect(encodeRequestHead({ Method: "GET", URL: "", Header: null, ContentLength: 0 }))
      .toBe("{\"Method\":\"GET\",\"URL\":\"\",\"Header\":null,\"ContentLength\":0}")
  })

  it("escapes strings as Go does", () => {
    expect(encodeGoString("a\"b\\c\n\r\t\b\f\u0001<>&\u2028\u2029é😀")).toBe(
      "\"a\\\"b\\\\c\\n\\r\\t\\u0008\\u000c\\u0001\\u003c\\u003e\\u0026\\u2028\\u2029é😀\""
    )
    // an unpaired surrogate cannot be valid UTF-8: Go writes U+FFFD
    expect(encodeGoString("x\ud800y")).toBe("\"x\\ufffdy\"")
  })

  it("decodes heads with Go's rules: case-insensitive names, unknown fields ignored, null keeps zero", () => {
    const head = decodeRequestHead(
      "{\"method\":\"PUT\",\"url\":\"http://x/\",\"HEADER\":{\"A\":[\"1\",\"2\"],\"B\":null},\"contentlength\":3,\"Extra\":true}"
    )
    expect(head).toEqual({ Method: "PUT", URL: "http://x/", Header: { A: ["1", "2"], B: [] }, ContentLength: 3 })
    expect(decodeRequestHead("{\"Method\":null}")).toEqual({ Method: "", URL: "", Header: null, ContentLength: 0 })
    // an exact match wins over a case-insensitive one, wherever it appears
    expect(decodeResponseHead("{\"StatusCode\":201,\"statuscode\":500}")).toMatchObject({ StatusCode: 201 })
  })

  it("refuses malformed heads with a typed reason", () => {
    const reason = (x: unknown) => (x instanceof WspMessageError ? x.reason : "accepted")
    expect(reason(decodeRequestHead("{not json"))).toBe("MalformedJson")
    expect(reason(decodeRequestHead("[1,2]"))).toBe("NotAnObject")
    expect(reason(decodeRequestHead("\"GET\""))).toBe("NotAnObject")
    expect(reason(decodeRequestHead("{\"Method\":1}"))).toBe("WrongFieldType")
    expect(reason(decodeRequestHead("{\"ContentLength\":1.5}"))).toBe("WrongFieldType")
    expect(reason(decodeRequestHead("{\"ContentLength\":\"5\"}"))).toBe("WrongFieldType")
    expect(reason(decodeRequestHead("{\"Header\":{\"A\":\"x\"}}"))).toBe("WrongFieldType")
    expect(reason(decodeRequestHead("{\"Header\":{\"A\":[1]}}"))).toBe("WrongFieldType")
    expect(reason(decodeResponseHead("{\"StatusCode\":\"200\"}"))).toBe("WrongFieldType")
    const many = JSON.stringify({ Header: Object.fromEntries(Array.from({ length: 5 }, (_, i) => [`H${i}`, ["v"]])) })
    expect(reason(decodeRequestHead(many, { ...defaultHeadLimits, maxHeaderCount: 4 }))).toBe("TooManyHeaders")
    expect(reason(decodeRequestHead(many, { ...defaultHeadLimits, maxHeadLength: 10 }))).toBe("HeadTooLarge")
  })

  it.prop(
    "a request head survives encode then decode",
    [
      Schema.String,
      Schema.String,
      Schema.Record(Schema.String, Schema.Array(Schema.String)),
      Schema.Int.check(Schema.isBetween({ minimum: -1, maximum: 2 ** 40 }))
    ],
    ([method, url, header, length]) => {
      // lone surrogates are replaced on the wire, as in Go
      const clean = (s: string) => s.replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, "\ufffd")
      // names that differ only in unpaired surrogates collapse into one on the wire
      if (new Set(Object.keys(header).map(clean)).size !== Object.keys(header).length) return
      const cleanHeader = Object.fromEntries(Object.entries(header).map(([k, v]) => [clean(k), v.map(clean)]))
      const text = encodeRequestHead({ Method: method, URL: url, Header: header, ContentLength: length })
      const back = decodeRequestHead(text, { maxHeadLength: Infinity, maxHeaderCount: Infinity, maxHeaderValues: Infinity })
      expect(back).toEqual({ Method: clean(method), URL: clean(url), Header: cleanHeader, ContentLength: length })
    }
  )
})

describe("greeting", () => {
  it("is \"<id>_<size>\" and parses as wsp's server does", () => {
    expect(encodeGreeting({ id: "3f1c", size: 10 })).toBe("3f1c_10")
    expect(decodeGreeting("3f1c_10", 64)).toEqual({ id: "3f1c", size: 10 })
    // wsp splits on every "_" and reads the second part
    expect(decodeGreeting("a_5_junk", 64)).toEqual({ id: "a", size: 5 })
    for (const bad of ["noseparator", "a_", "a_x", "a_1.5", "a_-1", `a_${10 ** 9}`, `${"x".repeat(65)}_1`]) {
      expect(decodeGreeting(bad, 64)).toBeInstanceOf(WspMessageError)
    }
  })
})

describe("header names", () => {
  it("canonicalizes as Go's textproto does", () => {
    expect(canonicalHeaderName("x-proxy-destination")).toBe("X-Proxy-Destination")
    expect(canonicalHeaderName("CONTENT-TYPE")).toBe("Content-Type")
    expect(canonicalHeaderName("etag")).toBe("Etag")
    expect(canonicalHeaderName("bad header")).toBe("bad header")
    expect(goHeaderGet({ "X-Custom": ["a", "b"] }, "x-custom")).toBe("a")
    expect(goHeaderGet(null, "x")).toBe("")
  })

  it("gives the same answers for more distinct names than it remembers, and for names seen again", () => {
    const names = Array.from({ length: CANONICAL_NAME_CACHE_ENTRIES + 100 }, (_, i) => `x-name-${i}-VALUE`)
    for (const round of [1, 2]) {
      for (const [i, name] of names.entries()) expect(canonicalHeaderName(name), `round ${round}`).toBe(`X-Name-${i}-Value`)
    }
    const long = `x-${"a".repeat(100)}`
    expect(canonicalHeaderName(long)).toBe(`X-A${"a".repeat(99)}`)
    expect(canonicalHeaderName(long)).toBe(`X-A${"a".repeat(99)}`)
    expect(canonicalHeaderName("bad header")).toBe("bad header")
  })

  it("drops hop-by-hop headers and those named in Connection", () => {
    const out = withoutHopByHop({
      Connection: ["keep-alive, X-Private"],
      "Keep-Alive": ["timeout=5"],
      "X-Private": ["1"],
      "Transfer-Encoding": ["chunked"],
      Upgrade: ["websocket"],
      "Proxy-Authorization": ["Bearer k"],
      Te: ["trailers"],
      Accept: ["*/*"],
      Host: ["h"]
    }, new Set(["host"]))
    expect(out).toEqual({ Accept: ["*/*"] })
  })
})
