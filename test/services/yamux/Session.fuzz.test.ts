/**
 * Fuzzing a live session with random and mutated frames (bounded, deterministic seeds): nothing throws,
 * and a session that ends on a protocol error has sent GoAway(protocol error) first.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as F from "../../../src/domain/Frame.ts"
import { encodeFrame } from "../../../src/domain/FrameCodec.ts"
import { makeMemoryPair } from "../../../src/services/Transport.ts"
import * as Session from "../../../src/services/yamux/Session.ts"
import { concat, frame, rawPeer } from "./harness.ts"

const rng = (seed: number) => {
  let x = seed >>> 0 || 1
  return () => {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    return (x >>> 0) / 0x1_0000_0000
  }
}

/** Mostly plausible frames from a peer of the client parity (odd ids), so sessions get somewhere. */
const plausible = (r: () => number): F.Frame => {
  const id = 1 + 2 * Math.floor(r() * 4)
  const pick = r()
  if (pick < 0.25) return frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, id, 0)
  if (pick < 0.55) return frame(F.TYPE_DATA, r() < 0.1 ? F.FLAG_FIN : 0, id, 0, new Uint8Array(Math.floor(r() * 3000)))
  if (pick < 0.7) return frame(F.TYPE_WINDOW_UPDATE, [0, F.FLAG_FIN, F.FLAG_RST, F.FLAG_ACK][Math.floor(r() * 4)]!, id, Math.floor(r() * 70_000))
  if (pick < 0.85) return frame(F.TYPE_PING, r() < 0.5 ? F.FLAG_SYN : F.FLAG_ACK, 0, Math.floor(r() * 100))
  if (pick < 0.9) return frame(F.TYPE_GO_AWAY, 0, 0, Math.floor(r() * 4))
  return frame(F.TYPE_DATA, 0, Math.floor(r() * 20), 0, new Uint8Array(Math.floor(r() * 10)))
}

const turns = (n: number) =>
  Effect.promise(async () => {
    for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r))
  })

describe("yamux Session fuzz", () => {
  it.live("random and mutated frames never throw; protocol errors are answered with GoAway(1)", () =>
    Effect.gen(function*() {
      let protocolErrors = 0
      let survived = 0
      for (let iter = 0; iter < 300; iter++) {
        const r = rng(iter + 1)
        yield* Effect.scoped(Effect.gen(function*() {
          const [a, b] = makeMemoryPair()
          const peer = rawPeer(b)
          const session = yield* Session.make(a, { role: "server", config: { enableKeepAlive: false, acceptBacklog: 4 } })
          // accept and drain whatever arrives, like an application would
          yield* Effect.forkScoped(Effect.forever(Effect.gen(function*() {
            const s = yield* session.accept()
            yield* Effect.forkScoped(Effect.ignore(Effect.forever(Effect.flatMap(s.read(), (c) => c === undefined ? Effect.fail("eof") : Effect.void))))
          })).pipe(Effect.ignore))
          let bytes: Uint8Array
          if (iter % 3 === 0) {
            bytes = new Uint8Array(Math.floor(r() * 200))
            for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(r() * 256)
          } else {
            const frames = Array.from({ length: 1 + Math.floor(r() * 12) }, () => plausible(r))
            bytes = Uint8Array.from(concat(frames.map(encodeFrame)))
            if (iter % 3 === 2) {
              const flips = 1 + Math.floor(r() * 3)
              for (let k = 0; k < flips && bytes.length > 0; k++) bytes[Math.floor(r() * bytes.length)] = Math.floor(r() * 256)
            }
          }
          let i = 0
          while (i < bytes.length) {
            const n = 1 + Math.floor(r() * 64)
            peer.sendBytes(bytes.subarray(i, i + n))
            i += n
          }
          yield* turns(4)
          const outcome = session.core.outcome
          assert.isAtLeast(session.core.unreadBytes, 0)
          if (outcome?.error?.reason === "ProtocolError") {
            protocolErrors++
            yield* peer.waitFor((fs) => fs.some((f) => f.type === F.TYPE_GO_AWAY))
            const codes = peer.frames.filter((f) => f.type === F.TYPE_GO_AWAY).map((f) => f.length)
            assert.deepStrictEqual(codes, [F.GO_AWAY_PROTOCOL_ERROR])
          } else if (outcome === undefined) {
            survived++
            // still serving: it answers a ping (when the input ended on a frame boundary)
            if (iter % 3 !== 1) return
            const before = peer.frames.length
            peer.sendBytes(encodeFrame(frame(F.TYPE_PING, F.FLAG_SYN, 0, 77_777)))
            yield* peer.waitFor((fs) => fs.slice(before).some((f) => f.type === F.TYPE_PING && f.length === 77_777))
          }
        }))
      }
      // the corpus exercises both paths
      assert.isAbove(protocolErrors, 50)
      assert.isAbove(survived, 20)
    }), { timeout: 120_000 })
})
