/**
 * `switchyard server`: the gateway. Starts the admin endpoint and every front door that has been
 * configured, and runs until interrupted (SIGINT/SIGTERM close every scope it opened).
 */
import { Console, Effect } from "effect"
import { Command, Flag } from "effect/cli"
import { serveAdmin } from "../Admin.ts"
import { formatHostPort, parseHostPort } from "../NetAddress.ts"

const admin = Flag.String("admin").pipe(
  Flag.withDescription("Address of the admin endpoint (/healthz, /readyz)"),
  Flag.withDefault("127.0.0.1:9090")
)

export const serverCommand = Command.make("server", { admin }, Effect.fn(function*({ admin }) {
  const adminAddress = parseHostPort(admin)
  if (adminAddress instanceof Error) return yield* adminAddress
  const bound = yield* serveAdmin({ address: adminAddress, ready: () => true })
  yield* Console.log(`switchyard gateway running; admin endpoint on http://${formatHostPort(bound)} (/healthz, /readyz)`)
  return yield* Effect.never
}, Effect.scoped)).pipe(Command.withDescription("Run the gateway"))
