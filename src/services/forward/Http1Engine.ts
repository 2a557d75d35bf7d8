/**
 * The raw HTTP/1.1 proxy engine: takes client sockets as they are accepted, parses only request and
 * response heads (`Http1Parser`), asks the caller what to do with each request, rewrites the head
 * (hop-by-hop headers, `X-Forwarded-*`) and moves body bytes unchanged between the client and a pooled
 * upstream connection, with backpressure, keep-alive and pipelining in order, and `101` turned into a
 * raw half-closable pipe. A decision may take time (`admit` returns a pending admission, e.g. while a
 * route waits for a backend): the connection then reads nothing more until it is made. An admission may
 * ask to be told how its exchange went (status, bytes, duration) and add response headers. One client
 * cannot hold what all share (`ClientLimits`): request bodies and response reads below a minimum rate are
 * cut, a client address holds a bounded share of a pool's connections, and the wait for one is bounded.
 * It does not route, authorise or count (the caller's `admit`, `observe` and `onClientLimit` do) and
 * never decodes bodies.
 *
 * This file is the server of one front door (its connections, the rate heartbeat, the drain). The rest
 * is in `http1/`: `Admission.ts` (the contract with front doors), `Constants.ts`, and one client
 * connection by job: `ConnectionState.ts` (state, endings, timers), `ConnectionLimits.ts` (timeouts and
 * client limits), `RequestSide.ts` (client bytes, heads, admission, request body), `ClientConnection.ts`
 * (upstream connection, response relay) and `RawTunnel.ts` (the pipe after a `101`).
 */
import { performance } from "node:perf_hooks"
import type * as net from "node:net"
import { CLIENT_LIMIT_DEFAULTS, type ClientLimits, RATE_CHECK_INTERVAL_MS } from "../../domain/ClientLimits.ts"
import type { EngineCore, Http1Front, Http1Server } from "./http1/Admission.ts"
import { ClientConnection } from "./http1/ClientConnection.ts"
import type { ConnectionHost, ConnectionState } from "./http1/ConnectionState.ts"

/** The set of client connections of one front door. */
class EngineServer implements Http1Server, ConnectionHost {
  readonly core: EngineCore
  readonly front: Http1Front
  readonly clientLimits: ClientLimits
  closing = false
  private readonly open = new Set<ConnectionState>()
  private readonly bySocket = new WeakMap<net.Socket, ConnectionState>()
  /** Connections whose data rates the heartbeat checks. */
  private readonly watched = new Set<ConnectionState>()
  /** Runs while some connection is watched. */
  private heartbeat: NodeJS.Timeout | undefined = undefined
  private readonly emptyWaiters: Array<() => void> = []
  private drainTimer: NodeJS.Timeout | undefined = undefined

  constructor(core: EngineCore, front: Http1Front) {
    this.core = core
    this.front = front
    this.clientLimits = front.clientLimits ?? CLIENT_LIMIT_DEFAULTS
  }

  /** Checks `c`'s data rates every `RATE_CHECK_INTERVAL_MS` until it has nothing left to watch. */
  watch(c: ConnectionState): void {
    this.watched.add(c)
    if (this.heartbeat === undefined) {
      this.heartbeat = setInterval(this.beat, RATE_CHECK_INTERVAL_MS)
      this.heartbeat.unref()
    }
  }

  private unwatch(c: ConnectionState): void {
    this.watched.delete(c)
    if (this.watched.size === 0 && this.heartbeat !== undefined) {
      clearInterval(this.heartbeat)
      this.heartbeat = undefined
    }
  }

  private readonly beat = (): void => {
    const now = performance.now()
    for (const c of this.watched) if (!c.check(now)) this.unwatch(c)
  }

  readonly accept = (socket: net.Socket): void => {
    if (this.closing || this.core.isClosed()) {
      socket.destroy()
      return
    }
    socket.setNoDelay(true)
    const connection = new ClientConnection(socket, this.core, this.front, this)
    this.open.add(connection)
    this.bySocket.set(socket, connection)
  }

  forget(c: ConnectionState): void {
    this.open.delete(c)
    this.unwatch(c)
    this.checkEmpty()
  }

  readonly connections = (): number => this.open.size

  readonly betweenRequests = (socket: net.Socket): boolean => {
    const connection = this.bySocket.get(socket)
    return connection !== undefined && this.open.has(connection) && connection.idle()
  }

  readonly close = (drainMs: number): Promise<void> =>
    new Promise((resolve) => {
      this.closing = true
      this.emptyWaiters.push(resolve)
      if (drainMs > 0) {
        // A later call may shorten the drain (0 destroys at once); the first timer stands otherwise.
        this.drainTimer ??= setTimeout(() => {
          this.drainTimer = undefined
          this.destroyAll()
        }, drainMs)
        for (const c of this.open) c.drain()
      } else this.destroyAll()
      this.checkEmpty()
    })

  private checkEmpty(): void {
    if (!this.closing || this.open.size > 0) return
    if (this.drainTimer !== undefined) {
      clearTimeout(this.drainTimer)
      this.drainTimer = undefined
    }
    for (const w of this.emptyWaiters.splice(0)) w()
  }

  destroyAll(): void {
    for (const c of [...this.open]) c.destroy()
  }
}

/** Starts serving a front door's connections with the forwarder's core. */
export const makeHttp1Server = (core: EngineCore, front: Http1Front): Http1Server => new EngineServer(core, front)
