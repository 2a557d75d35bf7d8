/**
 * How the gateway spreads requests over the backends of one route, for every kind of backend, end to
 * end on loopback: sequential requests over 2, 3 and 4 idle backends go round-robin (each backend serves
 * exactly its share), and an HTTP/2 backend whose stream slots are all taken is passed over for one with
 * room. Each backend answers its own name, so the test counts per backend.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as http2 from "node:http2"
import type * as net from "node:net"
import { setTimeout as sleep } from "node:timers/promises"
import { Context, Effect, Exit, Redacted, Scope, Stream } from "effect"
import { TunnelClient } from "../../src/services/client/TunnelClient.ts"
import { makeWspClient } from "../../src/services/client/WspClient.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { makeWspServer } from "../../src/services/front/WspServer.ts"
import { ReverseH2 } from "../../src/services/front/ReverseH2.ts"
import { Listeners } from "../../src/services/Listeners.ts"
import { exposeOverReverseHttp2 } from "../../src/runtime/serveReverseHttp2.ts"
import { noLeaks } from "../support/leaks.ts"
import { freePort, request, tcpRoundTrip } from "../services/ListenersFixtures.ts"
import { closeServer, dialBackend, type Reply, request as requestH2Port, until, withGateway } from "./reverse-h2-harness.ts"
import { client, gateway, serveHttp } from "./tunnelHarness.ts"
import { wsClient, wsGateway } from "./tunnelWsHarness.ts"
import { call, clientConfig, serverConfig, waitFor } from "./wspSupport.ts"

/** Requests per backend in each spread test. */
const share = 4
const sizes = [2, 3, 4] as const
const names = (n: number) => Array.from({ length: n }, (_, i) => `backend-${i}`)

/** Sends `share * names.length` requests one after the other and counts who answered each. */
const spread = (backends: ReadonlyArray<string>, one: () => Promise<string>) =>
  Effect.promise(async () => {
    const counts: Record<string, number> = Object.fromEntries(backends.map((name) => [name, 0]))
    for (let i = 0; i < share * backends.length; i++) {
      const name = await one()
      counts[name] = (counts[name] ?? 0) + 1
    }
    return counts
  })

/** Each backend served exactly its share, and nobody else answered. */
const assertEven = (counts: Record<string, number>, backends: ReadonlyArray<string>) =>
  assert.deepStrictEqual(counts, Object.fromEntries(backends.map((name) => [name, share])))

/** One public GET answered 200; its body (the backend's name). */
const nameFrom = (port: number) => async () => {
  const reply = await request(port, "/")
  if (reply.status !== 200) throw new Error(`status ${reply.status}: ${reply.body}`)
  return reply.body
}

const ports = [{ label: "engine" }] as const

describe("balancing: control-port tunnels (yamux over TCP)", () => {
  for (const { label } of ports) {
    for (const n of sizes) {
      it.live(`sequential requests go round-robin over ${n} idle backends (${label} port)`, () =>
        noLeaks(Effect.gen(function*() {
          const control = Context.get(yield* gateway({}), ControlPort)
          const publicPort = yield* Effect.promise(freePort)
          const backends = names(n)
          for (const name of backends) {
            const tunnel = Context.get(yield* client([control.address.port!], { label: name }), TunnelClient)
            yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (_req, res) => res.end(name))
          }
          assertEven(yield* spread(backends, nameFrom(publicPort)), backends)
        })))
    }
  }

  for (const n of sizes) {
    it.live(`sequential connections to a raw TCP route go round-robin over ${n} idle backends`, () =>
      noLeaks(Effect.gen(function*() {
        const control = Context.get(yield* gateway(), ControlPort)
        const publicPort = yield* Effect.promise(freePort)
        const backends = names(n)
        for (const name of backends) {
          const tunnel = Context.get(yield* client([control.address.port!], { label: name }), TunnelClient)
          const listener = yield* tunnel.listen({ _tag: "Tcp", port: publicPort })
          yield* Effect.forkScoped(Stream.runForEach(listener.connections, ({ socket }) =>
            Effect.sync(() => {
              socket.on("error", () => socket.destroy())
              socket.resume()
              socket.end(name)
            })))
          yield* listener.bound
        }
        assertEven(yield* spread(backends, () => tcpRoundTrip(publicPort, "who?")), backends)
      })))
  }
})

describe("balancing: control-port tunnels over WebSocket (yamux in WebSocket messages)", () => {
  for (const n of sizes) {
    it.live(`sequential requests go round-robin over ${n} idle backends`, () =>
      noLeaks(Effect.gen(function*() {
        const gw = yield* wsGateway()
        const publicPort = yield* Effect.promise(freePort)
        const backends = names(n)
        for (const name of backends) {
          const tunnel = yield* wsClient([gw.url], { label: name })
          yield* serveHttp(tunnel, { _tag: "Http", port: publicPort }, (_req, res) => res.end(name))
        }
        assertEven(yield* spread(backends, nameFrom(publicPort)), backends)
      })))
  }
})

/** A plain Node `http2` server answering `name`, with room for `maxConcurrentStreams` streams. */
const namedH2Backend = (name: string, maxConcurrentStreams?: number) =>
  http2.createServer(maxConcurrentStreams === undefined ? {} : { settings: { maxConcurrentStreams } }, (req, res) => {
    req.resume()
    res.end(name)
  })

/** A local HTTP/1.1 service answering `name` (what `switchyard client --h2` exposes). */
const namedService = (name: string) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ server: http.Server; port: number }>((resolve) => {
        const server = http.createServer((req, res) => {
          req.resume()
          res.end(name)
        })
        server.listen(0, "127.0.0.1", () => resolve({ server, port: (server.address() as net.AddressInfo).port }))
      })
    ),
    ({ server }) =>
      Effect.promise(() =>
        new Promise<void>((resolve) => {
          server.closeAllConnections()
          server.close(() => resolve())
        })
      )
  )

const h2Name = (port: number) => async () => {
  const reply = await requestH2Port(port, "/")
  if (reply.status !== 200 || reply.aborted) throw new Error(`status ${reply.status}${reply.aborted ? " (aborted)" : ""}: ${reply.body}`)
  return reply.body
}

describe("balancing: reverse HTTP/2", () => {
  for (const { label } of ports) {
    for (const n of sizes) {
      it.effect(`sequential requests go round-robin over ${n} idle plain-mode backends (${label} port)`, () =>
        Effect.gen(function*() {
          const port = yield* Effect.promise(freePort)
          yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
            const tunnel = yield* ReverseH2
            const backends = names(n)
            for (const name of backends) {
              const server = namedH2Backend(name)
              yield* closeServer(server)
              yield* dialBackend(tunnel.address.port, server)
            }
            yield* until(() => tunnel.connections() === n, `${n} backends`)
            assertEven(yield* spread(backends, h2Name(port)), backends)
          }))
        }))

      it.effect(`sequential requests go round-robin over ${n} idle client --h2 backends (${label} port)`, () =>
        Effect.gen(function*() {
          const port = yield* Effect.promise(freePort)
          const token = Redacted.make("balancing")
          yield* withGateway({ tokens: [{ name: "svc", token, ports: [port] }] }, Effect.gen(function*() {
            const tunnel = yield* ReverseH2
            const backends = names(n)
            for (const name of backends) {
              const local = yield* namedService(name)
              yield* exposeOverReverseHttp2({
                gateways: [{ host: "127.0.0.1", port: tunnel.address.port }],
                target: { host: "127.0.0.1", port: local.port },
                token,
                routes: [{ _tag: "Http", port }],
                label: name,
                // one connection each: every connection is a backend of the route, and here one service
                connections: 1
              })
            }
            yield* until(() => tunnel.connections() === n, `${n} connections`)
            assertEven(yield* spread(backends, h2Name(port)), backends)
          }))
        }))
    }

    it.effect(`a backend whose stream slots are all taken is passed over; nothing waits while another has room (${label} port)`, () =>
      Effect.gen(function*() {
        const port = yield* Effect.promise(freePort)
        yield* withGateway({ routes: [{ _tag: "Http", port }] }, Effect.gen(function*() {
          const tunnel = yield* ReverseH2
          // "narrow" allows one stream at a time, "wide" four; "narrow" is held busy by a request
          const held: Array<() => void> = []
          const narrow = http2.createServer({ settings: { maxConcurrentStreams: 1 } }, (req, res) => {
            req.resume()
            if (req.url === "/hold") held.push(() => res.end("narrow"))
            else res.end("narrow")
          })
          const wide = http2.createServer({ settings: { maxConcurrentStreams: 4 } }, (req, res) => {
            req.resume()
            if (req.url === "/hold") held.push(() => res.end("wide"))
            else res.end("wide")
          })
          for (const server of [narrow, wide]) {
            yield* closeServer(server)
            yield* dialBackend(tunnel.address.port, server)
            yield* until(() => tunnel.connections() === (server === narrow ? 1 : 2), "the backend to register")
          }
          // the first request goes to "narrow" (round-robin from the first backend) and holds its only slot
          const first = requestH2Port(port, "/hold")
          yield* until(() => held.length === 1, "the first request to start")
          assert.strictEqual(tunnel.activeStreams(), 1)
          // while it is held, every request goes to "wide" at once, none waits behind "narrow"
          const during = yield* spread(["narrow", "wide"], h2Name(port))
          assert.deepStrictEqual(during, { narrow: 0, wide: 2 * share })
          assert.strictEqual(tunnel.queued(), 0)
          // concurrent held requests fill "wide" (4 slots) before any waits
          const more: Array<Promise<Reply>> = []
          for (let i = 0; i < 4; i++) {
            more.push(requestH2Port(port, "/hold"))
            yield* until(() => held.length === i + 2, `held request ${i + 2} to start`)
          }
          assert.strictEqual(tunnel.activeStreams(), 5)
          assert.strictEqual(tunnel.queued(), 0)
          // all full: the next one waits for a slot (leased to "narrow", the least loaded), and takes the
          // first one freed, here on "wide"
          more.push(requestH2Port(port, "/"))
          yield* until(() => tunnel.queued() === 1, "a request to wait for a slot")
          held.pop()!()
          yield* until(() => tunnel.queued() === 0, "the waiting request to start", 100)
          for (const release of held.splice(0)) release()
          const replies = yield* Effect.promise(() => Promise.all([first, ...more]))
          assert.isTrue(replies.every((r) => r.status === 200 && !r.aborted))
          assert.deepStrictEqual(replies.map((r) => r.body), ["narrow", "wide", "wide", "wide", "wide", "wide"])
          const listeners = yield* Listeners
          yield* until(() => listeners.inFlight() === 0, "every lease to be released")
          // idle again: round-robin over both
          assertEven(yield* spread(["narrow", "wide"], h2Name(port)), ["narrow", "wide"])
        }))
      }))
  }
})

/**
 * A destination that counts requests per connection and, as wsp-clients are closed one at a time,
 * tells which connections each one had (its pooled connections close with it): requests per client.
 */
const countingDestination = Effect.acquireRelease(
  Effect.promise(() =>
    new Promise<{ server: http.Server; port: number; perSocket: Map<net.Socket, number>; closed: Set<net.Socket> }>((resolve) => {
      const perSocket = new Map<net.Socket, number>()
      const closed = new Set<net.Socket>()
      const server = http.createServer((req, res) => {
        req.resume()
        perSocket.set(req.socket, (perSocket.get(req.socket) ?? 0) + 1)
        res.end("ok")
      })
      // connections stay until their client closes them
      server.keepAliveTimeout = 60_000
      server.on("connection", (socket: net.Socket) => socket.once("close", () => closed.add(socket)))
      server.listen(0, "127.0.0.1", () => resolve({ server, port: (server.address() as net.AddressInfo).port, perSocket, closed }))
    })
  ),
  ({ server }) =>
    Effect.promise(() =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      })
    )
)

describe("balancing: wsp", () => {
  for (const n of sizes) {
    it.live(`sequential /request calls go round-robin over ${n} idle wsp-clients`, () =>
      noLeaks(Effect.gen(function*() {
        const destination = yield* countingDestination
        const server = yield* makeWspServer(serverConfig())
        const target = `ws://127.0.0.1:${server.address.port}/register`
        const backends = names(n)
        const scopes: Array<Scope.Closeable> = []
        for (const name of backends) {
          const scope = yield* Scope.make()
          scopes.push(scope)
          yield* makeWspClient(clientConfig(target, { id: name, poolIdleSize: 2 })).pipe(Scope.provide(scope))
        }
        yield* waitFor(`${n} pools`, () => server.stats().pools === n && server.stats().idle === 2 * n)
        const url = `http://127.0.0.1:${destination.port}/`
        for (let i = 0; i < share * n; i++) {
          const reply = yield* Effect.promise(() => call(server.address.port, { destination: url }))
          assert.strictEqual(reply.status, 200, reply.body.toString())
        }
        // which client served what: the connections that close with it
        const counts: Record<string, number> = {}
        const attributed = new Set<net.Socket>()
        for (const [i, name] of backends.entries()) {
          yield* Scope.close(scopes[i]!, Exit.void)
          // a client that served nothing has no connection to close: wait a little, not forever
          yield* Effect.promise(async () => {
            const fresh = () => [...destination.perSocket.keys()].some((s) => destination.closed.has(s) && !attributed.has(s))
            for (let t = 0; t < 50 && !fresh(); t++) await sleep(10)
            await sleep(50)
          })
          let served = 0
          for (const [socket, count] of destination.perSocket) {
            if (!destination.closed.has(socket) || attributed.has(socket)) continue
            attributed.add(socket)
            served += count
          }
          counts[name] = served
        }
        assert.strictEqual(attributed.size, destination.perSocket.size)
        assertEven(counts, backends)
      })))
  }
})
