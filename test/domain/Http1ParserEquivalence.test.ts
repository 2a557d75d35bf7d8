/**
 * The head reader parses a head from one latin1 string of it (searched as text in the first 2048 bytes
 * of a read, as bytes beyond) and finds bare LFs in its line parser. These tests feed the same inputs,
 * cut the same ways, to it and to the reader it replaced (`test/support/previous/Http1Parser.ts`) and
 * require the same outcome at every step: the same head, the same bytes after it, a refusal with the
 * same status.
 */
import { describe, expect, it } from "@effect/vitest"
import { Buffer } from "node:buffer"
import { type HeadLimits, type HeadStep, requestHeadReader, responseHeadReader } from "../../src/domain/Http1Parser.ts"
import * as previous from "../support/previous/Http1Parser.ts"
import { CLASSIC_SHAPES, generateMessage, Rng } from "../support/httpCorpus.ts"

type AnyStep = HeadStep<unknown> | previous.HeadStep<unknown>

/** What one step says, comparable: the head's fields, the rest's bytes, or the refusal's reason and status. */
const outcome = (step: AnyStep): string => {
  switch (step._tag) {
    case "Need":
      return "Need"
    case "Head":
      return `Head ${JSON.stringify(step.head)} rest=${step.rest.toString("hex")}`
    case "Error":
      // Which refusal a head with two faults gets may differ (a bare LF used to be looked for first), not its status.
      return `Error ${step.error.status}`
  }
}

interface Readers {
  readonly now: { push(chunk: Buffer): AnyStep; readonly buffered: number }
  readonly before: { push(chunk: Buffer): AnyStep; readonly buffered: number }
}

const requestReaders = (limits: HeadLimits): Readers => ({ now: requestHeadReader(limits), before: previous.requestHeadReader(limits) })
const responseReaders = (limits: HeadLimits): Readers => ({ now: responseHeadReader(limits), before: previous.responseHeadReader(limits) })

/**
 * Feeds `input` in pieces of `sizes` (cycled) to both readers, and what follows each head again as the
 * engine does, comparing every step; returns the steps' outcomes.
 */
const feedBoth = (readers: Readers, input: Buffer, sizes: ReadonlyArray<number>): Array<string> => {
  const seen: Array<string> = []
  let at = 0
  let k = 0
  while (at < input.length) {
    const n = Math.max(1, sizes[k++ % sizes.length]!)
    let chunk = input.subarray(at, at + n)
    at += n
    for (let heads = 0; heads < 8; heads++) {
      // each reader gets its own copy: neither may see what the other did to its input
      const a = readers.now.push(Buffer.from(chunk))
      const b = readers.before.push(Buffer.from(chunk))
      const got = outcome(a)
      const want = outcome(b)
      if (got !== want || readers.now.buffered !== readers.before.buffered) {
        throw new Error(`differs from the previous reader on ${JSON.stringify(input.toString("latin1"))} fed in ${JSON.stringify(sizes)}:\n now    ${got} (buffered ${readers.now.buffered})\n before ${want} (buffered ${readers.before.buffered})`)
      }
      seen.push(got)
      if (a._tag !== "Head" || a.rest.length === 0) break
      chunk = a.rest
    }
    if (seen[seen.length - 1]!.startsWith("Error")) break
  }
  return seen
}

const CUTS: ReadonlyArray<ReadonlyArray<number>> = [[1 << 20], [1], [3], [7, 1, 13], [2047, 1], [2048, 5], [2049], [1000, 1049, 3], [4096]]

const LIMITS: ReadonlyArray<HeadLimits> = [
  { maxHeaderSize: 16 * 1024, maxHeadersCount: 2_000 },
  { maxHeaderSize: 2_100, maxHeadersCount: 8 },
  { maxHeaderSize: 80, maxHeadersCount: 2 }
]

/** Bytes that parsers and string functions treat specially. */
const ODD = ["\r", "\n", "\r\n", "\r\n\r\n", "\u0000", "\u0085", "\u00a0", "\u00ff", "\t", " ", ":", ",", "\u000b", "\u007f", "\u00c0"]

/** `text` with a few odd bytes put at random places (none when `p` says so). */
const sprinkle = (rng: Rng, text: string): string => {
  let out = text
  const n = rng.int(4)
  for (let i = 0; i < n; i++) {
    const at = rng.int(out.length + 1)
    out = rng.chance(0.5) ? out.slice(0, at) + rng.pick(ODD) + out.slice(at) : out.slice(0, at) + rng.pick(ODD) + out.slice(at + 1)
  }
  return out
}

/** A head padded so that its end (or a CR or LF of it) falls near byte 2048 of the read. */
const aroundWindow = (head: string, shift: number): string => {
  const end = head.indexOf("\r\n\r\n")
  if (end === -1) return head
  const pad = 2048 - (end + 4) + shift
  if (pad < 1) return head
  return head.slice(0, end + 2) + "X-Pad: " + "p".repeat(Math.max(0, pad - 9)) + "\r\n" + head.slice(end + 2)
}

const RESPONSES = [
  "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
  "HTTP/1.1 204 No Content\r\n\r\n",
  "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nbody",
  "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\u0081\u0000",
  "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
  "HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
  "HTTP/1.1 404 Not \u00a0Found\u0085\r\nX: \u00ff\r\n\r\n",
  "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close, x-a\r\nX-A: 1\r\n\r\n",
  "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"
]

const SENTINEL = "GET /__sentinel HTTP/1.1\r\nHost: s\r\n\r\n"

describe("Http1Parser (equivalence with the reader it replaced)", () => {
  it("reads the classic smuggling shapes as before, whole, a byte at a time and in odd cuts", () => {
    for (const [, shape] of CLASSIC_SHAPES) {
      for (const text of [shape + SENTINEL, "\r\n\r\n" + shape, shape.replace(/\r\n/g, "\n")]) {
        for (const limits of LIMITS) for (const cut of CUTS) feedBoth(requestReaders(limits), Buffer.from(text, "latin1"), cut)
      }
    }
  })

  it("refuses a head with too many fields and a bare LF after them 400, as before (the bare LF first)", () => {
    const text = "GET / HTTP/1.1\r\nHost: a\r\nB: 2\r\nC: 3\r\nD: 4\nE: 5\r\n\r\n"
    const seen = feedBoth(requestReaders({ maxHeaderSize: 1_000, maxHeadersCount: 2 }), Buffer.from(text, "latin1"), [1 << 20])
    expect(seen).toEqual(["Error 400"])
    feedBoth(requestReaders({ maxHeaderSize: 1_000, maxHeadersCount: 2 }), Buffer.from(text, "latin1"), [1])
    feedBoth(responseReaders({ maxHeaderSize: 1_000, maxHeadersCount: 2 }), Buffer.from("HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\nD: 4\r\n\r\n", "latin1"), [1 << 20])
  })

  it("reads generated requests with odd bytes as before (seeded)", () => {
    const rng = new Rng(0x5eed_0001)
    const outcomes = new Set<string>()
    for (let i = 0; i < 1_500; i++) {
      let text = generateMessage(rng).toString("latin1")
      if (rng.chance(0.3)) text = sprinkle(rng, text)
      if (rng.chance(0.2)) text = "\r\n".repeat(1 + rng.int(3)) + text
      const input = Buffer.from(text + SENTINEL, "latin1")
      const cut = rng.chance(0.5) ? rng.pick(CUTS) : [1 + rng.int(64), 1 + rng.int(8)]
      const seen = feedBoth(requestReaders(rng.pick(LIMITS)), input, cut)
      for (const s of seen) outcomes.add(s.startsWith("Head") ? "Head" : s)
    }
    // the inputs reach heads and refusals of several kinds (the comparison is not of empty runs)
    expect(outcomes.has("Head")).toBe(true)
    expect([...outcomes].filter((o) => o.startsWith("Error")).length).toBeGreaterThan(1)
  })

  it("reads heads around the 2048-byte window as before: their end, a CR or an LF at every offset near it", () => {
    const base = "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc" + SENTINEL
    for (let shift = -6; shift <= 6; shift++) {
      const padded = aroundWindow(base, shift)
      const variants = [padded]
      for (const odd of ["\n", "\r", "\r\n", "\u0000", "\u0085", "\u00a0"]) {
        for (const at of [2044, 2045, 2046, 2047, 2048, 2049, 2050]) variants.push(padded.slice(0, at) + odd + padded.slice(at + 1))
      }
      for (const text of variants) {
        for (const cut of [[1 << 20], [2048], [2047], [2049], [2046, 1], [1024], [700, 1]]) {
          feedBoth(requestReaders(LIMITS[0]!), Buffer.from(text, "latin1"), cut)
          feedBoth(requestReaders(LIMITS[1]!), Buffer.from(text, "latin1"), cut)
        }
      }
    }
  })

  it("reads heads longer than one window, and reads carrying more than one head, as before", () => {
    const rng = new Rng(0x5eed_0003)
    for (let i = 0; i < 200; i++) {
      const fields = Array.from({ length: 1 + rng.int(40) }, (_, k) => `X-F${k}: ${"v".repeat(rng.int(300))}\r\n`).join("")
      let text = `GET /${"a".repeat(rng.int(3000))} HTTP/1.1\r\nHost: h\r\n${fields}\r\n`
      if (rng.chance(0.5)) text = sprinkle(rng, text)
      const input = Buffer.from(text + SENTINEL + SENTINEL, "latin1")
      feedBoth(requestReaders(rng.pick(LIMITS)), input, rng.pick(CUTS))
    }
  })

  it("reads responses as before", () => {
    const rng = new Rng(0x5eed_0004)
    for (const response of RESPONSES) {
      for (const limits of LIMITS) for (const cut of CUTS) feedBoth(responseReaders(limits), Buffer.from(response, "latin1"), cut)
    }
    for (let i = 0; i < 1_000; i++) {
      let text = rng.pick(RESPONSES)
      if (rng.chance(0.7)) text = sprinkle(rng, text)
      if (rng.chance(0.2)) text = aroundWindow(text, rng.int(9) - 4)
      const cut = rng.chance(0.5) ? rng.pick(CUTS) : [1 + rng.int(64)]
      feedBoth(responseReaders(rng.pick(LIMITS)), Buffer.from(text, "latin1"), cut)
    }
  })
})
