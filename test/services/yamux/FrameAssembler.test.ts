/**
 * The session's outgoing frames: byte-exact against the codec (and a hex golden), bodies copied, slabs
 * reused only after the batch holding them was released, quiet sessions keep one small slab; and a
 * property: no batch's bytes change until it is released, whatever is assembled after it.
 */
import { assert, describe, it } from "@effect/vitest"
import { Schema } from "effect"
import * as F from "../../../src/domain/Frame.ts"
import { encodeFrame } from "../../../src/domain/FrameCodec.ts"
import { type AssembledBatch, FrameAssembler, MAX_SLAB_BYTES, MIN_SLAB_BYTES, SPARE_SLABS } from "../../../src/services/yamux/FrameAssembler.ts"
import { concat, equalBytes, pattern } from "./harness.ts"

const bytesOf = (batch: AssembledBatch): Uint8Array => concat(batch.chunks)

const between = (minimum: number, maximum: number) => Schema.Int.check(Schema.isBetween({ minimum, maximum }))

/** 0 take, 1 release one unreleased batch, 2-6 a frame (2: no body, 3: up to 300 KB, 4-6: under 3,000 bytes, so slabs fill often) */
const Op = Schema.Struct({ kind: between(0, 6), size: between(0, 300_000), seed: between(0, 255) })

describe("FrameAssembler", () => {
  it("assembles frames byte for byte as the codec encodes them", () => {
    const out = new FrameAssembler()
    out.frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0)
    out.frame(F.TYPE_DATA, 0, 1, 3, Uint8Array.of(0x61, 0x62, 0x63))
    out.frame(F.TYPE_PING, F.FLAG_ACK, 0, 7)
    const batch = out.take()
    assert.strictEqual(batch.bytes, 12 + 15 + 12)
    assert.strictEqual(
      Buffer.from(bytesOf(batch)).toString("hex"),
      "000100010000000100000000" + "000000000000000100000003616263" + "000200020000000000000007"
    )
    const expected = concat([
      encodeFrame({ type: F.TYPE_WINDOW_UPDATE, flags: F.FLAG_SYN, streamId: 1, length: 0, body: undefined }),
      encodeFrame({ type: F.TYPE_DATA, flags: 0, streamId: 1, length: 3, body: Uint8Array.of(0x61, 0x62, 0x63) }),
      encodeFrame({ type: F.TYPE_PING, flags: F.FLAG_ACK, streamId: 0, length: 7, body: undefined })
    ])
    assert.isTrue(equalBytes(bytesOf(batch), expected))
    assert.strictEqual(out.take().bytes, 0, "nothing left after a take")
  })

  it("copies bodies: the writer may change its buffer as soon as frame() returns", () => {
    const out = new FrameAssembler()
    const body = pattern(1000, 3)
    out.frame(F.TYPE_DATA, 0, 3, body.length, body)
    body.fill(0)
    const batch = out.take()
    assert.isTrue(equalBytes(bytesOf(batch).subarray(12), pattern(1000, 3)))
  })

  it("reuses a slab only after the batch in it was released", () => {
    const out = new FrameAssembler()
    out.frame(F.TYPE_DATA, 0, 1, 100_000, pattern(100_000, 1))
    const first = out.take()
    out.frame(F.TYPE_DATA, 0, 1, 100_000, pattern(100_000, 2))
    const second = out.take()
    assert.isFalse(second.slabs.some((s) => first.slabs.includes(s)), "a batch not yet released is not written over")
    out.release(first)
    out.frame(F.TYPE_DATA, 0, 1, 100_000, pattern(100_000, 3))
    const third = out.take()
    assert.strictEqual(third.slabs[0], first.slabs[0], "the released slab takes the next batch")
    assert.isTrue(equalBytes(bytesOf(second).subarray(12), pattern(100_000, 2)), "the batch in flight is intact")
    assert.strictEqual(first.slabs[0]!.length, MAX_SLAB_BYTES, "data gets a large slab")
  })

  it("a frame larger than a slab gets a slab of its own size", () => {
    const out = new FrameAssembler()
    const big = MAX_SLAB_BYTES + 5
    out.frame(F.TYPE_DATA, 0, 1, big, pattern(big, 4))
    const batch = out.take()
    assert.strictEqual(batch.slabs.length, 1)
    assert.strictEqual(batch.slabs[0]!.length, 12 + big)
    assert.isTrue(equalBytes(bytesOf(batch).subarray(12), pattern(big, 4)))
  })

  it("keeps at most SPARE_SLABS, and a quiet batch lets the large ones go", () => {
    const out = new FrameAssembler()
    const batches: Array<AssembledBatch> = []
    for (let i = 0; i < SPARE_SLABS + 4; i++) {
      out.frame(F.TYPE_DATA, 0, 1, 200_000, pattern(200_000, i))
      batches.push(out.take())
    }
    for (const b of batches) out.release(b)
    // SPARE_SLABS busy batches in a row reuse the spares: no new slab
    const reused = new Set(batches.flatMap((b) => b.slabs))
    for (let i = 0; i < SPARE_SLABS; i++) {
      out.frame(F.TYPE_DATA, 0, 1, 200_000, pattern(200_000, i))
      const b = out.take()
      assert.isTrue(reused.has(b.slabs[0]!), `batch ${i} reuses a spare`)
    }
    out.frame(F.TYPE_DATA, 0, 1, 200_000, pattern(200_000, 9))
    assert.isFalse(reused.has(out.take().slabs[0]!), "past SPARE_SLABS, a new slab")
    // a batch of control frames alone, released: the large spares go, and the session keeps one small slab
    const quiet = new FrameAssembler()
    quiet.frame(F.TYPE_DATA, 0, 1, 200_000, pattern(200_000, 1))
    quiet.release(quiet.take())
    quiet.frame(F.TYPE_WINDOW_UPDATE, 0, 1, 1000)
    quiet.release(quiet.take())
    quiet.frame(F.TYPE_PING, 0, 0, 1)
    const ping = quiet.take()
    assert.strictEqual(ping.slabs[0]!.length, MIN_SLAB_BYTES, "control frames take a small slab once the large ones went")
    quiet.release(ping)
    quiet.frame(F.TYPE_PING, 0, 0, 2)
    assert.strictEqual(quiet.take().slabs[0], ping.slabs[0], "the small slab is kept and reused")
  })

  it.prop(
    "property: every batch keeps its bytes until released, whatever is assembled and released after it",
    { ops: Schema.Array(Op).check(Schema.isBetweenLength(1, 100)) },
    ({ ops }) => {
      const out = new FrameAssembler()
      let expected: Array<Uint8Array> = []
      const unreleased: Array<{ batch: AssembledBatch; bytes: Uint8Array }> = []
      for (const o of ops) {
        if (o.kind === 0) {
          const batch = out.take()
          const bytes = concat(expected)
          expected = []
          assert.isTrue(equalBytes(bytesOf(batch), bytes))
          assert.strictEqual(batch.bytes, bytes.length)
          if (batch.bytes > 0) unreleased.push({ batch, bytes })
        } else if (o.kind === 1) {
          const [u] = unreleased.splice(o.seed % Math.max(1, unreleased.length), 1)
          if (u !== undefined) out.release(u.batch)
        } else {
          // sizes from none to larger than a slab, most of them small
          const size = o.kind === 2 ? 0 : o.kind === 3 ? o.size : o.size % 3_000
          const body = size === 0 ? undefined : pattern(size, o.seed)
          out.frame(F.TYPE_DATA, 0, 5, size, body)
          expected.push(encodeFrame({ type: F.TYPE_DATA, flags: 0, streamId: 5, length: size, body }))
        }
        for (const u of unreleased) assert.isTrue(equalBytes(bytesOf(u.batch), u.bytes), "a batch changed before its release")
      }
    },
    { arbitrary: { runs: 500 } }
  )
})
