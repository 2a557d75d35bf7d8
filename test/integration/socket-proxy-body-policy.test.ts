/**
 * The body policy through the real socket proxy to a raw logging upstream on a Unix socket: a refused
 * create body never reaches the upstream (not even its head), an allowed one arrives byte for byte.
 */
import { afterAll, assert, beforeAll, beforeEach, describe, it } from "@effect/vitest"
import { Context, Effect, Exit, Layer, Scope } from "effect"
import * as net from "node:net"
import { checkBody, DEFAULT_BODY_POLICY } from "../../src/domain/BodyPolicy.ts"
import { ConfigError, decodeSocketProxyFile, resolveConfig, type SocketProxyFile } from "../../src/domain/SocketProxyConfig.ts"
import { SocketProxy } from "../../src/services/front/SocketProxy.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { exchange, type RawUnixUpstream, startRawUnixUpstream } from "../support/rawUpstream.ts"

const statusOf = (response: string): number => Number(/^HTTP\/1\.1 (\d{3})/.exec(response)?.[1] ?? 0)
const messageOf = (response: string): string => {
  const body = response.slice(response.indexOf("\r\n\r\n") + 4)
  return (JSON.parse(body) as { message: string }).message
}
const post = (path: string, body: Buffer | string, extra = ""): Buffer =>
  Buffer.concat([
    Buffer.from(`POST ${path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n${extra}Content-Length: ${Buffer.byteLength(body)}\r\n\r\n`, "latin1"),
    Buffer.isBuffer(body) ? body : Buffer.from(body)
  ])

/** Waits (bounded) until the upstream has logged at least `n` bytes. */
const upstreamBytes = async (upstream: RawUnixUpstream, n: number): Promise<Buffer> => {
  const all = () => Buffer.concat(upstream.log.connections.flat())
  for (let i = 0; i < 500 && all().length < n; i++) await new Promise((r) => setTimeout(r, 10))
  return all()
}

describe("socket proxy body policy (raw upstream)", () => {
  let upstream: RawUnixUpstream
  let scope: Scope.Closeable
  let port: number
  let before: HandleCounts

  beforeAll(async () => {
    before = activeHandles()
    upstream = await startRawUnixUpstream()
    const decoded = decodeSocketProxyFile({
      upstream: `unix:${upstream.socketPath}`,
      listen: ["127.0.0.1:0"],
      name: "body-tests",
      rules: ["GET /_ping", "POST /containers/create", "POST /containers/*/exec", "POST /containers/*/update", "POST /services/create", "POST /libpod/containers/create"],
      bodyPolicy: { maxBodyBytes: 4096, allowBindSources: ["/srv/data"] }
    })
    if (decoded instanceof ConfigError) throw new Error(decoded.message)
    const config = resolveConfig(decoded as SocketProxyFile)
    if (config instanceof ConfigError) throw new Error(config.message)
    scope = Effect.runSync(Scope.make())
    const ctx = await Effect.runPromise(Layer.build(SocketProxy.layer(config)).pipe(Scope.provide(scope)))
    const bound = Context.get(ctx, SocketProxy).addresses[0]!
    port = bound._tag === "Tcp" ? bound.port : 0
  })

  afterAll(async () => {
    if (scope) await Effect.runPromise(Scope.close(scope, Exit.void))
    await upstream?.close()
    if (before) await expectNoLeaks(before)
  })

  beforeEach(() => upstream.log.clear())

  it("refused bodies get 403 naming field and rule set; nothing reaches the upstream", async () => {
    const cases: ReadonlyArray<readonly [string, string, string]> = [
      ["/v1.41/containers/create", `{"Image":"busybox","HostConfig":{"Privileged":true}}`, "HostConfig.Privileged"],
      ["/containers/create", `{"Image":"busybox","hostconfig":{"privileged":true}}`, "HostConfig.Privileged"],
      ["/v1.41/containers/create", `{"Image":"busybox","HostConfig":{"Binds":["/:/host"]}}`, "HostConfig.Binds[0]"],
      ["/v1.41/containers/create", `{"Image":"busybox","HostConfig":{"Binds":["/srv/data/../../etc:/e"]}}`, "HostConfig.Binds[0]"],
      ["/v1.41/containers/create", `{"Image":"busybox","HostConfig":{"CapAdd":["SYS_ADMIN"]}}`, "HostConfig.CapAdd"],
      ["/v1.41/containers/create", `{"Image":"busybox","HostConfig":{"PidMode":"host"}}`, "HostConfig.PidMode"],
      ["/v1.41/containers/create", `{"Image":"busybox","HostConfig":{"Devices":[{"PathOnHost":"/dev/null"}]}}`, "HostConfig.Devices"],
      ["/v1.41/containers/web/exec", `{"Cmd":["sh"],"Privileged":true}`, "Privileged"],
      ["/v1.41/containers/web/update", `{"Devices":[{"PathOnHost":"/dev/sda"}]}`, "Devices"],
      ["/v1.41/services/create", `{"TaskTemplate":{"ContainerSpec":{"Image":"x","CapabilityAdd":["SYS_ADMIN"]}}}`, "TaskTemplate.ContainerSpec.CapabilityAdd"]
    ]
    for (const [path, body, field] of cases) {
      const response = await exchange(port, post(path, body))
      assert.strictEqual(statusOf(response), 403, `${body}: ${response}`)
      assert.include(messageOf(response), `rule set "body-tests": ${field}`, body)
    }
    // Podman's native create shape is not read, so it is refused
    const libpod = await exchange(port, post("/v4.0/libpod/containers/create", `{"image":"busybox"}`))
    assert.strictEqual(statusOf(libpod), 403)
    await new Promise((r) => setTimeout(r, 50))
    assert.strictEqual(Buffer.concat(upstream.log.connections.flat()).length, 0)
  })

  it("unreadable bodies are 400, chunked 411, oversized 413; nothing reaches the upstream", async () => {
    for (
      const body of [
        `{"Image":"busybox","HostConfig":{"Privileged":false,"privileged":true}}`,
        `{"Image":"busybox","Image":"busybox"}`,
        `{"Image":"busybox"`,
        `["busybox"]`,
        ``,
        `{"Image":"busybox"} {"HostConfig":{"Privileged":true}}`
      ]
    ) {
      const response = await exchange(port, post("/v1.41/containers/create", body))
      assert.strictEqual(statusOf(response), 400, `${body}: ${response}`)
      assert.include(messageOf(response), "body policy", body)
    }
    const chunked = await exchange(
      port,
      "POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nTransfer-Encoding: chunked\r\n\r\n11\r\n{\"Image\":\"busybox\"}\r\n0\r\n\r\n"
    )
    assert.strictEqual(statusOf(chunked), 411, chunked)
    const large = await exchange(port, post("/v1.41/containers/create", JSON.stringify({ Image: "busybox", Env: ["X=" + "x".repeat(5000)] })))
    assert.strictEqual(statusOf(large), 413, large)
    assert.include(messageOf(large), "larger than 4096 bytes")
    await new Promise((r) => setTimeout(r, 50))
    assert.strictEqual(Buffer.concat(upstream.log.connections.flat()).length, 0)
  })

  it("an allowed body arrives byte for byte, after a head that came in pieces, with pipelined requests after it", async () => {
    // odd spacing, escapes and non-ASCII: the bytes received are the bytes forwarded
    const body = Buffer.from(`{ "Image" : "busybox",\n "Labels": {"k\\u00e9": "vé"}, "HostConfig": {"Binds": ["/srv/data/x:/x:ro"], "Privileged": false}}`)
    const request = post("/v1.41/containers/create", body)
    const socket = net.connect(port, "127.0.0.1")
    let received = ""
    socket.on("data", (d: Buffer) => (received += d.toString("latin1")))
    await new Promise((r) => socket.once("connect", r))
    // head and body in pieces, then a pipelined ping
    for (let i = 0; i < request.length; i += 17) {
      socket.write(request.subarray(i, i + 17))
      await new Promise((r) => setTimeout(r, 2))
    }
    socket.write("GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
    for (let i = 0; i < 200 && (received.match(/HTTP\/1\.1 200/g) ?? []).length < 2; i++) await new Promise((r) => setTimeout(r, 10))
    socket.destroy()
    assert.strictEqual((received.match(/HTTP\/1\.1 200/g) ?? []).length, 2, received)
    const log = await upstreamBytes(upstream, body.length)
    const text = log.toString("latin1")
    const bodyAt = log.indexOf(body)
    assert.isAbove(bodyAt, 0, text)
    assert.include(log.subarray(0, bodyAt).toString("latin1"), `Content-Length: ${body.length}\r\n`)
    assert.match(text.slice(bodyAt + body.length), /^GET \/_ping HTTP\/1\.1\r\n/)
  })

  it("Expect: 100-continue is answered once, and the upstream gets the body without Expect", async () => {
    const body = `{"Image":"busybox","HostConfig":{}}`
    const socket = net.connect(port, "127.0.0.1")
    let received = ""
    socket.on("data", (d: Buffer) => (received += d.toString("latin1")))
    await new Promise((r) => socket.once("connect", r))
    socket.write(`POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nExpect: 100-continue\r\nContent-Length: ${body.length}\r\n\r\n`)
    for (let i = 0; i < 200 && !received.includes("100 Continue"); i++) await new Promise((r) => setTimeout(r, 10))
    socket.write(body)
    for (let i = 0; i < 200 && !received.includes("200 OK"); i++) await new Promise((r) => setTimeout(r, 10))
    socket.destroy()
    assert.strictEqual((received.match(/100 Continue/g) ?? []).length, 1, received)
    assert.include(received, "HTTP/1.1 200 OK")
    const log = (await upstreamBytes(upstream, body.length)).toString("latin1")
    assert.notMatch(log, /expect/i)
    assert.isTrue(log.endsWith(body), log)
  })

  it("random create bodies: forwarded exactly when the policy allows every field, and byte for byte", async () => {
    const policy = { ...DEFAULT_BODY_POLICY, maxBodyBytes: 4096, allowBindSources: ["/srv/data"] }
    const fields: ReadonlyArray<readonly [string, unknown]> = [
      ["Privileged", true],
      ["Privileged", false],
      ["NetworkMode", "host"],
      ["NetworkMode", "bridge"],
      ["CapAdd", ["NET_ADMIN"]],
      ["CapDrop", ["ALL"]],
      ["Binds", ["/srv/data/a:/a"]],
      ["Binds", ["/etc:/etc"]],
      ["Mounts", [{ Type: "tmpfs", Target: "/t" }]],
      ["Sysctls", { "net.ipv4.ip_forward": "1" }],
      ["SecurityOpt", ["no-new-privileges"]],
      ["SecurityOpt", ["apparmor=unconfined"]],
      ["Memory", 1048576]
    ]
    let s = 42
    const next = (n: number) => ((s = (s * 1103515245 + 12345) % 2147483648) >>> 12) % n
    let forwarded = 0
    for (let round = 0; round < 60; round++) {
      const hostConfig: Record<string, unknown> = {}
      for (let k = next(4); k > 0; k--) {
        const [name, value] = fields[next(fields.length)]!
        const spelled = next(3) === 0 ? name.toLowerCase() : name
        // one spelling per field: the body stays readable
        for (const key of Object.keys(hostConfig)) if (key.toLowerCase() === name.toLowerCase()) delete hostConfig[key]
        hostConfig[spelled] = value
      }
      const body = Buffer.from(JSON.stringify({ Image: "busybox", Cmd: ["true"], HostConfig: hostConfig }, null, next(2) * 2))
      const expected = checkBody(policy, "ContainerCreate", body)._tag === "Allow"
      upstream.log.clear()
      const response = await exchange(port, post("/v1.41/containers/create", body, "Connection: close\r\n"))
      if (expected) {
        forwarded++
        assert.strictEqual(statusOf(response), 200, `${body}: ${response}`)
        const log = await upstreamBytes(upstream, body.length)
        assert.isTrue(log.subarray(log.length - body.length).equals(body), `${body}`)
      } else {
        assert.strictEqual(statusOf(response), 403, `${body}: ${response}`)
        await new Promise((r) => setTimeout(r, 5))
        assert.strictEqual(Buffer.concat(upstream.log.connections.flat()).length, 0, `${body}`)
      }
    }
    assert.isAbove(forwarded, 5)
    assert.isBelow(forwarded, 55)
  })

  it("on shutdown, a request whose body is still being read is answered 503 and closed, and nothing of it reaches the upstream", async () => {
    const decoded = decodeSocketProxyFile({ upstream: `unix:${upstream.socketPath}`, listen: ["127.0.0.1:0"], rules: ["POST /containers/create"] })
    if (decoded instanceof ConfigError) throw new Error(decoded.message)
    const config = resolveConfig(decoded as SocketProxyFile)
    if (config instanceof ConfigError) throw new Error(config.message)
    const own = Effect.runSync(Scope.make())
    const ctx = await Effect.runPromise(Layer.build(SocketProxy.layer(config)).pipe(Scope.provide(own)))
    const bound = Context.get(ctx, SocketProxy).addresses[0]!
    const socket = net.connect(bound._tag === "Tcp" ? bound.port : 0, "127.0.0.1")
    socket.on("error", () => {})
    const answer: Array<Buffer> = []
    socket.on("data", (chunk: Buffer) => answer.push(chunk))
    const closed = new Promise((r) => socket.once("close", r))
    await new Promise((r) => socket.once("connect", r))
    socket.write(`POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nContent-Length: 100\r\n\r\n{"Image":`)
    await new Promise((r) => setTimeout(r, 100))
    const started = performance.now()
    await Effect.runPromise(Scope.close(own, Exit.void))
    await closed
    assert.match(Buffer.concat(answer).toString("latin1"), /^HTTP\/1\.1 503 /)
    assert.isBelow(performance.now() - started, 2_000)
    assert.strictEqual(Buffer.concat(upstream.log.connections.flat()).length, 0)
  })
})
