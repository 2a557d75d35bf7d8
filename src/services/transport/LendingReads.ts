/**
 * Reading a socket into reused memory (Node's `onread`): the buffer policy of lending connections, and
 * taking over an accepted or upgraded socket's handle so that it reads that way. It interprets no bytes;
 * the handlers it feeds say whether they kept what they were given (`ConnectionHandlers.lendable`).
 */
import * as net from "node:net"
import type { ConnectionHandlers } from "../Transport.ts"

/** Smallest read buffer of a lending connection (an idle one keeps this much). */
export const LENDING_READ_MIN_BYTES = 4 * 1024
/** Largest read buffer of a lending connection: reads that fill the buffer grow it fourfold up to this. */
export const LENDING_READ_MAX_BYTES = 256 * 1024

/**
 * Reads into one reused buffer (Node's `onread`) and hands each read to the connection's handlers. When
 * the handlers are `lendable` and say they kept nothing, the next read goes into the same memory: a busy
 * tunnel then allocates nothing per read, which spares the garbage collector most of its work. Otherwise
 * the buffer is left to whoever holds it and the next read gets a fresh one. A read that fills the
 * buffer makes the next one four times larger (up to `LENDING_READ_MAX_BYTES`); a read under a quarter
 * of it makes it four times smaller (down to `LENDING_READ_MIN_BYTES`).
 */
export class LendingReads {
  handlers: ConnectionHandlers | undefined = undefined
  private buffer: Buffer | undefined = undefined
  private kept = false
  private size = LENDING_READ_MIN_BYTES
  /**
   * The connection is paused. Node restarts reading on a resume that was already scheduled when the
   * pause came, so a read may still land: it is copied here (reading stops after it) and delivered
   * on resume.
   */
  private paused = false
  private held: Array<Buffer> = []

  pause(): void {
    this.paused = true
  }

  resume(): void {
    this.paused = false
    // before the socket's own resume, so held bytes come before an `end` it may emit
    if (this.held.length > 0) process.nextTick(this.flush)
  }

  private readonly flush = (): void => {
    while (!this.paused && this.held.length > 0) this.handlers?.onData(this.held.shift()!)
  }

  readonly next = (): Buffer => {
    const current = this.buffer
    if (current === undefined || this.kept || current.length !== this.size) {
      this.kept = false
      const fresh = Buffer.allocUnsafe(this.size)
      this.buffer = fresh
      return fresh
    }
    return current
  }

  /** Sets the handlers reads go to, delivering first what was read before (copied, then held). */
  attach(handlers: ConnectionHandlers): void {
    this.handlers = handlers
    this.resume()
  }

  readonly onRead = (bytesRead: number, buffer: Uint8Array): boolean => {
    if (bytesRead === buffer.length) this.size = Math.min(this.size * 4, LENDING_READ_MAX_BYTES)
    else if (bytesRead * 4 < buffer.length) this.size = Math.max(this.size / 4, LENDING_READ_MIN_BYTES)
    const h = this.handlers
    if (h === undefined || this.paused || this.held.length > 0) {
      this.held.push(Buffer.from(buffer.subarray(0, bytesRead)))
      return false
    }
    const kept = h.onData((buffer as Buffer).subarray(0, bytesRead))
    if (h.lendable !== true || kept === true) this.kept = true
    return true // pausing is the handlers', through `pause()`
  }
}

/**
 * Takes over an accepted socket (made with `pauseOnConnect`) so that it reads through `reads`; Node's
 * server has no `onread` option, so the handle moves to a new `net.Socket` that has one. Returns
 * `undefined`, leaving the socket as it was, where the handle cannot be moved.
 */
export const lendingSocket = (accepted: net.Socket, reads: LendingReads): net.Socket | undefined => {
  const internal = accepted as unknown as { _handle: { useUserBuffer?: unknown; reading?: boolean } | null }
  const handle = internal._handle
  if (handle === null || typeof handle !== "object" || typeof handle.useUserBuffer !== "function" || handle.reading === true) {
    return undefined
  }
  internal._handle = null
  accepted.destroy()
  return new net.Socket({
    handle,
    allowHalfOpen: true,
    pauseOnCreate: true,
    onread: { buffer: reads.next, callback: reads.onRead }
  } as net.SocketConstructorOpts)
}

/**
 * Takes over a socket handed on by an HTTP server's `upgrade` event, which may already be reading:
 * reading stops, the bytes the socket had buffered are returned (to go before anything read later),
 * and the handle moves to a new socket that reads through `reads`. `undefined`, leaving the socket as it
 * was, for TLS sockets and handles that cannot move.
 */
export const lendingUpgradedSocket = (
  upgraded: net.Socket,
  reads: LendingReads
): { readonly socket: net.Socket; readonly buffered: Array<Buffer> } | undefined => {
  if ((upgraded as { encrypted?: boolean }).encrypted === true) return undefined
  const internal = upgraded as unknown as {
    _handle: { useUserBuffer?: unknown; reading?: boolean; readStop?: () => number } | null
  }
  const handle = internal._handle
  if (handle === null || typeof handle !== "object" || typeof handle.useUserBuffer !== "function" || typeof handle.readStop !== "function") {
    return undefined
  }
  if (handle.reading === true) {
    handle.reading = false
    handle.readStop()
  }
  internal._handle = null
  const buffered: Array<Buffer> = []
  for (let b: Buffer | null = upgraded.read() as Buffer | null; b !== null; b = upgraded.read() as Buffer | null) buffered.push(b)
  upgraded.destroy()
  const socket = new net.Socket({
    handle,
    allowHalfOpen: upgraded.allowHalfOpen,
    pauseOnCreate: true,
    onread: { buffer: reads.next, callback: reads.onRead }
  } as net.SocketConstructorOpts)
  return { socket, buffered }
}
