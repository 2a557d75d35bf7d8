/**
 * Process signals. SIGTERM and SIGINT interrupt the running command (Node's runtime does that); its
 * scopes close, which drains every front door, and `teardown` then exits 0 because stopping on a signal
 * is the normal end of a service. SIGHUP runs a reload effect, one at a time. It does not decide what a
 * reload changes: each command passes its own.
 */
import { Cause, Effect, Exit, Runtime } from "effect"
import type { Scope } from "effect"

/** Exit code on a configuration error (sysexits' EX_CONFIG). */
export const ConfigErrorExitCode = 78

/**
 * The process teardown: an interruption alone (a SIGTERM/SIGINT drain that completed) exits 0; any
 * other end follows Effect's default rules (failures exit 1 or their own code).
 */
export const teardown: Runtime.Teardown = (exit, onExit) => {
  if (Exit.isFailure(exit) && Cause.hasInterruptsOnly(exit.cause)) return onExit(0)
  return Runtime.defaultTeardown(exit, onExit)
}

/**
 * Runs `reload` on every SIGHUP until the scope closes. A SIGHUP arriving while a reload runs is
 * coalesced into one more run after it. Failures are the reload's to log; they never stop the process.
 */
export const onHangup = <E>(reload: Effect.Effect<void, E>): Effect.Effect<void, never, Scope.Scope> =>
  Effect.gen(function*() {
    const services = yield* Effect.context<never>()
    const runFork = Effect.runForkWith(services)
    let running = false
    let again = false
    const start = (): void => {
      running = true
      runFork(Effect.ignore(reload)).addObserver(() => {
        running = false
        if (again) {
          again = false
          start()
        }
      })
    }
    const onSignal = () => {
      if (running) again = true
      else start()
    }
    yield* Effect.acquireRelease(
      Effect.sync(() => process.on("SIGHUP", onSignal)),
      () => Effect.sync(() => process.off("SIGHUP", onSignal))
    )
  })
