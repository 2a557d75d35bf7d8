/**
 * The control-port protocol's messages (handshake, control stream, per-stream preamble) as Schemas, and
 * their framing: a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
 * Pure: bytes in, values out. Nothing here opens a socket or knows about yamux.
 */
import { Schema } from "effect"
import type * as Redacted from "effect/Redacted"
import { MaxDomainLength, MaxPort, RouteDefinition } from "./Route.ts"

/** Protocol version spoken by this build; a `Hello` with another version is rejected with `Version`. */
export const ProtocolVersion = 1
/** Size of the big-endian length prefix in front of every message. */
export const FrameHeaderBytes = 4
/** Largest handshake or control-stream message body (room for a few TLS certificate chains). */
export const MaxControlMessageBytes = 1024 * 1024
/** Largest per-stream preamble body. */
export const MaxPreambleBytes = 4 * 1024
/** Most listeners a single `Hello` may ask for. */
export const MaxListenersPerHello = 256
/** Longest token accepted on the wire. */
export const MaxTokenLength = 4 * 1024
/** Longest peer address text in a preamble (an IPv6 address with zone fits). */
export const MaxPreambleAddressLength = 64
/** Most control requests a backend may have waiting for an answer on one control stream. */
export const MaxPendingControlRequests = 64
/**
 * Most bytes of control requests (their frame bodies) waiting for an answer on one control stream:
 * with `MaxPendingControlRequests` alone, 64 requests of up to `MaxControlMessageBytes` could be held.
 */
export const MaxPendingControlBytes = 4 * 1024 * 1024
/** Longest free-text message in a rejection. */
export const MaxReasonMessageLength = 1024

const Id = Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 2 ** 32 - 1 }))
const Text = Schema.String.check(Schema.isMaxLength(MaxReasonMessageLength))
const Token = Schema.RedactedFromValue(Schema.String.check(Schema.isMaxLength(MaxTokenLength)))

/** A listener as bound by the gateway: the id that preambles name, and its route. */
export const BoundListener = Schema.Struct({ listenerId: Id, route: RouteDefinition })
export type BoundListener = typeof BoundListener.Type

/** Why the gateway refused a session or a listener. */
export const RejectionReason = Schema.Literals([
  "BadToken",
  "Version",
  "PortNotAllowed",
  "DomainNotAllowed",
  "Conflict",
  "Limit",
  "BindFailed",
  "Malformed",
  "UnknownListener",
  "Insecure"
])
export type RejectionReason = typeof RejectionReason.Type

// ---------------------------------------------------------------------------------------------------
// Handshake: the backend writes one Hello, the gateway answers one Welcome or Rejected.

/** First message on a control connection, from the backend. */
export const Hello = Schema.TaggedStruct("Hello", {
  version: Schema.Int,
  token: Token,
  listeners: Schema.Array(RouteDefinition).check(Schema.isMaxLength(MaxListenersPerHello)),
  label: Schema.optionalKey(Text)
})
export type Hello = typeof Hello.Type

/** Most gateway addresses a `Welcome` names. */
export const MaxWelcomeGateways = 64

/**
 * The gateway's acceptance: every listener of the `Hello`, bound, in order; for a gateway in a cluster,
 * the other gateways' control addresses (as a client names them), which a client may also keep sessions to.
 */
export const Welcome = Schema.TaggedStruct("Welcome", {
  version: Schema.Int,
  sessionId: Text,
  listeners: Schema.Array(BoundListener),
  gateways: Schema.optionalKey(Schema.Array(Schema.String.check(Schema.isMaxLength(300))).check(Schema.isMaxLength(MaxWelcomeGateways)))
})
export type Welcome = typeof Welcome.Type

/** The gateway's refusal; the connection is closed after it. `index` names the offending listener. */
export const Rejected = Schema.TaggedStruct("Rejected", {
  reason: RejectionReason,
  message: Text,
  index: Schema.optionalKey(Schema.Int)
})
export type Rejected = typeof Rejected.Type

/** What the gateway answers to a `Hello`. */
export const HelloReply = Schema.Union([Welcome, Rejected])
export type HelloReply = typeof HelloReply.Type

// ---------------------------------------------------------------------------------------------------
// Control stream: opened by the backend inside the yamux session; requests carry an id echoed back.

export const AddListener = Schema.TaggedStruct("AddListener", { requestId: Id, route: RouteDefinition })
export type AddListener = typeof AddListener.Type

export const RemoveListener = Schema.TaggedStruct("RemoveListener", { requestId: Id, listenerId: Id })
export type RemoveListener = typeof RemoveListener.Type

export const ListenerAdded = Schema.TaggedStruct("ListenerAdded", { requestId: Id, listener: BoundListener })
export type ListenerAdded = typeof ListenerAdded.Type

export const ListenerRemoved = Schema.TaggedStruct("ListenerRemoved", { requestId: Id, listenerId: Id })
export type ListenerRemoved = typeof ListenerRemoved.Type

export const ListenerRejected = Schema.TaggedStruct("ListenerRejected", {
  requestId: Id,
  reason: RejectionReason,
  message: Text
})
export type ListenerRejected = typeof ListenerRejected.Type

/** Backend → gateway on the control stream. */
export const ControlRequest = Schema.Union([AddListener, RemoveListener])
export type ControlRequest = typeof ControlRequest.Type

/** Gateway → backend on the control stream. */
export const ControlReply = Schema.Union([ListenerAdded, ListenerRemoved, ListenerRejected])
export type ControlReply = typeof ControlReply.Type

// ---------------------------------------------------------------------------------------------------
// Preamble: the first frame of every stream the gateway opens.

/** How the public side arrived, so the backend knows what the stream's bytes are. */
export const StreamProtocol = Schema.Literals(["http", "tcp", "tls-http", "tls-tcp"])
export type StreamProtocol = typeof StreamProtocol.Type

export const Preamble = Schema.TaggedStruct("Preamble", {
  listenerId: Id,
  protocol: StreamProtocol,
  remoteAddress: Schema.String.check(Schema.isMaxLength(MaxPreambleAddressLength)),
  remotePort: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: MaxPort })),
  localPort: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: MaxPort })),
  /** The public address the connection arrived at (raw TCP and TLS streams; absent from older gateways). */
  localAddress: Schema.optionalKey(Schema.String.check(Schema.isMaxLength(MaxPreambleAddressLength))),
  serverName: Schema.optionalKey(Schema.String.check(Schema.isMaxLength(MaxDomainLength)))
})
export type Preamble = typeof Preamble.Type

// ---------------------------------------------------------------------------------------------------
// Errors

/** A frame or message that cannot be read; the connection it came from is closed. */
export class ControlProtocolError extends Schema.TaggedError<ControlProtocolError>()("ControlProtocolError", {
  reason: Schema.Literals(["TooLarge", "BadJson", "BadMessage", "Truncated"]),
  message: Schema.String
}) {}

// ---------------------------------------------------------------------------------------------------
// Framing

const encoder = new TextEncoder()
const decoder = new TextDecoder("utf-8", { fatal: true })

/** Prefixes `body` with its 4-byte big-endian length. */
export const frame = (body: Uint8Array): Uint8Array => {
  const out = new Uint8Array(FrameHeaderBytes + body.length)
  new DataView(out.buffer).setUint32(0, body.length)
  out.set(body, FrameHeaderBytes)
  return out
}

const encodeWith = <S extends Schema.Codec<any, any>>(schema: S, maxBytes: number) => {
  const encode = Schema.encodeSync(schema as any) as (value: S["Type"]) => unknown
  return (value: S["Type"]): Uint8Array => {
    const body = encoder.encode(JSON.stringify(encode(value)))
    if (body.length > maxBytes) {
      throw new ControlProtocolError({ reason: "TooLarge", message: `message of ${body.length} bytes exceeds ${maxBytes}` })
    }
    return frame(body)
  }
}

const decodeWith = <S extends Schema.Codec<any, any>>(schema: S) => {
  const decode = Schema.decodeUnknownResult(schema as any) as (input: unknown) => import("effect/Result").Result<S["Type"], { message: string }>
  return (body: Uint8Array): S["Type"] | ControlProtocolError => {
    let json: unknown
    try {
      json = JSON.parse(decoder.decode(body))
    } catch (e) {
      return new ControlProtocolError({ reason: "BadJson", message: `not UTF-8 JSON: ${(e as Error).message}` })
    }
    const result = decode(json)
    if (result._tag === "Failure") {
      return new ControlProtocolError({ reason: "BadMessage", message: result.failure.message })
    }
    return result.success
  }
}

/** Encodes a framed `Hello` (the token is written in clear inside the frame; protect the transport). */
export const encodeHello: (hello: Hello) => Uint8Array = encodeWith(Hello, MaxControlMessageBytes)
export const decodeHello = decodeWith(Hello)
export const encodeHelloReply: (reply: HelloReply) => Uint8Array = encodeWith(HelloReply, MaxControlMessageBytes)
export const decodeHelloReply = decodeWith(HelloReply)
export const encodeControlRequest: (request: ControlRequest) => Uint8Array = encodeWith(ControlRequest, MaxControlMessageBytes)
export const decodeControlRequest = decodeWith(ControlRequest)
export const encodeControlReply: (reply: ControlReply) => Uint8Array = encodeWith(ControlReply, MaxControlMessageBytes)
export const decodeControlReply = decodeWith(ControlReply)
export const encodePreamble: (preamble: Preamble) => Uint8Array = encodeWith(Preamble, MaxPreambleBytes)
export const decodePreamble = decodeWith(Preamble)

/** Builds a `Hello` for this protocol version. */
export const makeHello = (token: Redacted.Redacted<string>, listeners: ReadonlyArray<RouteDefinition>, label?: string): Hello =>
  label === undefined
    ? { _tag: "Hello", version: ProtocolVersion, token, listeners }
    : { _tag: "Hello", version: ProtocolVersion, token, listeners, label }

/**
 * Incremental reader of length-prefixed frames. `push` bytes as they arrive; `next` returns a complete
 * body, `undefined` when more bytes are needed, or an error (after which the reader stays failed).
 * The length is checked before anything is buffered beyond the header, so a peer cannot make it hold
 * more than `maxBytes + FrameHeaderBytes`. `remainder` hands back unread bytes (the start of what
 * follows the handshake on the same connection).
 */
export class FrameReader {
  readonly maxBytes: number
  private chunks: Array<Uint8Array> = []
  private buffered = 0
  private failure: ControlProtocolError | undefined

  constructor(maxBytes: number) {
    this.maxBytes = maxBytes
  }

  /** Bytes held and not yet returned. */
  get bufferedBytes(): number {
    return this.buffered
  }

  /** Adds bytes. Fails (and stays failed) when they announce a frame larger than the limit. */
  push(chunk: Uint8Array): ControlProtocolError | undefined {
    if (this.failure !== undefined) return this.failure
    if (chunk.length === 0) return undefined
    this.chunks.push(chunk)
    this.buffered += chunk.length
    return this.check()
  }

  /** The next complete frame body, `undefined` if incomplete, or the reader's error. */
  next(): Uint8Array | ControlProtocolError | undefined {
    if (this.failure !== undefined) return this.failure
    if (this.buffered < FrameHeaderBytes) return undefined
    // a length is judged only when its frame is the next one asked for: the bytes behind the last frame
    // a caller wants may be another protocol (yamux, HTTP/2), taken whole with `remainder()`
    const failure = this.check()
    if (failure !== undefined) return failure
    const length = this.peekLength()
    if (this.buffered < FrameHeaderBytes + length) return undefined
    return this.take(FrameHeaderBytes + length).subarray(FrameHeaderBytes)
  }

  /** Removes and returns every byte not yet returned as a frame. */
  remainder(): Uint8Array {
    return this.take(this.buffered)
  }

  private check(): ControlProtocolError | undefined {
    if (this.buffered < FrameHeaderBytes) return undefined
    const length = this.peekLength()
    if (length > this.maxBytes) {
      this.failure = new ControlProtocolError({
        reason: "TooLarge",
        message: `frame of ${length} bytes exceeds the limit of ${this.maxBytes}`
      })
      this.chunks = []
      this.buffered = 0
      return this.failure
    }
    return undefined
  }

  private peekLength(): number {
    const head = this.chunks[0]!
    if (head.length >= FrameHeaderBytes) {
      return new DataView(head.buffer, head.byteOffset, FrameHeaderBytes).getUint32(0)
    }
    const four = new Uint8Array(FrameHeaderBytes)
    let filled = 0
    for (const chunk of this.chunks) {
      const n = Math.min(FrameHeaderBytes - filled, chunk.length)
      four.set(chunk.subarray(0, n), filled)
      filled += n
      if (filled === FrameHeaderBytes) break
    }
    return new DataView(four.buffer).getUint32(0)
  }

  private take(n: number): Uint8Array {
    const head = this.chunks[0]
    if (n === 0) return new Uint8Array(0)
    if (head !== undefined && head.length >= n) {
      const out = head.subarray(0, n)
      if (head.length === n) this.chunks.shift()
      else this.chunks[0] = head.subarray(n)
      this.buffered -= n
      return out
    }
    const out = new Uint8Array(n)
    let filled = 0
    while (filled < n) {
      const chunk = this.chunks[0]!
      const count = Math.min(n - filled, chunk.length)
      out.set(chunk.subarray(0, count), filled)
      filled += count
      if (count === chunk.length) this.chunks.shift()
      else this.chunks[0] = chunk.subarray(count)
    }
    this.buffered -= n
    return out
  }
}
