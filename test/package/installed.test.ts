/**
 * The package as `npm install` gives it: packed from this checkout, installed from the tarball into a
 * fresh project. It carries one Effect (its shrinkwrap), runs its bundle (no sources shipped), refuses an
 * old Node in one line, loads no bundle chunk over 256 KB when a command starts, and every long-running
 * command starts from it and answers its admin endpoint.
 */
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { execFileSync, spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { type InstalledPackage, InstallTimeoutMs, packAndInstall, startCommand, startEveryCommand } from "../../scripts/installedPackage.ts"
import { freePort, get } from "../runtime/serverProcess.ts"

const root = path.resolve(import.meta.dirname, "../..")
const checkout = JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8")) as { version: string; engines: { node: string } }

/** A Node on PATH older than the package's minimum (the distribution's, typically), if there is one. */
const oldNode = (() => {
  const which = spawnSync("which", ["-a", "node"], { encoding: "utf8" })
  const minimum = checkout.engines.node.replace(/^>=\s*/, "").split(".").map(Number)
  for (const candidate of new Set(which.stdout.split("\n").filter((l) => l !== ""))) {
    const v = spawnSync(candidate, ["-p", "process.versions.node"], { encoding: "utf8" }).stdout.trim().split(".").map(Number)
    if (v.length >= 2 && (v[0]! < minimum[0]! || (v[0] === minimum[0] && v[1]! < minimum[1]!))) return candidate
  }
  return undefined
})()

let installed: InstalledPackage

/**
 * Largest bundle chunk a command loads when it starts (bytes): V8 parses a module's top level in one piece
 * and the C heap that parse takes stays with the process (`scripts/build.ts`, chunk boundaries).
 */
const MaxStartupChunkBytes = 256 * 1024
/** A static import or re-export of another chunk in the minified bundle, and a dynamic import of one. */
const StaticImport = /(?:\bfrom|\bimport)\s*"(\.\.?\/[^"]+)"/g
const DynamicImport = /\bimport\("(\.\.?\/[^"]+)"\)/g

beforeAll(() => {
  installed = packAndInstall()
}, InstallTimeoutMs)

afterAll(() => installed?.remove())

/** Every version of `name` in the install's dependency tree. */
const versionsOf = (name: string): Set<string> => {
  const tree = JSON.parse(execFileSync("npm", ["ls", name, "--all", "--json"], { cwd: installed.dir, encoding: "utf8" })) as unknown
  const found = new Set<string>()
  const walk = (node: unknown, key: string) => {
    if (node === null || typeof node !== "object") return
    const n = node as { version?: string; dependencies?: Record<string, unknown> }
    if (key === name && n.version !== undefined) found.add(n.version)
    for (const [k, child] of Object.entries(n.dependencies ?? {})) walk(child, k)
  }
  walk(tree, "")
  return found
}

describe("the installed package", () => {
  it("resolves one Effect, the version the checkout is tested with", () => {
    const tested = (JSON.parse(fs.readFileSync(path.join(root, "node_modules/effect/package.json"), "utf8")) as { version: string }).version
    assert.deepStrictEqual([...versionsOf("effect")], [tested])
  })

  it("runs its bundle: no sources are shipped and the command prints its version", () => {
    assert.isTrue(fs.existsSync(path.join(installed.packageDir, "dist/cli/switchyard.mjs")))
    assert.isTrue(fs.existsSync(path.join(installed.packageDir, "dist/index.d.ts")))
    assert.isTrue(fs.existsSync(path.join(installed.packageDir, "npm-shrinkwrap.json")))
    assert.isFalse(fs.existsSync(path.join(installed.packageDir, "src")))
    const run = spawnSync(process.execPath, [installed.bin, "--version"], { encoding: "utf8", timeout: 30_000 })
    assert.strictEqual(run.status, 0, run.stderr)
    assert.strictEqual(run.stdout.trim(), `switchyard v${checkout.version}`)
  })

  it.skipIf(oldNode === undefined)(`on a Node older than ${checkout.engines.node.replace(/^>=\s*/, "")} prints one line naming the version it needs and exits non-zero (${oldNode ?? "no older node on PATH"})`, () => {
    const run = spawnSync(oldNode!, [installed.bin, "server"], { encoding: "utf8", timeout: 30_000 })
    assert.strictEqual(run.status, 1)
    assert.strictEqual(run.stdout, "")
    const lines = run.stderr.trim().split("\n")
    assert.strictEqual(lines.length, 1, run.stderr)
    assert.match(lines[0]!, /^switchyard: needs Node\.js 22\.19 or later .*this is Node\.js \d+\.\d+\.\d+/)
  })

  it(`no command loads a bundle chunk over ${MaxStartupChunkBytes / 1024} KB at start-up`, () => {
    const cli = path.join(installed.packageDir, "dist/cli")
    const imports = (file: string, pattern: RegExp) =>
      [...fs.readFileSync(file, "utf8").matchAll(pattern)].map((m) => path.resolve(path.dirname(file), m[1]!))
    const closure = (file: string, seen: Set<string>): Set<string> => {
      if (seen.has(file)) return seen
      seen.add(file)
      for (const next of imports(file, StaticImport)) closure(next, seen)
      return seen
    }
    const entry = path.join(cli, "switchyard.mjs")
    const commands = imports(entry, DynamicImport)
    assert.isAtLeast(commands.length, 7, "one chunk per subcommand")
    for (const command of commands) {
      for (const file of closure(command, closure(entry, new Set()))) {
        assert.isAtMost(fs.statSync(file).size, MaxStartupChunkBytes, `${path.basename(command)} loads ${path.relative(cli, file)}`)
      }
    }
  })

  it("starts every long-running command, each answering /healthz, and stops each with exit 0", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-installed-"))
    try {
      const commands = await startEveryCommand(installed.bin, dir)
      try {
        assert.deepStrictEqual(commands.map((c) => c.command), ["server", "client", "socket-proxy", "wsp-server", "wsp-client"])
        for (const c of commands) assert.strictEqual((await get(c.adminPort, "/healthz")).status, 200, `${c.command}:\n${c.output()}`)
      } finally {
        const codes = []
        for (const c of [...commands].reverse()) codes.push(await c.stop())
        assert.deepStrictEqual(codes, [0, 0, 0, 0, 0])
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true })
    }
  }, 120_000)

  it("a gateway that obtains certificates loads its ACME library from the bundle", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-installed-acme-"))
    try {
      // nothing answers at the directory: the gateway starts, and orders only when a route asks for it
      const server = await startCommand(installed.bin, "server", [
        "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--acme-directory", "https://127.0.0.1:1/dir", "--acme-email", "ops@example.com",
        "--set", `acme.storage_dir=${path.join(dir, "acme")}`
      ], { SWITCHYARD_TOKEN: "installed-acme-token" })
      try {
        assert.strictEqual((await get(server.adminPort, "/healthz")).status, 200, server.output())
        assert.notInclude(server.output(), "switchyard failed")
      } finally {
        assert.strictEqual(await server.stop(), 0, server.output())
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true })
    }
  }, 120_000)

  it("a gateway in a cluster loads its Redis client from the bundle", async () => {
    // no Redis answers there: the gateway starts, serves its own routes and says the store is unreachable
    const relay = await freePort()
    const server = await startCommand(installed.bin, "server", [
      "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0",
      "--cluster-redis", "redis://127.0.0.1:1", "--cluster-node", "installed", "--cluster-advertise", `127.0.0.1:${relay}`
    ], { SWITCHYARD_TOKEN: "installed-cluster-token", SWITCHYARD_CLUSTER_SECRET: "installed-cluster-secret-1" })
    try {
      assert.strictEqual((await get(server.adminPort, "/healthz")).status, 200, server.output())
      const status = JSON.parse((await get(server.adminPort, "/status")).body)
      assert.strictEqual(status.cluster.node, "installed", server.output())
      assert.notInclude(server.output(), "switchyard failed")
    } finally {
      assert.strictEqual(await server.stop(), 0, server.output())
    }
  }, 120_000)
})
