/**
 * The WebSocket opening handshake (RFC 6455 §4) for switchyard's own endpoint: what a server checks in
 * an upgrade request and answers, and what a client sends and checks in the answer. No extension and no
 * subprotocol is ever negotiated (a server that selects one is refused). Pure: headers in, decisions out.
 */
import { createHash, randomBytes } from "node:crypto"

/** The GUID appended to the key (RFC 6455 §1.3). */
const HANDSHAKE_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
/** The only protocol version (RFC 6455 §4.1). */
export const WEBSOCKET_VERSION = "13"

/** The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key`. */
export const acceptValue = (key: string): string => createHash("sha1").update(key + HANDSHAKE_GUID).digest("base64")

/** A fresh `Sec-WebSocket-Key`: 16 random bytes in base64. */
export const newHandshakeKey = (): string => randomBytes(16).toString("base64")

type HeaderValue = string | ReadonlyArray<string> | undefined
type Headers = Readonly<Record<string, HeaderValue>>

const single = (value: HeaderValue): string | undefined =>
  value === undefined || typeof value === "string" ? value : value.length === 1 ? value[0] : undefined

/** True when the comma-separated field value lists `token` (case-insensitive). */
const listsToken = (value: HeaderValue, token: string): boolean => {
  const values: ReadonlyArray<string> = value === undefined ? [] : typeof value === "string" ? [value] : value
  return values.some((v) => v.split(",").some((t: string) => t.trim().toLowerCase() === token))
}

/** A key is the base64 form of 16 bytes: 22 characters and `==`. */
const KEY_PATTERN = /^[A-Za-z0-9+/]{22}==$/

/** A server's decision on an upgrade request. */
export type UpgradeRequestCheck =
  | { readonly _tag: "Accept"; readonly key: string }
  | { readonly _tag: "Refuse"; readonly status: 400 | 426; readonly message: string }

/** Checks a WebSocket upgrade request (RFC 6455 §4.2.1); `headers` as Node's `IncomingMessage.headers`. */
export const checkUpgradeRequest = (method: string, httpVersion: string, headers: Headers): UpgradeRequestCheck => {
  if (method !== "GET") return { _tag: "Refuse", status: 400, message: "a WebSocket upgrade must be a GET" }
  if (httpVersion !== "1.1") return { _tag: "Refuse", status: 400, message: "a WebSocket upgrade needs HTTP/1.1" }
  if (!listsToken(headers["upgrade"], "websocket")) return { _tag: "Refuse", status: 400, message: "not a WebSocket upgrade (Upgrade: websocket)" }
  if (!listsToken(headers["connection"], "upgrade")) return { _tag: "Refuse", status: 400, message: "not a WebSocket upgrade (Connection: Upgrade)" }
  const version = single(headers["sec-websocket-version"])?.trim()
  if (version !== WEBSOCKET_VERSION) {
    return { _tag: "Refuse", status: 426, message: `unsupported WebSocket version ${version ?? "(none)"}; this server speaks 13` }
  }
  const key = single(headers["sec-websocket-key"])?.trim()
  if (key === undefined || !KEY_PATTERN.test(key)) return { _tag: "Refuse", status: 400, message: "a missing or malformed Sec-WebSocket-Key" }
  return { _tag: "Accept", key }
}

/** The 101 answer accepting `key`, as written on the socket. */
export const acceptResponse = (key: string): string =>
  "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
  `Sec-WebSocket-Accept: ${acceptValue(key)}\r\n\r\n`

/** A refusal of an upgrade request, as written on the socket (the connection closes after it). */
export const refusalResponse = (status: 400 | 426, message: string): string => {
  const body = `${message}\n`
  const reason = status === 400 ? "Bad Request" : "Upgrade Required"
  const version = status === 426 ? `Sec-WebSocket-Version: ${WEBSOCKET_VERSION}\r\n` : ""
  return `HTTP/1.1 ${status} ${reason}\r\nConnection: close\r\n${version}Content-Type: text/plain; charset=utf-8\r\n` +
    `Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
}

/** The request headers a client sends to open a WebSocket with `key`. */
export const upgradeRequestHeaders = (key: string): Record<string, string> => ({
  Connection: "Upgrade",
  Upgrade: "websocket",
  "Sec-WebSocket-Key": key,
  "Sec-WebSocket-Version": WEBSOCKET_VERSION
})

/** Checks a server's 101 answer to a request sent with `key`; the problem, or undefined when it is good. */
export const checkUpgradeResponse = (key: string, headers: Headers): string | undefined => {
  if (!listsToken(headers["upgrade"], "websocket")) return "the server's 101 answer lacks Upgrade: websocket"
  if (!listsToken(headers["connection"], "upgrade")) return "the server's 101 answer lacks Connection: Upgrade"
  if (single(headers["sec-websocket-accept"])?.trim() !== acceptValue(key)) return "the server's Sec-WebSocket-Accept does not match the key sent"
  if (headers["sec-websocket-extensions"] !== undefined) return "the server selected an extension that was not offered"
  if (headers["sec-websocket-protocol"] !== undefined) return "the server selected a subprotocol that was not offered"
  return undefined
}
