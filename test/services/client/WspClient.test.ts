/**
 * The client against a hand-written wsp server: a raw `ws` server that accepts registrations and
 * sends request heads and bodies by hand, exactly as wsp's Go server writes them, and a real
 * destination HTTP server that records what reached it.
 */
import { describe, expect, it } from "@effect/vitest"
import type * as http from "node:http"
import { Effect, Logger, Random, Schema } from "effect"
import { TestClock } from "effect/testing"
import { WebSocket, WebSocketServer } from "ws"
import { compileRules } from "../../../src/domain/DestinationRules.ts"
import type { DestinationRules } from "../../../src/domain/DestinationRules.ts"
import { makeWspClient, reconnectDelay, WspClient } from "../../../src/services/client/WspClient.ts"
import { noLeaks } from "../../support/leaks.ts"
import { clientConfig, destination, MessageInbox, secret, waitFor } from "../../integration/wspSupport.ts"

/** One connection as the hand-written server sees it. */
class Registered extends MessageInbox {
  readonly ws: WebSocket
  readonly headers: http.IncomingHttpHeaders
  greeting: string | undefined

  constructor(ws: WebSocket, headers: http.IncomingHttpHeaders) {
    super()
    this.ws = ws
    this.headers = headers
    ws.on("message", (data, isBinary) => {
      if (this.greeting === undefined && !isBinary) {
        this.greeting = (data as Buffer).toString()
        return
      }
      this.received({ data: data as Buffer, isBinary })
    })
    ws.on("close", (code) => this.ended(code))
    ws.on("error", () => undefined)
  }
}

interface FakeServer {
  readonly url: string
  readonly connections: Array<Registered>
  /** Upgrade attempts, accepted or not. */
  attempts: number
  accept: boolean
}

const fakeServer = Effect.acquireRelease(
  Effect.promise(() =>
    new Promise<{ wss: WebSocketServer; state: FakeServer }>((resolve) => {
      const state: FakeServer = { url: "", connections: [], attempts: 0, accept: true }
      const wss = new WebSocketServer({
        host: "127.0.0.1",
        port: 0,
        verifyClient: (_info, done) => {
          state.attempts++
          if (state.accept) done(true)
          else done(false, 526, "Invalid X-SECRET-KEY")
        }
      }, () => {
        const port = (wss.address() as { port: number }).port
        ;(state as { url: string }).url = `ws://127.0.0.1:${port}/register`
        resolve({ wss, state })
      })
      wss.on("connection", (ws, req) => state.connections.push(new Registered(ws, req.headers)))
    })
  ),
  ({ wss }) =>
    Effect.promise(() => new Promise<void>((resolve) => {
      for (const ws of wss.clients) ws.terminate()
      wss.close(() => resolve())
    }))
).pipe(Effect.map(({ state }) => state))

const rules = (lists: Parameters<typeof compileRules>[0]): DestinationRules => {
  const r = compileRules(lists)
  if ("_tag" in r) throw new Error(r.message)
  return r
}

const next = (c: Registered) => Effect.promise(() => c.next())
/** The client's one pool connection, once it has sent its greeting. */
const greeted = (server: FakeServer) =>
  waitFor("connected", () => server.connections.length === 1 && server.connections[0]!.greeting !== undefined).pipe(
    Effect.map(() => server.connections[0]!)
  )
const idleOne = (server: FakeServer) => server.connections.find((c) => !c.closed && c.greeting !== undefined)!

describe("WspClient against a hand-written wsp server", () => {
  it.live("registers with the secret and greeting, fills its pool, and answers a request in wsp's shape", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, { id: "edge-1", poolIdleSize: 3, poolMaxSize: 5 }))
      yield* waitFor("three connections", () => server.connections.filter((c) => c.greeting !== undefined).length === 3)
      for (const c of server.connections) {
        expect(c.headers["x-secret-key"]).toBe(secret)
        expect(c.greeting).toBe("edge-1_3")
      }
      const conn = idleOne(server)
      const url = dest.url("/echo?x=1&y=2")
      // exactly what wsp's Go server writes
      conn.ws.send(
        `{"Method":"POST","URL":"${url.replace("&", "\\u0026")}","Header":{"Accept":["*/*"],"Connection":["close"],` +
          `"Content-Length":["5"],"User-Agent":["curl/8.5.0"],"X-Proxy-Destination":["${url.replace("&", "\\u0026")}"]},"ContentLength":5}`
      )
      conn.ws.send(Buffer.from("hello"), { binary: true })
      const head = yield* next(conn)
      expect(head.isBinary).toBe(false)
      const text = head.data.toString()
      expect(text).toMatch(/^\{"StatusCode":200,"Header":\{.*\},"ContentLength":5\}$/)
      const parsed = JSON.parse(text) as { Header: Record<string, Array<string>> }
      const names = Object.keys(parsed.Header)
      expect(names).toEqual([...names].sort())
      expect(parsed.Header["X-Method"]).toEqual(["POST"])
      expect(parsed.Header["Content-Length"]).toEqual(["5"])
      expect(parsed.Header["Connection"]).toBeUndefined()
      const body = yield* next(conn)
      expect([body.isBinary, body.data.toString()]).toEqual([true, "hello"])
      expect(dest.seen).toHaveLength(1)
      expect(dest.seen[0]).toMatchObject({ method: "POST", url: "/echo?x=1&y=2", bodyLength: 5 })
      expect(dest.seen[0]!.headers["user-agent"]).toBe("curl/8.5.0")
      expect(dest.seen[0]!.headers["x-proxy-destination"]).toBe(url)
    })))

  it.live("answers a request it cannot perform with wsp's 527 and keeps the connection", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1 }))
      const conn = yield* greeted(server)
      conn.ws.send("{\"Method\":\"GET\",\"URL\":\"ftp://example/\",\"Header\":{},\"ContentLength\":0}")
      conn.ws.send(Buffer.alloc(0), { binary: true })
      const head = JSON.parse((yield* next(conn)).data.toString()) as { StatusCode: number; Header: object; ContentLength: number }
      const body = (yield* next(conn)).data.toString()
      expect(head).toEqual({ StatusCode: 527, Header: {}, ContentLength: body.length })
      expect(body).toBe("Unable to execute request : unsupported protocol scheme \"ftp\"\n")
      expect(conn.closed).toBe(false)
    })))

  it.live("refuses a destination outside its rules without contacting it", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, {
        poolIdleSize: 1,
        rules: rules({ blacklist: [{ url: "/admin" }], whitelist: [{ method: "^GET$" }] })
      }))
      const conn = yield* greeted(server)
      const ask = (method: string, path: string) =>
        Effect.gen(function*() {
          conn.ws.send(`{"Method":"${method}","URL":"${dest.url(path)}","Header":{},"ContentLength":0}`)
          conn.ws.send(Buffer.alloc(0), { binary: true })
          const head = JSON.parse((yield* next(conn)).data.toString()) as { StatusCode: number }
          return [head.StatusCode, (yield* next(conn)).data.toString()] as const
        })
      expect(yield* ask("GET", "/admin/users")).toEqual([403, "Destination is forbidden"])
      expect(yield* ask("DELETE", "/echo")).toEqual([403, "Destination is not allowed"])
      expect(dest.seen).toHaveLength(0)
      expect((yield* ask("GET", "/echo"))[0]).toBe(200)
      expect(dest.seen).toHaveLength(1)
    })))

  it.live("replaceRules: the next request on the same connection is checked against the new rules", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* fakeServer
      const client = yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1, rules: rules({ blacklist: [{ url: "/admin" }] }) }))
      const conn = yield* greeted(server)
      const ask = (path: string) =>
        Effect.gen(function*() {
          conn.ws.send(`{"Method":"GET","URL":"${dest.url(path)}","Header":{},"ContentLength":0}`)
          conn.ws.send(Buffer.alloc(0), { binary: true })
          const head = JSON.parse((yield* next(conn)).data.toString()) as { StatusCode: number }
          yield* next(conn)
          return head.StatusCode
        })
      expect(yield* ask("/admin")).toBe(403)
      expect(yield* ask("/echo")).toBe(200)
      yield* client.replaceRules(rules({ blacklist: [{ url: "/echo" }] }))
      expect(yield* ask("/echo")).toBe(403)
      // allowed now: it reaches the destination (which serves only /echo)
      expect(yield* ask("/admin")).not.toBe(403)
      expect(dest.seen).toHaveLength(2)
      // the same connection served every request
      expect(conn.closed).toBe(false)
    })))

  it.live("checks rules against the URL as it will be used, so an encoded host cannot slip past a blacklist", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, {
        poolIdleSize: 1,
        rules: rules({ blacklist: [{ url: `^http://127\\.0\\.0\\.1:${dest.port}/` }] })
      }))
      const conn = yield* greeted(server)
      for (const url of [`http://%31%32%37.0.0.1:${dest.port}/echo`, `HTTP://127.0.0.1:${dest.port}/echo`, `http://2130706433:${dest.port}/echo`]) {
        conn.ws.send(`{"Method":"","URL":"${url}","Header":{},"ContentLength":0}`)
        conn.ws.send(Buffer.alloc(0), { binary: true })
        const head = JSON.parse((yield* next(conn)).data.toString()) as { StatusCode: number }
        expect([url, head.StatusCode]).toEqual([url, 403])
        expect((yield* next(conn)).data.toString()).toBe("Destination is forbidden")
      }
      expect(dest.seen).toHaveLength(0)
    })))

  it.live("streams a request body to the destination as its fragments arrive", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1 }))
      const conn = yield* greeted(server)
      conn.ws.send(`{"Method":"POST","URL":"${dest.url("/echo")}","Header":{"X-A":["1"]},"ContentLength":-1}`)
      conn.ws.send(Buffer.alloc(1000, 1), { binary: true, fin: false })
      yield* waitFor("first part reached the destination before the message ended", () => dest.bytesArrived() === 1000)
      conn.ws.send(Buffer.alloc(500, 2), { binary: true, fin: true })
      const head = JSON.parse((yield* next(conn)).data.toString()) as { StatusCode: number }
      expect(head.StatusCode).toBe(200)
      const body = (yield* next(conn)).data
      expect(body.length).toBe(1500)
      expect([body[0], body[1499]]).toEqual([1, 2])
      expect(dest.seen[0]!.headers["transfer-encoding"]).toBe("chunked")
      // and the connection serves the next request
      conn.ws.send(`{"Method":"GET","URL":"${dest.url("/bytes?n=3")}","Header":{},"ContentLength":0}`)
      conn.ws.send(Buffer.alloc(0), { binary: true })
      expect((JSON.parse((yield* next(conn)).data.toString()) as { StatusCode: number }).StatusCode).toBe(200)
      expect((yield* next(conn)).data.length).toBe(3)
    })))

  it.live("closes a connection whose streamed body is longer than its ContentLength", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1 }))
      const conn = yield* greeted(server)
      conn.ws.send(`{"Method":"POST","URL":"${dest.url("/echo")}","Header":{},"ContentLength":10}`)
      conn.ws.send(Buffer.alloc(20, 1), { binary: true })
      yield* waitFor("closed", () => conn.closed)
      expect(dest.seen).toHaveLength(0)
    })))

  it.live("answers a destination failure only after the request body has ended", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1 }))
      const conn = yield* greeted(server)
      conn.ws.send("{\"Method\":\"POST\",\"URL\":\"http://127.0.0.1:1/\",\"Header\":{},\"ContentLength\":-1}")
      conn.ws.send(Buffer.alloc(100, 1), { binary: true, fin: false })
      yield* Effect.sleep(200)
      expect(conn.inbox).toHaveLength(0)
      conn.ws.send(Buffer.alloc(100, 1), { binary: true, fin: true })
      const head = JSON.parse((yield* next(conn)).data.toString()) as { StatusCode: number }
      expect(head.StatusCode).toBe(527)
      expect((yield* next(conn)).data.toString()).toMatch(/^Unable to execute request : .*ECONNREFUSED/)
      expect(conn.closed).toBe(false)
    })))

  it.live("closes a connection that receives a malformed head (after wsp's 527) and refills the pool", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* fakeServer
      const client = yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1, backoffInitial: 1 }))
      yield* waitFor("connected", () => server.connections.length === 1 && server.connections[0]!.greeting !== undefined)
      expect(client.stats()[0]!.reconnects).toBe(0)
      const conn = server.connections[0]!
      conn.ws.send("{\"Method\":")
      const head = JSON.parse((yield* next(conn)).data.toString()) as { StatusCode: number }
      expect(head.StatusCode).toBe(527)
      expect((yield* next(conn)).data.toString()).toMatch(/^Unable to deserialize json http request : head is not valid JSON/)
      yield* waitFor("closed", () => conn.closed)
      yield* waitFor("refilled", () => server.connections.some((c) => c !== conn && !c.closed && c.greeting !== undefined))
      // the replacement is counted as a reconnect (switchyard_reconnects_total for wsp-client)
      yield* waitFor("counted", () => client.stats()[0]!.reconnects === 1)
    })))

  it.live("closes a connection whose request body message is missing, without contacting the destination", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1 }))
      const conn = yield* greeted(server)
      const head = `{"Method":"GET","URL":"${dest.url("/echo")}","Header":{},"ContentLength":0}`
      conn.ws.send(head)
      conn.ws.send(head)
      yield* waitFor("closed", () => conn.closed)
      expect(dest.seen).toHaveLength(0)
    })))

  it.live("closes a connection that is sent a second request while the first runs", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1 }))
      const conn = yield* greeted(server)
      conn.ws.send(`{"Method":"GET","URL":"${dest.url("/slow?ms=500")}","Header":{},"ContentLength":0}`)
      conn.ws.send(Buffer.alloc(0), { binary: true })
      yield* waitFor("running", () => dest.seen.length === 1)
      conn.ws.send(`{"Method":"GET","URL":"${dest.url("/echo")}","Header":{},"ContentLength":0}`)
      yield* waitFor("closed", () => conn.closed)
    })))

  it.live("relays a body intact when its first fragments wait behind a backed-up WebSocket (the read buffer grows meanwhile)", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1 }))
      const conn = yield* greeted(server)
      // the server reads nothing for now: requests the client answers at once (an unparsable URL, echoed
      // in the 527 body) fill the kernel's buffers, and later writes wait in the client's socket
      conn.ws.pause()
      const fillers = 240
      const bad = `::${"x".repeat(40_000)}`
      for (let i = 0; i < fillers; i++) {
        conn.ws.send(`{"Method":"GET","URL":"${bad}","Header":{},"ContentLength":0}`)
        conn.ws.send(Buffer.alloc(0), { binary: true })
      }
      // a body whose first read fills the destination connection's first buffer: its fragments are queued
      // (masked in place, views of that buffer) while the connection moves to a larger buffer
      const size = 1024 * 1024
      conn.ws.send(`{"Method":"GET","URL":"${dest.url(`/bytes?n=${size}`)}","Header":{},"ContentLength":0}`)
      conn.ws.send(Buffer.alloc(0), { binary: true })
      yield* waitFor("the destination answered", () => dest.seen.length === 1, 15_000)
      // time for the client to read the first of the body (nothing of it can leave before the resume)
      yield* Effect.sleep(300)
      conn.ws.resume()
      yield* waitFor("every answer", () => conn.closed || conn.inbox.length === 2 * fillers + 2, 15_000)
      for (let i = 0; i < fillers; i++) {
        expect(JSON.parse((yield* next(conn)).data.toString()).StatusCode).toBe(527)
        expect((yield* next(conn)).data.toString()).toMatch(/invalid URL/)
      }
      expect(JSON.parse((yield* next(conn)).data.toString()).StatusCode).toBe(200)
      const body = (yield* next(conn)).data
      const expected = Buffer.alloc(size)
      for (let i = 0; i < size; i++) expected[i] = i % 251
      expect(body.length).toBe(size)
      expect(body.equals(expected)).toBe(true)
    })), 30_000)

  it.effect("reconnects with capped exponential backoff (virtual time)", () =>
    Effect.gen(function*() {
      const server = yield* fakeServer
      server.accept = false
      // jitter at its lowest: each delay is half the exponential ceiling
      const client = yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1, backoffInitial: 1000, backoffMax: 8000 })).pipe(
        Effect.provideService(Random.Random, { nextDoubleUnsafe: () => 0, nextIntUnsafe: () => 0 })
      )
      yield* waitFor("first attempt", () => server.attempts === 1)
      const expected = [500, 1000, 2000, 4000, 4000, 4000]
      for (const [i, delay] of expected.entries()) {
        yield* TestClock.adjust(delay - 1)
        yield* Effect.promise(() => new Promise((r) => setTimeout(r, 30)))
        expect(server.attempts).toBe(i + 1)
        yield* TestClock.adjust(1)
        yield* waitFor(`attempt ${i + 2}`, () => server.attempts === i + 2)
      }
      // every refused attempt so far is a failed attempt since the last success
      expect(client.stats()[0]!.failedAttempts).toBe(expected.length + 1)
      server.accept = true
      yield* TestClock.adjust(4000)
      yield* waitFor("connected", () => server.connections.some((c) => c.greeting !== undefined))
      yield* waitFor("failures reset", () => client.stats()[0]!.failedAttempts === 0)
      expect(client.stats()[0]!.reconnects).toBe(0)
    }))

  it.effect("pings every interval and drops a connection that misses a pong (virtual time)", () =>
    Effect.gen(function*() {
      const server = yield* fakeServer
      yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1, pingInterval: 30_000 }))
      const conn = yield* greeted(server)
      // a server that never answers pings: ws answers automatically, so stop it
      ;(conn.ws as unknown as { _autoPong: boolean })._autoPong = false
      let pings = 0
      conn.ws.on("ping", () => pings++)
      yield* TestClock.adjust(30_000)
      yield* waitFor("ping", () => pings === 1)
      expect(conn.closed).toBe(false)
      yield* TestClock.adjust(30_000)
      yield* waitFor("dropped", () => conn.closed)
    }))

  it.live("warns loudly at start-up when no rule is configured", () =>
    Effect.gen(function*() {
      const messages: Array<string> = []
      const capture = Logger.make((options) => void messages.push(`${options.logLevel} ${String(options.message)}`))
      yield* Effect.scoped(Effect.gen(function*() {
        const server = yield* fakeServer
        yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 0, poolMaxSize: 1 }))
        yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 0, poolMaxSize: 1, rules: rules({ whitelist: [{ url: "x" }] }) }))
      })).pipe(Effect.provide(Logger.layer([capture])))
      const warnings = messages.filter((m) => m.startsWith("Warn") && m.includes("every destination is allowed"))
      expect(warnings).toHaveLength(1)
    }))

  it.live("relays bodies on the fast path on this ws (no slow-path warning once connected)", () =>
    Effect.gen(function*() {
      const messages: Array<string> = []
      const capture = Logger.make((options) => void messages.push(String(options.message)))
      yield* Effect.scoped(Effect.gen(function*() {
        const server = yield* fakeServer
        yield* makeWspClient(clientConfig(server.url, { poolIdleSize: 1, poolMaxSize: 1, rules: rules({ whitelist: [{ url: "x" }] }) }))
        yield* waitFor("connected and greeted", () => server.connections.some((c) => c.greeting !== undefined))
      })).pipe(Effect.provide(Logger.layer([capture])))
      expect(messages.filter((m) => m.includes("fast body relay"))).toEqual([])
    }))

  it.live("is available as a Layer", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* fakeServer
      const stats = yield* Effect.gen(function*() {
        const client = yield* WspClient
        yield* waitFor("connected", () => client.stats()[0]!.idle === 1)
        return client.stats()
      }).pipe(Effect.provide(WspClient.layer(clientConfig(server.url, { poolIdleSize: 1 }))))
      expect(stats).toEqual([{ target: server.url, connecting: 0, idle: 1, running: 0, total: 1, failedAttempts: 0, reconnects: 0 }])
    })))
})

describe("reconnectDelay", () => {
  it.prop(
    "stays within the upper half of the capped exponential ceiling",
    [Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 200 })), Schema.Number.check(Schema.isBetween({ minimum: 0, maximum: 0.999999 }))],
    ([failures, random]) => {
      const ceiling = Math.min(30_000, 1000 * 2 ** (failures - 1))
      const delay = reconnectDelay(failures, 1000, 30_000, random)
      expect(delay).toBeGreaterThanOrEqual(Math.floor(ceiling / 2))
      expect(delay).toBeLessThanOrEqual(ceiling)
      expect(delay).toBeLessThanOrEqual(30_000)
    }
  )
})
