/**
 * What a peer can make the control port hold before it authenticated, on real loopback sockets: the
 * `Hello` limit judged from the length prefix, the caps on handshakes in progress (in total and per
 * address), and the byte budget of a WebSocket `/tunnel` connection.
 */
import { assert, describe, it } from "@effect/vitest"
import * as net from "node:net"
import * as tls from "node:tls"
import { Context, Effect, Redacted } from "effect"
import { WebSocket } from "ws"
import { encodeHello, FrameHeaderBytes, makeHello } from "../../../src/domain/ControlMessage.ts"
import { ControlPort, type ControlPortConfig, type HandshakeRefusal } from "../../../src/services/front/ControlPort.ts"
import { LogSampler } from "../../../src/domain/LogSampler.ts"
import { makeHandshakeAdmission } from "../../../src/services/front/HandshakeAdmission.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"
import { gateway, grants, token } from "../../integration/tunnelHarness.ts"
import { makeCertificate } from "../ListenersFixtures.ts"

/** Longest wait for the gateway to act on a connection (real time). */
const ActTimeoutMs = 3_000

interface Peer {
  readonly socket: net.Socket
  /** Resolves (with the bytes received) once the connection closed; rejects after `ActTimeoutMs`. */
  readonly closed: () => Promise<Buffer>
  readonly isClosed: () => boolean
  /** Resolves once `n` bytes have been received; rejects after `ActTimeoutMs`. */
  readonly received: (n: number) => Promise<Buffer>
}

const connect = (port: number, localAddress = "127.0.0.1"): Promise<Peer> =>
  new Promise((resolve, reject) => {
    const chunks: Array<Buffer> = []
    let closed = false
    const waiters = new Set<() => void>()
    const socket = net.createConnection({ host: "127.0.0.1", port, localAddress })
    socket.on("data", (c: Buffer) => {
      chunks.push(c)
      for (const w of waiters) w()
    })
    socket.on("error", () => {})
    socket.on("close", () => {
      closed = true
      for (const w of waiters) w()
    })
    const until = (done: () => boolean, what: string) =>
      new Promise<Buffer>((res, rej) => {
        const check = () => {
          if (!done()) return
          waiters.delete(check)
          clearTimeout(timer)
          res(Buffer.concat(chunks))
        }
        const timer = setTimeout(() => {
          waiters.delete(check)
          rej(new Error(`${what} within ${ActTimeoutMs} ms`))
        }, ActTimeoutMs)
        waiters.add(check)
        check()
      })
    socket.once("connect", () =>
      resolve({
        socket,
        closed: () => until(() => closed, "the gateway did not close the connection"),
        isClosed: () => closed,
        received: (n) => until(() => chunks.reduce((a, c) => a + c.length, 0) >= n, `fewer than ${n} bytes arrived`)
      })
    )
    socket.once("error", reject)
  })

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

const withGateway = <A>(
  control: Partial<ControlPortConfig>,
  body: (port: number, rejected: Array<HandshakeRefusal>, control: ControlPort["Service"]) => Promise<A>
) =>
  Effect.gen(function*() {
    const before = activeHandles()
    const peers: Array<net.Socket> = []
    const result = yield* Effect.scoped(Effect.gen(function*() {
      const rejected: Array<HandshakeRefusal> = []
      const gw = yield* gateway({
        control: { address: { host: "127.0.0.1", port: 0 }, tokens: grants, onRejected: (r) => void rejected.push(r), ...control }
      })
      const port = Context.get(gw, ControlPort)
      return yield* Effect.promise(() => body(port.address.port!, rejected, port).finally(() => peers.forEach((p) => p.destroy())))
    }))
    yield* Effect.promise(() => expectNoLeaks(before))
    return result
  })

/** A length prefix announcing a body of `n` bytes. */
const prefix = (n: number) => {
  const b = Buffer.alloc(FrameHeaderBytes)
  b.writeUInt32BE(n)
  return b
}

const replyOf = (bytes: Buffer) => JSON.parse(bytes.subarray(FrameHeaderBytes).toString()) as Record<string, unknown>

describe("ControlPort before authentication", () => {
  it.live("answers failed authentications from one address later and later, then refuses the address; others are unaffected", () =>
    withGateway({ authThrottle: { freeFailures: 1, baseDelayMs: 200, maxDelayMs: 1_000, refuseAfter: 3 } }, async (port, rejected) => {
      const guess = async (localAddress: string) => {
        const peer = await connect(port, localAddress)
        peer.socket.write(encodeHello(makeHello(Redacted.make("wrong-token"), [])))
        const started = Date.now()
        const bytes = await peer.closed()
        return { ms: Date.now() - started, reply: bytes.length > 0 ? replyOf(bytes) : undefined }
      }
      const first = await guess("127.0.0.1")
      assert.strictEqual(first.reply?.reason, "BadToken")
      const second = await guess("127.0.0.1")
      assert.strictEqual(second.reply?.reason, "BadToken")
      assert.isAtLeast(second.ms, 200)
      const third = await guess("127.0.0.1")
      assert.strictEqual(third.reply?.reason, "BadToken")
      assert.isAtLeast(third.ms, 400)
      // the address has failed too often: closed before anything is read, no reply
      const refused = await guess("127.0.0.1")
      assert.isUndefined(refused.reply)
      assert.include(rejected, "TooManyFailures")
      // another address authenticates as usual
      const good = await connect(port, "127.0.0.2")
      good.socket.write(encodeHello(makeHello(Redacted.make(token), [])))
      assert.strictEqual(replyOf(await good.received(FrameHeaderBytes + 2))._tag, "Welcome")
      good.socket.destroy()
    }))

  it.live("closes a connection whose Hello announces 1 MiB right after its length prefix, before any body byte", () =>
    withGateway({}, async (port, rejected) => {
      const peer = await connect(port)
      // only the four bytes of the prefix: the gateway must decide on them alone
      peer.socket.write(prefix(1024 * 1024))
      const started = Date.now()
      await peer.closed()
      assert.isBelow(Date.now() - started, ActTimeoutMs)
      assert.deepStrictEqual(rejected, ["HelloTooLarge"])
      // a peer that goes on sending the body finds the connection closed long before 1 MiB is out
      const second = await connect(port)
      second.socket.write(prefix(1024 * 1024))
      let written = 0
      const chunk = Buffer.alloc(16 * 1024, 0x61)
      while (!second.isClosed() && written < 1024 * 1024) {
        second.socket.write(chunk)
        written += chunk.length
        await sleep(5)
      }
      await second.closed()
      assert.isBelow(written, 1024 * 1024)
    }))

  it.live("refuses a Hello over a configured maxHelloBytes and accepts one under it", () =>
    withGateway({ maxHelloBytes: 2048 }, async (port, rejected) => {
      const under = encodeHello(makeHello(Redacted.make(token), [], "x".repeat(900)))
      const over = encodeHello(makeHello(Redacted.make("t".repeat(3000)), []))
      assert.isBelow(under.length, 2048)
      assert.isAbove(over.length, 2048 + FrameHeaderBytes)
      const refused = await connect(port)
      refused.socket.write(over)
      await refused.closed()
      assert.deepStrictEqual(rejected, ["HelloTooLarge"])
      const accepted = await connect(port)
      accepted.socket.write(under)
      const answer = await accepted.received(FrameHeaderBytes + 1)
      accepted.socket.destroy()
      assert.include(answer.subarray(FrameHeaderBytes).toString(), "Welcome")
    }))

  it.live("closes connections beyond the per-address cap at once; other addresses still authenticate", () =>
    withGateway({ maxHandshakesPerAddress: 3, maxHandshakes: 100 }, async (port, rejected, control) => {
      const held: Array<Peer> = []
      for (let i = 0; i < 3; i++) held.push(await connect(port, "127.0.0.2"))
      const extra = [await connect(port, "127.0.0.2"), await connect(port, "127.0.0.2")]
      for (const e of extra) assert.strictEqual((await e.closed()).length, 0)
      assert.deepStrictEqual(rejected, ["TooManyHandshakesFromAddress", "TooManyHandshakesFromAddress"])
      await sleep(50)
      for (const h of held) assert.isFalse(h.isClosed())
      // a legitimate backend from another address gets its session
      const backend = await connect(port, "127.0.0.1")
      backend.socket.write(encodeHello(makeHello(Redacted.make(token), [])))
      const reply = await backend.received(FrameHeaderBytes + 2)
      assert.strictEqual(replyOf(reply)._tag, "Welcome")
      assert.strictEqual(control.sessions(), 1)
      // once one of the held connections goes, its address has room again
      held[0]!.socket.destroy()
      await sleep(50)
      const again = await connect(port, "127.0.0.2")
      await sleep(100)
      assert.isFalse(again.isClosed())
      for (const p of [...held, again, backend]) p.socket.destroy()
    }))

  it.live("closes connections beyond the total cap at once, whatever their address", () =>
    withGateway({ maxHandshakesPerAddress: 2, maxHandshakes: 3 }, async (port, rejected) => {
      const held = [await connect(port, "127.0.0.2"), await connect(port, "127.0.0.2"), await connect(port, "127.0.0.3")]
      const extra = await connect(port, "127.0.0.4")
      await extra.closed()
      assert.deepStrictEqual(rejected, ["TooManyHandshakes"])
      await sleep(50)
      for (const h of held) assert.isFalse(h.isClosed())
      for (const h of held) h.socket.destroy()
    }))

  it.live("gives a handshake's place back once it authenticated", () =>
    withGateway({ maxHandshakesPerAddress: 1, maxHandshakes: 1 }, async (port, rejected, control) => {
      const peers: Array<Peer> = []
      for (let i = 0; i < 3; i++) {
        const peer = await connect(port)
        peer.socket.write(encodeHello(makeHello(Redacted.make(token), [])))
        assert.strictEqual(replyOf(await peer.received(FrameHeaderBytes + 2))._tag, "Welcome")
        peers.push(peer)
      }
      assert.strictEqual(control.sessions(), 3)
      assert.deepStrictEqual(rejected, [])
      for (const p of peers) p.socket.destroy()
    }))

  it.live("counts TLS handshakes in progress: beyond the cap a connection is closed before its TLS handshake", () => {
    const cert = makeCertificate("gateway.test")
    return withGateway({ tls: cert, maxHandshakesPerAddress: 2, maxHandshakes: 100 }, async (port, rejected) => {
      // raw TCP connections that never start TLS hold their places
      const held = [await connect(port, "127.0.0.2"), await connect(port, "127.0.0.2")]
      const extra = await connect(port, "127.0.0.2")
      await extra.closed()
      assert.deepStrictEqual(rejected, ["TooManyHandshakesFromAddress"])
      // a backend from another address completes TLS and authenticates
      const reply = await new Promise<Buffer>((resolve, reject) => {
        const socket = tls.connect({ host: "127.0.0.1", port, servername: "gateway.test", ca: cert.cert }, () =>
          socket.write(encodeHello(makeHello(Redacted.make(token), []))))
        const chunks: Array<Buffer> = []
        const timer = setTimeout(() => reject(new Error("no answer over TLS")), ActTimeoutMs)
        socket.on("data", (c: Buffer) => {
          chunks.push(c)
          clearTimeout(timer)
          socket.destroy()
          resolve(Buffer.concat(chunks))
        })
        socket.on("error", reject)
      })
      assert.strictEqual(replyOf(reply)._tag, "Welcome")
      for (const h of held) assert.isFalse(h.isClosed())
      for (const h of held) h.socket.destroy()
    })
  })

  it.live("terminates a WebSocket /tunnel connection that sends more than its budget before authenticating", () =>
    withGateway(
      { maxHelloBytes: 4096, websocket: { address: { host: "127.0.0.1", port: 0 } } },
      async (_port, rejected, control) => {
        const url = `ws://127.0.0.1:${control.webSocketAddress!.port}/tunnel`
        const open = (): Promise<WebSocket> =>
          new Promise((resolve, reject) => {
            const ws = new WebSocket(url, { perMessageDeflate: false })
            ws.once("open", () => resolve(ws))
            ws.once("error", reject)
          })
        const closedWithin = (ws: WebSocket) =>
          new Promise<void>((resolve, reject) => {
            const timer = setTimeout(() => reject(new Error(`not closed within ${ActTimeoutMs} ms`)), ActTimeoutMs)
            ws.once("close", () => {
              clearTimeout(timer)
              resolve()
            })
          })
        // a text message is refused as soon as its first frame header is read, never assembled
        const text = await open()
        text.on("error", () => {})
        const textCode = new Promise<number>((resolve) => text.once("close", (code) => resolve(code)))
        const textClosed = closedWithin(text)
        text.send("a".repeat(512 * 1024))
        await textClosed
        assert.strictEqual(await textCode, 1003)
        assert.deepStrictEqual(rejected, [])
        // a binary Hello announcing 1 MiB is refused from its length prefix
        const binary = await open()
        binary.on("error", () => {})
        const binaryClosed = closedWithin(binary)
        binary.send(Buffer.concat([prefix(1024 * 1024), Buffer.alloc(200 * 1024)]))
        await binaryClosed
        assert.strictEqual(rejected.length, 1, rejected.join(","))
        assert.include(["HelloTooLarge", "PreAuthBudget"], rejected[0])
        // a backend within the budget authenticates over the same path
        const good = await open()
        const reply = new Promise<Buffer>((resolve) => good.once("message", (data) => resolve(data as Buffer)))
        good.send(encodeHello(makeHello(Redacted.make(token), [])))
        assert.strictEqual(replyOf(await reply)._tag, "Welcome")
        good.terminate()
      }
    ))
})

describe("HandshakeAdmission", () => {
  it("admits up to the caps, per address and in total, and takes tickets back once", () => {
    const admission = makeHandshakeAdmission({ maxHandshakes: 3, maxHandshakesPerAddress: 2 })
    const a1 = admission.admit("a")
    const a2 = admission.admit("a")
    assert.strictEqual(admission.admit("a"), "TooManyHandshakesFromAddress")
    const b1 = admission.admit("b")
    assert.strictEqual(admission.admit("c"), "TooManyHandshakes")
    assert.strictEqual(admission.inProgress(), 3)
    if (typeof a1 === "string" || typeof a2 === "string" || typeof b1 === "string") throw new Error("not admitted")
    a1.release()
    a1.release()
    assert.strictEqual(admission.inProgress(), 2)
    assert.notStrictEqual(typeof admission.admit("a"), "string")
    a2.release()
    b1.release()
    assert.strictEqual(admission.addresses(), 1)
  })

  it("samples log lines: the first, then one per interval carrying how many were left out", () => {
    const sampler = new LogSampler(1000)
    assert.strictEqual(sampler.take("a", 0), 0)
    assert.strictEqual(sampler.take("a", 0), undefined)
    assert.strictEqual(sampler.take("b", 0), 0)
    assert.strictEqual(sampler.take("a", 500), undefined)
    assert.strictEqual(sampler.take("a", 1000), 2)
    assert.strictEqual(sampler.take("a", 5000), 0)
  })
})
