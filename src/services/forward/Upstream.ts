/**
 * Where the forwarding core sends requests: a pooled `http.Agent` for Node's request objects, raw
 * half-close capable connections for the HTTP/1.1 engine's pool and for upgrades. Unix-socket and TCP
 * upstreams are built here; tunnels bring their own agent and streams through `agentUpstream`.
 */
import * as http from "node:http"
import * as net from "node:net"
import { Duplex } from "node:stream"

export interface Upstream {
  /** For errors and logs: `unix:/var/run/docker.sock`, `127.0.0.1:8080`, `tunnel web-1`. */
  readonly describe: string
  /** Pooled connections for ordinary requests; destroyed with the forwarder's scope when `owned`. */
  readonly agent: http.Agent
  /** Whether the forwarder owns the agent and destroys it when its scope closes. */
  readonly owned: boolean
  /** Options passed to `http.request` along with the agent (`socketPath` or `host`/`port`). */
  readonly target: { readonly socketPath?: string; readonly host?: string; readonly port?: number }
  /** A new connection for an upgrade (never pooled); must allow half-close. */
  readonly connect: () => Duplex
  /** Whether the upstream is a local Unix-socket API (no `X-Forwarded-*` by default). */
  readonly local: boolean
  /**
   * A new socket that reads into buffers the caller supplies (Node's `onread`), for pooled connections of
   * the HTTP/1.1 engine: a buffer is reused while what was read into it has been written on; absent for
   * upstreams whose connections are not sockets (tunnel streams), which use `connect`.
   */
  readonly connectReading?: ((onread: ReadInto) => Duplex) | undefined
  /**
   * True once the upstream takes no new exchanges (a tunnel backend draining after its GoAway): pooled
   * connections are closed instead of reused, so exchanges still waiting for one go elsewhere.
   */
  readonly retiring?: (() => boolean) | undefined
}

/** Node's `onread` option: where the next read goes, and what to do with the bytes read. */
export interface ReadInto {
  readonly buffer: () => Uint8Array
  readonly callback: (bytesRead: number, buffer: Uint8Array) => boolean
}

export interface PoolLimits {
  /** Most connections in use at once; further requests queue in the agent. */
  readonly maxSockets: number
  /** Most idle connections kept for reuse. */
  readonly maxFreeSockets: number
}

/** Ends an idle pooled connection its upstream sent bytes on. */
const outOfTurn = function(this: Duplex): void {
  this.destroy()
}

/**
 * A keep-alive agent that never reuses a connection its upstream talked on while it sat idle (bytes
 * past the end of the last response, or a response sent ahead to be read as the next request's): it is
 * destroyed at the first such byte. Only the public `keepSocketAlive`/`reuseSocket` hooks are used.
 */
export class IdleGuardedAgent extends http.Agent {
  override keepSocketAlive(socket: Duplex): void {
    const kept = (super.keepSocketAlive(socket) as unknown) !== false
    if (kept) socket.once("data", outOfTurn)
    return kept as unknown as void
  }

  override reuseSocket(socket: Duplex, request: http.ClientRequest): void {
    socket.off("data", outOfTurn)
    super.reuseSocket(socket, request)
  }
}

/** A Unix-socket HTTP API such as `/var/run/docker.sock`. */
export const unixUpstream = (socketPath: string, limits: PoolLimits): Upstream => ({
  describe: `unix:${socketPath}`,
  agent: new IdleGuardedAgent({ keepAlive: true, maxSockets: limits.maxSockets, maxFreeSockets: limits.maxFreeSockets, scheduling: "lifo" }),
  owned: true,
  target: { socketPath },
  connect: () => net.createConnection({ path: socketPath, allowHalfOpen: true }),
  connectReading: (onread) => net.createConnection({ path: socketPath, allowHalfOpen: true, onread }),
  local: true
})

/** A plain-TCP HTTP upstream. */
export const tcpUpstream = (host: string, port: number, limits: PoolLimits): Upstream => ({
  describe: host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`,
  agent: new IdleGuardedAgent({ keepAlive: true, maxSockets: limits.maxSockets, maxFreeSockets: limits.maxFreeSockets, scheduling: "lifo" }),
  owned: true,
  target: { host, port },
  connect: () => net.createConnection({ host, port, allowHalfOpen: true, noDelay: true }),
  connectReading: (onread) => net.createConnection({ host, port, allowHalfOpen: true, noDelay: true, onread }),
  local: false
})

/**
 * An upstream reached through a caller's agent (tunnels: the agent's `createConnection` opens a stream
 * on a session). `connect` opens a stream for upgrades. The caller keeps ownership of the agent.
 */
export const agentUpstream = (options: {
  readonly describe: string
  readonly agent: http.Agent
  readonly connect: () => Duplex
  readonly host?: string
  readonly retiring?: () => boolean
}): Upstream => ({
  describe: options.describe,
  agent: options.agent,
  owned: false,
  target: { host: options.host ?? "localhost" },
  connect: options.connect,
  local: false,
  retiring: options.retiring
})

/** Why each connection made by `refusedConnection` was refused. */
const refusals = new WeakMap<Duplex, string>()

/**
 * A connection an upstream refused before anything was sent on it (a tunnel whose backend sent GoAway,
 * or whose session ended): it drops what is written, never reads, and fails with `reason` on the next
 * turn. `connectionRefusal` tells it apart at once, so a request given it can go to another backend.
 */
export const refusedConnection = (reason: string): Duplex => {
  const socket = new Duplex({
    read() {},
    write(_chunk, _encoding, callback) {
      callback()
    },
    final(callback) {
      callback()
    }
  })
  refusals.set(socket, reason)
  queueMicrotask(() => socket.destroy(new Error(reason)))
  return socket
}

/** Why `socket` was refused, when it came from `refusedConnection`: nothing reached the upstream. */
export const connectionRefusal = (socket: Duplex): string | undefined => refusals.get(socket)
