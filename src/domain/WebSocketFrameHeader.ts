/**
 * The header of one WebSocket data frame (RFC 6455 §5.2), written by hand for a sender that puts a
 * message's frames on the socket itself: FIN, opcode, the payload length in its shortest form, and the
 * masking key of a client frame. Pure; it neither masks payloads nor chooses keys.
 */
import { Buffer } from "node:buffer"

/** Longest payload length of the 7-bit form, and of the 16-bit form. */
const MAX_7BIT_LENGTH = 125
const MAX_16BIT_LENGTH = 0xffff

/** The header for a frame of `length` payload bytes; `mask` (4 bytes) makes it a masked client frame. */
export const encodeFrameHeader = (fin: boolean, opcode: number, length: number, mask: Uint8Array | undefined): Buffer => {
  const ext = length <= MAX_7BIT_LENGTH ? 0 : length <= MAX_16BIT_LENGTH ? 2 : 8
  const head = Buffer.allocUnsafe(2 + ext + (mask === undefined ? 0 : 4))
  head[0] = (fin ? 0x80 : 0) | (opcode & 0x0f)
  head[1] = (mask === undefined ? 0 : 0x80) | (ext === 0 ? length : ext === 2 ? 126 : 127)
  if (ext === 2) head.writeUInt16BE(length, 2)
  else if (ext === 8) {
    head.writeUInt32BE(Math.floor(length / 0x100000000), 2)
    head.writeUInt32BE(length >>> 0, 6)
  }
  if (mask !== undefined) {
    const at = 2 + ext
    head[at] = mask[0]!
    head[at + 1] = mask[1]!
    head[at + 2] = mask[2]!
    head[at + 3] = mask[3]!
  }
  return head
}
