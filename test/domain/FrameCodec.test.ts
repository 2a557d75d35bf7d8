import { describe, expect, it } from "vitest"
import * as F from "../../src/domain/Frame.ts"
import type { Frame } from "../../src/domain/Frame.ts"
import { copyBytes, decodeHeader, encodeFrame, encodeHeader, flagNames, makeFrameParser } from "../../src/domain/FrameCodec.ts"

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex")
const unhex = (s: string) => new Uint8Array(Buffer.from(s.replace(/\s+/g, ""), "hex"))

const frame = (type: F.FrameType, flags: number, streamId: number, length: number, body?: Uint8Array): Frame => ({
  type,
  flags,
  streamId,
  length: body ? body.length : length,
  body: type === F.TYPE_DATA ? body ?? new Uint8Array(0) : undefined
})

// Goldens written from the spec's byte table: version, type, flags (u16), stream id (u32), length (u32).
const goldens: ReadonlyArray<readonly [string, Frame, string]> = [
  ["Data SYN with body", frame(0, 1, 1, 0, unhex("68656c6c6f")), "00 00 0001 00000001 00000005 68656c6c6f"],
  ["Data no flags", frame(0, 0, 3, 0, unhex("ff")), "00 00 0000 00000003 00000001 ff"],
  ["Data ACK", frame(0, 2, 2, 0, unhex("00")), "00 00 0002 00000002 00000001 00"],
  ["Data FIN empty", frame(0, 4, 5, 0), "00 00 0004 00000005 00000000"],
  ["Data RST empty", frame(0, 8, 7, 0), "00 00 0008 00000007 00000000"],
  ["Data SYN|FIN", frame(0, 5, 9, 0, unhex("01")), "00 00 0005 00000009 00000001 01"],
  ["WindowUpdate SYN delta 0", frame(1, 1, 1, 0), "00 01 0001 00000001 00000000"],
  ["WindowUpdate ACK delta 0", frame(1, 2, 2, 0), "00 01 0002 00000002 00000000"],
  ["WindowUpdate delta 256 KiB", frame(1, 0, 4294967295, 262144), "00 01 0000 ffffffff 00040000"],
  ["WindowUpdate FIN", frame(1, 4, 11, 0), "00 01 0004 0000000b 00000000"],
  ["WindowUpdate RST", frame(1, 8, 12, 0), "00 01 0008 0000000c 00000000"],
  ["WindowUpdate SYN|ACK|FIN|RST", frame(1, 15, 13, 1), "00 01 000f 0000000d 00000001"],
  ["Ping SYN", frame(2, 1, 0, 0xdeadbeef), "00 02 0001 00000000 deadbeef"],
  ["Ping ACK", frame(2, 2, 0, 7), "00 02 0002 00000000 00000007"],
  ["GoAway normal", frame(3, 0, 0, 0), "00 03 0000 00000000 00000000"],
  ["GoAway protocol error", frame(3, 0, 0, 1), "00 03 0000 00000000 00000001"],
  ["GoAway internal error", frame(3, 0, 0, 2), "00 03 0000 00000000 00000002"]
]

const parseAll = (bytes: Uint8Array, pieces: (b: Uint8Array) => Array<Uint8Array>, maxFrameSize = 1 << 20) => {
  const p = makeFrameParser({ maxFrameSize })
  const out: Array<Frame> = []
  for (const piece of pieces(bytes)) {
    const r = p.push(piece)
    if (r.error) throw r.error
    out.push(...r.frames)
  }
  return { frames: out, parser: p }
}

const whole = (b: Uint8Array) => [b]
const byteAtATime = (b: Uint8Array) => Array.from(b, (x) => Uint8Array.of(x))

/** Tiny deterministic generator (xorshift) so failures reproduce. */
const rng = (seed: number) => {
  let x = seed >>> 0 || 1
  return () => {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    return (x >>> 0) / 0x1_0000_0000
  }
}
const randomChunks = (seed: number) => (b: Uint8Array) => {
  const r = rng(seed)
  const out: Array<Uint8Array> = []
  let i = 0
  while (i < b.length) {
    const n = 1 + Math.floor(r() * 40)
    out.push(b.subarray(i, i + n))
    i += n
  }
  return out
}

const plain = (f: Frame) => ({ ...f, body: f.body ? hex(f.body) : undefined })

describe("FrameCodec", () => {
  for (const [name, f, golden] of goldens) {
    it(`encodes and decodes ${name}`, () => {
      const bytes = encodeFrame(f)
      expect(hex(bytes)).toBe(golden.replace(/\s+/g, ""))
      for (const split of [whole, byteAtATime, randomChunks(7)]) {
        const { frames } = parseAll(bytes, split)
        expect(frames.map(plain)).toEqual([plain(f)])
      }
    })
  }

  it("encodeHeader and decodeHeader are inverses", () => {
    const h = encodeHeader(F.TYPE_WINDOW_UPDATE, F.FLAG_ACK | F.FLAG_FIN, 0x01020304, 0xa0b0c0d0)
    expect(hex(h)).toBe("0001000601020304a0b0c0d0")
    expect(decodeHeader(h)).toEqual({ version: 0, type: 1, flags: 6, streamId: 0x01020304, length: 0xa0b0c0d0 })
    expect(flagNames(15)).toBe("SYN|ACK|FIN|RST")
  })

  it("parses every golden back to back, for many random chunkings", () => {
    const all = Buffer.concat(goldens.map(([, f]) => encodeFrame(f)))
    const expected = goldens.map(([, f]) => plain(f))
    for (let seed = 1; seed <= 200; seed++) {
      expect(parseAll(all, randomChunks(seed)).frames.map(plain)).toEqual(expected)
    }
    expect(parseAll(all, byteAtATime).frames.map(plain)).toEqual(expected)
  })

  it("returns Data bodies inside one chunk as views, and copies bodies that span chunks", () => {
    const bytes = encodeFrame(frame(0, 0, 1, 0, unhex("0102030405")))
    const one = makeFrameParser({ maxFrameSize: 16 }).push(bytes).frames[0]!
    expect(one.body!.buffer).toBe(bytes.buffer)
    const p = makeFrameParser({ maxFrameSize: 16 })
    expect(p.push(bytes.subarray(0, 14)).frames).toEqual([])
    expect(p.buffered()).toBe(2)
    const split = p.push(bytes.subarray(14)).frames[0]!
    expect(hex(split.body!)).toBe("0102030405")
    expect(split.body!.buffer).not.toBe(bytes.buffer)
  })

  it("rejects an oversized Data frame on its header, before any body arrives", () => {
    const p = makeFrameParser({ maxFrameSize: 1024 })
    const header = encodeHeader(F.TYPE_DATA, 0, 1, 0xffff_ffff)
    const r = p.push(header)
    expect(r.error?.reason).toBe("FrameTooLarge")
    expect(p.buffered()).toBe(0)
    expect(p.dead()).toBe(true)
    // length is a value, not a size, for the other types: no limit applies
    const q = makeFrameParser({ maxFrameSize: 1024 })
    expect(q.push(encodeHeader(F.TYPE_WINDOW_UPDATE, 0, 1, 0xffff_ffff)).error).toBeUndefined()
  })

  it("rejects a bad version and an unknown type, keeping the frames before them", () => {
    const good = encodeFrame(frame(2, 1, 0, 5))
    const badVersion = unhex("01 00 0000 00000001 00000000")
    const r = makeFrameParser({ maxFrameSize: 64 }).push(Buffer.concat([good, badVersion]))
    expect(r.frames.length).toBe(1)
    expect(r.error?.reason).toBe("BadVersion")
    const badType = unhex("00 04 0000 00000001 00000000")
    expect(makeFrameParser({ maxFrameSize: 64 }).push(badType).error?.reason).toBe("UnknownType")
    // byte at a time, the error comes on the twelfth byte
    const p = makeFrameParser({ maxFrameSize: 64 })
    for (let i = 0; i < 11; i++) expect(p.push(badType.subarray(i, i + 1)).error).toBeUndefined()
    expect(p.push(badType.subarray(11)).error?.reason).toBe("UnknownType")
  })

  it("is dead after the first error", () => {
    const p = makeFrameParser({ maxFrameSize: 64 })
    expect(p.push(unhex("00 09 0000 00000001 00000000")).error?.reason).toBe("UnknownType")
    const again = p.push(encodeFrame(frame(2, 1, 0, 1)))
    expect(again.frames).toEqual([])
    expect(again.error?.reason).toBe("ParserDead")
  })

  it("never throws on random and mutated input (fuzz, bounded)", () => {
    const r = rng(12345)
    const seeds = goldens.map(([, f]) => encodeFrame(f))
    for (let iter = 0; iter < 5_000; iter++) {
      let bytes: Uint8Array
      if (iter % 2 === 0) {
        bytes = new Uint8Array(Math.floor(r() * 64))
        for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(r() * 256)
      } else {
        bytes = Uint8Array.from(Buffer.concat(seeds.filter(() => r() < 0.3)))
        const flips = 1 + Math.floor(r() * 4)
        for (let k = 0; k < flips && bytes.length > 0; k++) bytes[Math.floor(r() * bytes.length)] = Math.floor(r() * 256)
      }
      const p = makeFrameParser({ maxFrameSize: 4096 })
      let errors = 0
      for (const piece of randomChunks(iter + 1)(bytes)) {
        const res = p.push(piece)
        if (res.error) errors++
        for (const f of res.frames) {
          expect(f.type).toBeLessThanOrEqual(3)
          if (f.type === 0) expect(f.body!.length).toBe(f.length)
        }
      }
      expect(p.buffered()).toBeLessThanOrEqual(12 + 4096)
      if (errors > 0) expect(p.dead()).toBe(true)
    }
  })

  it("copyBytes copies, even from a Node Buffer (whose slice is a view)", () => {
    const source = Buffer.from([1, 2, 3, 4, 5])
    const copy = copyBytes(source, 1, 4)
    source.fill(0)
    expect(Array.from(copy)).toEqual([2, 3, 4])
    expect(copy.buffer).not.toBe(source.buffer)
  })

  it("small bodies are copied out of a large buffer; large ones stay views", () => {
    const p = makeFrameParser({ maxFrameSize: 1 << 20, zeroCopy: true })
    const small = encodeFrame(frame(F.TYPE_DATA, 0, 1, 4, Uint8Array.of(9, 9, 9, 9)))
    const large = encodeFrame(frame(F.TYPE_DATA, 0, 3, 4096, new Uint8Array(4096).fill(7)))
    const memory = Buffer.alloc(8192)
    memory.set(small, 0)
    memory.set(large, small.length)
    const { frames } = p.push(memory.subarray(0, small.length + large.length))
    expect(frames[0]!.body!.buffer).not.toBe(memory.buffer)
    expect(frames[1]!.body!.buffer).toBe(memory.buffer)
  })
})
