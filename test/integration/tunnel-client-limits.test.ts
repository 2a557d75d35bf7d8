/**
 * Slow public clients on a tunnel route, end to end on loopback (gateway, tunnel client, backend):
 * trickling uploads from one address cannot take the route's tunnel streams from another address, a
 * trickling body gets 408 after its grace period, and a quiet long-lived response is not cut.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as net from "node:net"
import { setTimeout as sleep } from "node:timers/promises"
import { Context, Effect } from "effect"
import { CLIENT_LIMIT_DEFAULTS, type ClientLimits } from "../../src/domain/ClientLimits.ts"
import { TunnelClient } from "../../src/services/client/TunnelClient.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import type { ClientLimitEvent } from "../../src/services/forward/http1/Admission.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { freePort } from "../services/ListenersFixtures.ts"
import { client, gateway, grants, serveHttp } from "./tunnelHarness.ts"
import { getFrom, trickle } from "../support/clients.ts"

const noLeaks = <A, E>(body: Effect.Effect<A, E, import("effect").Scope.Scope>) =>
  Effect.gen(function*() {
    const before = activeHandles()
    const result = yield* Effect.scoped(body)
    yield* Effect.promise(() => expectNoLeaks(before))
    return result
  })

/** Quiet responses held open by `/quiet`. */
const quiet: Array<http.ServerResponse> = []

/** The backend: `/upload` reads the whole body, then answers; `/ping` answers at once; `/quiet` says nothing. */
const backend: http.RequestListener = (req, res) => {
  if (req.url === "/upload") {
    let n = 0
    req.on("data", (c: Buffer) => (n += c.length))
    req.on("end", () => res.end(`got ${n}`))
  } else if (req.url === "/quiet") {
    quiet.push(res)
    res.writeHead(200, { "content-type": "text/event-stream" })
    res.flushHeaders()
  } else res.end("pong")
}

/**
 * A gateway whose routes have 4 pooled tunnel streams per backend, with these client limits, and one
 * backend on a fresh public port; resolves with that port and the refusals seen.
 */
const route = (limits: Partial<ClientLimits>) =>
  Effect.gen(function*() {
    const events: Array<ClientLimitEvent> = []
    const gw = yield* gateway({
      control: { address: { host: "127.0.0.1", port: 0 }, tokens: grants, maxHttpStreamsPerListener: 4 },
      clientLimits: { ...CLIENT_LIMIT_DEFAULTS, ...limits },
      onClientLimit: (e) => events.push(e)
    })
    const control = Context.get(gw, ControlPort)
    const port = yield* Effect.promise(freePort)
    const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
    yield* serveHttp(tunnel, { _tag: "Http", port }, backend)
    return { port, events }
  })

/** An upload from 127.0.0.1 whose body comes one byte every `everyMs`; destroyed with the scope. */
const trickler = (port: number, everyMs: number) =>
  Effect.acquireRelease(
    Effect.sync(() => trickle(port, "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 10000\r\n\r\nx", "x", everyMs)),
    (t) => Effect.sync(() => t.socket.destroy())
  )

/** Waits until `cond` holds, at most `ms`. */
const waitFor = async (what: string, ms: number, cond: () => boolean): Promise<void> => {
  const until = performance.now() + ms
  while (performance.now() < until) {
    if (cond()) return
    await sleep(20)
  }
  throw new Error(`not within ${ms} ms: ${what}`)
}

describe("control-port tunnels: slow public clients", () => {
  it.live("more trickling uploads from one address than the route's streams; another address keeps being served", () =>
    noLeaks(Effect.gen(function*() {
      // one address holds 1 of the 4 streams; the body rate's grace period is long, so the cap alone is at work
      const { events, port } = yield* route({ upstreamSlotWaitMs: 500, requestBodyGracePeriodMs: 60_000 })
      const uploads = yield* Effect.forEach(Array.from({ length: 6 }), () => trickler(port, 1_000))
      yield* Effect.promise(() =>
        waitFor("five 503s", 10_000, () => uploads.filter((u) => u.text().startsWith("HTTP/1.1 503")).length === 5)
      )
      for (let i = 0; i < 10; i++) {
        const r = yield* Effect.promise(() => getFrom(port, "/ping", "127.0.0.2", 5_000))
        assert.deepStrictEqual(r, { status: 200, body: "pong" })
        yield* Effect.sleep("100 millis")
      }
      // the upload holding its share still trickles on
      assert.strictEqual(uploads.filter((u) => u.text() === "" && !u.socket.destroyed).length, 1)
      assert.deepStrictEqual(events.map((e) => [e.limit, e.client, e.target]), Array.from({ length: 5 }, () => ["client_slots", "127.0.0.1", "/upload"]))
    })), 30_000)

  it.live("a trickling upload gets 408 once its grace period is over; a normal one goes through", () =>
    noLeaks(Effect.gen(function*() {
      const { events, port } = yield* route({ requestBodyGracePeriodMs: 500 })
      const upload = yield* trickler(port, 200)
      yield* Effect.promise(() => Promise.race([upload.closed, sleep(8_000).then(() => assert.fail("still open after 8 s"))]))
      assert.match(upload.text(), /^HTTP\/1\.1 408 /)
      assert.deepStrictEqual(events.map((e) => e.limit), ["request_body_rate"])
      const ok = yield* Effect.promise(() => getFrom(port, "/ping", "127.0.0.1", 5_000))
      assert.deepStrictEqual(ok, { status: 200, body: "pong" })
    })), 30_000)

  it.live("a quiet long-lived response is not cut by the data rates", () =>
    noLeaks(Effect.gen(function*() {
      const { events, port } = yield* route({ minResponseBytesPerSecond: 1_000_000, responseGracePeriodMs: 100, requestBodyGracePeriodMs: 100 })
      const socket = yield* Effect.acquireRelease(
        Effect.sync(() => net.connect({ port, host: "127.0.0.1" })),
        (s) => Effect.sync(() => s.destroy())
      )
      let received = ""
      socket.on("data", (d: Buffer) => (received += d.toString("latin1")))
      socket.write("GET /quiet HTTP/1.1\r\nHost: app\r\n\r\n")
      yield* Effect.promise(() => waitFor("the head", 5_000, () => received.includes("200 OK") && quiet.length === 1))
      yield* Effect.sleep("2500 millis")
      assert.isFalse(socket.destroyed)
      quiet[0]!.write("data: tick\n\n")
      yield* Effect.promise(() => waitFor("the event", 5_000, () => received.includes("data: tick")))
      quiet.splice(0)[0]!.destroy()
      assert.deepStrictEqual(events, [])
    })), 30_000)
})
