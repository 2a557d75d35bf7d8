/**
 * Properties of a session pair over the in-memory connection, with random chunk boundaries: every byte
 * written is read exactly once and in order (a prefix of it when the stream is reset), and receive
 * windows stay within [0, max] with window + unread + ungranted = max, under random interleavings of
 * writes both ways, half-closes and resets.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Fiber, Schema } from "effect"
import type { StreamCore, YamuxStream } from "../../../src/services/yamux/Stream.ts"
import type { YamuxError } from "../../../src/services/yamux/YamuxError.ts"
import { concat, pattern, sessionPair } from "./harness.ts"

const between = (minimum: number, maximum: number) => Schema.Int.check(Schema.isBetween({ minimum, maximum }))

const Op = Schema.Struct({
  stream: between(0, 7),
  /** 0-4 write client→server, 5-6 write server→client, 7 closeWrite, 8 reset, 9 yield, 10 open (by either side) */
  kind: between(0, 10),
  size: between(0, 90_000),
  seed: between(1, 1_000_000)
})

const checkWindow = (core: StreamCore) => {
  assert.isAtLeast(core.recvWindow, 0, "receive window negative")
  assert.isAtMost(core.recvWindow, core.recvMax, "receive window above its maximum")
  if (core.error === undefined) {
    assert.strictEqual(core.recvWindow + core.recvBytes + core.pendingGrant, core.recvMax, "window accounting")
  }
}

interface Received {
  readonly bytes: Uint8Array
  readonly error: YamuxError | undefined
}

/** Reads until EOF or error, checking the window after every chunk. */
const reader = (s: YamuxStream) =>
  Effect.forkChild(Effect.gen(function*(): Effect.fn.Return<Received> {
    const parts: Array<Uint8Array> = []
    while (true) {
      const r = yield* Effect.result(s.read())
      checkWindow(s.core)
      if (r._tag === "Failure") return { bytes: concat(parts), error: r.failure }
      if (r.success === undefined) return { bytes: concat(parts), error: undefined }
      parts.push(Uint8Array.from(r.success))
    }
  }))

const splitter = (seed: number) => {
  let x = seed || 1
  return (chunk: Uint8Array): ReadonlyArray<Uint8Array> => {
    const out: Array<Uint8Array> = []
    let i = 0
    while (i < chunk.length) {
      x ^= x << 13
      x ^= x >>> 17
      x ^= x << 5
      const n = 1 + ((x >>> 0) % 20_000)
      out.push(chunk.subarray(i, i + n))
      i += n
    }
    return out
  }
}

describe("yamux Session properties", () => {
  it.effect.prop(
    "bytes arrive exactly once and in order; windows stay in bounds",
    { ops: Schema.Array(Op).check(Schema.isBetweenLength(1, 25)), split: between(1, 1_000_000) },
    ({ ops, split }) =>
      Effect.gen(function*() {
        const { client, server } = yield* sessionPair({ enableKeepAlive: false }, { split: splitter(split), coalesce: split % 2 === 0 })
        type Pair = {
          c: YamuxStream
          s: YamuxStream
          toServer: Array<Uint8Array>
          toClient: Array<Uint8Array>
          reset: boolean
          cFin: boolean
          sFin: boolean
          readers: readonly [Fiber.Fiber<Received>, Fiber.Fiber<Received>]
        }
        const pairs: Array<Pair> = []
        /** Opens a stream from the client (odd) or the server (even) side; `c` is always the client's end. */
        const openPair = (fromServer: boolean) =>
          Effect.gen(function*() {
            const opened = yield* (fromServer ? server : client).open()
            const accepted = yield* (fromServer ? client : server).accept()
            const c = fromServer ? accepted : opened
            const s = fromServer ? opened : accepted
            const readers = [yield* reader(s), yield* reader(c)] as const
            pairs.push({ c, s, toServer: [], toClient: [], reset: false, cFin: false, sFin: false, readers })
          })
        yield* openPair(false)
        for (const op of ops) {
          if (op.kind === 10) {
            if (pairs.length < 8) yield* openPair(op.seed % 2 === 0)
            continue
          }
          const p = pairs[op.stream % pairs.length]!
          if (op.kind <= 6) {
            const toServer = op.kind <= 4
            if (p.reset || (toServer ? p.cFin : p.sFin)) continue
            const data = pattern(op.size, op.seed)
            const from = toServer ? p.c : p.s
            const r = yield* Effect.result(from.write(data))
            if (r._tag === "Success") (toServer ? p.toServer : p.toClient).push(data)
          } else if (op.kind === 7) {
            if (op.seed % 2 === 0) {
              yield* p.c.closeWrite()
              p.cFin = true
            } else {
              yield* p.s.closeWrite()
              p.sFin = true
            }
          } else if (op.kind === 8) {
            yield* (op.seed % 2 === 0 ? p.c : p.s).reset()
            p.reset = true
          } else {
            yield* Effect.yieldNow
          }
          for (const q of pairs) {
            checkWindow(q.c.core)
            checkWindow(q.s.core)
          }
        }
        for (const p of pairs) {
          yield* p.c.closeWrite()
          yield* p.s.closeWrite()
        }
        for (let i = 0; i < pairs.length; i++) {
          const p = pairs[i]!
          const [toS, toC] = p.readers
          const atServer = yield* Fiber.join(toS)
          const atClient = yield* Fiber.join(toC)
          const sentToServer = concat(p.toServer)
          const sentToClient = concat(p.toClient)
          if (p.reset) {
            assert.isTrue(Buffer.from(sentToServer.subarray(0, atServer.bytes.length)).equals(Buffer.from(atServer.bytes)), "prefix")
            assert.isTrue(Buffer.from(sentToClient.subarray(0, atClient.bytes.length)).equals(Buffer.from(atClient.bytes)), "prefix")
          } else {
            assert.isUndefined(atServer.error)
            assert.isUndefined(atClient.error)
            assert.isTrue(Buffer.from(sentToServer).equals(Buffer.from(atServer.bytes)), "client to server bytes")
            assert.isTrue(Buffer.from(sentToClient).equals(Buffer.from(atClient.bytes)), "server to client bytes")
          }
        }
        assert.strictEqual(yield* client.streamCount, 0)
        assert.strictEqual(yield* server.streamCount, 0)
      }),
    { timeout: 120_000, arbitrary: { runs: 100 } }
  )
})
