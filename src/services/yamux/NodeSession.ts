/**
 * A yamux session for plain Node code: promises and socket-like Duplex streams, with the Effect runtime
 * kept inside. The `net.Server`-style `listen()` API and `http.Agent` integrations sit on this; the
 * protocol itself is Session.ts.
 */
import { Duration, Effect, Exit, Scope } from "effect"
import type { GoAwayCode } from "../../domain/Frame.ts"
import type { Connection } from "../Transport.ts"
import * as Session from "./Session.ts"
import { type StreamSocket, makeStreamDuplex } from "./StreamDuplex.ts"
import { YamuxError } from "./YamuxError.ts"

export interface NodeYamuxSession {
  /** The Effect-side session, for code that mixes both. */
  readonly session: Session.YamuxSession
  /** Opens a stream and returns it as a socket at once (SYN is sent now). Throws a YamuxError when it cannot. */
  readonly openSocket: () => StreamSocket
  /** The next inbound stream as a socket. */
  readonly acceptSocket: () => Promise<StreamSocket>
  /** Calls `handler` with every inbound stream until the session ends (replaces `acceptSocket` use). */
  readonly onSocket: (handler: (socket: StreamSocket) => void) => void
  /** Round-trip time in milliseconds. */
  readonly ping: () => Promise<number>
  readonly goAway: (code?: GoAwayCode) => void
  /** Resolves when the session ends: `undefined` when clean, the YamuxError otherwise. Never rejects. */
  readonly closed: Promise<YamuxError | undefined>
  /** Live streams. */
  readonly streamCount: () => number
  /** Closes the session (GoAway, streams fail with SessionClosed, connection closed). */
  readonly close: () => Promise<void>
}

/** Starts a session on `conn` with its own scope; `close()` ends it. */
export const startSession = async (conn: Connection, options: Session.SessionOptions): Promise<NodeYamuxSession> => {
  const scope = Scope.makeUnsafe()
  const session = await Effect.runPromise(Session.make(conn, options).pipe(Scope.provide(scope)))
  const core = session.core
  const closed = new Promise<YamuxError | undefined>((resolve) => core.onClosed((o) => resolve(o.error)))
  let closing: Promise<void> | undefined
  const close = () => (closing ??= Effect.runPromise(Scope.close(scope, Exit.void)))
  // A session that ends by itself (peer gone, protocol error) releases its fibers and connection too.
  void closed.then(() => close())
  return {
    session,
    openSocket: () => {
      const s = core.openStream()
      if (s instanceof YamuxError) throw s
      return makeStreamDuplex(s)
    },
    acceptSocket: () =>
      new Promise((resolve, reject) => {
        core.acceptStream((s) => (s instanceof YamuxError ? reject(s) : resolve(makeStreamDuplex(s))))
      }),
    onSocket: (handler) => {
      const next = (): void => {
        core.acceptStream((s) => {
          if (s instanceof YamuxError) return
          const socket = makeStreamDuplex(s)
          try {
            handler(socket)
          } catch (error) {
            // A throwing handler loses its stream (reset), not the session or the process.
            socket.destroy()
            process.emitWarning(`yamux onSocket handler threw: ${String(error)}`)
          }
          next()
        })
      }
      next()
    },
    ping: () => Effect.runPromise(Effect.map(session.ping(), Duration.toMillis)),
    goAway: (code) => core.goAway(code ?? 0),
    closed,
    streamCount: () => core.streamCount,
    close
  }
}
