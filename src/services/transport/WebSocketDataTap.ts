/**
 * Reads a tunnel WebSocket's binary data frames off its socket in place of `ws`'s receiver whenever
 * that receiver stands between messages (or inside an unfragmented binary frame): each payload run
 * goes to the connection as a view of the socket read, unmasked in place, so a frame that spans reads
 * is neither waited for nor copied. Anything else (control frames, text, a violation, fragmented
 * messages begun by `ws`) is handed back to `ws` at the frame's first byte, and `ws` answers it (pings,
 * close, protocol errors); the tap takes over again once `ws` is back between messages. It relies on
 * `ws` 8.x's receiver fields and socket listener, checked at run time: without them `ws` reads
 * everything, as before.
 */
import type * as net from "node:net"
import type { WebSocket } from "ws"
import { DataFrameReader, OPCODE_BINARY } from "../../domain/WebSocketDataReader.ts"
import { unmaskInPlace as unmask } from "./WebSocketMasking.ts"
import { RECEIVER_GET_DATA, RECEIVER_GET_INFO, type ReceiverFields, receiverFieldsOf, socketListenerOf } from "./WsInternals.ts"

export class WebSocketDataTap {
  private readonly toWs: (chunk: Buffer) => void
  private readonly receiver: ReceiverFields
  private readonly maxMessageBytes: number
  private readonly expectMasked: boolean
  private readonly onPayload: (payload: Buffer) => boolean
  private reader: DataFrameReader | undefined = undefined

  /**
   * Installs a tap on `ws` delivering binary payload to `onPayload`; `undefined` when `ws` does not
   * have the expected shape (then nothing changes). `expectMasked`: the peer is a client.
   */
  static install(ws: WebSocket, maxMessageBytes: number, expectMasked: boolean, onPayload: (payload: Buffer) => boolean): WebSocketDataTap | undefined {
    const receiver = receiverFieldsOf(ws)
    const listener = socketListenerOf(ws)
    if (receiver === undefined || listener === undefined) return undefined
    return new WebSocketDataTap(ws, listener.socket, listener.onData, receiver, maxMessageBytes, expectMasked, onPayload)
  }

  private constructor(
    ws: WebSocket,
    socket: net.Socket,
    onData: (chunk: Buffer) => void,
    receiver: ReceiverFields,
    maxMessageBytes: number,
    expectMasked: boolean,
    onPayload: (payload: Buffer) => boolean
  ) {
    this.toWs = (chunk) => onData.call(socket, chunk)
    this.receiver = receiver
    this.maxMessageBytes = maxMessageBytes
    this.expectMasked = expectMasked
    this.onPayload = onPayload
    socket.removeListener("data", onData)
    socket.on("data", this.onSocketData)
    ws.once("close", () => socket.removeListener("data", this.onSocketData))
  }

  private readonly onSocketData = (chunk: Buffer): void => {
    this.read(chunk)
  }

  /** Payload handed on in the read in progress was kept by the connection (or held while paused). */
  private keptPayload = false
  private readonly payload = (p: Buffer): void => {
    if (this.onPayload(p)) this.keptPayload = true
  }

  /**
   * One read of the socket (from its `data` events, or from reused memory); returns whether any of
   * `chunk` is still referenced afterwards (handed to `ws`, or kept by the connection).
   */
  readonly read = (chunk: Uint8Array): boolean => {
    const bytes = chunk as Buffer
    this.keptPayload = false
    const handedToWs = this.readChunk(bytes)
    return handedToWs || this.keptPayload
  }

  /** Returns whether `ws` was given part of `chunk`. */
  private readChunk(chunk: Buffer): boolean {
    const reader = this.reader ?? this.takeOver()
    if (reader === undefined) {
      this.throughWs(chunk)
      return true
    }
    let at = 0
    for (;;) {
      const step = reader.read(at === 0 ? chunk : chunk.subarray(at), this.payload)
      if (this.reader !== reader) return false
      switch (step._tag) {
        case "Continue":
          return false
        case "End":
          // between messages: the next one is read the same way
          at += step.at
          if (at >= chunk.length) return false
          continue
        case "Handover": {
          this.reader = undefined
          // a message the tap began and `ws` goes on with (a control frame between its fragments)
          const r = this.receiver
          r._fragmented = reader.inMessage ? OPCODE_BINARY : 0
          r._totalPayloadLength = reader.inMessage ? reader.total : 0
          r._messageLength = r._totalPayloadLength
          const rest = at + step.at === 0 ? chunk : chunk.subarray(at + step.at)
          this.throughWs(step.prefix === undefined ? rest : Buffer.concat([step.prefix, rest]))
          return true
        }
      }
    }
  }

  /** Hands a read to `ws`, and takes over at once if that left `ws` where the tap can start. */
  private throughWs(chunk: Buffer): void {
    this.toWs(chunk)
    if (this.reader === undefined) this.takeOver()
  }

  /** A reader, when `ws`'s receiver is between messages or inside an unfragmented binary frame. */
  private takeOver(): DataFrameReader | undefined {
    const r = this.receiver
    if (r._fragmented !== 0 || (r._fragments as Array<unknown>).length > 0) return undefined
    if (r._state === RECEIVER_GET_INFO && r._bufferedBytes === 0) {
      this.reader = new DataFrameReader(
        { total: 0, inMessage: false, frameRemaining: 0, fin: false, mask: undefined, maskOffset: 0 },
        this.maxMessageBytes,
        this.expectMasked,
        unmask
      )
      return this.reader
    }
    if (r._state !== RECEIVER_GET_DATA || r._opcode !== OPCODE_BINARY || r._compressed || !r._fin || r._bufferedBytes >= r._payloadLength) {
      return undefined
    }
    // inside a frame's payload: the bytes `ws` holds go first, then the reader goes on with the frame
    const reader = new DataFrameReader(
      { total: r._payloadLength, inMessage: true, frameRemaining: r._payloadLength, fin: true, mask: r._masked ? r._mask : undefined, maskOffset: 0 },
      this.maxMessageBytes,
      this.expectMasked,
      unmask
    )
    const held = r._buffers.splice(0)
    r._bufferedBytes = 0
    r._state = RECEIVER_GET_INFO
    r._totalPayloadLength = 0
    r._messageLength = 0
    this.reader = reader
    for (const b of held) {
      reader.read(b, this.payload)
      if (this.reader !== reader) return undefined
    }
    return reader
  }
}
