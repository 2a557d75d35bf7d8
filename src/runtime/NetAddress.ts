/**
 * Parsing `host:port` / `unix:/path` addresses from flags and config, and binding a Node server to one
 * as a scoped resource (closed, with its connections, when the scope closes).
 */
import { Effect, Schema } from "effect"
import type { Scope } from "effect"
import type * as net from "node:net"

/** A TCP address. */
export interface HostPort {
  readonly host: string
  readonly port: number
}

export class AddressError extends Schema.TaggedError<AddressError>()("AddressError", {
  reason: Schema.Literals(["Malformed", "BindFailed"]),
  message: Schema.String
}) {}

/** Parses `host:port`, `[v6]:port` or `:port` (loopback). */
export const parseHostPort = (text: string): HostPort | AddressError => {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(text.trim())
  const port = m ? Number(m[3]) : Number.NaN
  if (!m || !Number.isInteger(port) || port < 0 || port > 65535) {
    return new AddressError({ reason: "Malformed", message: `expected host:port, got "${text}"` })
  }
  return { host: m[1] ?? (m[2] || "127.0.0.1"), port }
}

/** A gateway address as an operator writes it: `host:port`, or `tls://host:port` for a TLS port. */
export interface GatewayAddress extends HostPort {
  readonly tls: boolean
}

/** Parses `host:port` or `tls://host:port` (a gateway port served over TLS). */
export const parseGatewayAddress = (text: string): GatewayAddress | AddressError => {
  const trimmed = text.trim()
  const tls = trimmed.toLowerCase().startsWith("tls://")
  const parsed = parseHostPort(tls ? trimmed.slice("tls://".length) : trimmed)
  if (parsed instanceof AddressError) {
    return new AddressError({ reason: "Malformed", message: `expected host:port or tls://host:port, got "${text}"` })
  }
  return { ...parsed, tls }
}

/** Formats an address for logs and messages. */
export const formatHostPort = (a: HostPort): string => a.host.includes(":") ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`

/** Binds `server` to `address` until the scope closes; returns the bound address (port 0 → the real one). */
export const listenOn = (
  server: net.Server,
  address: HostPort
): Effect.Effect<HostPort, AddressError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.callback<HostPort, AddressError>((resume) => {
      const onError = (err: Error) => {
        resume(Effect.fail(new AddressError({ reason: "BindFailed", message: `${formatHostPort(address)}: ${err.message}` })))
      }
      server.once("error", onError)
      server.listen(address.port, address.host, () => {
        server.off("error", onError)
        const bound = server.address() as net.AddressInfo
        resume(Effect.succeed({ host: address.host, port: bound.port }))
      })
    }),
    () =>
      Effect.callback<void>((resume) => {
        server.close(() => resume(Effect.void))
        const closeAll = (server as { closeAllConnections?: () => void }).closeAllConnections
        if (closeAll) closeAll.call(server)
      })
  )
