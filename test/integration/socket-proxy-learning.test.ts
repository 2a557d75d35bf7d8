/**
 * Learning mode through the real socket proxy to a raw logging upstream: what the rules and the body
 * policy would refuse is forwarded byte for byte and recorded; unreadable bodies are still refused; the
 * learned rules and body switches, enforced, allow the same requests and refuse others.
 */
import { afterEach, assert, describe, it } from "@effect/vitest"
import { Context, Effect, Exit, Layer, Scope } from "effect"
import { learnRules } from "../../src/domain/RuleLearning.ts"
import { ConfigError, decodeSocketProxyFile, resolveConfig, type SocketProxyFile } from "../../src/domain/SocketProxyConfig.ts"
import { SocketProxy, type SocketProxyShape } from "../../src/services/front/SocketProxy.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { exchange as rawExchange, type RawUnixUpstream, startRawUnixUpstream } from "../support/rawUpstream.ts"

const statusOf = (response: string): number => Number(/^HTTP\/1\.1 (\d{3})/.exec(response)?.[1] ?? 0)

/** One `Connection: close` request; what came back until the proxy closed (bounded). */
const exchange = (port: number, bytes: string | Buffer, limitMs = 10_000): Promise<string> => rawExchange(port, bytes, limitMs, false)
const post = (path: string, body: string) =>
  `POST ${path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
const get = (path: string) => `GET ${path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n`

describe("socket proxy learning mode (raw upstream)", () => {
  const scopes: Array<Scope.Closeable> = []
  let upstream: RawUnixUpstream | undefined
  const before = activeHandles()

  afterEach(async () => {
    for (const s of scopes.splice(0)) await Effect.runPromise(Scope.close(s, Exit.void))
    await upstream?.close()
    await expectNoLeaks(before)
  })

  const start = async (file: Record<string, unknown>): Promise<{ proxy: SocketProxyShape; port: number }> => {
    const decoded = decodeSocketProxyFile({ upstream: `unix:${upstream!.socketPath}`, listen: ["127.0.0.1:0"], ...file })
    if (decoded instanceof ConfigError) throw new Error(decoded.message)
    const config = resolveConfig(decoded as SocketProxyFile)
    if (config instanceof ConfigError) throw new Error(config.message)
    const scope = Effect.runSync(Scope.make())
    scopes.push(scope)
    const ctx = await Effect.runPromise(Layer.build(SocketProxy.layer(config)).pipe(Scope.provide(scope)))
    const proxy = Context.get(ctx, SocketProxy)
    const bound = proxy.addresses[0]!
    return { proxy, port: bound._tag === "Tcp" ? bound.port : 0 }
  }

  it("forwards what would be refused, records it, still refuses unreadable bodies; the learned rules then enforce it", async () => {
    upstream = await startRawUnixUpstream()
    const { proxy, port } = await start({ name: "learner", mode: "learn", rules: ["GET /_ping"] })
    const privileged = JSON.stringify({ Image: "busybox", HostConfig: { Privileged: true, CapAdd: ["NET_ADMIN"] } })
    const seen = [
      get("/v1.41/containers/abc/json"),
      get("/v1.41/containers/def/json"),
      post("/v1.41/containers/create?name=x", privileged),
      post("/v1.41/containers/abc/start", "")
    ]
    for (const request of seen) assert.strictEqual(statusOf(await exchange(port, request)), 200, request)
    assert.isTrue(upstream.log.text().includes(privileged))
    upstream.log.clear()
    // an unreadable body is no rule's business: still 400, nothing forwarded
    assert.strictEqual(statusOf(await exchange(port, post("/v1.41/containers/create", `{"Image":1,"image":2}`))), 400)
    // so is a body no switch allows: the engine's socket
    const socketMount = JSON.stringify({ Image: "x", HostConfig: { Binds: ["/var/run/docker.sock:/s"] } })
    assert.strictEqual(statusOf(await exchange(port, post("/v1.41/containers/create", socketMount))), 403)
    assert.strictEqual(upstream.log.text(), "")
    // four refused by the rules, the body's two switches, and the calls of the two refused creates (their rule would refuse them too)
    assert.strictEqual(proxy.stats().learned, 8)
    assert.strictEqual(proxy.stats().denied, 1)

    const [learning] = proxy.learned()
    assert.strictEqual(learning!.ruleSet, "learner")
    const learned = learnRules(learning!.requests)
    assert.deepStrictEqual([...learned.rules].sort(), ["GET /containers/*/json", "POST /containers/*/start", "POST /containers/create"])
    assert.deepStrictEqual(learned.bodySwitches, ["allowPrivileged"])
    assert.deepStrictEqual(learned.bodyLists, [{ check: "allowCapabilities", values: ["NET_ADMIN"] }])

    const enforced = await start({
      name: "enforced",
      rules: ["GET /_ping", ...learned.rules],
      bodyPolicy: { allowPrivileged: true, allowCapabilities: ["NET_ADMIN"] }
    })
    for (const request of seen) assert.strictEqual(statusOf(await exchange(enforced.port, request)), 200, request)
    assert.strictEqual(statusOf(await exchange(enforced.port, post("/v1.41/containers/abc/stop", ""))), 403)
    assert.strictEqual(statusOf(await exchange(enforced.port, post("/v1.41/containers/create", JSON.stringify({ Image: "x", HostConfig: { PidMode: "host" } })))), 403)
    assert.deepStrictEqual(enforced.proxy.learned(), [])
  })
})
