/**
 * Structured logs for every command: one line per entry on stderr, logfmt or JSON, filtered by level;
 * an optional access log (one line per proxied request); and `X-Request-Id` handling (kept when a
 * client sent a sane one, generated otherwise, forwarded through the tunnel to the backend).
 * It never formats secrets: `Redacted` values print as `<redacted>`, and it logs no header but the id.
 */
import { randomUUID } from "node:crypto"
import type * as http from "node:http"
import { Context, Effect, Layer, Logger, References } from "effect"
import type { LogLevel } from "effect"

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

/** The logger writing `format` lines to `sink`. */
export const makeLogger = (format: LogFormat, sink: LineSink = stderrSink): Logger.Logger<unknown, void> => {
  const formatter = format === "json" ? Logger.formatJson : Logger.formatLogFmt
  return Logger.make((options) => sink(formatter.log(options)))
}

/** Replaces the default logger and sets the minimum level. */
export const layer = (config: LoggingConfig, sink?: LineSink): Layer.Layer<never> =>
  Layer.mergeAll(
    Logger.layer([makeLogger(config.format ?? "logfmt", sink)]),
    Layer.succeed(References.MinimumLogLevel, levels[config.level ?? "info"])
  )

/**
 * The logging layer the `SWITCHYARD_LOG_FORMAT` and `SWITCHYARD_LOG_LEVEL` variables ask for, for every
 * command (a command's own config file may set it again); empty when neither is set or a value is not
 * one of the accepted ones (the command's config check names it).
 */
export const layerFromEnv = (env: Readonly<Record<string, string | undefined>> = process.env): Layer.Layer<never> => {
  const format = env["SWITCHYARD_LOG_FORMAT"]
  const level = env["SWITCHYARD_LOG_LEVEL"]
  const formatOk = format === "logfmt" || format === "json"
  const levelOk = level !== undefined && Object.hasOwn(levels, level)
  if (!formatOk && !levelOk) return Layer.empty
  return layer({ format: formatOk ? format : undefined, level: levelOk ? level as LogLevelName : undefined })
}

/**
 * Switches the running fiber (and the fibers it forks from now on) to `config`'s logger and level: for
 * commands that learn their log settings from a file they read after starting.
 */
export const useInThisFiber = (config: LoggingConfig, sink?: LineSink): Effect.Effect<void> =>
  Effect.withFiber((fiber) => {
    const withLogger = Context.add(fiber.context, Logger.CurrentLoggers, new Set([makeLogger(config.format ?? "logfmt", sink)]))
    fiber.setContext(Context.add(withLogger, References.MinimumLogLevel, levels[config.level ?? "info"]))
    return Effect.void
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
}

const logfmtValue = (v: string | number): string => {
  const s = String(v)
  return /^[A-Za-z0-9._:/@+-]+$/.test(s) ? s : JSON.stringify(s)
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
    ["peer", entry.peer]
  ]
  if (format === "json") return JSON.stringify(Object.fromEntries(fields))
  return fields.map(([k, v]) => `${k}=${logfmtValue(v)}`).join(" ")
}

/** An access-log writer, or `undefined` when the access log is off. */
export const accessLogger = (config: LoggingConfig, sink: LineSink = stderrSink): ((entry: AccessEntry) => void) | undefined =>
  config.accessLog === true ? (entry) => sink(formatAccess(config.format ?? "logfmt", entry)) : undefined
