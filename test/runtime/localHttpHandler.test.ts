/**
 * `client --h2`'s forwarding to the local service, on the forwarding core's pooled connections: the pool
 * keeps idle connections beyond its idle cap for the linger time (so a steady load reuses them), then
 * closes the least recently used; bodies cross whole both ways; an unreachable service is a 502 that
 * names it.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as http2 from "node:http2"
import type * as net from "node:net"
import { setTimeout as sleep } from "node:timers/promises"
import { localHttpHandler } from "../../src/runtime/serveReverseHttp2.ts"
import { freePort } from "../support/ports.ts"
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

  /** An HTTP/2 front serving `local`'s handler, and a session to it; `request` answers status, headers and body. */
  const frontFor = async (local: ReturnType<typeof localHttpHandler>) => {
    const front = http2.createServer(local.handler)
    const session = http2.connect(`http://127.0.0.1:${await listen(front)}`)
    const request = (headers: http2.OutgoingHttpHeaders, body?: Uint8Array) =>
      new Promise<{ status: number; body: Buffer }>((resolve, reject) => {
        const stream = session.request(headers)
        let status = 0
        const parts: Array<Buffer> = []
        stream.on("response", (h) => (status = Number(h[":status"])))
        stream.on("data", (c: Buffer) => parts.push(c))
        stream.on("end", () => resolve({ status, body: Buffer.concat(parts) }))
        stream.on("error", reject)
        stream.end(body)
      })
    const close = async () => {
      session.close()
      local.close()
      await new Promise<void>((resolve) => front.close(() => resolve()))
    }
    return { request, close }
  }

  it("a 4 MiB upload and a 4 MiB answer cross whole", async () => {
    const before = activeHandles()
    const service = http.createServer((req, res) => {
      const parts: Array<Buffer> = []
      req.on("data", (c: Buffer) => parts.push(c))
      req.on("end", () => {
        const got = Buffer.concat(parts)
        res.writeHead(200, { "x-received": String(got.length) })
        res.end(Buffer.concat([got, got]).subarray(0, 4 * 1024 * 1024))
      })
    })
    const servicePort = await listen(service)
    const { request, close } = await frontFor(localHttpHandler({ host: "127.0.0.1", port: servicePort }))
    try {
      const upload = Buffer.alloc(4 * 1024 * 1024)
      for (let i = 0; i < upload.length; i++) upload[i] = (i * 31 + 7) & 0xff
      const reply = await request({ ":method": "POST", ":path": "/up" }, upload)
      assert.strictEqual(reply.status, 200)
      assert.isTrue(reply.body.equals(upload), "the answer is the upload, byte for byte")
    } finally {
      await close()
      service.closeAllConnections()
      await new Promise<void>((resolve) => service.close(() => resolve()))
    }
    await expectNoLeaks(before)
  })

  it("a chunked answer in many small reads, some copied and some handed on, arrives whole at a slow reader", async () => {
    const before = activeHandles()
    // chunks from 1 byte to 12 KiB, written over many turns so that they arrive in separate reads
    const chunks: Array<Buffer> = []
    for (let i = 0, size = 1; i < 600; i++, size = (size * 13 + 7) % 12_288 + 1) {
      chunks.push(Buffer.alloc(size, (i * 7 + 1) & 0xff))
    }
    const expected = Buffer.concat(chunks)
    const service = http.createServer((_req, res) => {
      res.writeHead(200, { "content-type": "application/octet-stream" })
      let i = 0
      const next = () => {
        if (i === chunks.length) return void res.end()
        res.write(chunks[i++]!)
        if (i % 4 === 0) setImmediate(next)
        else next()
      }
      next()
    })
    const servicePort = await listen(service)
    const local = localHttpHandler({ host: "127.0.0.1", port: servicePort })
    const front = http2.createServer(local.handler)
    const session = http2.connect(`http://127.0.0.1:${await listen(front)}`)
    try {
      const body = await new Promise<Buffer>((resolve, reject) => {
        const stream = session.request({ ":path": "/chunks" })
        const parts: Array<Buffer> = []
        let n = 0
        stream.on("data", (c: Buffer) => {
          parts.push(c)
          if (++n % 8 === 0) {
            stream.pause()
            setTimeout(() => stream.resume(), 2)
          }
        })
        stream.on("end", () => resolve(Buffer.concat(parts)))
        stream.on("error", reject)
      })
      assert.strictEqual(body.length, expected.length)
      assert.isTrue(body.equals(expected), "every byte in order")
    } finally {
      session.close()
      local.close()
      await new Promise<void>((resolve) => front.close(() => resolve()))
      service.closeAllConnections()
      await new Promise<void>((resolve) => service.close(() => resolve()))
    }
    await expectNoLeaks(before)
  })

  it("a local service that cannot be reached is a 502 naming it", async () => {
    const before = activeHandles()
    const port = await freePort()
    const { request, close } = await frontFor(localHttpHandler({ host: "127.0.0.1", port }))
    try {
      const reply = await request({ ":path": "/" })
      assert.strictEqual(reply.status, 502)
      assert.match(reply.body.toString(), new RegExp(`upstream 127\\.0\\.0\\.1:${port} unreachable \\(ECONNREFUSED\\)`))
    } finally {
      await close()
    }
    await expectNoLeaks(before)
  })
})
