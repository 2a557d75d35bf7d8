/**
 * Where the forwarding core sends requests: raw half-close capable connections, pooled by the core
 * (`UpstreamPool`) within the upstream's limits, and opened alone for upgrades. Unix-socket and TCP
 * upstreams are built here; tunnels bring their own streams through `streamUpstream`.
 */
import * as net from "node:net"
import { Duplex } from "node:stream"
import * as tls from "node:tls"

export interface Upstream {
  /** For errors and logs: `unix:/var/run/docker.sock`, `127.0.0.1:8080`, `tunnel web-1`. */
  readonly describe: string
  /** Most connections in use at once; further exchanges wait for one (bounded). */
  readonly maxSockets: number
  /** Most idle connections kept for reuse. */
  readonly maxFreeSockets: number
  /** A new connection (a pooled one, or one of its own for an upgrade); must allow half-close. */
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
  /** Most connections in use at once. */
  readonly maxSockets: number
  /** Most idle connections kept for reuse. */
  readonly maxFreeSockets: number
}

/** A Unix-socket HTTP API such as `/var/run/docker.sock`. */
export const unixUpstream = (socketPath: string, limits: PoolLimits): Upstream => ({
  describe: `unix:${socketPath}`,
  maxSockets: limits.maxSockets,
  maxFreeSockets: limits.maxFreeSockets,
  connect: () => net.createConnection({ path: socketPath, allowHalfOpen: true }),
  connectReading: (onread) => net.createConnection({ path: socketPath, allowHalfOpen: true, onread }),
  local: true
})

/** A plain-TCP HTTP upstream. */
export const tcpUpstream = (host: string, port: number, limits: PoolLimits): Upstream => ({
  describe: host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`,
  maxSockets: limits.maxSockets,
  maxFreeSockets: limits.maxFreeSockets,
  connect: () => net.createConnection({ host, port, allowHalfOpen: true, noDelay: true }),
  connectReading: (onread) => net.createConnection({ host, port, allowHalfOpen: true, noDelay: true, onread }),
  local: false
})

/**
 * An HTTPS upstream: HTTP/1.1 over TLS to `host:port`, the certificate verified against the process's
 * trusted CAs for `host` (sent as SNI unless it is an address). A TLS connection ends both ways at once
 * (no half-close), which an HTTP/1.1 exchange never needs.
 */
export const tlsUpstream = (host: string, port: number, limits: PoolLimits): Upstream => ({
  describe: host.includes(":") ? `https://[${host}]:${port}` : `https://${host}:${port}`,
  maxSockets: limits.maxSockets,
  maxFreeSockets: limits.maxFreeSockets,
  connect: () => {
    const socket = tls.connect({ host, port, servername: net.isIP(host) === 0 ? host : undefined, ALPNProtocols: ["http/1.1"] })
    socket.setNoDelay(true)
    return socket
  },
  local: false
})

/**
 * An upstream whose connections the caller opens (a tunnel: each connection is a new stream of a
 * session, preamble first). The caller keeps what the streams ride on.
 */
export const streamUpstream = (options: {
  readonly describe: string
  readonly connect: () => Duplex
  readonly limits: PoolLimits
  readonly retiring?: () => boolean
}): Upstream => ({
  describe: options.describe,
  maxSockets: options.limits.maxSockets,
  maxFreeSockets: options.limits.maxFreeSockets,
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
