import { assert, describe, it } from "@effect/vitest"
import { Context, Effect } from "effect"
import { TunnelClient } from "../../src/services/client/TunnelClient.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { freePort, request, tcpRoundTrip } from "../services/ListenersFixtures.ts"
import { client, gateway, serveEcho, serveHttp } from "./tunnelHarness.ts"

const noLeaks = <A, E>(body: Effect.Effect<A, E, import("effect").Scope.Scope>) =>
  Effect.gen(function*() {
    const before = activeHandles()
    const result = yield* Effect.scoped(body)
    yield* Effect.promise(() => expectNoLeaks(before))
    return result
  })

describe("control-port tunnels", () => {
  it.live("two services share one public port by path prefix", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway()
      const control = Context.get(gw, ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const tunnelA = Context.get(yield* client([control.address.port!], { label: "A" }), TunnelClient)
      const tunnelB = Context.get(yield* client([control.address.port!], { label: "B" }), TunnelClient)
      yield* serveHttp(tunnelA, { _tag: "Http", port: publicPort, pathPrefix: "/a" }, (_req, res) => res.end("From A"))
      yield* serveHttp(tunnelB, { _tag: "Http", port: publicPort, pathPrefix: "/b" }, (req, res) =>
        res.end(`From B ${req.headers["x-forwarded-for"]}`))
      const [a, b, none] = yield* Effect.promise(() =>
        Promise.all([request(publicPort, "/a/x"), request(publicPort, "/b"), request(publicPort, "/c")])
      )
      assert.strictEqual(a.body, "From A")
      assert.strictEqual(b.body, "From B 127.0.0.1")
      assert.strictEqual(none.status, 404)
    })))

  it.live("raw TCP echo through the tunnel", () =>
    noLeaks(Effect.gen(function*() {
      const gw = yield* gateway()
      const control = Context.get(gw, ControlPort)
      const publicPort = yield* Effect.promise(freePort)
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
      yield* serveEcho(tunnel, { _tag: "Tcp", port: publicPort })
      // the listener binds asynchronously: wait for the port to answer
      let reply = ""
      for (let i = 0; i < 200 && reply === ""; i++) {
        reply = yield* Effect.promise(() => tcpRoundTrip(publicPort, "hello tunnel").catch(() => ""))
        if (reply === "") yield* Effect.sleep("10 millis")
      }
      assert.strictEqual(reply, "hello tunnel")
      const big = yield* Effect.promise(() => tcpRoundTrip(publicPort, "z".repeat(1_000_000)))
      assert.strictEqual(big.length, 1_000_000)
    })))
})
