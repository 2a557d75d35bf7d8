/**
 * Makes client-limit refusals visible: each is counted by limit, and logged at most once per
 * `CLIENT_LIMIT_LOG_INTERVAL_MS` per limit (a line stands for those suppressed since the one before), so
 * a flood of refusals cannot flood the log. It does not refuse anything (the engine does).
 */
import { performance } from "node:perf_hooks"
import {
  CLIENT_LIMIT_KINDS,
  CLIENT_LIMIT_LOG_INTERVAL_MS,
  type ClientLimitKind,
  clientLimitLogLine
} from "../../domain/ClientLimits.ts"
import { LogSampler } from "../../domain/LogSampler.ts"
import type { ClientLimitEvent } from "./http1/Admission.ts"

export interface ClientLimitReporter {
  /** Give to `Http1Front.onClientLimit`. */
  readonly onClientLimit: (event: ClientLimitEvent) => void
  /** Refusals so far, by limit. */
  readonly counts: () => Readonly<Record<ClientLimitKind, number>>
}

/** Counts refusals and writes sampled lines with `log` (a warning, in the front doors). */
export const makeClientLimitReporter = (log: (line: string) => void): ClientLimitReporter => {
  const counts = Object.fromEntries(CLIENT_LIMIT_KINDS.map((k) => [k, 0])) as Record<ClientLimitKind, number>
  const sampler = new LogSampler(CLIENT_LIMIT_LOG_INTERVAL_MS)
  return {
    onClientLimit: (event) => {
      counts[event.limit]++
      const skipped = sampler.take(event.limit, performance.now())
      if (skipped !== undefined) log(clientLimitLogLine(event.limit, event.client, event.method, event.target, skipped + 1))
    },
    counts: () => ({ ...counts })
  }
}
