/**
 * The parts of `ws` 8.x that switchyard reads or resets to take a WebSocket's data frames over from it
 * (its receiver's fields, its socket and its `data` listener), each checked at run time: a caller that
 * gets `undefined` leaves `ws` to do everything, as it would with any other version.
 */
import type * as net from "node:net"
import type { WebSocket } from "ws"

/** `ws` 8.x receiver states (`lib/receiver.js`): between frames, and waiting for a frame's payload. */
export const RECEIVER_GET_INFO = 0
export const RECEIVER_GET_DATA = 4

/** The fields of `ws`'s receiver (ws 8.x) that a frame reader standing in for it reads and resets. */
export interface ReceiverFields {
  _state: number
  _bufferedBytes: number
  readonly _buffers: Array<Buffer>
  readonly _payloadLength: number
  readonly _masked: boolean
  readonly _mask: Buffer | undefined
  readonly _fin: boolean
  readonly _opcode: number
  readonly _compressed: boolean
  _fragmented: number
  _fragments: unknown
  _totalPayloadLength: number
  _messageLength: number
}

/** `ws`'s receiver, when it has every field of `ReceiverFields`. */
export const receiverFieldsOf = (ws: WebSocket): ReceiverFields | undefined => {
  const r = (ws as unknown as { readonly _receiver?: Partial<ReceiverFields> | null })._receiver
  return r != null && typeof r._state === "number" && typeof r._bufferedBytes === "number" && Array.isArray(r._buffers) &&
      typeof r._payloadLength === "number" && typeof r._masked === "boolean" && typeof r._fin === "boolean" &&
      typeof r._opcode === "number" && typeof r._compressed === "boolean" && typeof r._fragmented === "number" &&
      Array.isArray(r._fragments) && typeof r._totalPayloadLength === "number" && typeof r._messageLength === "number"
    ? (r as ReceiverFields)
    : undefined
}

/** The socket under `ws` (ws 8.x keeps it as `_socket`). */
export const socketOf = (ws: WebSocket): net.Socket | undefined => {
  const socket = (ws as unknown as { readonly _socket?: net.Socket | null })._socket
  return socket != null && typeof socket.write === "function" ? socket : undefined
}

/** `ws`'s own `data` listener on its socket, when it is the only one (ws 8.x). */
export const socketListenerOf = (ws: WebSocket): { readonly socket: net.Socket; readonly onData: (chunk: Buffer) => void } | undefined => {
  const socket = socketOf(ws)
  if (socket === undefined) return undefined
  const listeners = socket.listeners("data")
  const onData = listeners[0]
  return listeners.length === 1 && typeof onData === "function" && onData.name === "socketOnData"
    ? { socket, onData: onData as (chunk: Buffer) => void }
    : undefined
}
