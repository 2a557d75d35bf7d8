/**
 * Every command run as a process, the way an operator runs it: one log surface (single lines, logfmt by
 * default, JSON with `--log-format json`, one flat schema), the same flags on each command's `--help`,
 * one line on stderr and the documented exit status for ordinary mistakes, and the admin defaults.
 */
import { assert, describe, it } from "@effect/vitest"
import { spawn } from "node:child_process"
import * as fs from "node:fs"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { Effect } from "effect"
import { DefaultAdminAddresses } from "../../src/runtime/Admin.ts"
import { mainScript } from "../runtime/serverProcess.ts"

interface Finished {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
}

/**
 * Runs `switchyard args`; when `until` is given, sends SIGTERM once stdout matches it. Resolves when the
 * process has exited.
 */
const run = (args: ReadonlyArray<string>, options: { readonly until?: RegExp; readonly cwd?: string } = {}): Promise<Finished> =>
  new Promise((resolve) => {
    const child = spawn(process.execPath, [mainScript, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
      cwd: options.cwd,
      env: { ...process.env, SWITCHYARD_TOKEN: "", SWITCHYARD_TOKEN_FILE: "", SWITCHYARD_LOG_FORMAT: "", SWITCHYARD_LOG_LEVEL: "" }
    })
    let stdout = ""
    let stderr = ""
    let signalled = false
    child.stdout.on("data", (d: Buffer) => {
      stdout += d.toString()
      if (options.until !== undefined && !signalled && options.until.test(stdout)) {
        signalled = true
        child.kill("SIGTERM")
      }
    })
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()))
    const timer = setTimeout(() => child.kill("SIGKILL"), 60_000)
    child.on("close", (code) => {
      clearTimeout(timer)
      resolve({ code, stdout, stderr })
    })
  })

const tempDir = () => fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-ops-cli-"))

/** Each command with what it needs to start on loopback, and what it prints on stdout once it runs. */
const commands = (dir: string) => {
  fs.writeFileSync(path.join(dir, "wsp_server.cfg"), "---\nhost : 127.0.0.1\nport : 0\nsecretkey : ops-cli-secret\n")
  fs.writeFileSync(path.join(dir, "wsp_client.cfg"), "---\ntargets :\n - ws://127.0.0.1:1/register\nsecretkey : ops-cli-secret\n")
  return [
    { name: "server", args: ["server", "--control", "127.0.0.1:0"], ready: /gateway running[\s\S]*expose a local service/ },
    { name: "client", args: ["client", "--server", "127.0.0.1:1", "--expose", "127.0.0.1:1", "--port", "8000", "--token", "ops-cli-token"], ready: /switchyard client: / },
    { name: "socket-proxy", args: ["socket-proxy", "--listen", "127.0.0.1:0", "--preset", "read-only", "--upstream", "127.0.0.1:1"], ready: /switchyard socket-proxy: / },
    { name: "wsp-server", args: ["wsp-server", "--config", path.join(dir, "wsp_server.cfg")], ready: /listening on http/ },
    { name: "wsp-client", args: ["wsp-client", "--config", path.join(dir, "wsp_client.cfg")], ready: /connecting to/ }
  ] as const
}

const logfmtLine = /^timestamp=\S+ level=(TRACE|DEBUG|INFO|WARN|ERROR|FATAL) message=("(?:[^"\\]|\\.)*"|\S+)( [a-z_]+=("(?:[^"\\]|\\.)*"|\S+))*$/

const bindBlocker = (): Promise<{ port: number; close: () => Promise<void> }> =>
  new Promise((resolve) => {
    const server = net.createServer()
    server.listen(0, "127.0.0.1", () =>
      resolve({ port: (server.address() as net.AddressInfo).port, close: () => new Promise((done) => server.close(() => done())) }))
  })

describe("every command's operator surface (process)", () => {
  for (const format of ["logfmt", "json"] as const) {
    it.live(`logs single ${format} lines with the flat schema from every command`, () =>
      Effect.promise(async () => {
        const dir = tempDir()
        try {
          const results = await Promise.all(commands(dir).map(async (c) => ({
            c,
            result: await run([...c.args, "--admin", "127.0.0.1:0", ...(format === "json" ? ["--log-format", "json"] : [])], { until: c.ready })
          })))
          for (const { c, result } of results) {
            assert.strictEqual(result.code, 0, `${c.name} exits 0 on SIGTERM:\n${result.stderr}`)
            const lines = result.stderr.split("\n").filter((l) => l.length > 0)
            assert.isAbove(lines.length, 0, `${c.name} logged something`)
            for (const line of lines) {
              if (format === "logfmt") {
                assert.match(line, logfmtLine, `${c.name}: ${line}`)
                assert.include(line, " component=", `${c.name}: ${line}`)
              } else {
                const entry = JSON.parse(line) as Record<string, unknown>
                assert.deepStrictEqual(Object.keys(entry).slice(0, 3), ["timestamp", "level", "message"], `${c.name}: ${line}`)
                assert.isString(entry["component"], `${c.name}: ${line}`)
                for (const value of Object.values(entry)) assert.isString(value, `${c.name}: flat, ${line}`)
              }
            }
            assert.notInclude(result.stdout + result.stderr, "ops-cli-secret")
            assert.notInclude(result.stdout + result.stderr, "ops-cli-token")
          }
        } finally {
          fs.rmSync(dir, { recursive: true, force: true })
        }
      }), 120_000)
  }

  it.live("--log-level on the command line wins over a config file's log section", () =>
    Effect.promise(async () => {
      const dir = tempDir()
      try {
        fs.writeFileSync(path.join(dir, "wsp_server.cfg"), "---\nhost : 127.0.0.1\nport : 0\nsecretkey : s\nlog :\n  level : info\n  format : json\n")
        const quiet = await run(["wsp-server", "--config", path.join(dir, "wsp_server.cfg"), "--admin", "127.0.0.1:0", "--log-level", "error", "--log-format", "logfmt"], {
          until: /listening on http/
        })
        assert.strictEqual(quiet.code, 0)
        assert.notInclude(quiet.stderr, "admin endpoint on")
        const loud = await run(["wsp-server", "--config", path.join(dir, "wsp_server.cfg"), "--admin", "127.0.0.1:0"], { until: /listening on http/ })
        assert.strictEqual(JSON.parse(loud.stderr.split("\n")[0]!).message.startsWith("admin endpoint on"), true)
      } finally {
        fs.rmSync(dir, { recursive: true, force: true })
      }
    }), 60_000)

  it.live("offers the same flags on every command's --help, with one --log-level", () =>
    Effect.promise(async () => {
      const expected: Record<string, ReadonlyArray<string>> = {
        server: ["--log-format", "--log-level", "--admin", "--no-admin", "--check-config", "--token-file"],
        client: ["--log-format", "--log-level", "--admin", "--no-admin", "--check-config", "--token-file"],
        "socket-proxy": ["--log-format", "--log-level", "--admin", "--no-admin", "--check-config"],
        "wsp-server": ["--log-format", "--log-level", "--admin", "--no-admin", "--check-config"],
        "wsp-client": ["--log-format", "--log-level", "--admin", "--no-admin", "--check-config"],
        status: ["--log-format", "--log-level", "--admin"]
      }
      const helps = await Promise.all(Object.keys(expected).map((name) => run([name, "--help"])))
      Object.keys(expected).forEach((name, i) => {
        const help = helps[i]!.stdout
        for (const flag of expected[name]!) assert.match(help, new RegExp(`^\\s+${flag}\\b`, "m"), `${name} --help offers ${flag}`)
        assert.strictEqual(help.match(/^\s+--log-level\b/gm)?.length, 1, `${name} --help shows one --log-level`)
        if (name !== "server" && name !== "client") assert.notMatch(help, /--token-file/, `${name} has no token`)
        if (name === "status") assert.notMatch(help, /--no-admin|--check-config/)
      })
      assert.include(helps[0]!.stdout, "default 127.0.0.1:7090")
    }), 120_000)

  it.live("ordinary mistakes: one line on stderr, 78 for configuration, 1 for a port in use", () =>
    Effect.promise(async () => {
      const dir = tempDir()
      const blocker = await bindBlocker()
      // a port nobody listens on, for status
      const free = await bindBlocker()
      await free.close()
      try {
        fs.writeFileSync(path.join(dir, "bad.cfg"), "port: [\n")
        const cases: Array<{ args: Array<string>; code: number; says: string }> = [
          { args: ["wsp-server", "--config", path.join(dir, "missing.cfg")], code: 78, says: "cannot read" },
          { args: ["wsp-client", "--config", path.join(dir, "missing.cfg")], code: 78, says: "cannot read" },
          { args: ["wsp-client", "--config", path.join(dir, "bad.cfg")], code: 78, says: "invalid wsp client config" },
          { args: ["wsp-server", "--config", path.join(dir, "bad.cfg")], code: 78, says: "invalid wsp server config" },
          { args: ["status", "--admin", "not an address"], code: 78, says: "--admin" },
          { args: ["socket-proxy", "--preset", "read-only", "--check-config", "--admin", "nope"], code: 78, says: "admin.address" },
          { args: ["socket-proxy", "--listen", `127.0.0.1:${blocker.port}`, "--preset", "read-only", "--no-admin"], code: 1, says: "address already in use" },
          {
            args: ["socket-proxy", "--listen", "127.0.0.1:0", "--preset", "read-only", "--admin", `127.0.0.1:${blocker.port}`],
            code: 1,
            says: "--admin host:port"
          },
          { args: ["server", "--control", "127.0.0.1:0", "--admin", `127.0.0.1:${blocker.port}`], code: 1, says: "--no-admin" },
          // the banner's form of the admin address is accepted
          { args: ["status", "--admin", `http://127.0.0.1:${free.port}/`], code: 69, says: `127.0.0.1:${free.port}: connect` }
        ]
        try {
          // one at a time: each is quick, and a loaded machine starts ten at once slowly
          const results: Array<Finished> = []
          for (const c of cases) results.push(await run(c.args))
          cases.forEach((c, i) => {
            const r = results[i]!
            const what = `${c.args.join(" ")}:\n${r.stderr}`
            assert.strictEqual(r.code, c.code, what)
            const lines = r.stderr.split("\n").filter((l) => l.length > 0)
            assert.strictEqual(lines.length, 1, what)
            assert.match(lines[0]!, new RegExp(`^switchyard ${c.args[0]}: `), what)
            assert.include(lines[0]!, c.says, what)
            assert.notMatch(r.stderr, /\n\s+at /, what)
          })
        } finally {
          await blocker.close()
        }
      } finally {
        fs.rmSync(dir, { recursive: true, force: true })
      }
    }), 180_000)

  it("default admin addresses are outside 9090-9094", () => {
    for (const address of Object.values(DefaultAdminAddresses)) assert.isFalse(address.port >= 9090 && address.port <= 9094)
  })
})
