import { assert, describe, it } from "@effect/vitest"
import { CONTINUE_HEAD, requestHeadBytes, responseHeadBytes, switchingHeadBytes } from "../../src/domain/Http1Heads.ts"
import { Http1Error, parseResponseHead, type ResponseHead } from "../../src/domain/Http1Parser.ts"

const LIMITS = { maxHeaderSize: 8 * 1024, maxHeadersCount: 50 }

const response = (text: string): ResponseHead => {
  const head = parseResponseHead(text, LIMITS)
  if (head instanceof Http1Error) throw head
  return head
}


const text = (b: Buffer) => b.toString("latin1")

describe("Http1Heads", () => {
  it("writes the request head sent upstream, with chunked framing when asked", () => {
    const out = { method: "POST", path: "/a?b=1", headers: ["Host", "x", "X-Forwarded-For", "1.2.3.4"] }
    assert.strictEqual(text(requestHeadBytes(out, 1, false)), "POST /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
    assert.strictEqual(text(requestHeadBytes(out, 0, true)), "POST /a?b=1 HTTP/1.0\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\nTransfer-Encoding: chunked\r\n\r\n")
  })

  it("relays a response head without hop-by-hop fields, its framing and connection the proxy's", () => {
    const head = response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Request-Id: up\r\n\r\n")
    assert.strictEqual(text(responseHeadBytes(head, false, false, undefined)), "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Request-Id: up\r\n\r\n")
    // the caller's fields replace the upstream's of the same name; close says so
    assert.strictEqual(
      text(responseHeadBytes(head, false, true, ["x-request-id", "mine"])),
      "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nx-request-id: mine\r\nConnection: close\r\n\r\n"
    )
  })

  it("never passes a Content-Length on beside a Transfer-Encoding; a coding not ending in chunked is kept", () => {
    const chunked = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert.strictEqual(text(responseHeadBytes(chunked, true, false, undefined)), "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    const gzip = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert.strictEqual(text(responseHeadBytes(gzip, false, true, undefined)), "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n")
  })

  it("relays a 101 as received", () => {
    const head = response("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert.strictEqual(text(switchingHeadBytes(head)), "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
  })

  it("answers Expect: 100-continue with a bare interim head", () => {
    assert.strictEqual(text(CONTINUE_HEAD), "HTTP/1.1 100 Continue\r\n\r\n")
  })
})
