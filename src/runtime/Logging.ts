/**
 * Structured logs for every command: one line per entry on stderr, logfmt or JSON, in one flat schema
 * (`timestamp`, `level`, `message`, then each log annotation such as `component` as its own key, and
 * `error` for a failure's cause), filtered by level; the `--log-format` and `--log-level` flags win over
 * `SWITCHYARD_LOG_...` and the config files;
 * an optional access log (one line per proxied request); and `X-Request-Id` handling (kept when a
 * client sent a sane one, generated otherwise, forwarded through the tunnel to the backend).
 * It never formats secrets: `Redacted` values print as `<redacted>`, and it logs no header but the id.
 */
import { randomUUID } from "node:crypto"
import type * as http from "node:http"
import { Cause, Context, Effect, Layer, Logger, Option, References } from "effect"
import type { LogLevel } from "effect"
import { Flag, GlobalFlag } from "effect/cli"

/** Longest `X-Request-Id` kept from a client; a longer or odd one is replaced. */
export const MaxRequestIdLength = 128
/** Header carrying the request id to backends and back to clients. */
export const RequestIdHeader = "x-request-id"

const SaneRequestId = /^[A-Za-z0-9._:@/+=-]+$/

export type LogFormat = "logfmt" | "json"
export type LogLevelName = "trace" | "debug" | "info" | "warn" | "error" | "none"

export interface LoggingConfig {
  readonly format?: LogFormat | undefined
  readonly level?: LogLevelName | undefined
  readonly accessLog?: boolean | undefined
}

/** Where log lines go (stderr by default; tests pass their own). */
export type LineSink = (line: string) => void

const stderrSink: LineSink = (line) => void process.stderr.write(line + "\n")

const levels: Record<LogLevelName, LogLevel.LogLevel> = {
  trace: "Trace",
  debug: "Debug",
  info: "Info",
  warn: "Warn",
  error: "Error",
  none: "None"
}

/** `--log-format`, accepted by every command (it wins over `SWITCHYARD_LOG_FORMAT` and the config files). */
export const LogFormatFlag: GlobalFlag.Setting<"log-format", Option.Option<LogFormat>> = GlobalFlag.Setting("log-format")({
  flag: Flag.ChoiceWithValue("log-format", [["logfmt", "logfmt"], ["json", "json"]] as const).pipe(
    Flag.optional,
    Flag.withDescription("Log line format, logfmt by default (wins over SWITCHYARD_LOG_FORMAT and log.format)"),
    Flag.withMetavar("<logfmt|json>")
  )
})

/** What `--log-format` and `--log-level` asked for; empty unless given. */
export const CommandLineLogging = Context.Reference<LoggingConfig>("switchyard/Logging/CommandLine", { defaultValue: () => ({}) })

const levelNames: Record<LogLevel.LogLevel, LogLevelName> = {
  All: "trace",
  Trace: "trace",
  Debug: "debug",
  Info: "info",
  Warn: "warn",
  Error: "error",
  Fatal: "error",
  None: "none"
}

const textOnly = /^[A-Za-z0-9._:/@+-]+$/

/** A value as logfmt writes it: bare when plain, else a JSON string (so a newline never splits a line). */
const logfmtValue = (v: string | number): string => {
  const s = String(v)
  return textOnly.test(s) ? s : JSON.stringify(s)
}

const textOf = (value: unknown): string => {
  if (typeof value === "string") return value
  if (typeof value === "number" || typeof value === "boolean" || typeof value === "bigint") return String(value)
  if (value instanceof Error) return value.message
  if (value === undefined) return "undefined"
  try {
    return JSON.stringify(value) ?? String(value)
  } catch {
    return String(value)
  }
}

/** One entry as flat fields: timestamp, level, message, the annotations, and `error` for a cause. */
export const entryFields = (options: Logger.Options<unknown>): Array<[string, string]> => {
  const messages = Array.isArray(options.message) ? options.message : [options.message]
  const fields: Array<[string, string]> = [
    ["timestamp", options.date.toISOString()],
    ["level", options.logLevel.toUpperCase()],
    ["message", messages.map(textOf).join(" ")]
  ]
  for (const [key, value] of Object.entries(options.fiber.getRef(References.CurrentLogAnnotations))) {
    if (key !== "timestamp" && key !== "level" && key !== "message") fields.push([key, textOf(value)])
  }
  // the whole cause (its stack included), escaped into the one line
  if (options.cause.reasons.length > 0) fields.push(["error", Cause.pretty(options.cause)])
  return fields
}

/** One entry as one line in `format`. */
export const formatEntry = (format: LogFormat, options: Logger.Options<unknown>): string => {
  const fields = entryFields(options)
  return format === "json"
    ? JSON.stringify(Object.fromEntries(fields))
    : fields.map(([k, v]) => `${k}=${logfmtValue(v)}`).join(" ")
}

/** The logger writing `format` lines to `sink`. */
export const makeLogger = (format: LogFormat, sink: LineSink = stderrSink): Logger.Logger<unknown, void> =>
  Logger.make((options) => sink(formatEntry(format, options)))

/** `config` with the command line's choices over it. */
const withCommandLine = (config: LoggingConfig, commandLine: LoggingConfig): LoggingConfig => ({
  ...config,
  format: commandLine.format ?? config.format,
  level: commandLine.level ?? config.level
})

/** Replaces the default logger and sets the minimum level (`--log-format` and `--log-level` win). */
export const layer = (config: LoggingConfig, sink?: LineSink): Layer.Layer<never> =>
  Layer.unwrap(Effect.map(Effect.service(CommandLineLogging), (commandLine: LoggingConfig) => {
    const chosen = withCommandLine(config, commandLine)
    return Layer.mergeAll(
      Logger.layer([makeLogger(chosen.format ?? "logfmt", sink)]),
      Layer.succeed(References.MinimumLogLevel, levels[chosen.level ?? "info"])
    )
  }))

/**
 * The logging layer every command starts with: logfmt at info, or what `SWITCHYARD_LOG_FORMAT` and
 * `SWITCHYARD_LOG_LEVEL` ask for (a command's own config file may set it again; a value that is not one
 * of the accepted ones is ignored here and named by the command's config check).
 */
export const layerFromEnv = (env: Readonly<Record<string, string | undefined>> = process.env): Layer.Layer<never> => layer(fromEnv(env))

/** The settings `SWITCHYARD_LOG_FORMAT` and `SWITCHYARD_LOG_LEVEL` ask for (an odd value is left out). */
const fromEnv = (env: Readonly<Record<string, string | undefined>>): LoggingConfig => {
  const format = env["SWITCHYARD_LOG_FORMAT"]
  const level = env["SWITCHYARD_LOG_LEVEL"]
  const formatOk = format === "logfmt" || format === "json"
  const levelOk = level !== undefined && Object.hasOwn(levels, level)
  return { format: formatOk ? format : undefined, level: levelOk ? level as LogLevelName : undefined }
}

/**
 * Switches the running fiber (and the fibers it forks from now on) to `config`'s logger and level, the
 * command line's choices over it: for commands that learn their log settings from a file they read
 * after starting.
 */
export const useInThisFiber = (config: LoggingConfig, sink?: LineSink): Effect.Effect<void> =>
  Effect.withFiber((fiber) => {
    const chosen = withCommandLine(config, fiber.getRef(CommandLineLogging))
    const context = Context.add(fiber.context, Logger.CurrentLoggers, new Set([makeLogger(chosen.format ?? "logfmt", sink)]))
    fiber.setContext(Context.add(context, References.MinimumLogLevel, levels[chosen.level ?? "info"]))
    return Effect.void
  })

/**
 * Applies `--log-format` and `--log-level` to the running command `command` (run before its handler):
 * they are remembered for the config files read later, and the logger and level switch now. Every entry
 * the command logs carries `component=<command>` unless a part of it names itself.
 */
export const applyCommandLine = (command: string): Effect.Effect<void> =>
  Effect.gen(function*() {
    yield* Effect.withFiber((fiber) => {
      const annotations = fiber.getRef(References.CurrentLogAnnotations)
      fiber.setContext(Context.add(fiber.context, References.CurrentLogAnnotations, { component: command, ...annotations }))
      return Effect.void
    })
    const format = Option.flatten(yield* Effect.serviceOption(LogFormatFlag))
    const level = Option.flatten(yield* Effect.serviceOption(GlobalFlag.LogLevel))
    const commandLine: LoggingConfig = {
      format: Option.getOrUndefined(format),
      level: Option.getOrUndefined(Option.map(level, (l) => levelNames[l]))
    }
    if (commandLine.format === undefined && commandLine.level === undefined) return
    yield* Effect.withFiber((fiber) => {
      fiber.setContext(Context.add(fiber.context, CommandLineLogging, commandLine))
      return Effect.void
    })
    yield* useInThisFiber(fromEnv(process.env))
  })

/** The request's id: the client's `X-Request-Id` when sane, else a new one; set on the request headers. */
export const ensureRequestId = (req: http.IncomingMessage): string => {
  const given = req.headers[RequestIdHeader]
  const text = Array.isArray(given) ? given[0] : given
  if (text !== undefined && text.length > 0 && text.length <= MaxRequestIdLength && SaneRequestId.test(text)) return text
  const id = randomUUID()
  req.headers[RequestIdHeader] = id
  // the forwarder copies raw headers: drop a rejected id there and add the new one
  const raw = req.rawHeaders
  if (given !== undefined) {
    for (let i = raw.length - 2; i >= 0; i -= 2) {
      if (raw[i]!.toLowerCase() === RequestIdHeader) raw.splice(i, 2)
    }
  }
  raw.push("X-Request-Id", id)
  return id
}

/** One access-log entry. */
export interface AccessEntry {
  readonly frontDoor: string
  readonly method: string
  readonly path: string
  readonly route: string
  readonly status: number
  readonly receivedBytes: number
  readonly sentBytes: number
  readonly durationMs: number
  readonly requestId: string
  readonly peer: string
  /** In a cluster: the gateway whose backend served the request. */
  readonly node?: string | undefined
  /** In a cluster: whether the request crossed a relay link (relayed out from here, or in to here). */
  readonly relayed?: boolean | undefined
}

/** An access-log line in the configured format (path without its query string, which may hold secrets). */
export const formatAccess = (format: LogFormat, entry: AccessEntry, now: Date = new Date()): string => {
  const fields: Array<[string, string | number]> = [
    ["timestamp", now.toISOString()],
    ["level", "INFO"],
    ["log", "access"],
    ["front_door", entry.frontDoor],
    ["method", entry.method],
    ["path", entry.path.split("?")[0]!],
    ["route", entry.route],
    ["status", entry.status],
    ["received_bytes", entry.receivedBytes],
    ["sent_bytes", entry.sentBytes],
    ["duration_ms", Math.round(entry.durationMs * 1000) / 1000],
    ["request_id", entry.requestId],
    ["peer", entry.peer],
    ...(entry.node === undefined ? [] : [["node", entry.node] as [string, string]]),
    ...(entry.relayed === undefined ? [] : [["relayed", String(entry.relayed)] as [string, string]])
  ]
  if (format === "json") return JSON.stringify(Object.fromEntries(fields))
  return fields.map(([k, v]) => `${k}=${logfmtValue(v)}`).join(" ")
}

/** An access-log writer, or `undefined` when the access log is off. */
export const accessLogger = (config: LoggingConfig, sink: LineSink = stderrSink): ((entry: AccessEntry) => void) | undefined =>
  config.accessLog === true ? (entry) => sink(formatAccess(config.format ?? "logfmt", entry)) : undefined
