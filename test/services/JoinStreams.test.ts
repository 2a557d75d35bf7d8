/**
 * A local service joined with a yamux stream through one reused read buffer (`joinReading`), over real
 * loopback TCP both for the session and the local service: every byte arrives once and in order while
 * the far reader stalls (so the stream's window closes and reads are held), uploads and half-closes go
 * through, and nothing is left open afterwards; the same for `joinStreams` (a raw TCP route); bytes
 * queued toward a side that does not read are given up after the linger time; a stream already reset
 * is not joined.
 */
import { afterEach, beforeEach, describe, expect, it } from "vitest"
import * as net from "node:net"
import { joinReading, joinStreams } from "../../src/services/JoinStreams.ts"
import type { StreamSocket } from "../../src/services/yamux/StreamDuplex.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { freePort } from "../support/ports.ts"
import { equalBytes, pattern, tcpSessions } from "./yamux/harness.ts"

/** Longest any step may take. */
const StepMs = 20_000

const within = <A>(what: string, promise: Promise<A>): Promise<A> =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what}: nothing within ${StepMs} ms`)), StepMs)
    promise.then((a) => (clearTimeout(timer), resolve(a)), (e) => (clearTimeout(timer), reject(e)))
  })

/** A local service that sends `download` (in chunks of varied sizes), then ends; it keeps what it receives. */
const localService = async (download: Uint8Array) => {
  const sockets = new Set<net.Socket>()
  let uploaded!: (bytes: Buffer) => void
  const upload = new Promise<Buffer>((resolve) => (uploaded = resolve))
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    sockets.add(socket)
    const received: Array<Buffer> = []
    socket.on("data", (d: Buffer) => received.push(d))
    socket.on("end", () => uploaded(Buffer.concat(received)))
    let at = 0
    let size = 1
    const more = () => {
      while (at < download.length) {
        size = (size * 7 + 13) % 200_000 + 1
        const part = download.subarray(at, at + size)
        at += part.length
        if (!socket.write(part)) return void socket.once("drain", more)
      }
      socket.end()
    }
    more()
  })
  const port = await new Promise<number>((r) => server.listen(0, "127.0.0.1", () => r((server.address() as net.AddressInfo).port)))
  const close = () =>
    new Promise<void>((r) => {
      for (const s of sockets) s.destroy()
      server.close(() => r())
    })
  return { port, uploaded: upload, close }
}

/**
 * Reads `socket` to its end, stalling now and then so that the stream's window closes, and once for
 * 300 ms past 6 MiB, so that the local service has sent everything (and ended) while the rest waits.
 */
const readStalling = (socket: StreamSocket): Promise<Buffer> =>
  new Promise((resolve, reject) => {
    const parts: Array<Buffer> = []
    let n = 0
    let total = 0
    let stalled = false
    socket.on("data", (d: Buffer) => {
      parts.push(d)
      total += d.length
      if (!stalled && total > 6 * 1024 * 1024) {
        stalled = true
        socket.pause()
        setTimeout(() => socket.resume(), 300)
      } else if (++n % 16 === 0) {
        socket.pause()
        setTimeout(() => socket.resume(), 5)
      }
    })
    socket.once("end", () => resolve(Buffer.concat(parts)))
    socket.once("error", reject)
  })

let before: HandleCounts
beforeEach(() => {
  before = activeHandles()
})
afterEach(async () => {
  await expectNoLeaks(before)
})

describe("joinReading: a local service joined with a yamux stream", () => {
  /**
   * Downloads 8 MiB from a local service through a stalling reader while uploading `uploadBytes`, the
   * local connection joined by `join` (which calls its `onClose` when both ends are done): every byte
   * arrives in order both ways; returns how many times `onClose` was called.
   */
  const transfer = async (uploadBytes: number, join: (stream: StreamSocket, port: number, onClose: () => void) => void): Promise<number> => {
    const download = pattern(8 * 1024 * 1024, 21)
    const upload = pattern(uploadBytes, 22)
    const local = await localService(download)
    const { client, server, close } = await tcpSessions()
    let closed = 0
    const joined = new Promise<void>((resolve) => {
      server.onSocket((stream) => join(stream, local.port, () => (closed++, resolve())))
    })
    const far = client.openSocket()
    const downloaded = readStalling(far)
    far.end(Buffer.from(upload))
    expect(equalBytes(await within("download", downloaded), download)).toBe(true)
    expect(equalBytes(await within("upload", local.uploaded), upload)).toBe(true)
    await within("close", joined)
    far.destroy()
    await close()
    await local.close()
    return closed
  }

  it("8 MiB down through a stalling reader and 3 MiB up arrive whole; both ends close once", async () => {
    const closed = await transfer(3 * 1024 * 1024, (stream, port, onClose) => {
      joinReading(stream, (onread) => net.createConnection({ host: "127.0.0.1", port, allowHalfOpen: true, onread }), onClose)
    })
    expect(closed).toBe(1)
  })

  it("joinStreams (a raw TCP route): both ends finish before either is destroyed, so nothing queued is dropped", async () => {
    const closed = await transfer(1024 * 1024, (stream, port, onClose) => {
      joinStreams(stream, net.createConnection({ host: "127.0.0.1", port, allowHalfOpen: true }), onClose)
    })
    expect(closed).toBe(1)
  })

  it("a public client that sent its data and left while the far side does not read: both are let go after the linger time", async () => {
    const { client, server, close } = await tcpSessions()
    // the tunnel's far side half-closes at once and never reads
    const far = client.openSocket()
    far.on("error", () => {})
    far.pause()
    far.end()
    const stream = await within("the stream", new Promise<StreamSocket>((resolve) => server.onSocket(resolve)))
    stream.on("error", () => {})
    let released = 0
    const front = net.createServer({ allowHalfOpen: true }, (socket) => joinStreams(socket, stream, () => released++, 300))
    const port = await new Promise<number>((r) => front.listen(0, "127.0.0.1", () => r((front.address() as net.AddressInfo).port)))
    // more than the stream's window, then FIN; it reads the far side's FIN and leaves
    await within("the public client", new Promise<void>((resolve) => {
      const c = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true })
      c.on("error", () => {})
      c.end(Buffer.alloc(270 * 1024, 1))
      c.resume()
      c.on("end", () => c.destroy())
      c.on("close", () => resolve())
    }))
    await within("the release", (async () => {
      while (released === 0) await new Promise((r) => setTimeout(r, 20))
    })())
    expect(released).toBe(1)
    expect(stream.destroyed).toBe(true)
    far.destroy()
    await close()
    await new Promise((r) => front.close(r))
  })

  it("a stream reset before it is joined: the local connection is closed at once and onClose runs", async () => {
    const local = await localService(pattern(1000, 5))
    const { client, server, close } = await tcpSessions()
    const accepted = new Promise<StreamSocket>((resolve) => server.onSocket(resolve))
    const far = client.openSocket()
    far.write("x")
    const stream = await within("the stream", accepted)
    stream.on("error", () => stream.destroy())
    const gone = new Promise<void>((resolve) => stream.once("close", () => resolve()))
    far.destroy()
    await within("the reset", gone)
    let closed = 0
    const socket = joinReading(stream, (onread) => net.createConnection({ host: "127.0.0.1", port: local.port, allowHalfOpen: true, onread }), () => closed++)
    expect(closed).toBe(1)
    expect(socket.destroyed).toBe(true)
    await close()
    await local.close()
  })

  it("a local service that fails the connection ends the stream", async () => {
    const refused = await freePort()
    const { client, server, close } = await tcpSessions()
    const joined = new Promise<void>((resolve) => {
      server.onSocket((stream) => {
        const local = joinReading(stream, (onread) => net.createConnection({ host: "127.0.0.1", port: refused, allowHalfOpen: true, onread }), resolve)
        local.on("error", () => {})
      })
    })
    const far = client.openSocket()
    const ended = new Promise<void>((resolve) => {
      far.on("error", () => resolve())
      far.on("close", () => resolve())
      far.resume()
    })
    await within("join closed", joined)
    await within("far end closed", ended)
    await close()
  })
})
