/**
 * The admin endpoint: a small HTTP server for operators and orchestrators: `/healthz` (process alive),
 * `/readyz` (listeners bound, sessions up), `/metrics` (Prometheus text) and `/status` (JSON for
 * `switchyard status`). It serves no user traffic, never exposes secrets, and binds loopback by default.
 */
import { Effect, Schema } from "effect"
import type { Scope } from "effect"
import * as http from "node:http"
import { ExpositionContentType, type MetricRegistry } from "../services/Metrics.ts"
import { type HostPort, listenOn } from "./NetAddress.ts"

/** Where the admin endpoint listens by default. */
export const DefaultAdminAddress: HostPort = { host: "127.0.0.1", port: 9090 }
/** Most connections the admin endpoint serves at once. */
export const MaxAdminConnections = 64
/** Time allowed to send a request head to the admin endpoint (ms). */
export const AdminHeadersTimeoutMs = 10_000
/** Most recent errors kept for `/status`. */
export const MaxRecentErrors = 32

export class AdminError extends Schema.TaggedError<AdminError>()("AdminError", {
  reason: Schema.Literals(["BindFailed"]),
  message: Schema.String
}) {}

/** The JSON document of `/status` (also read by `switchyard status`). */
export interface StatusDocument {
  readonly command: string
  readonly version: string
  readonly startedAt: string
  readonly ready: boolean
  readonly listeners: ReadonlyArray<{ readonly name: string; readonly address: string }>
  readonly sessions: ReadonlyArray<{ readonly frontDoor: string; readonly count: number }>
  readonly routes: ReadonlyArray<{ readonly route: string; readonly backends: ReadonlyArray<string>; readonly inFlight: number }>
  readonly recentErrors: ReadonlyArray<{ readonly at: string; readonly message: string }>
}

export interface AdminOptions {
  /** Where the admin endpoint listens. */
  readonly address: HostPort
  /** Whether the process is ready for traffic (listeners bound, sessions up). */
  readonly ready: () => boolean
  /** Rendered on `/metrics` when given. */
  readonly metrics?: MetricRegistry | undefined
  /** Served on `/status` when given. */
  readonly status?: (() => StatusDocument) | undefined
}

/** A bounded list of the latest errors, for `/status`. */
export const makeRecentErrors = (limit: number = MaxRecentErrors) => {
  const items: Array<{ at: string; message: string }> = []
  return {
    add: (message: string) => {
      items.push({ at: new Date().toISOString(), message })
      if (items.length > limit) items.splice(0, items.length - limit)
    },
    list: (): ReadonlyArray<{ readonly at: string; readonly message: string }> => items.slice()
  }
}

/** Serves the admin endpoint until the scope closes; returns the bound address. */
export const serveAdmin = Effect.fn("Admin.serve")(function*(options: AdminOptions): Effect.fn.Return<
  HostPort,
  AdminError,
  Scope.Scope
> {
  const server = http.createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0]
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { "content-type": "text/plain", allow: "GET, HEAD" }).end("method not allowed\n")
      return
    }
    switch (path) {
      case "/healthz":
        res.writeHead(200, { "content-type": "text/plain" }).end("ok\n")
        return
      case "/readyz": {
        const ready = options.ready()
        res.writeHead(ready ? 200 : 503, { "content-type": "text/plain" }).end(ready ? "ready\n" : "not ready\n")
        return
      }
      case "/metrics":
        if (options.metrics === undefined) break
        res.writeHead(200, { "content-type": ExpositionContentType }).end(options.metrics.render())
        return
      case "/status":
        if (options.status === undefined) break
        res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(options.status(), null, 2) + "\n")
        return
    }
    res.writeHead(404, { "content-type": "text/plain" }).end("not found\n")
  })
  server.maxConnections = MaxAdminConnections
  server.headersTimeout = AdminHeadersTimeoutMs
  return yield* listenOn(server, options.address).pipe(
    Effect.mapError((cause) => new AdminError({ reason: "BindFailed", message: cause.message }))
  )
})
