import { assert, describe, it } from "@effect/vitest"
import {
  LENDING_READ_MAX_BYTES,
  LENDING_READ_MIN_BYTES,
  LENDING_SHRINK_AFTER_READS,
  LendingReads
} from "../../../src/services/transport/LendingReads.ts"

/**
 * Drives the buffer policy the way Node's `onread` does: `next()` supplies the memory, `onRead` reports
 * how much was read into it. `keep` decides, per read, whether the handlers say they kept the bytes.
 */
const reader = (keep: (chunk: Uint8Array) => boolean = () => false) => {
  const reads = new LendingReads()
  const seen: Array<Uint8Array> = []
  reads.attach({
    lendable: true,
    onData: (chunk) => {
      seen.push(chunk)
      return keep(chunk)
    },
    onEnd: () => {},
    onClose: () => {}
  })
  /** One read of `n` bytes (at most the buffer's size); the buffer it went into. */
  const read = (n: number): Buffer => {
    const buffer = reads.next()
    const bytes = Math.min(n, buffer.length)
    buffer.fill(seen.length % 256, 0, bytes)
    reads.onRead(bytes, buffer)
    return buffer
  }
  return { reads, read, seen }
}

// buffers are compared by identity (`===`): an assertion diff would print whole 256 KiB buffers
describe("LendingReads", () => {
  it("reads into the same memory while nothing is kept, and into fresh memory after a read that was", () => {
    let keepNext = false
    const { read } = reader(() => keepNext)
    const first = read(100)
    assert.strictEqual(first.length, LENDING_READ_MIN_BYTES)
    assert.isTrue(read(100) === first, "nothing kept: the same memory again")
    keepNext = true
    assert.isTrue(read(100) === first)
    keepNext = false
    const after = read(100)
    assert.isTrue(after !== first, "the kept read's memory is left to its holder")
    assert.isTrue(read(100) === after)
  })

  it("grows fourfold on full reads up to the maximum", () => {
    const { read } = reader()
    const sizes: Array<number> = []
    for (let i = 0; i < 8; i++) sizes.push(read(Number.MAX_SAFE_INTEGER).length)
    assert.deepStrictEqual(sizes.slice(0, 6), [4096, 16_384, 65_536, 262_144, 262_144, 262_144].map((n) => Math.min(n, LENDING_READ_MAX_BYTES)))
  })

  it("a busy connection whose reads alternate large and small keeps its buffer; a run of small reads shrinks it", () => {
    const { read } = reader()
    let buffer = read(Number.MAX_SAFE_INTEGER)
    while (buffer.length < LENDING_READ_MAX_BYTES) buffer = read(Number.MAX_SAFE_INTEGER)
    const big = read(LENDING_READ_MAX_BYTES / 2)
    // small, large, small, large...: the same memory every time, never a size swap
    for (let i = 0; i < 4 * LENDING_SHRINK_AFTER_READS; i++) {
      const size = i % 2 === 0 ? 100 : LENDING_READ_MAX_BYTES / 2
      assert.isTrue(read(size) === big, `read ${i} (${size} bytes) went into other memory`)
    }
    // small reads in a row: one short of the run keeps it, the run makes the next buffer a quarter
    for (let i = 0; i < LENDING_SHRINK_AFTER_READS; i++) assert.isTrue(read(100) === big, `small read ${i} went into other memory`)
    const smaller = read(100)
    assert.strictEqual(smaller.length, LENDING_READ_MAX_BYTES / 4)
    // and further runs take it down to the minimum, not below
    let last = smaller
    for (let i = 0; i < 10 * LENDING_SHRINK_AFTER_READS; i++) last = read(10)
    assert.strictEqual(last.length, LENDING_READ_MIN_BYTES)
  })
})
