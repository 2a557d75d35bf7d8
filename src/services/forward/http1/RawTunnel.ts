/**
 * What a relayed `101` turns a client connection into: the client socket and the upstream joined as one
 * raw, half-closable pipe (an end on one side ends the other's writable), bounded by the idle timeout,
 * torn down as a whole on an error, and tracked in the forwarder's set of live tunnels. It reads no
 * bytes: after the switching head, whatever either side sends is the protocol's.
 */
import { Buffer } from "node:buffer"
import type * as net from "node:net"
import type { Duplex } from "node:stream"
import { closeAfterFlush } from "../Flush.ts"

/** One tunnel being opened: where it is tracked, what it holds, and what was already read or sent. */
export interface TunnelStart {
  /** Live tunnels (both sockets are in it until they close). */
  readonly tunnels: Set<Duplex>
  /** Called once both sides have closed (the decision's hold, such as a backend lease, lasts that long). */
  readonly onEnd: (() => void) | undefined
  /** Closes the tunnel when the upstream side is idle this long (ms, 0 = never). */
  readonly idleTimeoutMs: number
  /** Told when the idle timeout closes the tunnel. */
  readonly onIdle: () => void
  /** The `101` head for the client. */
  readonly switching: Buffer
  /** Bytes the upstream sent after its `101`. */
  readonly rest: Buffer
  /** Bytes the client sent after its request (already past the head). */
  readonly pending: Buffer | undefined
  /** The client had already ended its side. */
  readonly clientEnded: boolean
}

/** Joins `socket` (the client, its engine listeners removed) and `up` (detached from its pool). */
export const spliceTunnel = (socket: net.Socket, up: Duplex, start: TunnelStart): void => {
  const tunnels = start.tunnels
  tunnels.add(socket)
  tunnels.add(up)
  const onEnd = start.onEnd
  if (onEnd !== undefined) {
    let open = 2
    const closed = () => {
      if (--open === 0) onEnd()
    }
    socket.once("close", closed)
    up.once("close", closed)
  }
  const teardown = () => {
    tunnels.delete(socket)
    tunnels.delete(up)
    socket.destroy()
    up.destroy()
  }
  const timed = up as Duplex & { setTimeout?: (ms: number) => unknown }
  if (typeof timed.setTimeout === "function") timed.setTimeout(start.idleTimeoutMs)
  up.on("timeout", () => {
    start.onIdle()
    teardown()
  })
  up.on("error", teardown)
  socket.on("error", teardown)
  up.on("close", () => {
    tunnels.delete(up)
    closeAfterFlush(socket)
  })
  socket.on("close", () => {
    tunnels.delete(socket)
    closeAfterFlush(up)
  })
  socket.cork()
  socket.write(start.switching)
  if (start.rest.length > 0) socket.write(start.rest)
  socket.uncork()
  if (start.pending !== undefined) up.write(start.pending)
  if (start.clientEnded) up.end()
  // pipe() ends the other side's writable when one side's readable ends: half-close carries over.
  socket.pipe(up)
  up.pipe(socket)
  up.resume()
}
