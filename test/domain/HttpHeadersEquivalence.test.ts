/**
 * `requestHeaders` and `responseHeaders` look a field name up only when its length is that of a name
 * they may drop. These tests give them and the versions they replaced
 * (`test/support/previous/HttpHeaders.ts`) the same seeded field lists, in every forwarding mode, with
 * and without an upgrade, and require the same output.
 */
import { describe, expect, it } from "@effect/vitest"
import { type ForwardedMode, requestHeaders, responseHeaders } from "../../src/domain/HttpHeaders.ts"
import * as previous from "../support/previous/HttpHeaders.ts"
import { Rng } from "../support/httpCorpus.ts"

const NAMES = [
  "Connection", "connection", "CONNECTION", "Keep-Alive", "TE", "Te", "Upgrade", "upgrade", "Transfer-Encoding",
  "Proxy-Connection", "Proxy-Authorization", "Proxy-Authenticate", "HTTP2-Settings", "Expect", "expect", "Host", "Date",
  "X-Forwarded-For", "x-forwarded-for", "X-FORWARDED-PROTO", "X-Forwarded-Host", "X-Forwarded-Port", "X-Forwarded", "Forwarded",
  "X-Secret", "X-A", "Ab", "Content-Length", "Content-Type", "User-Agent", "Accept-Encoding",
  "A-Field-Name-Of-Exactly-Thirty-1", "A-Very-Long-Field-Name-Over-Thirty-One-Characters", "a-very-long-field-name-over-thirty-one-characters",
  "X\u00c0", "x\u00e0", "\u00c0bc", "K\u00e9ep-Alive", "\u212aeep-alive", "\u0130x", "\u0130ab", "\u0130AB"
]

const TOKENS = [
  "close", "keep-alive", "Upgrade", "x-secret", "X-SECRET", "x-a", "ab", "date", "host", "x-forwarded-for", "X-Forwarded-Host",
  "a-very-long-field-name-over-thirty-one-characters", "a-field-name-of-exactly-thirty-1", "x\u00e0", "X\u00c0", "\u00e0bc",
  "\u00a0x-a", "x-a\u00a0", "\u0085x-a", "\tx-a ", "", " ", "k\u00e9ep-alive", "\u0130x", "i\u0307x", "i\u0307ab", "\u0130ab", "\u212aeep-alive"
]

const fieldList = (rng: Rng): Array<string> => {
  const raw: Array<string> = []
  const n = rng.int(12)
  for (let i = 0; i < n; i++) {
    const name = rng.pick(NAMES)
    let value = `v${i}`
    if (name.toLowerCase() === "connection" || rng.chance(0.05)) {
      value = Array.from({ length: rng.int(4) }, () => rng.pick(TOKENS)).join(rng.chance(0.5) ? "," : ", ")
    }
    raw.push(name, value)
  }
  return raw
}

const MODES: ReadonlyArray<ForwardedMode> = ["off", "replace", "append"]

describe("HttpHeaders (equivalence with the versions it replaced)", () => {
  it("rewrites request and response fields as before (seeded)", () => {
    const rng = new Rng(0x4eade25)
    let dropped = 0
    for (let i = 0; i < 20_000; i++) {
      const raw = fieldList(rng)
      const response = responseHeaders(raw)
      expect(response).toEqual(previous.responseHeaders(raw))
      if (response.length < raw.length) dropped++
      const mode = rng.pick(MODES)
      const upgrade = rng.chance(0.3)
      const info = rng.chance(0.2) ? undefined : { clientAddress: rng.chance(0.8) ? "192.0.2.7" : undefined, proto: "http", host: rng.chance(0.5) ? "h" : undefined }
      expect(requestHeaders(raw, upgrade, mode, info)).toEqual(previous.requestHeaders(raw, upgrade, mode, info))
    }
    // the lists reach both outcomes (some fields dropped, some lists kept whole)
    expect(dropped).toBeGreaterThan(1_000)
    expect(dropped).toBeLessThan(20_000)
  })
})
