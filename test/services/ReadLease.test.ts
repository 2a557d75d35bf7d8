/**
 * A read's memory is given back when its last holder releases it, never before, and only when the read
 * is the whole of its `ArrayBuffer`.
 */
import { assert, describe, it } from "@effect/vitest"
import { ReadLease } from "../../src/services/ReadLease.ts"

const read = (n: number): Buffer => Buffer.from(new ArrayBuffer(n)).fill(9)

describe("ReadLease", () => {
  it("frees the read once the reader and every holder released it, and not before", () => {
    const chunk = read(1024)
    const lease = new ReadLease(chunk)
    const a = lease.retain()
    const b = lease.retain()
    lease.release()
    a()
    a() // a second call of one release counts once
    assert.strictEqual(chunk.length, 1024)
    assert.isFalse(lease.freed)
    assert.strictEqual(chunk[1023], 9)
    b()
    assert.isTrue(lease.freed)
    assert.isTrue((chunk.buffer as ArrayBuffer).detached)
    assert.strictEqual(chunk.length, 0)
  })

  it("frees at once a read nobody retained", () => {
    const chunk = read(16)
    const lease = new ReadLease(chunk)
    lease.release()
    assert.isTrue((chunk.buffer as ArrayBuffer).detached)
    // holds after the memory went are no-ops
    lease.retain()()
    lease.release()
    assert.isTrue(lease.freed)
  })

  it("leaves shared memory to the collector: a view of part of a buffer, or of Node's pool", () => {
    const whole = new ArrayBuffer(64)
    const part = Buffer.from(whole, 8, 16)
    new ReadLease(part).release()
    assert.isFalse(whole.detached)
    const pooled = Buffer.from("from the pool")
    const pool = pooled.buffer as ArrayBuffer
    new ReadLease(pooled).release()
    assert.isFalse(pool.detached)
    assert.strictEqual(pooled.toString(), "from the pool")
  })
})
