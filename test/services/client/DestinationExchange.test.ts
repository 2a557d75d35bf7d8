import { describe, expect, it } from "@effect/vitest"
import * as http from "node:http"
import * as net from "node:net"
import { destinationTarget, encodeDestinationRequestHead, requestBodyFraming } from "../../../src/domain/DestinationRequestHead.ts"
import type { GoHeader } from "../../../src/domain/WspMessage.ts"
import { DestinationExchange, DestinationPools } from "../../../src/services/client/DestinationExchange.ts"
import { activeHandles, expectNoLeaks } from "../../support/leaks.ts"

interface Outcome {
  readonly status: number | undefined
  readonly header: GoHeader
  readonly contentLength: number | undefined
  readonly body: Buffer
  /** How many `data` calls carried `end`. */
  readonly ends: number
  readonly failure: { readonly message: string; readonly responded: boolean } | undefined
}

/** Runs one exchange to `url` with `body` written in the given pieces; resolves on its end or failure. */
const exchange = (
  pools: DestinationPools,
  url: string,
  options: { method?: string; header?: GoHeader; contentLength?: number; body?: ReadonlyArray<Buffer>; reuseBuffer?: boolean } = {}
): Promise<Outcome> =>
  new Promise((resolve) => {
    const method = options.method ?? "GET"
    const contentLength = options.contentLength ?? 0
    const target = destinationTarget(url)
    if ("_tag" in target) throw new Error(target.message)
    const head = encodeDestinationRequestHead(method, target, options.header ?? null, contentLength)
    if ("_tag" in head) throw new Error(head.message)
    let status: number | undefined
    let header: GoHeader = null
    let length: number | undefined
    const parts: Array<Buffer> = []
    let ends = 0
    const done = (failure: Outcome["failure"]) =>
      resolve({ status, header, contentLength: length, body: Buffer.concat(parts), ends, failure })
    const call = new DestinationExchange(pools, target, method, head, requestBodyFraming(method, contentLength), 64, {
      head: (s, h, n) => {
        status = s
        header = h
        length = n
      },
      // a copy, as a masked frame is: the view's buffer is reused by the next read
      data: (chunk, end) => {
        parts.push(Buffer.from(chunk))
        if (end) {
          ends++
          done(undefined)
        }
      },
      failed: (message, responded) => done({ message, responded }),
      drained: () => undefined
    })
    call.start()
    for (const piece of options.body ?? []) call.write(piece)
    call.end()
  })

/** A destination that answers every request on a connection with `answer(requestHead, socket)`. */
const rawDestination = async (answer: (head: string, socket: net.Socket) => void) => {
  const connections: Array<net.Socket> = []
  const requests: Array<string> = []
  const server = net.createServer((socket) => {
    connections.push(socket)
    let pending = ""
    socket.on("data", (d) => {
      pending += d.toString("latin1")
      for (;;) {
        const at = pending.indexOf("\r\n\r\n")
        if (at < 0) return
        const head = pending.slice(0, at + 4)
        pending = pending.slice(at + 4)
        requests.push(head)
        answer(head, socket)
      }
    })
    socket.on("error", () => socket.destroy())
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  const port = (server.address() as net.AddressInfo).port
  return {
    url: (path: string) => `http://127.0.0.1:${port}${path}`,
    connections,
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        for (const c of connections) c.destroy()
        server.close(() => resolve())
      })
  }
}

const pattern = (n: number): Buffer => {
  const b = Buffer.allocUnsafe(n)
  for (let i = 0; i < n; i++) b[i] = (i * 7 + 3) % 251
  return b
}

describe("DestinationExchange (raw HTTP/1.1 toward wsp destinations)", () => {
  it("relays a Content-Length response and reuses the connection for the next request", async () => {
    const before = activeHandles()
    const body = pattern(3 * 1024 * 1024)
    const seen: Array<{ method: string; url: string; headers: http.IncomingHttpHeaders; remote: number }> = []
    const server = http.createServer((req, res) => {
      seen.push({ method: req.method!, url: req.url!, headers: req.headers, remote: req.socket.remotePort! })
      res.writeHead(200, { "Content-Length": String(body.length), "X-Thing": "a", Connection: "keep-alive, X-Drop", "X-Drop": "1" })
      res.end(body)
    })
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
    const port = (server.address() as net.AddressInfo).port
    const pools = new DestinationPools(4, 4)
    const first = await exchange(pools, `http://127.0.0.1:${port}/x?a=1`, {
      header: { Accept: ["*/*"], Connection: ["X-Hop"], "X-Hop": ["no"], Host: ["evil.example"], "Keep-Alive": ["1"] }
    })
    expect(first.failure).toBeUndefined()
    expect(first.status).toBe(200)
    expect(first.contentLength).toBe(body.length)
    expect(first.ends).toBe(1)
    expect(Buffer.compare(first.body, body)).toBe(0)
    expect(first.header).toMatchObject({ "X-Thing": ["a"], "Content-Length": [String(body.length)] })
    expect(first.header).not.toHaveProperty("Connection")
    expect(first.header).not.toHaveProperty("X-Drop")
    expect(seen[0]!.url).toBe("/x?a=1")
    expect(seen[0]!.headers.host).toBe(`127.0.0.1:${port}`)
    expect(seen[0]!.headers.accept).toBe("*/*")
    expect(seen[0]!.headers["x-hop"]).toBeUndefined()
    expect(seen[0]!.headers["keep-alive"]).toBeUndefined()
    const second = await exchange(pools, `http://127.0.0.1:${port}/y`)
    expect(Buffer.compare(second.body, body)).toBe(0)
    expect(seen[1]!.remote).toBe(seen[0]!.remote)
    pools.close()
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
    await expectNoLeaks(before)
  })

  it("decodes a chunked response (extensions, trailers, pieces split anywhere) and skips interim responses", async () => {
    const before = activeHandles()
    const body = pattern(200_000)
    const dest = await rawDestination((_head, socket) => {
      let wire = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
      const pieces: Array<Buffer> = [Buffer.from(wire, "latin1")]
      let at = 0
      for (const size of [1, 10, 4096, 65536, 100_000]) {
        const n = Math.min(size, body.length - at)
        pieces.push(Buffer.from(`${n.toString(16)};ext=1\r\n`, "latin1"), body.subarray(at, at + n), Buffer.from("\r\n"))
        at += n
      }
      pieces.push(Buffer.from(`${(body.length - at).toString(16)}\r\n`), body.subarray(at), Buffer.from("\r\n0\r\nX-Trailer: t\r\n\r\n"))
      wire = ""
      const all = Buffer.concat(pieces)
      // written in odd-sized writes so reads split chunk lines and data
      let offset = 0
      const step = () => {
        if (offset >= all.length) return
        const end = Math.min(all.length, offset + 7919)
        socket.write(all.subarray(offset, end))
        offset = end
        setImmediate(step)
      }
      step()
    })
    const pools = new DestinationPools(4, 4)
    const out = await exchange(pools, dest.url("/chunked"))
    expect(out.failure).toBeUndefined()
    expect(out.status).toBe(201)
    expect(out.contentLength).toBe(-1)
    expect(out.header).toMatchObject({ "X-A": ["1", "2"] })
    expect(out.header).not.toHaveProperty("Transfer-Encoding")
    expect(out.ends).toBe(1)
    expect(Buffer.compare(out.body, body)).toBe(0)
    pools.close()
    await dest.close()
    await expectNoLeaks(before)
  })

  it("sends a body of unknown length chunk-coded and a known one with its Content-Length", async () => {
    const before = activeHandles()
    const received: Array<{ te: string | undefined; cl: string | undefined; body: Buffer }> = []
    const server = http.createServer((req, res) => {
      const parts: Array<Buffer> = []
      req.on("data", (d: Buffer) => parts.push(d))
      req.on("end", () => {
        received.push({ te: req.headers["transfer-encoding"], cl: req.headers["content-length"], body: Buffer.concat(parts) })
        res.end("ok")
      })
    })
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
    const port = (server.address() as net.AddressInfo).port
    const pools = new DestinationPools(4, 4)
    const body = pattern(300_000)
    const pieces = [body.subarray(0, 1), body.subarray(1, 70_000), body.subarray(70_000)]
    const chunked = await exchange(pools, `http://127.0.0.1:${port}/up`, { method: "POST", contentLength: -1, body: pieces })
    expect(chunked.status).toBe(200)
    expect(received[0]!.te).toBe("chunked")
    expect(Buffer.compare(received[0]!.body, body)).toBe(0)
    const sized = await exchange(pools, `http://127.0.0.1:${port}/up`, { method: "PUT", contentLength: body.length, body: pieces })
    expect(sized.status).toBe(200)
    expect(received[1]!.cl).toBe(String(body.length))
    expect(Buffer.compare(received[1]!.body, body)).toBe(0)
    const empty = await exchange(pools, `http://127.0.0.1:${port}/up`, { method: "POST", contentLength: 0 })
    expect(empty.status).toBe(200)
    expect(received[2]!.cl).toBe("0")
    pools.close()
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
    await expectNoLeaks(before)
  })

  it("queues a request body while waiting for a connection (one per destination here) and sends it once granted", async () => {
    const before = activeHandles()
    const bodies: Array<Buffer> = []
    const server = http.createServer((req, res) => {
      const parts: Array<Buffer> = []
      req.on("data", (d: Buffer) => parts.push(d))
      req.on("end", () => {
        bodies.push(Buffer.concat(parts))
        // the first answer waits a little, so the second request has to wait for the connection
        setTimeout(() => res.end(String(bodies.length)), bodies.length === 1 ? 50 : 0)
      })
    })
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
    const port = (server.address() as net.AddressInfo).port
    const pools = new DestinationPools(1, 1)
    const a = pattern(100_000)
    const b = pattern(2_000_000)
    const [first, second] = await Promise.all([
      exchange(pools, `http://127.0.0.1:${port}/a`, { method: "POST", contentLength: a.length, body: [a] }),
      exchange(pools, `http://127.0.0.1:${port}/b`, { method: "POST", contentLength: -1, body: [b.subarray(0, 1_500_000), b.subarray(1_500_000)] })
    ])
    expect([first.body.toString(), second.body.toString()]).toEqual(["1", "2"])
    expect(Buffer.compare(bodies[0]!, a)).toBe(0)
    expect(Buffer.compare(bodies[1]!, b)).toBe(0)
    pools.close()
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
    await expectNoLeaks(before)
  })

  it("reports a destination that dies mid-body as a failure after the head, never as an end", async () => {
    const before = activeHandles()
    for (const framing of ["length", "chunked"] as const) {
      const dest = await rawDestination((_head, socket) => {
        socket.write(
          framing === "length"
            ? "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + "x".repeat(5000)
            : "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n" + "x".repeat(5000) + "\r\n"
        )
        setTimeout(() => socket.destroy(), 20)
      })
      const pools = new DestinationPools(4, 4)
      const out = await exchange(pools, dest.url("/die"))
      expect(out.status).toBe(200)
      expect(out.ends).toBe(0)
      expect(out.body.length).toBe(5000)
      expect(out.failure?.responded).toBe(true)
      expect(out.failure?.message).toMatch(/^response body failed/)
      pools.close()
      await dest.close()
    }
    await expectNoLeaks(before)
  })

  it("fails before any head on a refused connection, a malformed response or an unexpected 101", async () => {
    const before = activeHandles()
    const pools = new DestinationPools(4, 4)
    const closed = net.createServer()
    await new Promise<void>((resolve) => closed.listen(0, "127.0.0.1", resolve))
    const port = (closed.address() as net.AddressInfo).port
    await new Promise<void>((resolve) => closed.close(() => resolve()))
    const refused = await exchange(pools, `http://127.0.0.1:${port}/`)
    expect(refused.failure).toEqual({ message: expect.stringMatching(/ECONNREFUSED/), responded: false })
    for (const reply of ["HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "garbage\r\n\r\n", "HTTP/1.1 101 Switching Protocols\r\n\r\n"]) {
      const dest = await rawDestination((_head, socket) => void socket.write(reply))
      const out = await exchange(pools, dest.url("/"))
      expect(out.status).toBeUndefined()
      expect(out.failure?.responded).toBe(false)
      await dest.close()
    }
    pools.close()
    await expectNoLeaks(before)
  })

  it("tries a fresh connection once when a kept-alive one was closed by the destination while idle", async () => {
    const before = activeHandles()
    const dest = await rawDestination((_head, socket) => {
      socket.write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    })
    const pools = new DestinationPools(4, 4)
    const first = await exchange(pools, dest.url("/"))
    expect(first.body.toString()).toBe("ok")
    // the destination drops the idle connection without the pool noticing first
    dest.connections[0]!.end()
    const second = await exchange(pools, dest.url("/"))
    expect(second.failure).toBeUndefined()
    expect(second.body.toString()).toBe("ok")
    pools.close()
    await dest.close()
    await expectNoLeaks(before)
  })
})
