/**
 * What the routing table holds for one live backend, whatever front door it came through (a yamux
 * session, a WebSocket pool, an HTTP/2 connection): an identity, a load figure, and two ways in (an
 * HTTP `Upstream` for the forwarder, `connect` for raw byte streams). It does not route or forward.
 */
import { Buffer } from "node:buffer"
import type { Duplex } from "node:stream"
import type { Effect } from "effect"
import { Schema } from "effect"
import type { ExchangeFront, ExchangeRequest } from "./forward/Exchange.ts"
import type { Upstream } from "./forward/Upstream.ts"

/** How the public side arrived, as told to the backend. */
export type ConnectionProtocol = "http" | "tcp" | "tls-http" | "tls-tcp"

/** Facts about one public connection that the backend may want (written into the stream preamble). */
export interface ConnectionMeta {
  readonly protocol: ConnectionProtocol
  readonly remoteAddress: string
  readonly remotePort: number
  /** The public port the connection arrived on. */
  readonly localPort: number
  /** The public address the connection arrived at (raw TCP and TLS connections). */
  readonly localAddress?: string | undefined
  /** TLS server name, when the gateway terminated TLS. */
  readonly serverName?: string | undefined
}

/** A backend could not take a connection. */
export class BackendUnavailable extends Schema.TaggedError<BackendUnavailable>()("BackendUnavailable", {
  reason: Schema.Literals(["Closed", "OpenFailed"]),
  message: Schema.String
}) {}

/**
 * Who registered a backend: the name of the token it authenticated with, and whether that token lets
 * other tokens' backends join its routes (and may join theirs). The first owner of a route keeps it for
 * as long as the route exists (its grace period included).
 */
export interface RouteOwner {
  readonly name: string
  readonly shares: boolean
}

/** One live backend. */
export interface Backend {
  /** Unique among live backends; stable for the backend's life. */
  readonly id: string
  /** For logs and metrics (e.g. `control 127.0.0.1:51234 "svc-a"`). */
  readonly label: string
  /**
   * The token that registered it (control-port tunnels); a backend without one (embedded, wsp, reverse
   * HTTP/2) is not held to route ownership.
   */
  readonly owner?: RouteOwner | undefined
  /** Requests and connections currently using this backend; maintained by the dispatcher's leases. */
  inFlight: number
  /**
   * Where the HTTP forwarder sends this backend's requests: an agent whose sockets reach the backend
   * (for tunnels, each new socket is a new stream), reused with keep-alive, and `connect` for upgrades.
   */
  readonly upstream: Upstream
  /** A raw byte stream to the backend for one public connection (TCP, or TLS terminated here). */
  readonly connect: (meta: ConnectionMeta) => Effect.Effect<Duplex, BackendUnavailable>
  /**
   * True once the backend takes no new work: it has gone, or it is draining (a tunnel backend that sent
   * GoAway, an HTTP/2 connection that sent GOAWAY). It is then skipped even before it is unregistered.
   */
  readonly isClosed: () => boolean
  /**
   * False while the backend can take no more requests now (an HTTP/2 connection with every stream slot
   * taken): the dispatcher then picks another, or, when all are full, the least loaded, whose front door
   * holds the request until a slot frees. Without it the backend always has room.
   */
  readonly hasCapacity?: (() => boolean) | undefined
  /**
   * When present, the backend is reached by messages rather than through `upstream`'s HTTP/1.1
   * connections (a reverse-HTTP/2 connection): every front door hands it each exchange (and each
   * `Upgrade`) with its lease, and it answers on the leased backend or moves the request to the backend
   * that `lease.another` picks; `lease.release` is idempotent.
   */
  readonly messages?: BackendMessages | undefined
  /**
   * The cluster gateway this backend is reached through, when it is a relay backend (its route's
   * backends are on another gateway): the dispatcher picks it only when the route has no live local
   * backend, and never for a request that was itself relayed here.
   */
  readonly relayedVia?: string | undefined
}

/** How a backend reached by messages takes one exchange or one upgrade (see `MessageUpstream`). */
export interface BackendMessages {
  readonly exchange: (front: ExchangeFront, lease: BackendLease) => void
  readonly upgrade: (request: ExchangeRequest, protocol: string, socket: Duplex, head: Buffer, lease: BackendLease) => void
}

/** What a backend's own HTTP handlers get from the dispatcher: the backend taken, its route's backends. */
export interface BackendLease {
  readonly backend: Backend
  readonly route: { readonly backends: ReadonlyArray<Backend> }
  readonly release: () => void
  /**
   * The dispatcher's pick of another live backend of the route with room now (that `accept` takes),
   * leased; `undefined` when there is none. This lease is kept until released.
   */
  readonly another: (accept?: (backend: Backend) => boolean) => BackendLease | undefined
}
