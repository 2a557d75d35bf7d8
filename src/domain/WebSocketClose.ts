/**
 * WebSocket close codes (RFC 6455 §7.4) as typed errors: which closes are clean, and what a failed one
 * means to an operator. Pure: no sockets here; `services/transport/WebSocketConnection.ts` applies it.
 */
import { Buffer } from "node:buffer"
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

/** A close frame's payload read: the code and reason the peer sent, or why the frame is invalid. */
export type ClosePayload =
  | { readonly _tag: "Close"; readonly code: number; readonly reason: string }
  | { readonly _tag: "Invalid"; readonly code: 1002 | 1007; readonly message: string }

const strictUtf8 = new TextDecoder("utf-8", { fatal: true })

/** Codes a close frame may carry (RFC 6455 §7.4; 1005, 1006 and 1015 are never sent). */
export const isValidWireCloseCode = (code: number): boolean =>
  (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999)

/** Reads the payload of a close frame (RFC 6455 §5.5.1): empty means 1005, no status. */
export const readClosePayload = (payload: Uint8Array): ClosePayload => {
  if (payload.length === 0) return { _tag: "Close", code: CloseCode.NoStatus, reason: "" }
  if (payload.length === 1) return { _tag: "Invalid", code: 1002, message: "websocket: a close frame with a 1-byte payload" }
  const code = (payload[0]! << 8) | payload[1]!
  if (!isValidWireCloseCode(code)) return { _tag: "Invalid", code: 1002, message: `websocket: a close frame with the invalid code ${code}` }
  try {
    return { _tag: "Close", code, reason: strictUtf8.decode(payload.subarray(2)) }
  } catch {
    return { _tag: "Invalid", code: 1007, message: "websocket: a close reason that is not UTF-8" }
  }
}

/** The payload of a close frame with `code` and `reason` (truncated to fit). */
export const encodeClosePayload = (code: number, reason: string): Buffer => {
  const text = Buffer.from(closeReason(reason), "utf8")
  const out = Buffer.allocUnsafe(2 + text.length)
  out.writeUInt16BE(code, 0)
  text.copy(out, 2)
  return out
}
