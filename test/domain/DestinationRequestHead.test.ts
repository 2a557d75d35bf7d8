import { describe, expect, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import {
  DestinationHeadError,
  destinationMethod,
  destinationTarget,
  encodeDestinationRequestHead,
  goHeaderFromFields,
  requestBodyFraming,
  responseContentLength
} from "../../src/domain/DestinationRequestHead.ts"
import type { DestinationTarget } from "../../src/domain/DestinationRequestHead.ts"
import { BodyFramer } from "../../src/domain/Http1Parser.ts"

const target = (url: string): DestinationTarget => {
  const t = destinationTarget(url)
  if (t instanceof DestinationHeadError) throw new Error(t.message)
  return t
}

describe("DestinationRequestHead", () => {
  it("parses destinations into where to connect, the Host header and the request path", () => {
    expect(target("http://api.internal/a/b?x=1&y=%20")).toEqual({
      secure: false,
      host: "api.internal",
      port: 80,
      authority: "api.internal",
      path: "/a/b?x=1&y=%20"
    })
    expect(target("https://[::1]:8443")).toEqual({ secure: true, host: "::1", port: 8443, authority: "[::1]:8443", path: "/" })
    expect(target("HTTP://%31%32%37.0.0.1:80/")).toMatchObject({ host: "127.0.0.1", port: 80, authority: "127.0.0.1" })
    expect(destinationTarget("ftp://x/")).toMatchObject({ reason: "UnsupportedScheme", message: "unsupported protocol scheme \"ftp\"" })
    expect(destinationTarget("not a url")).toMatchObject({ reason: "InvalidUrl" })
  })

  it("frames bodies as Go's transport does", () => {
    expect(requestBodyFraming("GET", 0)).toBe("None")
    expect(requestBodyFraming("POST", 0)).toBe("Length")
    expect(requestBodyFraming("GET", 5)).toBe("Length")
    expect(requestBodyFraming("PUT", -1)).toBe("Chunked")
    expect(destinationMethod("")).toBe("GET")
  })

  it("writes the request head: Host from the URL, hop-by-hop fields, Host and Content-Length from the head dropped", () => {
    const head = encodeDestinationRequestHead("POST", target("http://127.0.0.1:8080/p?q=1"), {
      Accept: ["a", "b"],
      Connection: ["close, X-Private"],
      "X-Private": ["secret"],
      "Transfer-Encoding": ["gzip"],
      Host: ["evil.example"],
      "Content-Length": ["999"],
      "X-Latin": ["caf\u00e9"]
    }, 5)
    expect(head).toBeInstanceOf(Buffer)
    expect((head as Buffer).toString("latin1")).toBe(
      "POST /p?q=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: a\r\nAccept: b\r\nX-Latin: caf\u00e9\r\nContent-Length: 5\r\n\r\n"
    )
    const chunked = encodeDestinationRequestHead("PUT", target("http://h/"), null, -1) as Buffer
    expect(chunked.toString("latin1")).toBe("PUT / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
  })

  it("refuses what would split or smuggle a request", () => {
    const t = target("http://h/")
    expect(encodeDestinationRequestHead("GET", t, { "X-A": ["1\r\nX-Injected: 1"] }, 0)).toMatchObject({ reason: "InvalidHeader" })
    expect(encodeDestinationRequestHead("GET", t, { "X A": ["1"] }, 0)).toMatchObject({ reason: "InvalidHeader" })
    expect(encodeDestinationRequestHead("GET", t, { "X-A": ["\u0100"] }, 0)).toMatchObject({ reason: "InvalidHeader" })
    expect(encodeDestinationRequestHead("GET /admin HTTP/1.1\r\n", t, null, 0)).toMatchObject({ reason: "InvalidMethod" })
  })

  it("maps a response head's fields to Go's header map without hop-by-hop fields", () => {
    expect(goHeaderFromFields(["content-type", "text/plain", "set-cookie", "a=1", "Set-Cookie", "b=2", "transfer-encoding", "chunked", "connection", "x-gone", "x-gone", "1"]))
      .toEqual({ "Content-Type": ["text/plain"], "Set-Cookie": ["a=1", "b=2"] })
    expect(responseContentLength(12, false)).toBe(12)
    expect(responseContentLength(undefined, true)).toBe(0)
    expect(responseContentLength(undefined, false)).toBe(-1)
  })

  it.effect.prop(
    "BodyFramer reports exactly the chunk data of a chunked body, however it is split into reads",
    {
      body: Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 255 }))).check(Schema.isMaxLength(3000)),
      sizes: Schema.NonEmptyArray(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 700 }))).check(Schema.isMaxLength(20)),
      cuts: Schema.NonEmptyArray(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 900 }))).check(Schema.isMaxLength(20))
    },
    ({ body, sizes, cuts }) =>
      Effect.sync(() => {
        const bytes = Uint8Array.from(body)
        const parts: Array<Buffer> = []
        let at = 0
        let i = 0
        while (at < bytes.length) {
          const n = Math.min(sizes[i++ % sizes.length]!, bytes.length - at)
          parts.push(Buffer.from(`${n.toString(16)}${i % 2 === 0 ? ";e=1" : ""}\r\n`), Buffer.from(bytes.subarray(at, at + n)), Buffer.from("\r\n"))
          at += n
        }
        parts.push(Buffer.from("0\r\nT: 1\r\n\r\nNEXT"))
        const wire = Buffer.concat(parts)
        const framer = new BodyFramer({ _tag: "Chunked" }, 1024, 502)
        const decoded: Array<Buffer> = []
        let offset = 0
        let consumed = 0
        let c = 0
        while (!framer.done && offset < wire.length) {
          const read = wire.subarray(offset, Math.min(wire.length, offset + cuts[c++ % cuts.length]!))
          const n = framer.consume(read, 0, (start, end) => void decoded.push(Buffer.from(read.subarray(start, end))))
          if (typeof n !== "number") throw new Error(n.message)
          consumed += n
          offset += read.length
        }
        expect(framer.done).toBe(true)
        expect(Buffer.compare(Buffer.concat(decoded), Buffer.from(bytes))).toBe(0)
        expect(wire.subarray(consumed).toString()).toBe("NEXT")
      })
  )
})
