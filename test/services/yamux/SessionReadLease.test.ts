/**
 * A session over a connection that leases its reads: whatever the cut points of the reads (frames split
 * across them, several in one), a stream's reader sees every byte intact for as long as it holds what
 * it took, every read is given back once all holds were released, and a reader that takes no holds
 * leaves the reads alone.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import * as F from "../../../src/domain/Frame.ts"
import { encodeFrame } from "../../../src/domain/FrameCodec.ts"
import { ReadLease, type ReadRelease } from "../../../src/services/ReadLease.ts"
import type { Connection, ConnectionHandlers } from "../../../src/services/Transport.ts"
import { EOF } from "../../../src/services/yamux/Stream.ts"
import * as Session from "../../../src/services/yamux/Session.ts"
import { frame, pattern } from "./harness.ts"

/** A connection fed by the test, each read a whole `ArrayBuffer` of its own, leased as a socket's would be. */
const leasingConnection = () => {
  let handlers: ConnectionHandlers | undefined
  let closed = false
  const close = () => {
    if (closed) return
    closed = true
    queueMicrotask(() => handlers?.onClose(undefined))
  }
  const conn: Connection = {
    localAddress: undefined,
    remoteAddress: undefined,
    start: (h) => void (handlers = h),
    pause: () => {},
    resume: () => {},
    write: (_chunks, done) => queueMicrotask(() => done()),
    releasesOnDone: true,
    end: close,
    destroy: close,
    closed: () => closed
  }
  const reads: Array<Buffer> = []
  const feed = (bytes: Uint8Array) => {
    const read = Buffer.from(new ArrayBuffer(bytes.length))
    read.set(bytes)
    reads.push(read)
    assert.isTrue(handlers?.retainsReads === true, "the session says it retains what it keeps")
    const lease = new ReadLease(read)
    handlers!.onData(read, lease)
    lease.release()
  }
  return { conn, feed, reads }
}

const Cuts = Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 40_000 }))).check(Schema.isBetweenLength(1, 40))
const Bodies = Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 30_000 }))).check(Schema.isBetweenLength(1, 8))

/** A peer's bytes: stream 1 opened, `bodies` as Data frames, then FIN; and the body bytes expected. */
const peerBytes = (bodies: ReadonlyArray<number>) => {
  const parts: Array<Uint8Array> = [encodeFrame(frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0))]
  const expected: Array<Uint8Array> = []
  bodies.forEach((n, i) => {
    const body = pattern(n, i + 3)
    expected.push(body)
    parts.push(encodeFrame(frame(F.TYPE_DATA, 0, 1, n, body)))
    // window updates and pings between the data frames
    if (i % 2 === 1) parts.push(encodeFrame(frame(F.TYPE_PING, F.FLAG_SYN, 0, i)))
  })
  parts.push(encodeFrame(frame(F.TYPE_DATA, F.FLAG_FIN, 1, 0)))
  return { wire: Buffer.concat(parts), expected: Buffer.concat(expected) }
}

/** Feeds `wire` cut at `cuts` (repeated), then reads stream 1 to its end; `hold` takes each chunk's hold. */
const run = (bodies: ReadonlyArray<number>, cuts: ReadonlyArray<number>, hold: boolean) =>
  Effect.gen(function*() {
    const { conn, feed, reads } = leasingConnection()
    const session = yield* Session.make(conn, { role: "server", config: { enableKeepAlive: false } })
    const { wire, expected } = peerBytes(bodies)
    for (let at = 0, k = 0; at < wire.length; k++) {
      const n = Math.min(cuts[k % cuts.length]!, wire.length - at)
      feed(wire.subarray(at, at + n))
      at += n
    }
    const stream = yield* session.accept()
    const taken: Array<Uint8Array> = []
    const releases: Array<ReadRelease> = []
    for (;;) {
      const r = stream.core.tryRead()
      if (r === EOF || r === undefined) break
      assert.instanceOf(r, Uint8Array)
      taken.push(r as Uint8Array)
      if (hold) releases.push(stream.core.takeRelease())
    }
    return { reads, taken, releases, expected }
  })

describe("yamux Session over leased reads", () => {
  it.effect.prop(
    "a reader holding what it took sees every byte intact; once it releases, every read is given back",
    { bodies: Bodies, cuts: Cuts },
    ({ bodies, cuts }) =>
      Effect.scoped(Effect.gen(function*() {
        const { expected, reads, releases, taken } = yield* run(bodies, cuts, true)
        assert.strictEqual(Buffer.concat(taken).toString("hex"), expected.toString("hex"))
        for (const release of releases) release()
        const kept = reads.filter((r) => !(r.buffer as ArrayBuffer).detached)
        assert.strictEqual(kept.length, 0, `${kept.length} of ${reads.length} reads were not given back`)
      })),
    { arbitrary: { runs: 60 } }
  )

  it.effect.prop(
    "a reader that takes no holds keeps every byte it took: no read with data in it is given back",
    { bodies: Bodies, cuts: Cuts },
    ({ bodies, cuts }) =>
      Effect.scoped(Effect.gen(function*() {
        const { expected, taken } = yield* run(bodies, cuts, false)
        assert.strictEqual(Buffer.concat(taken).toString("hex"), expected.toString("hex"))
      })),
    { arbitrary: { runs: 60 } }
  )
})
