/**
 * A backend whose yamux session sends GoAway(normal) is drained: the Dispatcher stops picking it,
 * requests in flight on it finish, requests that were headed to it but never reached it go to another
 * backend of the route, and the gateway closes the session once it is idle. A healthy backend on the
 * same route keeps answering throughout. The GoAway backend is hand-driven (handshake, then our own
 * yamux Session as the server side) so the test decides when the GoAway goes out.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import type { Duplex } from "node:stream"
import { Context, Effect, Redacted } from "effect"
import { decodeHelloReply, encodeHello, FrameHeaderBytes, makeHello, MaxControlMessageBytes } from "../../src/domain/ControlMessage.ts"
import type { RouteDefinition } from "../../src/domain/Route.ts"
import * as NodeTransport from "../../src/runtime/NodeTransport.ts"
import { TunnelClient } from "../../src/services/client/TunnelClient.ts"
import { readFrame, writeFrame } from "../../src/services/front/ControlHandshake.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { Registry } from "../../src/services/Registry.ts"
import * as Session from "../../src/services/yamux/Session.ts"
import { makeStreamDuplex } from "../../src/services/yamux/StreamDuplex.ts"
import { tunnelYamuxConfig } from "../../src/services/yamux/YamuxConfig.ts"
import { listen } from "../../src/runtime/listen.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { addressAfter, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"
import { freePort, request } from "../services/ListenersFixtures.ts"
import { client, gateway, grants, serveHttp, token } from "./tunnelHarness.ts"

/** Hands each gateway stream, past its preamble, to `server` as a connection. */
const serveStream = (socket: Duplex, server: http.Server) => {
  let head = Buffer.alloc(0)
  const onData = (chunk: Buffer) => {
    head = Buffer.concat([head, chunk])
    if (head.length < FrameHeaderBytes) return
    const end = FrameHeaderBytes + head.readUInt32BE(0)
    if (head.length < end) return
    socket.off("data", onData)
    socket.pause()
    if (head.length > end) socket.unshift(head.subarray(end))
    server.emit("connection", socket)
    socket.resume()
  }
  socket.on("data", onData)
  socket.on("error", () => socket.destroy())
}

/** A backend on `route` through a control session the test drives; returns its yamux session. */
const handDrivenBackend = (controlPort: number, route: RouteDefinition, handler: http.RequestListener, withToken = token) =>
  Effect.gen(function*() {
    const conn = yield* NodeTransport.dial({ host: "127.0.0.1", port: controlPort })
    yield* writeFrame(conn, encodeHello(makeHello(Redacted.make(withToken), [route], "goaway-backend")))
    const { body, rest } = yield* readFrame(conn, MaxControlMessageBytes)
    const reply = decodeHelloReply(body)
    assert.strictEqual((reply as { _tag: string })._tag, "Welcome")
    const session = yield* Session.make(rest, { role: "server", config: tunnelYamuxConfig(undefined) })
    const server = http.createServer(handler)
    yield* Effect.addFinalizer(() => Effect.sync(() => server.closeAllConnections()))
    const acceptNext = (): void => {
      session.core.acceptStream((s) => {
        if (s instanceof Error) return
        serveStream(makeStreamDuplex(s), server)
        acceptNext()
      })
    }
    acceptNext()
    return session
  })

/** Waits (real time, bounded) until `check` holds. */
const eventually = (what: string, check: () => boolean, timeoutMs = 5_000) =>
  Effect.promise(async () => {
    const until = Date.now() + timeoutMs
    while (!check()) {
      if (Date.now() > until) throw new Error(`not within ${timeoutMs} ms: ${what}`)
      await new Promise((resolve) => setTimeout(resolve, 10))
    }
  })

describe("yamux GoAway from a backend", () => {
  it.live("drains it: requests go to the healthy backend, the one in flight finishes, a queued one is moved, the session closes", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.scoped(Effect.gen(function*() {
        const gw = yield* gateway({ control: { address: { host: "127.0.0.1", port: 0 }, tokens: grants, maxHttpStreamsPerListener: 1 } })
        const control = Context.get(gw, ControlPort)
        const registry = Context.get(gw, Registry)
        const port = yield* Effect.promise(freePort)
        const route: RouteDefinition = { _tag: "Http", port }

        // the backend that will go away: `/slow` is held until the test lets it answer
        let releaseSlow: (() => void) | undefined
        const session = yield* handDrivenBackend(control.address.port!, route, (req, res) => {
          if (req.url === "/slow") {
            res.writeHead(200, { "content-length": "4" })
            res.write("sl")
            releaseSlow = () => res.end("ow")
            return
          }
          res.end("goaway-backend")
        })
        // with only it on the route: one request in flight on its only pooled stream, one queued behind it
        const slow = request(port, "/slow")
        yield* eventually("the slow request reached the backend", () => releaseSlow !== undefined)
        const queued = request(port, "/queued")

        // the healthy tenant joins the route
        const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
        yield* serveHttp(tunnel, route, (_req, res) => res.end("healthy"))
        yield* eventually("both backends registered", () => registry.snapshot().some((e) => e.backends.length === 2))

        yield* session.goAway()
        yield* eventually("the gateway saw the GoAway", () => control.drainingSessions() === 1)

        // new requests: every one answered by the healthy backend
        for (let i = 0; i < 20; i++) {
          const res = yield* Effect.promise(() => request(port, `/n${i}`))
          assert.deepStrictEqual([res.status, res.body], [200, "healthy"], `request ${i}`)
        }
        // the one in flight on the draining backend finishes there
        releaseSlow!()
        const slowRes = yield* Effect.promise(() => slow)
        assert.deepStrictEqual([slowRes.status, slowRes.body], [200, "slow"])
        // the queued one never reached it (its stream could not be opened after the GoAway): moved, not 502
        const queuedRes = yield* Effect.promise(() => queued)
        assert.deepStrictEqual([queuedRes.status, queuedRes.body], [200, "healthy"])
        // idle now: the gateway ends the session (GoAway(normal) back, then the connection closes)
        const ended = yield* Effect.exit(Effect.timeout(session.closed, "5 seconds"))
        assert.strictEqual(ended._tag, "Success")
        yield* eventually("the draining session is gone", () => control.drainingSessions() === 0 && control.sessions() === 1)
        assert.strictEqual(registry.snapshot().find((e) => e.backends.length > 0)?.backends.length, 1)
      }))
      yield* Effect.promise(() => expectNoLeaks(before))
    }), 30_000)

  it.live("a route left without backends waits for one (the grace period) instead of answering 502", () =>
    Effect.gen(function*() {
      const gw = yield* gateway({ registry: { gracePeriod: "10 seconds" } })
      const control = Context.get(gw, ControlPort)
      const port = yield* Effect.promise(freePort)
      const route: RouteDefinition = { _tag: "Http", port }
      const session = yield* handDrivenBackend(control.address.port!, route, (_req, res) => res.end("old"))
      const first = yield* Effect.promise(() => request(port, "/"))
      assert.deepStrictEqual([first.status, first.body], [200, "old"])
      yield* session.goAway()
      yield* eventually("the gateway saw the GoAway", () => control.drainingSessions() === 1 || control.sessions() === 0)
      // asked while no backend is live: it waits, and the next backend answers it
      const waiting = request(port, "/")
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
      yield* serveHttp(tunnel, route, (_req, res) => res.end("new"))
      const res = yield* Effect.promise(() => waiting)
      assert.deepStrictEqual([res.status, res.body], [200, "new"])
    }).pipe(Effect.scoped), 30_000)

  it.live("against a gateway process: every request after the GoAway is answered 200 by the healthy backend, counted and shown in /status", () =>
    Effect.gen(function*() {
      const processToken = "goaway-process-token-7c21"
      const proc = spawnSwitchyard(["server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--token", processToken])
      yield* Effect.addFinalizer(() => Effect.promise(() => proc.stop("SIGKILL")))
      yield* Effect.promise(() => proc.waitFor("expose a local service"))
      const control = addressAfter(proc.output(), /control port/)
      const admin = addressAfter(proc.output(), /admin endpoint/)
      const port = yield* Effect.promise(freePort)
      const route: RouteDefinition = { _tag: "Http", port }
      const session = yield* handDrivenBackend(control.port, route, (_req, res) => res.end("goaway-backend"), processToken)
      const tunnel = yield* Effect.promise(() => listen({ port }, { server: `127.0.0.1:${control.port}`, token: processToken, timeoutMs: 20_000 }))
      const server = tunnel.serve(http.createServer((_req, res) => res.end("healthy")))
      yield* Effect.addFinalizer(() => Effect.promise(() => new Promise<void>((resolve) => tunnel.close(() => { server.close(); resolve() }))))
      // both serve the route: requests alternate between them
      const seen = new Set<string>()
      for (let i = 0; i < 20 && seen.size < 2; i++) seen.add((yield* Effect.promise(() => get(port, "/"))).body)
      assert.deepStrictEqual([...seen].sort(), ["goaway-backend", "healthy"])

      yield* session.goAway()
      const answers: Array<string> = []
      for (let i = 0; i < 40; i++) {
        const res = yield* Effect.promise(() => get(port, `/after${i}`))
        answers.push(`${res.status} ${res.body}`)
      }
      assert.deepStrictEqual(answers, Array.from({ length: 40 }, () => "200 healthy"))
      const ended = yield* Effect.exit(Effect.timeout(session.closed, "5 seconds"))
      assert.strictEqual(ended._tag, "Success")
      const metrics = (yield* Effect.promise(() => get(admin.port, "/metrics"))).body
      assert.strictEqual(sample(metrics, "switchyard_session_drains_total", { front_door: "control" }), 1)
      const status = JSON.parse((yield* Effect.promise(() => get(admin.port, "/status"))).body) as {
        sessions: ReadonlyArray<{ frontDoor: string; count: number; draining?: number }>
      }
      assert.deepStrictEqual(status.sessions.find((s) => s.frontDoor === "control"), { frontDoor: "control", count: 1, draining: 0 })
      yield* Effect.promise(() => proc.waitFor(/goaway-backend sent GoAway: draining/, 5_000))
    }).pipe(Effect.scoped), 60_000)
})
