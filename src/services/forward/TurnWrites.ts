/**
 * Small writes made during one turn of the event loop leave together at its end. A busy proxy handles
 * the reads of many connections in one turn; writing each request head and small response as it is
 * made wakes the peer process once per write, while writing them back to back after the reads wakes it
 * once per turn. A socket is corked at its first such write of a turn and uncorked when the turn's
 * reads are done (`setImmediate`). Only sockets are batched so: a tunnel stream's frames are batched by
 * its session. Before a socket is destroyed, `flushTurn` lets its corked bytes go out first, as they
 * would have without the batching.
 */
import * as net from "node:net"
import type { Writable } from "node:stream"

let corked: Array<Writable> = []
let scheduled = false

const flush = (): void => {
  scheduled = false
  const sockets = corked
  corked = []
  for (let i = 0; i < sockets.length; i++) sockets[i]!.uncork()
}

/**
 * Writes `chunk` to `socket` at the end of this turn (with whatever else is written to it meanwhile),
 * or at once to a stream that is not a socket (a yamux stream batches its frames itself).
 */
export const writeAtTurnEnd = (socket: Writable, chunk: Buffer): boolean => {
  if (socket.writableCorked === 0 && !socket.destroyed && socket instanceof net.Socket) {
    socket.cork()
    corked.push(socket)
    if (!scheduled) {
      scheduled = true
      setImmediate(flush)
    }
  }
  return socket.write(chunk)
}

/** Writes out what is corked on `socket` now (before it is destroyed). */
export const flushTurn = (socket: Writable): void => {
  while (socket.writableCorked > 0) socket.uncork()
}
