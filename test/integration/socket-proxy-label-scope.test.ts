/**
 * The label scope through the real socket proxy to a raw logging upstream that answers the Engine's
 * inspect calls from a table: what reaches the upstream, byte for byte. Covers what Podman cannot show
 * here: exec instances of running containers, the exact labelled bytes of random create bodies, the
 * pinned paths and rewritten filters, lookups that fail.
 */
import { afterAll, assert, beforeAll, beforeEach, describe, it } from "@effect/vitest"
import { Context, Effect, Exit, Layer, Scope } from "effect"
import { checkBody, DEFAULT_BODY_POLICY } from "../../src/domain/BodyPolicy.ts"
import { ConfigError, decodeSocketProxyFile, resolveConfig, type SocketProxyFile } from "../../src/domain/SocketProxyConfig.ts"
import { SocketProxy, type SocketProxyShape } from "../../src/services/front/SocketProxy.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { exchange as rawExchange, OK_RESPONSE, type RawUnixUpstream, startRawUnixUpstream } from "../support/rawUpstream.ts"

/**
 * Sends `bytes` (a `Connection: close` request) without half-closing, as Docker clients do, and returns
 * what came back until the proxy closed (bounded). A client that half-closes while its container is
 * looked up counts as gone.
 */
const exchange = (port: number, bytes: string | Buffer, limitMs = 10_000): Promise<string> => rawExchange(port, bytes, limitMs, false)

const statusOf = (response: string): number => Number(/^HTTP\/1\.1 (\d{3})/.exec(response)?.[1] ?? 0)
const messageOf = (response: string): string => (JSON.parse(response.slice(response.indexOf("\r\n\r\n") + 4)) as { message: string }).message
const post = (path: string, body: Buffer | string): Buffer =>
  Buffer.concat([
    Buffer.from(`POST ${path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n`, "latin1"),
    Buffer.isBuffer(body) ? body : Buffer.from(body)
  ])
const request = (method: string, path: string): string => `${method} ${path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n`

const id = (c: string) => c.repeat(64)
/** The engine's containers, by every name the inspect call resolves. */
const CONTAINERS: Record<string, { readonly Id: string; readonly labels: Record<string, string> }> = {
  mine: { Id: id("a"), labels: { "sy.scope": "a" } },
  [id("a")]: { Id: id("a"), labels: { "sy.scope": "a" } },
  aaaa: { Id: id("a"), labels: { "sy.scope": "a" } },
  theirs: { Id: id("b"), labels: { "sy.scope": "b" } },
  [id("b")]: { Id: id("b"), labels: { "sy.scope": "b" } },
  bare: { Id: id("c"), labels: {} },
  [id("c")]: { Id: id("c"), labels: {} }
}
const EXECS: Record<string, string> = { [id("e")]: id("a"), [id("f")]: id("b") }

const json = (status: number, body: unknown): string => {
  const text = JSON.stringify(body)
  return `HTTP/1.1 ${status} X\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(text)}\r\n\r\n${text}`
}

/** Answers `GET /containers/{x}/json` and `/exec/{x}/json` from the tables, 500 for `broken`, else 200 ok. */
const engineReply = (head: string): string => {
  const line = head.slice(0, head.indexOf("\r\n"))
  const c = /^GET \/containers\/(.+)\/json /.exec(line)
  if (c !== null) {
    const name = decodeURIComponent(c[1]!)
    if (name === "broken") return json(500, { message: "boom" })
    const found = CONTAINERS[name]
    return found === undefined ? json(404, { message: `No such container: ${name}` }) : json(200, { Id: found.Id, Config: { Labels: found.labels } })
  }
  const e = /^GET \/exec\/(.+)\/json /.exec(line)
  if (e !== null) {
    const container = EXECS[e[1]!]
    return container === undefined ? json(404, { message: "no such exec" }) : json(200, { ID: e[1], ContainerID: container })
  }
  return OK_RESPONSE
}

/** The request heads that reached the upstream, lookups excluded (those are GET .../json without a version). */
const forwardedHeads = (upstream: RawUnixUpstream): Array<string> =>
  upstream.log.text().split(/(?=(?:GET|POST|DELETE|HEAD|PUT) \/)/).map((r) => r.slice(0, r.indexOf("\r\n"))).filter((l) => l.includes(" /v1.41/"))

describe("socket proxy label scope (raw upstream)", () => {
  let upstream: RawUnixUpstream
  let scope: Scope.Closeable
  let port: number
  let proxy: SocketProxyShape
  let before: HandleCounts

  beforeAll(async () => {
    before = activeHandles()
    upstream = await startRawUnixUpstream()
    upstream.setReply(engineReply)
    const decoded = decodeSocketProxyFile({
      upstream: `unix:${upstream.socketPath}`,
      listen: ["127.0.0.1:0"],
      name: "scope-tests",
      container_label: "sy.scope=a",
      rules: ["* /**"],
      bodyPolicy: { maxBodyBytes: 4096, allowBindSources: ["/srv/data"] }
    })
    if (decoded instanceof ConfigError) throw new Error(decoded.message)
    const config = resolveConfig(decoded as SocketProxyFile)
    if (config instanceof ConfigError) throw new Error(config.message)
    scope = Effect.runSync(Scope.make())
    const ctx = await Effect.runPromise(Layer.build(SocketProxy.layer(config)).pipe(Scope.provide(scope)))
    proxy = Context.get(ctx, SocketProxy)
    const bound = proxy.addresses[0]!
    port = bound._tag === "Tcp" ? bound.port : 0
  })

  afterAll(async () => {
    if (scope) await Effect.runPromise(Scope.close(scope, Exit.void))
    await upstream?.close()
    if (before) await expectNoLeaks(before)
  })

  beforeEach(() => upstream.log.clear())

  it("calls on a container in scope are forwarded with its full id, whatever name or prefix the client used", async () => {
    for (const name of ["mine", "aaaa", id("a")]) {
      upstream.log.clear()
      const r = await exchange(port, request("POST", `/v1.41/containers/${name}/stop?t=1`))
      assert.strictEqual(statusOf(r), 200, r)
      assert.deepStrictEqual(forwardedHeads(upstream), [`POST /v1.41/containers/${id("a")}/stop?t=1 HTTP/1.1`])
    }
    upstream.log.clear()
    assert.strictEqual(statusOf(await exchange(port, request("DELETE", "/v1.41/containers/mine?force=1"))), 200)
    assert.strictEqual(statusOf(await exchange(port, request("GET", "/v1.41/containers/mine/attach/ws"))), 200)
    assert.deepStrictEqual(forwardedHeads(upstream), [
      `DELETE /v1.41/containers/${id("a")}?force=1 HTTP/1.1`,
      `GET /v1.41/containers/${id("a")}/attach/ws HTTP/1.1`
    ])
  })

  it("containers outside the scope, missing ones and exec instances of outside containers answer 404; nothing is forwarded", async () => {
    const cases: ReadonlyArray<readonly [string, string, string]> = [
      ["GET", "/v1.41/containers/theirs/json", "No such container: theirs"],
      ["POST", `/v1.41/containers/${id("b")}/kill`, `No such container: ${id("b")}`],
      ["DELETE", "/v1.41/containers/bare", "No such container: bare"],
      ["GET", "/v1.41/containers/nowhere/logs", "No such container: nowhere"],
      ["POST", `/v1.41/exec/${id("f")}/start`, `No such exec instance: ${id("f")}`],
      ["GET", `/v1.41/exec/${id("f")}/json`, `No such exec instance: ${id("f")}`],
      ["POST", `/v1.41/exec/${id("9")}/resize?h=1&w=1`, `No such exec instance: ${id("9")}`]
    ]
    for (const [method, path, message] of cases) {
      const r = await exchange(port, request(method, path))
      assert.strictEqual(statusOf(r), 404, `${method} ${path}: ${r}`)
      assert.strictEqual(messageOf(r), message)
    }
    assert.deepStrictEqual(forwardedHeads(upstream), [])
    // an exec on a container in scope goes on, pinned to its full id
    assert.strictEqual(statusOf(await exchange(port, post(`/v1.41/exec/${id("e")}/start`, `{"Detach":true}`))), 200)
    assert.deepStrictEqual(forwardedHeads(upstream), [`POST /v1.41/exec/${id("e")}/start HTTP/1.1`])
    assert.isAbove(proxy.stats().outOfScope, 4)
  })

  it("exec create is resolved, then its body judged by the body policy", async () => {
    const refused = await exchange(port, post("/v1.41/containers/mine/exec", `{"Cmd":["sh"],"Privileged":true}`))
    assert.strictEqual(statusOf(refused), 403)
    assert.include(messageOf(refused), "Privileged")
    const outside = await exchange(port, post("/v1.41/containers/theirs/exec", `{"Cmd":["sh"]}`))
    assert.strictEqual(statusOf(outside), 404)
    assert.deepStrictEqual(forwardedHeads(upstream), [])
    const body = `{"Cmd":["sh"],"AttachStdout":true}`
    const allowed = await exchange(port, post("/v1.41/containers/mine/exec", body))
    assert.strictEqual(statusOf(allowed), 200)
    assert.deepStrictEqual(forwardedHeads(upstream), [`POST /v1.41/containers/${id("a")}/exec HTTP/1.1`])
    assert.isTrue(upstream.log.text().endsWith(body))
  })

  it("lists and events get the label filter; other parameters are kept; ambiguous queries are refused", async () => {
    const filters = encodeURIComponent(JSON.stringify({ status: ["exited"], label: { "x=y": true } }))
    assert.strictEqual(statusOf(await exchange(port, request("GET", `/v1.41/containers/json?all=1&filters=${filters}`))), 200)
    assert.strictEqual(statusOf(await exchange(port, request("GET", "/v1.41/events?since=1"))), 200)
    assert.strictEqual(statusOf(await exchange(port, request("GET", "/v1.41/networks"))), 200)
    const heads = forwardedHeads(upstream)
    const query = (head: string) => new URLSearchParams(head.split(" ")[1]!.split("?")[1])
    assert.strictEqual(query(heads[0]!).get("all"), "1")
    assert.deepStrictEqual(JSON.parse(query(heads[0]!).get("filters")!), { status: ["exited"], label: ["x=y", "sy.scope=a"] })
    assert.strictEqual(query(heads[1]!).get("since"), "1")
    assert.deepStrictEqual(JSON.parse(query(heads[1]!).get("filters")!), { label: ["sy.scope=a"] })
    assert.deepStrictEqual(JSON.parse(query(heads[2]!).get("filters")!), { label: ["sy.scope=a"] })
    upstream.log.clear()
    for (const q of ["filters={}&filters={}", "filters=%7B%22label%22%3A1%7D", "a=1;filters={}", "filters=%ZZ", "filters=%7B%22label%22%3A%5B%5D%2C%22LABEL%22%3A%5B%5D%7D"]) {
      const r = await exchange(port, request("GET", `/v1.41/containers/json?${q}`))
      assert.strictEqual(statusOf(r), 400, `${q}: ${r}`)
    }
    assert.deepStrictEqual(forwardedHeads(upstream), [])
  })

  it("calls that name containers where the scope cannot see them are refused with 403", async () => {
    for (const [method, path] of [["POST", "/v1.41/commit?container=theirs"], ["POST", "/v1.41/networks/n1/connect"], ["POST", "/v4.0/libpod/pods/create"], ["GET", "/v1.41/containers/"]]) {
      const r = await exchange(port, method === "POST" ? post(path!, "{}") : request(method!, path!))
      assert.strictEqual(statusOf(r), 403, `${method} ${path}: ${r}`)
      assert.include(messageOf(r), "label scope sy.scope=a")
    }
    assert.deepStrictEqual(forwardedHeads(upstream), [])
  })

  it("a lookup the engine fails answers 502 and forwards nothing", async () => {
    const r = await exchange(port, request("POST", "/v1.41/containers/broken/start"))
    assert.strictEqual(statusOf(r), 502)
    assert.include(messageOf(r), "could not look up \"broken\"")
    assert.deepStrictEqual(forwardedHeads(upstream), [])
  })

  it("random create bodies: forwarded exactly when the policy allows every field, as the received bytes with the label inserted", async () => {
    const policy = { ...DEFAULT_BODY_POLICY, maxBodyBytes: 4096, allowBindSources: ["/srv/data"] }
    const fields: ReadonlyArray<readonly [string, unknown]> = [
      ["Privileged", true],
      ["Privileged", false],
      ["NetworkMode", "host"],
      ["CapAdd", ["NET_ADMIN"]],
      ["Binds", ["/srv/data/a:/a"]],
      ["Binds", ["/etc:/etc"]],
      ["Memory", 1048576]
    ]
    const labelSets: ReadonlyArray<unknown> = [undefined, null, {}, { other: "1" }, { "sy.scope": "a" }, { "sy.scope": "b", z: "" }, "not-a-map"]
    let s = 7
    const next = (n: number) => ((s = (s * 1103515245 + 12345) % 2147483648) >>> 12) % n
    let forwarded = 0
    for (let round = 0; round < 60; round++) {
      const hostConfig: Record<string, unknown> = {}
      for (let k = next(3); k > 0; k--) {
        const [name, value] = fields[next(fields.length)]!
        hostConfig[name] = value
      }
      const doc: Record<string, unknown> = next(5) === 0 ? {} : { Image: "busybox", HostConfig: hostConfig }
      const labels = labelSets[next(labelSets.length)]
      if (labels !== undefined) doc[next(2) === 0 ? "Labels" : "labels"] = labels
      const body = Buffer.from(JSON.stringify(doc, null, next(2) * 2))
      const allowedByPolicy = checkBody(policy, "ContainerCreate", body)._tag === "Allow"
      const labelOk = labels === undefined || labels === null || (typeof labels === "object" && (labels as Record<string, string>)["sy.scope"] !== "b")
      upstream.log.clear()
      const response = await exchange(port, post("/v1.41/containers/create?name=x", body))
      if (!allowedByPolicy || !labelOk) {
        assert.include([400, 403], statusOf(response), `${body}: ${response}`)
        assert.deepStrictEqual(forwardedHeads(upstream), [], `${body}`)
        continue
      }
      forwarded++
      assert.strictEqual(statusOf(response), 200, `${body}: ${response}`)
      const text = upstream.log.text()
      const sent = Buffer.from(text.slice(text.indexOf("\r\n\r\n") + 4), "latin1")
      assert.strictEqual(Number(/\r\ncontent-length: (\d+)\r\n/i.exec(text)![1]), sent.length)
      // the document is the client's with the label set
      const expected = { ...doc } as Record<string, unknown>
      const key = Object.keys(doc).find((k) => k.toLowerCase() === "labels") ?? "Labels"
      expected[key] = { ...(doc[key] as object ?? {}), "sy.scope": "a" }
      const got = JSON.parse(sent.toString("utf8")) as Record<string, unknown>
      assert.deepStrictEqual(got, expected, `${body} -> ${sent}`)
      // and the bytes are the client's with one run inserted (or none, when the label was there)
      let prefix = 0
      while (prefix < body.length && body[prefix] === sent[prefix]) prefix++
      let suffix = 0
      while (suffix < body.length - prefix && body[body.length - 1 - suffix] === sent[sent.length - 1 - suffix]) suffix++
      const replaced = body.subarray(prefix, body.length - suffix).toString()
      assert.include(["", "null"], replaced, `${body} -> ${sent}`)
    }
    assert.isAbove(forwarded, 5)
    assert.isBelow(forwarded, 55)
  })
})
