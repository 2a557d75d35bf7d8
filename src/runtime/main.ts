/**
 * Process entry point: runs the command line with Node's services and exits when the command ends.
 * SIGINT and SIGTERM interrupt the running command, which closes every scope it opened (drains), then
 * exits 0. Every failure is reported once, as one log entry or (an ordinary mistake) one line on stderr.
 */
// Deep imports: the package index also loads its HTTP client stack (undici), about 40 MB of resident memory.
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import * as NodeServices from "@effect/platform-node/NodeServices"
import { Cause, Effect, Runtime } from "effect"
import { runCli } from "./cli.ts"
import { teardown } from "./Lifecycle.ts"
import * as Logging from "./Logging.ts"

/** An unexpected failure, logged as one entry through the command's logger (ordinary mistakes were already printed as one line). */
const reportFailure = (cause: Cause.Cause<unknown>) =>
  Cause.hasInterruptsOnly(cause) || !Runtime.getErrorReported(Cause.squash(cause)) ? Effect.void : Effect.logError("switchyard failed", cause)

runCli.pipe(
  Effect.tapCause(reportFailure),
  Effect.provide(Logging.layerFromEnv()),
  Effect.provide(NodeServices.layer),
  NodeRuntime.runMain({ teardown, disableErrorReporting: true })
)
