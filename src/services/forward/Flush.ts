/**
 * Closing one side of a raw tunnel gracefully: end it, let what it was given reach the peer, then destroy
 * it, bounded by a grace period without progress. It does not decide when a tunnel is over.
 */
import type { Duplex } from "node:stream"

/** How long a tunnel side may take, without progress, to flush its last bytes after the other side closed. */
export const TUNNEL_FLUSH_GRACE_MS = 30_000

/** Ends a duplex gracefully and destroys it once its pending writes are out (or stall for the grace period). */
export const closeAfterFlush = (side: Duplex): void => {
  if (side.destroyed) return
  if (side.writableFinished) {
    side.destroy()
    return
  }
  side.once("finish", () => side.destroy())
  const timed = side as Duplex & { setTimeout?: (ms: number, cb: () => void) => unknown }
  if (typeof timed.setTimeout === "function") timed.setTimeout(TUNNEL_FLUSH_GRACE_MS, () => side.destroy())
  if (!side.writableEnded) side.end()
}
