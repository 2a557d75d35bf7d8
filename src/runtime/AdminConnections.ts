/**
 * The admin endpoint's connection budget: at most `max` connections at once, each with a deadline, so
 * idle or slow peers cannot keep `/healthz` and `/readyz` from answering. A connection has `headTimeoutMs`
 * to deliver a complete request head (from when it opened, or from its previous response), and
 * `responseTimeoutMs` for its response to be taken. When the budget is full, a new connection closes the
 * connection that has waited longest for a head; only when every connection is mid-response is the new
 * one refused. It does not look at paths or peers: health checks need no head start beyond being served.
 */
import type * as http from "node:http"
import type * as net from "node:net"

/** Why the budget closed a connection. */
export type AdminConnectionClose =
  /** No complete request head within the head timeout. */
  | "head_timeout"
  /** A response not taken within the response timeout. */
  | "response_timeout"
  /** Closed, while waiting for a head, to admit a newer connection when the budget was full. */
  | "evicted"
  /** Refused on arrival: the budget was full of connections being answered. */
  | "refused"

export interface AdminConnectionBudget {
  /** Most connections open at once. */
  readonly max: number
  /** Time for a complete request head, from the connection's start or its previous response (ms). */
  readonly headTimeoutMs: number
  /** Time for a response to be written out once its head has been read (ms). */
  readonly responseTimeoutMs: number
  /** Called for every connection the budget closes. */
  readonly onClose: (reason: AdminConnectionClose) => void
}

interface Tracked {
  /** A request is being answered on it. */
  busy: boolean
  /** When it started waiting for its next request head (ms since the epoch). */
  waitingSince: number
  /** Its current deadline (for a head, or for a response). */
  timer: NodeJS.Timeout | undefined
}

/** Applies the budget to every connection `server` accepts from now on; returns the number open. */
export const applyConnectionBudget = (server: http.Server, budget: AdminConnectionBudget): () => number => {
  const open = new Map<net.Socket, Tracked>()

  const closeFor = (socket: net.Socket, reason: AdminConnectionClose) => {
    if (socket.destroyed) return
    budget.onClose(reason)
    socket.destroy()
  }

  const waitForHead = (socket: net.Socket, tracked: Tracked) => {
    clearTimeout(tracked.timer)
    tracked.busy = false
    tracked.waitingSince = Date.now()
    tracked.timer = setTimeout(() => closeFor(socket, "head_timeout"), budget.headTimeoutMs)
  }

  /** The connection that has waited longest for a request head, if any is waiting. */
  const longestWaiting = (): net.Socket | undefined => {
    let oldest: net.Socket | undefined
    let since = Infinity
    for (const [socket, tracked] of open) {
      if (!tracked.busy && tracked.waitingSince < since) {
        oldest = socket
        since = tracked.waitingSince
      }
    }
    return oldest
  }

  server.on("connection", (socket: net.Socket) => {
    if (open.size >= budget.max) {
      const victim = longestWaiting()
      if (victim === undefined) return closeFor(socket, "refused")
      closeFor(victim, "evicted")
    }
    const tracked: Tracked = { busy: false, waitingSince: 0, timer: undefined }
    waitForHead(socket, tracked)
    open.set(socket, tracked)
    socket.once("close", () => {
      clearTimeout(tracked.timer)
      open.delete(socket)
    })
  })

  // ahead of the server's own handler, which may answer at once
  server.prependListener("request", (req: http.IncomingMessage, res: http.ServerResponse) => {
    const socket = req.socket
    const tracked = open.get(socket)
    if (tracked === undefined) return
    clearTimeout(tracked.timer)
    tracked.busy = true
    tracked.timer = setTimeout(() => closeFor(socket, "response_timeout"), budget.responseTimeoutMs)
    res.once("finish", () => {
      if (open.get(socket) === tracked && !socket.destroyed) waitForHead(socket, tracked)
    })
  })

  return () => open.size
}
