/**
 * A pure, incremental HTTP/1.1 parser for a proxy that moves bodies raw: a bounded head reader for
 * requests and responses (strict: no bare LF, no obs-fold, no CL+TE, one Content-Length, only `chunked`)
 * and a body-framing tracker that finds where a body ends (Content-Length, chunked with extensions and
 * trailers, close-delimited) without copying or decoding it. No I/O, no Node streams, no Effect runtime.
 */
import { Schema } from "effect"

/** Why a message was refused, and the status a proxy answers with. */
export class Http1Error extends Schema.TaggedError<Http1Error>()("Http1Error", {
  reason: Schema.Literals([
    "MalformedStartLine",
    "MalformedHeader",
    "HeadTooLarge",
    "TooManyHeaders",
    "AmbiguousLength",
    "InvalidContentLength",
    "UnsupportedTransferEncoding",
    "MissingHost",
    "MalformedChunk"
  ]),
  status: Schema.Number,
  message: Schema.String
}) {}

export interface HeadLimits {
  /** Largest head, start line and terminating blank line included (bytes). */
  readonly maxHeaderSize: number
  /** Most header fields in one head. */
  readonly maxHeadersCount: number
}

/** Longest chunk-size line, extensions included (bytes). */
export const MAX_CHUNK_LINE = 4096
/** Most hex digits in a chunk size (2^60 bytes; more cannot be a real body). */
export const MAX_CHUNK_SIZE_DIGITS = 15
/** Longest request method (anything longer is not HTTP). */
export const MAX_METHOD_LENGTH = 32
/** Most decimal digits in a Content-Length. */
export const MAX_CONTENT_LENGTH_DIGITS = 15

/** How a message body ends. */
export type Framing =
  | { readonly _tag: "None" }
  | { readonly _tag: "Length"; readonly length: number }
  | { readonly _tag: "Chunked" }
  | { readonly _tag: "Close" }

const NO_BODY: Framing = { _tag: "None" }
const CHUNKED: Framing = { _tag: "Chunked" }
const CLOSE: Framing = { _tag: "Close" }

/** What both kinds of head share. */
interface HeadFields {
  /** 0 for HTTP/1.0, 1 for HTTP/1.1. */
  readonly versionMinor: number
  /** Flat `[name, value, ...]` as received (values trimmed). */
  readonly headers: Array<string>
  /** Tokens of the `Connection` headers, lower-cased. */
  readonly connection: ReadonlyArray<string>
  /** Whether the connection may carry another message after this one. */
  readonly keepAlive: boolean
  /** The `Upgrade` header's value, when the message asks for (or confirms) an upgrade. */
  readonly upgrade: string | undefined
  /** The head's size on the wire (bytes). */
  readonly size: number
}

export interface RequestHead extends HeadFields {
  readonly method: string
  readonly target: string
  readonly host: string | undefined
  readonly contentType: string | undefined
  /** `Expect: 100-continue` was sent. */
  readonly expectContinue: boolean
  readonly framing: Framing
}

export interface ResponseHead extends HeadFields {
  readonly status: number
  readonly reason: string
  /** Whether the response carried a Content-Length (kept) or chunked coding. */
  readonly contentLength: number | undefined
  readonly chunked: boolean
  /** Transfer-Encoding present but not ending in chunked: the body runs to the close. */
  readonly closeDelimitedCoding: boolean
}

const fail = (reason: Http1Error["reason"], status: number, message: string): Http1Error => new Http1Error({ reason, status, message })

/** `tchar` of RFC 9110 §5.6.2, as a lookup table. */
const TOKEN: Uint8Array = (() => {
  const t = new Uint8Array(256)
  for (let c = 0x30; c <= 0x39; c++) t[c] = 1
  for (let c = 0x41; c <= 0x5a; c++) t[c] = 1
  for (let c = 0x61; c <= 0x7a; c++) t[c] = 1
  for (const ch of "!#$%&'*+-.^_`|~") t[ch.charCodeAt(0)] = 1
  return t
})()

/** Bytes allowed in a field value: HTAB, SP, VCHAR, obs-text. */
const FIELD_VALUE: Uint8Array = (() => {
  const t = new Uint8Array(256)
  t[0x09] = 1
  for (let c = 0x20; c <= 0x7e; c++) t[c] = 1
  for (let c = 0x80; c <= 0xff; c++) t[c] = 1
  return t
})()

/** Bytes allowed in a request target: VCHAR only. */
const TARGET: Uint8Array = (() => {
  const t = new Uint8Array(256)
  for (let c = 0x21; c <= 0x7e; c++) t[c] = 1
  return t
})()

const HEX: Int8Array = (() => {
  const t = new Int8Array(256).fill(-1)
  for (let c = 0; c < 10; c++) t[0x30 + c] = c
  for (let c = 0; c < 6; c++) {
    t[0x41 + c] = 10 + c
    t[0x61 + c] = 10 + c
  }
  return t
})()

/** A latin1 string of `buf[start..end)` (Node's unchecked fast path behind `toString("latin1", ...)`). */
const latin1 = (buf: Buffer, start: number, end: number): string =>
  (buf as Buffer & { latin1Slice: (start: number, end: number) => string }).latin1Slice(start, end)

const CR = 13
const LF = 10
const SP = 32
const HTAB = 9
const COLON = 58

const isToken = (buf: Uint8Array, start: number, end: number): boolean => {
  if (end <= start) return false
  for (let i = start; i < end; i++) if (TOKEN[buf[i]!] !== 1) return false
  return true
}

/** Header fields, checked byte by byte; returns the flat list or an error. */
const parseFields = (
  buf: Buffer,
  start: number,
  end: number,
  limits: HeadLimits,
  errorStatus: number
): Array<string> | Http1Error => {
  const headers: Array<string> = []
  let pos = start
  while (pos < end) {
    let eol = buf.indexOf(LF, pos)
    if (eol === -1 || eol > end) eol = end
    if (eol === pos || buf[eol - 1] !== CR) return fail("MalformedHeader", errorStatus, "a header line does not end in CRLF")
    const lineEnd = eol - 1
    const first = buf[pos]!
    if (first === SP || first === HTAB) return fail("MalformedHeader", errorStatus, "obs-fold (a header line starting with whitespace)")
    const colon = buf.indexOf(COLON, pos)
    if (colon === -1 || colon >= lineEnd) return fail("MalformedHeader", errorStatus, "a header line without a colon")
    if (!isToken(buf, pos, colon)) return fail("MalformedHeader", errorStatus, "a header name with bad characters or whitespace before the colon")
    let vs = colon + 1
    let ve = lineEnd
    while (vs < ve && (buf[vs] === SP || buf[vs] === HTAB)) vs++
    while (ve > vs && (buf[ve - 1] === SP || buf[ve - 1] === HTAB)) ve--
    for (let i = vs; i < ve; i++) {
      if (FIELD_VALUE[buf[i]!] !== 1) return fail("MalformedHeader", errorStatus, "a control character in a header value")
    }
    if (headers.length >= limits.maxHeadersCount * 2) {
      return fail("TooManyHeaders", errorStatus === 400 ? 431 : errorStatus, `more than ${limits.maxHeadersCount} headers`)
    }
    headers.push(latin1(buf, pos, colon), latin1(buf, vs, ve))
    pos = eol + 1
  }
  return headers
}

/** What the framing headers of a head say, checked for ambiguity. */
interface FramingFields {
  readonly contentLength: number | undefined
  /** Transfer-Encoding codings, lower-cased, in order; empty when absent. */
  readonly codings: ReadonlyArray<string>
  readonly connection: ReadonlyArray<string>
  readonly upgrade: string | undefined
  readonly host: string | undefined
  readonly hostCount: number
  readonly contentType: string | undefined
  readonly expectContinue: boolean
}

const lowerEquals = (name: string, lower: string): boolean => name.length === lower.length && name.toLowerCase() === lower

const framingFields = (headers: ReadonlyArray<string>, errorStatus: number): FramingFields | Http1Error => {
  let contentLength: number | undefined
  let lengths = 0
  const codings: Array<string> = []
  const connection: Array<string> = []
  let upgrade: string | undefined
  let host: string | undefined
  let hostCount = 0
  let contentType: string | undefined
  let expectContinue = false
  for (let i = 0; i < headers.length; i += 2) {
    const name = headers[i]!
    const value = headers[i + 1]!
    switch (name.length) {
      case 4:
        if (lowerEquals(name, "host")) {
          host = value
          hostCount++
        }
        break
      case 6:
        if (lowerEquals(name, "expect") && value.toLowerCase() === "100-continue") expectContinue = true
        break
      case 7:
        if (lowerEquals(name, "upgrade")) upgrade = value
        break
      case 10:
        if (lowerEquals(name, "connection")) {
          for (const t of value.split(",")) {
            const token = t.trim().toLowerCase()
            if (token.length > 0) connection.push(token)
          }
        }
        break
      case 12:
        if (lowerEquals(name, "content-type")) contentType = value
        break
      case 14:
        if (lowerEquals(name, "content-length")) {
          lengths++
          if (lengths > 1) return fail("AmbiguousLength", errorStatus, "more than one Content-Length")
          if (value.length === 0 || value.length > MAX_CONTENT_LENGTH_DIGITS || !/^\d+$/.test(value)) {
            return fail("InvalidContentLength", errorStatus, `invalid Content-Length "${value.slice(0, 32)}"`)
          }
          contentLength = Number(value)
        }
        break
      case 17:
        if (lowerEquals(name, "transfer-encoding")) {
          for (const t of value.split(",")) {
            const coding = t.trim().toLowerCase()
            if (coding.length === 0) return fail("AmbiguousLength", errorStatus, "an empty Transfer-Encoding coding")
            codings.push(coding)
          }
        }
        break
    }
  }
  return { contentLength, codings, connection, upgrade, host, hostCount, contentType, expectContinue }
}

const keepAliveOf = (versionMinor: number, connection: ReadonlyArray<string>): boolean =>
  versionMinor === 1 ? !connection.includes("close") : connection.includes("keep-alive") && !connection.includes("close")

const HTTP_VERSION_PREFIX = "HTTP/1."

const parseVersion = (buf: Buffer, start: number, end: number): number => {
  if (end - start !== 8 || latin1(buf, start, start + 7) !== HTTP_VERSION_PREFIX) return -1
  const minor = buf[start + 7]!
  return minor === 0x30 ? 0 : minor === 0x31 ? 1 : -1
}

/** Parses a complete request head (`buf[0..end)`, ending in CRLFCRLF). */
export const parseRequestHead = (buf: Buffer, end: number, limits: HeadLimits): RequestHead | Http1Error => {
  const eol = buf.indexOf(LF)
  if (eol <= 0 || buf[eol - 1] !== CR) return fail("MalformedStartLine", 400, "malformed request line")
  const lineEnd = eol - 1
  const sp1 = buf.indexOf(SP)
  const sp2 = sp1 === -1 ? -1 : buf.indexOf(SP, sp1 + 1)
  if (sp1 <= 0 || sp1 > MAX_METHOD_LENGTH || sp2 === -1 || sp2 >= lineEnd || !isToken(buf, 0, sp1)) return fail("MalformedStartLine", 400, "malformed request line")
  for (let i = sp1 + 1; i < sp2; i++) if (TARGET[buf[i]!] !== 1) return fail("MalformedStartLine", 400, "malformed request target")
  if (sp2 === sp1 + 1) return fail("MalformedStartLine", 400, "empty request target")
  const versionMinor = parseVersion(buf, sp2 + 1, lineEnd)
  if (versionMinor === -1) return fail("MalformedStartLine", 400, "unsupported or malformed HTTP version")
  const headers = parseFields(buf, eol + 1, end - 2, limits, 400)
  if (headers instanceof Http1Error) return headers
  const f = framingFields(headers, 400)
  if (f instanceof Http1Error) return f
  if (versionMinor === 1 && f.hostCount !== 1) {
    return fail("MissingHost", 400, f.hostCount === 0 ? "an HTTP/1.1 request without Host" : "more than one Host")
  }
  if (f.hostCount > 1) return fail("MissingHost", 400, "more than one Host")
  let framing: Framing = NO_BODY
  if (f.codings.length > 0) {
    if (f.contentLength !== undefined) return fail("AmbiguousLength", 400, "ambiguous message length (Content-Length and Transfer-Encoding)")
    if (versionMinor === 0) return fail("AmbiguousLength", 400, "Transfer-Encoding in an HTTP/1.0 request")
    const chunkedCount = f.codings.filter((c) => c === "chunked").length
    if (f.codings.includes("identity") || chunkedCount > 1) {
      return fail("AmbiguousLength", 400, `ambiguous Transfer-Encoding "${f.codings.join(", ")}"`)
    }
    if (f.codings.length > 1 || chunkedCount === 0) {
      return fail("UnsupportedTransferEncoding", 501, `unsupported Transfer-Encoding "${f.codings.join(", ")}"`)
    }
    framing = CHUNKED
  } else if (f.contentLength !== undefined && f.contentLength > 0) {
    framing = { _tag: "Length", length: f.contentLength }
  }
  const upgradeAsked = f.upgrade !== undefined && f.connection.includes("upgrade")
  return {
    method: latin1(buf, 0, sp1),
    target: latin1(buf, sp1 + 1, sp2),
    versionMinor,
    headers,
    connection: f.connection,
    keepAlive: keepAliveOf(versionMinor, f.connection),
    upgrade: upgradeAsked ? f.upgrade : undefined,
    host: f.host,
    contentType: f.contentType,
    expectContinue: f.expectContinue,
    framing,
    size: end
  }
}

/** Parses a complete response head (`buf[0..end)`, ending in CRLFCRLF). Errors carry status 502. */
export const parseResponseHead = (buf: Buffer, end: number, limits: HeadLimits): ResponseHead | Http1Error => {
  const eol = buf.indexOf(LF)
  if (eol <= 0 || buf[eol - 1] !== CR) return fail("MalformedStartLine", 502, "malformed status line")
  const lineEnd = eol - 1
  const versionMinor = parseVersion(buf, 0, 8)
  if (versionMinor === -1 || buf[8] !== SP || lineEnd < 12) return fail("MalformedStartLine", 502, "malformed status line")
  const d0 = buf[9]! - 0x30
  const d1 = buf[10]! - 0x30
  const d2 = buf[11]! - 0x30
  if (d0 < 1 || d0 > 5 || d1 < 0 || d1 > 9 || d2 < 0 || d2 > 9) return fail("MalformedStartLine", 502, "malformed status code")
  if (lineEnd > 12 && buf[12] !== SP) return fail("MalformedStartLine", 502, "malformed status line")
  for (let i = 13; i < lineEnd; i++) if (FIELD_VALUE[buf[i]!] !== 1) return fail("MalformedStartLine", 502, "a control character in the reason phrase")
  const headers = parseFields(buf, eol + 1, end - 2, limits, 502)
  if (headers instanceof Http1Error) return headers
  const f = framingFields(headers, 502)
  if (f instanceof Http1Error) return f
  const chunked = f.codings.length > 0 && f.codings[f.codings.length - 1] === "chunked" && f.codings.indexOf("chunked") === f.codings.length - 1
  return {
    status: d0 * 100 + d1 * 10 + d2,
    reason: lineEnd > 13 ? latin1(buf, 13, lineEnd) : "",
    versionMinor,
    headers,
    connection: f.connection,
    keepAlive: keepAliveOf(versionMinor, f.connection),
    upgrade: f.upgrade,
    // With Transfer-Encoding, a Content-Length is ignored (RFC 9112 §6.3) and must not be relayed.
    contentLength: f.codings.length > 0 ? undefined : f.contentLength,
    chunked,
    closeDelimitedCoding: f.codings.length > 0 && !chunked,
    size: end
  }
}

/** How a response to `method` is framed (RFC 9112 §6.3). */
export const responseFraming = (method: string, head: ResponseHead): Framing => {
  const status = head.status
  if (method === "HEAD" || (status >= 100 && status < 200) || status === 204 || status === 304) return NO_BODY
  if (head.chunked) return CHUNKED
  if (head.closeDelimitedCoding) return CLOSE
  if (head.contentLength !== undefined) return head.contentLength === 0 ? NO_BODY : { _tag: "Length", length: head.contentLength }
  return CLOSE
}

/** Result of feeding bytes to a head reader. */
export type HeadStep<H> =
  | { readonly _tag: "Need" }
  | { readonly _tag: "Head"; readonly head: H; readonly rest: Buffer }
  | { readonly _tag: "Error"; readonly error: Http1Error }

const NEED: HeadStep<never> = { _tag: "Need" }

/** Whether the bytes so far can start a request line (a method token, then a space), so garbage is refused early. */
const methodPrefixOk = (buf: Buffer): boolean => {
  if (buf.length === 1 && buf[0] === CR) return true // the first half of an empty line before the request
  const n = buf.length < MAX_METHOD_LENGTH + 1 ? buf.length : MAX_METHOD_LENGTH + 1
  for (let i = 0; i < n; i++) {
    const c = buf[i]!
    if (c === SP) return i > 0
    if (TOKEN[c] !== 1) return false
  }
  return n < MAX_METHOD_LENGTH + 1
}

/** Whether every LF in `buf[from..to)` follows a CR. */
const lfPrecededByCr = (buf: Buffer, from: number, to: number): boolean => {
  let i = buf.indexOf(LF, from)
  while (i !== -1 && i < to) {
    if (i === 0 || buf[i - 1] !== CR) return false
    i = buf.indexOf(LF, i + 1)
  }
  return true
}
const DOUBLE_CRLF = Buffer.from("\r\n\r\n", "latin1")

/**
 * Collects bytes until a head is complete, never holding more than `maxHeaderSize`; dead after the first
 * error. Empty lines before a request line are skipped (RFC 9112 §2.2). After a head it starts over.
 */
export class HeadReader<H> {
  readonly limits: HeadLimits
  readonly parse: (buf: Buffer, end: number, limits: HeadLimits) => H | Http1Error
  readonly tooLargeStatus: number
  private pending: Buffer | undefined = undefined
  private dead: Http1Error | undefined = undefined

  constructor(limits: HeadLimits, parse: (buf: Buffer, end: number, limits: HeadLimits) => H | Http1Error, tooLargeStatus: number) {
    this.limits = limits
    this.parse = parse
    this.tooLargeStatus = tooLargeStatus
  }

  /** Bytes held for a head not yet complete. */
  get buffered(): number {
    return this.pending === undefined ? 0 : this.pending.length
  }

  push(chunk: Buffer): HeadStep<H> {
    if (this.dead !== undefined) return { _tag: "Error", error: this.dead }
    let had = this.pending === undefined ? 0 : this.pending.length
    // Only the bytes that can still belong to a head within the limit are looked at or kept.
    const room = this.limits.maxHeaderSize - had
    const take = chunk.length > room ? chunk.subarray(0, room) : chunk
    let buf = this.pending === undefined ? take : Buffer.concat([this.pending, take], had + take.length)
    // Empty lines before a start line are ignored (RFC 9112 §2.2).
    let skip = 0
    while (skip + 1 < buf.length && buf[skip] === CR && buf[skip + 1] === LF) skip += 2
    if (skip > 0) {
      buf = buf.subarray(skip)
      if (skip <= had) had -= skip
      else {
        chunk = chunk.subarray(skip - had)
        had = 0
      }
    }
    const at = buf.indexOf(DOUBLE_CRLF, had > 3 ? had - 3 : 0)
    const scanEnd = at === -1 ? buf.length : at + 4
    if (!lfPrecededByCr(buf, had > 0 ? had - 1 : 0, scanEnd)) {
      return this.die(fail("MalformedHeader", this.tooLargeStatus === 431 ? 400 : 502, "a bare LF in the head"))
    }
    if (at === -1) {
      if (this.tooLargeStatus === 431 && !methodPrefixOk(buf)) return this.die(fail("MalformedStartLine", 400, "malformed request line"))
      if (buf.length >= this.limits.maxHeaderSize) return this.die(fail("HeadTooLarge", this.tooLargeStatus, "head too large"))
      this.pending = buf.length === 0 ? undefined : Buffer.from(buf)
      return NEED
    }
    const end = at + 4
    const parsed = this.parse(buf.subarray(0, end), end, this.limits)
    if (parsed instanceof Http1Error) return this.die(parsed)
    this.pending = undefined
    return { _tag: "Head", head: parsed, rest: chunk.subarray(end - had) }
  }

  private die(error: Http1Error): HeadStep<H> {
    this.dead = error
    this.pending = undefined
    return { _tag: "Error", error }
  }
}

/** A reader of request heads (too large: 431). */
export const requestHeadReader = (limits: HeadLimits): HeadReader<RequestHead> => new HeadReader(limits, parseRequestHead, 431)
/** A reader of response heads (anything wrong: 502). */
export const responseHeadReader = (limits: HeadLimits): HeadReader<ResponseHead> => new HeadReader(limits, parseResponseHead, 502)

/** Chunked-coding states. */
const SIZE = 0
const SIZE_LF = 1
const EXT = 2
const DATA = 3
const DATA_CR = 4
const DATA_LF = 5
const TRAILER_START = 6
const TRAILER_LINE = 7
const TRAILER_LF = 8
const FINAL_LF = 9
const SIZE_WS = 10

/**
 * Tracks where a body ends while its bytes pass through unchanged. `consume(buf, from)` returns how many
 * bytes from `from` belong to the body (the rest is the next message), or an `Http1Error`. Only chunk-size
 * lines and trailers are looked at byte by byte; chunk data is skipped in bulk.
 */
export class BodyFramer {
  /** The body ended; bytes after it belong to the next message. */
  done: boolean
  private readonly kind: Framing["_tag"]
  private remaining: number
  private state = SIZE
  private digits = 0
  private lineBytes = 0
  private trailerBytes = 0
  private readonly maxTrailerBytes: number
  private readonly errorStatus: number
  private dead: Http1Error | undefined = undefined

  constructor(framing: Framing, maxTrailerBytes: number, errorStatus: number) {
    this.kind = framing._tag
    this.remaining = framing._tag === "Length" ? framing.length : 0
    this.done = framing._tag === "None"
    this.maxTrailerBytes = maxTrailerBytes
    this.errorStatus = errorStatus
  }

  /** Whether the body runs until the connection closes. */
  get closeDelimited(): boolean {
    return this.kind === "Close"
  }

  /**
   * `onChunkData`, for chunked bodies, is told each run of chunk data in `buf` (`[start, end)`), so a
   * caller that needs the decoded body can take views of it; framing bytes are never reported.
   */
  consume(buf: Uint8Array, from: number, onChunkData?: (start: number, end: number) => void): number | Http1Error {
    if (this.dead !== undefined) return this.dead
    if (this.done) return 0
    const available = buf.length - from
    switch (this.kind) {
      case "None":
        return 0
      case "Close":
        return available
      case "Length": {
        const n = available < this.remaining ? available : this.remaining
        this.remaining -= n
        if (this.remaining === 0) this.done = true
        return n
      }
      case "Chunked":
        return this.chunked(buf, from, onChunkData)
    }
  }

  private error(message: string): Http1Error {
    this.dead = fail("MalformedChunk", this.errorStatus, message)
    return this.dead
  }

  private chunked(buf: Uint8Array, from: number, onChunkData: ((start: number, end: number) => void) | undefined): number | Http1Error {
    let i = from
    const end = buf.length
    while (i < end) {
      switch (this.state) {
        case DATA: {
          const left = end - i
          if (left < this.remaining) {
            this.remaining -= left
            onChunkData?.(i, end)
            return end - from
          }
          onChunkData?.(i, i + this.remaining)
          i += this.remaining
          this.remaining = 0
          this.state = DATA_CR
          continue
        }
        case SIZE: {
          const c = buf[i]!
          const v = HEX[c]!
          if (v >= 0) {
            if (++this.digits > MAX_CHUNK_SIZE_DIGITS) return this.error("chunk size too large")
            this.remaining = this.remaining * 16 + v
          } else if (this.digits === 0) {
            return this.error("a chunk size without digits")
          } else if (c === CR) {
            this.state = SIZE_LF
          } else if (c === 0x3b /* ; */) {
            this.state = EXT
          } else if (c === SP || c === HTAB) {
            this.state = SIZE_WS
          } else {
            return this.error("a bad character in a chunk size")
          }
          break
        }
        case SIZE_WS: {
          const c = buf[i]!
          if (c === 0x3b) this.state = EXT
          else if (c === CR) this.state = SIZE_LF
          else if (c !== SP && c !== HTAB) return this.error("a bad character after a chunk size")
          break
        }
        case EXT: {
          const c = buf[i]!
          if (c === CR) this.state = SIZE_LF
          else if (c === LF || (c < 0x20 && c !== HTAB) || c === 0x7f) return this.error("a control character in a chunk extension")
          break
        }
        case SIZE_LF: {
          if (buf[i] !== LF) return this.error("a chunk-size line not ending in CRLF")
          this.digits = 0
          this.lineBytes = 0
          if (this.remaining === 0) {
            this.state = TRAILER_START
          } else {
            this.state = DATA
          }
          i++
          continue
        }
        case DATA_CR:
          if (buf[i] !== CR) return this.error("chunk data not followed by CRLF")
          this.state = DATA_LF
          break
        case DATA_LF:
          if (buf[i] !== LF) return this.error("chunk data not followed by CRLF")
          this.state = SIZE
          this.remaining = 0
          i++
          continue
        case TRAILER_START: {
          const c = buf[i]!
          if (c === CR) this.state = FINAL_LF
          else if (c === SP || c === HTAB) return this.error("obs-fold in a trailer")
          else if (c === LF) return this.error("a bare LF in the trailers")
          else this.state = TRAILER_LINE
          break
        }
        case TRAILER_LINE: {
          const c = buf[i]!
          if (c === CR) this.state = TRAILER_LF
          else if (c === LF || (c < 0x20 && c !== HTAB) || c === 0x7f) return this.error("a control character in a trailer")
          break
        }
        case TRAILER_LF:
          if (buf[i] !== LF) return this.error("a trailer line not ending in CRLF")
          this.state = TRAILER_START
          break
        case FINAL_LF:
          if (buf[i] !== LF) return this.error("trailers not ending in CRLF")
          this.done = true
          return i + 1 - from
      }
      i++
      const s = this.state
      if ((s === SIZE || s === SIZE_WS || s === EXT || s === SIZE_LF) && ++this.lineBytes > MAX_CHUNK_LINE) {
        return this.error("a chunk-size line too long")
      }
      if (s >= TRAILER_START && s <= FINAL_LF && ++this.trailerBytes > this.maxTrailerBytes) {
        return this.error("trailers too large")
      }
    }
    return end - from
  }
}
