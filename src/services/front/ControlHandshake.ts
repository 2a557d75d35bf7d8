/**
 * The handshake step of a control connection, shared by the gateway and the client: read exactly one
 * length-prefixed frame from a Transport connection, then hand the connection on (with any bytes that
 * followed the frame) to the yamux session. It does not decode messages; ControlMessage does.
 */
import { Buffer } from "node:buffer"
import { Effect } from "effect"
import type * as net from "node:net"
import { ControlProtocolError, FrameReader } from "../../domain/ControlMessage.ts"
import { type Connection, type ConnectionHandlers, TransportError, writeEffect } from "../Transport.ts"

/** One frame read, and the connection to keep using: it replays the bytes that arrived after it. */
export interface FrameAndRest {
  readonly body: Uint8Array
  readonly rest: Connection
}

/**
 * Reads one frame of at most `maxBytes`: a larger one fails as soon as its length prefix is in,
 * before its body is read. Fails with `ControlProtocolError` (`TooLarge`, `Truncated`) when the peer
 * sends too much or closes first. `onFirstBytes` is called when the first bytes arrive (a timeout for
 * a silent peer). Interrupting it leaves the connection paused.
 */
export const readFrame = (conn: Connection, maxBytes: number, onFirstBytes?: () => void): Effect.Effect<FrameAndRest, ControlProtocolError> =>
  Effect.callback<FrameAndRest, ControlProtocolError>((resume) => {
    const reader = new FrameReader(maxBytes)
    let done = false
    // events that arrive after the frame, before the next owner starts, are replayed to it
    let ended = false
    let closed: { error: TransportError | undefined } | undefined
    let next: ConnectionHandlers | undefined
    const rest: Connection = {
      localAddress: conn.localAddress,
      remoteAddress: conn.remoteAddress,
      start: (handlers) => {
        next = handlers
        const leftover = reader.remainder()
        if (leftover.length > 0) handlers.onData(leftover)
        if (ended) handlers.onEnd()
        if (closed !== undefined) handlers.onClose(closed.error)
        else conn.resume()
      },
      pause: conn.pause,
      resume: conn.resume,
      write: conn.write,
      releasesOnDone: conn.releasesOnDone,
      end: conn.end,
      destroy: conn.destroy,
      closed: conn.closed
    }
    const fail = (error: ControlProtocolError) => {
      if (done) return
      done = true
      conn.pause()
      resume(Effect.fail(error))
    }
    conn.start({
      onData: (chunk, holds) => {
        if (next !== undefined) {
          if (next.retainsReads === true) return next.onData(chunk, holds)
          // a next owner that does not retain what it keeps: the read stays held (left to the collector)
          holds?.retain()
          return next.onData(chunk)
        }
        // the handshake's reader keeps what it is given (the frame, then what follows it for the next
        // owner): a leased read stays held, left to the collector
        holds?.retain()
        if (onFirstBytes !== undefined && chunk.length > 0) {
          onFirstBytes()
          onFirstBytes = undefined
        }
        if (done) {
          reader.push(chunk)
          return
        }
        const failed = reader.push(chunk)
        if (failed !== undefined) return fail(failed)
        const body = reader.next()
        if (body === undefined) return
        if (body instanceof ControlProtocolError) return fail(body)
        done = true
        conn.pause()
        resume(Effect.succeed({ body, rest }))
      },
      onEnd: () => {
        if (next !== undefined) return next.onEnd()
        ended = true
        fail(new ControlProtocolError({ reason: "Truncated", message: "the peer ended the connection during the handshake" }))
      },
      onClose: (error) => {
        if (next !== undefined) return next.onClose(error)
        closed = { error }
        fail(new ControlProtocolError({ reason: "Truncated", message: "the connection closed during the handshake" }))
      },
      retainsReads: true
    })
    return Effect.sync(() => conn.pause())
  })

/** Writes one encoded frame. */
export const writeFrame = (conn: Connection, frame: Uint8Array): Effect.Effect<void, TransportError> =>
  writeEffect(conn, [frame])

/**
 * Reads one frame of at most `maxBytes` straight from a Node socket (the reverse-HTTP/2 preamble and its
 * answer), then pauses the socket and puts back the bytes that followed, for the protocol that comes next.
 * Fails with `ControlProtocolError` (`TooLarge`, `Truncated` when the socket closes first).
 */
export const readSocketFrame = (socket: net.Socket, maxBytes: number): Effect.Effect<Uint8Array, ControlProtocolError> =>
  Effect.callback<Uint8Array, ControlProtocolError>((resume) => {
    const reader = new FrameReader(maxBytes)
    const cleanup = () => {
      socket.off("data", onData)
      socket.off("close", onClose)
    }
    const onClose = () => {
      cleanup()
      resume(Effect.fail(new ControlProtocolError({ reason: "Truncated", message: "the connection closed before its frame" })))
    }
    const onData = (chunk: Buffer) => {
      const body = reader.push(chunk) ?? reader.next()
      if (body === undefined) return
      cleanup()
      socket.pause()
      if (body instanceof ControlProtocolError) return resume(Effect.fail(body))
      const rest = reader.remainder()
      if (rest.length > 0) socket.unshift(Buffer.from(rest.buffer, rest.byteOffset, rest.length))
      resume(Effect.succeed(body))
    }
    socket.on("data", onData)
    socket.on("close", onClose)
    return Effect.sync(cleanup)
  })
