/**
 * Reads the data frames of one WebSocket message (RFC 6455 §5.2) as they arrive, passing each payload
 * run on as a view of the input (unmasked in place, a frame split across reads handed over in parts),
 * so a relay never waits for or copies a whole frame. It takes only what a streamed body is made of:
 * binary and continuation frames, without RSV bits, masked as expected, within the message limit.
 * Anything else (control frames, other opcodes, a violation) is handed back, at the frame's first byte,
 * to a complete WebSocket implementation that answers it. Pure: no I/O; unmasking is passed in.
 */

/** Opcodes (RFC 6455 §5.2). */
export const OPCODE_CONTINUATION = 0x0
export const OPCODE_BINARY = 0x2

/** Longest frame header: 2 bytes, a 64-bit length, a masking key. */
export const MAX_FRAME_HEADER_BYTES = 14

/** Where a message stands when a reader takes it over. */
export interface DataReaderStart {
  /** The message's frames so far announced this many payload bytes (the current frame's included). */
  readonly total: number
  /** A message has started (its first frame was read): further frames must be continuations. */
  readonly inMessage: boolean
  /** Payload bytes still to come in the current frame (0: the input starts at a frame boundary). */
  readonly frameRemaining: number
  /** The current frame is the message's last. */
  readonly fin: boolean
  /** The current frame's masking key, and how many of its payload bytes were already unmasked. */
  readonly mask: Uint8Array | undefined
  readonly maskOffset: number
}

/** A reader at a frame boundary with no message started. */
export const messageStart: DataReaderStart = { total: 0, inMessage: false, frameRemaining: 0, fin: false, mask: undefined, maskOffset: 0 }

/** What one `read` did. */
export type DataReadStep =
  /** All input was taken; more of the message is to come. */
  | { readonly _tag: "Continue" }
  /** The message ended; input from `at` follows it and is not the reader's. */
  | { readonly _tag: "End"; readonly at: number }
  /**
   * A frame this reader does not take starts at `at` (preceded by `prefix`, its first bytes, when they
   * came in earlier input). The reader stops there, at a frame boundary.
   */
  | { readonly _tag: "Handover"; readonly at: number; readonly prefix: Buffer | undefined }

const CONTINUE: DataReadStep = { _tag: "Continue" }

/** 2^53: larger lengths are not exact in a JavaScript number. */
const MAX_SAFE_HIGH_WORD = 0x1fffff

export class DataFrameReader {
  /** Payload bytes of the message announced so far. */
  total: number
  /** A message has started. */
  inMessage: boolean
  private frameRemaining: number
  private fin: boolean
  private readonly mask = new Uint8Array(4)
  private masked: boolean
  private maskOffset: number
  /** Rotated key for unmasking a run that starts `maskOffset` bytes into a frame. */
  private readonly rotated = Buffer.alloc(4)
  /** Header bytes of a frame split across reads. */
  private readonly header = Buffer.alloc(MAX_FRAME_HEADER_BYTES)
  private headerBytes = 0
  private readonly maxMessageBytes: number
  private readonly expectMasked: boolean
  private readonly unmask: (data: Buffer, mask: Buffer) => void

  constructor(start: DataReaderStart, maxMessageBytes: number, expectMasked: boolean, unmask: (data: Buffer, mask: Buffer) => void) {
    this.total = start.total
    this.inMessage = start.inMessage
    this.frameRemaining = start.frameRemaining
    this.fin = start.fin
    if (start.mask !== undefined) this.mask.set(start.mask.subarray(0, 4))
    // an all-zero key leaves the payload as it is
    this.masked = start.mask !== undefined && (this.mask[0]! | this.mask[1]! | this.mask[2]! | this.mask[3]!) !== 0
    this.maskOffset = start.maskOffset
    this.maxMessageBytes = maxMessageBytes
    this.expectMasked = expectMasked
    this.unmask = unmask
  }

  /** Passes on the payload in `chunk` (unmasked in place) to `onPayload`, frame by frame. */
  read(chunk: Buffer, onPayload: (payload: Buffer) => void): DataReadStep {
    let i = 0
    const end = chunk.length
    for (;;) {
      if (this.frameRemaining > 0) {
        const n = end - i < this.frameRemaining ? end - i : this.frameRemaining
        if (n === 0) return CONTINUE
        const payload = chunk.subarray(i, i + n)
        if (this.masked) this.unmaskRun(payload)
        this.frameRemaining -= n
        this.maskOffset += n
        i += n
        onPayload(payload)
        if (this.frameRemaining > 0) return CONTINUE
        if (this.fin) return this.ended(i)
        continue
      }
      // a frame header, possibly completing one begun in earlier input
      const headerStart = i
      const had = this.headerBytes
      const need = this.headerLength(chunk, i)
      if (need === -1) return this.handover(headerStart, had)
      if (need === 0) {
        // not enough bytes yet to know the header's length: keep them
        this.keep(chunk, i, end)
        return CONTINUE
      }
      if (had + end - i < need) {
        this.keep(chunk, i, end)
        return CONTINUE
      }
      const take = need - had
      const h = had === 0 ? chunk.subarray(i, i + need) : this.completeHeader(chunk, i, take)
      const step = this.startFrame(h)
      if (!step) return this.handover(headerStart, had)
      this.headerBytes = 0
      i += take
      if (this.frameRemaining === 0 && this.fin) return this.ended(i)
      if (i >= end) return CONTINUE
    }
  }

  /** The header's full length once its first two bytes are known; 0 if they are not yet; -1 if the frame is not taken. */
  private headerLength(chunk: Buffer, i: number): number {
    const had = this.headerBytes
    const available = had + chunk.length - i
    if (available < 2) return 0
    const b0 = had > 0 ? this.header[0]! : chunk[i]!
    const b1 = had > 1 ? this.header[1]! : chunk[i + 1 - had]!
    const opcode = b0 & 0x0f
    if ((b0 & 0x70) !== 0) return -1
    if (opcode !== (this.inMessage ? OPCODE_CONTINUATION : OPCODE_BINARY)) return -1
    const masked = (b1 & 0x80) !== 0
    if (masked !== this.expectMasked) return -1
    const len = b1 & 0x7f
    return 2 + (len === 126 ? 2 : len === 127 ? 8 : 0) + (masked ? 4 : 0)
  }

  /** Reads a complete header; false when the frame is not taken (the length is not acceptable). */
  private startFrame(h: Buffer): boolean {
    const fin = (h[0]! & 0x80) !== 0
    const masked = (h[1]! & 0x80) !== 0
    let len = h[1]! & 0x7f
    let at = 2
    if (len === 126) {
      len = h.readUInt16BE(2)
      at = 4
    } else if (len === 127) {
      const high = h.readUInt32BE(2)
      if (high > MAX_SAFE_HIGH_WORD) return false
      len = high * 0x100000000 + h.readUInt32BE(6)
      at = 10
    }
    if (this.total + len > this.maxMessageBytes) return false
    if (masked) {
      this.mask[0] = h[at]!
      this.mask[1] = h[at + 1]!
      this.mask[2] = h[at + 2]!
      this.mask[3] = h[at + 3]!
    }
    this.masked = masked && (this.mask[0]! | this.mask[1]! | this.mask[2]! | this.mask[3]!) !== 0
    this.maskOffset = 0
    this.fin = fin
    this.frameRemaining = len
    this.total += len
    this.inMessage = true
    return true
  }

  private completeHeader(chunk: Buffer, i: number, take: number): Buffer {
    chunk.copy(this.header, this.headerBytes, i, i + take)
    return this.header
  }

  private keep(chunk: Buffer, from: number, to: number): void {
    chunk.copy(this.header, this.headerBytes, from, to)
    this.headerBytes += to - from
  }

  private unmaskRun(payload: Buffer): void {
    const o = this.maskOffset & 3
    const r = this.rotated
    r[0] = this.mask[o]!
    r[1] = this.mask[(o + 1) & 3]!
    r[2] = this.mask[(o + 2) & 3]!
    r[3] = this.mask[(o + 3) & 3]!
    this.unmask(payload, r)
  }

  private ended(at: number): DataReadStep {
    this.inMessage = false
    this.total = 0
    return { _tag: "End", at }
  }

  private handover(at: number, had: number): DataReadStep {
    const prefix = had > 0 ? Buffer.from(this.header.subarray(0, had)) : undefined
    this.headerBytes = 0
    // bytes of this header already taken from `chunk` were copied into `header`; the frame starts here
    return { _tag: "Handover", at: had > 0 ? 0 : at, prefix }
  }
}
