/**
 * Large bodies through a control-port tunnel, byte for byte, over TCP and over a WebSocket, where the
 * gateway reads into reused memory (on the WebSocket, reading the frames itself): fast and slow readers
 * at once, odd write sizes on the backend (frames that straddle reads), and a raw TCP stream, whose
 * reader keeps what it reads, on the same session; then callers that leave mid-body beside readers of
 * bodies each of its own pattern, where a read given back too early would show as another's bytes.
 */
import { assert, describe, it } from "@effect/vitest"
import { createHash } from "node:crypto"
import * as http from "node:http"
import * as net from "node:net"
import { Context, Effect } from "effect"
import { TunnelClient } from "../../src/services/client/TunnelClient.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { freePort } from "../services/ListenersFixtures.ts"
import { client, gateway, serveEcho, serveHttp } from "./tunnelHarness.ts"
import { wsClient, wsGateway } from "./tunnelWsHarness.ts"

/** A body no two offsets of which are likely to agree by accident. */
const patterned = (size: number): Buffer => {
  const b = Buffer.allocUnsafe(size)
  for (let i = 0; i < size; i++) b[i] = (i * 31 + (i >>> 9) + (i >>> 17)) & 0xff
  return b
}

const sha256 = (b: Uint8Array): string => createHash("sha256").update(b).digest("hex")

/** Writes `body` in slices of varying sizes (1 byte to about 200 KiB), honouring backpressure. */
const writeInOddSlices = (res: http.ServerResponse, body: Buffer): void => {
  let offset = 0
  let step = 1
  const write = (): void => {
    while (offset < body.length) {
      step = (step * 7919 + 12_345) % 200_000 + 1
      const end = Math.min(offset + step, body.length)
      const ok = res.write(body.subarray(offset, end))
      offset = end
      if (!ok) return void res.once("drain", write)
    }
    res.end()
  }
  write()
}

/** GETs `path` and hashes the body; `slow` pauses the response for a moment after every 256 KiB. */
const download = (port: number, path: string, slow: boolean): Promise<{ status: number; size: number; hash: string }> =>
  new Promise((resolve, reject) => {
    http.get({ host: "127.0.0.1", port, path, agent: false }, (res) => {
      const hash = createHash("sha256")
      let size = 0
      let sinceNap = 0
      res.on("data", (chunk: Buffer) => {
        hash.update(chunk)
        size += chunk.length
        sinceNap += chunk.length
        if (slow && sinceNap >= 256 * 1024) {
          sinceNap = 0
          res.pause()
          setTimeout(() => res.resume(), 5)
        }
      })
      res.on("end", () => resolve({ status: res.statusCode ?? 0, size, hash: hash.digest("hex") }))
      res.on("error", reject)
    }).on("error", reject)
  })

/** Sends `data` over a raw TCP connection and reads back as many bytes. */
const echoRoundTrip = (port: number, data: Buffer): Promise<Buffer> =>
  new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1", () => socket.end(data))
    const parts: Array<Buffer> = []
    socket.on("data", (c: Buffer) => parts.push(c))
    socket.on("end", () => resolve(Buffer.concat(parts)))
    socket.on("error", reject)
  })

/** Serves the patterned body and an echo through `tunnel`, then reads them back through the gateway. */
const exercise = (tunnel: TunnelClient["Service"]) =>
  Effect.gen(function*() {
    const body = patterned(24 * 1024 * 1024)
    const expected = sha256(body)
    const httpPort = yield* Effect.promise(freePort)
    const tcpPort = yield* Effect.promise(freePort)
    yield* serveHttp(tunnel, { _tag: "Http", port: httpPort }, (_req, res) => {
      res.writeHead(200, { "content-length": String(body.length) })
      writeInOddSlices(res, body)
    })
    yield* serveEcho(tunnel, { _tag: "Tcp", port: tcpPort })
    const echoed = patterned(6 * 1024 * 1024).reverse()
    const [fast, slow, fast2, echo] = yield* Effect.promise(() =>
      Promise.all([
        download(httpPort, "/fast", false),
        download(httpPort, "/slow", true),
        download(httpPort, "/fast-again", false),
        echoRoundTrip(tcpPort, echoed)
      ])
    )
    for (const r of [fast, slow, fast2]) {
      assert.strictEqual(r.status, 200)
      assert.strictEqual(r.size, body.length)
      assert.strictEqual(r.hash, expected)
    }
    assert.strictEqual(echo.length, echoed.length)
    assert.strictEqual(sha256(echo), sha256(echoed))
  })

/** The body served for seed `seed`: its own pattern, so a byte of another body shows in the hash. */
const seededBody = (seed: number, size: number): Buffer => {
  const b = Buffer.allocUnsafe(size)
  for (let i = 0; i + 4 <= size; i += 4) b.writeUInt32BE(((i * 2654435761) ^ (seed * 40503)) >>> 0, i)
  return b
}

/** GETs `path` and cuts the connection after `after` bytes of body. */
const leaveMidBody = (port: number, path: string, after: number): Promise<void> =>
  new Promise((resolve) => {
    const req = http.get({ host: "127.0.0.1", port, path, agent: false }, (res) => {
      let got = 0
      res.on("data", (c: Buffer) => {
        got += c.length
        if (got >= after) req.destroy()
      })
      res.on("end", () => resolve())
    })
    req.on("error", () => {})
    req.on("close", () => resolve())
  })

/**
 * Callers that leave mid-body (their sockets destroyed while the gateway still writes to them) beside
 * callers that read everything, some slowly, over one session: each reader gets its own body and no
 * byte of another's, and the backend is still served whole afterwards.
 */
const churn = (tunnel: TunnelClient["Service"]) =>
  Effect.gen(function*() {
    const size = 3 * 1024 * 1024
    const httpPort = yield* Effect.promise(freePort)
    yield* serveHttp(tunnel, { _tag: "Http", port: httpPort }, (req, res) => {
      const seed = Number(req.url!.split("/")[2])
      res.writeHead(200, { "content-length": String(size) })
      writeInOddSlices(res, seededBody(seed, size))
    })
    for (let round = 0; round < 2; round++) {
      const readers = Array.from({ length: 6 }, (_, i) => 100 * round + i)
      const results = yield* Effect.promise(() =>
        Promise.all([
          ...readers.map((seed) => download(httpPort, `/p/${seed}`, seed % 2 === 1)),
          ...Array.from({ length: 10 }, (_, i) => leaveMidBody(httpPort, `/p/${1000 + 100 * round + i}`, 64 * 1024 * (i + 1))).map((p) => p.then(() => undefined))
        ])
      )
      readers.forEach((seed, i) => {
        const r = results[i] as { status: number; size: number; hash: string }
        assert.deepStrictEqual(r, { status: 200, size, hash: sha256(seededBody(seed, size)) }, `reader ${seed}`)
      })
    }
  })

describe("control-port tunnels: large bodies", () => {
  it.live("over TCP (the gateway giving each read back once its bytes are written): byte for byte to fast and slow readers at once, beside a raw TCP stream and callers that leave mid-body", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.scoped(Effect.gen(function*() {
        const control = Context.get(yield* gateway(), ControlPort)
        const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
        yield* exercise(tunnel)
        yield* churn(tunnel)
      }))
      yield* Effect.promise(() => expectNoLeaks(before))
    }), 60_000)

  it.live("over a WebSocket (each read given back once its frames are written, one write to the client per turn): the same, byte for byte, callers leaving mid-body too", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.scoped(Effect.gen(function*() {
        const { url } = yield* wsGateway()
        const tunnel = yield* wsClient([url])
        yield* exercise(tunnel)
        yield* churn(tunnel)
      }))
      yield* Effect.promise(() => expectNoLeaks(before))
    }), 60_000)
})
