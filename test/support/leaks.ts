/**
 * Open-handle checks: after a scope closes, no socket, server, timer or child process may be left.
 * Counts Node's active resources by kind before and after, and waits briefly for closes to settle.
 */
import { afterEach, beforeEach } from "@effect/vitest"
import { Effect, type Scope } from "effect"
import { setTimeout as sleep } from "node:timers/promises"

const watched = new Set([
  "TCPSocketWrap",
  "TCPServerWrap",
  "PipeWrap",
  "PipeServerWrap",
  "TLSWrap",
  "Timeout",
  "Immediate",
  "ProcessWrap",
  "UDPWrap",
  "Http2Session"
])

export type HandleCounts = Readonly<Record<string, number>>

/** Counts the currently active resources of the kinds that can leak. */
export const activeHandles = (): HandleCounts => {
  const counts: Record<string, number> = {}
  for (const kind of process.getActiveResourcesInfo()) {
    if (watched.has(kind)) counts[kind] = (counts[kind] ?? 0) + 1
  }
  return counts
}

const grown = (before: HandleCounts, after: HandleCounts): Record<string, number> => {
  const out: Record<string, number> = {}
  for (const [kind, n] of Object.entries(after)) {
    const extra = n - (before[kind] ?? 0)
    if (extra > 0) out[kind] = extra
  }
  return out
}

/**
 * Resolves once no more handles are open than in `before`, or rejects after `timeoutMs`
 * naming the kinds that are still open.
 */
export const expectNoLeaks = async (before: HandleCounts, timeoutMs = 2_000): Promise<void> => {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const extra = grown(before, activeHandles())
    // this function's own sleep timer is one Timeout
    if ((extra.Timeout ?? 0) <= 1) delete extra.Timeout
    if (Object.keys(extra).length === 0) return
    if (Date.now() > deadline) throw new Error(`handles left open: ${JSON.stringify(extra)}`)
    await sleep(20)
  }
}

/**
 * For suites that start processes and servers by hand: hooks that, after each test, run the cleanups it
 * pushed (last first, failures ignored) and then check that nothing it opened is left. Returns the list
 * to push onto.
 */
export const cleanupsPerTest = (settleMs = 5_000): Array<() => Promise<unknown>> => {
  const cleanups: Array<() => Promise<unknown>> = []
  let before: HandleCounts = {}
  beforeEach(() => {
    before = activeHandles()
  })
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined)
    await expectNoLeaks(before, settleMs)
  })
  return cleanups
}

/** Runs `body` in its own scope, then checks that closing it left no handle open. */
export const noLeaks = <A, E>(body: Effect.Effect<A, E, Scope.Scope>): Effect.Effect<A, E> =>
  Effect.gen(function*() {
    const before = activeHandles()
    const result = yield* Effect.scoped(body)
    yield* Effect.promise(() => expectNoLeaks(before))
    return result
  })
