/**
 * The HTTP/1.1 engine and an upstream that refuses a connection before anything was sent on it (a tunnel
 * backend that sent GoAway): the request goes once more through the front door's decision, body
 * included, and the first decision is released; refused twice, it is answered 502 saying why.
 */
import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect, Exit, Scope } from "effect"
import * as http from "node:http"
import * as net from "node:net"
import type { Admission } from "../../../src/services/forward/http1/Admission.ts"
import { refusedConnection, streamUpstream, tcpUpstream, type Upstream } from "../../../src/services/forward/Upstream.ts"
import { makeForwarder } from "../../../src/services/Forwarder.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../../support/leaks.ts"

const LIMITS = { maxHeaderSize: 8 * 1024, maxHeadersCount: 50, headersTimeoutMs: 10_000, requestTimeoutMs: 0, keepAliveTimeoutMs: 5_000, maxConnections: 64 }
const Reason = "backend is shutting down (GoAway)"

let before: HandleCounts
let scope: Scope.Closeable
let good: http.Server
let goodPort: number
const received: Array<string> = []
const refusing = streamUpstream({ describe: "tunnel going-away", limits: { maxSockets: 16, maxFreeSockets: 0 }, connect: () => refusedConnection(Reason) })

beforeEach(async () => {
  before = activeHandles()
  received.length = 0
  scope = Effect.runSync(Scope.make())
  good = http.createServer((req, res) => {
    let body = ""
    req.on("data", (c: Buffer) => (body += c.toString()))
    req.on("end", () => {
      received.push(`${req.method} ${req.url} ${body}`)
      res.end(`ok ${body}`)
    })
  })
  await new Promise<void>((resolve) => good.listen(0, "127.0.0.1", resolve))
  goodPort = (good.address() as net.AddressInfo).port
})

afterEach(async () => {
  await Effect.runPromise(Scope.close(scope, Exit.void))
  good.closeAllConnections()
  await new Promise<void>((resolve) => good.close(() => resolve()))
  await expectNoLeaks(before)
})

/** The engine on loopback; each decision sends the request to the next upstream of `route`, in turn. */
const serve = async (route: ReadonlyArray<Upstream>) => {
  const forwarder = await Effect.runPromise(
    makeForwarder({ upstream: refusing, responseTimeoutMs: 5_000, idleTimeoutMs: 0 }).pipe(Scope.provide(scope))
  )
  const decisions = { made: 0, released: 0, releasedBeforeNext: true }
  const engine = forwarder.serveHttp1({
    limits: LIMITS,
    admit: (): Admission => {
      if (decisions.released < decisions.made) decisions.releasedBeforeNext = false
      const upstream = route[decisions.made++ % route.length]!
      return { _tag: "Forward", director: (out) => void (out.upstream = upstream), onEnd: () => void decisions.released++ }
    }
  })
  const listener = net.createServer({ allowHalfOpen: true }, engine.accept)
  await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve))
  await Effect.runPromise(Scope.addFinalizer(
    scope,
    Effect.promise(() => Promise.all([new Promise<void>((resolve) => listener.close(() => resolve())), engine.close(0)]))
  ))
  return { port: (listener.address() as net.AddressInfo).port, decisions }
}

/** Sends `raw` and collects the answer until the engine closes the connection (bounded). */
const exchange = (port: number, raw: string) =>
  new Promise<string>((resolve, reject) => {
    const socket = net.connect({ port, host: "127.0.0.1" }, () => socket.write(raw))
    let text = ""
    const timer = setTimeout(() => {
      socket.destroy()
      reject(new Error(`no answer within 5 s; got ${JSON.stringify(text)}`))
    }, 5_000)
    socket.on("data", (d: Buffer) => {
      text += d.toString("latin1")
      if (/\r\n\r\n/.test(text) && /ok [a-z]*$|refused[^\n]*\n?$/.test(text)) socket.end()
    })
    socket.on("error", () => {})
    socket.on("close", () => {
      clearTimeout(timer)
      resolve(text)
    })
  })

describe("Http1Engine: an upstream that refuses a connection unsent", () => {
  it("admits the request again and forwards it to the next decision's upstream, body included", async () => {
    const healthy = tcpUpstream("127.0.0.1", goodPort, { maxSockets: 4, maxFreeSockets: 4 })
    const { port, decisions } = await serve([refusing, healthy])
    const get = await exchange(port, "GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.match(get, /^HTTP\/1\.1 200 OK\r\n/)
    assert.match(get, /ok $/)
    const post = await exchange(port, "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    assert.match(post, /^HTTP\/1\.1 200 OK\r\n/)
    assert.match(post, /ok hello$/)
    assert.deepStrictEqual(received, ["GET /a ", "POST /b hello"])
    // two decisions per request; the refused one was given back before the next was asked for
    assert.strictEqual(decisions.made, 4)
    assert.strictEqual(decisions.released, decisions.made)
    assert.isTrue(decisions.releasedBeforeNext)
  })

  it("answers 502 naming the refusal when the second decision's upstream refuses too", async () => {
    const { port, decisions } = await serve([refusing, refusing])
    const answer = await exchange(port, "GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.match(answer, /^HTTP\/1\.1 502 Bad Gateway\r\n/)
    assert.include(answer, `refused the request before it was sent: ${Reason}`)
    assert.strictEqual(decisions.made, 2)
    assert.strictEqual(decisions.released, 2)
    assert.deepStrictEqual(received, [])
  })
})
