/**
 * Reads WebSocket frames (RFC 6455 §5) as they arrive, for switchyard's own WebSocket endpoint. Data
 * message payload is passed on as views of the input, unmasked in place, a frame split across reads
 * handed over in parts: a relay never waits for a whole frame or message, and never copies one. Control
 * frames are collected (at most 125 bytes) and handed over whole. Every rule of §5 a receiver must
 * enforce is checked (reserved bits, opcodes, masking by role, control frame length and fragmentation,
 * continuation order, 64-bit lengths) plus the message size limit; the first violation stops the
 * decoder with the close code to send. No extensions are negotiated, so no RSV bit is ever valid.
 * Pure: no I/O; unmasking is passed in.
 */
import { Buffer } from "node:buffer"

/** Opcodes (RFC 6455 §5.2). */
export const Opcode = {
  Continuation: 0x0,
  Text: 0x1,
  Binary: 0x2,
  Close: 0x8,
  Ping: 0x9,
  Pong: 0xa
} as const

/** Longest frame header: 2 bytes, a 64-bit length, a masking key. */
export const MAX_FRAME_HEADER_BYTES = 14
/** Longest payload of a control frame (RFC 6455 §5.5). */
export const MAX_CONTROL_PAYLOAD_BYTES = 125

/** What the decoder hands over, in wire order. */
export interface FrameEvents {
  /** A data message begins (`binary`: opcode 2, else text). */
  messageStart(binary: boolean): void
  /** Payload of the current data message: a view of the input, unmasked, valid until the call returns. */
  messageData(payload: Buffer): void
  /** The current data message ended (its FIN frame is complete). */
  messageEnd(): void
  /** A complete control frame; `payload` is the decoder's own copy, reused after the call returns. */
  control(opcode: number, payload: Buffer): void
}

/** Why the decoder stopped: the close code to send (1002 protocol error, 1009 too large) and why. */
export interface FrameViolation {
  readonly code: 1002 | 1009
  readonly message: string
}

export interface FrameDecoderOptions {
  /** Largest data message, summed over its frames; more is 1009. */
  readonly maxMessageBytes: number
  /** Frames must carry a masking key (a server reading a client), or must not (a client reading a server). */
  readonly expectMasked: boolean
  /** Unmasks `data` in place with the 4-byte `key` (the key of its first byte). */
  readonly unmask: (data: Buffer, key: Buffer) => void
}

/** 2^53 / 2^32: larger 64-bit lengths are not exact in a JavaScript number. */
const MAX_SAFE_HIGH_WORD = 0x1fffff

export class FrameDecoder {
  private readonly maxMessageBytes: number
  private readonly expectMasked: boolean
  private readonly unmask: (data: Buffer, key: Buffer) => void
  /** Header bytes of a frame split across reads. */
  private readonly header = Buffer.alloc(MAX_FRAME_HEADER_BYTES)
  private headerBytes = 0
  /** Payload bytes still to come in the current frame (0 between frames). */
  private frameRemaining = 0
  private frameOpcode = 0
  private frameFin = false
  private readonly mask = Buffer.alloc(4)
  private masked = false
  private maskOffset = 0
  /** The mask turned to start at `maskOffset`. */
  private readonly rotated = Buffer.alloc(4)
  /** A control frame's payload as it arrives. */
  private readonly controlPayload = Buffer.alloc(MAX_CONTROL_PAYLOAD_BYTES)
  private controlBytes = 0
  /** A data message has started and not ended. */
  private inMessage = false
  /** Payload bytes of the current message announced so far. */
  private messageBytes = 0
  private violation: FrameViolation | undefined = undefined
  private isStopped = false

  constructor(options: FrameDecoderOptions) {
    this.maxMessageBytes = options.maxMessageBytes
    this.expectMasked = options.expectMasked
    this.unmask = options.unmask
  }

  /** The violation that stopped the decoder, if one did. */
  get failed(): FrameViolation | undefined {
    return this.violation
  }

  /** Decoding ended for good (`stop`, or a violation). */
  get stopped(): boolean {
    return this.isStopped
  }

  /** A data message is in progress (started, not ended). */
  get midMessage(): boolean {
    return this.inMessage
  }

  /** Stops decoding for good: the rest of the current input and all later input are ignored (after a close). */
  stop(): void {
    this.isStopped = true
  }

  /**
   * Holds decoding after the event in progress: `read` returns how far it got, and the caller feeds the
   * rest again after `release()` (a consumer that paused between two events of one input).
   */
  hold(): void {
    this.held = true
  }

  release(): void {
    this.held = false
  }

  private held = false

  /**
   * Decodes `chunk`, calling `events` in wire order; returns how many bytes of it were taken: all of
   * it, unless a callback called `hold()` or `stop()`, or a rule was broken (see `failed`).
   */
  read(chunk: Buffer, events: FrameEvents): number {
    if (this.isStopped || this.held) return 0
    let i = 0
    const end = chunk.length
    while (i < end || this.frameComplete) {
      if (this.frameComplete) {
        this.frameComplete = false
        this.frameDone(events)
        if (this.isStopped || this.held) return i
        continue
      }
      if (this.frameRemaining > 0) {
        const n = end - i < this.frameRemaining ? end - i : this.frameRemaining
        const payload = chunk.subarray(i, i + n)
        if (this.masked) this.unmaskRun(payload)
        this.frameRemaining -= n
        this.maskOffset += n
        i += n
        if (this.frameOpcode >= Opcode.Close) {
          payload.copy(this.controlPayload, this.controlBytes)
          this.controlBytes += n
        } else events.messageData(payload)
        if (this.frameRemaining === 0) this.frameComplete = true
        if (this.isStopped || this.held) return i
        continue
      }
      // a frame header, possibly completing one begun in earlier input
      const need = this.headerLength(chunk, i)
      if (need === 0 || this.headerBytes + end - i < need) {
        chunk.copy(this.header, this.headerBytes, i, end)
        this.headerBytes += end - i
        return end
      }
      const take = need - this.headerBytes
      let h: Buffer
      if (this.headerBytes === 0) h = chunk.subarray(i, i + need)
      else {
        chunk.copy(this.header, this.headerBytes, i, i + take)
        h = this.header
      }
      i += take
      this.headerBytes = 0
      const problem = this.startFrame(h, events)
      if (problem !== undefined) {
        this.fail(problem)
        return i
      }
      if (this.isStopped || this.held) return i
    }
    return end
  }

  /** The current frame's payload is complete (an empty one as soon as its header is): `frameDone` is due. */
  private frameComplete = false

  /** The header's full length once its first two bytes are known; 0 while they are not. */
  private headerLength(chunk: Buffer, i: number): number {
    const had = this.headerBytes
    if (had + chunk.length - i < 2) return 0
    const b1 = had > 1 ? this.header[1]! : chunk[i + 1 - had]!
    const len = b1 & 0x7f
    return 2 + (len === 126 ? 2 : len === 127 ? 8 : 0) + ((b1 & 0x80) !== 0 ? 4 : 0)
  }

  /** Reads a complete header: checks it and sets the frame up; the violation when it breaks a rule. */
  private startFrame(h: Buffer, events: FrameEvents): FrameViolation | undefined {
    const b0 = h[0]!
    const b1 = h[1]!
    const fin = (b0 & 0x80) !== 0
    const opcode = b0 & 0x0f
    const masked = (b1 & 0x80) !== 0
    if ((b0 & 0x70) !== 0) return protocol("a frame with reserved bits set (no extension was negotiated)")
    const control = opcode >= Opcode.Close
    if (control) {
      if (opcode > Opcode.Pong) return protocol(`a frame with the reserved control opcode ${opcode}`)
      if (!fin) return protocol("a fragmented control frame")
    } else if (opcode > Opcode.Binary) return protocol(`a frame with the reserved data opcode ${opcode}`)
    else if (opcode === Opcode.Continuation && !this.inMessage) return protocol("a continuation frame outside a message")
    else if (opcode !== Opcode.Continuation && this.inMessage) return protocol("a new data message before the previous one ended")
    if (masked !== this.expectMasked) {
      return protocol(this.expectMasked ? "an unmasked frame from a client" : "a masked frame from a server")
    }
    let len = b1 & 0x7f
    let at = 2
    if (len === 126) {
      len = h.readUInt16BE(2)
      at = 4
    } else if (len === 127) {
      const high = h.readUInt32BE(2)
      if (high >= 0x80000000) return protocol("a 64-bit payload length with its most significant bit set")
      if (high > MAX_SAFE_HIGH_WORD) return tooLarge(this.maxMessageBytes)
      len = high * 0x100000000 + h.readUInt32BE(6)
      at = 10
    }
    if (control) {
      if (len > MAX_CONTROL_PAYLOAD_BYTES) return protocol(`a control frame of ${len} bytes (at most ${MAX_CONTROL_PAYLOAD_BYTES})`)
      this.controlBytes = 0
    } else {
      if (this.messageBytes + len > this.maxMessageBytes) return tooLarge(this.maxMessageBytes)
      this.messageBytes += len
    }
    if (masked) {
      this.mask[0] = h[at]!
      this.mask[1] = h[at + 1]!
      this.mask[2] = h[at + 2]!
      this.mask[3] = h[at + 3]!
    }
    // an all-zero key leaves the payload as it is
    this.masked = masked && (this.mask[0]! | this.mask[1]! | this.mask[2]! | this.mask[3]!) !== 0
    this.maskOffset = 0
    this.frameOpcode = opcode
    this.frameFin = fin
    this.frameRemaining = len
    if (!control && opcode !== Opcode.Continuation) {
      this.inMessage = true
      events.messageStart(opcode === Opcode.Binary)
    }
    if (len === 0) this.frameComplete = true
    return undefined
  }

  /** The current frame's payload is complete. */
  private frameDone(events: FrameEvents): void {
    if (this.frameOpcode >= Opcode.Close) {
      events.control(this.frameOpcode, this.controlPayload.subarray(0, this.controlBytes))
      return
    }
    if (!this.frameFin) return
    this.inMessage = false
    this.messageBytes = 0
    events.messageEnd()
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

  private fail(violation: FrameViolation): void {
    this.violation = violation
    this.isStopped = true
  }
}

const protocol = (what: string): FrameViolation => ({ code: 1002, message: `websocket: ${what}` })
const tooLarge = (max: number): FrameViolation => ({ code: 1009, message: `websocket: a message larger than ${max} bytes` })
