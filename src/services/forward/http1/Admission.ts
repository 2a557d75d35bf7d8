/**
 * The raw HTTP/1.1 engine's contract with the front doors: the request as parsed, the decision a front
 * door takes on it (forward, refuse, or wait), the exchange as observed when it
 * is over, the client-limit events, and what the engine shares with the forwarder that made it. Types
 * only: the engine is in `Http1Engine.ts` and `http1/`.
 */
import type * as net from "node:net"
import type { Duplex } from "node:stream"
import type { ClientLimitKind, ClientLimits } from "../../../domain/ClientLimits.ts"
import type { ForwardedMode } from "../../../domain/HttpHeaders.ts"
import type { ErrorRenderer } from "../ErrorResponse.ts"
import type { MessageUpstream } from "../Exchange.ts"
import type { HttpLimits } from "../HttpLimits.ts"
import type { Upstream } from "../Upstream.ts"
import type { UpstreamPool } from "../UpstreamPool.ts"

/** A request as the engine parsed it, for the caller's decision. */
export interface Http1Request {
  readonly method: string
  /** The request target as sent. */
  readonly target: string
  /** The target in origin form (`/path?query`): what is forwarded unless the admission rewrites it. */
  readonly originTarget: string
  /** 0 for HTTP/1.0, 1 for HTTP/1.1. */
  readonly versionMinor: number
  /** Flat `[name, value, ...]` as received. */
  readonly headers: ReadonlyArray<string>
  readonly host: string | undefined
  readonly contentType: string | undefined
  /** The `Upgrade` value when the request asks to switch protocols. */
  readonly upgrade: string | undefined
  /** The client connection (for its address, or marks the caller set when it was accepted). */
  readonly socket: Duplex
}

/** The outgoing request a `Http1Director` may rewrite (same shape as the Node path's). */
export interface Http1Outgoing {
  method: string
  path: string
  headers: Array<string>
  upstream: Upstream
}

/**
 * How an observed exchange ended: its response complete, the connection cut before that (the client
 * left, a timeout, a broken body), answered by the engine itself with an error (upstream unreachable,
 * refused or too slow), or switched to a raw tunnel by a `101`.
 */
export type Http1ExchangeEnd = "Complete" | "Aborted" | "Refused" | "Upgraded"

/** One exchange as observed when it is over (see `Admission.Forward.observe`). */
export interface Http1Exchange {
  readonly method: string
  /** The request target as the client sent it. */
  readonly target: string
  /** The final status sent to the client; 0 when none was sent (aborted before a response head). */
  readonly status: number
  /** Bytes read from the client for this exchange: request head and body. */
  readonly receivedBytes: number
  /** Bytes written to the client for this exchange: interim and final heads, body, or an error answer. */
  readonly sentBytes: number
  /** From the request head parsed to the exchange's end (ms). */
  readonly durationMs: number
  readonly end: Http1ExchangeEnd
}

/** What to do with a request: forward it (optionally rewritten) or refuse it with a status. */
export type Admission =
  | {
    readonly _tag: "Forward"
    /** Overrides the client's target (e.g. a canonicalised path). */
    readonly path?: string | undefined
    /** Overrides the idle limit for this request (ms; 0 = none). */
    readonly idleTimeoutMs?: number | undefined
    /** Overrides the time allowed for the response head (ms; 0 = none). */
    readonly responseTimeoutMs?: number | undefined
    /** Rewrites the outgoing request (upstream, path, headers). */
    readonly director?: ((outgoing: Http1Outgoing, incoming: Http1Request) => void) | undefined
    /**
     * Called once when the exchange is over: the response complete, an error answered, the client gone,
     * or (for an upgrade) the tunnel closed. Releases what the decision took (a backend lease).
     */
    readonly onEnd?: (() => void) | undefined
    /**
     * Headers added to the final response head written to the client, as flat `[name, value, ...]`;
     * each replaces the upstream's headers of the same name (e.g. the request id the caller chose).
     */
    readonly responseHeaders?: ReadonlyArray<string> | undefined
    /**
     * Called once when the exchange is over, before `onEnd`, with its status, byte counts, duration and
     * how it ended (for an upgrade: when the `101` is relayed). The engine measures nothing more without it.
     */
    readonly observe?: ((exchange: Http1Exchange) => void) | undefined
    /**
     * Reaches the upstream by messages instead of the outgoing request's HTTP/1.1 connection (a
     * reverse-HTTP/2 backend): the engine is the exchange's front (see `MessageSide`).
     */
    readonly message?: MessageUpstream | undefined
  }
  | { readonly _tag: "Refuse"; readonly status: number; readonly message: string }

/**
 * A decision not made yet. `wait` is called once with the callback that takes the decision (at most
 * once, possibly at once) and returns a canceller, called if the client leaves first; the client
 * connection reads nothing more meanwhile. The caller bounds the wait (an answer such as 503 or 504 on
 * its own limits); the engine's response timeout starts once the request is forwarded.
 */
export interface PendingAdmission {
  readonly _tag: "Pending"
  readonly wait: (decide: (admission: Admission) => void) => () => void
}

/** A client refused or cut by one of the `ClientLimits` (or the head timeout), for logs and metrics. */
export interface ClientLimitEvent {
  readonly limit: ClientLimitKind
  /** The client's address ("local" for a Unix-socket peer). */
  readonly client: string
  /** The request concerned ("" for a head that never completed). */
  readonly method: string
  readonly target: string
}

/** A front door's side of the engine: its limits and its decision for each request. */
export interface Http1Front {
  readonly limits: HttpLimits
  readonly admit: (request: Http1Request) => Admission | PendingAdmission
  /** Data-rate and upstream-slot limits per client (default `CLIENT_LIMIT_DEFAULTS`). */
  readonly clientLimits?: ClientLimits | undefined
  /** Told each time a client limit refuses a request or cuts a connection. */
  readonly onClientLimit?: ((event: ClientLimitEvent) => void) | undefined
}

/** The engine serving one front door's listeners. */
export interface Http1Server {
  /** Serves a newly accepted client connection (call from `net.Server`'s `connection` event). */
  readonly accept: (socket: net.Socket) => void
  /** Stops taking requests, lets those in flight finish for up to `drainMs`, then closes everything left. */
  readonly close: (drainMs: number) => Promise<void>
  /** Client connections open. */
  readonly connections: () => number
  /** Whether `socket` is a connection of this server waiting for its next request (nothing in flight). */
  readonly betweenRequests: (socket: net.Socket) => boolean
}

/** What the engine shares with the forwarder that made it. */
export interface EngineCore {
  readonly upstream: Upstream
  readonly forwardedMode: ForwardedMode
  readonly responseTimeoutMs: number
  readonly idleTimeoutMs: number
  readonly errors: ErrorRenderer
  readonly report: (message: string) => void
  /** The pool for an upstream (one per upstream object, created on first use). */
  readonly poolFor: (upstream: Upstream) => UpstreamPool
  /** Live raw tunnels, closed with the forwarder. */
  readonly tunnels: Set<Duplex>
  /** Counts exchanges in flight. */
  readonly requestStarted: () => void
  readonly requestFinished: () => void
  readonly isClosed: () => boolean
}
