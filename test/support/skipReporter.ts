/**
 * A vitest reporter that ends a run with the tests it skipped and why: each skipped test by file, under the
 * reasons its file recorded (a missing peer, from `peers.ts`). Outside CI a missing peer skips its tests;
 * this makes that visible at the end of `npm test` instead of only as a count.
 */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import type { Reporter, TestModule } from "vitest/node"
import { SkipReasonsVariable } from "./skipReasons.ts"

export default class SkipReporter implements Reporter {
  private readonly dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-skips-"))

  onInit(): void {
    // test workers start after this and inherit the variable
    process.env[SkipReasonsVariable] = this.dir
  }

  onTestRunEnd(testModules: ReadonlyArray<TestModule>): void {
    const reasons = new Map<string, Set<string>>()
    for (const file of fs.readdirSync(this.dir)) {
      for (const line of fs.readFileSync(path.join(this.dir, file), "utf8").split("\n")) {
        if (line === "") continue
        const { testFile, reason } = JSON.parse(line) as { testFile: string; reason: string }
        reasons.set(testFile, (reasons.get(testFile) ?? new Set()).add(reason))
      }
    }
    fs.rmSync(this.dir, { recursive: true, force: true })
    const lines: Array<string> = []
    let count = 0
    for (const module of testModules) {
      const skipped = [...module.children.allTests()].filter((t) => t.result().state === "skipped")
      if (skipped.length === 0) continue
      count += skipped.length
      const relative = path.relative(process.cwd(), module.moduleId)
      const why = [...(reasons.get(module.moduleId) ?? [])]
      lines.push(`  ${relative}: ${skipped.length} skipped${why.length === 0 ? "" : ` (${why.join("; ")})`}`)
      for (const t of skipped) lines.push(`    - ${t.fullName}`)
    }
    if (count === 0) return
    process.stdout.write(`\n${count} test(s) skipped${process.env.CI === "true" ? "" : " (with CI=true a missing peer fails instead)"}:\n${lines.join("\n")}\n`)
  }
}
