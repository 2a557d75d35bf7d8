import { describe, expect, it } from "@effect/vitest"
import { WebSocket, WebSocketServer } from "ws"
import type * as net from "node:net"
import { BodyFrameWriter } from "../../../src/services/client/BodyFrameWriter.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"

/** A ws server collecting raw frame headers and messages, and a client connected to it. */
const pair = async () => {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0, perMessageDeflate: false })
  await new Promise<void>((resolve) => wss.once("listening", () => resolve()))
  const messages: Array<{ data: Buffer; isBinary: boolean }> = []
  const raw: Array<Buffer> = []
  wss.on("connection", (peer, req) => {
    req.socket.prependListener("data", (d: Buffer) => void raw.push(Buffer.from(d)))
    peer.on("message", (data, isBinary) => void messages.push({ data: data as Buffer, isBinary }))
  })
  const port = (wss.address() as net.AddressInfo).port
  const ws = new WebSocket(`ws://127.0.0.1:${port}`, { perMessageDeflate: false })
  await new Promise<void>((resolve) => ws.once("open", () => resolve()))
  const close = async () => {
    ws.terminate()
    for (const c of wss.clients) c.terminate()
    await new Promise<void>((resolve) => wss.close(() => resolve()))
  }
  return { ws, messages, raw, close }
}

const until = async (what: string, cond: () => boolean) => {
  const deadline = Date.now() + 3000
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 5))
  }
}

describe("BodyFrameWriter", () => {
  it("sends one binary message in masked frames that a ws server reassembles, between ws's own messages", async () => {
    const before = activeHandles()
    const { ws, messages, raw, close } = await pair()
    const writer = BodyFrameWriter.for(ws, true)!
    expect(writer).toBeDefined()
    ws.send("head")
    const parts = [Buffer.alloc(10, 1), Buffer.alloc(70_000, 2), Buffer.alloc(0), Buffer.alloc(300, 3)]
    const expected = Buffer.concat(parts)
    let written = 0
    parts.forEach((p, i) => writer.frame(Buffer.from(p), i === parts.length - 1, (err) => void (err ? undefined : written++)))
    ws.send("after")
    await until("three messages", () => messages.length === 3)
    expect(messages[0]).toEqual({ data: Buffer.from("head"), isBinary: false })
    expect(messages[1]!.isBinary).toBe(true)
    expect(Buffer.compare(messages[1]!.data, expected)).toBe(0)
    expect(messages[2]!.data.toString()).toBe("after")
    expect(written).toBe(4)
    // every body frame was masked with a non-zero key
    const wire = Buffer.concat(raw)
    const first = wire.indexOf(Buffer.from([0x02, 0x8a]))
    expect(first).toBeGreaterThan(0)
    expect(wire.readUInt32BE(first + 2)).not.toBe(0)
    await close()
    await expectNoLeaks(before)
  })

  it("with maskframes off sends the zero key and leaves the payload untouched", async () => {
    const before = activeHandles()
    const { ws, messages, raw, close } = await pair()
    const writer = BodyFrameWriter.for(ws, false)!
    const payload = Buffer.from("plain bytes")
    writer.frame(payload, true, () => undefined)
    await until("message", () => messages.length === 1)
    expect(payload.toString()).toBe("plain bytes")
    expect(messages[0]!.data.toString()).toBe("plain bytes")
    expect(Buffer.concat(raw).subarray(0, 6).toString("hex")).toBe("828b00000000")
    await close()
    await expectNoLeaks(before)
  })

  it("reports a closed WebSocket to the callback without writing", async () => {
    const before = activeHandles()
    const { ws, close } = await pair()
    const writer = BodyFrameWriter.for(ws, true)!
    ws.terminate()
    let error: Error | null | undefined
    writer.frame(Buffer.from("x"), true, (err) => void (error = err))
    expect(error?.message).toMatch(/not open/)
    await close()
    await expectNoLeaks(before)
  })
})
