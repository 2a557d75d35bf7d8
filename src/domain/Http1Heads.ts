/**
 * The HTTP/1.1 heads a proxy writes: the request head sent upstream, the response head relayed to the
 * client (hop-by-hop fields gone, framing and connection the proxy's own), a `101` as received, a
 * request head given back to another server, and `100 Continue`. Pure: values in, latin1 bytes out. The
 * field lists come checked from `Http1Parser` and `HttpHeaders`; nothing here validates them again.
 */
import { Buffer } from "node:buffer"
import type { ResponseHead } from "./Http1Parser.ts"
import { responseHeaders } from "./HttpHeaders.ts"

/** The interim answer to `Expect: 100-continue`. */
export const CONTINUE_HEAD: Buffer = Buffer.from("HTTP/1.1 100 Continue\r\n\r\n", "latin1")

/** The head sent upstream; `chunked` adds the Transfer-Encoding the body is framed with. */
export const requestHeadBytes = (
  out: { readonly method: string; readonly path: string; readonly headers: ReadonlyArray<string> },
  versionMinor: number,
  chunked: boolean
): Buffer => {
  let text = `${out.method} ${out.path} HTTP/1.${versionMinor}\r\n`
  const h = out.headers
  for (let i = 0; i < h.length; i += 2) text += `${h[i]}: ${h[i + 1]}\r\n`
  if (chunked) text += "Transfer-Encoding: chunked\r\n"
  return Buffer.from(text + "\r\n", "latin1")
}

/**
 * The head relayed to the client (hop-by-hop headers gone, framing and connection ours). A response with
 * a Transfer-Encoding never passes a Content-Length on (RFC 9112 §6.3); one whose codings do not end in
 * chunked keeps them and runs to the close. `extra` (flat `[name, value, ...]`) replaces the fields of
 * the same names.
 */
export const responseHeadBytes = (head: ResponseHead, chunked: boolean, close: boolean, extra: ReadonlyArray<string> | undefined): Buffer => {
  let text = `HTTP/1.1 ${head.status} ${head.reason}\r\n`
  const h = responseHeaders(head.headers)
  const coded = chunked || head.transferCodings.length > 0
  for (let i = 0; i < h.length; i += 2) {
    if (coded && h[i]!.length === 14 && h[i]!.toLowerCase() === "content-length") continue
    if (extra !== undefined && replaced(extra, h[i]!)) continue
    text += `${h[i]}: ${h[i + 1]}\r\n`
  }
  if (extra !== undefined) for (let i = 0; i < extra.length; i += 2) text += `${extra[i]}: ${extra[i + 1]}\r\n`
  if (chunked) text += "Transfer-Encoding: chunked\r\n"
  else if (head.closeDelimitedCoding) text += `Transfer-Encoding: ${head.transferCodings}\r\n`
  if (close) text += "Connection: close\r\n"
  return Buffer.from(text + "\r\n", "latin1")
}

/** Whether `name` is among the names of a flat header list (case-insensitive). */
const replaced = (extra: ReadonlyArray<string>, name: string): boolean => {
  for (let i = 0; i < extra.length; i += 2) {
    if (extra[i]!.length === name.length && extra[i]!.toLowerCase() === name.toLowerCase()) return true
  }
  return false
}

/** The upstream's 101 as received (its Connection/Upgrade headers are what the client needs). */
export const switchingHeadBytes = (head: ResponseHead): Buffer => {
  let text = `HTTP/1.1 ${head.status} ${head.reason}\r\n`
  const h = head.headers
  for (let i = 0; i < h.length; i += 2) text += `${h[i]}: ${h[i + 1]}\r\n`
  return Buffer.from(text + "\r\n", "latin1")
}

/** A field name: an RFC 9110 token. */
const FIELD_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/
/** A field value HTTP/1.1 can carry: no control character but HTAB (RFC 9110 §5.5). */
const FIELD_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/

/**
 * Why a field list from a head that was not HTTP/1.1 on the wire (an HTTP/2 response) cannot be written
 * in an HTTP/1.1 head, or `undefined` when it can.
 */
export const unwritableField = (fields: ReadonlyArray<string>): string | undefined => {
  for (let i = 0; i < fields.length; i += 2) {
    if (!FIELD_NAME.test(fields[i]!)) return `a field name HTTP/1.1 cannot carry ("${fields[i]!.slice(0, 32)}")`
    if (!FIELD_VALUE.test(fields[i + 1]!)) return `a control character in the value of ${fields[i]}`
  }
  return undefined
}

/**
 * A response head for a response that was not HTTP/1.1 on the wire: its status, its fields (free of
 * hop-by-hop fields, checked with `unwritableField`), and the framing and connection the proxy chose.
 * `extra` replaces fields of the same names.
 */
export const messageResponseHeadBytes = (
  status: number,
  reason: string,
  fields: ReadonlyArray<string>,
  chunked: boolean,
  close: boolean,
  extra: ReadonlyArray<string> | undefined
): Buffer => {
  let text = `HTTP/1.1 ${status} ${reason}\r\n`
  for (let i = 0; i < fields.length; i += 2) {
    if (extra !== undefined && replaced(extra, fields[i]!)) continue
    text += `${fields[i]}: ${fields[i + 1]}\r\n`
  }
  if (extra !== undefined) for (let i = 0; i < extra.length; i += 2) text += `${extra[i]}: ${extra[i + 1]}\r\n`
  if (chunked) text += "Transfer-Encoding: chunked\r\n"
  if (close) text += "Connection: close\r\n"
  return Buffer.from(text + "\r\n", "latin1")
}

/** The trailer section ending a chunked body: the last chunk, the fields, the final CRLF. */
export const lastChunkBytes = (trailers: ReadonlyArray<string> | undefined): Buffer => {
  let text = "0\r\n"
  if (trailers !== undefined) for (let i = 0; i < trailers.length; i += 2) text += `${trailers[i]}: ${trailers[i + 1]}\r\n`
  return Buffer.from(text + "\r\n", "latin1")
}

/**
 * A checked trailer section as `BodyFramer` hands it on (`name: value` lines, then CRLF), as a flat
 * field list.
 */
export const trailerFields = (section: Buffer): Array<string> => {
  const out: Array<string> = []
  for (const line of section.toString("latin1").split("\r\n")) {
    if (line.length === 0) continue
    const colon = line.indexOf(":")
    if (colon <= 0) continue
    out.push(line.slice(0, colon), line.slice(colon + 1).trim())
  }
  return out
}
