/**
 * Process entry point: runs the command line with Node's services and exits when the command ends.
 * SIGINT and SIGTERM interrupt the running command, which closes every scope it opened (drains), then
 * exits 0.
 */
// Deep imports: the package index also loads its HTTP client stack (undici), about 40 MB of resident memory.
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import * as NodeServices from "@effect/platform-node/NodeServices"
import { Effect } from "effect"
import { runCli } from "./cli.ts"
import { teardown } from "./Lifecycle.ts"
import * as Logging from "./Logging.ts"

runCli.pipe(Effect.provide(Logging.layerFromEnv()), Effect.provide(NodeServices.layer), NodeRuntime.runMain({ teardown }))
