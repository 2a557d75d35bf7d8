/**
 * Pure yamux frame codec: header encode/decode on plain bytes and an incremental parser that turns
 * arbitrary chunks into frames. No I/O and no Effect runtime; session rules (windows, ids) live elsewhere.
 */
import { Schema } from "effect"
import {
  FLAG_ACK,
  FLAG_FIN,
  FLAG_RST,
  FLAG_SYN,
  type Frame,
  type FrameType,
  HEADER_SIZE,
  PROTOCOL_VERSION,
  TYPE_DATA,
  TYPE_GO_AWAY
} from "./Frame.ts"

/** Why bytes could not be decoded as yamux frames. */
export class FrameDecodeError extends Schema.TaggedError<FrameDecodeError>()("FrameDecodeError", {
  reason: Schema.Literals(["BadVersion", "UnknownType", "FrameTooLarge", "ParserDead"]),
  message: Schema.String
}) {}

/** Writes a header into `target` at `offset` (12 bytes). */
export const writeHeader = (
  target: Uint8Array,
  offset: number,
  type: FrameType,
  flags: number,
  streamId: number,
  length: number
): void => {
  target[offset] = PROTOCOL_VERSION
  target[offset + 1] = type
  target[offset + 2] = (flags >>> 8) & 0xff
  target[offset + 3] = flags & 0xff
  target[offset + 4] = streamId >>> 24
  target[offset + 5] = (streamId >>> 16) & 0xff
  target[offset + 6] = (streamId >>> 8) & 0xff
  target[offset + 7] = streamId & 0xff
  target[offset + 8] = length >>> 24
  target[offset + 9] = (length >>> 16) & 0xff
  target[offset + 10] = (length >>> 8) & 0xff
  target[offset + 11] = length & 0xff
}

/** A fresh 12-byte header. */
export const encodeHeader = (type: FrameType, flags: number, streamId: number, length: number): Uint8Array => {
  const out = new Uint8Array(HEADER_SIZE)
  writeHeader(out, 0, type, flags, streamId, length)
  return out
}

/** A whole frame (header and, for Data, the body) as one byte array. */
export const encodeFrame = (frame: Frame): Uint8Array => {
  const body = frame.type === TYPE_DATA ? frame.body ?? new Uint8Array(0) : undefined
  const length = body ? body.length : frame.length
  const out = new Uint8Array(HEADER_SIZE + (body ? body.length : 0))
  writeHeader(out, 0, frame.type, frame.flags, frame.streamId, length)
  if (body) out.set(body, HEADER_SIZE)
  return out
}

const readU32 = (b: Uint8Array, o: number): number =>
  ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0

/** A decoded header, before any body. */
export interface Header {
  readonly version: number
  readonly type: number
  readonly flags: number
  readonly streamId: number
  readonly length: number
}

/** Reads the 12 header bytes at `offset` without validating them. */
export const decodeHeader = (bytes: Uint8Array, offset = 0): Header => ({
  version: bytes[offset]!,
  type: bytes[offset + 1]!,
  flags: (bytes[offset + 2]! << 8) | bytes[offset + 3]!,
  streamId: readU32(bytes, offset + 4),
  length: readU32(bytes, offset + 8)
})

/** Checks a header: version, type and (for Data) the body size limit. */
export const validateHeader = (h: Header, maxFrameSize: number): FrameDecodeError | undefined => {
  if (h.version !== PROTOCOL_VERSION) {
    return new FrameDecodeError({ reason: "BadVersion", message: `unsupported yamux version ${h.version}` })
  }
  if (h.type > TYPE_GO_AWAY) {
    return new FrameDecodeError({ reason: "UnknownType", message: `unknown yamux frame type ${h.type}` })
  }
  if (h.type === TYPE_DATA && h.length > maxFrameSize) {
    return new FrameDecodeError({
      reason: "FrameTooLarge",
      message: `Data frame of ${h.length} bytes exceeds the limit of ${maxFrameSize}`
    })
  }
  return undefined
}

/** Short text for a flag set, e.g. "SYN|FIN". */
export const flagNames = (flags: number): string => {
  const names: Array<string> = []
  if (flags & FLAG_SYN) names.push("SYN")
  if (flags & FLAG_ACK) names.push("ACK")
  if (flags & FLAG_FIN) names.push("FIN")
  if (flags & FLAG_RST) names.push("RST")
  return names.join("|")
}

/** What one `push` produced: the frames completed by the chunk, then the error that stopped it, if any. */
export interface ParseResult {
  readonly frames: ReadonlyArray<Frame>
  readonly error: FrameDecodeError | undefined
}

export interface FrameParser {
  /**
   * Feeds the next chunk. Data bodies may be views into the chunks (see `makeFrameParser`): the caller
   * must not modify a chunk after pushing it.
   */
  readonly push: (chunk: Uint8Array) => ParseResult
  /** Bytes held for a frame not yet complete (at most 12 + maxFrameSize). */
  readonly buffered: () => number
  /** Whether a Data frame not yet complete holds parts of the chunks pushed (zero-copy parsing only). */
  readonly holdsParts: () => boolean
  /** Whether a Data frame not yet complete keeps a view of `chunk` (its last part; small parts are copies). */
  readonly keepsViewOf: (chunk: Uint8Array) => boolean
  /** True once an error was returned; every later push fails with ParserDead. */
  readonly dead: () => boolean
}

const EMPTY = new Uint8Array(0)

/**
 * A view keeps its whole buffer alive; copy bodies that are small next to the memory behind their chunk
 * so a peer cannot pin many large buffers with tiny frames (retained memory stays within this factor of
 * the payload).
 */
export const VIEW_RETENTION_FACTOR = 4

/**
 * A copy of `view[start, end)` in new memory, of the view's own class. (Node's `Buffer#slice` returns a
 * view, so it is not called directly.)
 */
export const copyBytes = (view: Uint8Array, start?: number, end?: number): Uint8Array =>
  Uint8Array.prototype.slice.call(view, start, end)

const keep = (chunk: Uint8Array, start: number, end: number): Uint8Array =>
  (end - start) * VIEW_RETENTION_FACTOR >= chunk.buffer.byteLength ? chunk.subarray(start, end) : copyBytes(chunk, start, end)

export interface FrameParserOptions {
  /** Largest Data body accepted; checked on the header, before anything is allocated. */
  readonly maxFrameSize: number
  /**
   * Deliver a Data body that spans chunks as `parts` (views, no copy) instead of one contiguous `body`.
   * Sessions use it on the hot path; tools and tests get contiguous bodies.
   */
  readonly zeroCopy?: boolean | undefined
}

/**
 * An incremental parser. The Data length is checked against `maxFrameSize` on the header, before any
 * body is allocated; after the first error the parser is dead.
 */
export const makeFrameParser = (options: FrameParserOptions): FrameParser => {
  const maxFrameSize = options.maxFrameSize
  const zeroCopy = options.zeroCopy === true
  const head = new Uint8Array(HEADER_SIZE)
  let headFill = 0
  let current: Header | undefined
  let body: Uint8Array | undefined
  let parts: Array<Uint8Array> | undefined
  let bodyFill = 0
  let failed: FrameDecodeError | undefined

  const fail = (frames: Array<Frame>, error: FrameDecodeError): ParseResult => {
    failed = error
    current = undefined
    body = undefined
    parts = undefined
    return { frames, error }
  }

  const push = (chunk: Uint8Array): ParseResult => {
    const frames: Array<Frame> = []
    if (failed) {
      return { frames, error: new FrameDecodeError({ reason: "ParserDead", message: "parser stopped after an error" }) }
    }
    let i = 0
    const n = chunk.length
    while (i < n) {
      if (current === undefined) {
        let h: Header
        if (headFill === 0 && n - i >= HEADER_SIZE) {
          h = decodeHeader(chunk, i)
          i += HEADER_SIZE
        } else {
          const take = Math.min(HEADER_SIZE - headFill, n - i)
          head.set(chunk.subarray(i, i + take), headFill)
          headFill += take
          i += take
          if (headFill < HEADER_SIZE) break
          headFill = 0
          h = decodeHeader(head, 0)
        }
        const error = validateHeader(h, maxFrameSize)
        if (error) return fail(frames, error)
        if (h.type !== TYPE_DATA) {
          frames.push({ type: h.type as FrameType, flags: h.flags, streamId: h.streamId, length: h.length, body: undefined })
          continue
        }
        if (h.length === 0) {
          frames.push({ type: TYPE_DATA, flags: h.flags, streamId: h.streamId, length: 0, body: EMPTY })
          continue
        }
        if (n - i >= h.length) {
          frames.push({
            type: TYPE_DATA,
            flags: h.flags,
            streamId: h.streamId,
            length: h.length,
            body: keep(chunk, i, i + h.length)
          })
          i += h.length
          continue
        }
        current = h
        bodyFill = 0
        if (zeroCopy) parts = []
        else body = new Uint8Array(h.length)
        continue
      }
      const take = Math.min(current.length - bodyFill, n - i)
      if (parts) parts.push(keep(chunk, i, i + take))
      else body!.set(chunk.subarray(i, i + take), bodyFill)
      bodyFill += take
      i += take
      if (bodyFill === current.length) {
        frames.push(
          parts
            ? { type: TYPE_DATA, flags: current.flags, streamId: current.streamId, length: current.length, body: undefined, parts }
            : { type: TYPE_DATA, flags: current.flags, streamId: current.streamId, length: current.length, body }
        )
        current = undefined
        body = undefined
        parts = undefined
      }
    }
    return { frames, error: undefined }
  }

  return {
    push,
    buffered: () => headFill + (current ? bodyFill : 0),
    holdsParts: () => parts !== undefined && parts.length > 0,
    keepsViewOf: (chunk) => parts !== undefined && parts.length > 0 && parts[parts.length - 1]!.buffer === chunk.buffer,
    dead: () => failed !== undefined
  }
}
