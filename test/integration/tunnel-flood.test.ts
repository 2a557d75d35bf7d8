/**
 * `switchyard server` as a child process, a healthy tenant tunnelled in with `listen()`, and a second
 * signed-in backend that floods its session: fresh-stream SYNs, or Pings past a configured frame rate.
 * The flooding session is ended with GoAway(protocol error), counted and logged, while the healthy
 * tenant's requests (and the admin endpoint) keep answering within a bound. Heavy legitimate traffic
 * never trips the default limits.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as net from "node:net"
import { Effect, Redacted } from "effect"
import { encodeHello, FrameHeaderBytes, ProtocolVersion } from "../../src/domain/ControlMessage.ts"
import * as F from "../../src/domain/Frame.ts"
import { writeHeader } from "../../src/domain/FrameCodec.ts"
import { listen } from "../../src/runtime/listen.ts"
import { cleanupsPerTest } from "../support/leaks.ts"
import { addressAfter, freePort, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"

const Token = "flood-test-token-3d9e41"
/**
 * Longest a healthy tenant's request (or /healthz) may take while another session floods: below the 2 s
 * stalls a SYN flood caused before the limits, with room for a test machine busy with other work.
 */
const HealthyBoundMs = 2_000
/** Frames the flooding backend writes (12 bytes each), in writes of `FloodBatch` frames. */
const FloodFrames = 200_000
const FloodBatch = 2_000

const cleanups = cleanupsPerTest()

const startServer = async (args: ReadonlyArray<string> = []) => {
  const proc = spawnSwitchyard(["server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--token", Token, ...args])
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor("expose a local service")
  return { proc, control: addressAfter(proc.output(), /control port/), admin: addressAfter(proc.output(), /admin endpoint/) }
}

/** A healthy backend on its own public port. */
const startHealthy = async (controlPort: number, handler: http.RequestListener = (_req, res) => res.end("healthy")) => {
  const port = await freePort()
  const tunnel = await listen({ port }, { server: `127.0.0.1:${controlPort}`, token: Token, timeoutMs: 20_000 })
  const server = tunnel.serve(http.createServer(handler))
  cleanups.push(() => new Promise<void>((resolve) => tunnel.close(() => { server.close(); resolve() })))
  return port
}

/**
 * Signs in, then writes `total` frames (`frameAt(i)` gives type, flags, stream id, length) as fast as the
 * connection takes them; resolves once the gateway has closed the connection, with what it sent after
 * its Welcome (yamux frames, all header-only here) and how many frames went out.
 */
const flood = (controlPort: number, frameAt: (i: number) => readonly [F.FrameType, number, number, number]) =>
  new Promise<{ frames: ReadonlyArray<{ type: number; length: number }>; written: number; seconds: number }>((resolve) => {
    let started = 0
    const socket = net.connect({ host: "127.0.0.1", port: controlPort }, () => {
      socket.write(encodeHello({ _tag: "Hello", version: ProtocolVersion, token: Redacted.make(Token), listeners: [] }))
    })
    const chunks: Array<Buffer> = []
    let written = 0
    const pump = () => {
      while (written < FloodFrames && !socket.destroyed) {
        const n = Math.min(FloodBatch, FloodFrames - written)
        const batch = Buffer.allocUnsafe(n * F.HEADER_SIZE)
        for (let k = 0; k < n; k++) {
          const [type, flags, id, length] = frameAt(written + k)
          writeHeader(batch, k * F.HEADER_SIZE, type, flags, id, length)
        }
        written += n
        if (!socket.write(batch)) return void socket.once("drain", pump)
      }
    }
    socket.once("data", () => {
      started = performance.now()
      pump()
    })
    socket.on("data", (c: Buffer) => chunks.push(c))
    socket.on("error", () => {})
    socket.on("close", () => {
      const all = Buffer.concat(chunks)
      const welcome = FrameHeaderBytes + all.readUInt32BE(0)
      const frames: Array<{ type: number; length: number }> = []
      for (let at = welcome; at + F.HEADER_SIZE <= all.length; at += F.HEADER_SIZE) {
        frames.push({ type: all[at + 1]!, length: all.readUInt32BE(at + 8) })
      }
      resolve({ frames, written, seconds: (performance.now() - started) / 1000 })
    })
  })

/**
 * Sequential requests to the healthy tenant and to /healthz while `attack` runs, and for a moment
 * after; returns the slowest of each and how many were answered 200.
 */
const measureWhile = async <A>(publicPort: number, adminPort: number, attack: Promise<A>) => {
  let over = false
  const result = attack.finally(() => setTimeout(() => (over = true), 300))
  let slowest = 0
  let slowestHealthz = 0
  let ok = 0
  let asked = 0
  while (!over || asked < 20) {
    asked++
    const t0 = performance.now()
    const res = await get(publicPort, "/")
    slowest = Math.max(slowest, performance.now() - t0)
    if (res.status === 200 && res.body === "healthy") ok++
    const t1 = performance.now()
    await get(adminPort, "/healthz")
    slowestHealthz = Math.max(slowestHealthz, performance.now() - t1)
  }
  return { attacked: await result, slowest, slowestHealthz, ok, asked }
}

describe("a flooding backend session beside a healthy tenant", () => {
  it.live("fresh-stream SYNs: the session ends with GoAway(protocol error) and the healthy tenant keeps its latency", () =>
    Effect.promise(async () => {
      const { proc, control, admin } = await startServer()
      const publicPort = await startHealthy(control.port)
      assert.strictEqual((await get(publicPort, "/")).status, 200)
      // the backend is the yamux server side: it would open even ids
      const m = await measureWhile(publicPort, admin.port, flood(control.port, (i) => [F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 2 * (i + 1), 0]))
      assert.strictEqual(m.ok, m.asked, `${m.asked - m.ok} of ${m.asked} healthy requests failed`)
      assert.isBelow(m.slowest, HealthyBoundMs, `slowest healthy request ${Math.round(m.slowest)} ms`)
      assert.isBelow(m.slowestHealthz, HealthyBoundMs, `slowest /healthz ${Math.round(m.slowestHealthz)} ms`)
      const goAways = m.attacked.frames.filter((f) => f.type === F.TYPE_GO_AWAY).map((f) => f.length)
      assert.deepStrictEqual(goAways, [F.GO_AWAY_PROTOCOL_ERROR])
      // cut off long before the flood was through: at most the bucket's worth of SYNs was taken in
      const refused = m.attacked.frames.filter((f) => f.type === F.TYPE_WINDOW_UPDATE).length
      assert.isAtMost(refused, 200)
      const metrics = (await get(admin.port, "/metrics")).body
      assert.strictEqual(sample(metrics, "switchyard_protocol_errors_total", { front_door: "control", kind: "StreamOpenRateExceeded" }), 1)
      await proc.waitFor(/ended: the peer opened streams faster than 100 per second; sent GoAway\(protocol error\)/, 5_000)
      const status = JSON.parse((await get(admin.port, "/status")).body) as { recentErrors: ReadonlyArray<{ message: string }> }
      assert.isTrue(status.recentErrors.some((e) => e.message.includes("StreamOpenRateExceeded")))
    }), 60_000)

  it.live("frames past control.max_peer_frames_per_second: the session ends with GoAway(protocol error), the healthy tenant is served", () =>
    Effect.promise(async () => {
      const { proc, control, admin } = await startServer(["--set", "control.max_peer_frames_per_second=20000"])
      const publicPort = await startHealthy(control.port)
      const m = await measureWhile(publicPort, admin.port, flood(control.port, (i) => [F.TYPE_PING, F.FLAG_SYN, 0, i]))
      assert.strictEqual(m.ok, m.asked, `${m.asked - m.ok} of ${m.asked} healthy requests failed`)
      assert.isBelow(m.slowest, HealthyBoundMs, `slowest healthy request ${Math.round(m.slowest)} ms`)
      assert.isBelow(m.slowestHealthz, HealthyBoundMs, `slowest /healthz ${Math.round(m.slowestHealthz)} ms`)
      assert.include(m.attacked.frames.filter((f) => f.type === F.TYPE_GO_AWAY).map((f) => f.length), F.GO_AWAY_PROTOCOL_ERROR)
      // Pings answered before the cut: no more than the bucket held plus what it refilled while the
      // flood lasted (a loaded machine sends the flood more slowly)
      assert.isAtMost(m.attacked.frames.filter((f) => f.type === F.TYPE_PING).length, 20_001 + Math.ceil(20_000 * m.attacked.seconds))
      const metrics = (await get(admin.port, "/metrics")).body
      assert.strictEqual(sample(metrics, "switchyard_protocol_errors_total", { front_door: "control", kind: "FrameRateExceeded" }), 1)
      await proc.waitFor(/ended: the peer sent frames faster than 20000 per second/, 5_000)
    }), 60_000)

  it.live("heavy legitimate traffic (concurrent small requests, a download, many small writes) trips no default limit", () =>
    Effect.promise(async () => {
      const { control, admin } = await startServer()
      const chunk = Buffer.alloc(1024 * 1024, 7)
      const publicPort = await startHealthy(control.port, (req, res) => {
        let n = 0
        const write = (count: number, piece: () => Buffer | string) => {
          const more = () => {
            while (n < count) {
              n++
              if (!res.write(piece())) return void res.once("drain", more)
            }
            res.end()
          }
          more()
        }
        if (req.url === "/download") write(32, () => chunk)
        else if (req.url === "/chatty") write(20_000, () => "0123456789abcdef0123456789abcdef")
        else res.end("healthy")
      })
      const agent = new http.Agent({ keepAlive: true, maxSockets: 64 })
      cleanups.push(async () => agent.destroy())
      const fetchLength = (p: string) =>
        new Promise<number>((resolve, reject) => {
          http.get({ host: "127.0.0.1", port: publicPort, path: p, agent }, (res) => {
            let n = 0
            res.on("data", (c: Buffer) => (n += c.length))
            res.on("end", () => resolve(n))
            res.on("error", reject)
          }).on("error", reject)
        })
      const until = performance.now() + 2_000
      const small = Array.from({ length: 64 }, async () => {
        let n = 0
        while (performance.now() < until) n += (await fetchLength("/")) > 0 ? 1 : 0
        return n
      })
      const [downloaded, chatty, counts] = await Promise.all([
        fetchLength("/download"),
        Promise.all(Array.from({ length: 4 }, () => fetchLength("/chatty"))),
        Promise.all(small)
      ])
      assert.strictEqual(downloaded, 32 * chunk.length)
      assert.deepStrictEqual(chatty, [640_000, 640_000, 640_000, 640_000])
      assert.isAbove(counts.reduce((a, b) => a + b, 0), 64)
      const metrics = (await get(admin.port, "/metrics")).body
      for (const kind of ["StreamOpenRateExceeded", "FrameRateExceeded"]) {
        assert.strictEqual(sample(metrics, "switchyard_protocol_errors_total", { front_door: "control", kind }), 0, kind)
      }
      assert.strictEqual(sample(metrics, "switchyard_sessions", { front_door: "control" }), 1)
    }), 60_000)
})
