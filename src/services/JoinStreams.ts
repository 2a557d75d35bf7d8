/**
 * Two byte streams joined both ways, as a raw TCP route or an exposed local service needs: half-closes
 * are carried across, and when either side closes or fails both are destroyed. `joinReading` opens the
 * second side itself, reading it into one reused buffer.
 */
import { Buffer } from "node:buffer"
import type * as net from "node:net"
import type { Duplex } from "node:stream"
import type { ReadInto } from "./forward/Upstream.ts"
import type { StreamSocket } from "./yamux/StreamDuplex.ts"

/** Size of the buffer a joined connection reads into. */
export const JOINED_READ_BUFFER_BYTES = 64 * 1024
/**
 * Once both sides have ended their reading, how long bytes still queued toward a side that does not take
 * them may wait before both are destroyed (ms).
 */
export const JOINED_LINGER_MS = 10_000

/**
 * Destroys both once both directions are complete, or at once when either fails, closes before its
 * directions are done, or was destroyed before being joined. A direction is complete when its writing
 * side finished (`finish`: ended, and everything written handed on), which comes after its reading side
 * ended: destroying at the two reading ends would drop bytes still queued. Once both reading sides have
 * ended, what is still queued gets `lingerMs` to be taken.
 */
const closeTogether = (a: Duplex, b: Duplex, onClose: () => void, lingerMs: number): void => {
  let done = false
  let linger: ReturnType<typeof setTimeout> | undefined
  const finish = () => {
    if (done) return
    done = true
    if (linger !== undefined) clearTimeout(linger)
    a.destroy()
    b.destroy()
    onClose()
  }
  if (a.destroyed || b.destroyed) return finish()
  let complete = 0
  const onFinish = () => {
    if (++complete === 2) finish()
  }
  a.once("finish", onFinish)
  b.once("finish", onFinish)
  let ended = 0
  const onEnd = () => {
    if (++ended === 2 && !done) {
      linger = setTimeout(finish, lingerMs)
      linger.unref()
    }
  }
  a.once("end", onEnd)
  b.once("end", onEnd)
  a.once("error", finish)
  b.once("error", finish)
  // a side whose two directions are both done closes by itself (a socket does): that is no failure
  const closed = (side: Duplex) => () => {
    if (!(side.readableEnded && side.writableFinished)) finish()
  }
  a.once("close", closed(a))
  b.once("close", closed(b))
}

/** Joins two byte streams both ways; when either closes or fails, both are destroyed. */
export const joinStreams = (a: Duplex, b: Duplex, onClose: () => void, lingerMs: number = JOINED_LINGER_MS): void => {
  closeTogether(a, b, onClose, lingerMs)
  // half-close is carried through `pipe` (end → end)
  a.pipe(b)
  b.pipe(a)
}

/**
 * Opens a connection with `connect` and joins it with a yamux stream both ways. The connection reads
 * into one buffer (Node's `onread`) that is used again whenever the stream took the read at once: a
 * yamux stream copies the bytes it is given into its session's frames before its write returns, unless
 * its window is closed, and then the read stays queued (`writableLength`) and the next one goes into a
 * fresh buffer. (A stream that keeps references to what it was written, such as a `PassThrough`, must
 * not be joined this way.) Reading pauses while the stream is above its high-water mark.
 */
export const joinReading = (
  stream: StreamSocket,
  connect: (onread: ReadInto) => net.Socket,
  onClose: () => void,
  lingerMs: number = JOINED_LINGER_MS
): net.Socket => {
  let buffer: Buffer | undefined
  let held = false
  const socket: net.Socket = connect({
    buffer: () => {
      if (buffer === undefined || held) {
        buffer = Buffer.allocUnsafe(JOINED_READ_BUFFER_BYTES)
        held = false
      }
      return buffer
    },
    callback: (bytesRead, into) => {
      const ok = stream.write((into as Buffer).subarray(0, bytesRead))
      // nothing left queued: the stream's own write took the bytes before returning
      held = stream.writableLength > 0
      if (ok) return true
      stream.once("drain", () => socket.resume())
      return false
    }
  })
  closeTogether(stream, socket, onClose, lingerMs)
  socket.once("end", () => stream.end())
  stream.pipe(socket)
  return socket
}
