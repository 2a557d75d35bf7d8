/**
 * The one error family of yamux sessions and streams: a tagged error whose `reason` says what ended
 * the operation. Raised by Session and Stream; transports report their own TransportError.
 */
import { Schema } from "effect"

export const YamuxErrorReason = Schema.Literals([
  /** The peer broke the protocol; we sent GoAway(protocol error) and closed the session. */
  "ProtocolError",
  /** The session was closed locally (its scope closed); nothing more can happen on it. */
  "SessionClosed",
  /** The connection ended (EOF or error) without the peer saying GoAway first. */
  "RemoteClosed",
  /** The peer sent GoAway(normal): no new streams may be opened. */
  "RemoteGoAway",
  /** We sent GoAway: no new streams, in either direction. */
  "LocalGoAway",
  /** The peer ended the session with GoAway(protocol error) or GoAway(internal error). */
  "RemoteError",
  /** The transport failed while reading or writing. */
  "TransportError",
  /** The stream was reset (RST), by either side. */
  "StreamReset",
  /** Write after our own FIN. */
  "StreamClosed",
  /** The peer did not acknowledge an opened stream within the open timeout. */
  "OpenTimeout",
  /** A keepalive ping was not answered within the timeout; the session was closed. */
  "KeepAliveTimeout",
  /** `ping()` was not answered within the timeout (the session carries on). */
  "PingTimeout",
  /** Queued frames could not be written to the transport within the write timeout. */
  "WriteTimeout",
  /** This side has used every stream id of its parity. */
  "StreamsExhausted",
  /** The session already has `maxStreams` live streams. */
  "TooManyStreams",
  /** The peer opened streams faster than `peerStreamOpenRate`; we sent GoAway(protocol error). */
  "StreamOpenRateExceeded",
  /** The peer sent frames faster than `peerFrameRate`; we sent GoAway(protocol error). */
  "FrameRateExceeded"
])
export type YamuxErrorReason = typeof YamuxErrorReason.Type

export class YamuxError extends Schema.TaggedError<YamuxError>()("YamuxError", {
  reason: YamuxErrorReason,
  message: Schema.String
}) {}

/** Shorthand used across the session code. */
export const yamuxError = (reason: YamuxErrorReason, message: string): YamuxError =>
  new YamuxError({ reason, message })
