/**
 * `switchyard socket-proxy` with several listener groups in one file: each group's sockets (Unix with
 * mode and owner, TCP) are served by its own rules, body policy, label scope and mode; denials name the
 * listener, the client and the rule set; metrics and `/learned-rules` are per listener and rule set.
 */
import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs"
import * as http from "node:http"
import * as os from "node:os"
import * as path from "node:path"
import { ConfigError, decodeSocketProxyFile, resolveConfig, type SocketProxyFile } from "../../src/domain/SocketProxyConfig.ts"
import { type EngineUpstream, startEngineUpstream } from "../services/EngineUpstream.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { addressAfter, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"

let dir: string
let engine: EngineUpstream
let before: HandleCounts

beforeEach(async () => {
  before = activeHandles()
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-sp-groups-"))
  engine = await startEngineUpstream()
})
afterEach(async () => {
  await engine.close()
  fs.rmSync(dir, { recursive: true, force: true })
  await expectNoLeaks(before, 5_000)
})

const ask = (where: { socketPath: string } | { port: number }, method: string, p: string, body?: string) =>
  new Promise<{ status: number; body: string }>((resolve, reject) => {
    const req = http.request({ ...("port" in where ? { host: "127.0.0.1" } : {}), ...where, method, path: p, agent: false, headers: body === undefined ? {} : { "content-type": "application/json" } }, (res) => {
      let text = ""
      res.on("data", (c) => (text += c))
      res.on("end", () => resolve({ status: res.statusCode!, body: text }))
    })
    req.on("error", reject)
    req.end(body)
  })

const resolveFile = (input: unknown) => {
  const decoded = decodeSocketProxyFile(input)
  return decoded instanceof ConfigError ? decoded : resolveConfig(decoded as SocketProxyFile)
}

describe("socket proxy listener groups", () => {
  it("the file form: groups resolved on their own, shared fields shared, mistakes named by group and field", () => {
    const ok = resolveFile({
      upstream: "unix:/run/e.sock",
      limits: { maxConnections: 7 },
      listeners: [
        { name: "a", listen: [{ address: "unix:/run/a.sock", mode: "0660", owner: "1000:1001" }], rules: ["GET /_ping"] },
        { name: "b", listen: ["127.0.0.1:0", "unix:/run/b.sock"], rules: [{ preset: "ci" }], container_label: "team=ci", mode: "learn" }
      ]
    })
    if (ok instanceof ConfigError) throw new Error(ok.message)
    assert.strictEqual(ok.groups!.length, 2)
    const [a, b] = ok.groups!
    assert.deepStrictEqual(a!.listen, [{ _tag: "Unix", path: "/run/a.sock", mode: 0o660, owner: { uid: 1000, gid: 1001 } }])
    assert.strictEqual(a!.ruleSet.name, "a")
    assert.strictEqual(b!.limits.maxConnections, 7)
    assert.deepStrictEqual(b!.containerLabel, { key: "team", value: "ci" })
    assert.isTrue(b!.learn)
    assert.isFalse(a!.learn)
    // no group's containers may mount another group's socket
    assert.include(a!.bodyPolicy.protectedPaths, "/run/b.sock")
    const bad: ReadonlyArray<readonly [unknown, string]> = [
      [{ listeners: [{ name: "a", listen: ["unix:/a"], rules: ["GET /_ping"] }], rules: ["GET /x"] }, "rules: not accepted with listeners"],
      [{ listeners: [] }, "listeners: expected at least one listener"],
      [{ listeners: [{ name: "a", listen: Array.from({ length: 40 }, (_, i) => `unix:/a${i}`), rules: ["GET /_ping"] }, { name: "b", listen: Array.from({ length: 25 }, (_, i) => `unix:/b${i}`), rules: ["GET /_ping"] }] }, "listeners: at most 64 addresses in all, got 65"],
      [{ listen: Array.from({ length: 65 }, (_, i) => `unix:/a${i}`), rules: ["GET /_ping"] }, "listen: at most 64 addresses"],
      [{ listeners: [{ name: "a", listen: ["unix:/a"], rules: ["GET /_ping"] }, { name: "a", listen: ["unix:/b"], rules: ["GET /_ping"] }] }, "listeners[1].name"],
      [{ listeners: [{ name: "a", listen: ["unix:/a"], rules: ["GET /_ping"] }, { name: "b", listen: ["unix:/a"], rules: ["GET /_ping"] }] }, "listeners[1].listen[0]: unix:/a is already a listener"],
      [{ listeners: [{ name: "a", listen: ["unix:/a"], rules: ["GET nothing"] }] }, "listeners[0].rules[0]"],
      [{ listeners: [{ name: "a", listen: [{ address: "unix:/a", owner: "root" }], rules: ["GET /_ping"] }] }, "listeners[0].listen[0].owner"],
      [{ listeners: [{ name: "a", listen: [{ address: "127.0.0.1:1", owner: "1" }], rules: ["GET /_ping"] }] }, "only Unix sockets have an owner"],
      [{ listeners: [{ name: "a", listen: ["unix:/a"], rules: ["GET /_ping"], container_label: "x" }] }, "listeners[0].container_label"]
    ]
    for (const [input, message] of bad) {
      const r = resolveFile(input)
      assert.instanceOf(r, ConfigError, JSON.stringify(input))
      assert.include((r as ConfigError).message, message)
    }
    const decoded = decodeSocketProxyFile({ listeners: [{ name: "a", listen: ["unix:/a"], rules: ["GET /_ping"] }] }) as SocketProxyFile
    const flagged = resolveConfig(decoded, { allow: ["GET /x"] })
    assert.instanceOf(flagged, ConfigError)
    assert.include((flagged as ConfigError).message, "--allow: not accepted with a config file that declares listeners")
  })

  it.live("each listener is served by its group: rules, label scope and mode; denials and metrics name listener and rule set", () =>
    Effect.promise(async () => {
      const dash = path.join(dir, "dash.sock")
      const ci = path.join(dir, "ci.sock")
      const config = path.join(dir, "groups.yaml")
      fs.writeFileSync(config, [
        `upstream: unix:${engine.socketPath}`,
        "admin: { address: 127.0.0.1:0 }",
        "listeners:",
        "  - name: dash",
        `    listen: [{ address: "unix:${dash}", mode: "0640", owner: "1234:4321" }]`,
        "    rules: [GET /_ping]",
        "  - name: ci",
        `    listen: ["unix:${ci}", "127.0.0.1:0"]`,
        "    rules: [\"* /**\"]",
        "    container_label: team=ci",
        "  - name: learner",
        "    listen: [127.0.0.1:0]",
        "    mode: learn",
        "    rules: [GET /_ping]"
      ].join("\n") + "\n")
      const proc = spawnSwitchyard(["socket-proxy", "--config", config])
      try {
        await proc.waitFor("switchyard socket-proxy:")
        await proc.waitFor(/admin endpoint on http:\/\/127\.0\.0\.1:\d+/)
        const admin = addressAfter(proc.output(), /admin endpoint on/)
        const status = JSON.parse((await get(admin.port, "/status")).body) as { listeners: Array<{ name: string; address: string }> }
        const tcp = (name: string) => Number(status.listeners.find((l) => l.name === `socket-proxy:${name}` && !l.address.startsWith("unix:"))!.address.split(":")[1])
        assert.deepInclude(status.listeners, { name: "socket-proxy:dash", address: `unix:${dash}` })
        assert.deepInclude(status.listeners, { name: "socket-proxy:ci", address: `unix:${ci}` })
        // the Unix listener's file mode and owner
        const stat = fs.statSync(dash)
        assert.strictEqual(stat.mode & 0o777, 0o640)
        assert.strictEqual(stat.uid, 1234)
        assert.strictEqual(stat.gid, 4321)

        assert.strictEqual((await ask({ socketPath: dash }, "GET", "/_ping")).status, 200)
        const denied = await ask({ socketPath: dash }, "GET", "/v1.41/containers/json")
        assert.strictEqual(denied.status, 403)
        assert.include(JSON.parse(denied.body).message, `rule set "dash"`)
        await proc.waitFor(`[listener unix:${dash}, client local]`)

        // the ci group: allowed, and its label scope filters the list
        engine.seen.length = 0
        assert.strictEqual((await ask({ socketPath: ci }, "GET", "/v1.41/containers/json?all=1")).status, 404)
        assert.strictEqual((await ask({ port: tcp("ci") }, "GET", "/v1.41/containers/json")).status, 404)
        assert.strictEqual(engine.seen.length, 2)
        for (const seen of engine.seen) assert.deepStrictEqual(JSON.parse(new URL(seen.url, "http://e").searchParams.get("filters")!), { label: ["team=ci"] })
        const privileged = await ask({ socketPath: ci }, "POST", "/v1.41/containers/create", JSON.stringify({ Image: "x", HostConfig: { Privileged: true } }))
        assert.strictEqual(privileged.status, 403)
        assert.include(JSON.parse(privileged.body).message, `body policy of rule set "ci": HostConfig.Privileged`)

        // the learner group: forwarded, unfiltered, learned
        engine.seen.length = 0
        assert.strictEqual((await ask({ port: tcp("learner") }, "GET", "/v1.41/containers/json")).status, 404)
        assert.strictEqual(engine.seen[0]!.url, "/v1.41/containers/json")
        await proc.waitFor("learn: would refuse")
        const learned = (await get(admin.port, "/learned-rules")).body
        assert.include(learned, `rule set "learner"`)
        assert.include(learned, `  - "GET /containers/json"`)
        assert.notInclude(learned, `rule set "dash"`)

        const metrics = (await get(admin.port, "/metrics")).body
        const count = (decision: string, listener: string, ruleSet: string) =>
          sample(metrics, "switchyard_socket_proxy_requests_total", { decision, listener, rule_set: ruleSet })
        assert.strictEqual(count("denied", `unix:${dash}`, "dash"), 1)
        assert.strictEqual(count("allowed", `unix:${dash}`, "dash"), 1)
        assert.strictEqual(count("allowed", `unix:${ci}`, "ci"), 1)
        assert.strictEqual(count("denied", `unix:${ci}`, "ci"), 1)
        assert.strictEqual(count("allowed", `127.0.0.1:${tcp("ci")}`, "ci"), 1)
        assert.strictEqual(count("allowed", `127.0.0.1:${tcp("learner")}`, "learner"), 1)
        assert.strictEqual(sample(metrics, "switchyard_socket_proxy_learned_total", { listener: `127.0.0.1:${tcp("learner")}`, rule_set: "learner" }), 1)

        // the log of the learner group turns into its rules, by rule set
        const log = path.join(dir, "proxy.log")
        fs.writeFileSync(log, proc.output())
        const rules = spawnSwitchyard(["socket-proxy", "rules", "--from-log", log, "--name", "learner"])
        assert.strictEqual(await rules.exited, 0)
        assert.include(rules.output(), `# rules learned for rule set "learner"`)
        assert.include(rules.output(), `  - "GET /containers/json"`)
      } finally {
        assert.strictEqual(await proc.stop("SIGTERM"), 0)
      }
      assert.isFalse(fs.existsSync(dash))
    }))
})
