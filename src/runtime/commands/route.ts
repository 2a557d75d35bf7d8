/**
 * `switchyard route test URL`: asks a running gateway's admin endpoint (`/route?url=…`) which route of
 * its live routing table the URL reaches, the path the backend would read, who owns the route and which
 * backends would serve it, and prints that. Read-only: nothing is sent to a backend.
 */
import { Console, Data, Effect, Runtime } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import { DefaultAdminAddress } from "../Admin.ts"
import { AddressError, formatHostPort } from "../NetAddress.ts"
import type { RouteTestAnswer, RouteTestRefusal } from "../server/RouteTest.ts"
import { fetchAdminJson, parseAdminAddress, StatusUnavailable, table } from "./status.ts"

/** Exit code when no route serves the URL (or the gateway cannot test it). */
export const NoRouteExitCode = 1

/** No route serves the URL; the answer was already printed. */
class NoRoute extends Data.TaggedError("NoRoute")<{ readonly message: string }> {
  override readonly [Runtime.errorReported] = false
  override readonly [Runtime.errorExitCode] = NoRouteExitCode
}

/** A route test's answer as text: the route, the forwarded path, the owner, the backends, the verdict. */
export const renderRouteTest = (answer: RouteTestAnswer): string => {
  const rows: Array<[string, string]> = [["URL", answer.url]]
  if (answer.route === null) {
    rows.push(["ROUTE", "(none)"])
  } else {
    rows.push(["ROUTE", answer.description ?? answer.route])
    if (answer.forwardedPath !== undefined) rows.push(["FORWARDED AS", answer.forwardedPath])
    if (answer.owner !== undefined) rows.push(["OWNER", `token ${answer.owner}`])
  }
  rows.push(["VERDICT", answer.verdict])
  const width = Math.max(...rows.map(([k]) => k.length))
  const head = rows.map(([k, v]) => `${k.padEnd(width)}  ${v}`).join("\n")
  if (answer.route === null) return head
  const backends = answer.backends.length === 0
    ? "no backends"
    : table(["BACKEND", "IN FLIGHT", "STATE"], answer.backends.map((b) => [b.backend, String(b.inFlight), b.draining ? "draining" : "live"]))
  return `${head}\n\n${backends}`
}

const admin = Flag.String("admin").pipe(
  Flag.withDescription("Admin endpoint of the running gateway: host:port or http://host:port as its banner prints it (default 127.0.0.1:7090)"),
  Flag.withDefault(formatHostPort(DefaultAdminAddress))
)
const json = Flag.Boolean("json").pipe(Flag.withDescription("Print the raw JSON answer"), Flag.withDefault(false))
const url = Argument.String("url").pipe(
  Argument.withDescription("Public URL to test: http://host[:port]/path, https://… (TLS routes, by server name), ws://, wss://, or tcp://host:port")
)

const testCommand = Command.make("test", { url, admin, json }, Effect.fn(function*(f) {
  const address = parseAdminAddress(f.admin)
  if (address instanceof Error) return yield* new AddressError({ reason: "Malformed", message: `--admin: ${address.message}` })
  const answer = yield* fetchAdminJson<RouteTestAnswer | RouteTestRefusal>(address, `/route?url=${encodeURIComponent(f.url)}`, [200, 400]).pipe(
    Effect.catch((e) =>
      Console.error(
        `switchyard route test: ${e.message} (is a switchyard gateway running with its admin endpoint there? see --admin; ` +
          `only the gateway's admin endpoint answers route tests)`
      ).pipe(Effect.andThen(Effect.fail(new StatusUnavailable({ message: e.message }))))
    )
  )
  if ("error" in answer) {
    yield* Console.error(`switchyard route test: ${answer.error}`)
    return yield* new NoRoute({ message: answer.error })
  }
  yield* Console.log(f.json ? JSON.stringify(answer, null, 2) : renderRouteTest(answer))
  if (answer.route === null) return yield* new NoRoute({ message: answer.verdict })
})).pipe(Command.withDescription("Show which route and backends of a running gateway would serve a URL"))

export const routeCommand = Command.make("route").pipe(
  Command.withDescription("Inspect a running gateway's routes"),
  Command.withSubcommands([testCommand])
)
