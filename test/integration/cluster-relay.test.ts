/**
 * Three gateways in a cluster on Debian's `redis-server`, their public ports on 127.0.0.11, .12 and .13:
 * a backend connected to g1 only answers through all three (HTTP and raw TCP), the relayed request
 * reaches the backend once (one hop) with the public client named in X-Forwarded-For, a relay link
 * refuses a gateway without the secret, and a route whose backend left queues requests on every gateway
 * until a backend comes back anywhere.
 */
import { assert, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { Effect } from "effect"
import { decodeRelayChallenge, encodeRelayHello, encodeRelayProof } from "../../src/domain/ClusterRelay.ts"
import { listen } from "../../src/runtime/listen.ts"
import { freePort, get, sample } from "../runtime/serverProcess.ts"
import { requireRedis } from "../support/redis.ts"
import { cleanups, request, ServedWithinMs, servedThrough, startGateway, startHttpBackend, Token, waitForOutput, withRedis } from "./clusterHarness.ts"

describe.runIf(requireRedis())("cluster relay between three gateways", () => {
  it.live("a backend connected to g1 only answers through g1, g2 and g3, one hop, with the client in X-Forwarded-For", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const gateways = await Promise.all([0, 1, 2].map((i) => startGateway(redis, i, undefined, ["--set", "log.access_log=true"])))
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
      // the access logs and metrics say which gateway served and that the request was relayed
      await waitForOutput(gateways[1]!.output, /log=access .*path=\/n9 .*node=g1 relayed=true/)
      await waitForOutput(gateways[0]!.output, /log=access .*path=\/n9 .*node=g1 relayed=true/)
      await waitForOutput(gateways[0]!.output, /log=access .*path=\/from-g1 .*node=g1 relayed=false/)
      const out = (await get(gateways[1]!.admin.port, "/metrics")).body
      assert.isAtLeast(sample(out, "switchyard_cluster_relayed_requests_total", { direction: "out", node: "g1" }), 11)
      const inbound = (await get(gateways[0]!.admin.port, "/metrics")).body
      assert.isAtLeast(sample(inbound, "switchyard_cluster_relayed_requests_total", { direction: "in", node: "g2" }), 11)
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

  it.live("a route keeps its owner on every gateway: another token cannot take it over on a gateway that relays it", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-cluster-owner-")), "server.yaml")
      cleanups.push(async () => fs.rmSync(path.dirname(file), { recursive: true, force: true }))
      fs.writeFileSync(file, [
        "control:",
        "  tokens:",
        "    - { name: team-a, token: team-a-token-5e1f2b9c, ports: [\"1-65535\"] }",
        "    - { name: team-b, token: team-b-token-7d3a4c8e, ports: [\"1-65535\"] }"
      ].join("\n"))
      const [g1, g2] = await Promise.all([0, 1].map((i) => startGateway(redis, i, undefined, ["--config", file], undefined, false)))
      const port = await freePort()
      const owned = await listen({ port, http: { pathPrefix: "/" } }, { server: `127.0.0.1:${g1!.control.port}`, token: "team-a-token-5e1f2b9c", timeoutMs: 20_000 })
      const server = owned.serve(http.createServer((_req, res) => res.end("team-a")))
      cleanups.push(() => new Promise<void>((resolve) => owned.close(() => { server.close(); resolve() })))
      assert.strictEqual((await servedThrough(g2!.host, port, "/")).body, "team-a")
      const taken = listen({ port, http: { pathPrefix: "/" } }, { server: `127.0.0.1:${g2!.control.port}`, token: "team-b-token-7d3a4c8e", timeoutMs: 10_000 })
      const refusal = await taken.then((t) => new Promise<string>((resolve) => t.close(() => resolve("bound")))).catch((e: Error) => e.message)
      assert.match(refusal, /Conflict: .*belongs to another token/)
      assert.strictEqual((await request(g2!.host, port, "/")).body, "team-a")
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
