/**
 * Where a session assembles its outgoing frames: each frame, header and body, is copied into a slab, and
 * a batch leaves as the filled parts of its slabs. A writer's buffer is therefore never referenced once
 * `frame` returns, so a reader may read the next bytes into the same buffer (Node's `onread`). When the
 * transport says a batch it wrote is no longer referenced (`Connection.releasesOnDone`), its slabs are
 * kept for the next batches, so a steady stream of data allocates nothing.
 */
import { type FrameType, HEADER_SIZE } from "../../domain/Frame.ts"
import { writeHeader } from "../../domain/FrameCodec.ts"

/** Slab for control frames (window updates, pings): a batch of those stays within it. */
export const MIN_SLAB_BYTES = 4 * 1024
/** Slab for data; one larger frame gets a slab of its own size. */
export const MAX_SLAB_BYTES = 256 * 1024
/**
 * Released slabs kept for reuse: a full write queue (1 MiB by default) in flight and the next one being
 * assembled. A session keeps them while it sends data; a batch of control frames alone lets them go.
 */
export const SPARE_SLABS = 8

const EMPTY = new Uint8Array(0)

/** What one batch is: the chunks to write, and the slabs they lie in (to release once written). */
export interface AssembledBatch {
  readonly chunks: ReadonlyArray<Uint8Array>
  readonly slabs: ReadonlyArray<Uint8Array>
  readonly bytes: number
}

export class FrameAssembler {
  /** Bytes of frames assembled and not yet taken. */
  bytes = 0
  private slab: Uint8Array = EMPTY
  private used = 0
  /** Start of the part of `slab` not yet in `chunks`. */
  private segmentStart = 0
  /** `slab` holds bytes of the batch being assembled. */
  private slabInBatch = false
  private chunks: Array<Uint8Array> = []
  private slabs: Array<Uint8Array> = []
  private spare: Array<Uint8Array> = []

  /** Appends one frame; `body` (if any) is copied. */
  frame(type: FrameType, flags: number, streamId: number, length: number, body?: Uint8Array): void {
    const bodyBytes = body === undefined ? 0 : body.length
    const need = HEADER_SIZE + bodyBytes
    if (this.used + need > this.slab.length) this.nextSlab(need)
    const at = this.used
    writeHeader(this.slab, at, type, flags, streamId, length)
    if (bodyBytes > 0) this.slab.set(body!, at + HEADER_SIZE)
    this.used = at + need
    this.bytes += need
    if (!this.slabInBatch) {
      this.slabInBatch = true
      this.slabs.push(this.slab)
    }
  }

  /** Takes the batch assembled so far (empty when nothing is). */
  take(): AssembledBatch {
    this.closeSegment()
    const batch: AssembledBatch = { chunks: this.chunks, slabs: this.slabs, bytes: this.bytes }
    this.chunks = []
    this.slabs = []
    this.bytes = 0
    // the slab goes with the batch: nothing more is written into it until it is released
    if (this.slabInBatch) {
      this.slab = EMPTY
      this.used = 0
      this.segmentStart = 0
      this.slabInBatch = false
    }
    return batch
  }

  /**
   * The transport no longer references `batch`: its slabs may take new frames. A batch of control frames
   * alone lets the large slabs go, so a session that goes quiet keeps one small slab.
   */
  release(batch: AssembledBatch): void {
    if (batch.bytes <= MIN_SLAB_BYTES) this.spare = this.spare.filter((slab) => slab.length <= MIN_SLAB_BYTES)
    for (const slab of batch.slabs) {
      if (this.spare.length >= SPARE_SLABS) return
      if (slab.length > MIN_SLAB_BYTES && batch.bytes <= MIN_SLAB_BYTES) continue
      this.spare.push(slab)
    }
  }

  private closeSegment(): void {
    if (this.used > this.segmentStart) {
      this.chunks.push(this.slab.subarray(this.segmentStart, this.used))
      this.segmentStart = this.used
    }
  }

  private nextSlab(need: number): void {
    this.closeSegment()
    let slab: Uint8Array | undefined
    for (let i = this.spare.length - 1; i >= 0; i--) {
      if (this.spare[i]!.length >= need) {
        slab = this.spare[i]!
        this.spare.splice(i, 1)
        break
      }
    }
    if (slab === undefined) {
      const want = this.bytes + need > MIN_SLAB_BYTES ? MAX_SLAB_BYTES : MIN_SLAB_BYTES
      slab = new Uint8Array(Math.max(need, want))
    }
    this.slab = slab
    this.used = 0
    this.segmentStart = 0
    this.slabInBatch = false
  }
}
