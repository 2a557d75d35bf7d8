/**
 * `client --h2`'s forwarding to the local service: its keep-alive pool keeps idle connections beyond
 * its idle cap for the linger time (so a steady load reuses them), then closes the least recently used.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as http2 from "node:http2"
import type * as net from "node:net"
import { setTimeout as sleep } from "node:timers/promises"
import { localHttpHandler } from "../../src/runtime/serveReverseHttp2.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"

const waitFor = async (what: string, cond: () => boolean): Promise<void> => {
  for (let i = 0; i < 500; i++) {
    if (cond()) return
    await sleep(10)
  }
  throw new Error(`timed out waiting for ${what}`)
}

const listen = (server: net.Server): Promise<number> =>
  new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as net.AddressInfo).port)))

describe("localHttpHandler", () => {
  it("keeps idle connections beyond its cap for the linger time, reusing them, then closes the surplus", async () => {
    const before = activeHandles()
    // the local service answers once `batch` requests are waiting, so each batch holds that many connections
    const batch = 3
    const open = new Set<net.Socket>()
    let accepted = 0
    let waiting: Array<http.ServerResponse> = []
    const service = http.createServer((_req, res) => {
      waiting.push(res)
      if (waiting.length < batch) return
      for (const r of waiting) r.end("ok")
      waiting = []
    })
    service.on("connection", (socket: net.Socket) => {
      accepted++
      open.add(socket)
      socket.on("close", () => open.delete(socket))
    })
    const servicePort = await listen(service)
    const lingerMs = 200
    const local = localHttpHandler({ host: "127.0.0.1", port: servicePort }, { maxSockets: 8, maxFreeSockets: 1, lingerMs })
    const front = http2.createServer(local.handler)
    const frontPort = await listen(front)
    const session = http2.connect(`http://127.0.0.1:${frontPort}`)
    const get = (): Promise<string> =>
      new Promise((resolve, reject) => {
        const stream = session.request({ ":path": "/" })
        let body = ""
        stream.setEncoding("utf8")
        stream.on("data", (c: string) => (body += c))
        stream.on("end", () => resolve(body))
        stream.on("error", reject)
      })
    try {
      assert.deepStrictEqual(await Promise.all([get(), get(), get()]), ["ok", "ok", "ok"])
      assert.strictEqual(accepted, batch)
      // within the linger time the surplus idle connections are reused: nothing new is opened
      assert.deepStrictEqual(await Promise.all([get(), get(), get()]), ["ok", "ok", "ok"])
      assert.strictEqual(accepted, batch)
      assert.strictEqual(open.size, batch)
      // then only the cap stays open
      await waitFor("the surplus to be closed", () => open.size === 1)
      assert.strictEqual(accepted, batch)
    } finally {
      session.close()
      local.close()
      await new Promise<void>((resolve) => front.close(() => resolve()))
      for (const s of open) s.destroy()
      await new Promise<void>((resolve) => service.close(() => resolve()))
    }
    await expectNoLeaks(before)
  })
})
