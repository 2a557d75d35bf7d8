/**
 * Reads the server name (SNI) of a TLS ClientHello from the first bytes a client sends, before any TLS
 * is terminated: the handshake records are joined (a ClientHello may span several records), the
 * ClientHello's fixed fields are skipped and its `server_name` extension (RFC 6066) is read. Bounded by
 * the caller's byte limit. Pure: bytes in, a result out; the listener keeps the bytes and passes them on
 * unchanged.
 */

/** Most bytes read before a ClientHello must be complete (records, headers included). */
export const MaxClientHelloBytes = 16 * 1024

const RecordHeaderBytes = 5
const ContentTypeHandshake = 22
const HandshakeClientHello = 1
const ExtensionServerName = 0
const ServerNameHostName = 0

/** What the bytes read so far say. */
export type ClientHelloRead =
  /** More bytes are needed: nothing new can be read before `needed` bytes are there. */
  | { readonly _tag: "Incomplete"; readonly needed: number }
  /** A whole ClientHello: its server name ("" when it sent none) and how many bytes its records took. */
  | { readonly _tag: "ClientHello"; readonly serverName: string; readonly bytes: number }
  /** Not a TLS ClientHello, or one that breaks its own lengths. */
  | { readonly _tag: "Malformed"; readonly reason: string }
  /** No whole ClientHello within the limit. */
  | { readonly _tag: "TooLarge"; readonly limit: number }

const malformed = (reason: string): ClientHelloRead => ({ _tag: "Malformed", reason })

/**
 * Reads the ClientHello at the start of `bytes` (everything the client sent so far). `Incomplete` until
 * its records are all there; `TooLarge` once `maxBytes` were read without a whole one.
 */
export const readClientHello = (bytes: Uint8Array, maxBytes: number = MaxClientHelloBytes): ClientHelloRead => {
  const available = Math.min(bytes.length, maxBytes)
  // the handshake message, joined from the records read so far
  const parts: Array<Uint8Array> = []
  let joined = 0
  let offset = 0
  let needed = -1
  let wanted = 0
  for (;;) {
    if (offset + RecordHeaderBytes > available) {
      wanted = offset + RecordHeaderBytes
      break
    }
    if (bytes[offset] !== ContentTypeHandshake) {
      return malformed(offset === 0 ? `not a TLS handshake record (first byte ${bytes[offset]})` : "a record other than handshake within the ClientHello")
    }
    if (bytes[offset + 1] !== 3) return malformed(`not a TLS record version (${bytes[offset + 1]}.${bytes[offset + 2]})`)
    const length = (bytes[offset + 3]! << 8) | bytes[offset + 4]!
    if (length === 0) return malformed("an empty handshake record")
    if (offset + RecordHeaderBytes + length > available) {
      wanted = offset + RecordHeaderBytes + length
      break
    }
    parts.push(bytes.subarray(offset + RecordHeaderBytes, offset + RecordHeaderBytes + length))
    joined += length
    offset += RecordHeaderBytes + length
    if (needed === -1 && joined >= 4) {
      const first = parts.length === 1 ? parts[0]! : concat(parts, joined)
      if (first[0] !== HandshakeClientHello) return malformed(`the first handshake message is not a ClientHello (type ${first[0]})`)
      needed = 4 + ((first[1]! << 16) | (first[2]! << 8) | first[3]!)
    }
    if (needed !== -1 && joined >= needed) {
      const message = concat(parts, joined).subarray(0, needed)
      const name = serverNameOf(message)
      return typeof name === "string" ? { _tag: "ClientHello", serverName: name, bytes: offset } : name
    }
  }
  if (available >= maxBytes) return { _tag: "TooLarge", limit: maxBytes }
  // a header read so far already promises more than the limit
  if (needed !== -1 && needed + RecordHeaderBytes > maxBytes) return { _tag: "TooLarge", limit: maxBytes }
  return { _tag: "Incomplete", needed: Math.min(wanted, maxBytes) }
}

const concat = (parts: ReadonlyArray<Uint8Array>, length: number): Uint8Array => {
  if (parts.length === 1) return parts[0]!
  const out = new Uint8Array(length)
  let at = 0
  for (const part of parts) {
    out.set(part, at)
    at += part.length
  }
  return out
}

/** The server name in a whole ClientHello handshake message (type and length included). */
const serverNameOf = (m: Uint8Array): string | ClientHelloRead => {
  const end = m.length
  // type (1), length (3), client version (2), random (32)
  let at = 4 + 2 + 32
  if (at + 1 > end) return malformed("the ClientHello ends within its random")
  at += 1 + m[at]!
  if (at + 2 > end) return malformed("the ClientHello ends within its session id")
  at += 2 + ((m[at]! << 8) | m[at + 1]!)
  if (at + 1 > end) return malformed("the ClientHello ends within its cipher suites")
  at += 1 + m[at]!
  if (at > end) return malformed("the ClientHello ends within its compression methods")
  // no extensions: no server name
  if (at === end) return ""
  if (at + 2 > end) return malformed("the ClientHello ends within its extensions' length")
  const extensionsEnd = at + 2 + ((m[at]! << 8) | m[at + 1]!)
  if (extensionsEnd > end) return malformed("the ClientHello's extensions overrun it")
  at += 2
  while (at + 4 <= extensionsEnd) {
    const type = (m[at]! << 8) | m[at + 1]!
    const length = (m[at + 2]! << 8) | m[at + 3]!
    at += 4
    if (at + length > extensionsEnd) return malformed("an extension overruns the ClientHello")
    if (type === ExtensionServerName) return hostNameOf(m.subarray(at, at + length))
    at += length
  }
  if (at !== extensionsEnd) return malformed("the ClientHello ends within an extension header")
  return ""
}

/** The host name of a `server_name` extension's body. */
const hostNameOf = (e: Uint8Array): string | ClientHelloRead => {
  if (e.length < 2) return malformed("a server_name extension without its list")
  const listEnd = 2 + ((e[0]! << 8) | e[1]!)
  if (listEnd > e.length) return malformed("the server_name list overruns its extension")
  let at = 2
  while (at + 3 <= listEnd) {
    const type = e[at]!
    const length = (e[at + 1]! << 8) | e[at + 2]!
    at += 3
    if (at + length > listEnd) return malformed("a server name overruns its list")
    if (type === ServerNameHostName) {
      let name = ""
      for (let i = at; i < at + length; i++) {
        const c = e[i]!
        // a DNS host name is ASCII letters, digits, '-' and '.'; anything else is no usable name
        if (!((c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39) || c === 0x2d || c === 0x2e || c === 0x5f)) {
          return malformed("the server name is not a DNS host name")
        }
        name += String.fromCharCode(c)
      }
      return name.toLowerCase()
    }
    at += length
  }
  return ""
}
