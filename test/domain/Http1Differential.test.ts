import { afterAll, describe, expect, it } from "@effect/vitest"
import { CLASSIC_SHAPES, corpus } from "../support/httpCorpus.ts"
import { checkBatch, compare, emptyTally, escaped, SENTINEL, switchyardRead } from "../support/http1Differential.ts"
import { makeOracle, type OracleTrace } from "../support/llhttpOracle.ts"

/** Messages from the generator checked on every run (`npm run fuzz` checks a million). */
const SAMPLE_COUNT = 6_000
const SAMPLE_SEED = 20_261_205

const oracle = makeOracle()
afterAll(() => oracle.close())

const bytes = (s: string) => Buffer.from(s, "latin1")
const withSentinel = (s: string) => Buffer.concat([bytes(s), SENTINEL])

const failuresOf = (tally: ReturnType<typeof emptyTally>) => tally.failures.map((f) => `${f.why}\n  ${escaped(f.input)}`)

describe("HTTP/1.1 request parsing, switchyard against llhttp", () => {
  it("agrees with llhttp on every classic smuggling shape (or refuses it)", async () => {
    const tally = emptyTally()
    await checkBatch(oracle, CLASSIC_SHAPES.map(([, m]) => bytes(m)), tally, 1)
    expect(failuresOf(tally)).toEqual([])
    expect(tally.checked).toBe(CLASSIC_SHAPES.length)
    // Every ambiguous framing shape is refused outright; only shapes with one reading may pass (or be refused).
    const mayPass = ["TE.TE leading space", "CL padded", "Connection: content-length", "Connection: transfer-encoding", "Connection: host", "absolute-form", "chunked with trailers"]
    const accepted = CLASSIC_SHAPES.filter(([, m]) => switchyardRead(withSentinel(m)).terminal._tag !== "Error").map(([name]) => name)
    for (const name of accepted) expect(mayPass, name).toContain(name)
  })

  it(`agrees with llhttp on ${SAMPLE_COUNT} generated messages (seed ${SAMPLE_SEED})`, async () => {
    const tally = emptyTally()
    for (const batch of corpus(SAMPLE_SEED, SAMPLE_COUNT, 500)) await checkBatch(oracle, batch, tally)
    expect(failuresOf(tally)).toEqual([])
    expect(tally.checked).toBe(SAMPLE_COUNT)
    // The corpus exercises both sides: plenty of messages accepted by both, and plenty refused.
    expect(tally.bothAccepted).toBeGreaterThan(SAMPLE_COUNT / 10)
    expect(tally.bothRejected).toBeGreaterThan(SAMPLE_COUNT / 10)
    expect(tally.incrementalChecked).toBeGreaterThan(0)
  })

  it("reports a reading that differs from llhttp's", async () => {
    const input = withSentinel("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    const [ll] = await oracle.parseAll([input])
    const sy = switchyardRead(input)
    expect(compare(sy, ll!)._tag).toBe("Agree")
    const first = sy.requests[0]!
    // A body one byte short, another target, a dropped field, an extra accepted request, a clean end where llhttp refused.
    const wrong: Array<typeof sy> = [
      { ...sy, requests: [{ ...first, body: first.body.subarray(1) }, sy.requests[1]!] },
      { ...sy, requests: [{ ...first, target: "/x" }, sy.requests[1]!] },
      { ...sy, requests: [{ ...first, headers: first.headers.slice(2) }, sy.requests[1]!] },
      { ...sy, requests: [...sy.requests, sy.requests[1]!] }
    ]
    for (const t of wrong) expect(compare(t, ll!)._tag).toBe("Disagree")
    const refused: OracleTrace = { requests: ll!.requests.slice(0, 1), terminal: { _tag: "Error", code: "HPE_INVALID_METHOD" } }
    expect(compare(sy, refused)._tag).toBe("Disagree")
    // Stopping earlier is allowed: an error after the head.
    expect(compare({ requests: [{ ...first, complete: false }], terminal: { _tag: "Error", reason: "MalformedChunk", message: "x" } }, ll!)._tag).toBe("Agree")
    // Still reading a body llhttp ended is not: the rest would be a request to llhttp.
    expect(compare({ requests: [{ ...first, complete: false }], terminal: { _tag: "Incomplete" } }, ll!)._tag).toBe("Disagree")
  })

  it("sees llhttp refuse, accept and frame the way the comparison assumes", async () => {
    const [plain, refused, chunked, closing] = await oracle.parseAll([
      withSentinel("GET / HTTP/1.1\r\nHost: a\r\nX:  v \t\r\n\r\n"),
      withSentinel("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
      withSentinel("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n0\r\nT: x\r\n\r\n"),
      withSentinel("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    ])
    expect(plain!.terminal._tag).toBe("End")
    expect(plain!.requests.map((r) => [r.method, r.target, r.headers])).toEqual([["GET", "/", ["Host", "a", "X", "v"]], ["GET", "/__sentinel", ["Host", "s"]]])
    expect(refused!.terminal).toEqual({ _tag: "Error", code: "HPE_INVALID_TRANSFER_ENCODING" })
    expect([chunked!.requests[0]!.body.toString(), chunked!.requests[0]!.trailers, chunked!.requests.length]).toEqual(["abc", ["T", "x"], 2])
    expect([closing!.requests.length, closing!.terminal]).toEqual([1, { _tag: "Error", code: "HPE_CLOSED_CONNECTION" }])
  })
})
