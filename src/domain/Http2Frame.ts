/**
 * HTTP/2 framing (RFC 9113 §4, §6) for switchyard's HTTP/2 client: wire numbers, frame encoders, and an
 * incremental parser that checks each frame's size and stream rules, joins HEADERS with their
 * CONTINUATIONs (bounded) and hands DATA payloads on as slices of the bytes it was given, without
 * copying or waiting for the whole frame. Pure; it keeps no stream state and does no flow control.
 */
import { Buffer } from "node:buffer"
import { Schema } from "effect"

/** What a client sends first on a connection (RFC 9113 §3.4). */
export const ClientPreface = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1")
/** Frame header size. */
export const FrameHeaderBytes = 9
/** SETTINGS_MAX_FRAME_SIZE before SETTINGS say otherwise, and its smallest legal value. */
export const DefaultMaxFrameBytes = 16_384
/** Largest legal SETTINGS_MAX_FRAME_SIZE. */
export const MaxFrameBytesLimit = 16_777_215
/** Flow-control window every stream and the connection start with. */
export const DefaultWindowBytes = 65_535
/** Largest flow-control window (2^31 - 1). */
export const MaxWindowBytes = 2_147_483_647
/** Largest stream identifier. */
export const MaxStreamId = 2_147_483_647
/** Most frames (HEADERS and CONTINUATIONs) one header block may span, so empty CONTINUATIONs cannot flood. */
export const MaxHeaderBlockFrames = 128

export const FrameType = {
  DATA: 0x0,
  HEADERS: 0x1,
  PRIORITY: 0x2,
  RST_STREAM: 0x3,
  SETTINGS: 0x4,
  PUSH_PROMISE: 0x5,
  PING: 0x6,
  GOAWAY: 0x7,
  WINDOW_UPDATE: 0x8,
  CONTINUATION: 0x9
} as const

export const Flag = {
  END_STREAM: 0x1,
  ACK: 0x1,
  END_HEADERS: 0x4,
  PADDED: 0x8,
  PRIORITY: 0x20
} as const

export const ErrorCode = {
  NO_ERROR: 0x0,
  PROTOCOL_ERROR: 0x1,
  INTERNAL_ERROR: 0x2,
  FLOW_CONTROL_ERROR: 0x3,
  SETTINGS_TIMEOUT: 0x4,
  STREAM_CLOSED: 0x5,
  FRAME_SIZE_ERROR: 0x6,
  REFUSED_STREAM: 0x7,
  CANCEL: 0x8,
  COMPRESSION_ERROR: 0x9,
  CONNECT_ERROR: 0xa,
  ENHANCE_YOUR_CALM: 0xb,
  INADEQUATE_SECURITY: 0xc,
  HTTP_1_1_REQUIRED: 0xd
} as const

export const Setting = {
  HEADER_TABLE_SIZE: 0x1,
  ENABLE_PUSH: 0x2,
  MAX_CONCURRENT_STREAMS: 0x3,
  INITIAL_WINDOW_SIZE: 0x4,
  MAX_FRAME_SIZE: 0x5,
  MAX_HEADER_LIST_SIZE: 0x6,
  /** RFC 8441 §3. */
  ENABLE_CONNECT_PROTOCOL: 0x8
} as const

/** A violation of the framing layer: the connection ends with GOAWAY and `code`. */
export class Http2FrameError extends Schema.TaggedError<Http2FrameError>()("Http2FrameError", {
  reason: Schema.Literals(["FrameSize", "Protocol", "HeaderBlockTooLarge"]),
  /** The RFC 9113 error code to send in GOAWAY. */
  code: Schema.Number,
  message: Schema.String
}) {}

const frameSize = (message: string) => new Http2FrameError({ reason: "FrameSize", code: ErrorCode.FRAME_SIZE_ERROR, message })
const protocol = (message: string) => new Http2FrameError({ reason: "Protocol", code: ErrorCode.PROTOCOL_ERROR, message })

// ---------------------------------------------------------------------------------------------------
// Encoding

/** Writes a frame header at `at`. */
export const writeFrameHeader = (out: Buffer, at: number, length: number, type: number, flags: number, streamId: number): void => {
  out[at] = (length >>> 16) & 0xff
  out[at + 1] = (length >>> 8) & 0xff
  out[at + 2] = length & 0xff
  out[at + 3] = type
  out[at + 4] = flags
  out.writeUInt32BE(streamId & 0x7fff_ffff, at + 5)
}

/** A whole frame with `payload`. */
export const encodeFrame = (type: number, flags: number, streamId: number, payload?: Uint8Array): Buffer => {
  const length = payload?.length ?? 0
  const out = Buffer.allocUnsafe(FrameHeaderBytes + length)
  writeFrameHeader(out, 0, length, type, flags, streamId)
  if (payload !== undefined) out.set(payload, FrameHeaderBytes)
  return out
}

/** SETTINGS with `[id, value]` pairs. */
export const encodeSettings = (settings: ReadonlyArray<readonly [number, number]>): Buffer => {
  const out = Buffer.allocUnsafe(FrameHeaderBytes + 6 * settings.length)
  writeFrameHeader(out, 0, 6 * settings.length, FrameType.SETTINGS, 0, 0)
  settings.forEach(([id, value], i) => {
    out.writeUInt16BE(id, FrameHeaderBytes + 6 * i)
    out.writeUInt32BE(value, FrameHeaderBytes + 6 * i + 2)
  })
  return out
}

export const SettingsAck: Buffer = encodeFrame(FrameType.SETTINGS, Flag.ACK, 0)

/** PING with its 8 opaque bytes. */
export const encodePing = (payload: Uint8Array, ack: boolean): Buffer => encodeFrame(FrameType.PING, ack ? Flag.ACK : 0, 0, payload)

export const encodeWindowUpdate = (streamId: number, increment: number): Buffer => {
  const out = Buffer.allocUnsafe(FrameHeaderBytes + 4)
  writeFrameHeader(out, 0, 4, FrameType.WINDOW_UPDATE, 0, streamId)
  out.writeUInt32BE(increment, FrameHeaderBytes)
  return out
}

export const encodeRstStream = (streamId: number, code: number): Buffer => {
  const out = Buffer.allocUnsafe(FrameHeaderBytes + 4)
  writeFrameHeader(out, 0, 4, FrameType.RST_STREAM, 0, streamId)
  out.writeUInt32BE(code, FrameHeaderBytes)
  return out
}

export const encodeGoaway = (lastStreamId: number, code: number, debug: string): Buffer => {
  const text = Buffer.from(debug, "utf8")
  const out = Buffer.allocUnsafe(FrameHeaderBytes + 8 + text.length)
  writeFrameHeader(out, 0, 8 + text.length, FrameType.GOAWAY, 0, 0)
  out.writeUInt32BE(lastStreamId, FrameHeaderBytes)
  out.writeUInt32BE(code, FrameHeaderBytes + 4)
  text.copy(out, FrameHeaderBytes + 8)
  return out
}

/** A header block as HEADERS plus CONTINUATION frames of at most `maxFrameBytes`, in one buffer. */
export const encodeHeaders = (streamId: number, block: Uint8Array, endStream: boolean, maxFrameBytes: number): Buffer => {
  const frames = Math.max(1, Math.ceil(block.length / maxFrameBytes))
  const out = Buffer.allocUnsafe(frames * FrameHeaderBytes + block.length)
  let at = 0
  for (let i = 0; i < frames; i++) {
    const start = i * maxFrameBytes
    const end = Math.min(block.length, start + maxFrameBytes)
    const last = i === frames - 1
    const type = i === 0 ? FrameType.HEADERS : FrameType.CONTINUATION
    const flags = (last ? Flag.END_HEADERS : 0) | (i === 0 && endStream ? Flag.END_STREAM : 0)
    writeFrameHeader(out, at, end - start, type, flags, streamId)
    out.set(block.subarray(start, end), at + FrameHeaderBytes)
    at += FrameHeaderBytes + end - start
  }
  return out
}

/** The header of a DATA frame whose payload is written next. */
export const encodeDataHeader = (streamId: number, length: number, endStream: boolean): Buffer => {
  const out = Buffer.allocUnsafe(FrameHeaderBytes)
  writeFrameHeader(out, 0, length, FrameType.DATA, endStream ? Flag.END_STREAM : 0, streamId)
  return out
}

// ---------------------------------------------------------------------------------------------------
// Parsing

/** What the parser hands on; each call sees a frame (or DATA slice) that passed the framing checks. */
export interface Http2FrameHandler {
  /** A DATA frame begins: `length` counts toward flow control (padding included). */
  readonly dataStart: (streamId: number, flags: number, length: number) => void
  /** Payload bytes of the current DATA frame (padding removed); a view of the pushed bytes. */
  readonly data: (streamId: number, chunk: Buffer) => void
  /** The current DATA frame is complete. */
  readonly dataEnd: (streamId: number, flags: number) => void
  /** A complete header block (HEADERS and its CONTINUATIONs; padding and priority removed). */
  readonly headers: (streamId: number, flags: number, block: Buffer) => void
  /** Any other frame of a known type, whole (PUSH_PROMISE included; PRIORITY is checked, then dropped). */
  readonly frame: (type: number, flags: number, streamId: number, payload: Buffer) => void
}

export interface Http2ParserLimits {
  /** The SETTINGS_MAX_FRAME_SIZE advertised: a longer frame is a FRAME_SIZE_ERROR. */
  readonly maxFrameBytes: number
  /** Largest header block (HEADERS + CONTINUATIONs) accepted. */
  readonly maxHeaderBlockBytes: number
}

// parser steps
const StepHeader = 0
const StepPayload = 1
const StepDataPadLength = 2
const StepDataPayload = 3
const StepDataPadding = 4

/**
 * Frames out of a byte stream. `push` returns an error once the stream breaks the framing rules, and
 * the parser is then dead. Frame payloads other than DATA are gathered (bounded by the frame size); DATA
 * payloads are passed on slice by slice as they arrive.
 */
export class Http2FrameParser {
  private readonly limits: Http2ParserLimits
  private readonly handler: Http2FrameHandler
  private step = StepHeader
  /** Partial frame header or payload being gathered. */
  private gather: Buffer | undefined = undefined
  private gathered = 0
  private length = 0
  private type = 0
  private flags = 0
  private streamId = 0
  /** DATA bytes of the current frame left (payload, then padding). */
  private left = 0
  private padding = 0
  /** Header block being joined: its stream, flags of the HEADERS frame, fragments so far. */
  private blockStream = 0
  private blockFlags = 0
  private blockParts: Array<Buffer> = []
  private blockBytes = 0
  private dead: Http2FrameError | undefined = undefined

  constructor(limits: Http2ParserLimits, handler: Http2FrameHandler) {
    this.limits = limits
    this.handler = handler
  }

  /** Consumes bytes; the handler is called for everything complete in them. */
  push(chunk: Buffer): Http2FrameError | undefined {
    if (this.dead !== undefined) return this.dead
    let at = 0
    const end = chunk.length
    while (at < end) {
      switch (this.step) {
        case StepHeader: {
          let header: Buffer
          if (this.gathered === 0 && end - at >= FrameHeaderBytes) {
            header = chunk
          } else {
            this.gather ??= Buffer.allocUnsafe(FrameHeaderBytes)
            const n = Math.min(FrameHeaderBytes - this.gathered, end - at)
            chunk.copy(this.gather, this.gathered, at, at + n)
            this.gathered += n
            at += n
            if (this.gathered < FrameHeaderBytes) return undefined
            header = this.gather
          }
          const h = header === chunk ? at : 0
          this.length = (header[h]! << 16) | (header[h + 1]! << 8) | header[h + 2]!
          this.type = header[h + 3]!
          this.flags = header[h + 4]!
          this.streamId = header.readUInt32BE(h + 5) & 0x7fff_ffff
          if (header === chunk) at += FrameHeaderBytes
          this.gathered = 0
          const error = this.checkHeader()
          if (error !== undefined) return this.fail(error)
          if (this.type === FrameType.DATA) {
            this.handler.dataStart(this.streamId, this.flags, this.length)
            this.left = this.length
            this.padding = 0
            this.step = (this.flags & Flag.PADDED) !== 0 ? StepDataPadLength : StepDataPayload
            if (this.length === 0) this.endData()
            continue
          }
          this.step = StepPayload
          if (this.length === 0) {
            const failure = this.complete(Buffer.alloc(0))
            if (failure !== undefined) return this.fail(failure)
          }
          continue
        }
        case StepPayload: {
          let payload: Buffer | undefined
          if (this.gathered === 0 && end - at >= this.length) {
            payload = chunk.subarray(at, at + this.length)
            at += this.length
          } else {
            if (this.gathered === 0) this.gather = Buffer.allocUnsafe(Math.max(this.length, FrameHeaderBytes))
            const n = Math.min(this.length - this.gathered, end - at)
            chunk.copy(this.gather!, this.gathered, at, at + n)
            this.gathered += n
            at += n
            if (this.gathered < this.length) return undefined
            payload = this.gather!.subarray(0, this.length)
            this.gather = undefined
            this.gathered = 0
          }
          const failure = this.complete(payload)
          if (failure !== undefined) return this.fail(failure)
          continue
        }
        case StepDataPadLength: {
          this.padding = chunk[at++]!
          this.left--
          if (this.padding > this.left) return this.fail(protocol("DATA padding longer than its frame"))
          this.step = StepDataPayload
          if (this.left === 0) this.endData()
          continue
        }
        case StepDataPayload: {
          const payloadLeft = this.left - this.padding
          const n = Math.min(payloadLeft, end - at)
          if (n > 0) {
            this.handler.data(this.streamId, chunk.subarray(at, at + n))
            at += n
            this.left -= n
          }
          if (this.left === this.padding) {
            if (this.padding === 0) this.endData()
            else this.step = StepDataPadding
          }
          continue
        }
        case StepDataPadding: {
          const n = Math.min(this.left, end - at)
          at += n
          this.left -= n
          if (this.left === 0) this.endData()
          continue
        }
      }
    }
    return undefined
  }

  private endData(): void {
    this.step = StepHeader
    this.handler.dataEnd(this.streamId, this.flags)
  }

  private fail(error: Http2FrameError): Http2FrameError {
    this.dead = error
    this.gather = undefined
    this.blockParts = []
    return error
  }

  /** Size and stream checks that need only the frame header (RFC 9113 §4.2, §6). */
  private checkHeader(): Http2FrameError | undefined {
    const { type, length, streamId } = this
    if (length > this.limits.maxFrameBytes) return frameSize(`a ${length}-byte frame exceeds the ${this.limits.maxFrameBytes} advertised`)
    if (this.blockStream !== 0 && (type !== FrameType.CONTINUATION || streamId !== this.blockStream)) {
      return protocol(`frame type ${type} in the middle of stream ${this.blockStream}'s header block`)
    }
    switch (type) {
      case FrameType.DATA:
      case FrameType.HEADERS:
      case FrameType.PRIORITY:
      case FrameType.RST_STREAM:
      case FrameType.PUSH_PROMISE:
      case FrameType.CONTINUATION:
        if (streamId === 0) return protocol(`frame type ${type} on stream 0`)
        break
      case FrameType.SETTINGS:
      case FrameType.PING:
      case FrameType.GOAWAY:
        if (streamId !== 0) return protocol(`frame type ${type} on stream ${streamId}`)
        break
    }
    switch (type) {
      case FrameType.CONTINUATION:
        if (this.blockStream === 0) return protocol("CONTINUATION without a header block in progress")
        break
      case FrameType.PRIORITY:
        if (length !== 5) return frameSize("PRIORITY frame of the wrong size")
        break
      case FrameType.RST_STREAM:
        if (length !== 4) return frameSize("RST_STREAM frame of the wrong size")
        break
      case FrameType.SETTINGS:
        if (length % 6 !== 0) return frameSize("SETTINGS length not a multiple of 6")
        if ((this.flags & Flag.ACK) !== 0 && length !== 0) return frameSize("SETTINGS ACK with a payload")
        break
      case FrameType.PING:
        if (length !== 8) return frameSize("PING frame of the wrong size")
        break
      case FrameType.GOAWAY:
        if (length < 8) return frameSize("GOAWAY frame too short")
        break
      case FrameType.WINDOW_UPDATE:
        if (length !== 4) return frameSize("WINDOW_UPDATE frame of the wrong size")
        break
    }
    return undefined
  }

  /** A whole non-DATA frame. */
  private complete(payload: Buffer): Http2FrameError | undefined {
    this.step = StepHeader
    const { type, flags, streamId } = this
    switch (type) {
      case FrameType.HEADERS: {
        let from = 0
        let to = payload.length
        if ((flags & Flag.PADDED) !== 0) {
          if (to < 1) return protocol("HEADERS padding without its length")
          const pad = payload[0]!
          from = 1
          if (pad > to - from) return protocol("HEADERS padding longer than its frame")
          to -= pad
        }
        if ((flags & Flag.PRIORITY) !== 0) {
          if (to - from < 5) return frameSize("HEADERS priority fields missing")
          from += 5
        }
        return this.fragment(streamId, flags, payload.subarray(from, to), (flags & Flag.END_HEADERS) !== 0)
      }
      case FrameType.CONTINUATION:
        return this.fragment(this.blockStream, this.blockFlags, payload, (flags & Flag.END_HEADERS) !== 0)
      case FrameType.PRIORITY:
        return undefined
      default:
        if (type > FrameType.CONTINUATION) return undefined // unknown types are ignored (§5.5)
        this.handler.frame(type, flags, streamId, payload)
        return undefined
    }
  }

  private fragment(streamId: number, flags: number, part: Buffer, last: boolean): Http2FrameError | undefined {
    this.blockBytes += part.length
    if (this.blockBytes > this.limits.maxHeaderBlockBytes || this.blockParts.length >= MaxHeaderBlockFrames) {
      return new Http2FrameError({
        reason: "HeaderBlockTooLarge",
        code: ErrorCode.ENHANCE_YOUR_CALM,
        message: `a header block above ${this.limits.maxHeaderBlockBytes} bytes or ${MaxHeaderBlockFrames} frames`
      })
    }
    if (last && this.blockParts.length === 0) {
      this.blockBytes = 0
      this.blockStream = 0
      this.handler.headers(streamId, flags, part)
      return undefined
    }
    // fragments may be views of bytes the caller reuses: keep copies until the block is whole
    this.blockParts.push(Buffer.from(part))
    this.blockStream = streamId
    this.blockFlags = flags
    if (!last) return undefined
    const block = Buffer.concat(this.blockParts, this.blockBytes)
    this.blockParts = []
    this.blockBytes = 0
    this.blockStream = 0
    this.handler.headers(streamId, flags, block)
    return undefined
  }
}
