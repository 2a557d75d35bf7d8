/**
 * A yamux stream as a Node `Duplex` that passes for a socket with `http` servers and agents:
 * `end()` sends FIN, `destroy()` before a clean finish sends RST, backpressure follows the stream
 * window both ways, and the socket knobs (`setTimeout`, `setNoDelay`, `ref`...) behave sensibly.
 */
import { Buffer } from "node:buffer"
import { Duplex } from "node:stream"
import type { ReadRelease } from "../ReadLease.ts"
import type { ReadBatchListener } from "../Transport.ts"
import type { StreamCore } from "./Stream.ts"
import type { YamuxError } from "./YamuxError.ts"

/** A yamux stream dressed as a socket. Address fields are plain properties the caller may overwrite. */
export class StreamSocket extends Duplex {
  readonly core: StreamCore
  remoteAddress: string | undefined
  remotePort: number | undefined
  remoteFamily: string | undefined
  localAddress: string | undefined
  localPort: number | undefined
  /** Never true: the stream exists as soon as the socket does. */
  readonly connecting = false
  bytesRead = 0
  bytesWritten = 0
  private idleMs = 0
  private idleTimer: ReturnType<typeof setTimeout> | undefined
  private refed = true
  private readonly pullBound: () => void
  /** Set by a reader that wants to know where each run of `data` events begins and ends. */
  batchListener: ReadBatchListener | undefined = undefined
  /** The chunk `push` is handing to `data` listeners right now, and the hold on the read it is a view of. */
  private emitting: Uint8Array | undefined = undefined
  private emittingRelease: ReadRelease | undefined = undefined

  constructor(core: StreamCore) {
    super({ allowHalfOpen: true })
    this.core = core
    const remote = core.host.remoteAddress
    const local = core.host.localAddress
    this.remoteAddress = remote?.host ?? remote?.path
    this.remotePort = remote?.port
    this.remoteFamily = remote?.host?.includes(":") ? "IPv6" : remote?.host ? "IPv4" : undefined
    this.localAddress = local?.host ?? local?.path
    this.localPort = local?.port
    this.pullBound = () => this.pull()
    this.once("close", () => this.clearIdle())
    // Like a socket whose connection dies: a reset (or a session that ended with nothing left to read)
    // destroys the socket even when nobody is reading. Unread data before a session end stays readable.
    core.onFail = (error, hard) => {
      if (this.destroyed) return
      if (!hard && (this.core.recvBytes > 0 || this.core.remoteFin)) return
      // A session that ended cleanly (closed here, or the peer said GoAway and closed) closes its
      // sockets without an error, as `destroy()` does; a failed one passes its error on.
      const clean = error.reason === "SessionClosed" || error.reason === "RemoteGoAway"
      this.destroy(clean ? undefined : error)
    }
  }

  override _read(): void {
    // chunks pushed from within `_read` wait in the readable buffer and reach `data` listeners later;
    // pushed from a microtask they are emitted at once, with the hold on their read (`takeReadRelease`)
    queueMicrotask(this.pullBound)
  }

  private pull(): void {
    const listener = this.batchListener
    if (listener === undefined) return this.pullAll()
    listener.batchStart()
    try {
      this.pullAll()
    } finally {
      listener.batchEnd()
    }
  }

  private pullAll(): void {
    for (;;) {
      const r = this.core.tryRead()
      if (r === undefined) {
        this.core.onReadable = this.pullBound
        return
      }
      if (typeof r === "symbol") {
        this.push(null)
        return
      }
      if (r instanceof Uint8Array) {
        this.bytesRead += r.length
        this.touch()
        this.emitting = r
        this.emittingRelease = this.core.takeRelease()
        const more = this.push(r)
        // a hold nobody took stays unreleased: the chunk may wait in the readable buffer
        this.emitting = undefined
        this.emittingRelease = undefined
        if (!more) return
        continue
      }
      this.destroy(r as YamuxError)
      return
    }
  }

  /**
   * For a `data` listener: the hold on the session read `chunk` is a view of, when `chunk` is being
   * emitted by the push that took it from the stream (not later, from the readable buffer) and that read
   * is leased (`ReadLease`). The one listener that takes it releases it once done with the chunk (its
   * bytes written out); otherwise the read is left to the collector.
   */
  takeReadRelease(chunk: Uint8Array): ReadRelease | undefined {
    if (chunk !== this.emitting) return undefined
    const release = this.emittingRelease
    this.emittingRelease = undefined
    return release
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.bytesWritten += chunk.length
    this.touch()
    this.core.write(chunk, (e) => callback(e ?? null))
  }

  override _writev(
    chunks: Array<{ chunk: Buffer; encoding: BufferEncoding }>,
    callback: (error?: Error | null) => void
  ): void {
    let failed: YamuxError | undefined
    const last = chunks.length - 1
    chunks.forEach(({ chunk }, i) => {
      this.bytesWritten += chunk.length
      this.core.write(chunk, (e) => {
        failed ??= e
        if (i === last) callback(failed ?? null)
      })
    })
    this.touch()
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.core.closeWrite()
    callback(null)
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.clearIdle()
    if (this.core.onReadable === this.pullBound) this.core.onReadable = undefined
    this.core.onFail = undefined
    this.core.reset()
    callback(error)
  }

  /** `net.Socket#destroySoon`: finish writing (FIN), then destroy. */
  destroySoon(): void {
    if (this.writable) this.end()
    if (this.writableFinished) this.destroy()
    else this.once("finish", () => this.destroy())
  }

  /** Emits `timeout` after `ms` without reads or writes (0 disables), like `net.Socket#setTimeout`. */
  setTimeout(ms: number, callback?: () => void): this {
    this.idleMs = ms
    this.clearIdle()
    if (callback) {
      if (ms === 0) this.off("timeout", callback)
      else this.once("timeout", callback)
    }
    if (ms > 0 && !this.destroyed) {
      this.idleTimer = setTimeout(() => {
        this.idleTimer = undefined
        this.emit("timeout")
      }, ms)
      if (!this.refed) this.idleTimer.unref()
    }
    return this
  }

  private touch(): void {
    if (this.idleTimer) this.idleTimer.refresh()
    else if (this.idleMs > 0 && !this.destroyed) this.setTimeout(this.idleMs)
  }

  private clearIdle(): void {
    if (this.idleTimer) {
      clearTimeout(this.idleTimer)
      this.idleTimer = undefined
    }
  }

  /** Nagle does not apply to a stream inside a session; accepted for compatibility. */
  setNoDelay(_noDelay?: boolean): this {
    return this
  }

  /** TCP keepalive belongs to the session's connection (yamux pings cover it); accepted for compatibility. */
  setKeepAlive(_enable?: boolean, _initialDelay?: number): this {
    return this
  }

  ref(): this {
    this.refed = true
    this.idleTimer?.ref()
    return this
  }

  unref(): this {
    this.refed = false
    this.idleTimer?.unref()
    return this
  }

  address(): { address: string | undefined; port: number | undefined; family: string | undefined } {
    return { address: this.localAddress, port: this.localPort, family: this.remoteFamily }
  }

  get readyState(): string {
    if (this.destroyed) return "closed"
    if (this.readable && this.writable) return "open"
    return this.readable ? "readOnly" : this.writable ? "writeOnly" : "closed"
  }
}

/** Wraps a stream's protocol state as a socket-like Duplex. */
export const makeStreamDuplex = (core: StreamCore): StreamSocket => new StreamSocket(core)
