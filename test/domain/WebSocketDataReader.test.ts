import { describe, expect, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import type { DataReadStep } from "../../src/domain/WebSocketDataReader.ts"
import { DataFrameReader, messageStart } from "../../src/domain/WebSocketDataReader.ts"

const jsUnmask = (data: Buffer, mask: Buffer): void => {
  for (let i = 0; i < data.length; i++) data[i]! ^= mask[i & 3]!
}

/** One frame as a client writes it (masked with `key` unless it is null). */
const frame = (fin: boolean, opcode: number, payload: Buffer, key: Buffer | null = Buffer.from([0x12, 0x34, 0x56, 0x78])): Buffer => {
  const len = payload.length
  const ext = len < 126 ? 0 : len < 65536 ? 2 : 8
  const head = Buffer.alloc(2 + ext + (key === null ? 0 : 4))
  head[0] = (fin ? 0x80 : 0) | opcode
  head[1] = (key === null ? 0 : 0x80) | (ext === 0 ? len : ext === 2 ? 126 : 127)
  if (ext === 2) head.writeUInt16BE(len, 2)
  if (ext === 8) head.writeBigUInt64BE(BigInt(len), 2)
  const body = Buffer.from(payload)
  if (key !== null) {
    key.copy(head, 2 + ext)
    for (let i = 0; i < body.length; i++) body[i]! ^= key[i & 3]!
  }
  return Buffer.concat([head, body])
}

const pattern = (n: number, seed = 1): Buffer => {
  const b = Buffer.alloc(n)
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) % 256
  return b
}

/** Feeds `wire` in pieces cut at `cuts` (repeating) and collects payload and the final step. */
const feed = (reader: DataFrameReader, wire: Buffer, cuts: ReadonlyArray<number>) => {
  const payload: Array<Buffer> = []
  let offset = 0
  let c = 0
  let last: DataReadStep = { _tag: "Continue" }
  let stoppedAt = -1
  let prefix: Buffer | undefined
  while (offset < wire.length) {
    const size = cuts[c++ % cuts.length]!
    const piece = Buffer.from(wire.subarray(offset, Math.min(wire.length, offset + size)))
    last = reader.read(piece, (p) => void payload.push(Buffer.from(p)))
    if (last._tag !== "Continue") {
      stoppedAt = offset + last.at
      if (last._tag === "Handover") prefix = last.prefix
      break
    }
    offset += piece.length
  }
  return { payload: Buffer.concat(payload), last, stoppedAt, prefix }
}

const reader = (max = 1 << 30, masked = true) => new DataFrameReader(messageStart, max, masked, jsUnmask)

describe("WebSocketDataReader", () => {
  it("reads a masked binary message of three frames (7-bit, 16-bit and 64-bit lengths) and stops after its last", () => {
    const a = pattern(100)
    const b = pattern(300, 2)
    const c = pattern(70_000, 3)
    const after = Buffer.from("next")
    const wire = Buffer.concat([frame(false, 2, a), frame(false, 0, b), frame(true, 0, c), after])
    const out = feed(reader(), wire, [wire.length])
    expect(out.last._tag).toBe("End")
    expect(Buffer.compare(out.payload, Buffer.concat([a, b, c]))).toBe(0)
    expect(wire.subarray(out.stoppedAt).toString()).toBe("next")
  })

  it("passes on every payload byte as it arrives when fed one byte at a time", () => {
    const body = pattern(600)
    const wire = Buffer.concat([frame(false, 2, body.subarray(0, 200)), frame(true, 0, body.subarray(200))])
    const r = reader()
    const seen: Array<number> = []
    for (let i = 0; i < wire.length; i++) {
      const step = r.read(Buffer.from([wire[i]!]), (p) => void seen.push(...p))
      // a byte of payload is never held back
      expect(seen.length).toBe(Math.max(0, Math.min(i + 1 - 8, 200)) + Math.max(0, i + 1 - (8 + 200 + 8)))
      if (i < wire.length - 1) expect(step._tag).toBe("Continue")
      else expect(step).toEqual({ _tag: "End", at: 1 })
    }
    expect(Buffer.compare(Buffer.from(seen), body)).toBe(0)
  })

  it("hands a control frame back at its first byte, with the header bytes it already took", () => {
    const body = pattern(50)
    const ping = frame(true, 9, Buffer.from("hi"))
    const wire = Buffer.concat([frame(false, 2, body), ping, frame(true, 0, Buffer.from("z"))])
    const whole = feed(reader(), wire, [wire.length])
    expect(whole.last._tag).toBe("Handover")
    expect(whole.prefix).toBeUndefined()
    expect(Buffer.compare(wire.subarray(whole.stoppedAt, whole.stoppedAt + ping.length), ping)).toBe(0)
    // the ping's first byte arrives alone: it is handed back with the next read
    const r = reader()
    const first = r.read(Buffer.from(wire.subarray(0, 57)), () => undefined)
    expect(first._tag).toBe("Continue")
    const next = r.read(Buffer.from(wire.subarray(57)), () => undefined)
    expect(next).toEqual({ _tag: "Handover", at: 0, prefix: Buffer.from([0x89]) })
    expect(r.inMessage).toBe(true)
    expect(r.total).toBe(50)
  })

  it("leaves to the full implementation: text, RSV bits, unmasked client frames, a new message inside one, oversize", () => {
    const cases: Array<[Buffer, number]> = [
      [frame(true, 1, Buffer.from("text")), 0],
      [Buffer.concat([Buffer.from([0xc2]), frame(true, 2, Buffer.from("x")).subarray(1)]), 0],
      [frame(true, 2, Buffer.from("x"), null), 0],
      [Buffer.concat([frame(false, 2, Buffer.from("ab")), frame(true, 2, Buffer.from("c"))]), 8],
      [Buffer.concat([frame(false, 2, pattern(10)), frame(true, 0, pattern(10))]), 16]
    ]
    for (const [wire, at] of cases) {
      const out = feed(reader(19), wire, [wire.length])
      expect(out.last._tag).toBe("Handover")
      expect(out.stoppedAt).toBe(at)
    }
  })

  it("takes over inside a frame's payload, continuing its mask where it stood", () => {
    const key = Buffer.from([9, 8, 7, 6])
    const body = pattern(1000)
    const wire = frame(true, 2, body, key)
    // a receiver that already read the header (8 bytes) and 5 bytes of payload
    const r = new DataFrameReader({ total: 1000, inMessage: true, frameRemaining: 995, fin: true, mask: key, maskOffset: 5 }, 1 << 20, true, jsUnmask)
    const out = feed(r, wire.subarray(8 + 5), [333, 1, 7])
    expect(out.last).toEqual({ _tag: "End", at: expect.any(Number) })
    expect(Buffer.compare(out.payload, body.subarray(5))).toBe(0)
  })

  it.effect.prop(
    "any split of a message's frames gives back exactly its payload, and stops where it ends",
    {
      sizes: Schema.NonEmptyArray(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 70_000 }))).check(Schema.isMaxLength(5)),
      cuts: Schema.NonEmptyArray(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 40_000 }))).check(Schema.isMaxLength(8)),
      zeroKey: Schema.Boolean
    },
    ({ sizes, cuts, zeroKey }) =>
      Effect.sync(() => {
        const parts = sizes.map((n, i) => pattern(n, i))
        const key = zeroKey ? Buffer.alloc(4) : Buffer.from([0xa1, 0x02, 0xff, 0x40])
        const frames = parts.map((p, i) => frame(i === parts.length - 1, i === 0 ? 2 : 0, p, key))
        const wire = Buffer.concat([...frames, Buffer.from([0x8a, 0x80])])
        const out = feed(reader(), wire, cuts)
        expect(out.last._tag).toBe("End")
        expect(Buffer.compare(out.payload, Buffer.concat(parts))).toBe(0)
        expect(out.stoppedAt).toBe(wire.length - 2)
      })
  )
})
