/**
 * Ordinary mistakes end a command with one line on stderr (`switchyard <command>: <reason>`) and an exit
 * status, never a stack trace: 78 (`EX_CONFIG`) for a configuration it refuses (a missing or invalid
 * file, a malformed address), 1 for an address it cannot bind (a port in use), which a supervisor may
 * retry. Any other failure is a bug and keeps its full report.
 */
import { Console, Data, Effect, Runtime } from "effect"
import { ConfigExitCode } from "./ConfigLoader.ts"

/** Exit status when a listener cannot be bound (a port in use). */
export const BindFailedExitCode = 1

/** The command ended on an ordinary mistake; its reason was already printed as one line. */
export class OrdinaryFailure extends Data.TaggedError("OrdinaryFailure")<{ readonly message: string; readonly exitCode: number }> {
  override readonly [Runtime.errorReported] = false
  override get [Runtime.errorExitCode](): number {
    return this.exitCode
  }
}

const configErrors = new Set(["WspConfigError", "ConfigError", "ConfigLoadError"])
const bindErrors = new Set(["SocketProxyError", "AdminError", "WspServerError"])

/** The exit status for an ordinary mistake, or `undefined` for any other failure. */
export const ordinaryExitCode = (error: unknown): number | undefined => {
  if (typeof error !== "object" || error === null || !("_tag" in error) || typeof (error as { message?: unknown }).message !== "string") return undefined
  const { _tag, reason } = error as { _tag: unknown; reason?: unknown }
  if (typeof _tag !== "string") return undefined
  if (configErrors.has(_tag)) return ConfigExitCode
  if (_tag === "AddressError") return reason === "BindFailed" ? BindFailedExitCode : ConfigExitCode
  if (_tag === "WspServerError") return reason === "ListenFailed" ? BindFailedExitCode : undefined
  if (bindErrors.has(_tag)) return BindFailedExitCode
  return undefined
}

/** Reports an ordinary mistake of `command` as one line and fails with its exit status; passes anything else on. */
export const reportOrdinary = (command: string) => (error: unknown): Effect.Effect<never, unknown> => {
  const exitCode = ordinaryExitCode(error)
  if (exitCode === undefined) return Effect.fail(error)
  // a parser's message may carry a code frame on further lines: the first one says what is wrong
  const message = (error as { message: string }).message.split("\n")[0]!.trimEnd()
  return Console.error(`switchyard ${command}: ${message}`).pipe(Effect.andThen(Effect.fail(new OrdinaryFailure({ message, exitCode }))))
}
