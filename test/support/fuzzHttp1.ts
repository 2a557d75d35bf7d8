/**
 * `npm run fuzz [-- --count N] [-- --seed S]`: checks N generated request messages (default 1,000,000)
 * against llhttp (see `http1Differential.ts`), prints how many it checked and how each side refused, and
 * exits non-zero with the first failing messages if switchyard accepted what llhttp refused or framed a
 * message differently.
 */
import { corpus } from "./httpCorpus.ts"
import { checkBatch, emptyTally, escaped } from "./http1Differential.ts"
import { makeOracle } from "./llhttpOracle.ts"

const DEFAULT_COUNT = 1_000_000
const DEFAULT_SEED = 1
/** Messages handed to llhttp at once (each on its own in-memory connection). */
const BATCH_SIZE = 512
/** Every how many messages a progress line is printed. */
const PROGRESS_EVERY = 100_000
/** Reasons printed for refusals llhttp did not share. */
const REASONS_SHOWN = 12
/** Failing messages printed. */
const FAILURES_SHOWN = 10

const option = (name: string, fallback: number): number => {
  const i = process.argv.indexOf(`--${name}`)
  if (i === -1) return fallback
  const value = Number(process.argv[i + 1])
  if (!Number.isSafeInteger(value) || value < 0) {
    process.stderr.write(`--${name} needs a non-negative integer\n`)
    process.exit(2)
  }
  return value
}

const count = option("count", DEFAULT_COUNT)
const seed = option("seed", DEFAULT_SEED)
const oracle = makeOracle()
const tally = emptyTally()
const started = performance.now()
let nextProgress = PROGRESS_EVERY
for (const batch of corpus(seed, count, BATCH_SIZE)) {
  await checkBatch(oracle, batch, tally)
  if (tally.checked >= nextProgress) {
    process.stdout.write(`fuzz.http1.progress: ${tally.checked} messages, ${((performance.now() - started) / 1000).toFixed(1)} s\n`)
    nextProgress += PROGRESS_EVERY
  }
}
oracle.close()
const seconds = (performance.now() - started) / 1000
const failed = tally.failures.length
process.stdout.write(
  [
    `fuzz.http1.checked: ${tally.checked} messages (seed ${seed}, ${seconds.toFixed(1)} s, ${Math.round(tally.checked / seconds)} messages/s)`,
    `fuzz.http1.bothAccepted: ${tally.bothAccepted}`,
    `fuzz.http1.switchyardRejected: ${tally.switchyardStricter + tally.bothRejected} (${tally.switchyardStricter} of them accepted by llhttp)`,
    `fuzz.http1.llhttpRejected: ${tally.bothRejected + tally.extensionMethods} (${tally.extensionMethods} of them extension methods switchyard forwards)`,
    `fuzz.http1.h2cDeclined: ${tally.h2cDeclined} (h2c upgrades forwarded as plain requests, head compared)`,
    `fuzz.http1.incremental: ${tally.incrementalChecked} messages also fed 1 and 7 bytes at a time`,
    `fuzz.http1.failures: ${failed}${failed >= 20 ? " or more" : ""}`,
    ""
  ].join("\n")
)
const reasons = [...tally.stricterBy].sort((a, b) => b[1] - a[1]).slice(0, REASONS_SHOWN)
for (const [why, n] of reasons) process.stdout.write(`fuzz.http1.switchyardOnlyRejected: ${n} ${why}\n`)
for (const f of tally.failures.slice(0, FAILURES_SHOWN)) process.stdout.write(`FAIL ${f.why}\n  ${escaped(f.input)}\n`)
process.exit(failed > 0 ? 1 : 0)
