/**
 * The real docker CLI through `SocketProxy` to the Docker Engine API served by Podman.
 */
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { Context, Effect, Exit, Layer, Scope } from "effect"
import { execFile, spawn } from "node:child_process"
import * as http from "node:http"
import { promisify } from "node:util"
import { ConfigError, resolveConfig } from "../../src/domain/SocketProxyConfig.ts"
import { SocketProxy } from "../../src/services/front/SocketProxy.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { assertPeer, dockerCli, peerMissing, type PeerProbe, type PodmanService, startPodman } from "../support/peers.ts"

const run = promisify(execFile)

const docker = dockerCli()
// Podman is started only when the docker CLI is there to drive it.
const podman: PeerProbe<PodmanService> = docker.value === undefined ? { value: undefined, reason: docker.reason } : startPodman()

describe.skipIf(peerMissing(podman) || peerMissing(docker))("docker CLI through the socket proxy (Podman)", () => {
  let service: PodmanService
  let scope: Scope.Closeable
  let port: number
  let before: HandleCounts
  const env = () => ({ ...process.env, DOCKER_HOST: `tcp://127.0.0.1:${port}`, DOCKER_CONFIG: service.dir })
  const direct = () => ({ ...process.env, DOCKER_HOST: `unix://${service.socketPath}`, DOCKER_CONFIG: service.dir })
  const cli = (args: ReadonlyArray<string>) =>
    run("docker", args, { env: env(), timeout: 30_000 }).then(
      (r) => ({ ok: true as const, stdout: r.stdout, stderr: r.stderr }),
      (e: { stdout?: string; stderr?: string }) => ({ ok: false as const, stdout: e.stdout ?? "", stderr: e.stderr ?? "" })
    )

  beforeAll(async () => {
    assertPeer(docker)
    service = assertPeer(podman)
    before = activeHandles()
    const config = resolveConfig({}, {
      upstream: `unix:${service.socketPath}`,
      listen: ["127.0.0.1:0"],
      name: "podman-tests",
      deny: ["DELETE /containers/*"],
      allow: ["POST /containers/create"],
      presets: ["read-only"]
    })
    if (config instanceof ConfigError) throw new Error(config.message)
    scope = Effect.runSync(Scope.make())
    const ctx = await Effect.runPromise(Layer.build(SocketProxy.layer(config)).pipe(Scope.provide(scope)))
    const bound = Context.get(ctx, SocketProxy).addresses[0]!
    port = bound._tag === "Tcp" ? bound.port : 0
  })

  afterAll(async () => {
    if (scope) await Effect.runPromise(Scope.close(scope, Exit.void))
    if (before) await expectNoLeaks(before)
    service?.stop()
  })

  it("docker version, ps -a and images work through the proxy", async () => {
    const version = await cli(["version", "--format", "{{.Server.Version}}"])
    assert.isTrue(version.ok, version.stderr)
    assert.match(version.stdout.trim(), /^\d+\.\d+/)
    const ps = await cli(["ps", "-a"])
    assert.isTrue(ps.ok, ps.stderr)
    assert.match(ps.stdout, /CONTAINER ID/)
    const images = await cli(["images", "--format", "{{.Repository}}:{{.Tag}}"])
    assert.isTrue(images.ok, images.stderr)
    assert.include(images.stdout, "localhost/busybox:latest")
  })

  it("create and inspect are allowed; rm and start are denied with the proxy's message", async () => {
    const created = await cli(["create", "--name", "sy-allowed", "localhost/busybox:latest", "true"])
    assert.isTrue(created.ok, created.stderr)
    const id = created.stdout.trim()
    const inspected = await cli(["inspect", "--format", "{{.Name}}", id])
    assert.isTrue(inspected.ok, inspected.stderr)
    assert.include(inspected.stdout, "sy-allowed")
    const removed = await cli(["rm", id])
    assert.isFalse(removed.ok)
    assert.include(removed.stderr, `DELETE /containers/${id} is denied by rule set "podman-tests" (rule "deny DELETE /containers/*")`)
    const started = await cli(["start", id])
    assert.isFalse(started.ok)
    assert.include(started.stderr, `POST /containers/${id}/start is not allowed by rule set "podman-tests"`)
    // still there: the denied calls never reached the engine
    const still = await run("docker", ["ps", "-a", "--format", "{{.Names}}"], { env: direct() })
    assert.include(still.stdout, "sy-allowed")
    await run("docker", ["rm", id], { env: direct() })
  })

  it("the body policy refuses privileged, host-root, SYS_ADMIN, host-pid, device, bind and unconfined creates, naming the field; a plain create passes", async () => {
    const names = async () => (await run("docker", ["ps", "-a", "--format", "{{.Names}}"], { env: direct() })).stdout
    const cases: ReadonlyArray<readonly [ReadonlyArray<string>, string]> = [
      [["--privileged"], "HostConfig.Privileged"],
      [["-v", "/:/host"], "HostConfig.Binds[0]"],
      [["--cap-add", "SYS_ADMIN"], "HostConfig.CapAdd"],
      [["--pid", "host"], "HostConfig.PidMode"],
      [["--mount", "type=bind,source=/etc,target=/e"], "HostConfig.Mounts[0].Source"],
      [["--security-opt", "seccomp=unconfined"], "HostConfig.SecurityOpt[0]"]
    ]
    for (const [flags, field] of cases) {
      const name = `sy-refused-${field.replace(/[^a-zA-Z]/g, "").toLowerCase()}`
      const created = await cli(["create", "--name", name, ...flags, "localhost/busybox:latest", "true"])
      assert.isFalse(created.ok, `${flags.join(" ")} was allowed`)
      assert.include(created.stderr, `POST /containers/create refused by the body policy of rule set "podman-tests": ${field}`, flags.join(" "))
      assert.notInclude(await names(), name)
    }
    // `docker create --device` needs the server's OS from `/_ping`, which Podman does not send: the
    // CLI's body is posted directly (through the proxy) instead.
    const devices = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = http.request({ host: "127.0.0.1", port, method: "POST", path: "/v1.41/containers/create?name=sy-refused-device", headers: { "content-type": "application/json" } }, (res) => {
        let body = ""
        res.on("data", (c) => (body += c))
        res.on("end", () => resolve({ status: res.statusCode!, body }))
      })
      req.on("error", reject)
      req.end(JSON.stringify({
        Image: "localhost/busybox:latest",
        Cmd: ["true"],
        HostConfig: { Devices: [{ PathOnHost: "/dev/null", PathInContainer: "/dev/null", CgroupPermissions: "rwm" }] }
      }))
    })
    assert.strictEqual(devices.status, 403)
    assert.include(JSON.parse(devices.body).message, `rule set "podman-tests": HostConfig.Devices`)
    assert.notInclude(await names(), "sy-refused-device")
    const plain = await cli(["create", "--name", "sy-plain", "-v", "sy-volume:/data", "--cap-drop", "ALL", "localhost/busybox:latest", "true"])
    assert.isTrue(plain.ok, plain.stderr)
    assert.include(await names(), "sy-plain")
    await run("docker", ["rm", "sy-plain"], { env: direct() })
  })

  it("docker events streams an event caused while it runs", async () => {
    const events = spawn("docker", ["events", "--format", "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}"], { env: env() })
    try {
      let out = ""
      events.stdout.on("data", (d) => (out += d.toString()))
      // Give the CLI time to subscribe, then cause an event until it shows up (bounded).
      let seen = false
      for (let i = 0; i < 20 && !seen; i++) {
        await new Promise((r) => setTimeout(r, 250))
        const name = `sy-event-${i}`
        const created = await cli(["create", "--name", name, "localhost/busybox:latest", "true"])
        assert.isTrue(created.ok, created.stderr)
        await new Promise((r) => setTimeout(r, 250))
        seen = out.includes(`container create ${name}`)
        await run("docker", ["rm", name], { env: direct() })
      }
      assert.isTrue(seen, `events output: ${out}`)
    } finally {
      events.kill("SIGTERM")
      await new Promise((r) => events.once("close", r))
    }
  })
})
