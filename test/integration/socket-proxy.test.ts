/**
 * `switchyard socket-proxy` as operators run it: a process, a config file, a signal to stop.
 */
import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import { type ChildProcess, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import * as os from "node:os"
import * as path from "node:path"
import { CONFIG_ERROR_EXIT_CODE } from "../../src/runtime/commands/socketProxy.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../support/leaks.ts"
import { type EngineUpstream, startEngineUpstream } from "../services/EngineUpstream.ts"

const main = path.resolve(import.meta.dirname, "../../src/runtime/main.ts")

let dir: string
let engine: EngineUpstream
let before: HandleCounts

beforeEach(async () => {
  before = activeHandles()
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-spi-"))
  engine = await startEngineUpstream()
})

afterEach(async () => {
  await engine.close()
  fs.rmSync(dir, { recursive: true, force: true })
  await expectNoLeaks(before)
})

const runToExit = (args: ReadonlyArray<string>): Promise<{ code: number | null; output: string }> =>
  new Promise((resolve) => {
    const child = spawn(process.execPath, [main, "socket-proxy", ...args], { stdio: ["ignore", "pipe", "pipe"] })
    let output = ""
    child.stdout.on("data", (d) => (output += d))
    child.stderr.on("data", (d) => (output += d))
    child.on("close", (code) => resolve({ code, output }))
  })

/** Starts the proxy and resolves once it printed its start line. */
const startProxy = (args: ReadonlyArray<string>): Promise<{ child: ChildProcess; line: string }> =>
  new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [main, "socket-proxy", ...args], { stdio: ["ignore", "pipe", "pipe"] })
    let output = ""
    const onData = (d: Buffer) => {
      output += d.toString()
      const line = output.split("\n").find((l) => l.startsWith("switchyard socket-proxy:"))
      if (line) resolve({ child, line })
    }
    child.stdout!.on("data", onData)
    child.stderr!.on("data", onData)
    child.on("close", (code) => reject(new Error(`exited with ${code} before starting: ${output}`)))
  })

const getVia = (socketPath: string, p: string) =>
  new Promise<{ status: number; body: string }>((resolve, reject) => {
    const req = http.get({ socketPath, path: p, agent: false }, (res) => {
      let body = ""
      res.on("data", (c) => (body += c))
      res.on("end", () => resolve({ status: res.statusCode!, body }))
    })
    req.on("error", reject)
  })

/** Resolves when the child prints a line containing `text` (checking what it printed so far too). */
const waitForOutput = (child: ChildProcess, text: string): Promise<void> =>
  new Promise((resolve) => {
    let output = ""
    const onData = (d: Buffer) => {
      output += d.toString()
      if (output.includes(text)) {
        child.stdout!.off("data", onData)
        child.stderr!.off("data", onData)
        resolve()
      }
    }
    child.stdout!.on("data", onData)
    child.stderr!.on("data", onData)
  })

describe("switchyard socket-proxy (process)", () => {
  it.each([
    { name: "an unknown preset in the file", file: "rules:\n  - preset: traefix\n", expect: `rules[0].preset: unknown preset "traefix"` },
    { name: "a bad limit", file: "rules: [GET /x]\nlimits: { maxSockets: -1 }\n", expect: "limits.maxSockets: Expected a value between 1 and 65536 (got -1)" },
    { name: "a typo in a field name", file: "rules: [GET /x]\nlisen: [127.0.0.1:1]\n", expect: "lisen: unknown field" },
    { name: "a bad rule", file: "rules: [\"GET containers\"]\n", expect: "rules[0]: path \"containers\" must start with /" },
    { name: "no allow rule", file: "rules: [{ deny: GET /x }]\n", expect: "no allow rule and no preset" }
  ])("refuses to start on $name, naming field and value", async ({ file, expect }) => {
    const config = path.join(dir, "proxy.yaml")
    fs.writeFileSync(config, file)
    const { code, output } = await runToExit(["--config", config, "--upstream", `unix:${engine.socketPath}`, "--listen", "127.0.0.1:0"])
    assert.strictEqual(code, CONFIG_ERROR_EXIT_CODE)
    assert.include(output, expect)
    // one line for the operator, no stack trace
    assert.strictEqual(output.trim().split("\n").length, 1, output)
  })

  it("refuses to start when a flag is bad", async () => {
    const { code, output } = await runToExit(["--upstream", `unix:${engine.socketPath}`, "--listen", "127.0.0.1:0", "--allow", "GET containers"])
    assert.strictEqual(code, CONFIG_ERROR_EXIT_CODE)
    assert.include(output, "--allow")
  })

  it("serves from a config file on a Unix socket, and SIGTERM closes it and removes the socket", async () => {
    const sock = path.join(dir, "proxy.sock")
    const config = path.join(dir, "proxy.json")
    fs.writeFileSync(config, JSON.stringify({
      upstream: `unix:${engine.socketPath}`,
      name: "from-file",
      listen: [{ address: `unix:${sock}`, mode: "0600" }],
      rules: [{ preset: "ping" }, "GET /small"]
    }))
    const { child, line } = await startProxy(["--config", config])
    try {
      assert.include(line, `rule set "from-file"`)
      assert.strictEqual((await getVia(sock, "/v1.41/_ping")).status, 200)
      const denied = await getVia(sock, "/v1.41/containers/json")
      assert.strictEqual(denied.status, 403)
      assert.include(JSON.parse(denied.body).message, `rule set "from-file"`)
      assert.strictEqual(engine.seen.length, 1)
    } finally {
      const closed = new Promise<number | null>((resolve) => child.once("close", resolve))
      child.kill("SIGTERM")
      await closed
    }
    assert.isFalse(fs.existsSync(sock))
  })

  it("SIGHUP reloads the rules; a bad file on reload keeps the rules in force", async () => {
    const sock = path.join(dir, "reload.sock")
    const config = path.join(dir, "reload.yaml")
    fs.writeFileSync(config, `upstream: unix:${engine.socketPath}\nlisten: [unix:${sock}]\nrules: [GET /_ping]\n`)
    const { child } = await startProxy(["--config", config])
    try {
      assert.strictEqual((await getVia(sock, "/small")).status, 403)
      fs.writeFileSync(config, `upstream: unix:${engine.socketPath}\nlisten: [unix:${sock}]\nrules: [GET /_ping, GET /small]\n`)
      const reloaded = waitForOutput(child, "reloaded rule set")
      child.kill("SIGHUP")
      await reloaded
      assert.strictEqual((await getVia(sock, "/small")).status, 200)
      fs.writeFileSync(config, `upstream: unix:${engine.socketPath}\nlisten: [unix:${sock}]\nrules: [GET small]\n`)
      const refused = waitForOutput(child, "reload refused")
      child.kill("SIGHUP")
      await refused
      assert.strictEqual((await getVia(sock, "/small")).status, 200)
    } finally {
      const closed = new Promise<number | null>((resolve) => child.once("close", resolve))
      child.kill("SIGTERM")
      await closed
    }
  })
})
