/**
 * Reading a socket into reused memory (Node's `onread`): the buffer policy of lending connections, and
 * switching a socket Node accepted to read that way. It interprets no bytes; the handlers it feeds say
 * whether they kept what they were given (`ConnectionHandlers.lendable`).
 */
import * as net from "node:net"
import type { ConnectionHandlers } from "../Transport.ts"

/** Smallest read buffer of a lending connection (an idle one keeps this much). */
export const LENDING_READ_MIN_BYTES = 4 * 1024
/** Largest read buffer of a lending connection: reads that fill the buffer grow it fourfold up to this. */
export const LENDING_READ_MAX_BYTES = 256 * 1024
/**
 * Consecutive reads under a quarter of the buffer before it is made smaller: a busy connection whose
 * reads come in alternately large and small keeps its buffer (and its memory reused) instead of
 * swapping sizes, which would take fresh memory at each swap.
 */
export const LENDING_SHRINK_AFTER_READS = 8
/**
 * Reads held while paused (each stops reading until the next resume, so one per resume); more means
 * pause and resume are racing without a read being taken, and the connection is destroyed.
 */
export const LENDING_HELD_MAX_READS = 16

/**
 * Reads into one reused buffer (Node's `onread`) and hands each read to the connection's handlers. When
 * the handlers are `lendable` and say they kept nothing, the next read goes into the same memory: a busy
 * tunnel then allocates nothing per read, which spares the garbage collector most of its work. Otherwise
 * the buffer is left to whoever holds it and the next read gets a fresh one. A read that fills the
 * buffer makes the next one four times larger (up to `LENDING_READ_MAX_BYTES`); `LENDING_SHRINK_AFTER_READS`
 * reads in a row under a quarter of it make it four times smaller (down to `LENDING_READ_MIN_BYTES`).
 */
export class LendingReads {
  handlers: ConnectionHandlers | undefined = undefined
  private buffer: Buffer | undefined = undefined
  private kept = false
  private size = LENDING_READ_MIN_BYTES
  /** Reads in a row under a quarter of the buffer. */
  private smallReads = 0
  /**
   * The connection is paused. Node restarts reading on a resume that was already scheduled when the
   * pause came, so a read may still land: it is copied here (reading stops after it) and delivered
   * on resume.
   */
  private paused = false
  private held: Array<Buffer> = []
  /** Called once more than `LENDING_HELD_MAX_READS` reads are held: the owner destroys the socket. */
  onOverflow: (() => void) | undefined = undefined
  /** Told the size of every read as it lands (byte budgets before authentication). */
  onBytes: ((bytesRead: number) => void) | undefined = undefined

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
    this.onBytes?.(bytesRead)
    if (bytesRead * 4 >= buffer.length) {
      this.smallReads = 0
      if (bytesRead === buffer.length) this.size = Math.min(this.size * 4, LENDING_READ_MAX_BYTES)
    } else if (++this.smallReads >= LENDING_SHRINK_AFTER_READS) {
      this.smallReads = 0
      this.size = Math.max(this.size / 4, LENDING_READ_MIN_BYTES)
    }
    const h = this.handlers
    if (h === undefined || this.paused || this.held.length > 0) {
      if (this.held.length >= LENDING_HELD_MAX_READS) {
        this.onOverflow?.()
        return false
      }
      this.held.push(Buffer.from(buffer.subarray(0, bytesRead)))
      return false
    }
    const kept = h.onData((buffer as Buffer).subarray(0, bytesRead))
    if (h.lendable !== true || kept === true) this.kept = true
    return true // pausing is the handlers', through `pause()`
  }
}

/**
 * Makes a socket Node accepted (for a server, or handed on by an HTTP upgrade) read into buffers the
 * caller supplies, as Node's `onread` option does for sockets it creates: `net.Socket` keeps that
 * option's state under the symbols `kBuffer`, `kBufferCb` and `kBufferGen`, and the handle's
 * `useUserBuffer` switches its reads to it. Checked at run time; `undefined` for TLS sockets, sockets
 * that hold unread data, and when the shape is not there (reads then stay Node's, a fresh buffer each).
 */
export const readIntoUserBuffers = (
  socket: net.Socket
): ((first: Buffer, onRead: (nread: number, buffer: Buffer) => boolean, next: () => Buffer) => void) | undefined => {
  const symbols = Object.getOwnPropertySymbols(socket)
  const symbol = (name: string) => symbols.find((s) => s.description === name)
  const kBuffer = symbol("kBuffer")
  const kBufferCb = symbol("kBufferCb")
  const kBufferGen = symbol("kBufferGen")
  const slots = socket as unknown as Record<symbol, unknown>
  const handle = (socket as unknown as { readonly _handle?: { readonly useUserBuffer?: unknown } | null })._handle
  if (kBuffer === undefined || kBufferCb === undefined || kBufferGen === undefined) return undefined
  if (slots[kBuffer] != null || slots[kBufferCb] != null || handle == null || typeof handle.useUserBuffer !== "function") return undefined
  // plain TCP only (a TLS socket's reads are decrypted elsewhere), and nothing read but not yet delivered
  if ((socket as { readonly encrypted?: boolean }).encrypted === true || socket.readableLength > 0) return undefined
  return (first, onRead, next) => {
    slots[kBuffer] = first
    slots[kBufferCb] = onRead
    slots[kBufferGen] = next
    ;(handle.useUserBuffer as (buffer: Buffer) => void).call(handle, first)
  }
}

/** Makes `socket` read through `reads` (see `readIntoUserBuffers`); false, changing nothing, where it cannot. */
export const lendingSocket = (socket: net.Socket, reads: LendingReads): boolean => {
  const readInto = readIntoUserBuffers(socket)
  if (readInto === undefined) return false
  reads.onOverflow = () => socket.destroy(new Error(`more than ${LENDING_HELD_MAX_READS} reads held while paused`))
  readInto(reads.next(), reads.onRead as (nread: number, buffer: Buffer) => boolean, reads.next)
  return true
}
