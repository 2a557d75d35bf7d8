import * as net from "node:net"
import { PassThrough } from "node:stream"
import { afterEach, describe, expect, it } from "vitest"
import { flushTurn, writeAtTurnEnd } from "../../../src/services/forward/TurnWrites.ts"

const opened: Array<net.Socket | net.Server> = []
afterEach(() => {
  for (const o of opened.splice(0)) o instanceof net.Server ? o.close() : o.destroy()
})

/** A loopback connection: the writing side, and a promise of everything the other side reads until it closes. */
const pair = async (): Promise<{ writer: net.Socket; received: Promise<string> }> => {
  let resolveReceived!: (s: string) => void
  const received = new Promise<string>((r) => (resolveReceived = r))
  const server = net.createServer((s) => {
    opened.push(s)
    let got = ""
    s.setEncoding("latin1")
    s.on("data", (d: string) => (got += d))
    s.on("close", () => resolveReceived(got))
    s.on("error", () => {})
  })
  opened.push(server)
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r))
  const writer = net.connect((server.address() as net.AddressInfo).port, "127.0.0.1")
  opened.push(writer)
  writer.on("error", () => {})
  await new Promise<void>((r) => writer.once("connect", r))
  return { writer, received }
}

const turnEnd = () => new Promise<void>((r) => setImmediate(r))

describe("TurnWrites", () => {
  it("holds the writes of a turn until its end, in order, then writes them together", async () => {
    const a = await pair()
    const b = await pair()
    writeAtTurnEnd(a.writer, Buffer.from("one "))
    writeAtTurnEnd(b.writer, Buffer.from("other"))
    writeAtTurnEnd(a.writer, Buffer.from("two"))
    expect(a.writer.writableCorked).toBe(1)
    expect(a.writer.writableLength).toBe(7)
    expect(b.writer.writableLength).toBe(5)
    await turnEnd()
    expect(a.writer.writableCorked).toBe(0)
    expect(a.writer.writableLength).toBe(0)
    expect(b.writer.writableLength).toBe(0)
    a.writer.end()
    b.writer.end()
    expect(await a.received).toBe("one two")
    expect(await b.received).toBe("other")
  })

  it("a socket destroyed after flushTurn still delivers what the turn wrote", async () => {
    const a = await pair()
    writeAtTurnEnd(a.writer, Buffer.from("answer"))
    flushTurn(a.writer)
    a.writer.destroy()
    expect(await a.received).toBe("answer")
  })

  it("without flushTurn, destroying in the same turn would lose the bytes (why the engine flushes first)", async () => {
    const a = await pair()
    writeAtTurnEnd(a.writer, Buffer.from("answer"))
    a.writer.destroy()
    expect(await a.received).toBe("")
    await turnEnd() // the turn's flush finds a destroyed socket and does nothing
  })

  it("ending a socket writes what the turn held before the end", async () => {
    const a = await pair()
    writeAtTurnEnd(a.writer, Buffer.from("last words"))
    a.writer.end()
    expect(await a.received).toBe("last words")
  })

  it("writes to a socket corked by its owner join that cork and leave with it", async () => {
    const a = await pair()
    a.writer.cork()
    a.writer.write("head ")
    writeAtTurnEnd(a.writer, Buffer.from("body"))
    expect(a.writer.writableCorked).toBe(1)
    a.writer.uncork()
    expect(a.writer.writableLength).toBe(0)
    a.writer.end()
    expect(await a.received).toBe("head body")
  })

  it("writes to a stream that is not a socket at once (a tunnel stream batches its own frames)", () => {
    const stream = new PassThrough()
    writeAtTurnEnd(stream, Buffer.from("frame"))
    expect(stream.writableCorked).toBe(0)
    expect(String(stream.read())).toBe("frame")
  })
})
