/**
 * Keeps a flood of identical warnings (an attacker can cause thousands a second) to a few log lines: the
 * first of each kind is logged, then at most one per interval, saying how many were left out in between.
 * Pure: the caller passes the time and writes the line.
 */

/** Default time between two lines of one kind (ms). */
export const DefaultLogSampleIntervalMs = 10_000

export class LogSampler {
  readonly intervalMs: number
  private readonly last = new Map<string, { at: number; suppressed: number }>()

  constructor(intervalMs: number = DefaultLogSampleIntervalMs) {
    this.intervalMs = intervalMs
  }

  /**
   * Whether a line of `kind` is due at `now`: `undefined` when it is to be left out, else how many of the
   * kind were left out since the last line.
   */
  take(kind: string, now: number): number | undefined {
    const seen = this.last.get(kind)
    if (seen !== undefined && now - seen.at < this.intervalMs) {
      seen.suppressed++
      return undefined
    }
    const suppressed = seen?.suppressed ?? 0
    this.last.set(kind, { at: now, suppressed: 0 })
    return suppressed
  }
}

/**
 * A writer of one kind of sampled line: passes `line` to `emit` unless one went out less than
 * `intervalMs` ago, adding how many were left out since the previous one.
 */
export const sampledLines = (intervalMs: number, emit: (line: string) => void, now: () => number = Date.now): (line: string) => void => {
  const sampler = new LogSampler(intervalMs)
  return (line) => {
    const skipped = sampler.take("", now())
    if (skipped === undefined) return
    emit(skipped === 0 ? line : `${line} (${skipped} more like it since the previous line)`)
  }
}
