/**
 * Request smuggling and allowlist bypass, class by class, on the socket proxy and on a tunnel route: each
 * case asserts the status the client gets and the exact bytes that reach a raw logging upstream (a Unix
 * socket behind the socket proxy, a tunnel backend reading its streams raw). Where a message is refused,
 * nothing of it may reach the upstream; where it is forwarded, exactly one well-framed request does.
 */
import { afterAll, beforeAll, describe, expect, it } from "@effect/vitest"
import { Context, Effect, Exit, Layer, Scope } from "effect"
import type { RouteDefinition } from "../../src/domain/Route.ts"
import { ConfigError, decodeSocketProxyFile, resolveConfig, type SocketProxyFile } from "../../src/domain/SocketProxyConfig.ts"
import { TunnelClient } from "../../src/services/client/TunnelClient.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { SocketProxy } from "../../src/services/front/SocketProxy.ts"
import { freePort } from "../services/ListenersFixtures.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { exchange, makeRawLog, OK_RESPONSE, type RawLog, type RawUnixUpstream, serveRaw, startRawUnixUpstream } from "../support/rawUpstream.ts"
import { client, gateway } from "./tunnelHarness.ts"

/** One front door under test: where clients connect, what the upstream logged, and what it adds to a head. */
interface Front {
  readonly name: string
  readonly port: number
  readonly log: RawLog
  readonly setReply: (reply: (head: string) => string) => void
  /** The headers the front door appends to a forwarded head (after the client's own). */
  readonly added: (host: string) => string
  readonly close: () => Promise<void>
}

const statusOf = (response: string): number => Number(/^HTTP\/1\.1 (\d{3})/.exec(response)?.[1] ?? 0)

/** Waits (bounded) until the upstream has logged at least `n` bytes in all. */
const upstreamBytes = async (log: RawLog, n: number): Promise<string> => {
  for (let i = 0; i < 500 && log.text().length < n; i++) await new Promise((r) => setTimeout(r, 10))
  return log.text()
}

const startSocketProxy = async (): Promise<Front> => {
  const upstream: RawUnixUpstream = await startRawUnixUpstream()
  const decoded = decodeSocketProxyFile({
    upstream: `unix:${upstream.socketPath}`,
    listen: ["127.0.0.1:0"],
    rules: ["GET /_ping", "POST /containers/*/kill"]
  })
  if (decoded instanceof ConfigError) throw new Error(decoded.message)
  const config = resolveConfig(decoded as SocketProxyFile)
  if (config instanceof ConfigError) throw new Error(config.message)
  const scope = Effect.runSync(Scope.make())
  const ctx = await Effect.runPromise(Layer.build(SocketProxy.layer(config)).pipe(Scope.provide(scope)))
  const address = Context.get(ctx, SocketProxy).addresses.find((a) => a._tag === "Tcp")
  if (address === undefined || address._tag !== "Tcp") throw new Error("no TCP listener")
  return {
    name: "socket proxy",
    port: address.port,
    log: upstream.log,
    setReply: upstream.setReply,
    // toward a Unix-socket API, X-Forwarded-* are off by default
    added: () => "",
    close: async () => {
      await Effect.runPromise(Scope.close(scope, Exit.void))
      await upstream.close()
    }
  }
}

/** A tunnel backend that reads its streams raw, on `route`, until the scope closes. */
const serveRawTunnel = (tunnel: TunnelClient["Service"], route: RouteDefinition, log: RawLog, reply: () => (head: string) => string) =>
  Effect.gen(function*() {
    let bound!: () => void
    const isBound = new Promise<void>((resolve) => (bound = resolve))
    yield* tunnel.addListener({
      route,
      onConnection: ({ socket }) => serveRaw(log, socket, (head) => reply()(head)),
      onRejected: (_g, reason, message) => {
        throw new Error(`${reason}: ${message}`)
      },
      onBound: () => bound()
    })
    yield* Effect.promise(() => isBound)
  })

const startTunnel = async (): Promise<Front> => {
  const scope = Effect.runSync(Scope.make())
  const port = await freePort()
  const log = makeRawLog()
  let reply: (head: string) => string = () => OK_RESPONSE
  await Effect.runPromise(
    Effect.gen(function*() {
      const gw = yield* gateway()
      const control = Context.get(gw, ControlPort)
      const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
      yield* serveRawTunnel(tunnel, { _tag: "Http", port }, log, () => reply)
    }).pipe(Scope.provide(scope))
  )
  return {
    name: "tunnel route",
    port,
    log,
    setReply: (r) => void (reply = r),
    added: (host) => `X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ${host}\r\n`,
    close: () => Effect.runPromise(Scope.close(scope, Exit.void))
  }
}

/** A case: what the client sends, the status it must get, and what must reach the upstream (exactly). */
interface Case {
  readonly name: string
  readonly send: string
  readonly status: number
  /** The exact bytes the upstream receives; `""` when nothing may reach it. */
  readonly upstream: (front: Front) => string
  /**
   * The request is refused part-way through its body: the upstream receives a prefix of `upstream` (what
   * was forwarded before the refusal; nothing when all of it arrived in one read), never more.
   */
  readonly prefix?: true
}

const nothing = () => ""
const SMUGGLED = "POST /containers/create HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"

const cases: ReadonlyArray<Case> = [
  // 1. Connection-nominated framing headers
  {
    name: "Connection: Content-Length with a request hidden in the body",
    send: `POST /containers/a/kill HTTP/1.1\r\nHost: h\r\nConnection: Content-Length\r\nContent-Length: ${SMUGGLED.length}\r\n\r\n${SMUGGLED}`,
    status: 400,
    upstream: nothing
  },
  {
    name: "Connection: keep-alive, Transfer-Encoding on a chunked request",
    send: "POST /containers/a/kill HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    status: 400,
    upstream: nothing
  },
  { name: "Connection: Host", send: "GET /_ping HTTP/1.1\r\nHost: h\r\nConnection: Host\r\n\r\n", status: 400, upstream: nothing },
  {
    name: "Connection: Content-Type (a field the form check reads)",
    send: "POST /containers/a/kill HTTP/1.1\r\nHost: h\r\nConnection: content-type\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 14\r\n\r\nsignal=SIGKILL",
    status: 400,
    upstream: nothing
  },
  // 2. Repeated fields read differently by the proxy and the upstream
  {
    name: "two Content-Type fields (form first, JSON second)",
    send:
      "POST /containers/a/kill HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\nsignal=SIGKILL",
    status: 400,
    upstream: nothing
  },
  {
    name: "two Transfer-Encoding fields",
    send: "POST /containers/a/kill HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    status: 400,
    upstream: nothing
  },
  {
    name: "two X-HTTP-Method-Override fields",
    send: "GET /_ping HTTP/1.1\r\nHost: h\r\nX-HTTP-Method-Override: GET\r\nX-HTTP-Method-Override: DELETE\r\n\r\n",
    status: 400,
    upstream: nothing
  },
  { name: "two Host fields", send: "GET /_ping HTTP/1.1\r\nHost: h\r\nHost: other\r\n\r\n", status: 400, upstream: nothing },
  {
    name: "Content-Length and Transfer-Encoding",
    send: `POST /containers/a/kill HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n${SMUGGLED}`,
    status: 400,
    upstream: nothing
  },
  // 3. Trailers
  {
    name: "a request line hidden in the trailer section",
    send: `POST /containers/a/kill HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n${SMUGGLED}`,
    status: 400,
    // the head and the chunks go on as they come; the trailer section is held and never sent
    prefix: true,
    upstream: (f) => `POST /containers/a/kill HTTP/1.1\r\nHost: h\r\n${f.added("h")}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n`
  },
  {
    name: "trailers that must not be trailers are dropped, the others relayed",
    send:
      "POST /containers/a/kill HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nHost: evil\r\nTE: trailers\r\nX-Checksum: 1\r\nAuthorization: Basic x\r\nKeep-Alive: 5\r\n\r\n",
    status: 200,
    upstream: (f) =>
      `POST /containers/a/kill HTTP/1.1\r\nHost: h\r\n${f.added("h")}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n`
  },
  {
    // llhttp refuses a length or a coding among the trailers (and closes on a Connection one): refused, not dropped
    name: "a Content-Length or Transfer-Encoding trailer",
    send:
      "POST /containers/a/kill HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Checksum: 1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    status: 400,
    prefix: true,
    upstream: (f) => `POST /containers/a/kill HTTP/1.1\r\nHost: h\r\n${f.added("h")}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n`
  },
  // 4. Absolute-form targets
  {
    name: "an absolute-form target for another host than Host",
    send: "GET http://b.test/_ping HTTP/1.1\r\nHost: a.test\r\n\r\n",
    status: 400,
    upstream: nothing
  },
  // 6. h2c upgrades are not relayed
  {
    name: "Upgrade: h2c with HTTP2-Settings",
    send: "GET /_ping HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    status: 200,
    upstream: (f) => `GET /_ping HTTP/1.1\r\nHost: h\r\n${f.added("h")}\r\n`
  },
  // bare LF, obs-fold and NUL never reach the upstream
  { name: "a bare LF in the head", send: "GET /_ping HTTP/1.1\nHost: h\r\n\r\n", status: 400, upstream: nothing },
  { name: "obs-fold", send: "GET /_ping HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", status: 400, upstream: nothing },
  { name: "NUL in a value", send: "GET /_ping HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", status: 400, upstream: nothing },
  {
    name: "a chunk size with a sign",
    send: "POST /containers/a/kill HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n",
    status: 400,
    prefix: true,
    upstream: (f) => `POST /containers/a/kill HTTP/1.1\r\nHost: h\r\n${f.added("h")}Transfer-Encoding: chunked\r\n\r\n`
  }
]

const fronts: Array<[string, () => Promise<Front>]> = [
  ["socket proxy", startSocketProxy],
  ["tunnel route", startTunnel]
]

for (const [name, start] of fronts) {
  describe(`request smuggling on the ${name}`, () => {
    let before: HandleCounts
    let front: Front

    beforeAll(async () => {
      before = activeHandles()
      front = await start()
    })

    afterAll(async () => {
      await front.close()
      await expectNoLeaks(before)
    })

    for (const c of cases) {
      it(c.name, async () => {
        front.log.clear()
        const response = await exchange(front.port, c.send)
        expect(statusOf(response), response).toBe(c.status)
        const expected = c.upstream(front)
        if (c.prefix) {
          // the client has its answer: whatever was forwarded has been written by now
          await new Promise((r) => setTimeout(r, 50))
          expect(expected.startsWith(front.log.text()), front.log.text()).toBe(true)
          return
        }
        const got = await upstreamBytes(front.log, expected.length)
        expect(got).toBe(expected)
        // and nothing arrives later (a request hidden in a body would follow the first)
        if (expected === "") {
          await new Promise((r) => setTimeout(r, 50))
          expect(front.log.text()).toBe("")
        }
      })
    }

    it("an absolute-form target whose host is the Host goes upstream in origin form", async () => {
      front.log.clear()
      const response = await exchange(front.port, "GET http://a.test/_ping HTTP/1.1\r\nHost: a.test\r\n\r\n")
      if (front.name === "socket proxy") {
        // the socket proxy matches rules on origin-form paths only
        expect(statusOf(response)).toBe(400)
        return
      }
      expect(statusOf(response)).toBe(200)
      expect(await upstreamBytes(front.log, 1)).toBe(`GET /_ping HTTP/1.1\r\nHost: a.test\r\n${front.added("a.test")}\r\n`)
    })

    it("a response with Content-Length and a Transfer-Encoding other than chunked is relayed by its coding", async () => {
      front.log.clear()
      front.setReply(() => "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nabcdefgh")
      try {
        const response = await exchange(front.port, "GET /_ping HTTP/1.1\r\nHost: h\r\n\r\n")
        const [head, body] = response.split("\r\n\r\n")
        expect(head).not.toMatch(/content-length/i)
        expect(head).toMatch(/\r\nTransfer-Encoding: gzip\r\n/)
        expect(body).toBe("abcdefgh")
      } finally {
        front.setReply(() => OK_RESPONSE)
      }
    })

    it("a response whose Connection names Content-Length is refused (502), not relayed half-framed", async () => {
      front.log.clear()
      front.setReply(() => "HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok")
      try {
        const response = await exchange(front.port, "GET /_ping HTTP/1.1\r\nHost: h\r\n\r\n")
        expect(statusOf(response), response).toBe(502)
      } finally {
        front.setReply(() => OK_RESPONSE)
      }
    })
  })
}

describe("path routing on a tunnel port", () => {
  let before: HandleCounts
  let scope: Scope.Closeable
  let port: number
  const publicLog = makeRawLog()
  const rootLog = makeRawLog()

  beforeAll(async () => {
    before = activeHandles()
    scope = Effect.runSync(Scope.make())
    port = await freePort()
    await Effect.runPromise(
      Effect.gen(function*() {
        const gw = yield* gateway()
        const control = Context.get(gw, ControlPort)
        const pub = Context.get(yield* client([control.address.port!], { label: "public" }), TunnelClient)
        const root = Context.get(yield* client([control.address.port!], { label: "root" }), TunnelClient)
        yield* serveRawTunnel(pub, { _tag: "Http", port, pathPrefix: "/public" }, publicLog, () => () => OK_RESPONSE)
        yield* serveRawTunnel(root, { _tag: "Http", port, pathPrefix: "/" }, rootLog, () => () => OK_RESPONSE)
      }).pipe(Scope.provide(scope))
    )
  })

  afterAll(async () => {
    await Effect.runPromise(Scope.close(scope, Exit.void))
    await expectNoLeaks(before)
  })

  const headTo = (target: string) => `GET ${target} HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: h\r\n\r\n`

  it("dot-segments and unreserved escapes are resolved before routing, and the resolved path is what is sent", async () => {
    const routed: Array<[string, "public" | "root", string]> = [
      ["/public/x", "public", "/public/x"],
      ["/public/../admin", "root", "/admin"],
      ["/public/%2e%2e/admin", "root", "/admin"],
      ["/public/.%2E/admin?q=1", "root", "/admin?q=1"],
      ["/%70ublic/./x", "public", "/public/x"],
      ["/admin/../public/y", "public", "/public/y"]
    ]
    for (const [target, backend, sent] of routed) {
      publicLog.clear()
      rootLog.clear()
      const response = await exchange(port, `GET ${target} HTTP/1.1\r\nHost: h\r\n\r\n`)
      expect(statusOf(response), target).toBe(200)
      const log = backend === "public" ? publicLog : rootLog
      const other = backend === "public" ? rootLog : publicLog
      expect(await upstreamBytes(log, 1), target).toBe(headTo(sent))
      expect(other.text(), target).toBe("")
    }
  })

  it("targets whose meaning depends on who decodes them are refused (400) and reach no backend", async () => {
    for (const target of ["/public/..;/admin", "/public/..%2fadmin", "/public/%2e%2e%5cadmin", "/public/..\\admin", "/public/%252e%252e/admin"]) {
      publicLog.clear()
      rootLog.clear()
      const response = await exchange(port, `GET ${target} HTTP/1.1\r\nHost: h\r\n\r\n`)
      expect(statusOf(response), target).toBe(400)
      expect(publicLog.text() + rootLog.text(), target).toBe("")
    }
  })
})
