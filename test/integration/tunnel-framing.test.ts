/**
 * Backends are not trusted with framing: a tunnel backend answering raw HTTP/1.1 bytes that disagree
 * with their own framing (bytes past a Content-Length, in the same read or later while its connection
 * sits idle in the pool; Content-Length values that are not one number) never puts a byte onto a public
 * keep-alive connection beyond its own response, whichever route the next request on it is for.
 */
import { assert, describe, it } from "@effect/vitest"
import type { Duplex } from "node:stream"
import { Context, Effect } from "effect"
import * as http2 from "node:http2"
import type { RouteDefinition } from "../../src/domain/Route.ts"
import { TunnelClient } from "../../src/services/client/TunnelClient.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { freePort, makeCertificate } from "../services/ListenersFixtures.ts"
import { rawExchange, until } from "./reverse-h2-harness.ts"
import { client, gateway, serveHttp } from "./tunnelHarness.ts"

const forged = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"

/**
 * What a raw backend writes for a request path: one write, or several (each after the previous one went
 * out); an empty string ends its stream.
 */
type RawAnswer = (path: string) => ReadonlyArray<string>

/**
 * A tunnel backend that answers each request head on a stream with `answer`'s raw bytes; records the
 * paths asked for and how many of its streams closed.
 */
const serveRaw = (tunnel: TunnelClient["Service"], route: RouteDefinition, answer: RawAnswer) =>
  Effect.gen(function*() {
    const seen = { paths: [] as Array<string>, closed: 0 }
    let resolveBound!: () => void
    const bound = new Promise<void>((resolve) => resolveBound = resolve)
    yield* tunnel.addListener({
      route,
      onConnection: ({ socket }: { socket: Duplex }) => {
        let buffered = ""
        socket.on("error", () => socket.destroy())
        socket.on("close", () => void seen.closed++)
        socket.on("data", (chunk: Buffer) => {
          buffered += chunk.toString("latin1")
          for (let end = buffered.indexOf("\r\n\r\n"); end !== -1; end = buffered.indexOf("\r\n\r\n")) {
            const path = buffered.slice(0, buffered.indexOf("\r\n")).split(" ")[1]!
            buffered = buffered.slice(end + 4)
            seen.paths.push(path)
            const writes = [...answer(path)]
            const next = () => {
              const bytes = writes.shift()
              // an empty write ends the stream
              if (bytes === "") socket.end()
              else if (bytes !== undefined) socket.write(bytes, () => setTimeout(next, 20))
            }
            next()
          }
        })
      },
      onRejected: () => {},
      onBound: () => resolveBound()
    })
    yield* Effect.promise(() => bound)
    return seen
  })

describe("control-port tunnels: backends are not trusted with framing", () => {
  for (const rawEngine of [true]) {
    it.live(`bytes past a response's Content-Length never reach the client; invalid lengths are a 502 (${rawEngine ? "raw engine" : "Node's http"})`, () =>
      Effect.gen(function*() {
        const before = activeHandles()
        yield* Effect.gen(function*() {
          const control = Context.get(yield* gateway({}), ControlPort)
          const port = yield* Effect.promise(freePort)
          const tunnel = Context.get(yield* client([control.address.port!], { label: "evil" }), TunnelClient)
          const other = Context.get(yield* client([control.address.port!], { label: "other" }), TunnelClient)
          const evil = yield* serveRaw(tunnel, { _tag: "Http", port, pathPrefix: "/evil" }, (path) => {
            switch (path) {
              case "/evil/same-read":
                return ["HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc" + forged]
              case "/evil/later-read":
                return ["HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", forged]
              case "/evil/head-only":
                return ["HTTP/1.1 204 No Content\r\n\r\n" + forged]
              case "/evil/head":
                return ["HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"]
              case "/evil/abc":
                return ["HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nabc"]
              case "/evil/list":
                return ["HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabc"]
              case "/evil/same-list":
                return ["HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc"]
              case "/evil/two":
                return ["HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"]
              case "/evil/two-same":
                return ["HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"]
              default:
                return [`HTTP/1.1 200 OK\r\nContent-Length: ${path.length}\r\n\r\n${path}`]
            }
          })
          yield* serveHttp(other, { _tag: "Http", port, pathPrefix: "/other" }, (req, res) => {
            res.writeHead(200, { "content-length": String(req.url!.length) })
            res.end(req.url)
          })
          const get = (path: string, close = false) => `GET ${path} HTTP/1.1\r\nHost: a.test\r\n${close ? "Connection: close\r\n" : ""}\r\n`
          // the engine relays the backend's head as it is; Node's server adds its own fields
          const fields = (connection: "keep-alive" | "close") =>
            rawEngine
              ? connection === "close" ? "Connection: close\r\n" : ""
              : `Date: -\r\nConnection: ${connection}\r\n${connection === "keep-alive" ? "Keep-Alive: timeout=5\r\n" : ""}`
          const answered = (body: string) => `HTTP/1.1 200 OK\r\nContent-Length: ${body.length}\r\n${fields("keep-alive")}\r\n${body}`
          const closing = (body: string) => `HTTP/1.1 200 OK\r\nContent-Length: ${body.length}\r\n${fields("close")}\r\n${body}`
          const otherAnswer = (body: string) => `HTTP/1.1 200 OK\r\ncontent-length: ${body.length}\r\nDate: -\r\nConnection: close\r\n\r\n${body}`

          // bytes past the length in the same read: the response ends at its length, the next request
          // (another tenant's route on the same port) gets its own answer, and the backend's stream is not reused
          const sameRead = yield* Effect.promise(() => rawExchange(port, get("/evil/same-read") + get("/other/x", true)))
          assert.strictEqual(sameRead, answered("abc") + otherAnswer("/other/x"))
          yield* until(() => evil.closed === 1, "the stream that sent too much to be closed")
          // a response to which no body belongs, followed by bytes: the same
          const headOnly = yield* Effect.promise(() => rawExchange(port, get("/evil/head-only") + get("/other/y", true)))
          assert.strictEqual(headOnly, `HTTP/1.1 204 No Content\r\n${fields("keep-alive")}\r\n` + otherAnswer("/other/y"))
          yield* until(() => evil.closed === 2, "the stream that sent a body after a 204 to be closed")
          const head = yield* Effect.promise(() => rawExchange(port, `HEAD /evil/head HTTP/1.1\r\nHost: a.test\r\n\r\n` + get("/other/h", true)))
          // (Node's HTTP client takes the bytes after a HEAD response for a malformed message and fails the
          // exchange before the head is relayed: the connection is closed with nothing on it)
          assert.strictEqual(head, rawEngine ? `HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n` + otherAnswer("/other/h") : "")
          yield* until(() => evil.closed === 3, "the stream that sent a body after a HEAD to be closed")
          // bytes past the length in a later read, while the connection sits idle in the pool: it is
          // dropped, and the next request to the same backend goes on a new stream
          const later = yield* Effect.promise(() => rawExchange(port, get("/evil/later-read", true)))
          assert.strictEqual(later, closing("abc"))
          yield* until(() => evil.closed === 4, "the stream that talked out of turn to be closed")
          const next = yield* Effect.promise(() => rawExchange(port, get("/evil/next", true)))
          assert.strictEqual(next, closing("/evil/next"))
          // a Content-Length that is not one decimal value: 502, never relayed
          for (const path of ["/evil/abc", "/evil/list", "/evil/same-list", "/evil/two", "/evil/two-same"]) {
            const bad = yield* Effect.promise(() => rawExchange(port, get(path) + get("/other/z", true)))
            // (the public caller reads no session, stream or backend address; the detail is in the gateway's log)
            assert.match(bad, /^HTTP\/1\.1 502 Bad Gateway\r\n[^]*\r\n\r\nswitchyard: bad gateway \(the backend could not be reached or its answer could not be relayed\)\n$/, path)
            assert.notInclude(bad, "abc", path)
          }
          assert.deepStrictEqual(evil.paths, [
            "/evil/same-read",
            "/evil/head-only",
            "/evil/head",
            "/evil/later-read",
            "/evil/next",
            "/evil/abc",
            "/evil/list",
            "/evil/same-list",
            "/evil/two",
            "/evil/two-same"
          ])
        }).pipe(Effect.scoped)
        yield* Effect.promise(() => expectNoLeaks(before))
      }))
  }

  it.live("an HTTP/2 public client on a TLS route: a response cut short by its backend is a reset stream, never complete", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.gen(function*() {
        const control = Context.get(yield* gateway(), ControlPort)
        const port = yield* Effect.promise(freePort)
        const certificate = makeCertificate("secure.test")
        const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
        yield* serveRaw(tunnel, { _tag: "Tls", port, domainSuffix: "secure.test", cert: certificate.cert, key: certificate.key, then: "http" }, (path) =>
          path === "/short"
            ? ["HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", ""]
            : [`HTTP/1.1 200 OK\r\nContent-Length: ${path.length}\r\n\r\n${path}`])
        const outcomes = yield* Effect.promise(() =>
          new Promise<Array<string>>((resolve, reject) => {
            const h2 = http2.connect(`https://127.0.0.1:${port}`, { servername: "api.secure.test", ca: certificate.cert })
            h2.on("error", reject)
            const get = (path: string) =>
              new Promise<string>((done) => {
                const req = h2.request({ ":path": path, ":authority": "api.secure.test" })
                let status = 0
                let text = ""
                req.setEncoding("latin1")
                req.on("response", (h) => void (status = Number(h[":status"])))
                req.on("data", (c: string) => void (text += c))
                req.on("error", () => undefined)
                req.on("close", () => done(`${status} ${req.rstCode === 0 ? "complete" : "reset"} ${JSON.stringify(text)}`))
                req.end()
              })
            void get("/short").then(async (short) => {
              const fine = await get("/fine")
              h2.close()
              resolve([short, fine])
            })
          })
        )
        assert.match(outcomes[0]!, /^200 reset "(?:|a|ab|abc)"$/)
        assert.strictEqual(outcomes[1], `200 complete "/fine"`)
      }).pipe(Effect.scoped)
      yield* Effect.promise(() => expectNoLeaks(before))
    }))

  it.live("an HTTP/2 public client's body without content-length reaches the backend whole; forbidden trailers do not", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.gen(function*() {
        const control = Context.get(yield* gateway(), ControlPort)
        const port = yield* Effect.promise(freePort)
        const certificate = makeCertificate("secure.test")
        const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
        const seen: Array<{ body: string; trailers: Record<string, string | undefined> }> = []
        yield* serveHttp(tunnel, { _tag: "Tls", port, domainSuffix: "secure.test", cert: certificate.cert, key: certificate.key, then: "http" }, (req, res) => {
          let body = ""
          req.setEncoding("latin1")
          req.on("data", (c: string) => void (body += c))
          req.on("end", () => {
            seen.push({ body, trailers: { ...req.trailers } })
            res.end("ok")
          })
        })
        const status = yield* Effect.promise(() =>
          new Promise<number>((resolve, reject) => {
            const h2 = http2.connect(`https://127.0.0.1:${port}`, { servername: "api.secure.test", ca: certificate.cert })
            h2.on("error", reject)
            const req = h2.request({ ":method": "POST", ":path": "/x", ":authority": "api.secure.test" }, { waitForTrailers: true })
            let got = 0
            req.on("response", (h) => void (got = Number(h[":status"])))
            req.on("wantTrailers", () => req.sendTrailers({ "x-sum": "1", authorization: "Bearer smuggled", cookie: "a=b", "x-forwarded-for": "10.0.0.1" }))
            req.resume()
            req.on("close", () => {
              h2.close()
              resolve(got)
            })
            req.end("hello-body")
          })
        )
        assert.strictEqual(status, 200)
        assert.strictEqual(seen.length, 1)
        assert.strictEqual(seen[0]!.body, "hello-body")
        assert.deepStrictEqual(seen[0]!.trailers, { "x-sum": "1" })
      }).pipe(Effect.scoped)
      yield* Effect.promise(() => expectNoLeaks(before))
    }))
})
