/**
 * The `switchyard` command line: one subcommand per front door. Each subcommand lives in
 * `src/runtime/commands/` and is listed here; this module only assembles them. A subcommand's module is
 * loaded only when that subcommand runs, so a process holds the code of its own front door, not all of them.
 */
import { Effect, Stdio } from "effect"
import { Command } from "effect/cli"
import packageJson from "../../package.json" with { type: "json" }
import { reportOrdinary } from "./CommandErrors.ts"
import * as Logging from "./Logging.ts"

/** The version printed by `switchyard --version`. */
export const version: string = packageJson.version

/** Every subcommand by name, each loaded on demand. */
const SUBCOMMANDS = {
  server: () => import("./commands/server.ts").then((m) => Command.provideEffectDiscard(m.serverCommand, Logging.applyCommandLine("server"))),
  "socket-proxy": () => import("./commands/socketProxy.ts").then((m) => Command.provideEffectDiscard(m.socketProxyCommand, Logging.applyCommandLine("socket-proxy"))),
  "wsp-server": () => import("./commands/wspServer.ts").then((m) => Command.provideEffectDiscard(m.wspServerCommand, Logging.applyCommandLine("wsp-server"))),
  "wsp-client": () => import("./commands/wspClient.ts").then((m) => Command.provideEffectDiscard(m.wspClientCommand, Logging.applyCommandLine("wsp-client"))),
  client: () => import("./commands/client.ts").then((m) => Command.provideEffectDiscard(m.clientCommand, Logging.applyCommandLine("client"))),
  status: () => import("./commands/status.ts").then((m) => Command.provideEffectDiscard(m.statusCommand, Logging.applyCommandLine("status"))),
  route: () => import("./commands/route.ts").then((m) => Command.provideEffectDiscard(m.routeCommand, Logging.applyCommandLine("route")))
} as const

type SubcommandName = keyof typeof SUBCOMMANDS
type AnySubcommand = Awaited<ReturnType<(typeof SUBCOMMANDS)[SubcommandName]>>

const isSubcommand = (name: string | undefined): name is SubcommandName => name !== undefined && Object.hasOwn(SUBCOMMANDS, name)

/**
 * The root command over the given subcommands. `--log-format` and (Effect's built-in) `--log-level` are
 * global: every subcommand accepts them and applies them before it reads its configuration.
 */
const rootCommand = (subcommands: ReadonlyArray<AnySubcommand>) =>
  Command.make("switchyard").pipe(
    Command.withDescription("Reverse-tunnel gateway and reverse proxy"),
    Command.withSubcommands(subcommands),
    Command.withGlobalFlags([Logging.LogFormatFlag])
  )

/**
 * The root command for `args`: with only the named subcommand when the first operand names one, else
 * (help, version, a mistyped name) with every subcommand.
 */
const loadSwitchyard = (args: ReadonlyArray<string>): Effect.Effect<ReturnType<typeof rootCommand>> =>
  Effect.promise(async () => {
    const first = args.find((a) => !a.startsWith("-"))
    const names: ReadonlyArray<SubcommandName> = isSubcommand(first) ? [first] : Object.keys(SUBCOMMANDS) as Array<SubcommandName>
    return rootCommand(await Promise.all(names.map((name) => SUBCOMMANDS[name]())))
  })

/** Parses the process arguments and runs the chosen subcommand; an ordinary mistake ends it with one line. */
export const runCli: Effect.Effect<void, unknown, Command.Environment> = Effect.gen(function*() {
  const args = yield* (yield* Stdio.Stdio).args
  const switchyard = yield* loadSwitchyard(args)
  return yield* Command.run(switchyard, { version }).pipe(Effect.catch(reportOrdinary(args.find(isSubcommand) ?? "switchyard")))
})
