/**
 * `switchyard status`: asks a running switchyard's admin endpoint for its `/status` document and prints
 * listeners, sessions, routes with their backends, and recent errors as tables. Read-only; it changes
 * nothing and needs no token (the admin endpoint is on loopback or a private network).
 */
import { Buffer } from "node:buffer"
import * as http from "node:http"
import { Console, Data, Effect, Runtime, Schema } from "effect"
import { Command, Flag } from "effect/cli"
import { DefaultAdminAddress, type StatusDocument } from "../Admin.ts"
import { AddressError, formatHostPort, parseHostPort } from "../NetAddress.ts"

/** Time allowed for the admin endpoint to answer. */
export const StatusTimeoutMs = 5_000
/** Largest status document read (bytes). */
export const MaxStatusBytes = 4 * 1024 * 1024

/** Exit code when the admin endpoint cannot be reached or answers badly (sysexits' EX_UNAVAILABLE). */
export const UnavailableExitCode = 69

export class StatusError extends Schema.TaggedError<StatusError>()("StatusError", {
  reason: Schema.Literals(["Unreachable", "BadAnswer"]),
  message: Schema.String
}) {}

/** The status could not be read; the reason was already printed as one line. */
export class StatusUnavailable extends Data.TaggedError("StatusUnavailable")<{ readonly message: string }> {
  override readonly [Runtime.errorReported] = false
  override readonly [Runtime.errorExitCode] = UnavailableExitCode
}

/**
 * Fetches a JSON document from the admin endpoint at `host:port`; `accept` lists the statuses whose
 * body is the document (the route test answers a URL it cannot read with 400 and a JSON `error`).
 */
export const fetchAdminJson = <A>(
  address: { host: string; port: number },
  path: string,
  accept: ReadonlyArray<number> = [200]
): Effect.Effect<A, StatusError> =>
  Effect.callback<A, StatusError>((resume) => {
    const where = `${address.host}:${address.port}`
    const req = http.get({ host: address.host, port: address.port, path, agent: false, timeout: StatusTimeoutMs }, (res) => {
      const chunks: Array<Buffer> = []
      let size = 0
      res.on("data", (c: Buffer) => {
        size += c.length
        if (size > MaxStatusBytes) {
          res.destroy()
          resume(Effect.fail(new StatusError({ reason: "BadAnswer", message: `${where}: answer to ${path} larger than ${MaxStatusBytes} bytes` })))
        } else chunks.push(c)
      })
      res.on("end", () => {
        const pathOnly = path.split("?")[0]
        if (!accept.includes(res.statusCode ?? 0)) {
          return resume(Effect.fail(new StatusError({ reason: "BadAnswer", message: `${where}${pathOnly} answered ${res.statusCode}` })))
        }
        try {
          resume(Effect.succeed(JSON.parse(Buffer.concat(chunks).toString("utf8")) as A))
        } catch (e) {
          resume(Effect.fail(new StatusError({ reason: "BadAnswer", message: `${where}${pathOnly}: not JSON: ${(e as Error).message}` })))
        }
      })
      res.on("error", (e) => resume(Effect.fail(new StatusError({ reason: "Unreachable", message: `${where}: ${e.message}` }))))
    })
    req.on("timeout", () => req.destroy(new Error(`no answer within ${StatusTimeoutMs} ms`)))
    req.on("error", (e) => resume(Effect.fail(new StatusError({ reason: "Unreachable", message: `${where}: ${e.message}` }))))
    return Effect.sync(() => req.destroy())
  })

/** Fetches `/status` from the admin endpoint at `host:port`. */
export const fetchStatus = (address: { host: string; port: number }): Effect.Effect<StatusDocument, StatusError> =>
  fetchAdminJson<StatusDocument>(address, "/status")

/** Lays out rows as a left-aligned text table with a header. */
export const table = (header: ReadonlyArray<string>, rows: ReadonlyArray<ReadonlyArray<string>>): string => {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)))
  const line = (cells: ReadonlyArray<string>) => cells.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd()
  return [line(header), line(widths.map((w) => "-".repeat(w))), ...rows.map(line)].join("\n")
}

/** The status document as text tables. */
export const renderStatus = (status: StatusDocument): string =>
  [
    `switchyard ${status.command} ${status.version}, up since ${status.startedAt}, ${status.ready ? "ready" : "NOT READY"}`,
    "",
    table(["LISTENER", "ADDRESS"], status.listeners.map((l) => [l.name, l.address])),
    "",
    table(["FRONT DOOR", "SESSIONS", "DRAINING"], status.sessions.map((s) => [s.frontDoor, String(s.count), s.draining === undefined ? "-" : String(s.draining)])),
    "",
    ...(status.gateways === undefined ? [] : [
      table(
        ["GATEWAY", "STATE", "SINCE", "ATTEMPTS", "LAST ERROR"],
        status.gateways.map((g) => [g.gateway, g.state, g.since, String(g.attempts), g.lastError ?? "-"])
      ),
      ""
    ]),
    ...(status.certificates === undefined || status.certificates.length === 0 ? [] : [
      table(
        ["CERTIFICATE", "STATE", "SOURCE", "EXPIRES", "DAYS LEFT", "FAILURES", "NEXT ORDER", "LAST ERROR"],
        status.certificates.map((c) => [
          c.name,
          c.unusedSince === undefined ? c.state : `${c.state} since ${c.unusedSince}`,
          c.source ?? "-",
          c.notAfter ?? "-",
          c.daysLeft === undefined ? "-" : String(c.daysLeft),
          String(c.failures),
          c.nextAttempt ?? "-",
          c.lastError ?? "-"
        ])
      ),
      ""
    ]),
    status.routes.length === 0
      ? "no routes"
      : status.routes.some((r) => r.state !== undefined)
      ? table(
        ["ROUTE", "BACKENDS", "IN FLIGHT", "STATE"],
        status.routes.map((r) => [r.route, r.backends.length === 0 ? "(none)" : r.backends.join(", "), String(r.inFlight), r.state ?? "-"])
      )
      : table(["ROUTE", "BACKENDS", "IN FLIGHT"], status.routes.map((r) => [r.route, r.backends.length === 0 ? "(none)" : r.backends.join(", "), String(r.inFlight)])),
    "",
    status.recentErrors.length === 0 ? "no recent errors" : table(["AT", "ERROR"], status.recentErrors.map((e) => [e.at, e.message]))
  ].join("\n")

const admin = Flag.String("admin").pipe(
  Flag.withDescription("Admin endpoint of the running switchyard: host:port or http://host:port as its banner prints it (default: the gateway's, 127.0.0.1:7090)"),
  Flag.withDefault(formatHostPort(DefaultAdminAddress))
)

/** The admin address as given: `host:port`, or `http://host:port[/]` as the banners print it. */
export const parseAdminAddress = (text: string) => parseHostPort(text.replace(/^http:\/\//i, "").replace(/\/+$/, ""))
const json = Flag.Boolean("json").pipe(Flag.withDescription("Print the raw JSON document"), Flag.withDefault(false))

export const statusCommand = Command.make("status", { admin, json }, Effect.fn(function*(f) {
  const address = parseAdminAddress(f.admin)
  if (address instanceof Error) return yield* new AddressError({ reason: "Malformed", message: `--admin: ${address.message}` })
  const status = yield* fetchStatus(address).pipe(
    Effect.catch((e) =>
      Console.error(`switchyard status: ${e.message} (is switchyard running with its admin endpoint there? see --admin)`).pipe(
        Effect.andThen(Effect.fail(new StatusUnavailable({ message: e.message })))
      )
    )
  )
  yield* Console.log(f.json ? JSON.stringify(status, null, 2) : renderStatus(status))
})).pipe(Command.withDescription("Show a running switchyard's listeners, sessions, routes and recent errors"))
