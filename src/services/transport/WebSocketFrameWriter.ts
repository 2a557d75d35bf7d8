/**
 * Puts a tunnel's bytes on a WebSocket's socket as binary messages written by switchyard itself, one
 * frame each: a client masks them (a random key per frame, or the all-zero key when the operator turned
 * masking off) into pooled output buffers that are reused once written, and a server sends the caller's
 * buffers unmasked, without copying. Each frame is written whole and at once, so frames never
 * interleave with the control frames `WebSocketEndpoint` writes. It does not fragment messages or
 * speak any other opcode.
 */
import { Buffer } from "node:buffer"
import type * as net from "node:net"
import { encodeFrameHeader } from "../../domain/WebSocketFrameHeader.ts"
import { maskInto, nextMaskKey } from "./WebSocketMasking.ts"

/** How frames leave: masked with random keys (clients), with the zero key, or unmasked (servers). */
export type FrameMasking = "random" | "zero" | "none"

/** Size of one pooled output buffer for masked frames. */
export const MASKED_OUTPUT_BUFFER_BYTES = 256 * 1024
/** Output buffers kept for reuse per connection (more in flight are left to the garbage collector). */
export const MASKED_OUTPUT_BUFFERS_KEPT = 8
/** Longest frame header: 2 bytes, a 64-bit length, a masking key. */
const MAX_HEADER_BYTES = 14
const OPCODE_BINARY = 0x2
const ZERO_KEY = new Uint8Array(4)

export class WebSocketFrameWriter {
  private readonly socket: net.Socket
  private readonly masking: FrameMasking
  private readonly maxMessage: number
  private readonly key = new Uint8Array(4)
  private readonly free: Array<Buffer> = []

  constructor(socket: net.Socket, masking: FrameMasking, maxMessage: number) {
    this.socket = socket
    this.masking = masking
    this.maxMessage = maxMessage
  }

  /**
   * Writes `chunks` as messages of at most `maxMessage` payload bytes each; `done` runs once the last
   * one was written (with the socket's error, if any). Chunks are not modified; unmasked frames keep
   * referring to them until written.
   */
  write(chunks: ReadonlyArray<Uint8Array>, done: (error?: Error | null) => void): void {
    let total = 0
    for (let i = 0; i < chunks.length; i++) total += chunks[i]!.length
    if (total === 0) return queueMicrotask(() => done())
    const socket = this.socket
    socket.cork()
    try {
      if (this.masking === "none") this.writePlain(chunks, total, undefined, done)
      else if (this.masking === "zero") this.writePlain(chunks, total, ZERO_KEY, done)
      else this.writeMasked(chunks, total, done)
    } finally {
      socket.uncork()
    }
  }

  /** Headers written beside the caller's own buffers (no mask, or the zero key: nothing to change). */
  private writePlain(chunks: ReadonlyArray<Uint8Array>, total: number, key: Uint8Array | undefined, done: (error?: Error | null) => void): void {
    const socket = this.socket
    let chunk = 0
    let at = 0
    for (let sent = 0; sent < total;) {
      const size = Math.min(this.maxMessage, total - sent)
      socket.write(encodeFrameHeader(true, OPCODE_BINARY, size, key))
      let left = size
      while (left > 0) {
        const c = chunks[chunk]!
        const take = Math.min(c.length - at, left)
        const part = take === c.length ? c : c.subarray(at, at + take)
        left -= take
        sent += take
        at += take
        if (at === c.length) {
          chunk++
          at = 0
        }
        if (sent === total) socket.write(part, done)
        else if (part.length > 0) socket.write(part)
      }
    }
  }

  /** Each frame's header and masked payload laid out in pooled buffers, each buffer one write. */
  private writeMasked(chunks: ReadonlyArray<Uint8Array>, total: number, done: (error?: Error | null) => void): void {
    const socket = this.socket
    const key = this.key
    let out: Buffer | undefined
    let used = 0
    const flush = (last: boolean) => {
      const buffer = out!
      const release = (error?: Error | null) => {
        if (buffer.length === MASKED_OUTPUT_BUFFER_BYTES && this.free.length < MASKED_OUTPUT_BUFFERS_KEPT) this.free.push(buffer)
        if (last) done(error)
      }
      socket.write(buffer.subarray(0, used), release)
      out = undefined
      used = 0
    }
    let chunk = 0
    let at = 0
    for (let sent = 0; sent < total;) {
      const size = Math.min(this.maxMessage, total - sent)
      if (out !== undefined && used + MAX_HEADER_BYTES + size > out.length) flush(false)
      if (out === undefined) {
        out = MAX_HEADER_BYTES + size > MASKED_OUTPUT_BUFFER_BYTES
          ? Buffer.allocUnsafe(MAX_HEADER_BYTES + size)
          : this.free.pop() ?? Buffer.allocUnsafe(MASKED_OUTPUT_BUFFER_BYTES)
      }
      nextMaskKey(key)
      const header = encodeFrameHeader(true, OPCODE_BINARY, size, key)
      out.set(header, used)
      used += header.length
      let phase = 0
      while (phase < size) {
        const c = chunks[chunk]!
        const take = Math.min(c.length - at, size - phase)
        maskInto(take === c.length ? c : c.subarray(at, at + take), key, phase, out, used)
        used += take
        phase += take
        at += take
        if (at === c.length) {
          chunk++
          at = 0
        }
      }
      sent += size
    }
    flush(true)
  }
}
