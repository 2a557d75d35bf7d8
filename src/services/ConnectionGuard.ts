/**
 * Applies a `ConnectionTable` to the sockets a listener accepts: each new socket is admitted (possibly
 * after closing the listener's oldest idle one: silent, or between requests), or destroyed at once; sockets that stay silent past the
 * limit are closed by a periodic sweep. "Silent" is `bytesRead === 0`: nothing is read from the socket
 * here, so TLS and HTTP servers keep reading it as before.
 */
import type * as net from "node:net"
import { type ConnectionLimits, ConnectionTable } from "../domain/ConnectionTable.ts"

/** Default most connections from one peer address on one public listener. */
export const DefaultMaxConnectionsPerAddress = 1_024
/** Default time a public connection may stay without sending a byte (ms). */
export const DefaultSilentConnectionTimeoutMs = 10_000
/** Longest time between two sweeps for silent connections (ms). */
const MaxSweepIntervalMs = 1_000

/** Why a connection was closed by the guard. */
export type GuardAction = "ListenerFull" | "AddressFull" | "EvictedIdle" | "SilentTimeout"

export interface ConnectionGuard {
  /** Admits an accepted socket (returns true) or destroys it (false). Call before serving it. */
  readonly admit: (socket: net.Socket) => boolean
  /** Connections tracked. */
  readonly size: () => number
  /** Stops the sweep (the listener is closing). */
  readonly close: () => void
}

const isSilent = (socket: net.Socket): boolean => socket.bytesRead === 0

const neverSilent = (): boolean => false

/**
 * A guard for one listener. With `evictSilent` false (raw TCP, where a client may rightly wait for the
 * server to speak), no connection counts as silent: a full listener or address refuses newcomers.
 * `isBetweenRequests`, when the listener's server can tell, says a connection waits for its next request
 * (keep-alive) and may be closed to make room too. `onAction` is told each connection the guard closes or
 * refuses, with the peer's address (for a metric and a sampled log line).
 */
export const makeConnectionGuard = (
  limits: ConnectionLimits,
  evictSilent: boolean,
  onAction: (action: GuardAction, address: string | undefined) => void,
  isBetweenRequests?: (socket: net.Socket) => boolean
): ConnectionGuard => {
  const table = new ConnectionTable<net.Socket>(limits)
  const silent = evictSilent ? isSilent : neverSilent
  const idle = isBetweenRequests === undefined ? silent : (socket: net.Socket) => silent(socket) || isBetweenRequests(socket)
  let sweep: NodeJS.Timeout | undefined
  const closeSilent = (socket: net.Socket, action: GuardAction) => {
    table.remove(socket)
    onAction(action, socket.remoteAddress)
    socket.destroy()
  }
  const runSweep = () => {
    for (const socket of table.expired(Date.now(), silent)) closeSilent(socket, "SilentTimeout")
    if (table.size === 0 && sweep !== undefined) {
      clearInterval(sweep)
      sweep = undefined
    }
  }
  return {
    admit: (socket) => {
      const address = socket.remoteAddress
      const decision = table.admit(address, idle)
      if (decision._tag === "Refuse") {
        onAction(decision.reason, address)
        socket.destroy()
        return false
      }
      if (decision.evict !== undefined) closeSilent(decision.evict, "EvictedIdle")
      table.add(socket, address, Date.now())
      socket.once("close", () => table.remove(socket))
      if (sweep === undefined && evictSilent && limits.silentTimeoutMs > 0) {
        sweep = setInterval(runSweep, Math.min(MaxSweepIntervalMs, Math.max(50, limits.silentTimeoutMs / 4)))
      }
      return true
    },
    size: () => table.size,
    close: () => {
      if (sweep !== undefined) clearInterval(sweep)
      sweep = undefined
    }
  }
}
