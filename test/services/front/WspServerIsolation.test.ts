/**
 * The wsp server against peers that would degrade the others: a registered wsp client that never
 * answers (the response timeout frees its callers and drops its connection while a healthy client keeps
 * serving), and registrations when no `secretkey` is set (refused unless registration is opened).
 * The peers are raw `ws` clients driven by hand, as wsp's protocol describes.
 */
import { afterEach, beforeEach, describe, expect, it } from "@effect/vitest"
import * as http from "node:http"
import { Effect, Exit, Redacted, Scope } from "effect"
import { WebSocket } from "ws"
import { makeWspServer, registrationClosedMessage } from "../../../src/services/front/WspServer.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../../support/leaks.ts"
import { call, secret, serverConfig, waitFor } from "../../integration/wspSupport.ts"

let before: HandleCounts
beforeEach(() => {
  before = activeHandles()
})
afterEach(() => expectNoLeaks(before))

/** Resolves with `promise`, or rejects once `ms` have passed without it. */
const within = <A>(ms: number, what: string, promise: Promise<A>): Promise<A> => {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms)
  })
  return Promise.race([promise, late]).finally(() => clearTimeout(timer))
}

/**
 * A wsp client connection registered as `greeting`; when `answer` is true it answers every request
 * (once its body message has arrived) with 200 and body `ok`, otherwise it reads and never answers.
 */
const peer = (port: number, greeting: string, answer: boolean, key: string = secret) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ readonly ws: WebSocket; readonly requests: () => number; readonly closed: () => boolean }>((resolve, reject) => {
        const ws = new WebSocket(`ws://127.0.0.1:${port}/register`, { headers: { "X-SECRET-KEY": key } })
        let requests = 0
        let closed = false
        ws.on("message", (_data, isBinary) => {
          if (!isBinary) return void requests++
          if (!answer) return
          ws.send("{\"StatusCode\":200,\"Header\":{},\"ContentLength\":2}")
          ws.send(Buffer.from("ok"), { binary: true })
        })
        ws.on("close", () => (closed = true))
        ws.on("error", () => undefined)
        ws.once("open", () => {
          ws.send(greeting)
          resolve({ ws, requests: () => requests, closed: () => closed })
        })
        ws.once("error", reject)
      })
    ),
    ({ ws }) => Effect.sync(() => ws.terminate())
  )

/** Opens a WebSocket to `/register` with `key` (none when undefined): "opened" or ws's error message. */
const tryRegister = (port: number, key: string | undefined) =>
  Effect.promise(() =>
    new Promise<string>((resolve) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/register`, key === undefined ? {} : { headers: { "X-SECRET-KEY": key } })
      ws.on("error", (e) => resolve(e.message))
      ws.on("open", () => {
        ws.terminate()
        resolve("opened")
      })
    })
  )

/** A caller's request with a body sent in `parts`, one every `gapMs`. */
const slowUpload = (port: number, parts: number, gapMs: number) =>
  new Promise<{ status: number; body: string }>((resolve, reject) => {
    const req = http.request(
      { host: "127.0.0.1", port, path: "/request", method: "POST", headers: { "X-Proxy-Destination": "http://dest.example/up" }, agent: false },
      (res) => {
        let body = ""
        res.setEncoding("utf8")
        res.on("data", (c) => (body += c))
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body }))
      }
    )
    req.on("error", reject)
    let sent = 0
    const tick = () => {
      if (sent++ === parts) return void req.end()
      req.write("x".repeat(100))
      setTimeout(tick, gapMs)
    }
    tick()
  })

describe("wsp server: response timeout", () => {
  it.live("a caller whose wsp client never answers gets 526 within the timeout; that connection is dropped and counted, a healthy client keeps serving", () =>
    Effect.gen(function*() {
      const responseTimeout = 300
      const server = yield* makeWspServer(serverConfig({ responseTimeout }))
      const port = server.address.port
      const stalling = yield* peer(port, "stalling_1", false)
      const healthy = yield* peer(port, "healthy_1", true)
      yield* waitFor("both registered", () => server.stats().idle === 2)
      // two callers at once: each takes one of the two connections
      const started = Date.now()
      const replies = yield* Effect.promise(() =>
        within(3_000, "two callers", Promise.all([0, 1].map(() => call(port, { destination: "http://dest.example/a" }))))
      )
      const elapsed = Date.now() - started
      const statuses = replies.map((r) => r.status).sort()
      expect(statuses).toEqual([200, 526])
      const timedOut = replies.find((r) => r.status === 526)!
      expect(timedOut.body.toString()).toBe(`Unable to get http response : no response within ${responseTimeout} ms\n`)
      expect(elapsed).toBeGreaterThanOrEqual(responseTimeout - 50)
      expect(stalling.requests()).toBe(1)
      yield* waitFor("the stalling connection is closed", () => stalling.closed())
      expect(server.failures().ResponseTimeout).toBe(1)
      // the healthy client serves everything that follows, each well within the bound
      for (let i = 0; i < 5; i++) {
        const r = yield* Effect.promise(() => within(1_000, "healthy request", call(port, { destination: "http://dest.example/b" })))
        expect(r.status).toBe(200)
        expect(r.body.toString()).toBe("ok")
      }
      expect(healthy.requests()).toBe(6)
      expect(server.stats()).toMatchObject({ idle: 1, busy: 0 })
    }).pipe(Effect.scoped))

  it.live("counts from the latest part of the request body, so a slow upload answered at its end is not cut", () =>
    Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ responseTimeout: 300 }))
      const port = server.address.port
      yield* peer(port, "healthy_1", true)
      yield* waitFor("registered", () => server.stats().idle === 1)
      // six parts 150 ms apart: the upload takes longer than the timeout, but never pauses that long
      const r = yield* Effect.promise(() => within(5_000, "slow upload", slowUpload(port, 6, 150)))
      expect(r).toEqual({ status: 200, body: "ok" })
      expect(server.failures().ResponseTimeout).toBeUndefined()
    }).pipe(Effect.scoped))

  it.live("0 waits for the answer however long it takes", () =>
    Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ responseTimeout: 0 }))
      const port = server.address.port
      const ws = yield* peer(port, "late_1", false)
      yield* waitFor("registered", () => server.stats().idle === 1)
      const reply = call(port, { destination: "http://dest.example/late" })
      yield* waitFor("request and body sent", () => ws.requests() === 1)
      yield* Effect.sleep(500)
      ws.ws.send("{\"StatusCode\":201,\"Header\":{},\"ContentLength\":0}")
      ws.ws.send(Buffer.alloc(0), { binary: true })
      const r = yield* Effect.promise(() => within(2_000, "late answer", reply))
      expect(r.status).toBe(201)
    }).pipe(Effect.scoped))

  it.live("an exchange cut short by the server's shutdown, after waiting for a connection, leaves no response timer behind", () =>
    Effect.gen(function*() {
      // the response timers are told apart by their delay; each one started must be cleared
      const responseTimeout = 43_210
      const running = new Set<unknown>()
      const realSet = globalThis.setTimeout
      const realClear = globalThis.clearTimeout
      yield* Effect.acquireRelease(
        Effect.sync(() => {
          globalThis.setTimeout = ((fn: () => void, ms?: number, ...rest: Array<unknown>) => {
            const timer = (realSet as (...args: Array<unknown>) => NodeJS.Timeout)(fn, ms, ...rest)
            if (ms === responseTimeout) running.add(timer)
            return timer
          }) as typeof setTimeout
          globalThis.clearTimeout = ((timer: Parameters<typeof clearTimeout>[0]) => {
            running.delete(timer)
            realClear(timer)
          }) as typeof clearTimeout
        }),
        () =>
          Effect.sync(() => {
            globalThis.setTimeout = realSet
            globalThis.clearTimeout = realClear
          })
      )
      const scope = yield* Scope.make()
      const server = yield* makeWspServer(serverConfig({ timeout: 5_000, responseTimeout })).pipe(Scope.provide(scope))
      const port = server.address.port
      const p = yield* peer(port, "manual_1", false)
      yield* waitFor("registered", () => server.stats().idle === 1)
      const first = call(port, { destination: "http://dest.example/first" })
      yield* waitFor("first request on the connection", () => p.requests() === 1)
      // the second caller waits for the busy connection, then gets it
      const second = call(port, { destination: "http://dest.example/second" }).then((r) => r.status, () => 0)
      yield* Effect.sleep(100)
      p.ws.send("{\"StatusCode\":200,\"Header\":{},\"ContentLength\":0}")
      p.ws.send(Buffer.alloc(0), { binary: true })
      expect((yield* Effect.promise(() => within(2_000, "first", first))).status).toBe(200)
      yield* waitFor("second request on the connection", () => p.requests() === 2)
      expect(running.size).toBe(1)
      yield* Scope.close(scope, Exit.void)
      expect(yield* Effect.promise(() => within(2_000, "second caller", second))).not.toBe(200)
      yield* waitFor("the response timer cleared", () => running.size === 0, 2_000)
    }).pipe(Effect.scoped))
})

describe("wsp server: registration without a secretkey", () => {
  it.live("is refused with 403 before the upgrade by default, and counted", () =>
    Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ secretKey: Redacted.make("") }))
      const port = server.address.port
      expect(yield* tryRegister(port, undefined)).toBe("Unexpected server response: 403")
      expect(yield* tryRegister(port, "")).toBe("Unexpected server response: 403")
      const plain = yield* Effect.promise(() => call(port, { path: "/register" }))
      expect(plain.status).toBe(403)
      expect(plain.body.toString()).toBe(`${registrationClosedMessage}\n`)
      expect(server.rejected().registrationClosed).toBe(3)
      expect(server.stats().pools).toBe(0)
      // callers are told no proxy is there, never handed to an unauthenticated peer
      expect((yield* Effect.promise(() => call(port, { destination: "http://dest.example/" }))).status).toBe(526)
    }).pipe(Effect.scoped))

  it.live("is accepted when registration is opened explicitly", () =>
    Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ secretKey: Redacted.make(""), openRegistration: true }))
      const port = server.address.port
      yield* peer(port, "open_1", true, "")
      yield* waitFor("registered", () => server.stats().idle === 1)
      const r = yield* Effect.promise(() => within(2_000, "request", call(port, { destination: "http://dest.example/" })))
      expect(r.status).toBe(200)
      expect(server.rejected().registrationClosed).toBe(0)
    }).pipe(Effect.scoped))

  it.live("a secretkey set by a reload opens registration to clients that send it", () =>
    Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ secretKey: Redacted.make("") }))
      const port = server.address.port
      expect(yield* tryRegister(port, "")).toBe("Unexpected server response: 403")
      yield* server.replaceCredentials({ secretKey: Redacted.make("now-set"), requestKey: undefined })
      expect(yield* tryRegister(port, "now-set")).toBe("opened")
      expect(yield* tryRegister(port, "")).toBe("Unexpected server response: 526")
    }).pipe(Effect.scoped))
})

describe("wsp server: failed credentials", () => {
  it.live("a wrong X-SECRET-KEY is answered later and later from one address, then refused with 429; another address registers", () =>
    Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig({ authThrottle: { freeFailures: 1, baseDelayMs: 200, refuseAfter: 3 } }))
      const port = server.address.port
      const timed = (key: string) =>
        Effect.gen(function*() {
          const started = Date.now()
          const outcome = yield* tryRegister(port, key)
          return { outcome, ms: Date.now() - started }
        })
      expect((yield* timed("wrong")).outcome).toBe("Unexpected server response: 526")
      const second = yield* timed("wrong")
      expect(second.outcome).toBe("Unexpected server response: 526")
      expect(second.ms).toBeGreaterThanOrEqual(200)
      const third = yield* timed("wrong")
      expect(third.ms).toBeGreaterThanOrEqual(400)
      expect((yield* timed(secret)).outcome).toBe("Unexpected server response: 429")
      expect(server.rejected().throttled).toBe(1)
      // the same secret from another loopback address registers
      const other = yield* Effect.promise(() =>
        new Promise<string>((resolve) => {
          const ws = new WebSocket(`ws://127.0.0.1:${port}/register`, { headers: { "X-SECRET-KEY": secret }, localAddress: "127.0.0.2" })
          ws.on("error", (e) => resolve(e.message))
          ws.on("open", () => {
            ws.terminate()
            resolve("opened")
          })
        })
      )
      expect(other).toBe("opened")
    }).pipe(Effect.scoped))

  it.live("a refusal still waiting for its delay does not hold the server open at shutdown", () =>
    Effect.gen(function*() {
      const scope = yield* Scope.make()
      const server = yield* makeWspServer(serverConfig({ authThrottle: { freeFailures: 0, baseDelayMs: 30_000 } })).pipe(Scope.provide(scope))
      const attempt = tryRegister(server.address.port, "wrong").pipe(Effect.runPromise)
      yield* waitFor("the failure counted", () => server.rejected().secretKey === 1)
      const started = Date.now()
      yield* Scope.close(scope, Exit.void)
      expect(Date.now() - started).toBeLessThan(2_000)
      // the waiting client sees its connection end instead of an answer
      expect(yield* Effect.promise(() => attempt)).not.toBe("opened")
    }))
})
