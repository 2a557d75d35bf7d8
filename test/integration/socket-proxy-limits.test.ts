/**
 * `switchyard socket-proxy` as a process under slow clients: trickling uploads from one address cannot
 * take the pool from another address, a trickling body gets 408 once its grace period is over, and
 * each refusal is logged and counted on the admin endpoint. Every wait is bounded.
 */
import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { type ChildProcess, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { setTimeout as sleep } from "node:timers/promises"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { type EngineUpstream, startEngineUpstream } from "../services/EngineUpstream.ts"
import { getFrom, trickle } from "../support/clients.ts"

const main = path.resolve(import.meta.dirname, "../../src/runtime/main.ts")

let dir: string
let engine: EngineUpstream
let before: HandleCounts
const sockets = new Set<net.Socket>()

beforeEach(async () => {
  before = activeHandles()
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-spl-"))
  engine = await startEngineUpstream()
})

afterEach(async () => {
  for (const s of sockets) s.destroy()
  sockets.clear()
  await engine.close()
  fs.rmSync(dir, { recursive: true, force: true })
  await expectNoLeaks(before)
})

interface Proxy {
  readonly child: ChildProcess
  readonly port: number
  readonly adminPort: number
  /** Everything the process printed so far. */
  readonly output: () => string
  readonly stop: () => Promise<void>
}

/** Starts the proxy with `yaml` (listen and admin on 127.0.0.1, ephemeral ports); bounded. */
const startProxy = (yaml: string): Promise<Proxy> => {
  const config = path.join(dir, "proxy.yaml")
  fs.writeFileSync(config, `upstream: unix:${engine.socketPath}\nlisten: ["127.0.0.1:0"]\nadmin: { address: "127.0.0.1:0" }\n${yaml}`)
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [main, "socket-proxy", "--config", config], { stdio: ["ignore", "pipe", "pipe"] })
    let output = ""
    const timer = setTimeout(() => {
      child.kill("SIGKILL")
      reject(new Error(`not started within 30 s: ${output}`))
    }, 30_000)
    const stop = () =>
      new Promise<void>((done) => {
        if (child.exitCode !== null || child.signalCode !== null) return done()
        child.once("close", () => done())
        child.kill("SIGTERM")
      })
    const onData = (d: Buffer) => {
      output += d.toString()
      const port = /switchyard socket-proxy: .* on 127\.0\.0\.1:(\d+);/.exec(output)?.[1]
      const adminPort = /admin endpoint on http:\/\/127\.0\.0\.1:(\d+)/.exec(output)?.[1]
      if (port !== undefined && adminPort !== undefined) {
        clearTimeout(timer)
        resolve({ child, port: Number(port), adminPort: Number(adminPort), output: () => output, stop })
      }
    }
    child.stdout.on("data", onData)
    child.stderr.on("data", onData)
    child.on("close", (code) => {
      clearTimeout(timer)
      reject(new Error(`exited with ${code} before starting: ${output}`))
    })
  })
}

/**
 * A container create whose body comes one byte every `everyMs` from 127.0.0.1; collects what it is
 * answered until the connection closes.
 */
/** A body trickled one byte at a time: a container create (read whole by the body policy first) or an archive upload (streamed). */
const trickler = (port: number, everyMs: number, requestLine = "POST /v1.41/containers/create") => {
  const t = trickle(
    port,
    `${requestLine} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n{`,
    " ",
    everyMs
  )
  sockets.add(t.socket)
  return t
}

/** Waits until `cond` holds, at most `ms`. */
const waitFor = async (what: string, ms: number, cond: () => boolean): Promise<void> => {
  const until = performance.now() + ms
  while (performance.now() < until) {
    if (cond()) return
    await sleep(20)
  }
  throw new Error(`not within ${ms} ms: ${what}`)
}

/** The value of a sample on the admin endpoint's `/metrics`. */
const metric = async (adminPort: number, sample: string): Promise<number | undefined> => {
  const { body } = await getFrom(adminPort, "/metrics", "127.0.0.1", 5_000)
  const line = body.split("\n").find((l) => l.startsWith(sample + " "))
  return line === undefined ? undefined : Number(line.slice(sample.length + 1))
}

describe("switchyard socket-proxy (process): slow clients", () => {
  it("more trickling uploads from one address than the pool holds; another address keeps being served", async () => {
    // a pool of 4: one address holds at most 1; a request waits 500 ms for a connection, then 503 (the
    // body rate's grace period is long here, so that the cap alone keeps the pool shared)
    const proxy = await startProxy(
      "rules: [GET /_ping, PUT /containers/*/archive]\nlimits: { maxSockets: 4, upstreamSlotWaitMs: 500, requestBodyGracePeriodMs: 60000 }\n"
    )
    try {
      const uploads = Array.from({ length: 6 }, () => trickler(proxy.port, 1_000, "PUT /v1.41/containers/web/archive?path=/tmp"))
      // all but the one holding this address's share are answered 503 once the wait is over
      await waitFor("five 503s", 10_000, () => uploads.filter((u) => u.text().startsWith("HTTP/1.1 503")).length === 5)
      assert.strictEqual(uploads.filter((u) => u.text() === "").length, 1)
      // meanwhile, and while the remaining upload still trickles, 127.0.0.2 is served, each answer bounded
      for (let i = 0; i < 10; i++) {
        const r = await getFrom(proxy.port, "/v1.41/_ping", "127.0.0.2", 5_000)
        assert.deepStrictEqual(r, { status: 200, body: "OK" })
        await sleep(100)
      }
      assert.strictEqual(uploads.filter((u) => u.text() === "" && !u.socket.destroyed).length, 1)
      assert.include(uploads.find((u) => u.text() !== "")!.text(), "already holds 1 connections")
      await waitFor("the refusal logged", 5_000, () => proxy.output().includes("client 127.0.0.1: already holds its share of upstream connections"))
      assert.strictEqual(await metric(proxy.adminPort, `switchyard_client_limit_refusals_total{front_door="socket_proxy",limit="client_slots"}`), 5)
      // the uploads never reached the Engine whole
      assert.isAtMost(engine.seen.filter((s) => s.url.includes("archive")).length, 1)
    } finally {
      await proxy.stop()
    }
  })

  it("a trickling upload gets 408 once its grace period is over (240 B/s by default), and is counted", async () => {
    const proxy = await startProxy("rules: [POST /containers/create]\nlimits: { requestBodyGracePeriodMs: 500 }\n")
    try {
      const upload = trickler(proxy.port, 200)
      await Promise.race([upload.closed, sleep(8_000).then(() => assert.fail("the trickling upload is still open after 8 s"))])
      assert.match(upload.text(), /^HTTP\/1\.1 408 /)
      assert.include(upload.text(), "request body arrived slower than 240 bytes/s")
      await waitFor("the cut logged", 5_000, () => proxy.output().includes("client 127.0.0.1: request body below the minimum data rate"))
      assert.strictEqual(await metric(proxy.adminPort, `switchyard_client_limit_refusals_total{front_door="socket_proxy",limit="request_body_rate"}`), 1)
      // a body at a normal rate still goes through
      const created = await new Promise<{ status: number; body: string }>((resolve, reject) => {
        const req = http.request({ host: "127.0.0.1", port: proxy.port, method: "POST", path: "/v1.41/containers/create", agent: false }, (res) => {
          let body = ""
          res.on("data", (c) => (body += c))
          res.on("end", () => resolve({ status: res.statusCode!, body }))
        })
        req.setTimeout(5_000, () => req.destroy(new Error("no answer within 5 s")))
        req.on("error", reject)
        req.end(JSON.stringify({ Image: "alpine" }))
      })
      assert.strictEqual(created.status, 201)
    } finally {
      await proxy.stop()
    }
  })
})
