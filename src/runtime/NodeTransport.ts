/**
 * Node binding of Transport: any `net.Socket`, `tls.TLSSocket` or `stream.Duplex` as a Connection
 * with pausable reads and drain-aware batched writes, plus scoped TCP/Unix dial and listen.
 * It does not speak any protocol; yamux and HTTP sit on top of the Connection it returns.
 */
import { Buffer } from "node:buffer"
import { Effect, Layer } from "effect"
import type { Scope } from "effect"
import * as fs from "node:fs"
import * as net from "node:net"
import type * as stream from "node:stream"
import * as tls from "node:tls"
import { ReadLease } from "../services/ReadLease.ts"
import {
  type Address,
  type Connection,
  type ConnectionHandlers,
  type ListenOptions,
  Transport,
  TransportError
} from "../services/Transport.ts"

const socketAddress = (host: string | undefined, port: number | undefined): Address | undefined =>
  host === undefined && port === undefined ? undefined : { host, port }

const ioError = (error: unknown): TransportError =>
  new TransportError({ reason: "Io", message: error instanceof Error ? error.message : String(error) })

/**
 * Wraps a Node duplex (socket, TLS socket, any Duplex) as a Connection. Half-close (`end` while the
 * peer keeps writing) needs a socket made with `allowHalfOpen: true`, as `dial` and `listen` do; with
 * Node's default the socket ends itself when the peer's end arrives.
 */
export const fromSocket = (
  socket: net.Socket | stream.Duplex,
  options?: {
    /** Bytes already read from the socket (e.g. after a handshake) to deliver before anything else. */
    readonly head?: Uint8Array | undefined
  }
): Connection => {
  const head = options?.head
  const s = socket as net.Socket
  const isNet = typeof s.setNoDelay === "function"
  if (isNet) s.setNoDelay(true)
  let isClosed = socket.destroyed
  let failure: TransportError | undefined
  let handlers: ConnectionHandlers | undefined
  const drainWaiters: Array<(error?: TransportError) => void> = []

  const flushWaiters = (error?: TransportError) => {
    const ws = drainWaiters.splice(0)
    for (const w of ws) w(error)
  }
  socket.on("drain", () => flushWaiters())
  socket.on("error", (e) => {
    failure ??= ioError(e)
  })
  socket.once("close", () => {
    isClosed = true
    flushWaiters(failure ?? new TransportError({ reason: "Closed", message: "connection closed" }))
    handlers?.onClose(failure)
  })
  socket.pause()

  const local = isNet ? socketAddress(s.localAddress, s.localPort) : undefined
  const remote = isNet ? socketAddress(s.remoteAddress, s.remotePort) : undefined
  const unixPath = (): Address | undefined => {
    // Unix sockets have no IP address; report the path the server was bound to, when known.
    const addr = isNet && s.address ? (s.address() as unknown) : undefined
    return typeof addr === "string" ? { path: addr } : undefined
  }

  return {
    localAddress: local ?? unixPath(),
    remoteAddress: remote,
    start: (h) => {
      handlers = h
      if (head !== undefined && head.length > 0) h.onData(head)
      // each read is leased: its memory goes back once the handler (and whoever it handed views to)
      // is done with it, rather than when V8 next collects
      if (h.retainsReads === true) {
        socket.on("data", (chunk: Buffer) => {
          const lease = new ReadLease(chunk)
          h.onData(chunk, lease)
          lease.release()
        })
      } else socket.on("data", (chunk: Buffer) => h.onData(chunk))
      socket.on("end", () => h.onEnd())
      if (isClosed) queueMicrotask(() => h.onClose(failure))
      else socket.resume()
    },
    pause: () => {
      socket.pause()
    },
    resume: () => {
      if (!isClosed) socket.resume()
    },
    write: (chunks, done) => {
      if (isClosed || socket.writableEnded) {
        queueMicrotask(() => done(new TransportError({ reason: "Closed", message: "connection closed" })))
        return
      }
      if (chunks.length === 0) {
        queueMicrotask(() => done())
        return
      }
      if (isNet) {
        // a socket's write callback runs once its bytes went to the kernel (a TLS socket's, once they
        // were encrypted): `done` then, so the writer may reuse the chunks' memory
        const last = chunks.length - 1
        if (last > 0) s.cork()
        for (let i = 0; i < last; i++) s.write(chunks[i]!)
        s.write(chunks[last]!, (error) => done(error ? failure ?? ioError(error) : undefined))
        if (last > 0) s.uncork()
        return
      }
      let ok = true
      for (const c of chunks) ok = socket.write(c)
      if (ok && !socket.writableNeedDrain) queueMicrotask(() => done())
      else drainWaiters.push(done)
    },
    releasesOnDone: isNet,
    end: () => {
      if (!isClosed && !socket.writableEnded) socket.end()
    },
    destroy: () => {
      if (!socket.destroyed) socket.destroy()
    },
    closed: () => isClosed
  }
}

/**
 * Time a TLS client has to complete its handshake on a listener (ms); then its socket is closed. The
 * protocol's own handshake timeout starts once TLS is up.
 */
export const TLS_HANDSHAKE_TIMEOUT_MS = 10_000

/** The CAs a TLS dial trusts: the system's, plus the address's own when it names some. */
const trustedCas = (ca: string | ReadonlyArray<string> | undefined): Array<string> | undefined =>
  ca === undefined ? undefined : [...tls.rootCertificates, ...(typeof ca === "string" ? [ca] : ca)]

/**
 * Dials a TCP address (`{ host, port }`) or a Unix socket (`{ path }`), over TLS when the address has
 * `tls` (connected once the handshake verified the server's certificate); destroyed when the scope
 * closes.
 */
export const dial = (address: Address): Effect.Effect<Connection, TransportError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.callback<net.Socket, TransportError>((resume) => {
      const where = address.path !== undefined
        ? { path: address.path }
        : { host: address.host ?? "127.0.0.1", port: address.port ?? 0 }
      const secure = address.tls
      const host = address.host ?? "127.0.0.1"
      const socket = secure === undefined
        ? net.connect({ ...where, allowHalfOpen: true })
        : tls.connect({
          ...where,
          // read by tls.connect for the TLSSocket it makes, though not in its option type
          ...({ allowHalfOpen: true } as tls.ConnectionOptions),
          ca: trustedCas(secure.ca),
          servername: secure.servername ?? (net.isIP(host) === 0 && address.path === undefined ? host : undefined)
        })
      const onError = (e: Error) => {
        socket.destroy()
        resume(Effect.fail(new TransportError({ reason: "Dial", message: `dial failed: ${e.message}` })))
      }
      socket.once("error", onError)
      socket.once(secure === undefined ? "connect" : "secureConnect", () => {
        socket.off("error", onError)
        resume(Effect.succeed(socket))
      })
      return Effect.sync(() => socket.destroy())
    }),
    (socket) => Effect.sync(() => socket.destroy())
  ).pipe(Effect.map(fromSocket))

/**
 * Listens on TCP (`{ host, port }`, port 0 picks one) or a Unix socket (`{ path }`, a stale file is
 * replaced), over TLS when the address has `tls` with a certificate and key. Each accepted connection
 * goes to `onConnection` (a TLS one once its handshake is done; a client that does not finish it within
 * `TLS_HANDSHAKE_TIMEOUT_MS`, or fails it, is closed without reaching it); when the scope closes the
 * listener stops and every connection it accepted is destroyed. Returns the bound address.
 */
export const listen = (
  address: Address,
  onConnection: (conn: Connection) => void,
  options?: ListenOptions
): Effect.Effect<Address, TransportError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.callback<{ server: net.Server; sockets: Set<net.Socket>; bound: Address }, TransportError>((resume) => {
      const sockets = new Set<net.Socket>()
      const secure = address.tls
      if (secure !== undefined && (secure.cert === undefined || secure.key === undefined)) {
        resume(Effect.fail(new TransportError({ reason: "Listen", message: "listen failed: TLS needs a certificate and a key" })))
        return
      }
      const track = (socket: net.Socket) => {
        sockets.add(socket)
        socket.once("close", () => sockets.delete(socket))
      }
      // TLS handshakes in progress hold a place (see `ListenOptions.admitTlsHandshake`) until they end
      const handshaking = new Map<string, { readonly release: () => void }>()
      const peerKey = (s: net.Socket) => `${s.remoteAddress}|${s.remotePort}`
      const handshakeEnded = (s: net.Socket) => {
        const key = peerKey(s)
        handshaking.get(key)?.release()
        handshaking.delete(key)
      }
      let server: net.Server
      try {
        server = secure === undefined
          ? net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (accepted) => {
            track(accepted)
            onConnection(fromSocket(accepted))
          })
          : tls.createServer({ cert: secure.cert, key: secure.key, allowHalfOpen: true, handshakeTimeout: TLS_HANDSHAKE_TIMEOUT_MS }, (accepted) => {
            handshakeEnded(accepted)
            accepted.pause()
            onConnection(fromSocket(accepted))
          })
      } catch (error) {
        resume(Effect.fail(new TransportError({ reason: "Listen", message: `listen failed: ${error instanceof Error ? error.message : String(error)}` })))
        return
      }
      // a TLS server's raw sockets, so that one still in its handshake is closed with the scope too
      if (secure !== undefined) {
        server.on("connection", (raw: net.Socket) => {
          track(raw)
          const admit = options?.admitTlsHandshake
          if (admit === undefined) return
          const ticket = admit({ host: raw.remoteAddress, port: raw.remotePort })
          if (ticket === undefined) return void raw.destroy()
          const key = peerKey(raw)
          handshaking.set(key, ticket)
          raw.once("close", () => {
            if (handshaking.get(key) !== ticket) return
            ticket.release()
            handshaking.delete(key)
          })
        })
        server.on("tlsClientError", (_error, socket) => {
          handshakeEnded(socket)
          socket.destroy()
        })
      }
      let listening = false
      // Before listening, an error fails the bind; after, it concerns one accept and must not crash.
      server.on("error", (e) => {
        if (!listening) resume(Effect.fail(new TransportError({ reason: "Listen", message: `listen failed: ${e.message}` })))
      })
      const ready = () => {
        listening = true
        const a = server.address()
        const bound: Address = typeof a === "string" || a === null
          ? { path: address.path }
          : { host: a.address, port: a.port }
        resume(Effect.succeed({ server, sockets, bound }))
      }
      if (address.path !== undefined) {
        try {
          if (fs.existsSync(address.path) && fs.statSync(address.path).isSocket()) fs.unlinkSync(address.path)
        } catch {
          // listen reports the real problem
        }
        server.listen(address.path, ready)
      } else {
        server.listen(address.port ?? 0, address.host ?? "127.0.0.1", ready)
      }
    }),
    ({ server, sockets }) =>
      Effect.callback<void>((resume) => {
        for (const s of sockets) s.destroy()
        server.close(() => resume(Effect.void))
      })
  ).pipe(Effect.map((r) => r.bound))

/** The Transport service over Node's TCP and Unix sockets. */
/** Node's TCP/TLS/Unix transport, as the service value. */
export const layerService = Transport.of({ dial, listen })
export const layer: Layer.Layer<Transport> = Layer.succeed(Transport, layerService)
