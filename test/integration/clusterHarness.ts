/**
 * Gateways of a cluster as child processes for the cluster tests: a private redis-server, gateways whose
 * public ports bind to 127.0.0.11, .12 and .13, HTTP backends tunnelled in with `listen()`, and requests
 * with bounded waits.
 */
import * as http from "node:http"
import { assert } from "@effect/vitest"
import { listen, type TunnelServer } from "../../src/runtime/listen.ts"
import { addressAfter, freePort, spawnSwitchyard } from "../runtime/serverProcess.ts"
import { cleanupsPerTest } from "../support/leaks.ts"
import { type RedisServer, startRedis } from "../support/redis.ts"

export const Token = "cluster-relay-token-51d0a7"
export const Secret = "cluster-relay-secret-0f93b6c2"
export const LeaseTtlMs = 3_000
export const HeartbeatMs = 300
export const PublicHosts = ["127.0.0.11", "127.0.0.12", "127.0.0.13"] as const
/** Longest wait for a route to be served through every gateway. */
export const ServedWithinMs = 15_000

export const cleanups = cleanupsPerTest()

export interface Gateway {
  readonly node: string
  readonly host: string
  readonly control: { host: string; port: number }
  readonly admin: { host: string; port: number }
  readonly stop: (signal?: NodeJS.Signals) => Promise<number | null>
  readonly output: () => string
}

export const startGateway = async (
  redis: RedisServer,
  index: number,
  secret = Secret,
  extra: ReadonlyArray<string> = [],
  ports?: { readonly control: number; readonly relay: number },
  withToken = true
): Promise<Gateway> => {
  const node = `g${index + 1}`
  const relay = ports?.relay ?? await freePort()
  const proc = spawnSwitchyard([
    "server", "--control", `127.0.0.1:${ports?.control ?? 0}`, "--admin", "127.0.0.1:0", ...(withToken ? ["--token", Token] : []), "--public-host", PublicHosts[index]!,
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

export const withRedis = async (): Promise<RedisServer> => {
  const redis = await startRedis()
  cleanups.push(() => redis.cleanup())
  return redis
}

export const startHttpBackend = async (control: { port: number }, port: number, name: string): Promise<{ tunnel: TunnelServer; hits: () => number }> => {
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
export const waitForOutput = async (output: () => string, pattern: RegExp): Promise<void> => {
  const deadline = Date.now() + ServedWithinMs
  while (Date.now() < deadline && !pattern.test(output())) await new Promise((r) => setTimeout(r, 50))
  assert.match(output(), pattern)
}

export interface Reply {
  readonly status: number
  readonly body: string
}

export const request = (host: string, port: number, p: string, timeoutMs = 10_000): Promise<Reply> =>
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
export const servedThrough = async (host: string, port: number, p: string): Promise<Reply> => {
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

