/**
 * The memory of one socket read, given back as soon as switchyard is done with it. Node allocates a new
 * buffer for every read of a socket a server accepted (its public API lends a buffer only to sockets a
 * process opens); left to the garbage collector, a relay reading hundreds of MB/s makes V8 collect its
 * heap several times a second and keeps tens of MB of dead reads resident. A lease counts who still
 * holds views of the read; when nobody does, the read's `ArrayBuffer` is detached
 * (`ArrayBuffer.prototype.transfer(0)`), which frees it at once. Only a read that is the whole of its
 * `ArrayBuffer` is detached: a view of shared memory (a pool slab, a concatenation) is left to the
 * collector. A holder that keeps a view without a hold would see it emptied: every view kept past the
 * call that handed it over must be retained.
 */

/** A hold on a read, released once (later calls do nothing). */
export type ReadRelease = () => void

/** Where a holder of views of a read takes its hold. */
export interface ReadHolds {
  /** A hold for a holder that keeps views of the read past the current call. */
  readonly retain: () => ReadRelease
}

const NOOP: ReadRelease = () => {}

export class ReadLease implements ReadHolds {
  /** The reader's own hold, plus one per `retain` not yet released. */
  private holds = 1
  /** What is done once the last hold is released: the read detached, or a hold further up released. */
  private readonly free: () => void

  /**
   * A lease on `chunk`, detached once every hold was released; or, given a release, holds counted on a
   * chunk that is itself under one hold (several holders downstream of one), released with the last.
   */
  constructor(chunk: Uint8Array | ReadRelease) {
    this.free = typeof chunk === "function" ? chunk : () => freeRead(chunk)
  }

  /** A hold for a holder that keeps views of the read past the current call. */
  retain(): ReadRelease {
    if (this.holds === 0) return NOOP
    this.holds++
    let released = false
    return () => {
      if (released) return
      released = true
      this.release()
    }
  }

  /** The reader is done with the read (its own hold); the memory goes once every holder released. */
  release(): void {
    if (this.holds === 0) return
    if (--this.holds === 0) this.free()
  }

  /** Whether the read's memory was given back. */
  get freed(): boolean {
    return this.holds === 0
  }
}

/** A release for holders of memory that is not leased (nothing to give back). */
export const noRelease: ReadRelease = NOOP

/** Detaches `chunk`'s memory when `chunk` is the whole of an `ArrayBuffer` of its own. */
export const freeRead = (chunk: Uint8Array): void => {
  const memory = chunk.buffer
  if (!(memory instanceof ArrayBuffer) || chunk.byteOffset !== 0 || memory.byteLength !== chunk.byteLength) return
  if (memory.byteLength === 0 || memory.detached) return
  memory.transfer(0)
}
