/**
 * The Connection contract, for the in-memory pair and for Node sockets (TCP and Unix) bound through
 * NodeTransport: ordered delivery, pause/resume, drain-aware writes, half-close, destroy, no leaks.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Queue } from "effect"
import * as fs from "node:fs"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import * as NodeTransport from "../../src/runtime/NodeTransport.ts"
import { type Address, type Connection, makeMemoryPair, writeEffect } from "../../src/services/Transport.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { makeCertificate } from "./ListenersFixtures.ts"

interface Probe {
  readonly bytes: () => number
  readonly data: Array<Uint8Array>
  readonly ended: () => boolean
  readonly closed: () => boolean
  readonly closeError: () => unknown
}

const probe = (conn: Connection): Probe => {
  const data: Array<Uint8Array> = []
  let ended = false
  let closed = false
  let closeError: unknown
  conn.start({
    onData: (c) => {
      data.push(c)
    },
    onEnd: () => {
      ended = true
    },
    onClose: (e) => {
      closed = true
      closeError = e
    }
  })
  return {
    data,
    bytes: () => data.reduce((n, c) => n + c.length, 0),
    ended: () => ended,
    closed: () => closed,
    closeError: () => closeError
  }
}

const turns = (n: number) =>
  Effect.promise(async () => {
    for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r))
  })

const until = (pred: () => boolean, what: string) =>
  Effect.promise(async () => {
    for (let i = 0; i < 5_000 && !pred(); i++) await new Promise((r) => setTimeout(r, 1))
    if (!pred()) throw new Error(`timed out waiting for ${what}`)
  })

/** The contract every connection pair must meet. */
const contract = (pair: Effect.Effect<readonly [Connection, Connection], never, import("effect").Scope.Scope>) =>
  Effect.gen(function*() {
    const [a, b] = yield* pair
    const pa = probe(a)
    const pb = probe(b)
    // ordered delivery in both directions
    yield* writeEffect(a, [Buffer.from("hel"), Buffer.from("lo")])
    yield* writeEffect(b, [Buffer.from("back")])
    yield* until(() => pb.bytes() === 5 && pa.bytes() === 4, "delivery")
    assert.strictEqual(Buffer.concat(pb.data).toString(), "hello")
    assert.strictEqual(Buffer.concat(pa.data).toString(), "back")
    // paused: nothing is delivered; resume delivers everything, in order
    b.pause()
    yield* turns(5)
    const big = Buffer.alloc(256 * 1024, 7)
    a.write([big], () => {})
    yield* turns(20)
    assert.strictEqual(pb.bytes(), 5, "no data while paused")
    b.resume()
    yield* until(() => pb.bytes() === 5 + big.length, "data after resume")
    // half-close: the other side sees end and can still write back
    a.end()
    yield* until(() => pb.ended(), "end")
    yield* writeEffect(b, [Buffer.from("after")])
    yield* until(() => pa.bytes() === 9, "write after the peer's end")
    b.end()
    yield* until(() => pa.closed() && pb.closed(), "close after both ends")
    assert.isTrue(a.closed() && b.closed())
    const err = yield* Effect.flip(writeEffect(a, [Buffer.from("x")]))
    assert.strictEqual(err.reason, "Closed")
  })

const tcpPair = (address: Address) =>
  Effect.gen(function*() {
    const accepted = yield* Queue.bounded<Connection>(1)
    const bound = yield* NodeTransport.listen(address, (c) => {
      Queue.offerUnsafe(accepted, c)
    }).pipe(Effect.orDie)
    const dialed = yield* NodeTransport.dial(bound).pipe(Effect.orDie)
    const server = yield* Queue.take(accepted)
    return [dialed, server] as const
  })

/** A TLS listener with `cert` and a dial that trusts it (as `gateway.test`). */
const tlsPair = (cert: { readonly cert: string; readonly key: string }) =>
  Effect.gen(function*() {
    const accepted = yield* Queue.bounded<Connection>(1)
    const bound = yield* NodeTransport.listen({ host: "127.0.0.1", port: 0, tls: cert }, (c) => {
      Queue.offerUnsafe(accepted, c)
    }).pipe(Effect.orDie)
    const dialed = yield* NodeTransport.dial({ ...bound, tls: { ca: cert.cert, servername: "gateway.test" } }).pipe(Effect.orDie)
    const server = yield* Queue.take(accepted)
    return [dialed, server] as const
  })

const unixPath = () => path.join(fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-transport-")), "t.sock")

describe("Transport", () => {
  it.live("memory pair meets the Connection contract", () => contract(Effect.sync(() => makeMemoryPair())))

  it.live("memory pair: write completion waits while the reader is paused beyond the high-water mark", () =>
    Effect.gen(function*() {
      const [a, b] = makeMemoryPair({ highWaterMark: 1000 })
      const pb = probe(b)
      b.pause()
      let done = false
      a.write([new Uint8Array(5000)], () => {
        done = true
      })
      yield* turns(10)
      assert.isFalse(done)
      b.resume()
      yield* until(() => done, "drain")
      assert.strictEqual(pb.bytes(), 5000)
      a.destroy()
      yield* until(() => pb.closed(), "close")
      assert.isDefined(pb.closeError(), "the destroyed side's peer sees an error")
    }))

  for (const [kind, address] of [["TCP", () => ({ host: "127.0.0.1", port: 0 })], ["Unix", () => ({ path: unixPath() })]] as const) {
    it.live(`${kind}: Node sockets meet the Connection contract and leave nothing open`, () =>
      Effect.gen(function*() {
        const before = activeHandles()
        yield* Effect.scoped(contract(tcpPair(address())))
        yield* Effect.promise(() => expectNoLeaks(before))
      }))

    it.live(`${kind}: a paused reader makes the writer wait for drain (read backpressure reaches the sender)`, () =>
      Effect.gen(function*() {
        const before = activeHandles()
        yield* Effect.scoped(Effect.gen(function*() {
          const [a, b] = yield* tcpPair(address())
          probe(a)
          const pb = probe(b)
          b.pause()
          let pendingWrites = 0
          let sent = 0
          const chunk = Buffer.alloc(64 * 1024)
          // keep writing until the transport says to wait, bounded
          while (sent < 256 * 1024 * 1024) {
            let done = false
            a.write([chunk], () => {
              done = true
            })
            sent += chunk.length
            yield* turns(1)
            if (!done) {
              pendingWrites++
              break
            }
          }
          assert.strictEqual(pendingWrites, 1, "the writer was told to wait")
          assert.isBelow(pb.bytes(), 1, "nothing was delivered while paused")
          b.resume()
          yield* until(() => pb.bytes() === sent, "everything after resume")
        }))
        yield* Effect.promise(() => expectNoLeaks(before))
      }))
  }

  it.live("fromSocket delivers bytes read before the wrap (a handshake's leftovers) first", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.scoped(Effect.gen(function*() {
        const server = net.createServer({ allowHalfOpen: true })
        yield* Effect.acquireRelease(
          Effect.promise(() => new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()))),
          () => Effect.promise(() => new Promise<void>((r) => server.close(() => r())))
        )
        const connection = new Promise<net.Socket>((r) => server.once("connection", r))
        const a = yield* NodeTransport.dial({ host: "127.0.0.1", port: (server.address() as net.AddressInfo).port })
          .pipe(Effect.orDie)
        const raw = yield* Effect.promise(() => connection)
        yield* Effect.addFinalizer(() => Effect.sync(() => raw.destroy()))
        const b = NodeTransport.fromSocket(raw, { head: Buffer.from("pre") })
        const pb = probe(b)
        yield* writeEffect(a, [Buffer.from("fix")])
        yield* until(() => pb.bytes() === 6, "head then data")
        assert.strictEqual(Buffer.concat(pb.data).toString(), "prefix")
      }))
      yield* Effect.promise(() => expectNoLeaks(before))
    }))

  it.live("listening on an address in use is a typed error, and leaves nothing open", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.scoped(Effect.gen(function*() {
        const bound = yield* NodeTransport.listen({ host: "127.0.0.1", port: 0 }, () => {}).pipe(Effect.orDie)
        const err = yield* Effect.flip(Effect.scoped(NodeTransport.listen(bound, () => {})))
        assert.strictEqual(err.reason, "Listen")
      }))
      yield* Effect.promise(() => expectNoLeaks(before))
    }))

  it.live("TLS: a listener with a certificate and a dial that trusts it meet the Connection contract and leave nothing open", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.scoped(contract(tlsPair(makeCertificate("gateway.test"))))
      yield* Effect.promise(() => expectNoLeaks(before))
    }))

  it.live("TLS: a dial that does not trust the certificate, or names another host, is a typed error; a plain client never reaches the listener", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      const cert = makeCertificate("gateway.test")
      yield* Effect.scoped(Effect.gen(function*() {
        let accepted = 0
        const bound = yield* NodeTransport.listen({ host: "127.0.0.1", port: 0, tls: cert }, (c) => {
          accepted++
          c.destroy()
        }).pipe(Effect.orDie)
        const untrusted = yield* Effect.flip(Effect.scoped(NodeTransport.dial({ ...bound, tls: { servername: "gateway.test" } })))
        assert.strictEqual(untrusted.reason, "Dial")
        assert.match(untrusted.message, /self-signed certificate/)
        const otherName = yield* Effect.flip(Effect.scoped(NodeTransport.dial({ ...bound, tls: { ca: cert.cert, servername: "elsewhere.test" } })))
        assert.strictEqual(otherName.reason, "Dial")
        assert.match(otherName.message, /elsewhere\.test/)
        // bytes that are not TLS: the socket is closed, nothing reaches onConnection
        const closed = yield* Effect.promise(() =>
          new Promise<string>((resolve) => {
            const socket = net.connect({ host: "127.0.0.1", port: bound.port! }, () => socket.write("\0\0\0\x05hello"))
            const chunks: Array<Buffer> = []
            socket.on("data", (c: Buffer) => chunks.push(c))
            socket.on("error", () => {})
            socket.on("close", () => resolve(Buffer.concat(chunks).toString("latin1")))
          })
        )
        assert.notInclude(closed, "hello")
        assert.strictEqual(accepted, 0)
        // the listener still serves a client that trusts it
        const good = yield* NodeTransport.dial({ ...bound, tls: { ca: cert.cert, servername: "gateway.test" } }).pipe(Effect.orDie)
        yield* until(() => accepted === 1, "the trusted client to be accepted")
        good.destroy()
        const keyless = yield* Effect.flip(Effect.scoped(NodeTransport.listen({ host: "127.0.0.1", port: 0, tls: { cert: cert.cert } }, () => {})))
        assert.strictEqual(keyless.reason, "Listen")
      }))
      yield* Effect.promise(() => expectNoLeaks(before))
    }))

  it.live("dial failure is a typed error", () =>
    Effect.gen(function*() {
      const err = yield* Effect.flip(Effect.scoped(NodeTransport.dial({ path: "/nonexistent/switchyard.sock" })))
      assert.strictEqual(err.reason, "Dial")
    }))
})
