import { assert, describe, it } from "@effect/vitest"
import * as net from "node:net"
import { DeferredStream } from "../../../src/services/front/DeferredStream.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"

/** A loopback TCP pair: the server side echoes what it reads, prefixed, and ends when the client ends. */
const echoPair = async () => {
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    s.on("data", (d: Buffer) => s.write(Buffer.concat([Buffer.from("<"), d])))
    s.on("end", () => s.end())
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  const client = net.connect({ host: "127.0.0.1", port: (server.address() as net.AddressInfo).port, allowHalfOpen: true })
  await new Promise<void>((resolve) => client.once("connect", resolve))
  return { server, client }
}

describe("DeferredStream", () => {
  it("holds writes and the end until the real stream is attached, then passes bytes both ways in order", async () => {
    const before = activeHandles()
    const { server, client } = await echoPair()
    const deferred = new DeferredStream()
    let received = ""
    deferred.setEncoding("latin1")
    deferred.on("data", (d: string) => (received += d))
    const ended = new Promise<void>((resolve) => deferred.once("end", resolve))
    const closed = new Promise<void>((resolve) => deferred.once("close", () => resolve()))
    assert.isTrue(deferred.write("a"))
    deferred.write("b")
    deferred.end()
    await new Promise((resolve) => setTimeout(resolve, 20))
    assert.strictEqual(received, "")
    deferred.attach(client)
    await ended
    // the echo server answers each read; the bytes arrive in order whatever the read boundaries
    assert.strictEqual(received.replaceAll("<", ""), "ab")
    await closed
    await new Promise<void>((resolve) => server.close(() => resolve()))
    await expectNoLeaks(before)
  })

  it("destroys the real stream when it was destroyed before attaching, and follows a reset after", async () => {
    const before = activeHandles()
    const first = await echoPair()
    const early = new DeferredStream()
    early.destroy()
    early.attach(first.client)
    await new Promise<void>((resolve) => first.client.once("close", () => resolve()))
    assert.isTrue(first.client.destroyed)

    const second = await echoPair()
    const late = new DeferredStream()
    late.on("error", () => {})
    late.attach(second.client)
    const closed = new Promise<void>((resolve) => late.once("close", () => resolve()))
    second.client.destroy(new Error("reset"))
    await closed
    assert.isTrue(late.destroyed)
    await new Promise<void>((resolve) => first.server.close(() => resolve()))
    await new Promise<void>((resolve) => second.server.close(() => resolve()))
    await expectNoLeaks(before)
  })
})
