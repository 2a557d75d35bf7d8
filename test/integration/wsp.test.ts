import { describe, expect, it } from "@effect/vitest"
import * as http from "node:http"
import * as net from "node:net"
import { Effect, Exit, Redacted, Scope } from "effect"
import { compileRules } from "../../src/domain/DestinationRules.ts"
import type { DestinationRules } from "../../src/domain/DestinationRules.ts"
import { makeWspClient } from "../../src/services/client/WspClient.ts"
import { makeWspServer } from "../../src/services/front/WspServer.ts"
import { noLeaks } from "../support/leaks.ts"
import { freePort as allocatePort } from "../support/ports.ts"
import { call, callE, clientConfig, destination, pattern, serverConfig, waitFor } from "./wspSupport.ts"

const rules = (lists: Parameters<typeof compileRules>[0]): DestinationRules => {
  const r = compileRules(lists)
  if ("_tag" in r) throw new Error(r.message)
  return r
}

const freePort = () => Effect.promise(() => allocatePort())

const setup = (opts: { server?: Parameters<typeof serverConfig>[0]; client?: Partial<Parameters<typeof clientConfig>[1]> } = {}) =>
  Effect.gen(function*() {
    const dest = yield* destination
    const server = yield* makeWspServer(serverConfig(opts.server))
    const target = `ws://127.0.0.1:${server.address.port}/register`
    const client = yield* makeWspClient(clientConfig(target, opts.client))
    const idle = clientConfig(target, opts.client).poolIdleSize
    yield* waitFor("pool filled", () => server.stats().idle >= idle)
    return { dest, server, client, port: server.address.port }
  })

describe("wsp end to end (our server, our client, loopback)", () => {
  it.live("answers /status with ok", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const reply = yield* callE(server.address.port, { path: "/status" })
      expect(reply.status).toBe(200)
      expect(reply.body.toString()).toBe("ok")
    })))

  it.live("GET and POST with 1 MiB bodies both ways", () =>
    noLeaks(Effect.gen(function*() {
      const { dest, port } = yield* setup()
      const mib = 1024 * 1024
      const down = yield* callE(port, { destination: dest.url(`/bytes?n=${mib}`) })
      expect(down.status).toBe(200)
      expect(down.body.length).toBe(mib)
      expect(down.body[1000]).toBe(1000 % 251)
      const body = pattern(mib)
      const up = yield* callE(port, { method: "POST", destination: dest.url("/echo"), body })
      expect(up.status).toBe(200)
      expect(up.headers["x-method"]).toBe("POST")
      expect(Buffer.compare(up.body, body)).toBe(0)
      expect(dest.seen.at(-1)!.bodyLength).toBe(mib)
    })))

  it.live("works with unmasked client frames (maskframes: false)", () =>
    noLeaks(Effect.gen(function*() {
      const { dest, port } = yield* setup({ client: { maskFrames: false } })
      const body = pattern(300_000, 3)
      const up = yield* callE(port, { method: "POST", destination: dest.url("/echo"), body })
      expect(Buffer.compare(up.body, body)).toBe(0)
    })))

  it.live("relays a streamed response of unknown length completely", () =>
    noLeaks(Effect.gen(function*() {
      const { dest, port } = yield* setup()
      const reply = yield* callE(port, { destination: dest.url("/stream?chunks=200&size=3000") })
      expect(reply.status).toBe(200)
      expect(reply.body.length).toBe(600_000)
      expect(reply.body[0]).toBe(97)
      expect(reply.body[599_999]).toBe(97 + (199 % 26))
    })))

  it.live("streams a response through both halves while the destination is still sending", () =>
    noLeaks(Effect.gen(function*() {
      const { dest, port } = yield* setup()
      const received: Array<string> = []
      let ended = false
      const req = http.get({ host: "127.0.0.1", port, path: "/request", agent: false, headers: { "X-Proxy-Destination": dest.url("/hold") } }, (res) => {
        res.on("data", (c: Buffer) => received.push(c.toString()))
        res.on("end", () => (ended = true))
      })
      req.on("error", () => undefined)
      yield* waitFor("first part delivered while the destination holds the rest", () => received.join("") === "first\n")
      expect(ended).toBe(false)
      expect(dest.release()).toBe(true)
      yield* waitFor("rest delivered", () => ended)
      expect(received.join("")).toBe("first\nsecond\n")
    })))

  it.live("aborts the caller's response when the destination dies mid-body (Content-Length and chunked), never a short complete one", () =>
    noLeaks(Effect.gen(function*() {
      const { port } = yield* setup()
      const sockets = new Set<net.Socket>()
      const dying = net.createServer((socket) => {
        sockets.add(socket)
        socket.on("error", () => undefined)
        socket.once("data", (d) => {
          const chunked = d.toString("latin1").startsWith("GET /chunked ")
          socket.write(chunked
            ? "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4000\r\n" + "y".repeat(0x4000) + "\r\n"
            : "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + "x".repeat(20_000))
          setTimeout(() => socket.destroy(), 50)
        })
      })
      yield* Effect.acquireRelease(
        Effect.promise(() => new Promise<void>((resolve) => dying.listen(0, "127.0.0.1", resolve))),
        () => Effect.promise(() => new Promise<void>((resolve) => {
          for (const s of sockets) s.destroy()
          dying.close(() => resolve())
        }))
      )
      const dyingPort = (dying.address() as net.AddressInfo).port
      for (const path of ["/sized", "/chunked"]) {
        const outcome = yield* Effect.promise(() => new Promise<{ status: number; bytes: number; complete: boolean }>((resolve) => {
          const req = http.get({ host: "127.0.0.1", port, path: "/request", agent: false, headers: { "X-Proxy-Destination": `http://127.0.0.1:${dyingPort}${path}` } }, (res) => {
            let bytes = 0
            res.on("data", (c: Buffer) => (bytes += c.length))
            res.on("error", () => undefined)
            res.on("close", () => resolve({ status: res.statusCode!, bytes, complete: res.complete }))
          })
          req.on("error", () => undefined)
        }))
        expect(outcome.status).toBe(200)
        expect(outcome.complete).toBe(false)
        expect(outcome.bytes).toBeLessThanOrEqual(path === "/sized" ? 20_000 : 0x4000)
      }
    })))

  it.live("delivers a large download intact to a caller that reads in bursts (reused read buffers, masked and unmasked)", () =>
    noLeaks(Effect.gen(function*() {
      for (const maskFrames of [true, false]) {
        const { dest, port } = yield* setup({ client: { maskFrames } })
        const n = 24 * 1024 * 1024 + 7
        const body = yield* Effect.promise(() => new Promise<Buffer>((resolve, reject) => {
          const req = http.get({ host: "127.0.0.1", port, path: "/request", agent: false, headers: { "X-Proxy-Destination": dest.url(`/bytes?n=${n}`) } }, (res) => {
            const parts: Array<Buffer> = []
            let reads = 0
            // nothing is read at first, so every hop's buffers fill up
            res.pause()
            setTimeout(() => res.resume(), 300)
            res.on("data", (c: Buffer) => {
              parts.push(c)
              // stop reading now and then so that every hop's buffers fill and drain
              if (++reads % 16 === 0) {
                res.pause()
                setTimeout(() => res.resume(), 5)
              }
            })
            res.on("end", () => resolve(Buffer.concat(parts)))
            res.on("error", reject)
          })
          req.on("error", reject)
        }))
        expect(body.length).toBe(n)
        let bad = -1
        for (let i = 0; i < n; i++) {
          if (body[i] !== i % 251) {
            bad = i
            break
          }
        }
        expect(bad).toBe(-1)
      }
    })), { timeout: 60_000 })

  it.live("never opens a connection to a destination its rules refuse", () =>
    noLeaks(Effect.gen(function*() {
      let accepted = 0
      const watched = net.createServer((socket) => {
        accepted++
        socket.destroy()
      })
      yield* Effect.acquireRelease(
        Effect.promise(() => new Promise<void>((resolve) => watched.listen(0, "127.0.0.1", resolve))),
        () => Effect.promise(() => new Promise<void>((resolve) => watched.close(() => resolve())))
      )
      const watchedPort = (watched.address() as net.AddressInfo).port
      const { port } = yield* setup({ client: { rules: rules({ blacklist: [{ url: `:${watchedPort}/` }] }) } })
      const body = pattern(200_000)
      const refused = yield* callE(port, { method: "POST", destination: `http://127.0.0.1:${watchedPort}/upload`, body })
      expect(refused.status).toBe(403)
      expect(refused.body.toString()).toBe("Destination is forbidden")
      expect(accepted).toBe(0)
    })))

  it.live("serves 60 concurrent callers through a pool of 10 without doubling up", () =>
    noLeaks(Effect.gen(function*() {
      const { dest, port, server } = yield* setup({
        server: { timeout: 10_000 },
        client: { poolIdleSize: 10, poolMaxSize: 10 }
      })
      let maxBusy = 0
      const watch = setInterval(() => (maxBusy = Math.max(maxBusy, server.stats().busy)), 1)
      const replies = yield* Effect.promise(() =>
        Promise.all(Array.from({ length: 60 }, (_, i) => call(port, { destination: dest.url(`/slow?ms=20&i=${i}`) })))
      )
      clearInterval(watch)
      expect(replies.every((r) => r.status === 200 && r.body.toString() === "slow")).toBe(true)
      expect(dest.seen.length).toBe(60)
      expect(dest.maxConcurrent()).toBeLessThanOrEqual(10)
      expect(maxBusy).toBeLessThanOrEqual(10)
      expect(server.stats().idle + server.stats().busy).toBeLessThanOrEqual(10)
    })))

  it.live("refills the pool after a connection dies", () =>
    noLeaks(Effect.gen(function*() {
      const { dest, port, server } = yield* setup({ client: { poolIdleSize: 3, poolMaxSize: 5, maxMessageSize: 10_000 } })
      // a response larger than the client's message limit: that connection is dropped
      const failed = yield* callE(port, { destination: dest.url("/bytes?n=50000") })
      expect(failed.status).toBe(526)
      yield* waitFor("pool refilled", () => server.stats().idle === 3)
      const ok = yield* callE(port, { destination: dest.url("/bytes?n=100") })
      expect(ok.status).toBe(200)
      expect(ok.body.length).toBe(100)
    })))

  it.live("fails with wsp's 526 when no connection frees up within the timeout", () =>
    noLeaks(Effect.gen(function*() {
      const { dest, port } = yield* setup({ server: { timeout: 150 }, client: { poolIdleSize: 1, poolMaxSize: 1 } })
      const slow = Effect.runPromise(callE(port, { destination: dest.url("/slow?ms=1500") }))
      yield* waitFor("slow request reached the destination", () => dest.seen.length === 1)
      const second = yield* callE(port, { destination: dest.url("/echo") })
      expect(second.status).toBe(526)
      expect(second.body.toString()).toBe("Unable to get a proxy connection\n")
      const first = yield* Effect.promise(() => slow)
      expect(first.status).toBe(200)
    })))

  it.live("answers 526 when no client has registered", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* makeWspServer(serverConfig())
      const reply = yield* callE(server.address.port, { destination: dest.url("/echo") })
      expect(reply.status).toBe(526)
      expect(reply.body.toString()).toBe("No proxy available\n")
      const missing = yield* callE(server.address.port, {})
      expect(missing.status).toBe(526)
      expect(missing.body.toString()).toBe("Missing X-PROXY-DESTINATION header\n")
    })))

  it.live("refuses a client with the wrong secret", () =>
    noLeaks(Effect.gen(function*() {
      const server = yield* makeWspServer(serverConfig())
      const target = `ws://127.0.0.1:${server.address.port}/register`
      const client = yield* makeWspClient(clientConfig(target, { secretKey: Redacted.make("wrong") }))
      yield* Effect.sleep(300)
      expect(server.stats().pools).toBe(0)
      expect(client.stats()[0]!.idle).toBe(0)
      const plain = yield* callE(server.address.port, { path: "/register", headers: { "X-Secret-Key": "wrong" } })
      expect(plain.status).toBe(526)
      expect(plain.body.toString()).toBe("Invalid X-SECRET-KEY\n")
    })))

  it.live("refuses destinations outside the client's rules without contacting them", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const server = yield* makeWspServer(serverConfig())
      const target = `ws://127.0.0.1:${server.address.port}/register`
      yield* makeWspClient(clientConfig(target, {
        rules: rules({ whitelist: [{ method: "^GET$", url: `^http://127\\.0\\.0\\.1:${dest.port}/echo` }], blacklist: [{ url: "secret" }] })
      }))
      yield* waitFor("pool filled", () => server.stats().idle >= 2)
      const other = yield* callE(server.address.port, { destination: dest.url("/bytes?n=10") })
      expect(other.status).toBe(403)
      expect(other.body.toString()).toBe("Destination is not allowed")
      const post = yield* callE(server.address.port, { method: "POST", destination: dest.url("/echo"), body: Buffer.from("x") })
      expect(post.status).toBe(403)
      const black = yield* callE(server.address.port, { destination: dest.url("/echo?secret=1") })
      expect(black.status).toBe(403)
      expect(black.body.toString()).toBe("Destination is forbidden")
      expect(dest.seen.length).toBe(0)
      const allowed = yield* callE(server.address.port, { destination: dest.url("/echo") })
      expect(allowed.status).toBe(200)
      expect(dest.seen.length).toBe(1)
    })))

  it.live("applies wsp's server-side rules with 526", () =>
    noLeaks(Effect.gen(function*() {
      const { dest, port } = yield* setup({ server: { rules: rules({ blacklist: [{ url: "/bytes" }] }) } })
      const reply = yield* callE(port, { destination: dest.url("/bytes?n=1") })
      expect(reply.status).toBe(526)
      expect(reply.body.toString()).toBe("Destination is forbidden\n")
      expect(dest.seen.length).toBe(0)
    })))

  it.live("requires the /request credential when one is configured", () =>
    noLeaks(Effect.gen(function*() {
      const { dest, port } = yield* setup({ server: { requestKey: Redacted.make("caller-key") } })
      const without = yield* callE(port, { destination: dest.url("/echo") })
      expect(without.status).toBe(401)
      const wrong = yield* callE(port, { destination: dest.url("/echo"), headers: { "Proxy-Authorization": "Bearer nope" } })
      expect(wrong.status).toBe(401)
      const right = yield* callE(port, { destination: dest.url("/echo"), headers: { "Proxy-Authorization": "Bearer caller-key" } })
      expect(right.status).toBe(200)
      expect(dest.seen[0]!.headers["proxy-authorization"]).toBeUndefined()
      expect(dest.seen.length).toBe(1)
    })))

  it.live("reconnects clients after the server restarts", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* destination
      const port = yield* freePort()
      const first = yield* Scope.make()
      const server1 = yield* makeWspServer(serverConfig({ port })).pipe(Scope.provide(first))
      yield* makeWspClient(clientConfig(`ws://127.0.0.1:${port}/register`, { backoffInitial: 20, backoffMax: 100 }))
      yield* waitFor("pool filled", () => server1.stats().idle >= 2)
      yield* Scope.close(first, Exit.void)
      const server2 = yield* makeWspServer(serverConfig({ port }))
      yield* waitFor("clients reconnected", () => server2.stats().idle >= 2)
      const reply = yield* callE(port, { destination: dest.url("/echo"), method: "POST", body: Buffer.from("again") })
      expect(reply.status).toBe(200)
      expect(reply.body.toString()).toBe("again")
    })))
})
