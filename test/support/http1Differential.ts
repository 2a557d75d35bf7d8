/**
 * The differential check of switchyard's HTTP/1.1 request parsing against llhttp: each input (a message
 * followed by a sentinel request) is read the way the HTTP/1.1 engine reads a client connection (head
 * reader, then body framer, then the next head) and by llhttp; switchyard may refuse more, but whatever it
 * accepts must be what llhttp accepts, read the same way (method, target, fields, body, trailers, where the
 * next request starts). Nothing here opens a socket; the llhttp side is `llhttpOracle.ts`.
 */
import { BodyFramer, type HeadLimits, requestHeadReader } from "../../src/domain/Http1Parser.ts"
import type { Oracle, OracleTrace, ParsedRequest } from "./llhttpOracle.ts"

/** The limits a switchyard listener uses by default (`Listeners.ts`): 16 KiB heads, 2000 fields. */
export const LISTENER_LIMITS: HeadLimits = { maxHeaderSize: 16 * 1024, maxHeadersCount: 2_000 }

/** What follows every message: where llhttp and switchyard find its head tells where the message ended. */
export const SENTINEL = Buffer.from("GET /__sentinel HTTP/1.1\r\nHost: s\r\n\r\n", "latin1")

/** Most requests read from one input (a message, anything smuggled in it, and the sentinel). */
const MAX_REQUESTS = 8

/** How switchyard's reading of one input ended. */
export type SwitchyardTerminal =
  /** Every byte became part of a complete request. */
  | { readonly _tag: "End" }
  /** A head or body is still open when the input ends (an open body: the last request is not complete). */
  | { readonly _tag: "Incomplete" }
  | { readonly _tag: "Error"; readonly reason: string; readonly message: string }
  /** The engine refuses the request before reading a body (CONNECT, a chunked upgrade). */
  | { readonly _tag: "Refused"; readonly message: string }
  /** The request ends the connection (no keep-alive): the engine reads nothing after it. */
  | { readonly _tag: "Closed" }
  /** The request asks for an upgrade: bytes after its body are not HTTP. */
  | { readonly _tag: "Upgraded" }

export interface SwitchyardTrace {
  readonly requests: ReadonlyArray<ParsedRequest>
  readonly terminal: SwitchyardTerminal
}

const CRLF = Buffer.from("\r\n", "latin1")

/**
 * The trailer fields of a complete chunked body, split the way a field line reads (name up to the first
 * colon, value without surrounding SP/HTAB). A line without a colon keeps it whole as a name and gets no
 * value, which can never match a field llhttp reports.
 */
const trailerFields = (raw: Buffer, lastDataEnd: number): Array<string> => {
  const lastChunkLine = lastDataEnd === 0 ? 0 : lastDataEnd + 2
  const sectionStart = raw.indexOf(CRLF, lastChunkLine) + 2
  const fields: Array<string> = []
  let at = sectionStart
  while (at < raw.length - 2) {
    const eol = raw.indexOf(CRLF, at)
    const line = raw.toString("latin1", at, eol)
    const colon = line.indexOf(":")
    if (colon === -1) fields.push(line, "\u0000(no colon)")
    else fields.push(line.slice(0, colon), line.slice(colon + 1).replace(/^[ \t]+|[ \t]+$/g, ""))
    at = eol + 2
  }
  return fields
}

/**
 * Reads `input` as the engine reads a client connection, fed in pieces of `pieceSize` bytes (the whole
 * input at once when 0): a head, then its body through a `BodyFramer`, then the next head.
 */
export const switchyardRead = (input: Buffer, pieceSize = 0, limits: HeadLimits = LISTENER_LIMITS): SwitchyardTrace => {
  const reader = requestHeadReader(limits)
  const requests: Array<ParsedRequest> = []
  const step = pieceSize <= 0 ? input.length : pieceSize
  let framer: BodyFramer | undefined
  let chunked = false
  let keepAlive = true
  let raw: Array<Buffer> = []
  let rawLength = 0
  let data: Array<Buffer> = []
  let lastDataEnd = 0
  for (let at = 0; at < input.length; at += step) {
    let chunk = input.subarray(at, at + step)
    while (chunk.length > 0) {
      if (framer === undefined) {
        const head = reader.push(chunk)
        if (head._tag === "Need") break
        if (head._tag === "Error") return { requests, terminal: { _tag: "Error", reason: head.error.reason, message: head.error.message } }
        const h = head.head
        if (h.method === "CONNECT") return { requests, terminal: { _tag: "Refused", message: "CONNECT is not supported" } }
        if (h.upgrade !== undefined && h.framing._tag === "Chunked") {
          return { requests, terminal: { _tag: "Refused", message: "an upgrade request with a body needs a Content-Length" } }
        }
        requests.push({
          method: h.method,
          target: h.target,
          versionMinor: h.versionMinor,
          headers: h.headers,
          upgrade: h.upgrade !== undefined,
          complete: false,
          body: Buffer.alloc(0),
          trailers: []
        })
        framer = new BodyFramer(h.framing, limits.maxHeaderSize, 400)
        chunked = h.framing._tag === "Chunked"
        // The engine closes after any HTTP/1.0 request, keep-alive or not.
        keepAlive = h.keepAlive && h.versionMinor === 1
        raw = []
        rawLength = 0
        data = []
        lastDataEnd = 0
        chunk = head.rest
      } else {
        const base = rawLength
        const n = framer.consume(chunk, 0, (start, end) => {
          data.push(Buffer.from(chunk.subarray(start, end)))
          lastDataEnd = base + end
        })
        if (typeof n !== "number") return { requests, terminal: { _tag: "Error", reason: n.reason, message: n.message } }
        raw.push(Buffer.from(chunk.subarray(0, n)))
        rawLength += n
        chunk = chunk.subarray(n)
      }
      if (framer.done) {
        const body = Buffer.concat(raw)
        const request = requests[requests.length - 1]!
        requests[requests.length - 1] = {
          ...request,
          complete: true,
          body: chunked ? Buffer.concat(data) : body,
          trailers: chunked ? trailerFields(body, lastDataEnd) : []
        }
        framer = undefined
        if (request.upgrade) return { requests, terminal: { _tag: "Upgraded" } }
        if (!keepAlive) return { requests, terminal: { _tag: "Closed" } }
        if (requests.length >= MAX_REQUESTS) return { requests, terminal: { _tag: "Incomplete" } }
      }
    }
  }
  return { requests, terminal: framer !== undefined || reader.buffered > 0 ? { _tag: "Incomplete" } : { _tag: "End" } }
}

/** Methods llhttp knows; any other token is an extension method that switchyard forwards and llhttp refuses. */
const LLHTTP_METHODS: ReadonlySet<string> = new Set(
  "DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY"
    .split(" ")
)

/** The verdict on one input. */
export type Verdict =
  | { readonly _tag: "Agree"; readonly switchyardAccepted: boolean; readonly llhttpAccepted: boolean }
  /** switchyard accepted an extension method llhttp does not know; nothing after the method is compared. */
  | { readonly _tag: "ExtensionMethod"; readonly method: string }
  /**
   * llhttp switched to h2c where switchyard, by design, forwards the request as plain HTTP/1.1 without its
   * Upgrade: the head agreed; what follows is HTTP to switchyard and is not compared.
   */
  | { readonly _tag: "H2cDeclined" }
  | { readonly _tag: "Disagree"; readonly why: string }

const completed = (requests: ReadonlyArray<ParsedRequest>): boolean => requests.length > 0 && requests[requests.length - 1]!.complete

const accepted = (t: SwitchyardTrace): boolean =>
  completed(t.requests) && (t.terminal._tag === "End" || t.terminal._tag === "Closed" || t.terminal._tag === "Upgraded")

/** llhttp accepted the message: it completed a request and refused nothing but data after a closing one. */
const llhttpAccepted = (t: OracleTrace): boolean =>
  completed(t.requests) && (t.terminal._tag === "End" || t.terminal._tag === "Upgraded" || (t.terminal._tag === "Error" && t.terminal.code === "HPE_CLOSED_CONNECTION"))

const show = (b: Buffer): string => escaped(b)

const headDiffers = (sy: ParsedRequest, ll: ParsedRequest): string | undefined => {
  if (sy.method !== ll.method) return `method ${JSON.stringify(sy.method)} vs ${JSON.stringify(ll.method)}`
  if (sy.target !== ll.target) return `target ${JSON.stringify(sy.target)} vs ${JSON.stringify(ll.target)}`
  if (sy.versionMinor !== ll.versionMinor) return `HTTP/1.${sy.versionMinor} vs HTTP/1.${ll.versionMinor}`
  if (JSON.stringify(sy.headers) !== JSON.stringify(ll.headers)) return `fields ${JSON.stringify(sy.headers)} vs ${JSON.stringify(ll.headers)}`
  if (sy.upgrade !== ll.upgrade) return `upgrade ${sy.upgrade} vs ${ll.upgrade}`
  return undefined
}

/** Bodies of upgrades are not compared: what follows such a head is relayed raw either way. */
const bodyDiffers = (sy: ParsedRequest, ll: ParsedRequest): string | undefined => {
  if (sy.upgrade) return undefined
  if (!sy.body.equals(ll.body)) return `body ${show(sy.body)} vs ${show(ll.body)}`
  if (JSON.stringify(sy.trailers) !== JSON.stringify(ll.trailers)) return `trailers ${JSON.stringify(sy.trailers)} vs ${JSON.stringify(ll.trailers)}`
  return undefined
}

/** Whether a request asks for an upgrade to h2c (its `Upgrade` lists "h2c"). */
const offersH2c = (r: ParsedRequest): boolean => {
  for (let i = 0; i < r.headers.length; i += 2) {
    if (r.headers[i]!.toLowerCase() === "upgrade" && r.headers[i + 1]!.split(",").some((t) => t.replace(/^[ \t]+|[ \t]+$/g, "").toLowerCase() === "h2c")) return true
  }
  return false
}

const llhttpEnd = (t: OracleTrace): string => (t.terminal._tag === "Error" ? `refused (${t.terminal.code})` : t.terminal._tag === "Pending" ? "still read a body" : "stopped")

/**
 * Compares the two readings. Every head switchyard accepted must be one llhttp accepted, the same in every
 * part; every body switchyard ended must end where llhttp ended it, with the same data and trailers; a body
 * llhttp ended must not still be open in switchyard (the rest would be a request to llhttp and body to
 * switchyard); finishing cleanly where llhttp refused or still waits is a disagreement. Stopping earlier
 * (an error, a refusal, a head still open) is switchyard being stricter, which is fine.
 */
export const compare = (sy: SwitchyardTrace, ll: OracleTrace): Verdict => {
  const common = Math.min(sy.requests.length, ll.requests.length)
  for (let i = 0; i < common; i++) {
    const s = sy.requests[i]!
    const l = ll.requests[i]!
    if (!s.upgrade && l.upgrade && offersH2c(s) && headDiffers(s, { ...l, upgrade: false }) === undefined) return { _tag: "H2cDeclined" }
    const head = headDiffers(s, l)
    if (head !== undefined) return { _tag: "Disagree", why: `request ${i + 1}: ${head}` }
    if (s.complete && l.complete) {
      const body = bodyDiffers(s, l)
      if (body !== undefined) return { _tag: "Disagree", why: `request ${i + 1}: ${body}` }
    } else if (s.complete) {
      return { _tag: "Disagree", why: `request ${i + 1}: switchyard ended the body (${show(s.body)}) where llhttp ${llhttpEnd(ll)}` }
    } else if (l.complete && !s.upgrade && sy.terminal._tag === "Incomplete") {
      return { _tag: "Disagree", why: `request ${i + 1}: switchyard still reads the body llhttp ended (${show(l.body)})` }
    }
  }
  if (sy.requests.length > ll.requests.length) {
    const extra = sy.requests[ll.requests.length]!
    if (ll.terminal._tag === "Error" && ll.terminal.code === "HPE_INVALID_METHOD" && !LLHTTP_METHODS.has(extra.method)) {
      return { _tag: "ExtensionMethod", method: extra.method }
    }
    return { _tag: "Disagree", why: `switchyard accepted head ${ll.requests.length + 1} (${extra.method} ${extra.target}) where llhttp ${llhttpEnd(ll)}` }
  }
  if (sy.requests.length === ll.requests.length && sy.terminal._tag === "End" && ll.terminal._tag !== "End") {
    return { _tag: "Disagree", why: `switchyard finished cleanly where llhttp ${llhttpEnd(ll)}` }
  }
  // After a request that ends the connection or switches protocols, switchyard reads no further: what
  // llhttp makes of the bytes after it does not count.
  const stopped = sy.terminal._tag === "Closed" || sy.terminal._tag === "Upgraded"
  const llAccepted = llhttpAccepted(ll) || (stopped && ll.requests.length >= sy.requests.length && ll.requests[sy.requests.length - 1]!.complete)
  return { _tag: "Agree", switchyardAccepted: accepted(sy), llhttpAccepted: llAccepted }
}

/** Tallies of a run. */
export interface Tally {
  checked: number
  bothAccepted: number
  /** switchyard refused (or stopped earlier) where llhttp accepted. */
  switchyardStricter: number
  /** Those refusals by switchyard's reason. */
  readonly stricterBy: Map<string, number>
  bothRejected: number
  /** llhttp refused, switchyard accepted: only ever extension methods. */
  extensionMethods: number
  /** h2c upgrades switchyard forwards as plain requests (see `Verdict`). */
  h2cDeclined: number
  /** Inputs also fed one byte (or a few bytes) at a time. */
  incrementalChecked: number
  readonly failures: Array<{ readonly input: Buffer; readonly why: string }>
}

export const emptyTally = (): Tally => ({
  checked: 0,
  bothAccepted: 0,
  switchyardStricter: 0,
  stricterBy: new Map(),
  bothRejected: 0,
  extensionMethods: 0,
  h2cDeclined: 0,
  incrementalChecked: 0,
  failures: []
})

const sameTrace = (a: SwitchyardTrace, b: SwitchyardTrace): boolean =>
  a.terminal._tag === b.terminal._tag &&
  a.requests.length === b.requests.length &&
  a.requests.every((r, i) => {
    const o = b.requests[i]!
    return r.complete === o.complete && headDiffers(r, o) === undefined && (!r.complete || bodyDiffers(r, o) === undefined)
  })

/** Why switchyard did not accept an input, in a few words. */
const refusal = (t: SwitchyardTrace): string => {
  switch (t.terminal._tag) {
    case "Error":
      return t.terminal.message.replace(/"[^"]*"/g, "\"...\"")
    case "Refused":
      return t.terminal.message
    default:
      return t.terminal._tag
  }
}

/** Most failures kept for the report (the count goes on). */
const MAX_FAILURES_KEPT = 20

/**
 * Checks a batch of messages (each followed by the sentinel) against llhttp, adding to `tally`; every
 * `incrementalEvery`-th message is also read a byte at a time and in 7-byte pieces, which must give the
 * same reading as the whole input.
 */
export const checkBatch = async (oracle: Oracle, messages: ReadonlyArray<Buffer>, tally: Tally, incrementalEvery = 16): Promise<void> => {
  const inputs = messages.map((m) => Buffer.concat([m, SENTINEL]))
  const ll = await oracle.parseAll(inputs)
  const fail = (input: Buffer, why: string) => {
    if (tally.failures.length < MAX_FAILURES_KEPT) tally.failures.push({ input, why })
  }
  inputs.forEach((input, i) => {
    tally.checked++
    const sy = switchyardRead(input)
    if (incrementalEvery > 0 && tally.checked % incrementalEvery === 0) {
      tally.incrementalChecked++
      for (const piece of [1, 7]) {
        if (!sameTrace(sy, switchyardRead(input, piece))) fail(input, `switchyard reads it differently when fed ${piece} byte(s) at a time`)
      }
    }
    const verdict = compare(sy, ll[i]!)
    switch (verdict._tag) {
      case "Disagree":
        fail(input, verdict.why)
        return
      case "ExtensionMethod":
        tally.extensionMethods++
        return
      case "H2cDeclined":
        tally.h2cDeclined++
        return
      case "Agree":
        if (verdict.switchyardAccepted && verdict.llhttpAccepted) tally.bothAccepted++
        else if (verdict.llhttpAccepted) {
          tally.switchyardStricter++
          const why = refusal(sy)
          tally.stricterBy.set(why, (tally.stricterBy.get(why) ?? 0) + 1)
        }
        else if (!verdict.switchyardAccepted) tally.bothRejected++
        // switchyard accepted and llhttp did not, without a disagreement: impossible by `compare`'s rules.
        else fail(input, "switchyard accepted a message llhttp refused")
    }
  })
}

/** A message as a JSON string literal, every byte outside printable ASCII escaped (0xA0 included). */
export const escaped = (input: Buffer): string =>
  JSON.stringify(input.toString("latin1")).replace(/[\u007f-\u00ff]/g, (c) => `\\u00${c.charCodeAt(0).toString(16)}`)
