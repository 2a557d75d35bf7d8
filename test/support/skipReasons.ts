/**
 * Why a test file skips tests, recorded from inside a test worker for the skip reporter
 * (`skipReporter.ts`), which prints them at the end of the run. Records nothing outside such a run.
 */
import * as fs from "node:fs"
import * as path from "node:path"

/** The environment variable naming the directory where reasons are written (set by the reporter). */
export const SkipReasonsVariable = "SWITCHYARD_TEST_SKIP_REASONS"

/** The test file that called, from the stack (the first frame under test/ outside test/support/). */
const callingTestFile = (): string | undefined => {
  for (const line of (new Error().stack ?? "").split("\n").slice(1)) {
    const m = /(?:file:\/\/)?(\/[^\s():]+\.test\.ts)/.exec(line)
    if (m !== null) return m[1]
  }
  return undefined
}

/** Records that the calling test file skips tests for `reason`. */
export const recordSkip = (reason: string): void => {
  const dir = process.env[SkipReasonsVariable]
  const testFile = callingTestFile()
  if (dir === undefined || testFile === undefined || !fs.existsSync(dir)) return
  fs.appendFileSync(path.join(dir, `${process.pid}.jsonl`), JSON.stringify({ testFile, reason: reason.split("\n")[0]!.slice(0, 300) }) + "\n")
}
