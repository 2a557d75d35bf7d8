/**
 * Public-port connection limits with a healthy tenant beside an attacker: idle or trickling connections
 * from one address cannot take a public port away from other clients, and silent connections are closed.
 * The attacker connects from 127.0.0.1 (and 127.0.0.3/.4), the healthy client from 127.0.0.2.
 */
import { describe, expect, it } from "@effect/vitest"
import { Context, Effect } from "effect"
import * as http from "node:http"
import * as net from "node:net"
import { TunnelClient } from "../../src/services/client/TunnelClient.ts"
import type { PublicConnectionAction } from "../../src/services/Listeners.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { freePort } from "../services/ListenersFixtures.ts"
import { noLeaks } from "../support/leaks.ts"
import { client, gateway, serveHttp } from "./tunnelHarness.ts"

/** A connection from `localAddress`, open once connected; `closed` resolves when the gateway closes it. */
const connectFrom = (port: number, localAddress: string) =>
  new Promise<{ socket: net.Socket; closed: Promise<void> }>((resolve, reject) => {
    const socket = net.connect({ port, host: "127.0.0.1", localAddress })
    const closed = new Promise<void>((r) => socket.once("close", () => r()))
    socket.on("error", () => {})
    socket.once("connect", () => resolve({ socket, closed }))
    socket.once("error", reject)
  })

/** A GET from `localAddress` that must complete within `limitMs`. */
const getFrom = (port: number, localAddress: string, limitMs = 3_000) =>
  new Promise<number>((resolve, reject) => {
    const req = http.get({ host: "127.0.0.1", port, localAddress, path: "/", agent: false }, (res) => {
      res.resume()
      res.on("end", () => resolve(res.statusCode ?? 0))
    })
    req.setTimeout(limitMs, () => req.destroy(new Error(`no answer within ${limitMs} ms`)))
    req.on("error", reject)
  })

const within = <A>(promise: Promise<A>, limitMs: number, what: string): Promise<A> =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what}: not within ${limitMs} ms`)), limitMs)
    promise.then((a) => {
      clearTimeout(timer)
      resolve(a)
    }, reject)
  })

const setup = (silentConnectionTimeoutMs: number) =>
  Effect.gen(function*() {
    const actions: Array<[PublicConnectionAction, string | undefined]> = []
    const port = yield* Effect.promise(freePort)
    const gw = yield* gateway({
      publicConnections: {
        maxConnectionsPerPort: 20,
        maxConnectionsPerAddress: 10,
        silentConnectionTimeoutMs,
        onConnectionLimit: (_port, action, address) => void actions.push([action, address])
      }
    })
    const control = Context.get(gw, ControlPort)
    const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
    yield* serveHttp(tunnel, { _tag: "Http", port }, (_req, res) => res.end("healthy"))
    const sockets: Array<net.Socket> = []
    yield* Effect.addFinalizer(() => Effect.sync(() => sockets.forEach((s) => s.destroy())))
    const open = (localAddress: string) =>
      Effect.promise(async () => {
        const c = await connectFrom(port, localAddress)
        sockets.push(c.socket)
        return c
      })
    return { port, actions, open }
  })

describe("public port connection limits", () => {
  it.live("silent connections from one address make room for newcomers, and another address is served", () =>
    noLeaks(Effect.gen(function*() {
      const { port, actions, open } = yield* setup(0)
      const first = yield* open("127.0.0.1")
      for (let i = 1; i < 10; i++) yield* open("127.0.0.1")
      // the eleventh from the same address evicts the oldest silent one
      yield* open("127.0.0.1")
      yield* Effect.promise(() => within(first.closed, 3_000, "the oldest silent connection closed"))
      expect(actions).toContainEqual(["EvictedIdle", "127.0.0.1"])
      expect(yield* Effect.promise(() => getFrom(port, "127.0.0.2"))).toBe(200)
      // fill the port with silent connections from two more addresses: the healthy client still gets in
      for (let i = 0; i < 10; i++) yield* open("127.0.0.3")
      for (let i = 0; i < 10; i++) yield* open("127.0.0.4")
      expect(yield* Effect.promise(() => getFrom(port, "127.0.0.2"))).toBe(200)
    })))

  it.live("an address whose connections all talk is refused more, while another address is served", () =>
    noLeaks(Effect.gen(function*() {
      const { port, actions, open } = yield* setup(0)
      for (let i = 0; i < 10; i++) {
        const c = yield* open("127.0.0.1")
        c.socket.write("GET / HT") // a head begun, never finished
      }
      // wait (bounded) until the gateway has read the partial heads
      yield* Effect.sleep("500 millis")
      const refused = yield* open("127.0.0.1")
      yield* Effect.promise(() => within(refused.closed, 3_000, "the eleventh connection refused"))
      expect(actions).toContainEqual(["AddressFull", "127.0.0.1"])
      expect(yield* Effect.promise(() => getFrom(port, "127.0.0.2"))).toBe(200)
    })))

  it.live("keep-alive connections waiting between requests make room too, oldest first", () =>
    noLeaks(Effect.gen(function*() {
      const { actions, open } = yield* setup(0)
      const held: Array<{ socket: net.Socket; closed: Promise<void> }> = []
      for (let i = 0; i < 10; i++) {
        const c = yield* open("127.0.0.1")
        // one whole request answered, then the connection waits for the next one
        yield* Effect.promise(() =>
          new Promise<void>((resolve) => {
            c.socket.once("data", () => resolve())
            c.socket.write("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
          })
        )
        held.push(c)
      }
      yield* open("127.0.0.1")
      yield* Effect.promise(() => within(held[0]!.closed, 3_000, "the oldest idle connection closed"))
      expect(actions).toContainEqual(["EvictedIdle", "127.0.0.1"])
      expect(held[1]!.socket.destroyed).toBe(false)
    })))

  it.live("a connection that sends nothing is closed after the silent timeout; one that talks is not", () =>
    noLeaks(Effect.gen(function*() {
      const { port, actions, open } = yield* setup(200)
      const silent = yield* open("127.0.0.1")
      const talking = yield* open("127.0.0.1")
      talking.socket.write("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
      yield* Effect.promise(() => within(silent.closed, 3_000, "the silent connection closed"))
      expect(actions).toContainEqual(["SilentTimeout", "127.0.0.1"])
      expect(talking.socket.destroyed).toBe(false)
      expect(yield* Effect.promise(() => getFrom(port, "127.0.0.2"))).toBe(200)
    })))
})
