/**
 * A byte stream asked for before the connection that carries it exists (a tunnel stream requested while
 * its session is still starting): writes wait, bounded by the writable high-water mark (the writer sees
 * backpressure), until `attach` gives the real stream, then bytes pass both ways. It opens nothing itself.
 */
import { Buffer } from "node:buffer"
import { Duplex } from "node:stream"

export class DeferredStream extends Duplex {
  private inner: Duplex | undefined = undefined
  private readonly queued: Array<{ readonly chunk: Buffer; readonly callback: (error?: Error | null) => void }> = []
  private finalCallback: ((error?: Error | null) => void) | undefined = undefined

  constructor() {
    super({ allowHalfOpen: true })
  }

  /** The real stream: queued writes go out, and from now on everything passes through. */
  attach(inner: Duplex): void {
    if (this.destroyed) {
      inner.destroy()
      return
    }
    this.inner = inner
    inner.on("data", (chunk: Buffer) => {
      if (!this.push(chunk)) inner.pause()
    })
    inner.on("end", () => this.push(null))
    inner.on("error", (error) => this.destroy(error))
    inner.on("close", () => {
      // a clean close after both directions ended, or a reset: either way this stream is over
      if (!this.destroyed) this.destroy()
    })
    for (const { chunk, callback } of this.queued.splice(0)) this.forward(chunk, callback)
    const final = this.finalCallback
    this.finalCallback = undefined
    if (final !== undefined) {
      inner.end()
      final(null)
    }
  }

  override _read(): void {
    this.inner?.resume()
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    if (this.inner === undefined) this.queued.push({ chunk, callback })
    else this.forward(chunk, callback)
  }

  override _final(callback: (error?: Error | null) => void): void {
    if (this.inner === undefined) {
      this.finalCallback = callback
      return
    }
    this.inner.end()
    callback(null)
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.inner?.destroy()
    this.queued.length = 0
    this.finalCallback = undefined
    callback(error)
  }

  private forward(chunk: Buffer, callback: (error?: Error | null) => void): void {
    const inner = this.inner!
    if (inner.write(chunk)) callback(null)
    else inner.once("drain", () => callback(null))
  }
}
