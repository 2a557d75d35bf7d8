/**
 * The `switchyard` command line: one subcommand per front door. Each subcommand lives in
 * `src/runtime/commands/` and is listed here; this module only assembles them.
 */
import { Command } from "effect/cli"
import packageJson from "../../package.json" with { type: "json" }
import { clientCommand } from "./commands/client.ts"
import { serverCommand } from "./commands/server.ts"
import { socketProxyCommand } from "./commands/socketProxy.ts"
import { wspClientCommand } from "./commands/wspClient.ts"
import { wspServerCommand } from "./commands/wspServer.ts"

/** The version printed by `switchyard --version`. */
export const version: string = packageJson.version

/** The root command, with every subcommand that exists. */
export const switchyard = Command.make("switchyard").pipe(
  Command.withDescription("Reverse-tunnel gateway and reverse proxy"),
  Command.withSubcommands([serverCommand, socketProxyCommand, wspServerCommand, wspClientCommand, clientCommand])
)

/** Parses `argv` (without the node and script entries) and runs the chosen subcommand. */
export const runCli = Command.run(switchyard, { version })
