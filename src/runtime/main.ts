/**
 * Process entry point: runs the command line with Node's services and exits when the command ends.
 * SIGINT and SIGTERM interrupt the running command, which closes every scope it opened (drains), then
 * exits 0.
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node"
import { Effect } from "effect"
import { runCli } from "./cli.ts"
import { teardown } from "./Lifecycle.ts"
import * as Logging from "./Logging.ts"

runCli.pipe(Effect.provide(Logging.layerFromEnv()), Effect.provide(NodeServices.layer), NodeRuntime.runMain({ teardown }))
