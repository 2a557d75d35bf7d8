/**
 * WebSocket close codes (RFC 6455 §7.4) as typed errors: which closes are clean, and what a failed one
 * means to an operator. Pure: no sockets here; `services/transport/WebSocketConnection.ts` applies it.
 */
import { Schema } from "effect"

/** The close codes switchyard sends or interprets. */
export const CloseCode = {
  Normal: 1000,
  GoingAway: 1001,
  ProtocolError: 1002,
  UnsupportedData: 1003,
  NoStatus: 1005,
  Abnormal: 1006,
  InvalidPayload: 1007,
  PolicyViolation: 1008,
  TooLarge: 1009,
  InternalError: 1011,
  TryAgainLater: 1013
} as const

/** Longest close reason a control frame can carry (125-byte payload minus the 2-byte code). */
export const MaxCloseReasonBytes = 123

/** A WebSocket failed, was closed by the peer with an error code, or could not be opened. */
export class WebSocketError extends Schema.TaggedError<WebSocketError>()("WebSocketError", {
  reason: Schema.Literals([
    "GoingAway",
    "ProtocolError",
    "UnsupportedData",
    "Abnormal",
    "InvalidPayload",
    "PolicyViolation",
    "TooLarge",
    "InternalError",
    "TryAgainLater",
    "OtherCode",
    "KeepaliveTimeout",
    "ReadOverflow",
    "BadUrl",
    "Handshake",
    "Proxy"
  ]),
  /** The close code received or sent, when there was one. */
  code: Schema.optionalKey(Schema.Number),
  message: Schema.String
}) {}

const reasons: ReadonlyMap<number, WebSocketError["reason"]> = new Map([
  [CloseCode.GoingAway, "GoingAway"],
  [CloseCode.ProtocolError, "ProtocolError"],
  [CloseCode.UnsupportedData, "UnsupportedData"],
  [CloseCode.Abnormal, "Abnormal"],
  [CloseCode.InvalidPayload, "InvalidPayload"],
  [CloseCode.PolicyViolation, "PolicyViolation"],
  [CloseCode.TooLarge, "TooLarge"],
  [CloseCode.InternalError, "InternalError"],
  [CloseCode.TryAgainLater, "TryAgainLater"]
])

/** True for the closes that end a connection without an error (1000, and a close frame with no code). */
export const isCleanClose = (code: number): boolean => code === CloseCode.Normal || code === CloseCode.NoStatus

/** The error a close with `code` and `reason` stands for; undefined for a clean close. */
export const closeError = (code: number, reason: string): WebSocketError | undefined => {
  if (isCleanClose(code)) return undefined
  const tag = reasons.get(code) ?? "OtherCode"
  const text = reason === "" ? "" : `: ${reason}`
  return new WebSocketError({ reason: tag, code, message: `websocket closed with ${code} (${tag})${text}` })
}

/** Truncates `reason` so that it fits a close frame (UTF-8, at most `MaxCloseReasonBytes`). */
export const closeReason = (reason: string): string => {
  let out = reason.slice(0, MaxCloseReasonBytes)
  while (new TextEncoder().encode(out).length > MaxCloseReasonBytes) out = out.slice(0, -1)
  return out
}
