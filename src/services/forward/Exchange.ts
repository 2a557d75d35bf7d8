/**
 * One exchange between a front door and an upstream, as messages: a request head and a body stream in,
 * a response head, a body stream and trailers out. A front door implements `ExchangeFront` once (the raw
 * HTTP/1.1 engine over its client socket, the HTTP/2 public port over Node's stream objects); an upstream
 * kind that is not an HTTP/1.1 byte stream (an HTTP/2 stream of a reverse-HTTP/2 backend) implements
 * `MessageUpstream` once, and every front door reaches it through these types. Header rules are the front
 * door's: the request's fields arrive here with hop-by-hop fields removed and `X-Forwarded-*` applied
 * (`requestHeaders`); the response's go to the front door free of hop-by-hop fields (`responseHeaders`).
 */
import { Buffer } from "node:buffer"
import type { Duplex } from "node:stream"

/** The request of one exchange as an upstream reads it. */
export interface ExchangeRequest {
  readonly method: string
  /** The target in origin form (`/path?query`), as routed. */
  readonly path: string
  readonly scheme: "http" | "https"
  /** The `Host` the client sent (HTTP/2: its `:authority`). */
  readonly authority: string | undefined
  /** Flat `[name, value, ...]`: hop-by-hop fields gone, `X-Forwarded-*` as the front door's mode says. */
  readonly headers: ReadonlyArray<string>
  /** Whether the client said it accepts trailers (`TE: trailers`), which HTTP/2 upstreams are told. */
  readonly acceptsTrailers: boolean
  /** Whether a body follows the head (a length other than 0, or a chunked coding). */
  readonly hasBody: boolean
  /** For logs: the target as the client sent it. */
  readonly target: string
}

/**
 * The front door's side of one exchange. The upstream reads the request body through `readBody` and
 * answers through `respond`, `write` and `end`, or `fail` (no head sent yet) and `abort` (after it).
 * Calls after the exchange is over (answered, failed, or the client gone) are ignored.
 */
export interface ExchangeFront {
  readonly request: ExchangeRequest
  /**
   * Starts the request body: `onData` for each chunk (returning false asks for no more until
   * `resumeBody`), then `onEnd` with the trailers (flat, unchecked) when there are some. A second call
   * (the request moved to another upstream) replaces the reader; the body goes on from where it was.
   */
  readonly readBody: (onData: (chunk: Buffer) => boolean, onEnd: (trailers: ReadonlyArray<string> | undefined) => void) => void
  readonly resumeBody: () => void
  /**
   * Sends the response head. `headers` are flat and free of hop-by-hop fields; `bodyless` says no body
   * follows whatever the head says (a `HEAD` request, 204, 304). Returns why the front door cannot carry
   * the head (a character HTTP/1.1 forbids), in which case nothing was sent.
   */
  readonly respond: (status: number, headers: ReadonlyArray<string>, bodyless: boolean) => string | undefined
  /**
   * A chunk of the response body; false when the client's queue is above its mark (wait for `onDrain`).
   * `written`, when given, is called once the front door holds `chunk` no more (handed to the client's
   * socket, or dropped), so the caller may give its memory back (`ReadLease`).
   */
  readonly write: (chunk: Buffer, written?: () => void) => boolean
  /** Called after a `write` returned false, once the queue went below its mark. */
  readonly onDrain: (listener: () => void) => void
  /** Ends the response, with its trailers when it has some; returns why they cannot be carried. */
  readonly end: (trailers: ReadonlyArray<string> | undefined) => string | undefined
  /** Answers an error (no response head was sent) and ends the exchange. */
  readonly fail: (status: number, message: string) => void
  /** Cuts an exchange whose head was sent: the client must see an incomplete response. */
  readonly abort: () => void
  /**
   * Called once when the exchange ends other than by `end`: the client left, the front door ended it (a
   * limit or a timeout of its own), or `fail` or `abort` was called.
   */
  readonly onGone: (listener: () => void) => void
  /** The client left, or the exchange is over. */
  readonly isGone: () => boolean
  /** A response head went out. */
  readonly isAnswered: () => boolean
}

/**
 * An upstream reached by messages rather than by an HTTP/1.1 byte stream. `exchange` carries one
 * request, answering through the front; `upgrade` carries an `Upgrade` request (for `protocol`, the
 * first token of its `Upgrade` field) whose client connection becomes the upstream's to answer (its
 * `101`, then a raw pipe), with the bytes read past the head in `head`.
 */
export interface MessageUpstream {
  readonly exchange: (front: ExchangeFront) => void
  readonly upgrade: (request: ExchangeRequest, protocol: string, socket: Duplex, head: Buffer) => void
}
