/**
 * Rate-limited log lines for failures that can come in floods: the first is written at once, then at
 * most one per interval, saying how many were left out since the previous one. Counting every failure
 * is the metrics' job; this only keeps the log readable. It queues and keeps no messages.
 */

/** Returns a function that passes `line` to `emit` unless one went out less than `intervalMs` ago. */
export const makeLogSampler = (intervalMs: number, emit: (line: string) => void, now: () => number = Date.now): (line: string) => void => {
  let last = -Infinity
  let skipped = 0
  return (line) => {
    const t = now()
    if (t - last < intervalMs) {
      skipped++
      return
    }
    last = t
    emit(skipped === 0 ? line : `${line} (${skipped} more like it since the previous line)`)
    skipped = 0
  }
}
