/**
 * The real docker CLI through a label-scoped `switchyard socket-proxy` to the Docker Engine API served by
 * Podman: creates are labelled, containers created on the engine directly are invisible and untouchable
 * (by name, id and id prefix, after renames and recreations under a cached name), and learning mode turns
 * a refused sequence into rules that then allow it and nothing else.
 */
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { execFile, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import * as path from "node:path"
import { promisify } from "node:util"
import { addressAfter, type RunningProcess, spawnSwitchyard } from "../runtime/serverProcess.ts"
import { assertPeer, dockerCli, peerMissing, type PeerProbe, type PodmanService, startPodman } from "../support/peers.ts"

const run = promisify(execFile)

const docker = dockerCli()
const podman: PeerProbe<PodmanService> = docker.value === undefined ? { value: undefined, reason: docker.reason } : startPodman()

const IMAGE = "localhost/busybox:latest"
/** Bound for the tests that start several proxy processes and drive a CLI through each (slow on a loaded machine). */
const LONG_TEST_MS = 180_000
const SCOPE = "sy.scope=team-a"

interface CliResult {
  readonly ok: boolean
  readonly stdout: string
  readonly stderr: string
}

describe.skipIf(peerMissing(podman) || peerMissing(docker))("docker CLI through a label-scoped socket proxy (Podman)", () => {
  let service: PodmanService
  const procs: Array<RunningProcess> = []

  const cliAt = (host: string) => (args: ReadonlyArray<string>): Promise<CliResult> =>
    run("docker", args, { env: { ...process.env, DOCKER_HOST: host, DOCKER_CONFIG: service.dir }, timeout: 30_000 }).then(
      (r) => ({ ok: true, stdout: r.stdout, stderr: r.stderr }),
      (e: { stdout?: string; stderr?: string }) => ({ ok: false, stdout: e.stdout ?? "", stderr: e.stderr ?? "" })
    )
  const direct = (args: ReadonlyArray<string>) => cliAt(`unix://${service.socketPath}`)(args)
  const mustDirect = async (args: ReadonlyArray<string>) => {
    const r = await direct(args)
    assert.isTrue(r.ok, `${args.join(" ")}: ${r.stderr}`)
    return r.stdout.trim()
  }
  const state = (name: string) => mustDirect(["inspect", "--format", "{{.State.Status}}", name])

  /** Starts `switchyard socket-proxy` with a config file; returns the docker CLI through it and the process. */
  const startProxy = async (name: string, lines: ReadonlyArray<string>) => {
    const config = path.join(service.dir, `${name}.yaml`)
    fs.writeFileSync(config, [`upstream: unix:${service.socketPath}`, "listen: [127.0.0.1:0]", `name: ${name}`, ...lines].join("\n") + "\n")
    const proc = spawnSwitchyard(["socket-proxy", "--config", config, "--no-admin"])
    procs.push(proc)
    await proc.waitFor(/switchyard socket-proxy: unix:\S+ on 127\.0\.0\.1:\d+/)
    const { port } = addressAfter(proc.output(), /switchyard socket-proxy: unix:\S+ on/)
    return { cli: cliAt(`tcp://127.0.0.1:${port}`), port, proc }
  }

  beforeAll(() => {
    assertPeer(docker)
    service = assertPeer(podman)
  })

  afterAll(async () => {
    for (const p of procs) await p.stop()
    service?.stop()
  })

  describe("label scope", () => {
    let cli: (args: ReadonlyArray<string>) => Promise<CliResult>
    let port: number
    let proxy: RunningProcess

    beforeAll(async () => {
      const started = await startProxy("scoped", [
        `container_label: ${SCOPE}`,
        "rules:",
        "  - preset: read-only",
        "  - POST /containers/create",
        "  - POST /containers/*/start",
        "  - POST /containers/*/stop",
        "  - POST /containers/*/kill",
        "  - POST /containers/*/wait",
        "  - POST /containers/*/exec",
        "  - POST /exec/*/start",
        "  - DELETE /containers/*"
      ])
      cli = started.cli
      port = started.port
      proxy = started.proc
    })

    it("a plain create is allowed and labelled; containers created on the engine are not listed", async () => {
      const created = await cli(["create", "--name", "sy-in", IMAGE, "true"])
      assert.isTrue(created.ok, created.stderr)
      const id = created.stdout.trim()
      assert.strictEqual(await mustDirect(["inspect", "--format", `{{index .Config.Labels "sy.scope"}}`, id]), "team-a")
      await mustDirect(["create", "--name", "sy-out", IMAGE, "true"])
      await mustDirect(["create", "--name", "sy-other", "--label", "sy.scope=team-b", IMAGE, "true"])
      const ps = await cli(["ps", "-a", "--format", "{{.Names}}"])
      assert.isTrue(ps.ok, ps.stderr)
      assert.deepStrictEqual(ps.stdout.trim().split("\n"), ["sy-in"])
      // a client's own label filter narrows further, never widens
      const other = await cli(["ps", "-a", "--filter", "label=sy.scope=team-b", "--format", "{{.Names}}"])
      assert.isTrue(other.ok, other.stderr)
      assert.strictEqual(other.stdout.trim(), "")
      const mine = await cli(["ps", "-a", "--filter", "name=sy-", "--format", "{{.Names}}"])
      assert.deepStrictEqual(mine.stdout.trim().split("\n"), ["sy-in"])
      // a create that sets the scope's label to another value is refused
      const escape = await cli(["create", "--name", "sy-escape", "--label", "sy.scope=team-b", IMAGE, "true"])
      assert.isFalse(escape.ok)
      assert.include(escape.stderr, "Labels.sy.scope must be \"team-a\"")
      assert.isFalse((await direct(["inspect", "sy-escape"])).ok)
    })

    it("a container created on the engine is untouchable by name, id and id prefix", async () => {
      const outside = await mustDirect(["inspect", "--format", "{{.Id}}", "sy-out"])
      for (const ref of ["sy-out", outside, outside.slice(0, 12)]) {
        for (const args of [["inspect", ref], ["start", ref], ["rm", ref], ["stop", ref], ["logs", ref]]) {
          const r = await cli(args)
          assert.isFalse(r.ok, `${args.join(" ")} passed`)
          assert.notInclude(r.stdout, outside)
          // (inspect goes on to look for an image of that name, and says so)
          if (args[0] !== "inspect") assert.match(r.stderr, /No such container/i, args.join(" "))
        }
      }
      // `rm -f` reports success for a container that does not exist; it must still be there
      assert.isTrue((await cli(["rm", "-f", "sy-out"])).ok)
      assert.strictEqual(await state("sy-out"), "created")
      // logged (logfmt quotes the message as a JSON string)
      assert.include(proxy.output(), `container \\"sy-out\\" is outside the label scope ${SCOPE} of rule set \\"scoped\\" (answered 404)`)
    })

    it("exec on a container outside the scope answers 404 before the engine sees it; on one inside, the engine answers", async () => {
      // (containers cannot run in this environment, so the engine refuses exec on the scope's container as not running)
      const outside = await cli(["exec", "sy-out", "true"])
      assert.isFalse(outside.ok)
      assert.match(outside.stderr, /No such container/i)
      const inside = await cli(["exec", "sy-in", "true"])
      assert.isFalse(inside.ok)
      assert.notMatch(inside.stderr, /No such container|switchyard/i)
      const missing = await new Promise<{ status: number; body: string }>((resolve, reject) => {
        const req = http.request({ host: "127.0.0.1", port, method: "POST", path: `/v1.41/exec/${"ab".repeat(32)}/start`, headers: { "content-type": "application/json" } }, (res) => {
          let body = ""
          res.on("data", (c) => (body += c))
          res.on("end", () => resolve({ status: res.statusCode!, body }))
        })
        req.on("error", reject)
        req.end(JSON.stringify({ Detach: true }))
      })
      assert.strictEqual(missing.status, 404)
    })

    it("a cached name never reaches the container that takes it over: rename, remove and recreate, id-prefix names", async () => {
      // rename: the scoped container is looked up (cached), renamed on the engine, and its name taken by an outside one
      const a = (await cli(["create", "--name", "sy-r", IMAGE, "true"])).stdout.trim()
      assert.strictEqual((await cli(["inspect", "--format", "{{.Id}}", "sy-r"])).stdout.trim(), a)
      await mustDirect(["rename", "sy-r", "sy-r-old"])
      const b = await mustDirect(["create", "--name", "sy-r", IMAGE, "sleep", "300"])
      const afterRename = await cli(["inspect", "--format", "{{.Id}}", "sy-r"])
      assert.notInclude(afterRename.stdout, b)
      await cli(["start", "sy-r"])
      assert.strictEqual(await state(b), "created")
      // remove and recreate under the same name, outside the scope
      const c = (await cli(["create", "--name", "sy-c", IMAGE, "true"])).stdout.trim()
      assert.strictEqual((await cli(["inspect", "--format", "{{.Id}}", "sy-c"])).stdout.trim(), c)
      await mustDirect(["rm", "sy-c"])
      const d = await mustDirect(["create", "--name", "sy-c", IMAGE, "sleep", "300"])
      const recreated = await cli(["start", "sy-c"])
      assert.isFalse(recreated.ok)
      assert.match(recreated.stderr, /No such container/i)
      assert.strictEqual(await state(d), "created")
      // an outside container named like the id prefix of a scoped one
      const e = (await cli(["create", "--name", "sy-e", IMAGE, "true"])).stdout.trim()
      const f = await mustDirect(["create", "--name", e.slice(0, 12), IMAGE, "sleep", "300"])
      const byPrefix = await cli(["inspect", "--format", "{{.Id}}", e.slice(0, 12)])
      assert.notInclude(byPrefix.stdout, f)
      await cli(["start", e.slice(0, 12)])
      assert.strictEqual(await state(f), "created")
      await mustDirect(["rm", "-f", "sy-r", "sy-r-old", "sy-c", "sy-e", e.slice(0, 12)])
    })

    it("docker events shows the scope's containers only", async () => {
      const events = spawn("docker", ["events", "--format", "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}"], {
        env: { ...process.env, DOCKER_HOST: `tcp://127.0.0.1:${port}`, DOCKER_CONFIG: service.dir }
      })
      try {
        let out = ""
        events.stdout.on("data", (d) => (out += d.toString()))
        let seen = false
        for (let i = 0; i < 20 && !seen; i++) {
          await new Promise((r) => setTimeout(r, 250))
          await mustDirect(["create", "--name", `sy-ev-out-${i}`, IMAGE, "true"])
          assert.isTrue((await cli(["create", "--name", `sy-ev-in-${i}`, IMAGE, "true"])).ok)
          await new Promise((r) => setTimeout(r, 250))
          seen = out.includes(`container create sy-ev-in-${i}`)
          await mustDirect(["rm", `sy-ev-out-${i}`, `sy-ev-in-${i}`])
        }
        assert.isTrue(seen, `events output: ${out}`)
        assert.notInclude(out, "sy-ev-out-")
      } finally {
        events.kill("SIGTERM")
        await new Promise((r) => events.once("close", r))
      }
    })
  })

  it("Podman's own client (podman --remote) through the libpod-read-only preset and a label scope", async () => {
    await mustDirect(["create", "--name", "sy-pm-out", IMAGE, "true"])
    await mustDirect(["create", "--name", "sy-pm-in", "--label", SCOPE, IMAGE, "true"])
    const { port } = await startProxy("libpod", [`container_label: ${SCOPE}`, "rules:", "  - GET,HEAD /_ping", "  - preset: libpod-read-only"])
    const podmanCli = (args: ReadonlyArray<string>): Promise<CliResult> =>
      run("podman", ["--remote", "--url", `tcp://127.0.0.1:${port}`, ...args], { timeout: 30_000 }).then(
        (r) => ({ ok: true, stdout: r.stdout, stderr: r.stderr }),
        (e: { stdout?: string; stderr?: string }) => ({ ok: false, stdout: e.stdout ?? "", stderr: e.stderr ?? "" })
      )
    const ps = await podmanCli(["ps", "-a", "--format", "{{.Names}}"])
    assert.isTrue(ps.ok, ps.stderr)
    assert.include(ps.stdout.split("\n"), "sy-pm-in")
    assert.notInclude(ps.stdout, "sy-pm-out")
    const images = await podmanCli(["images", "--format", "{{.Repository}}"])
    assert.isTrue(images.ok, images.stderr)
    assert.include(images.stdout, "localhost/busybox")
    const inside = await podmanCli(["inspect", "--format", "{{.Name}}", "sy-pm-in"])
    assert.isTrue(inside.ok, inside.stderr)
    const outside = await podmanCli(["container", "inspect", "sy-pm-out"])
    assert.isFalse(outside.ok)
    assert.match(outside.stderr, /no such container/i)
    // writes are not in the preset
    const removed = await podmanCli(["rm", "sy-pm-in"])
    assert.isFalse(removed.ok)
    assert.include(removed.stderr, "is not allowed by rule set \"libpod\"")
    assert.strictEqual(await state("sy-pm-in"), "created")
    await mustDirect(["rm", "sy-pm-out", "sy-pm-in"])
  }, LONG_TEST_MS)

  it("learning mode turns a refused sequence into rules that then allow exactly it", async () => {
    const sequence: ReadonlyArray<ReadonlyArray<string>> = [
      ["ps", "-a"],
      ["create", "--name", "sy-learn", IMAGE, "true"],
      ["inspect", "sy-learn"],
      ["rename", "sy-learn", "sy-learned"],
      ["rm", "sy-learned"]
    ]
    const base = ["rules:", "  - GET /_ping", "  - HEAD /_ping", "  - GET /version"]
    // enforcing: the sequence is refused at its first step
    const enforcing = await startProxy("learn-before", base)
    const refused = await enforcing.cli(sequence[0]!)
    assert.isFalse(refused.ok)
    assert.include(refused.stderr, "is not allowed by rule set \"learn-before\"")
    // learning: every step passes, and each would-be refusal is logged
    const learning = await startProxy("learn", ["mode: learn", ...base])
    for (const step of sequence) {
      const r = await learning.cli(step)
      assert.isTrue(r.ok, `${step.join(" ")}: ${r.stderr}`)
    }
    await learning.proc.stop()
    const log = path.join(service.dir, "learn.log")
    fs.writeFileSync(log, learning.proc.output())
    const rules = spawnSwitchyard(["socket-proxy", "rules", "--from-log", log, "--name", "learn"])
    procs.push(rules)
    assert.strictEqual(await rules.exited, 0)
    const suggestion = rules.output()
    assert.include(suggestion, "POST /containers/create")
    assert.include(suggestion, "POST /containers/*/rename")
    assert.include(suggestion, "DELETE /containers/*")
    // enforcing with the learned rules: the same sequence passes, a call outside it is refused
    const learned = suggestion.split("\n").filter((l) => !l.startsWith("#") && !l.startsWith("rules:")).filter((l) => l.trim().length > 0)
    const enforced = await startProxy("learned", [...base, ...learned])
    for (const step of sequence) {
      const r = await enforced.cli(step)
      assert.isTrue(r.ok, `${step.join(" ")}: ${r.stderr}`)
    }
    const outside = await enforced.cli(["network", "ls"])
    assert.isFalse(outside.ok)
    assert.include(outside.stderr, "is not allowed by rule set \"learned\"")
    await enforcing.proc.stop()
    await enforced.proc.stop()
  }, LONG_TEST_MS)
})
