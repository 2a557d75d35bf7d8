import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Fiber } from "effect"
import { TestClock } from "effect/testing"
import * as F from "../../../src/domain/Frame.ts"
import { makeMemoryPair } from "../../../src/services/Transport.ts"
import * as Session from "../../../src/services/yamux/Session.ts"
import { echoServer, equalBytes, frame, pattern, rawPeer, readAll, readExactly, sessionPair } from "./harness.ts"

/** Our session (as `role`) against a hand-driven peer. */
const againstRaw = (role: Session.YamuxRole, config?: Parameters<typeof Session.make>[1]["config"]) =>
  Effect.gen(function*() {
    const [a, b] = makeMemoryPair()
    const peer = rawPeer(b)
    const session = yield* Session.make(a, { role, config: { enableKeepAlive: false, ...config } })
    return { session, peer, conn: a }
  })

const goAwayCodes = (frames: ReadonlyArray<F.Frame>) =>
  frames.filter((f) => f.type === F.TYPE_GO_AWAY).map((f) => f.length)

describe("yamux Session (in-memory)", () => {
  it.effect("echoes a stream end to end", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair()
      yield* echoServer(server)
      const s = yield* client.open()
      const data = pattern(1_000_000)
      const writer = yield* Effect.forkChild(Effect.andThen(s.write(data), s.closeWrite()))
      const got = yield* readAll(s)
      yield* Fiber.join(writer)
      assert.isTrue(equalBytes(got, data))
    }))

  it.effect("clients open odd ids, servers even ids", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair()
      const first = yield* client.open()
      const ids = [first.id, (yield* client.open()).id, (yield* server.open()).id, (yield* server.open()).id]
      assert.deepStrictEqual(ids, [1, 3, 2, 4])
      const established = yield* Effect.forkChild(first.established())
      for (let i = 0; i < 20; i++) yield* Effect.yieldNow
      assert.isUndefined(established.pollUnsafe(), "no ACK before the peer accepts")
      const accepted = [(yield* server.accept()).id, (yield* server.accept()).id, (yield* client.accept()).id]
      assert.deepStrictEqual(accepted, [1, 3, 2])
      yield* Fiber.join(established)
    }))

  it.effect("ping measures a round trip both ways, and answers echo the opaque value", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair()
      yield* client.ping()
      yield* server.ping()
      const { peer } = yield* againstRaw("server")
      peer.send(frame(F.TYPE_PING, F.FLAG_SYN, 0, 0xcafe))
      yield* peer.waitFor((fs) => fs.some((f) => f.type === F.TYPE_PING))
      const pong = peer.frames.find((f) => f.type === F.TYPE_PING)!
      assert.deepStrictEqual([pong.flags, pong.streamId, pong.length], [F.FLAG_ACK, 0, 0xcafe])
    }))

  it.effect("FIN half-closes each direction; the stream is removed once both sides finished", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair()
      const c = yield* client.open()
      yield* c.write(pattern(100))
      yield* c.closeWrite()
      const s = yield* server.accept()
      assert.isTrue(equalBytes(yield* readAll(s), pattern(100)))
      // the server can still write after the client's FIN
      yield* s.write(pattern(50, 2))
      yield* s.closeWrite()
      assert.isTrue(equalBytes(yield* readAll(c), pattern(50, 2)))
      const afterClose = yield* Effect.flip(c.write(pattern(1)))
      assert.strictEqual(afterClose.reason, "StreamClosed")
      assert.strictEqual(yield* client.streamCount, 0)
      assert.strictEqual(yield* server.streamCount, 0)
    }))

  it.effect("RST fails both ends at once and removes the stream", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair()
      const c = yield* client.open()
      yield* c.write(pattern(10))
      const s = yield* server.accept()
      yield* readExactly(s, 10)
      const pending = yield* Effect.forkChild(Effect.flip(s.read()))
      yield* c.reset()
      const err = yield* Fiber.join(pending)
      assert.strictEqual(err.reason, "StreamReset")
      assert.strictEqual((yield* Effect.flip(c.read())).reason, "StreamReset")
      assert.strictEqual(yield* client.streamCount, 0)
      yield* Effect.yieldNow
      assert.strictEqual(yield* server.streamCount, 0)
    }))

  it.effect("a SYN beyond the accept backlog is refused with RST", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair({ acceptBacklog: 2 })
      const streams = [yield* client.open(), yield* client.open(), yield* client.open()]
      const third = yield* Effect.flip(streams[2]!.read())
      assert.strictEqual(third.reason, "StreamReset")
      assert.strictEqual(yield* server.streamCount, 2)
      assert.strictEqual((yield* server.accept()).id, 1)
      assert.strictEqual((yield* server.accept()).id, 3)
    }))

  it.effect("flow control: a slow reader stops its writer at the window, other streams carry on", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair()
      const slow = yield* client.open()
      const big = pattern(F.INITIAL_STREAM_WINDOW * 3)
      const writer = yield* Effect.forkChild(slow.write(big))
      const slowIn = yield* server.accept()
      for (let i = 0; i < 50; i++) yield* Effect.yieldNow
      assert.strictEqual(slow.core.sendWindow, 0, "the writer used the whole window and waits")
      assert.isUndefined(writer.pollUnsafe(), "the write has not completed")
      assert.strictEqual(slowIn.core.recvWindow, 0)
      // another stream is unaffected
      const other = yield* client.open()
      yield* other.write(pattern(1000, 3))
      const otherIn = yield* server.accept()
      assert.isTrue(equalBytes(yield* readExactly(otherIn, 1000), pattern(1000, 3)))
      // reading releases the writer
      const got = yield* readExactly(slowIn, big.length)
      yield* Fiber.join(writer)
      assert.isTrue(equalBytes(got, big))
    }))

  it.effect("echo streams larger than their windows never stall the session, whatever the session read bound", () =>
    Effect.gen(function*() {
      // Each echo writer waits for WindowUpdates while its reader holds unread data: pausing the
      // transport on total unread bytes would hold those WindowUpdates back for good.
      const { client, server } = yield* sessionPair({ sessionReadBuffer: 64 * 1024, maxStreamWindow: 1024 * 1024 })
      yield* echoServer(server)
      yield* Effect.forEach(Array.from({ length: 4 }, (_, i) => i), (i) =>
        Effect.gen(function*() {
          const s = yield* client.open()
          const data = pattern(3 * 1024 * 1024, i + 1)
          const w = yield* Effect.forkChild(Effect.andThen(s.write(data), s.closeWrite()))
          const got = yield* readAll(s)
          yield* Fiber.join(w)
          assert.isTrue(equalBytes(got, data))
        }), { concurrency: "unbounded", discard: true })
    }), { timeout: 20_000 })

  it.live("auto-tuning grows the window of a stream whose reader keeps up, within its limit", () =>
    Effect.gen(function*() {
      const limit = 4 * 1024 * 1024
      const { client, server } = yield* sessionPair({ maxAutoTuneWindow: limit, enableKeepAlive: false })
      yield* server.ping() // an RTT for the client side's grants is measured at start; this one for the server's
      const s = yield* client.open()
      const data = pattern(16 * 1024 * 1024, 7)
      const w = yield* Effect.forkChild(Effect.andThen(s.write(data), s.closeWrite()))
      const inbound = yield* server.accept()
      const got = yield* readAll(inbound)
      yield* Fiber.join(w)
      assert.isTrue(equalBytes(got, data))
      assert.isAbove(inbound.core.recvMax, F.INITIAL_STREAM_WINDOW, "the window grew")
      assert.isAtMost(inbound.core.recvMax, limit)
      // without auto-tuning it stays put
      const plain = yield* sessionPair({ enableKeepAlive: false })
      const p = yield* plain.client.open()
      const pw = yield* Effect.forkChild(Effect.andThen(p.write(data.subarray(0, 4 * 1024 * 1024)), p.closeWrite()))
      const pin = yield* plain.server.accept()
      yield* readAll(pin)
      yield* Fiber.join(pw)
      assert.strictEqual(pin.core.recvMax, F.INITIAL_STREAM_WINDOW)
    }))

  it.effect("data in streams nobody accepted pauses the transport past the bound; accepting resumes it", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair({ sessionReadBuffer: 100_000 })
      const streams = [yield* client.open(), yield* client.open(), yield* client.open()]
      // one batch each (the session joins the frames of one turn into one write, which the memory pair
      // hands over as one read, as a socket would hand over up to 64 KiB)
      for (const [i, s] of streams.entries()) {
        yield* s.write(pattern(60_000, i + 1))
        yield* Effect.promise(() => new Promise((r) => setTimeout(r, 5)))
      }
      yield* Effect.promise(() => new Promise((r) => setTimeout(r, 20)))
      assert.isTrue(server.core.readingPaused, "paused with more than the bound waiting unaccepted")
      assert.isAtMost(server.core.unreadBytes, 120_000, "reading stopped soon after the bound")
      for (const [i] of streams.entries()) {
        const s = yield* server.accept()
        assert.isTrue(equalBytes(yield* readExactly(s, 60_000), pattern(60_000, i + 1)))
      }
      assert.isFalse(server.core.readingPaused)
    }))

  it.effect("GoAway: our opens fail locally, the peer's opens fail and its SYNs are refused", () =>
    Effect.gen(function*() {
      const { client, server } = yield* sessionPair()
      const before = yield* client.open()
      const beforeIn = yield* server.accept()
      yield* server.goAway()
      assert.strictEqual((yield* Effect.flip(server.open())).reason, "LocalGoAway")
      yield* client.ping() // the GoAway has arrived once the ping is answered
      assert.strictEqual((yield* Effect.flip(client.open())).reason, "RemoteGoAway")
      yield* before.write(pattern(5))
      assert.isTrue(equalBytes(yield* readExactly(beforeIn, 5), pattern(5)), "open streams carry on")
      const { session, peer } = yield* againstRaw("server")
      yield* session.goAway()
      peer.send(frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0))
      yield* peer.waitFor((fs) => fs.some((f) => f.streamId === 1 && (f.flags & F.FLAG_RST) !== 0))
      assert.deepStrictEqual(goAwayCodes(peer.frames), [F.GO_AWAY_NORMAL])
    }))

  it.effect("closing the scope fails streams with SessionClosed and sends GoAway(normal)", () =>
    Effect.gen(function*() {
      const [a, b] = makeMemoryPair()
      const peer = rawPeer(b)
      const { stream, session } = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* Session.make(a, { role: "client" })
        const stream = yield* session.open()
        return { stream, session }
      }))
      assert.strictEqual((yield* Effect.flip(stream.read())).reason, "SessionClosed")
      assert.strictEqual((yield* Effect.flip(session.open())).reason, "SessionClosed")
      assert.isTrue(Exit.isSuccess(yield* Effect.exit(session.closed)))
      yield* peer.waitFor((fs) => goAwayCodes(fs).length > 0)
      assert.deepStrictEqual(goAwayCodes(peer.frames), [F.GO_AWAY_NORMAL])
      assert.isTrue(a.closed())
    }))

  it.effect("data received before the peer's FIN stays readable after the session ends", () =>
    Effect.gen(function*() {
      const { session, peer } = yield* againstRaw("server")
      peer.send(frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0), frame(F.TYPE_DATA, F.FLAG_FIN, 1, 0, pattern(10)))
      const s = yield* session.accept()
      peer.sendBytes(new Uint8Array([9, 9])) // a broken header start; then the peer goes away
      const got = yield* readAll(s)
      assert.isTrue(equalBytes(got, pattern(10)))
    }))

  describe("TestClock", () => {
    it.effect("keepalive: a ping not answered within the write timeout closes the session", () =>
      Effect.gen(function*() {
        const [a, b] = makeMemoryPair()
        const peer = rawPeer(b) // reads but never answers
        const client = yield* Session.make(a, { role: "client" })
        const closed = yield* Effect.forkChild(Effect.flip(client.closed))
        yield* TestClock.adjust(F.DEFAULT_KEEPALIVE_INTERVAL_MS)
        yield* peer.waitFor((fs) => fs.some((f) => f.type === F.TYPE_PING))
        assert.isUndefined(closed.pollUnsafe())
        yield* TestClock.adjust(F.DEFAULT_CONNECTION_WRITE_TIMEOUT_MS)
        assert.strictEqual((yield* Fiber.join(closed)).reason, "KeepAliveTimeout")
      }))

    it.effect("keepalive keeps a live session open", () =>
      Effect.gen(function*() {
        const { client } = yield* sessionPair()
        for (let i = 0; i < 5; i++) {
          yield* TestClock.adjust(F.DEFAULT_KEEPALIVE_INTERVAL_MS)
          for (let k = 0; k < 20; k++) yield* Effect.yieldNow
        }
        yield* TestClock.adjust(F.DEFAULT_CONNECTION_WRITE_TIMEOUT_MS)
        assert.strictEqual(client.core.outcome, undefined)
      }))

    it.effect("stream open timeout: no ACK in 75 s resets the stream", () =>
      Effect.gen(function*() {
        const { session, peer } = yield* againstRaw("client")
        const s = yield* session.open()
        const acked = yield* session.open()
        peer.send(frame(F.TYPE_WINDOW_UPDATE, F.FLAG_ACK, acked.id, 0))
        yield* peer.waitFor((fs) => fs.filter((f) => f.flags & F.FLAG_SYN).length === 2)
        yield* TestClock.adjust(F.DEFAULT_STREAM_OPEN_TIMEOUT_MS - 1)
        assert.isUndefined(s.core.error)
        yield* TestClock.adjust(1)
        yield* peer.waitFor((fs) => fs.some((f) => f.streamId === s.id && (f.flags & F.FLAG_RST) !== 0))
        assert.strictEqual((yield* Effect.flip(s.read())).reason, "OpenTimeout")
        assert.strictEqual((yield* Effect.flip(s.established())).reason, "OpenTimeout")
        assert.isUndefined(acked.core.error, "the acknowledged stream lives on")
        yield* acked.established()
      }))

    it.effect("write timeout: frames the transport does not take in 10 s end the session", () =>
      Effect.gen(function*() {
        const [a] = makeMemoryPair({ highWaterMark: 1024 }) // the other end never reads
        const session = yield* Session.make(a, { role: "client", config: { enableKeepAlive: false } })
        const s = yield* session.open()
        yield* Effect.forkChild(Effect.ignore(s.write(pattern(100_000))))
        const closed = yield* Effect.forkChild(Effect.flip(session.closed))
        for (let k = 0; k < 20; k++) yield* Effect.yieldNow
        yield* TestClock.adjust(F.DEFAULT_CONNECTION_WRITE_TIMEOUT_MS - 1)
        assert.isUndefined(closed.pollUnsafe())
        yield* TestClock.adjust(1)
        assert.strictEqual((yield* Fiber.join(closed)).reason, "WriteTimeout")
        assert.isTrue(a.closed())
      }))

    it.effect("ping(): no answer within the timeout fails with PingTimeout, the session carries on", () =>
      Effect.gen(function*() {
        const { session } = yield* againstRaw("client")
        const ping = yield* Effect.forkChild(Effect.flip(session.ping()))
        for (let k = 0; k < 5; k++) yield* Effect.yieldNow
        yield* TestClock.adjust(F.DEFAULT_CONNECTION_WRITE_TIMEOUT_MS)
        assert.strictEqual((yield* Fiber.join(ping)).reason, "PingTimeout")
        assert.strictEqual(session.core.outcome, undefined)
      }))
  })
})

describe("yamux Session: protocol violations end the session with GoAway(protocol error)", () => {
  const violations: ReadonlyArray<readonly [string, "client" | "server", ReadonlyArray<Uint8Array | F.Frame>]> = [
    ["bad version", "server", [Uint8Array.from([1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0])]],
    ["unknown type", "server", [Uint8Array.from([0, 7, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0])]],
    ["Data for a stream never opened", "server", [frame(F.TYPE_DATA, 0, 5, 0, pattern(3))]],
    ["WindowUpdate for a stream never opened", "client", [frame(F.TYPE_WINDOW_UPDATE, 0, 7, 10)]],
    ["SYN with our parity", "server", [frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 2, 0)]],
    ["SYN reusing a live id", "server", [
      frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0),
      frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0)
    ]],
    ["stream frame on id 0", "server", [frame(F.TYPE_DATA, 0, 0, 0, pattern(1))]],
    ["Ping on a stream id", "server", [frame(F.TYPE_PING, F.FLAG_SYN, 3, 1)]],
    ["unknown GoAway code", "server", [frame(F.TYPE_GO_AWAY, 0, 0, 9)]],
    ["Data beyond the receive window", "server", [
      frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0),
      frame(F.TYPE_DATA, 0, 1, 0, pattern(F.INITIAL_STREAM_WINDOW)),
      frame(F.TYPE_DATA, 0, 1, 0, pattern(1))
    ]],
    ["Data frame larger than the frame limit", "server", [
      Uint8Array.from([0, 0, 0, 1, 0, 0, 0, 1, 0x10, 0, 0, 0])
    ]]
  ]
  for (const [name, role, input] of violations) {
    it.effect(name, () =>
      Effect.gen(function*() {
        const { session, peer, conn } = yield* againstRaw(role)
        for (const x of input) {
          if (x instanceof Uint8Array) peer.sendBytes(x)
          else peer.send(x)
        }
        const err = yield* Effect.flip(session.closed)
        assert.strictEqual(err.reason, "ProtocolError")
        yield* peer.waitFor((fs) => goAwayCodes(fs).length > 0)
        assert.deepStrictEqual(goAwayCodes(peer.frames), [F.GO_AWAY_PROTOCOL_ERROR])
        yield* peer.waitFor(() => peer.ended())
        assert.isFalse(conn.closed() && false)
      }))
  }

  it.effect("frames for a stream that was closed or reset are discarded, as hashicorp/yamux does", () =>
    Effect.gen(function*() {
      const { session, peer } = yield* againstRaw("server")
      peer.send(frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 1, 0))
      const s = yield* session.accept()
      yield* s.reset()
      peer.send(frame(F.TYPE_DATA, 0, 1, 0, pattern(100)), frame(F.TYPE_WINDOW_UPDATE, 0, 1, 100))
      const mine = yield* session.open() // id 2
      yield* mine.reset()
      peer.send(frame(F.TYPE_DATA, F.FLAG_ACK, 2, 0, pattern(5)))
      peer.send(frame(F.TYPE_PING, F.FLAG_SYN, 0, 42))
      yield* peer.waitFor((fs) => fs.some((f) => f.type === F.TYPE_PING && f.length === 42))
      assert.strictEqual(session.core.outcome, undefined)
    }))

  it.effect("a SYN beyond maxPeerStreams is refused with RST and allocates nothing; our own opens are not counted", () =>
    Effect.gen(function*() {
      const { session, peer } = yield* againstRaw("client", { maxPeerStreams: 2 })
      const mine = [yield* session.open(), yield* session.open(), yield* session.open()]
      peer.send(...[2, 4, 6, 8].map((id) => frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, id, 0)))
      yield* peer.waitFor((fs) => fs.filter((f) => f.flags & F.FLAG_RST).length === 2)
      const reset = peer.frames.filter((f) => f.flags & F.FLAG_RST).map((f) => f.streamId)
      assert.deepStrictEqual(reset, [6, 8])
      assert.strictEqual(session.core.streamCount, mine.length + 2)
      // a peer stream that ends frees its place
      const first = yield* session.accept()
      yield* first.reset()
      peer.send(frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 10, 0))
      assert.strictEqual((yield* session.accept()).id, 4)
      assert.strictEqual((yield* session.accept()).id, 10)
      assert.strictEqual(session.core.outcome, undefined)
    }))

  it.effect("the peer's GoAway(normal) is told to onRemoteGoAway listeners once; our opens fail, streams carry on", () =>
    Effect.gen(function*() {
      const { session, peer } = yield* againstRaw("client")
      const s = yield* session.open()
      peer.send(frame(F.TYPE_WINDOW_UPDATE, F.FLAG_ACK, s.id, 0))
      let told = 0
      session.core.onRemoteGoAway(() => told++)
      peer.send(frame(F.TYPE_GO_AWAY, 0, 0, F.GO_AWAY_NORMAL), frame(F.TYPE_GO_AWAY, 0, 0, F.GO_AWAY_NORMAL))
      yield* peer.waitFor(() => told > 0)
      session.core.onRemoteGoAway(() => told++) // registered after: called at once
      assert.strictEqual(told, 2)
      assert.strictEqual((yield* Effect.flip(session.open())).reason, "RemoteGoAway")
      peer.send(frame(F.TYPE_DATA, F.FLAG_FIN, s.id, 3, pattern(3)))
      assert.isTrue(equalBytes(yield* readAll(s), pattern(3)))
    }))

  describe("peer rate limits (TestClock)", () => {
    it.effect("opens within the rate are served; a burst beyond it ends the session with GoAway(protocol error)", () =>
      Effect.gen(function*() {
        const { session, peer } = yield* againstRaw("client", { peerStreamOpenRate: { perSecond: 10, burst: 5 }, maxPeerStreams: 1 })
        let id = 2
        const syn = () => frame(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, (id += 2), 0)
        // 5 at once (the burst), then 10 per second for 3 s: all within the limit
        peer.send(syn(), syn(), syn(), syn(), syn())
        for (let i = 0; i < 30; i++) {
          yield* TestClock.adjust(100)
          peer.send(syn())
        }
        yield* peer.waitFor((fs) => fs.filter((f) => f.flags & F.FLAG_RST).length >= 34)
        assert.strictEqual(session.core.outcome, undefined)
        assert.deepStrictEqual(goAwayCodes(peer.frames), [])
        // then 6 in the same instant: one more than the bucket holds
        peer.send(syn(), syn(), syn(), syn(), syn(), syn())
        const error = yield* Effect.flip(session.closed)
        assert.strictEqual(error.reason, "StreamOpenRateExceeded")
        yield* peer.waitFor((fs) => goAwayCodes(fs).length > 0)
        assert.deepStrictEqual(goAwayCodes(peer.frames), [F.GO_AWAY_PROTOCOL_ERROR])
      }))

    it.effect("frames within the rate are served; more in one second end the session with GoAway(protocol error)", () =>
      Effect.gen(function*() {
        const { session, peer } = yield* againstRaw("client", { peerFrameRate: { perSecond: 100, burst: 100 } })
        const ping = (n: number) => frame(F.TYPE_PING, F.FLAG_SYN, 0, n)
        for (let second = 0; second < 3; second++) {
          peer.send(...Array.from({ length: 100 }, (_, i) => ping(second * 100 + i)))
          yield* peer.waitFor((fs) => fs.filter((f) => f.type === F.TYPE_PING).length === (second + 1) * 100)
          yield* TestClock.adjust(1_000)
        }
        assert.strictEqual(session.core.outcome, undefined)
        peer.send(...Array.from({ length: 101 }, (_, i) => ping(1_000 + i)))
        const error = yield* Effect.flip(session.closed)
        assert.strictEqual(error.reason, "FrameRateExceeded")
        yield* peer.waitFor((fs) => goAwayCodes(fs).length > 0)
        assert.deepStrictEqual(goAwayCodes(peer.frames), [F.GO_AWAY_PROTOCOL_ERROR])
      }))

    it.effect("the stream ids we open are never counted against the peer's open rate", () =>
      Effect.gen(function*() {
        const { session, peer } = yield* againstRaw("client", { peerStreamOpenRate: { perSecond: 1, burst: 1 } })
        for (let i = 0; i < 50; i++) {
          const s = yield* session.open()
          peer.send(frame(F.TYPE_WINDOW_UPDATE, F.FLAG_ACK, s.id, 0), frame(F.TYPE_DATA, F.FLAG_FIN, s.id, 0))
        }
        peer.send(frame(F.TYPE_PING, F.FLAG_SYN, 0, 7))
        yield* peer.waitFor((fs) => fs.some((f) => f.type === F.TYPE_PING && f.length === 7))
        assert.strictEqual(session.core.outcome, undefined)
      }))
  })

  it.effect("the peer's GoAway(protocol error) ends our session with RemoteError", () =>
    Effect.gen(function*() {
      const { session, peer } = yield* againstRaw("client")
      peer.send(frame(F.TYPE_GO_AWAY, 0, 0, F.GO_AWAY_PROTOCOL_ERROR))
      assert.strictEqual((yield* Effect.flip(session.closed)).reason, "RemoteError")
    }))
})
