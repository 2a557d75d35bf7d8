/**
 * The admin endpoint: a small HTTP server for operators and orchestrators (`/healthz`, `/readyz`).
 * It serves no user traffic and never exposes secrets; it binds loopback unless told otherwise.
 */
import { Effect, Schema } from "effect"
import type { Scope } from "effect"
import * as http from "node:http"
import { type HostPort, listenOn } from "./NetAddress.ts"

export class AdminError extends Schema.TaggedError<AdminError>()("AdminError", {
  reason: Schema.Literals(["BindFailed"]),
  message: Schema.String
}) {}

export interface AdminOptions {
  /** Where the admin endpoint listens. */
  readonly address: HostPort
  /** Whether the process is ready for traffic (listeners bound, sessions up). */
  readonly ready: () => boolean
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
      default:
        res.writeHead(404, { "content-type": "text/plain" }).end("not found\n")
    }
  })
  return yield* listenOn(server, options.address).pipe(
    Effect.mapError((cause) => new AdminError({ reason: "BindFailed", message: cause.message }))
  )
})
