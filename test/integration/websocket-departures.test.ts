/**
 * WebSocket relays after bursts of callers that leave with requests in flight: every download that
 * follows completes, intact, through wsp (one WebSocket per exchange) and through a tunnel carried by
 * yamux over one WebSocket. And a message over the limit closes its WebSocket within a second, with a
 * peer that answers the close and with one that never does.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as net from "node:net"
import { Effect } from "effect"
import { WebSocket } from "ws"
import { makeWspClient } from "../../src/services/client/WspClient.ts"
import { makeWspServer } from "../../src/services/front/WspServer.ts"
import { acceptWebSocket } from "../../src/services/transport/WebSocketOpen.ts"
import { noLeaks } from "../support/leaks.ts"
import { freePort } from "../services/ListenersFixtures.ts"
import { serveHttp } from "./tunnelHarness.ts"
import { wsClient, wsGateway } from "./tunnelWsHarness.ts"
import { clientConfig, destination, serverConfig, waitFor } from "./wspSupport.ts"

/** Callers at once in a burst. */
const BurstCallers = 50
/** How long a burst lasts. */
const BurstMs = 1000
/** Longest one download after a burst may take before the test fails. */
const DownloadBoundMs = 20_000
const DownloadBytes = 24 * 1024 * 1024

/**
 * `BurstCallers` loops, for `BurstMs`, each asking for a large body and leaving as soon as the first
 * bytes (or the head) arrive, or before anything arrives: requests in flight everywhere along the way.
 */
const departingBurst = (port: number, headers: (i: number) => http.OutgoingHttpHeaders, path: string): Promise<number> => {
  const until = Date.now() + BurstMs
  let sent = 0
  const one = (i: number) =>
    new Promise<void>((resolve) => {
      sent++
      const req = http.get({ host: "127.0.0.1", port, path, agent: false, headers: headers(i) }, (res) => {
        if (i % 2 === 0) req.destroy()
        else res.once("data", () => req.destroy())
        res.on("error", () => {})
        res.once("close", () => resolve())
      })
      req.on("error", () => resolve())
      req.once("close", () => resolve())
      if (i % 5 === 0) setImmediate(() => req.destroy())
    })
  const loop = async (n: number) => {
    for (let i = n; Date.now() < until; i += BurstCallers) await one(i)
  }
  return Promise.all(Array.from({ length: BurstCallers }, (_, n) => loop(n))).then(() => sent)
}

/** One complete download of `/bytes?n=`, checked byte for byte; fails past `DownloadBoundMs`. */
const download = (port: number, headers: http.OutgoingHttpHeaders, path: string, n: number): Promise<void> =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      req.destroy()
      reject(new Error(`download of ${n} bytes not complete within ${DownloadBoundMs} ms (${received} received)`))
    }, DownloadBoundMs)
    let received = 0
    let bad = -1
    const req = http.get({ host: "127.0.0.1", port, path, agent: false, headers }, (res) => {
      if (res.statusCode !== 200) {
        clearTimeout(timer)
        res.resume()
        return reject(new Error(`status ${res.statusCode}`))
      }
      res.on("data", (c: Buffer) => {
        for (let i = 0; i < c.length && bad < 0; i++) if (c[i] !== (received + i) % 251) bad = received + i
        received += c.length
      })
      res.on("end", () => {
        clearTimeout(timer)
        if (received !== n || bad >= 0) reject(new Error(`download: ${received} of ${n} bytes, first bad byte at ${bad}`))
        else resolve()
      })
      res.on("error", (e) => {
        clearTimeout(timer)
        reject(e)
      })
    })
    req.on("error", (e) => {
      clearTimeout(timer)
      reject(e)
    })
  })

/** A body of `n` bytes of the pattern `/bytes` serves, written in slices with backpressure. */
const servePattern = (res: http.ServerResponse, n: number): void => {
  res.writeHead(200, { "content-length": String(n) })
  let at = 0
  const slice = 256 * 1024
  const write = (): void => {
    while (at < n) {
      const size = Math.min(slice, n - at)
      const b = Buffer.allocUnsafe(size)
      for (let i = 0; i < size; i++) b[i] = (at + i) % 251
      at += size
      if (!res.write(b)) return void res.once("drain", write)
    }
    res.end()
  }
  res.on("error", () => {})
  write()
}

describe("WebSocket relays after departing callers", () => {
  it.live("wsp: three bursts of 50 departing callers, each followed by complete downloads", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* makeWspServer(serverConfig({ timeout: 5000 }))
      const target = `ws://127.0.0.1:${server.address.port}/register`
      yield* makeWspClient(clientConfig(target, { poolIdleSize: 10, poolMaxSize: 60 }))
      yield* waitFor("pool filled", () => server.stats().idle >= 10)
      const port = server.address.port
      const big = { "X-Proxy-Destination": dest.url(`/bytes?n=${DownloadBytes}`) }
      for (let round = 0; round < 3; round++) {
        const sent = yield* Effect.promise(() => departingBurst(port, () => big, "/request"))
        assert.isAbove(sent, BurstCallers, `round ${round}: the burst sent requests`)
        for (let i = 0; i < 3; i++) yield* Effect.promise(() => download(port, big, "/request", DownloadBytes))
      }
    })), { timeout: 180_000 })

  it.live("yamux over WebSocket: three bursts of 50 departing callers, each followed by complete downloads", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* wsGateway()
      const publicPort = yield* Effect.promise(freePort)
      const client = yield* wsClient([gw.url])
      yield* serveHttp(client, { _tag: "Http", port: publicPort }, (req, res) => {
        const n = Number(new URL(req.url ?? "/", "http://x").searchParams.get("n") ?? "0")
        servePattern(res, n)
      })
      const path = `/bytes?n=${DownloadBytes}`
      for (let round = 0; round < 3; round++) {
        const sent = yield* Effect.promise(() => departingBurst(publicPort, () => ({}), path))
        assert.isAbove(sent, BurstCallers, `round ${round}: the burst sent requests`)
        for (let i = 0; i < 3; i++) yield* Effect.promise(() => download(publicPort, {}, path, DownloadBytes))
      }
    })), { timeout: 180_000 })
})

/** A server accepting WebSockets with switchyard's endpoint, messages of at most `max` bytes. */
const limitedServer = (max: number) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ server: http.Server; port: number }>((resolve) => {
        const server = http.createServer()
        server.on("upgrade", (req, socket, head) => {
          socket.on("error", () => {})
          const endpoint = acceptWebSocket(req, socket, head, { maxMessageBytes: max })
          const noop = () => {}
          endpoint?.start({ text: noop, binaryStart: noop, binaryData: noop, binaryEnd: noop, closed: noop })
        })
        server.listen(0, "127.0.0.1", () => resolve({ server, port: (server.address() as net.AddressInfo).port }))
      })
    ),
    ({ server }) =>
      Effect.promise(() =>
        new Promise<void>((resolve) => {
          server.close(() => resolve())
          server.closeAllConnections()
        })
      )
  )

const CloseBoundMs = 1000

describe("an oversized WebSocket message", () => {
  it.live("closes with 1009 within a second when the peer answers the close (ws)", () =>
    noLeaks(Effect.gen(function*() {
      const { port } = yield* limitedServer(64 * 1024)
      const outcome = yield* Effect.promise(() =>
        new Promise<{ code: number; ms: number }>((resolve, reject) => {
          const ws = new WebSocket(`ws://127.0.0.1:${port}/`, { perMessageDeflate: false })
          ws.on("error", () => {})
          ws.once("open", () => {
            const start = Date.now()
            const timer = setTimeout(() => reject(new Error(`not closed within ${CloseBoundMs} ms`)), CloseBoundMs)
            ws.once("close", (code) => {
              clearTimeout(timer)
              resolve({ code, ms: Date.now() - start })
            })
            ws.send(Buffer.alloc(64 * 1024 + 1))
          })
        })
      )
      assert.strictEqual(outcome.code, 1009)
    })))

  it.live("closes the connection within a second when the peer ignores the close (raw TCP)", () =>
    noLeaks(Effect.gen(function*() {
      const { port } = yield* limitedServer(64 * 1024)
      const seen = yield* Effect.promise(() =>
        new Promise<Buffer>((resolve, reject) => {
          const socket = net.connect(port, "127.0.0.1")
          let received = Buffer.alloc(0)
          let timer: NodeJS.Timeout | undefined
          socket.on("error", () => {})
          socket.on("data", (c: Buffer) => {
            received = Buffer.concat([received, c])
            const end = received.indexOf("\r\n\r\n")
            if (timer === undefined && end >= 0) {
              // upgraded: announce a 1 MiB binary frame (masked, as a client must) and never answer anything
              timer = setTimeout(() => {
                socket.destroy()
                reject(new Error(`connection still open ${CloseBoundMs} ms after the oversized frame`))
              }, CloseBoundMs)
              socket.write(Buffer.from([0x82, 0xff, 0, 0, 0, 0, 0, 0x10, 0, 0, 1, 2, 3, 4]))
            }
          })
          socket.once("close", () => {
            clearTimeout(timer)
            resolve(received)
          })
          socket.write("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        })
      )
      const text = seen.toString("latin1")
      assert.match(text, /^HTTP\/1\.1 101 /)
      // the server's close frame: FIN+close, 2-byte code 1009 (03 f1) and a reason
      const frame = seen.subarray(text.indexOf("\r\n\r\n") + 4)
      assert.strictEqual(frame[0], 0x88)
      assert.strictEqual(frame.readUInt16BE(2), 1009)
    })))
})
