import { describe, expect, it } from "@effect/vitest"
import { Schema } from "effect"
import {
  BodyFramer,
  type Framing,
  hostValueOk,
  Http1Error,
  MAX_CHUNK_LINE,
  parseRequestHead,
  parseResponseHead,
  type RequestHead,
  requestHeadReader,
  responseFraming,
  responseHeadReader
} from "../../src/domain/Http1Parser.ts"

const LIMITS = { maxHeaderSize: 1024, maxHeadersCount: 8 }

const bytes = (s: string) => Buffer.from(s, "latin1")
const unhex = (s: string) => Buffer.from(s.replace(/\s+/g, ""), "hex")

/** Feeds `input` in pieces of the given sizes (cycled) to a request head reader; `unread` is what was never fed. */
const feedHead = (input: Buffer, sizes: ReadonlyArray<number>) => {
  const reader = requestHeadReader(LIMITS)
  let at = 0
  let k = 0
  for (;;) {
    const n = Math.max(1, sizes[k++ % sizes.length]!)
    const step = reader.push(input.subarray(at, at + n))
    at += n
    if (step._tag !== "Need" || at >= input.length) return { step, unread: input.subarray(at) }
  }
}

const readHead = (input: Buffer, sizes: ReadonlyArray<number> = [input.length || 1]) => feedHead(input, sizes).step

const headOf = (s: string): RequestHead => {
  const step = readHead(bytes(s))
  if (step._tag !== "Head") throw new Error(`expected a head, got ${JSON.stringify(step)}`)
  return step.head
}

const errorOf = (s: string, sizes?: ReadonlyArray<number>): Http1Error => {
  const step = readHead(bytes(s), sizes)
  if (step._tag !== "Error") throw new Error(`expected an error, got ${step._tag}`)
  return step.error
}

/** Runs a body through a framer in pieces; returns the bytes it claimed and what was left. */
const frame = (framing: Framing, input: Buffer, piece: number) => {
  const framer = new BodyFramer(framing, 256, 400)
  const claimed: Array<Buffer> = []
  for (let at = 0; at < input.length; at += piece) {
    const chunk = input.subarray(at, at + piece)
    const n = framer.consume(chunk, 0)
    if (n instanceof Http1Error) return { error: n, body: Buffer.concat(claimed), rest: Buffer.alloc(0), done: false }
    claimed.push(chunk.subarray(0, n))
    if (framer.done) return { error: undefined, body: Buffer.concat(claimed), rest: Buffer.concat([chunk.subarray(n), input.subarray(at + piece)]), done: true }
  }
  return { error: undefined, body: Buffer.concat(claimed), rest: Buffer.alloc(0), done: framer.done }
}

describe("request heads", () => {
  it("parses a hex golden byte at a time and in one piece alike", () => {
    // "GET /v1.41/containers/json?all=1 HTTP/1.1\r\nHost: docker\r\nX-A:  b \r\n\r\n" then a pipelined byte.
    const golden = unhex(
      "474554202f76312e34312f636f6e7461696e6572732f6a736f6e3f616c6c3d3120485454502f312e310d0a" +
        "486f73743a20646f636b65720d0a" + "582d413a20206220 0d0a" + "0d0a" + "5a"
    )
    for (const sizes of [[golden.length], [1], [2, 3, 5], [7]]) {
      const { step, unread } = feedHead(golden, sizes)
      expect(step._tag).toBe("Head")
      if (step._tag !== "Head") return
      expect(step.head.method).toBe("GET")
      expect(step.head.target).toBe("/v1.41/containers/json?all=1")
      expect(step.head.versionMinor).toBe(1)
      expect(step.head.headers).toEqual(["Host", "docker", "X-A", "b"])
      expect(step.head.framing).toEqual({ _tag: "None" })
      expect(step.head.keepAlive).toBe(true)
      expect(step.head.size).toBe(golden.length - 1)
      // Whatever followed the head (here one pipelined byte) is handed back, never swallowed.
      expect(Buffer.concat([step.rest, unread]).toString("latin1")).toBe("Z")
    }
  })

  it("reads framing, connection, upgrade and expect", () => {
    const post = headOf("POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nExpect: 100-continue\r\nContent-Type: text/plain\r\n\r\n")
    expect(post.framing).toEqual({ _tag: "Length", length: 12 })
    expect(post.expectContinue).toBe(true)
    expect(post.contentType).toBe("text/plain")
    const chunked = headOf("POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n")
    expect(chunked.framing).toEqual({ _tag: "Chunked" })
    const up = headOf("POST /a HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: tcp\r\n\r\n")
    expect(up.upgrade).toBe("tcp")
    expect(headOf("GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n").upgrade).toBeUndefined()
    // a0 (NBSP) is not whitespace around a Connection token.
    expect(headOf("GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\xa0\r\nUpgrade: x\r\n\r\n").upgrade).toBeUndefined()
    // Proxy-Connection: a close ends the connection; an upgrade asked there alone is refused.
    expect(headOf("GET / HTTP/1.1\r\nHost: h\r\nProxy-Connection: Close\r\n\r\n").keepAlive).toBe(false)
    expect(headOf("GET / HTTP/1.1\r\nHost: h\r\nProxy-Connection: keep-alive\r\n\r\n").keepAlive).toBe(true)
    expect(errorOf("GET / HTTP/1.1\r\nHost: h\r\nProxy-Connection: upgrade\r\nUpgrade: x\r\n\r\n").message).toBe("an upgrade asked by Proxy-Connection")
    // "Connection: upgrade" with "Upgrade:" empty: llhttp reads no upgrade, so the bytes after it are refused, not guessed at.
    expect(errorOf("GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: \r\n\r\n").message).toBe("an upgrade to no protocol (an empty Upgrade)")
    expect(headOf("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").keepAlive).toBe(false)
    expect(headOf("GET / HTTP/1.0\r\n\r\n").keepAlive).toBe(false)
    expect(headOf("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keepAlive).toBe(true)
    // Empty lines before the request line are ignored, byte at a time too.
    const step = readHead(bytes("\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"), [1])
    expect(step._tag).toBe("Head")
  })

  it("takes origin-, asterisk- and absolute-form targets, and refuses other forms (as llhttp does)", () => {
    for (const [method, target] of [["GET", "/"], ["GET", "/a?b=c#d"], ["OPTIONS", "*"], ["GET", "http://h"], ["GET", "HTTP://h/x?y"], ["GET", "https://h?q"]]) {
      expect(headOf(`${method} ${target} HTTP/1.1\r\nHost: h\r\n\r\n`).target).toBe(target)
    }
    // Authority-form outside CONNECT (68 3a 34 34 33), a bare query, a relative path, "*" with more, a scheme
    // with a digit or "-", a single slash after the scheme, an empty authority, "#" or a quote in the authority.
    for (const target of ["h:443", "?a", "a", "*x", "h1tp://h/", "x-y://h/", "http:/h", "http:///a", "http://h#x", "http://h\"/"]) {
      expect(errorOf(`GET ${target} HTTP/1.1\r\nHost: h\r\n\r\n`).reason, target).toBe("MalformedTarget")
    }
    expect(headOf("CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n").target).toBe("a.example:443")
  })

  it("refuses every smuggling vector and malformed head, byte at a time as in one piece", () => {
    const cases: Array<[string, number, Http1Error["reason"]]> = [
      ["POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "AmbiguousLength"],
      ["POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", 400, "AmbiguousLength"],
      ["POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\n", 400, "InvalidContentLength"],
      ["POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n", 400, "InvalidContentLength"],
      ["POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1234567890123456\r\n\r\n", 400, "InvalidContentLength"],
      ["POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400, "AmbiguousLength"],
      ["POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "DuplicateField"],
      ["POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400, "AmbiguousLength"],
      ["POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "UnsupportedTransferEncoding"],
      ["POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "UnsupportedTransferEncoding"],
      ["POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "AmbiguousLength"],
      // a0 (NBSP) before or after "chunked" is part of the coding, not whitespace.
      ["POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \xa0chunked\r\n\r\n", 501, "UnsupportedTransferEncoding"],
      ["POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\xa0\r\n\r\n", 501, "UnsupportedTransferEncoding"],
      // "chunked" then 09 (HTAB), or 20 09: llhttp reads another coding there.
      ["POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\t\r\n\r\n", 400, "MalformedHeader"],
      ["POST / HTTP/1.1\r\nHost: h\r\ntransfer-encoding: chunked \t \r\n\r\n", 400, "MalformedHeader"],
      ["GET / HTTP/1.1\nHost: h\r\n\r\n", 400, "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", 400, "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n", 400, "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400, "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400, "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400, "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n", 400, "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: h\r\nNo-Colon\r\n\r\n", 400, "MalformedHeader"],
      ["GET / HTTP/1.1\r\n\r\n", 400, "MissingHost"],
      ["GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "MissingHost"],
      ["GET / HTP/1.1\r\nHost: h\r\n\r\n", 400, "MalformedStartLine"],
      ["GET / HTTP/2.0\r\nHost: h\r\n\r\n", 400, "MalformedStartLine"],
      ["GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "MalformedStartLine"],
      ["GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400, "MalformedStartLine"],
      ["G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "MalformedStartLine"],
      ["GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "MalformedStartLine"],
      ["\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "MalformedStartLine"],
      [`GET / HTTP/1.1\r\nHost: h\r\n${Array.from({ length: 9 }, (_, i) => `X-${i}: v\r\n`).join("")}\r\n`, 431, "TooManyHeaders"]
    ]
    for (const [text, status, reason] of cases) {
      for (const sizes of [[text.length], [1]]) {
        const e = errorOf(text, sizes)
        expect([e.status, e.reason], JSON.stringify(text)).toEqual([status, reason])
      }
    }
  })

  it("refuses fields a rule or the framing reads when they are repeated or named by Connection", () => {
    const cases: Array<[string, Http1Error["reason"]]> = [
      ["POST / HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n", "DuplicateField"],
      ["POST / HTTP/1.1\r\nHost: h\r\ncontent-type: a/b\r\nCONTENT-TYPE: a/b\r\n\r\n", "DuplicateField"],
      ["POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n", "DuplicateField"],
      ["POST / HTTP/1.1\r\nHost: h\r\nX-HTTP-Method-Override: GET\r\nX-HTTP-Method-Override: DELETE\r\n\r\n", "DuplicateField"],
      ["POST / HTTP/1.1\r\nHost: h\r\nX-HTTP-Method: GET\r\nx-http-method: DELETE\r\n\r\n", "DuplicateField"],
      ["POST / HTTP/1.1\r\nHost: h\r\nX-Method-Override: GET\r\nX-Method-Override: PUT\r\n\r\n", "DuplicateField"],
      ["POST / HTTP/1.1\r\nHost: h\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\n", "NominatedField"],
      ["POST / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n", "NominatedField"],
      ["GET / HTTP/1.1\r\nHost: h\r\nConnection: Host\r\n\r\n", "NominatedField"],
      ["GET / HTTP/1.1\r\nConnection: close\r\nHost: h\r\nConnection: content-type\r\n\r\n", "NominatedField"],
      ["GET http://b.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n", "MalformedTarget"],
      ["GET http://user@a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n", "MalformedTarget"],
      ["GET ftp://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n", "MalformedTarget"],
      ["GET http:///x HTTP/1.1\r\nHost: a.test\r\n\r\n", "MalformedTarget"],
      ["GET a.test:80 HTTP/1.1\r\nHost: a.test\r\n\r\n", "MalformedTarget"],
      ["GET * HTTP/1.1\r\nHost: a.test\r\n\r\n", "MalformedTarget"],
      ["GET x/y HTTP/1.1\r\nHost: a.test\r\n\r\n", "MalformedTarget"],
      ["GET http://a.test/x HTTP/1.0\r\n\r\n", "MalformedTarget"],
      ["POST / HTTP/1.1\r\nHost: h\r\nContent_Length: 5\r\n\r\n", "MalformedHeader"],
      ["POST / HTTP/1.1\r\nHost: h\r\nTRANSFER_ENCODING: chunked\r\n\r\n", "MalformedHeader"],
      ["POST / HTTP/1.1\r\nHost: h\r\ncontent_type: a/b\r\n\r\n", "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: a.test, b.test\r\n\r\n", "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n", "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: a.test/x\r\n\r\n", "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: a.test:80:80\r\n\r\n", "MalformedHeader"],
      ["GET / HTTP/1.1\r\nHost: a%2etest\r\n\r\n", "MalformedHeader"]
    ]
    for (const [text, reason] of cases) {
      for (const sizes of [[text.length], [1]]) {
        const e = errorOf(text, sizes)
        expect([e.status, e.reason], JSON.stringify(text)).toEqual([400, reason])
      }
    }
    // The same fields once each, and Connection naming ordinary fields, are fine.
    const ok = headOf("POST / HTTP/1.1\r\nHost: h\r\nContent-Type: a/b\r\nX-HTTP-Method-Override: GET\r\nConnection: X-Trace, keep-alive\r\nContent-Length: 1\r\n\r\n")
    expect([ok.contentType, ok.connection]).toEqual(["a/b", ["x-trace", "keep-alive"]])
    for (const host of ["", "a.test", "A.Test:8080", "127.0.0.1:9", "[::1]:80", "[::ffff:127.0.0.1]", "api.moby.localhost", "under_score.test"]) {
      expect(headOf(`GET / HTTP/1.1\r\nHost: ${host}\r\n\r\n`).host).toBe(host)
    }
  })

  // The grammar of a routable Host as a regular expression: the reference `hostValueOk` is checked against.
  const HOST_GRAMMAR = /^(?:[A-Za-z0-9._~-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$/
  const HOST_ALPHABET = "aZ09.-_~[]:fF ,@/%\\\x00\x7f\xa0\xe9"

  it("reads a Host value as its grammar does: examples", () => {
    for (const host of ["", "h", "127.0.0.1", "127.0.0.1:80", "h:65535", "h:123456", "h:", ":80", "[::1]", "[::1]:8080", "[]", "[::1", "::1]", "[::1]x", "[g::1]", "a b", "a,b", "a@b", "h:8o", "h:\xe9", "\u0100"]) {
      expect(hostValueOk(host), JSON.stringify(host)).toBe(HOST_GRAMMAR.test(host))
    }
  })

  it.prop(
    "reads any Host value as its grammar does",
    [Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: HOST_ALPHABET.length - 1 }))).check(Schema.isMaxLength(12))],
    ([picks]) => {
      const host = picks.map((i) => HOST_ALPHABET[i]).join("")
      expect(hostValueOk(host), JSON.stringify(host)).toBe(HOST_GRAMMAR.test(host))
    },
    { arbitrary: { runs: 2000 } }
  )

  it("refuses a head with too many fields and a bare LF after them 400: the bare LF is the first fault", () => {
    const text = "GET / HTTP/1.1\r\nHost: a\r\nB: 2\r\nC: 3\r\nD: 4\nE: 5\r\n\r\n"
    for (const piece of [1, text.length]) {
      const reader = requestHeadReader({ maxHeaderSize: 1_000, maxHeadersCount: 2 })
      let step: ReturnType<typeof reader.push> | undefined
      for (let at = 0; at < text.length && step?._tag !== "Error"; at += piece) step = reader.push(bytes(text.slice(at, at + piece)))
      expect(step?._tag === "Error" && step.error.status, `pieces of ${piece}`).toBe(400)
    }
    const tooMany = requestHeadReader({ maxHeaderSize: 1_000, maxHeadersCount: 2 }).push(bytes("GET / HTTP/1.1\r\nHost: a\r\nB: 2\r\nC: 3\r\n\r\n"))
    expect(tooMany._tag === "Error" && tooMany.error.status).toBe(431)
  })

  it("reads a head ending anywhere around the first 2048 bytes of a read alike, whole and byte at a time", () => {
    for (let size = 2030; size <= 2060; size++) {
      const start = "GET /a HTTP/1.1\r\nHost: h\r\nX-Pad: "
      const text = start + "p".repeat(size - start.length - 4) + "\r\n\r\n"
      expect(text.length).toBe(size)
      const input = bytes(text + "GET /next")
      const whole = requestHeadReader({ maxHeaderSize: 4096, maxHeadersCount: 8 }).push(input)
      expect(whole._tag, `head of ${size} bytes`).toBe("Head")
      if (whole._tag !== "Head") continue
      expect(whole.head.headers[3]!.length).toBe(size - start.length - 4)
      expect(whole.rest.toString("latin1")).toBe("GET /next")
      const reader = requestHeadReader({ maxHeaderSize: 4096, maxHeadersCount: 8 })
      let last: ReturnType<typeof reader.push> | undefined
      for (let at = 0; at < size; at++) last = reader.push(input.subarray(at, at + 1))
      expect(last?._tag === "Head" && last.head.headers).toEqual(whole.head.headers)
      // a bare LF just before the end is refused wherever the window ends
      const bare = bytes(text.slice(0, size - 5) + "\n\r\n\r\n")
      const refused = requestHeadReader({ maxHeaderSize: 4096, maxHeadersCount: 8 }).push(bare)
      expect(refused._tag === "Error" && refused.error.message, `bare LF, head of ${size} bytes`).toBe("a bare LF in the head")
    }
  })

  it("turns an absolute-form target whose authority is the Host into origin form", () => {
    const cases: Array<[string, string, string]> = [
      ["GET http://a.test/x?y=1 HTTP/1.1\r\nHost: a.test\r\n\r\n", "http://a.test/x?y=1", "/x?y=1"],
      ["GET HTTP://A.Test:80 HTTP/1.1\r\nHost: a.test\r\n\r\n", "HTTP://A.Test:80", "/"],
      ["GET https://a.test:443?q HTTP/1.1\r\nHost: a.test\r\n\r\n", "https://a.test:443?q", "/?q"],
      ["GET http://a.test:8080/p HTTP/1.1\r\nHost: a.test:8080\r\n\r\n", "http://a.test:8080/p", "/p"],
      ["OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n", "*", "*"],
      ["GET /plain HTTP/1.1\r\nHost: a.test\r\n\r\n", "/plain", "/plain"]
    ]
    for (const [text, target, origin] of cases) {
      const head = headOf(text)
      expect([head.target, head.originTarget], text).toEqual([target, origin])
    }
    expect(errorOf("GET http://a.test:8080/p HTTP/1.1\r\nHost: a.test\r\n\r\n").reason).toBe("MalformedTarget")
  })

  it("never passes an h2c upgrade on", () => {
    expect(headOf("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n").upgrade).toBeUndefined()
    expect(headOf("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket, H2C\r\n\r\n").upgrade).toBeUndefined()
    expect(headOf("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").upgrade).toBe("websocket")
  })

  it("checks the size limit before buffering, and is dead after the first error", () => {
    const reader = requestHeadReader(LIMITS)
    expect(reader.push(bytes("GET / HTTP/1.1\r\nHost: h\r\nX: ")) ._tag).toBe("Need")
    const huge = Buffer.alloc(10 * 1024 * 1024, 0x61)
    const step = reader.push(huge)
    expect(step._tag === "Error" && step.error.reason).toBe("HeadTooLarge")
    expect(step._tag === "Error" && step.error.status).toBe(431)
    expect(reader.buffered).toBe(0)
    // Dead: even a valid head is refused now.
    const again = reader.push(bytes("GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
    expect(again._tag).toBe("Error")
    // A head that fits exactly is accepted; one byte more is not.
    const filler = (n: number) => `GET / HTTP/1.1\r\nHost: h\r\nX: ${"a".repeat(n)}\r\n\r\n`
    const base = filler(0).length
    expect(readHead(bytes(filler(LIMITS.maxHeaderSize - base)), [1])._tag).toBe("Head")
    expect(readHead(bytes(filler(LIMITS.maxHeaderSize - base + 1)), [1])._tag).toBe("Error")
  })
})

describe("response heads", () => {
  it("refuses a response whose Connection names a framing field (502)", () => {
    for (const text of ["HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\n", "HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n"]) {
      const step = responseHeadReader(LIMITS).push(bytes(text))
      expect(step._tag === "Error" && [step.error.status, step.error.reason], text).toEqual([502, "NominatedField"])
    }
  })

  it("parses status, reason and framing by the request method and status", () => {
    const parse = (s: string) => {
      const step = responseHeadReader(LIMITS).push(bytes(s))
      if (step._tag !== "Head") throw new Error(step._tag)
      return step.head
    }
    const ok = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    expect([ok.status, ok.reason, ok.contentLength]).toEqual([200, "OK", 5])
    expect(responseFraming("GET", ok)).toEqual({ _tag: "Length", length: 5 })
    expect(responseFraming("HEAD", ok)).toEqual({ _tag: "None" })
    const chunked = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n")
    expect(chunked.contentLength).toBeUndefined()
    expect(responseFraming("GET", chunked)).toEqual({ _tag: "Chunked" })
    expect(responseFraming("GET", parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"))).toEqual({ _tag: "Close" })
    expect(responseFraming("GET", parse("HTTP/1.0 200 OK\r\n\r\n"))).toEqual({ _tag: "Close" })
    for (const status of ["204 No Content", "304 Not Modified", "100 Continue", "101 Switching Protocols"]) {
      expect(responseFraming("GET", parse(`HTTP/1.1 ${status}\r\nContent-Length: 5\r\n\r\n`))).toEqual({ _tag: "None" })
    }
    expect(parse("HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n").upgrade).toBe("tcp")
    expect(parse("HTTP/1.1 200\r\n\r\n").reason).toBe("")
    expect(parse("HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\n").keepAlive).toBe(false)
  })

  it("parses a hex golden response head byte at a time, body bytes left over", () => {
    // "HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n" + 01 00 00 00
    const golden = unhex(
      "485454502f312e3120313031205550475241444544 0d0a" +
        "436f6e74656e742d547970653a206170706c69636174696f6e2f766e642e646f636b65722e7261772d73747265616d 0d0a" +
        "436f6e6e656374696f6e3a2055706772616465 0d0a" + "557067726164653a20746370 0d0a" + "0d0a" + "01000000"
    )
    const reader = responseHeadReader(LIMITS)
    let rest: Buffer | undefined
    for (let i = 0; i < golden.length && rest === undefined; i++) {
      const step = reader.push(golden.subarray(i, i + 1))
      expect(step._tag).not.toBe("Error")
      if (step._tag === "Head") {
        expect([step.head.status, step.head.reason, step.head.upgrade]).toEqual([101, "UPGRADED", "tcp"])
        expect(step.head.connection).toEqual(["upgrade"])
        expect(step.head.size).toBe(golden.length - 4)
        rest = Buffer.concat([step.rest, golden.subarray(i + 1)])
      }
    }
    expect(rest?.toString("hex")).toBe("01000000")
  })

  it("refuses what cannot be relayed with 502", () => {
    for (
      const s of [
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/1.1 20 OK\r\n\r\n",
        "HTTP/3 200 OK\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        "HTTP/1.1 200 OK\nX: a\r\n\r\n"
      ]
    ) {
      const step = responseHeadReader(LIMITS).push(bytes(s))
      expect(step._tag === "Error" && step.error.status, JSON.stringify(s)).toBe(502)
    }
  })

  it("parse functions agree with the readers on a complete head", () => {
    const head = parseRequestHead("PUT /a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", LIMITS)
    expect(head instanceof Http1Error).toBe(false)
    const r = parseResponseHead("HTTP/1.1 404 Not Found\r\n\r\n", LIMITS)
    expect(r instanceof Http1Error ? r.message : r.status).toBe(404)
  })
})

describe("body framing", () => {
  it("finds the end of a Content-Length body and leaves the next message", () => {
    for (const piece of [1, 3, 100]) {
      const r = frame({ _tag: "Length", length: 5 }, bytes("hello" + "GET /next"), piece)
      expect([r.body.toString(), r.rest.toString(), r.done]).toEqual(["hello", "GET /next", true])
    }
  })

  it("passes chunked bytes unchanged, with extensions and trailers, and finds their end", () => {
    const body = "5;ext=1;q=\"a b\"\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n0\r\nX-Sum: 42\r\nX-Other: y\r\n\r\n"
    for (const piece of [1, 2, 7, 1000]) {
      const r = frame({ _tag: "Chunked" }, bytes(body + "NEXT"), piece)
      expect(r.error).toBeUndefined()
      expect([r.body.toString(), r.rest.toString(), r.done]).toEqual([body, "NEXT", true])
    }
    const plain = frame({ _tag: "Chunked" }, bytes("0\r\n\r\n"), 1)
    expect(plain.done).toBe(true)
  })

  it("refuses malformed chunked bodies", () => {
    for (
      const body of [
        "x\r\n",
        "5\nhello\r\n0\r\n\r\n",
        "5\r\nhelloX\r\n",
        "5\r\nhello\rX0\r\n\r\n",
        "5\r\nhello\n0\r\n\r\n",
        "0\r\n\rX",
        "5\r\nhello\r\n0\r\nX: a\nY\r\n\r\n",
        "5\r\nhello\r\n0\r\n folded\r\n\r\n",
        "5;a\x00b\r\nhello\r\n",
        "1234567890abcdef0\r\n",
        `1;${"e".repeat(MAX_CHUNK_LINE)}\r\n`,
        `0\r\n${"X: y\r\n".repeat(100)}\r\n`
      ]
    ) {
      for (const piece of [1, 1000]) {
        const r = frame({ _tag: "Chunked" }, bytes(body), piece)
        expect(r.error?.reason, JSON.stringify(body)).toBe("MalformedChunk")
      }
    }
  })

  it("relays a checked trailer section without the fields that must not be trailers", () => {
    const relay = (body: string, piece: number) => {
      const framer = new BodyFramer({ _tag: "Chunked" }, 256, 400)
      const out: Array<Buffer> = []
      const input = bytes(body)
      for (let at = 0; at < input.length; at += piece) {
        const chunk = input.subarray(at, at + piece)
        const n = framer.consume(chunk, 0)
        if (n instanceof Http1Error) return n
        expect(framer.forwardable).toBeLessThanOrEqual(n)
        out.push(chunk.subarray(0, framer.forwardable))
        if (framer.done) {
          if (framer.trailers !== undefined) out.push(framer.trailers)
          return { relayed: Buffer.concat(out).toString("latin1"), rest: Buffer.concat([chunk.subarray(n), input.subarray(at + piece)]).toString("latin1") }
        }
      }
      throw new Error("not done")
    }
    const cases: Array<[string, string]> = [
      ["3\r\nabc\r\n0\r\n\r\n", "3\r\nabc\r\n0\r\n\r\n"],
      ["3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n", "3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n"],
      [
        "3\r\nabc\r\n0\r\nKeep-Alive: 5\r\nX-Sum: 1\r\nHost: evil\r\nTE: trailers\r\nauthorization: x\r\nX-Last: 2\r\n\r\n",
        "3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Last: 2\r\n\r\n"
      ],
      ["0\r\nSet-Cookie: a=b\r\n\r\n", "0\r\n\r\n"]
    ]
    for (const [body, relayed] of cases) {
      for (const piece of [1, 2, 5, 1000]) {
        const r = relay(body + "NEXT", piece)
        expect(r, JSON.stringify([body, piece])).toEqual({ relayed, rest: "NEXT" })
      }
    }
    // A request line, a name with spaces or without a colon is not a field line: refused, never relayed.
    for (
      const body of [
        "0\r\nGET /admin HTTP/1.1\r\nHost: h\r\n\r\n",
        "0\r\nX Y: 1\r\n\r\n",
        "0\r\nNoColon\r\n\r\n",
        "0\r\n: empty\r\n\r\n",
        "0\r\nX(: 1\r\n\r\n",
        // A length, a coding or a connection option as a trailer: llhttp refuses the first two and closes on
        // the others, so the message is refused rather than relayed without them.
        "0\r\nContent-Length: 99\r\n\r\n",
        "3\r\nabc\r\n0\r\nX-Sum: 1\r\ntransfer-encoding: chunked\r\n\r\n",
        "0\r\nConnection: close\r\n\r\n",
        "0\r\nProxy-Connection: close\r\n\r\n"
      ]
    ) {
      for (const piece of [1, 1000]) {
        const r = relay(body, piece)
        expect(r instanceof Http1Error && r.reason, JSON.stringify(body)).toBe("MalformedChunk")
      }
    }
  })

  it("refuses whitespace after a chunk size (llhttp does)", () => {
    // 35 20 0d 0a ("5 \r\n"), 35 09 3b ("5\t;"), 35 20 3b ("5 ;"): a chunk size then SP/HTAB.
    for (const body of [unhex("35200d0a68656c6c6f0d0a300d0a0d0a"), unhex("35093b613d620d0a68656c6c6f0d0a300d0a0d0a"), unhex("35203b613d620d0a")]) {
      for (const piece of [1, 1000]) expect(frame({ _tag: "Chunked" }, body, piece).error?.message).toBe("whitespace after a chunk size")
    }
  })

  it("reads chunk extensions as tokens and quoted strings, without whitespace (as llhttp does)", () => {
    const framed = (ext: string) => frame({ _tag: "Chunked" }, bytes(`5${ext}\r\nhello\r\n0${ext}\r\n\r\n`), 1)
    for (const ext of [";a", ";a=b", ";a=b;c", ";a=\"\"", ";a=\"x\\\"y\"", ";a=\"\tb c\"", ";a=\"\x80\"", ";!#$%&'*+-.^_`|~=x"]) {
      expect(framed(ext).done, JSON.stringify(ext)).toBe(true)
    }
    // 3b 20 61 ("; a"), 3b 61 20 3d ("a ="), 3d 20 ("= "), 62 20 0d ("b \r"), an open quote, a quote in a token,
    // ";" alone, "==", "@" and "," outside quotes, an empty name or value, DEL in a quoted string.
    for (const ext of ["; a=b", ";a =b", ";a= b", ";a=b ", ";a=\"b", ";a=b\"", ";", ";a==b", ";a=@", ";a,b", ";a=", ";=b", ";;a", ";a=\"\x7f\"", ";a=\"b\" "]) {
      expect(framed(ext).error?.reason, JSON.stringify(ext)).toBe("MalformedChunk")
    }
  })

  it("treats a close-delimited body as everything, and a bodyless one as nothing", () => {
    expect(frame({ _tag: "Close" }, bytes("abc"), 1).body.toString()).toBe("abc")
    const none = new BodyFramer({ _tag: "None" }, 256, 400)
    expect(none.done).toBe(true)
    expect(none.consume(bytes("GET"), 0)).toBe(0)
  })

  it.prop(
    "random valid messages split anywhere reassemble to the same framing",
    [
      Schema.Array(
        Schema.Struct({
          kind: Schema.Literals(["none", "length", "chunked"]),
          size: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 300 })),
          chunk: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 70 })),
          byte: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 255 }))
        })
      ).check(Schema.isMaxLength(6)),
      Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 40 }))).check(Schema.isMinLength(1))
    ],
    ([messages, splits]) => {
      const expected: Array<[string, string]> = []
      const wire: Array<Buffer> = []
      messages.forEach((m, i) => {
        const payload = Buffer.alloc(m.kind === "none" ? 0 : m.size, m.byte)
        let framingHeader = ""
        let encoded = payload
        if (m.kind === "length") framingHeader = `Content-Length: ${m.size}\r\n`
        if (m.kind === "chunked") {
          framingHeader = "Transfer-Encoding: chunked\r\n"
          const parts: Array<Buffer> = []
          for (let at = 0; at < payload.length; at += m.chunk) {
            const c = payload.subarray(at, at + m.chunk)
            parts.push(bytes(`${c.length.toString(16)};n=${i}\r\n`), c, bytes("\r\n"))
          }
          parts.push(bytes(i % 2 === 0 ? "0\r\n\r\n" : "0\r\nX-T: 1\r\n\r\n"))
          encoded = Buffer.concat(parts)
        }
        wire.push(bytes(`POST /m${i} HTTP/1.1\r\nHost: h\r\n${framingHeader}\r\n`), encoded)
        expected.push([`/m${i}`, encoded.toString("latin1")])
      })
      const input = Buffer.concat(wire)
      // The receiving side: heads through the reader, bodies through the framer, in the given pieces.
      const got: Array<[string, string]> = []
      const reader = requestHeadReader({ maxHeaderSize: 1024, maxHeadersCount: 8 })
      let framer: BodyFramer | undefined
      let target = ""
      let body: Array<Buffer> = []
      let at = 0
      let k = 0
      const take = (chunk: Buffer): void => {
        while (chunk.length > 0) {
          if (framer === undefined) {
            const step = reader.push(chunk)
            if (step._tag === "Error") throw new Error(step.error.message)
            if (step._tag === "Need") return
            target = step.head.target
            framer = new BodyFramer(step.head.framing, 1024, 400)
            chunk = step.rest
          } else {
            const n = framer.consume(chunk, 0)
            if (n instanceof Http1Error) throw new Error(n.message)
            body.push(chunk.subarray(0, n))
            chunk = chunk.subarray(n)
          }
          if (framer !== undefined && framer.done) {
            got.push([target, Buffer.concat(body).toString("latin1")])
            framer = undefined
            body = []
          }
        }
      }
      while (at < input.length) {
        const n = splits[k++ % splits.length]!
        take(input.subarray(at, at + n))
        at += n
      }
      expect(got).toEqual(expected)
    }
  )
})
