/**
 * yamux wire numbers (hashicorp/yamux protocol version 0) and the frame shape the codec produces.
 * Plain constants and types only: encoding lives in FrameCodec, behaviour in services/yamux.
 */

/** The only protocol version yamux has. */
export const PROTOCOL_VERSION = 0
/** Size of every frame header in bytes. */
export const HEADER_SIZE = 12

/** Frame types (header byte 1). */
export const TYPE_DATA = 0
export const TYPE_WINDOW_UPDATE = 1
export const TYPE_PING = 2
export const TYPE_GO_AWAY = 3
export type FrameType = typeof TYPE_DATA | typeof TYPE_WINDOW_UPDATE | typeof TYPE_PING | typeof TYPE_GO_AWAY

/** Flags (header bytes 2-3). */
export const FLAG_SYN = 0x1
export const FLAG_ACK = 0x2
export const FLAG_FIN = 0x4
export const FLAG_RST = 0x8

/** GoAway codes (the length field of a GoAway frame). */
export const GO_AWAY_NORMAL = 0
export const GO_AWAY_PROTOCOL_ERROR = 1
export const GO_AWAY_INTERNAL_ERROR = 2
export type GoAwayCode = typeof GO_AWAY_NORMAL | typeof GO_AWAY_PROTOCOL_ERROR | typeof GO_AWAY_INTERNAL_ERROR

/** Stream id of session-level frames (Ping, GoAway). */
export const SESSION_STREAM_ID = 0
/** Largest stream id (the field is an unsigned 32-bit integer). */
export const MAX_STREAM_ID = 0xffff_ffff
/** Largest value of the length field. */
export const MAX_LENGTH = 0xffff_ffff

/** Window every stream starts with, in both directions, per the spec. */
export const INITIAL_STREAM_WINDOW = 256 * 1024
/** Largest receive window switchyard will ever grow to. */
export const MAX_STREAM_WINDOW_LIMIT = 16 * 1024 * 1024

/** hashicorp/yamux DefaultConfig values, which switchyard matches. */
export const DEFAULT_ACCEPT_BACKLOG = 256
export const DEFAULT_KEEPALIVE_INTERVAL_MS = 30_000
export const DEFAULT_CONNECTION_WRITE_TIMEOUT_MS = 10_000
export const DEFAULT_STREAM_OPEN_TIMEOUT_MS = 75_000
export const DEFAULT_MAX_STREAM_WINDOW = INITIAL_STREAM_WINDOW

/** switchyard's own bounds. */
/** Largest Data body switchyard sends in one frame (keeps streams interleaved fairly). */
export const DEFAULT_MAX_SEND_FRAME = 64 * 1024
/** Bytes that may wait for the session's single writer before writers are held back. */
export const DEFAULT_WRITE_QUEUE_BYTES = 1024 * 1024
/** Unread payload in a session's not-yet-accepted streams above which the transport is paused. */
export const DEFAULT_SESSION_READ_BUFFER = 8 * 1024 * 1024
/** Live streams per session. */
export const DEFAULT_MAX_STREAMS = 65_536

/**
 * One decoded frame. For Data frames the payload is in `body` (possibly empty) or, from a zero-copy
 * parser when it spanned input chunks, in `parts` (in order); other types carry neither.
 */
export interface Frame {
  readonly type: FrameType
  readonly flags: number
  readonly streamId: number
  /** Data: body length; WindowUpdate: delta; Ping: opaque value; GoAway: code. */
  readonly length: number
  readonly body: Uint8Array | undefined
  readonly parts?: ReadonlyArray<Uint8Array> | undefined
}

/** Human-readable frame type, for errors and logs. */
export const typeName = (type: number): string =>
  type === TYPE_DATA
    ? "Data"
    : type === TYPE_WINDOW_UPDATE
    ? "WindowUpdate"
    : type === TYPE_PING
    ? "Ping"
    : type === TYPE_GO_AWAY
    ? "GoAway"
    : `Unknown(${type})`
