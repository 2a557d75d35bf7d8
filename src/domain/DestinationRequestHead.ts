/**
 * What wsp-client puts on the wire toward a destination for one wsp request head: where to connect,
 * the HTTP/1.1 request head (validated, hop-by-hop fields and `Host` replaced), how the body is framed,
 * and the Go header map made from the destination's response head. Pure: strings in, bytes or plain
 * data or a typed error out. It neither checks destination rules (DestinationRules does) nor parses
 * responses (Http1Parser does).
 */
import { Schema } from "effect"
import type { GoHeader } from "./WspMessage.ts"
import { canonicalHeaderName, withoutHopByHop } from "./WspMessage.ts"

/** A wsp request head that cannot be sent to a destination; answered with wsp's 527. */
export class DestinationHeadError extends Schema.TaggedError<DestinationHeadError>()("DestinationHeadError", {
  reason: Schema.Literals(["InvalidUrl", "UnsupportedScheme", "InvalidMethod", "InvalidHeader"]),
  message: Schema.String
}) {}

/** Where a request goes. */
export interface DestinationTarget {
  readonly secure: boolean
  /** Host to connect to (an IPv6 literal without brackets). */
  readonly host: string
  readonly port: number
  /** The `Host` header: host, and port when not the scheme's default. */
  readonly authority: string
  /** Path and query as sent in the request line. */
  readonly path: string
}

/** How the request body is framed toward the destination. */
export type RequestBodyFraming = "None" | "Length" | "Chunked"

/** Methods that carry `Content-Length: 0` when their body is empty, as Go's transport sends them. */
const METHODS_WITH_BODY: ReadonlySet<string> = new Set(["POST", "PUT", "PATCH"])

/** Header names the client sets itself (lower case). */
const SET_BY_CLIENT: ReadonlySet<string> = new Set(["host", "content-length"])

const tokenChar = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/
/** Field value bytes allowed (HTAB, SP, VCHAR, obs-text); CR, LF and NUL never. */
const fieldValue = /^[\t\x20-\x7e\x80-\xff]*$/

/** Parses a wsp head's URL the way the request will use it; messages are Go's where Go has one. */
export const destinationTarget = (raw: string): DestinationTarget | DestinationHeadError => {
  let url: URL
  try {
    url = new URL(raw)
  } catch {
    return new DestinationHeadError({ reason: "InvalidUrl", message: `parse ${JSON.stringify(raw)}: invalid URL` })
  }
  const secure = url.protocol === "https:"
  if (!secure && url.protocol !== "http:") {
    return new DestinationHeadError({
      reason: "UnsupportedScheme",
      message: `unsupported protocol scheme ${JSON.stringify(url.protocol.slice(0, -1))}`
    })
  }
  const hostname = url.hostname
  return {
    secure,
    host: hostname.startsWith("[") ? hostname.slice(1, -1) : hostname,
    port: url.port === "" ? (secure ? 443 : 80) : Number(url.port),
    authority: url.host,
    path: `${url.pathname}${url.search}`
  }
}

/** The method a wsp head asks for (empty is GET, as in Go). */
export const destinationMethod = (method: string): string => (method === "" ? "GET" : method)

/** How a body of `contentLength` bytes (-1: unknown) is framed for `method`. */
export const requestBodyFraming = (method: string, contentLength: number): RequestBodyFraming =>
  contentLength < 0 ? "Chunked" : contentLength > 0 || METHODS_WITH_BODY.has(method) ? "Length" : "None"

/**
 * The request head for `target`: the request line, `Host`, the wsp head's header fields without
 * hop-by-hop ones (and without `Host` and `Content-Length`), then the body's framing field.
 */
export const encodeDestinationRequestHead = (
  method: string,
  target: DestinationTarget,
  header: GoHeader,
  contentLength: number
): Buffer | DestinationHeadError => {
  if (!tokenChar.test(method)) {
    return new DestinationHeadError({ reason: "InvalidMethod", message: `net/http: invalid method ${JSON.stringify(method)}` })
  }
  let text = `${method} ${target.path} HTTP/1.1\r\nHost: ${target.authority}\r\n`
  for (const [name, values] of Object.entries(withoutHopByHop(header, SET_BY_CLIENT))) {
    if (!tokenChar.test(name)) {
      return new DestinationHeadError({ reason: "InvalidHeader", message: `net/http: invalid header field name ${JSON.stringify(name)}` })
    }
    for (const value of values) {
      if (!fieldValue.test(value)) {
        return new DestinationHeadError({ reason: "InvalidHeader", message: `net/http: invalid header field value for ${JSON.stringify(name)}` })
      }
      text += `${name}: ${value}\r\n`
    }
  }
  switch (requestBodyFraming(method, contentLength)) {
    case "Length":
      text += `Content-Length: ${contentLength}\r\n`
      break
    case "Chunked":
      text += "Transfer-Encoding: chunked\r\n"
      break
    case "None":
      break
  }
  // header values may hold obs-text: one byte per code unit, as they arrived
  return Buffer.from(`${text}\r\n`, "latin1")
}

/** Go's `http.Response.Header` from a parsed head's flat `[name, value, ...]`, without hop-by-hop fields. */
export const goHeaderFromFields = (fields: ReadonlyArray<string>): Record<string, ReadonlyArray<string>> => {
  const out: Record<string, Array<string>> = Object.create(null)
  for (let i = 0; i + 1 < fields.length; i += 2) {
    const canonical = canonicalHeaderName(fields[i]!)
    const existing = out[canonical]
    if (existing === undefined) out[canonical] = [fields[i + 1]!]
    else existing.push(fields[i + 1]!)
  }
  return withoutHopByHop(out)
}

/** The `ContentLength` of the wsp response head: the destination's, else 0 without a body, else -1. */
export const responseContentLength = (declared: number | undefined, bodyless: boolean): number =>
  declared !== undefined ? declared : bodyless ? 0 : -1
