/**
 * Writes one binary message (a response body) as frames straight onto a WebSocket's socket, each
 * payload masked in place in the buffer it arrived in (a random key per frame, or the all-zero key with
 * `maskframes: false`) and sent with its header in one write: no copy, no allocation per frame. It
 * relies on `ws` 8.x keeping its socket as `_socket` (checked at run time; without it, bodies go
 * through `ws.send`), and never writes while `ws` could be mid-frame: `ws` writes whole frames, and so
 * does this.
 */
import type * as net from "node:net"
import { WebSocket } from "ws"
import { encodeFrameHeader } from "../../domain/WebSocketFrameHeader.ts"
import { maskInto, nextMaskKey } from "../transport/WebSocketMasking.ts"
import { socketOf } from "../transport/WsInternals.ts"

const OPCODE_CONTINUATION = 0x0
const OPCODE_BINARY = 0x2

const ZERO_KEY = Buffer.alloc(4)

export class BodyFrameWriter {
  private readonly ws: WebSocket
  private readonly socket: net.Socket
  private readonly masked: boolean
  private readonly key = Buffer.alloc(4)
  private first = true

  /** A writer for the next message on `ws`, or undefined when its socket is not reachable. */
  static for(ws: WebSocket, masked: boolean): BodyFrameWriter | undefined {
    const socket = socketOf(ws)
    return socket === undefined ? undefined : new BodyFrameWriter(ws, socket, masked)
  }

  private constructor(ws: WebSocket, socket: net.Socket, masked: boolean) {
    this.ws = ws
    this.socket = socket
    this.masked = masked
  }

  /**
   * Sends `payload` as the message's next frame (the last when `fin`), masking it in place: the caller
   * gives up its contents. Returns whether the socket still holds the payload (queued, not yet written),
   * so its buffer must not be reused. `done` runs once the frame is written.
   */
  frame(payload: Buffer, fin: boolean, done: (err?: Error | null) => void): boolean {
    if (this.ws.readyState !== WebSocket.OPEN) {
      done(new Error("WebSocket is not open"))
      return false
    }
    const opcode = this.first ? OPCODE_BINARY : OPCODE_CONTINUATION
    this.first = fin
    let key = ZERO_KEY
    if (this.masked) {
      nextMaskKey(this.key)
      key = this.key
      maskInto(payload, key, 0, payload, 0)
    }
    const header = encodeFrameHeader(fin, opcode, payload.length, key)
    const socket = this.socket
    if (payload.length === 0) {
      socket.write(header, done)
      return false
    }
    socket.cork()
    socket.write(header)
    socket.write(payload, done)
    socket.uncork()
    return socket.writableLength > 0
  }
}
