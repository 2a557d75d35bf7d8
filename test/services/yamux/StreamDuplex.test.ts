/**
 * yamux streams as sockets for Node's http: a real http.Server served over streams accepted on one
 * side, a real http.Agent creating connections as streams on the other, over loopback TCP, both ways.
 */
import { afterEach, beforeEach, describe, expect, it } from "vitest"
import { Effect } from "effect"
import * as http from "node:http"
import type { NodeYamuxSession } from "../../../src/services/yamux/NodeSession.ts"
import type { StreamSocket } from "../../../src/services/yamux/StreamDuplex.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../../support/leaks.ts"
import { pattern, tcpSessions } from "./harness.ts"

const request = (agent: http.Agent, options: http.RequestOptions, body?: Uint8Array) =>
  new Promise<{ status: number; body: Buffer; headers: http.IncomingHttpHeaders }>((resolve, reject) => {
    const req = http.request({ agent, host: "tunnel", ...options }, (res) => {
      const parts: Array<Buffer> = []
      res.on("data", (d: Buffer) => parts.push(d))
      res.on("end", () => resolve({ status: res.statusCode!, body: Buffer.concat(parts), headers: res.headers }))
      res.on("error", reject)
    })
    req.on("error", reject)
    req.end(body)
  })

const app: http.RequestListener = (req, res) => {
  if (req.url === "/echo") {
    res.setHeader("x-remote", `${req.socket.remoteAddress}:${req.socket.remotePort}`)
    req.pipe(res)
    return
  }
  if (req.url?.startsWith("/big")) {
    const n = Number(new URL(req.url, "http://x").searchParams.get("n"))
    res.setHeader("content-length", n)
    res.end(Buffer.from(pattern(n, 9)))
    return
  }
  res.end(`hello ${req.url}`)
}

/** Serves `app` on every stream `side` accepts; the agent opens streams on `opener`. */
const wire = (opener: NodeYamuxSession, side: NodeYamuxSession, opts: { keepAlive: boolean }) => {
  const server = http.createServer(app)
  side.onSocket((socket) => {
    socket.remoteAddress = "203.0.113.7"
    socket.remotePort = 4711
    server.emit("connection", socket)
  })
  const agent = new http.Agent({ keepAlive: opts.keepAlive, maxSockets: 8 })
  ;(agent as unknown as { createConnection: () => StreamSocket }).createConnection = () => opener.openSocket()
  return { server, agent }
}

let before: HandleCounts
beforeEach(() => {
  before = activeHandles()
})
afterEach(async () => {
  await expectNoLeaks(before)
})

describe("yamux streams as sockets for node:http", () => {
  for (const direction of ["client opens, server serves", "server opens, client serves"] as const) {
    for (const keepAlive of [false, true]) {
      it(`${direction}, keepAlive=${keepAlive}: GET, POST echo, large bodies, concurrent requests`, async () => {
        const { client, server, close } = await tcpSessions()
        const [opener, side] = direction.startsWith("client") ? [client, server] : [server, client]
        const { server: httpServer, agent } = wire(opener, side, { keepAlive })
        try {
          const hello = await request(agent, { path: "/hi" })
          expect(hello.status).toBe(200)
          expect(hello.body.toString()).toBe("hello /hi")

          const payload = Buffer.from(pattern(3 * 1024 * 1024, 5))
          const echoed = await request(agent, { path: "/echo", method: "POST" }, payload)
          expect(echoed.body.equals(payload)).toBe(true)
          expect(echoed.headers["x-remote"]).toBe("203.0.113.7:4711")

          const results = await Promise.all(
            Array.from({ length: 32 }, (_, i) => request(agent, { path: `/big?n=${100_000 + i}` }))
          )
          results.forEach((r, i) => {
            expect(r.body.length).toBe(100_000 + i)
            expect(r.body.equals(Buffer.from(pattern(100_000 + i, 9)))).toBe(true)
          })
        } finally {
          agent.destroy()
          httpServer.close()
          httpServer.closeAllConnections()
          await close()
        }
      })
    }
  }

  it("destroy() before a clean finish resets the stream; the server sees the request aborted", async () => {
    const { client, server, close } = await tcpSessions()
    const httpServer = http.createServer((_req, res) => {
      res.write("partial")
      res.on("close", () => closedOnServer(res.writableFinished))
    })
    let closedOnServer: (finished: boolean) => void = () => {}
    const serverSaw = new Promise<boolean>((r) => (closedOnServer = r))
    server.onSocket((s) => httpServer.emit("connection", s))
    try {
      const socket = client.openSocket()
      socket.write("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
      await new Promise<void>((r) => socket.once("data", () => r()))
      socket.destroy()
      expect(await serverSaw).toBe(false)
      expect(socket.core.error?.reason).toBe("StreamReset")
    } finally {
      httpServer.close()
      httpServer.closeAllConnections()
      await close()
    }
  })

  it("end() sends FIN: the other side reads EOF and can still answer", async () => {
    const { client, server, close } = await tcpSessions()
    try {
      const accepted = server.acceptSocket()
      const socket = client.openSocket()
      socket.end("question")
      const inbound = await accepted
      const chunks: Array<Buffer> = []
      inbound.on("data", (d: Buffer) => chunks.push(d))
      await new Promise((r) => inbound.once("end", r))
      expect(Buffer.concat(chunks).toString()).toBe("question")
      inbound.end("answer")
      const back: Array<Buffer> = []
      socket.on("data", (d: Buffer) => back.push(d))
      await new Promise((r) => socket.once("close", r))
      expect(Buffer.concat(back).toString()).toBe("answer")
      expect(client.streamCount()).toBe(0)
    } finally {
      await close()
    }
  })

  it("setTimeout emits timeout after idleness; ref/unref/setNoDelay/setKeepAlive behave", async () => {
    const { client, server, close } = await tcpSessions()
    try {
      const socket = client.openSocket()
      expect(socket.setNoDelay(true)).toBe(socket)
      expect(socket.setKeepAlive(true, 1000)).toBe(socket)
      socket.unref().ref()
      const fired = new Promise<void>((r) => socket.setTimeout(30, r))
      await fired
      socket.setTimeout(0)
      socket.destroy()
      expect(typeof socket.address().port === "number" || socket.address().port === undefined).toBe(true)
      const rtt = await server.ping()
      expect(rtt).toBeGreaterThanOrEqual(0)
    } finally {
      await close()
    }
  })

  it("backpressure: a socket that is not read stops the writer at the window", async () => {
    const { client, server, close } = await tcpSessions()
    try {
      const accepted = server.acceptSocket()
      const socket = client.openSocket()
      const inbound = await accepted
      inbound.on("error", () => {}) // the reset at the end reaches it as an error, like ECONNRESET
      inbound.pause()
      let written = 0
      const chunk = Buffer.alloc(64 * 1024)
      while (socket.write(chunk) && written < 64 * 1024 * 1024) written += chunk.length
      await new Promise((r) => setTimeout(r, 100))
      // The window (256 KiB) plus the socket's and the reader's buffers, nowhere near what was offered.
      expect(socket.core.sendWindow).toBe(0)
      expect(written).toBeLessThan(4 * 1024 * 1024)
      socket.destroy()
    } finally {
      await close()
    }
  })

  it("a throwing onSocket handler resets that stream; the session keeps serving", async () => {
    const { client, server, close } = await tcpSessions()
    const warnings: Array<string> = []
    const onWarning = (w: Error) => warnings.push(w.message)
    process.on("warning", onWarning)
    try {
      let calls = 0
      server.onSocket((socket) => {
        if (calls++ === 0) throw new Error("handler bug")
        socket.end("fine")
      })
      const first = client.openSocket()
      first.on("error", () => {})
      await new Promise((r) => first.once("close", r))
      expect(first.core.error?.reason).toBe("StreamReset")
      const second = client.openSocket()
      const body: Array<Buffer> = []
      second.on("data", (d: Buffer) => body.push(d))
      second.end()
      await new Promise((r) => second.once("close", r))
      expect(Buffer.concat(body).toString()).toBe("fine")
      await new Promise((r) => setImmediate(r))
      expect(warnings.some((w) => w.includes("handler bug"))).toBe(true)
    } finally {
      process.off("warning", onWarning)
      await close()
    }
  })

  it("closing our session closes its sockets without an error; the peer's sockets see the end", async () => {
    const { client, server, close } = await tcpSessions()
    try {
      const accepted = server.acceptSocket()
      const mine = client.openSocket()
      const theirs = await accepted
      const errors: Array<unknown> = []
      mine.on("error", (e) => errors.push(e))
      theirs.on("error", (e) => errors.push(e))
      const mineClosed = new Promise((r) => mine.once("close", r))
      const theirsClosed = new Promise((r) => theirs.once("close", r))
      await client.close()
      await mineClosed
      expect(errors).toEqual([])
      await theirsClosed
      expect(await client.closed).toBeUndefined()
      expect(await server.closed).toBeUndefined() // the peer said GoAway before closing: a clean end
    } finally {
      await close()
    }
  })

  it("works from an Effect program too (Effect-side session alongside the Node API)", async () => {
    const { client, server, close } = await tcpSessions()
    try {
      const n = await Effect.runPromise(client.session.streamCount)
      expect(n).toBe(0)
      expect(server.session.role).toBe("server")
    } finally {
      await close()
    }
  })
})
