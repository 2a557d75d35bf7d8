/**
 * The deployment files shipped in the repository: the systemd unit passes `systemd-analyze verify` without a
 * warning (its command path pointed at this checkout's `bin/switchyard.js`, the file `npm install -g` links
 * as /usr/local/bin/switchyard), and the Dockerfile is read instruction by instruction: every instruction
 * is a Dockerfile instruction, what it copies from the build context exists, and the image runs the
 * globally installed package. Building the image needs a registry to pull `node:24-slim` from, which the
 * tests do not use.
 */
import { assert, describe, it } from "@effect/vitest"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { inCI } from "../support/peers.ts"

const root = path.resolve(import.meta.dirname, "../..")
const packageName = (JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8")) as { name: string }).name
const unitFile = path.join(root, "packaging/systemd/switchyard-server.service")
const InstalledCommand = "/usr/local/bin/switchyard"
const systemdAnalyze = spawnSync("systemd-analyze", ["--version"], { encoding: "utf8" }).status === 0

describe("packaging/systemd/switchyard-server.service", () => {
  it.skipIf(!systemdAnalyze && !inCI)("passes systemd-analyze verify without a warning (needs systemd-analyze, Debian's systemd)", () => {
    assert.isTrue(systemdAnalyze, "systemd-analyze not on PATH (apt-get install systemd)")
    const unit = fs.readFileSync(unitFile, "utf8")
    assert.include(unit, `ExecStart=${InstalledCommand} server`)
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-unit-"))
    try {
      const copy = path.join(dir, path.basename(unitFile))
      fs.writeFileSync(copy, unit.replaceAll(InstalledCommand, path.join(root, "bin/switchyard.js")))
      const run = spawnSync("systemd-analyze", ["verify", copy], { encoding: "utf8", timeout: 60_000 })
      assert.strictEqual(run.status, 0, run.stderr)
      assert.strictEqual(run.stderr.trim(), "", "systemd-analyze printed warnings")
    } finally {
      fs.rmSync(dir, { recursive: true, force: true })
    }
  })
})

/** Dockerfile instructions (https://docs.docker.com/reference/dockerfile/). */
const Instructions = new Set([
  "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL", "MAINTAINER", "ONBUILD",
  "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"
])

/** The Dockerfile's instructions, continuation lines joined, comments dropped. */
const instructionsOf = (text: string): Array<{ readonly keyword: string; readonly args: string }> => {
  const out: Array<{ keyword: string; args: string }> = []
  let pending = ""
  for (const line of text.split("\n")) {
    if (pending === "" && (line.trim() === "" || line.trimStart().startsWith("#"))) continue
    if (line.trimStart().startsWith("#")) continue
    pending += line.endsWith("\\") ? line.slice(0, -1) + " " : line
    if (line.endsWith("\\")) continue
    const m = /^\s*(\S+)\s+(.*)$/.exec(pending)
    assert.isNotNull(m, `not an instruction: ${pending}`)
    out.push({ keyword: m![1]!, args: m![2]!.trim() })
    pending = ""
  }
  assert.strictEqual(pending, "", "the Dockerfile ends inside a continued instruction")
  return out
}

describe("Dockerfile", () => {
  const instructions = instructionsOf(fs.readFileSync(path.join(root, "Dockerfile"), "utf8"))

  it("holds only Dockerfile instructions, in upper case, starting with FROM", () => {
    for (const i of instructions) assert.isTrue(Instructions.has(i.keyword), `unknown instruction ${i.keyword}`)
    assert.strictEqual(instructions[0]!.keyword, "FROM")
  })

  it("copies only what the build context has, and not what .dockerignore leaves out", () => {
    const ignored = fs.readFileSync(path.join(root, ".dockerignore"), "utf8").split("\n").filter((l) => l !== "" && !l.startsWith("#"))
    for (const i of instructions.filter((i) => i.keyword === "COPY" && !i.args.startsWith("--from"))) {
      const sources = i.args.split(/\s+/).slice(0, -1)
      for (const source of sources) {
        if (source === ".") continue
        assert.isTrue(fs.existsSync(path.join(root, source)), `COPY ${source}: not in the repository`)
        assert.notInclude(ignored, source, `COPY ${source}: excluded by .dockerignore`)
      }
    }
    assert.includeMembers(ignored, ["node_modules", "dist"])
  })

  it("installs the packed package globally and runs its command", () => {
    const stages = instructions.filter((i) => i.keyword === "FROM")
    assert.isTrue(stages.every((s) => /^node:(2[4-9]|[3-9]\d)/.test(s.args)), "a Node 24 (or later) image")
    assert.isTrue(instructions.some((i) => i.keyword === "RUN" && i.args.includes("npm pack")))
    assert.isTrue(instructions.some((i) => i.keyword === "RUN" && i.args.includes(`npm install --global`) && i.args.includes(`${packageName}-*.tgz`)))
    const entrypoint = instructions.filter((i) => i.keyword === "ENTRYPOINT").pop()
    assert.deepStrictEqual(JSON.parse(entrypoint!.args), ["switchyard"])
    assert.strictEqual(instructions.filter((i) => i.keyword === "USER").pop()?.args, "node")
  })
})
