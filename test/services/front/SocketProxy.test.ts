import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Context, Effect, Exit, Layer, Scope } from "effect"
import { spawnSync } from "node:child_process"
import { createHash } from "node:crypto"
import * as fs from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { ConfigError, decodeSocketProxyFile, resolveConfig, type SocketProxyConfig, type SocketProxyFile } from "../../../src/domain/SocketProxyConfig.ts"
import { type BoundAddress, SocketProxy, SocketProxyError, type SocketProxyShape } from "../../../src/services/front/SocketProxy.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../../support/leaks.ts"
import { type EngineUpstream, patternBytes, startEngineUpstream } from "../EngineUpstream.ts"

let before: HandleCounts
let engine: EngineUpstream
let scope: Scope.Closeable | undefined
let dir: string

beforeEach(async () => {
  before = activeHandles()
  engine = await startEngineUpstream()
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-sp-"))
})

afterEach(async () => {
  if (scope) await Effect.runPromise(Scope.close(scope, Exit.void))
  scope = undefined
  await engine.close()
  fs.rmSync(dir, { recursive: true, force: true })
  await expectNoLeaks(before)
})

const config = (file: Record<string, unknown>): SocketProxyConfig => {
  const decoded = decodeSocketProxyFile({ upstream: `unix:${engine.socketPath}`, listen: ["127.0.0.1:0"], ...file })
  if (decoded instanceof ConfigError) throw new Error(decoded.message)
  const c = resolveConfig(decoded as SocketProxyFile)
  if (c instanceof ConfigError) throw new Error(c.message)
  return c
}

let proxy: SocketProxyShape | undefined

/** Starts the proxy through its Layer, as an Effect app would. */
const start = async (file: Record<string, unknown>): Promise<ReadonlyArray<BoundAddress>> => {
  scope = Effect.runSync(Scope.make())
  const ctx = await Effect.runPromise(Layer.build(SocketProxy.layer(config(file))).pipe(Scope.provide(scope)))
  proxy = Context.get(ctx, SocketProxy)
  return proxy.addresses
}

const waitForSeen = async (n: number): Promise<void> => {
  for (let i = 0; i < 500 && engine.seen.length < n; i++) await new Promise((r) => setTimeout(r, 10))
  if (engine.seen.length < n) throw new Error(`upstream saw ${engine.seen.length} requests, expected ${n}`)
}

const tcpPort = (addresses: ReadonlyArray<BoundAddress>): number => {
  const a = addresses.find((x) => x._tag === "Tcp")
  if (!a || a._tag !== "Tcp") throw new Error("no TCP listener")
  return a.port
}

const get = (target: { port: number } | { socketPath: string }, p: string, method = "GET") =>
  new Promise<{ status: number; body: string; contentType: string | undefined }>((resolve, reject) => {
    const req = http.request({ ...("port" in target ? { host: "127.0.0.1", port: target.port } : { socketPath: target.socketPath }), agent: false, path: p, method }, (res) => {
      let body = ""
      res.on("data", (c) => (body += c))
      res.on("end", () => resolve({ status: res.statusCode!, body, contentType: res.headers["content-type"] }))
    })
    req.on("error", reject)
    req.end()
  })

const raw = (port: number, bytes: string): Promise<string> =>
  new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1")
    let out = ""
    s.on("data", (d) => (out += d.toString()))
    s.on("error", () => {})
    s.on("close", () => resolve(out))
    s.end(Buffer.from(bytes, "latin1"))
  })

const RULES = { name: "tests", rules: ["GET,HEAD /_ping", "GET /small", "GET /silent", "POST /containers/*/attach", { deny: "GET /secret/**" }, "GET /**"] }

describe("SocketProxy", () => {
  it("forwards allowed calls and denies the rest with Docker's error shape, never reaching upstream", async () => {
    const port = tcpPort(await start({ name: "tests", rules: ["GET /_ping", "GET /v*/small"] }))
    const ok = await get({ port }, "/v1.41/small")
    assert.strictEqual(ok.status, 200)
    assert.strictEqual(ok.body, "OK")
    assert.strictEqual(engine.seen.length, 1)
    const denied = await get({ port }, "/v1.41/containers/create", "POST")
    assert.strictEqual(denied.status, 403)
    assert.strictEqual(denied.contentType, "application/json")
    assert.match(denied.body, /^\{"message":"[^\n]*rule set \\"tests\\"[^\n]*"\}\n$/)
    assert.include(JSON.parse(denied.body).message, "POST /containers/create")
    assert.strictEqual(engine.seen.length, 1)
    assert.strictEqual((await get({ port }, "/v1.41/a%2Fb")).status, 400)
    const { limited, ...decisions } = proxy!.stats()
    assert.deepStrictEqual(decisions, { allowed: 1, denied: 1, rejected: 1, connectionLimitCloses: 0, outOfScope: 0, learned: 0 })
    assert.deepStrictEqual(Object.values(limited), [0, 0, 0, 0, 0])
  })

  it("relays a large body byte for byte to a reader that pauses, while reads are given back as written", async () => {
    const port = tcpPort(await start({ name: "tests", rules: ["GET /v*/pattern"] }))
    const total = 24 * 1024 * 1024
    const expected = createHash("sha256").update(patternBytes(total)).digest("hex")
    const got = await new Promise<{ status: number; size: number; hash: string }>((resolve, reject) => {
      const req = http.get({ host: "127.0.0.1", port, agent: false, path: `/v1.41/pattern?bytes=${total}` }, (res) => {
        const hash = createHash("sha256")
        let size = 0
        let nextPause = 1 << 20
        res.on("data", (c: Buffer) => {
          hash.update(c)
          size += c.length
          if (size >= nextPause) {
            // the proxy's writes queue up behind a reader that stops for a moment
            nextPause += 3 << 20
            res.pause()
            setTimeout(() => res.resume(), 30)
          }
        })
        res.on("end", () => resolve({ status: res.statusCode!, size, hash: hash.digest("hex") }))
        res.on("error", reject)
      })
      req.on("error", reject)
    })
    assert.deepStrictEqual(got, { status: 200, size: total, hash: expected })
  }, 30_000)

  it("replaces its rules in place for requests that follow", async () => {
    const port = tcpPort(await start({ name: "before", rules: ["GET /_ping"] }))
    // both verdicts are remembered, and neither may outlive the rules they came from
    assert.strictEqual((await get({ port }, "/small")).status, 403)
    assert.strictEqual((await get({ port }, "/_ping")).status, 200)
    const next = config({ name: "after", rules: ["GET /small"] }).ruleSet
    await Effect.runPromise(proxy!.replaceRules(next))
    assert.strictEqual(proxy!.ruleSet().name, "after")
    assert.strictEqual((await get({ port }, "/small")).status, 200)
    const denied = await get({ port }, "/_ping")
    assert.include(JSON.parse(denied.body).message, `rule set "after"`)
  })

  it("matches canonical paths: path tricks are refused or normalised, never forwarded as written", async () => {
    const port = tcpPort(await start({ rules: ["GET /containers/json", "POST /containers/*/start"] }))
    for (const target of ["/v1.41/../containers/x/exec", "/containers/x%2Fexec", "/containers/%2e%2e/x/exec", "/containers/x%5cexec", "/v1.41/containers/%zz"]) {
      const r = await get({ port }, target, "POST")
      assert.strictEqual(r.status, 400, target)
      assert.include(JSON.parse(r.body).message, "rejected request target")
    }
    const sneaky = await get({ port }, "/containers/x/start/../exec", "POST")
    assert.strictEqual(sneaky.status, 400)
    assert.strictEqual(engine.seen.length, 0)
    const absolute = await raw(port, "GET http://evil/containers/json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.match(absolute, /^HTTP\/1\.1 400/)
    assert.strictEqual(engine.seen.length, 0)
    // "//" collapses before matching, and upstream gets the path that was matched.
    const collapsed = await get({ port }, "//v1.41//containers//json")
    assert.strictEqual(collapsed.status, 404) // the engine fixture has no such route; it did reach it
    assert.strictEqual(engine.seen.at(-1)!.url, "/v1.41/containers/json")
  })

  it("refuses form-encoded bodies, which the Engine would read as query parameters", async () => {
    const port = tcpPort(await start({ rules: ["POST /containers/*/kill?signal=SIGTERM"] }))
    const out = await raw(
      port,
      "POST /containers/x/kill?signal=SIGTERM HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 14\r\n\r\nsignal=SIGKILL"
    )
    assert.match(out, /^HTTP\/1\.1 400/)
    assert.include(out, "form-encoded")
    // every spelling Go's mime.ParseMediaType reads as the form type, and every non-ASCII one
    for (
      const type of [
        "APPLICATION/X-WWW-FORM-URLENCODED",
        "\tapplication/x-www-form-urlencoded ; charset=utf-8",
        "application/x-www-form-urlencoded;",
        "\xc2\xa0application/x-www-form-urlencoded",
        "\xe3\x80\x80application/x-www-form-urlencoded",
        "appl\xc4\xb0cation/x-www-form-urlencoded",
        "application/json\xc2\x85"
      ]
    ) {
      const refused = await raw(
        port,
        `POST /containers/x/kill?signal=SIGTERM HTTP/1.1\r\nHost: d\r\nContent-Type: ${type}\r\nContent-Length: 14\r\n\r\nsignal=SIGKILL`
      )
      assert.match(refused, /^HTTP\/1\.1 400/, JSON.stringify(type))
    }
    assert.strictEqual(engine.seen.length, 0)
  })

  it("rejects malformed, oversized and smuggling requests before any rule or upstream", async () => {
    const port = tcpPort(await start(RULES))
    const cases: Array<[string, RegExp]> = [
      ["GET /_ping HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", /^HTTP\/1\.1 400/],
      ["GET /_ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n", /^HTTP\/1\.1 400/],
      ["GET /_ping HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n", /^HTTP\/1\.1 400/],
      ["GET /_ping HTP/1.1\r\nHost: x\r\n\r\n", /^HTTP\/1\.1 400/],
      ["\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", /^HTTP\/1\.1 400/],
      [`GET /_ping HTTP/1.1\r\nHost: x\r\nCookie: ${"c".repeat(17_000)}\r\n\r\n`, /^HTTP\/1\.1 431/]
    ]
    for (const [bytes, expected] of cases) {
      const out = await raw(port, bytes)
      assert.match(out, expected, JSON.stringify(bytes.slice(0, 60)))
      assert.match(out, /"message":"switchyard: /)
    }
    assert.strictEqual(engine.seen.length, 0)
    // The listener is still serving after all that.
    assert.strictEqual((await get({ port }, "/_ping")).status, 200)
  })

  it("applies deny rules before a broader allow, first match wins", async () => {
    const port = tcpPort(await start(RULES))
    const r = await get({ port }, "/secret/keys")
    assert.strictEqual(r.status, 403)
    assert.include(JSON.parse(r.body).message, `rule "deny GET /secret/**"`)
    assert.strictEqual(engine.seen.length, 0)
  })

  it("allows a hijack only when its rule allows it, and answers a denied one on the raw socket", async () => {
    const port = tcpPort(await start({ rules: ["POST /containers/allowed/attach"] }))
    const denied = await raw(port, "POST /v1.41/containers/other/attach?stream=1 HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
    assert.match(denied, /^HTTP\/1\.1 403/)
    assert.include(denied, `"message":"switchyard socket-proxy: POST /containers/other/attach`)
    assert.strictEqual(engine.seen.length, 0)
    const upgraded = await new Promise<string>((resolve) => {
      const s = net.connect(port, "127.0.0.1")
      let out = ""
      s.on("data", (d) => {
        out += d.toString("latin1")
        if (out.includes("HI")) s.destroy()
      })
      s.on("close", () => resolve(out))
      s.write("POST /v1.41/containers/allowed/attach?stream=1&stdin=1 HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
      s.write("hi")
    })
    assert.match(upgraded, /^HTTP\/1\.1 101 UPGRADED/)
  })

  it("cuts an idle stream with the per-rule idle limit", async () => {
    const port = tcpPort(await start({ rules: [{ allow: "GET /silent", idleTimeoutMs: 50 }] }))
    const done = await new Promise<boolean>((resolve) => {
      const req = http.get({ host: "127.0.0.1", port, path: "/silent", agent: false }, (res) => {
        res.resume()
        res.on("error", () => {})
        res.on("close", () => resolve(res.complete))
      })
      req.on("error", () => {})
    })
    assert.isFalse(done)
  })

  it("on shutdown, stops accepting and lets a request in flight finish", async () => {
    const port = tcpPort(await start({ rules: ["GET /slow"] }))
    const inFlight = get({ port }, "/slow?ms=300")
    await waitForSeen(1)
    const closing = Effect.runPromise(Scope.close(scope!, Exit.void))
    scope = undefined
    const r = await inFlight
    assert.strictEqual(r.status, 200)
    assert.strictEqual(r.body, "late")
    await closing
    const after = await new Promise<string>((resolve) => {
      const s = net.connect(port, "127.0.0.1")
      s.on("error", (e: Error & { code?: string }) => resolve(e.code ?? "error"))
      s.on("connect", () => {
        s.destroy()
        resolve("connected")
      })
    })
    assert.strictEqual(after, "ECONNREFUSED")
  })

  it("on shutdown, cuts a stream that outlives the drain time", async () => {
    const port = tcpPort(await start({ rules: ["GET /forever"], limits: { drainTimeoutMs: 100 } }))
    const ended = new Promise<boolean>((resolve) => {
      http.get({ host: "127.0.0.1", port, path: "/forever", agent: false }, (res) => {
        res.resume()
        res.on("error", () => {})
        res.on("close", () => resolve(res.complete))
      }).on("error", () => {})
    })
    await waitForSeen(1)
    await Effect.runPromise(Scope.close(scope!, Exit.void))
    scope = undefined
    assert.isFalse(await ended)
  })

  it("with maxConnections held by connections that talk, closes a newcomer on arrival and keeps serving the others", async () => {
    const port = tcpPort(await start({ rules: ["GET /_ping"], limits: { maxConnections: 2 } }))
    const held = await Promise.all([0, 1].map(() =>
      new Promise<net.Socket>((resolve) => {
        const s = net.connect(port, "127.0.0.1", () => resolve(s))
      })
    ))
    // each has begun a request: none of them is silent
    for (const s of held) s.write("GET /_ping HTTP/1.1\r\n")
    await new Promise((r) => setTimeout(r, 300))
    const third = await new Promise<string>((resolve) => {
      const s = net.connect(port, "127.0.0.1")
      let got = ""
      s.on("data", (d) => (got += d.toString()))
      s.on("error", () => {})
      s.on("close", () => resolve(got))
      s.write("GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n")
    })
    assert.strictEqual(third, "")
    const first = await new Promise<string>((resolve) => {
      let got = ""
      held[0]!.on("data", (d) => {
        got += d.toString()
        if (got.includes("OK")) resolve(got)
      })
      held[0]!.write("Host: x\r\n\r\n")
    })
    assert.match(first, /^HTTP\/1\.1 200/)
    assert.strictEqual(proxy!.stats().connectionLimitCloses, 1)
    for (const s of held) s.destroy()
  })

  it("makes room for a newcomer by closing the oldest silent connection, and closes silent ones after silentTimeoutMs", async () => {
    const port = tcpPort(await start({ rules: ["GET /_ping"], limits: { maxConnections: 2, maxConnectionsPerAddress: 2, silentTimeoutMs: 300 } }))
    const open = () =>
      new Promise<{ socket: net.Socket; closed: Promise<void> }>((resolve) => {
        const socket = net.connect(port, "127.0.0.1", () => resolve({ socket, closed: new Promise((r) => socket.once("close", () => r())) }))
        socket.on("error", () => {})
      })
    const [oldest, younger] = [await open(), await open()]
    const answered = await raw(port, "GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.match(answered, /^HTTP\/1\.1 200/)
    await oldest.closed
    // the other silent one is closed by the timeout, within a bound
    const timedOut = await Promise.race([younger.closed.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 5_000))])
    assert.isTrue(timedOut)
    assert.isAtLeast(proxy!.stats().connectionLimitCloses, 2)
    younger.socket.destroy()
  })

  it("refuses TCP clients outside allowFrom with a 403", async () => {
    const port = tcpPort(await start({ rules: ["GET /**"], allowFrom: ["10.0.0.0/8"] }))
    const r = await get({ port }, "/_ping")
    assert.strictEqual(r.status, 403)
    assert.include(JSON.parse(r.body).message, "not in allowFrom")
    assert.strictEqual(engine.seen.length, 0)
  })

  it("listens on TCP and a Unix socket at once, applies the mode, replaces a stale socket file, removes it at close", async () => {
    const sock = path.join(dir, "proxy.sock")
    // A stale socket file: bound once, then closed without unlinking.
    spawnSync(process.execPath, ["-e", "require('net').createServer().listen(process.argv[1], () => process.kill(process.pid, 'SIGKILL'))", sock])
    assert.isTrue(fs.existsSync(sock))
    const addresses = await start({ listen: ["127.0.0.1:0", { address: `unix:${sock}`, mode: "0600" }], rules: ["GET /_ping"] })
    assert.strictEqual(addresses.length, 2)
    assert.strictEqual(fs.statSync(sock).mode & 0o777, 0o600)
    assert.strictEqual((await get({ socketPath: sock }, "/_ping")).status, 200)
    assert.strictEqual((await get({ port: tcpPort(addresses) }, "/_ping")).status, 200)
    await Effect.runPromise(Scope.close(scope!, Exit.void))
    scope = undefined
    assert.isFalse(fs.existsSync(sock))
  })

  it("refuses to take over a Unix socket another process is serving", async () => {
    const sock = path.join(dir, "busy.sock")
    const busy = net.createServer((s) => s.destroy())
    await new Promise<void>((resolve) => busy.listen(sock, resolve))
    try {
      scope = Effect.runSync(Scope.make())
      const exit = await Effect.runPromiseExit(
        Layer.build(SocketProxy.layer(config({ listen: [`unix:${sock}`], rules: ["GET /_ping"] }))).pipe(Scope.provide(scope))
      )
      assert.isTrue(Exit.isFailure(exit))
      const error = Exit.isFailure(exit) ? exit.cause.reasons.find((r) => r._tag === "Fail") : undefined
      assert.instanceOf((error as { error: unknown } | undefined)?.error, SocketProxyError)
      assert.strictEqual(((error as { error: SocketProxyError }).error).reason, "AddressInUse")
    } finally {
      await new Promise<void>((resolve) => busy.close(() => resolve()))
    }
  })
})
