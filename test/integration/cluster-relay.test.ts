/**
 * Three gateways in a cluster on Debian's `redis-server`, their public ports on 127.0.0.11, .12 and .13:
 * a backend connected to g1 only answers through all three (HTTP and raw TCP), the relayed request
 * reaches the backend once (one hop) with the public client named in X-Forwarded-For, a relay link
 * refuses a gateway without the secret, and a route whose backend left queues requests on every gateway
 * until a backend comes back anywhere.
 */
import { assert, beforeEach, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { Effect } from "effect"
import { decodeRelayChallenge, encodeRelayHello, encodeRelayProof } from "../../src/domain/ClusterRelay.ts"
import { listen, type TunnelServer } from "../../src/runtime/listen.ts"
import { addressAfter, freePort, get, spawnSwitchyard } from "../runtime/serverProcess.ts"
import { cleanupsPerTest } from "../support/leaks.ts"
import { type RedisServer, requireRedis, startRedis } from "../support/redis.ts"

const Token = "cluster-relay-token-51d0a7"
const Secret = "cluster-relay-secret-0f93b6c2"
const LeaseTtlMs = 3_000
const HeartbeatMs = 300
const PublicHosts = ["127.0.0.11", "127.0.0.12", "127.0.0.13"] as const
/** Longest wait for a route to be served through every gateway. */
const ServedWithinMs = 15_000

const cleanups = cleanupsPerTest()
let dir: string

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-cluster-relay-"))
  const mine = dir
  cleanups.push(async () => fs.rmSync(mine, { recursive: true, force: true }))
})

interface Gateway {
  readonly node: string
  readonly host: string
  readonly control: { host: string; port: number }
  readonly admin: { host: string; port: number }
  readonly stop: (signal?: NodeJS.Signals) => Promise<number | null>
  readonly output: () => string
}

const startGateway = async (redis: RedisServer, index: number, secret = Secret, extra: ReadonlyArray<string> = []): Promise<Gateway> => {
  const node = `g${index + 1}`
  const relay = await freePort()
  const proc = spawnSwitchyard([
    "server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--token", Token, "--public-host", PublicHosts[index]!,
    "--cluster-redis", redis.url, "--cluster-node", node, "--cluster-advertise", `127.0.0.1:${relay}`,
    "--set", `cluster.lease_ttl_ms=${LeaseTtlMs}`, "--set", `cluster.heartbeat_ms=${HeartbeatMs}`, ...extra
  ], { SWITCHYARD_CLUSTER_SECRET: secret })
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor("expose a local service")
  return {
    node,
    host: PublicHosts[index]!,
    control: addressAfter(proc.output(), /control port/),
    admin: addressAfter(proc.output(), /admin endpoint/),
    stop: proc.stop,
    output: proc.output
  }
}

const withRedis = async (): Promise<RedisServer> => {
  const redis = await startRedis()
  cleanups.push(() => redis.cleanup())
  return redis
}

const startHttpBackend = async (control: { port: number }, port: number, name: string): Promise<{ tunnel: TunnelServer; hits: () => number }> => {
  let hits = 0
  const tunnel = await listen({ port, http: { pathPrefix: "/" } }, { server: `127.0.0.1:${control.port}`, token: Token, timeoutMs: 20_000 })
  const server = tunnel.serve(http.createServer((req, res) => {
    hits++
    res.end(`${name} ${req.url} xff=${req.headers["x-forwarded-for"]}`)
  }))
  cleanups.push(() => new Promise<void>((resolve) => tunnel.close(() => { server.close(); resolve() })))
  return { tunnel, hits: () => hits }
}

/** Waits until a process has printed a line matching `pattern`, failing after `ServedWithinMs`. */
const waitForOutput = async (output: () => string, pattern: RegExp): Promise<void> => {
  const deadline = Date.now() + ServedWithinMs
  while (Date.now() < deadline && !pattern.test(output())) await new Promise((r) => setTimeout(r, 50))
  assert.match(output(), pattern)
}

interface Reply {
  readonly status: number
  readonly body: string
}

const request = (host: string, port: number, p: string, timeoutMs = 10_000): Promise<Reply> =>
  new Promise((resolve, reject) => {
    const req = http.get({ host, port, path: p, agent: false, timeout: timeoutMs }, (res) => {
      let body = ""
      res.setEncoding("utf8")
      res.on("data", (c) => (body += c))
      res.on("end", () => resolve({ status: res.statusCode!, body }))
      res.on("error", reject)
    })
    req.on("timeout", () => req.destroy(new Error(`no answer from ${host}:${port} within ${timeoutMs} ms`)))
    req.on("error", reject)
  })

/** Retries until `host:port` answers 200, failing after `ServedWithinMs` with the last answer. */
const servedThrough = async (host: string, port: number, p: string): Promise<Reply> => {
  const deadline = Date.now() + ServedWithinMs
  let last: string = "nothing"
  while (Date.now() < deadline) {
    try {
      const reply = await request(host, port, p, 2_000)
      if (reply.status === 200) return reply
      last = `${reply.status} ${reply.body}`
    } catch (e) {
      last = (e as Error).message
    }
    await new Promise((r) => setTimeout(r, 100))
  }
  throw new Error(`${host}:${port}${p} not served within ${ServedWithinMs} ms: ${last}`)
}

describe.runIf(requireRedis())("cluster relay between three gateways", () => {
  it.live("a backend connected to g1 only answers through g1, g2 and g3, one hop, with the client in X-Forwarded-For", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const gateways = await Promise.all([0, 1, 2].map((i) => startGateway(redis, i)))
      const port = await freePort()
      const backend = await startHttpBackend(gateways[0]!.control, port, "b1")
      for (const g of gateways) {
        const reply = await servedThrough(g.host, port, `/from-${g.node}`)
        assert.match(reply.body, new RegExp(`^b1 /from-${g.node} xff=`))
        const xff = /xff=(.*)$/.exec(reply.body)![1]!.split(", ")
        // g1 serves it locally (the client only); g2 and g3 relay it (the client, then the relaying gateway)
        assert.strictEqual(xff.length, g.node === "g1" ? 1 : 2, reply.body)
        assert.match(xff[0]!, /^127\./)
      }
      // each request reached the backend once
      const before = backend.hits()
      for (let i = 0; i < 10; i++) assert.strictEqual((await request(gateways[1]!.host, port, `/n${i}`)).status, 200)
      assert.strictEqual(backend.hits() - before, 10)
      // g2 lists the route with its relay backend; g1 only publishes it
      const status = JSON.parse((await get(gateways[1]!.admin.port, "/status")).body)
      const route = status.routes.find((r: { route: string }) => r.route === `http:${port}::/`)
      assert.deepStrictEqual(route.backends.length, 1)
      assert.match(route.backends[0], /^relay g1 127\.0\.0\.1:\d+$/)
    }))

  it.live("a raw TCP route on g1 is piped through g2 and g3", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const gateways = await Promise.all([0, 1, 2].map((i) => startGateway(redis, i)))
      const port = await freePort()
      const tunnel = await listen({ port, tcp: true }, { server: `127.0.0.1:${gateways[0]!.control.port}`, token: Token, timeoutMs: 20_000 })
      tunnel.on("connection", (socket: net.Socket) => {
        socket.on("data", (d) => socket.write(`echo:${d.toString()}`))
        socket.on("end", () => socket.end())
      })
      cleanups.push(() => new Promise<void>((resolve) => tunnel.close(() => resolve())))
      for (const g of gateways.slice(1)) {
        const deadline = Date.now() + ServedWithinMs
        let answer = ""
        while (Date.now() < deadline && answer === "") {
          answer = await new Promise<string>((resolve) => {
            const socket = net.connect({ host: g.host, port }, () => socket.write(`hi ${g.node}`))
            const timer = setTimeout(() => socket.destroy(), 2_000)
            socket.on("data", (d) => {
              clearTimeout(timer)
              // a clean close both ways: the backend ends its side when this one ends
              socket.end()
              resolve(d.toString())
            })
            socket.on("error", () => {})
            socket.on("close", () => {
              clearTimeout(timer)
              resolve("")
            })
          })
          if (answer === "") await new Promise((r) => setTimeout(r, 100))
        }
        assert.strictEqual(answer, `echo:hi ${g.node}`)
      }
    }))

  it.live("a gateway without the cluster secret gets no relay link; a wrong proof is refused and said", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const g1 = await startGateway(redis, 0)
      const intruder = await startGateway(redis, 1, "not-the-cluster-secret-44", ["--set", "grace_period_ms=1000"])
      const port = await freePort()
      await startHttpBackend(g1.control, port, "b1")
      assert.strictEqual((await servedThrough(g1.host, port, "/")).status, 200)
      // the intruder reads g1's lease (Redis is shared), but g1 cannot prove to it a secret it shares
      await waitForOutput(intruder.output, /relay link to 127\.0\.0\.1:\d+ down: .*did not prove the cluster secret/)
      // its only holder unreachable, the request waits out the grace period, then 503
      const reply = await request(intruder.host, port, "/", 10_000)
      assert.strictEqual(reply.status, 503, reply.body)

      // a dialer that answers the challenge with a proof made without the secret is refused by g1
      const status = JSON.parse((await get(g1.admin.port, "/status")).body)
      const relay = status.listeners.find((l: { name: string }) => l.name === "cluster_relay").address as string
      const [host, relayPort] = [relay.slice(0, relay.lastIndexOf(":")), Number(relay.slice(relay.lastIndexOf(":") + 1))]
      const closedBy = await new Promise<string>((resolve) => {
        const socket = net.connect({ host, port: relayPort }, () => {
          socket.write(encodeRelayHello({ _tag: "RelayHello", v: 1, node: "intruder", nonce: Buffer.alloc(32, 7).toString("base64url") }))
        })
        let received = Buffer.alloc(0)
        socket.on("data", (d) => {
          received = Buffer.concat([received, d])
          if (received.length >= 4 && received.length >= 4 + received.readUInt32BE(0)) {
            const challenge = decodeRelayChallenge(received.subarray(4, 4 + received.readUInt32BE(0)))
            assert.strictEqual((challenge as { node: string }).node, "g1")
            received = Buffer.alloc(1 << 20)
            socket.write(encodeRelayProof({ _tag: "RelayProof", proof: Buffer.alloc(32, 1).toString("base64url") }))
          }
        })
        socket.on("error", () => {})
        socket.on("close", () => resolve("closed"))
      })
      assert.strictEqual(closedBy, "closed")
      await waitForOutput(g1.output, /level=warn.*relay link from 127\.0\.0\.1:\d+ refused: BadProof: gateway \\?"intruder\\?" did not prove the cluster secret/i)
      const errors = JSON.parse((await get(g1.admin.port, "/status")).body).recentErrors.map((e: { message: string }) => e.message)
      assert.isTrue(errors.some((m: string) => /relay link from .* refused/.test(m)), JSON.stringify(errors))
    }))
})
