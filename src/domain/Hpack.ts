/**
 * HPACK (RFC 7541) for switchyard's HTTP/2 client: a decoder with the static table, a bounded dynamic
 * table (size updates included) and Huffman decoding, and an encoder that writes every field as a literal
 * without indexing (static-table names and exact matches excepted) and never uses Huffman. Pure: bytes in,
 * header lists out; no I/O. It does not validate HTTP semantics (pseudo-headers, forbidden fields).
 */
import { Buffer } from "node:buffer"
import { Schema } from "effect"

/** The dynamic table size both ends start with (SETTINGS_HEADER_TABLE_SIZE default). */
export const DefaultHeaderTableBytes = 4096
/** Per-entry overhead counted in table and header-list sizes (RFC 7541 §4.1). */
export const EntryOverheadBytes = 32
/** Largest integer accepted in a header block: beyond this a field or index cannot be legitimate. */
export const MaxHpackInteger = 0x3fff_ffff

/** A header block that cannot be decoded (COMPRESSION_ERROR), or a decoded list over the limit. */
export class HpackError extends Schema.TaggedError<HpackError>()("HpackError", {
  reason: Schema.Literals(["Compression", "HeaderListTooLarge"]),
  message: Schema.String
}) {}

/** RFC 7541 Appendix A, index 1 first. */
export const StaticTable: ReadonlyArray<readonly [string, string]> = [
  [":authority", ""], [":method", "GET"], [":method", "POST"], [":path", "/"], [":path", "/index.html"],
  [":scheme", "http"], [":scheme", "https"], [":status", "200"], [":status", "204"], [":status", "206"],
  [":status", "304"], [":status", "400"], [":status", "404"], [":status", "500"], ["accept-charset", ""],
  ["accept-encoding", "gzip, deflate"], ["accept-language", ""], ["accept-ranges", ""], ["accept", ""],
  ["access-control-allow-origin", ""], ["age", ""], ["allow", ""], ["authorization", ""], ["cache-control", ""],
  ["content-disposition", ""], ["content-encoding", ""], ["content-language", ""], ["content-length", ""],
  ["content-location", ""], ["content-range", ""], ["content-type", ""], ["cookie", ""], ["date", ""],
  ["etag", ""], ["expect", ""], ["expires", ""], ["from", ""], ["host", ""], ["if-match", ""],
  ["if-modified-since", ""], ["if-none-match", ""], ["if-range", ""], ["if-unmodified-since", ""],
  ["last-modified", ""], ["link", ""], ["location", ""], ["max-forwards", ""], ["proxy-authenticate", ""],
  ["proxy-authorization", ""], ["range", ""], ["referer", ""], ["refresh", ""], ["retry-after", ""],
  ["server", ""], ["set-cookie", ""], ["strict-transport-security", ""], ["transfer-encoding", ""],
  ["user-agent", ""], ["vary", ""], ["via", ""], ["www-authenticate", ""]
]

/** Huffman code and bit length of each symbol 0..255 (RFC 7541 Appendix B), flat `[code, bits, ...]`. */
const HuffmanCodes: ReadonlyArray<number> = [
  0x1ff8, 13, 0x7fffd8, 23, 0xfffffe2, 28, 0xfffffe3, 28, 0xfffffe4, 28, 0xfffffe5, 28, 0xfffffe6, 28, 0xfffffe7, 28,
  0xfffffe8, 28, 0xffffea, 24, 0x3ffffffc, 30, 0xfffffe9, 28, 0xfffffea, 28, 0x3ffffffd, 30, 0xfffffeb, 28,
  0xfffffec, 28, 0xfffffed, 28, 0xfffffee, 28, 0xfffffef, 28, 0xffffff0, 28, 0xffffff1, 28, 0xffffff2, 28,
  0x3ffffffe, 30, 0xffffff3, 28, 0xffffff4, 28, 0xffffff5, 28, 0xffffff6, 28, 0xffffff7, 28, 0xffffff8, 28,
  0xffffff9, 28, 0xffffffa, 28, 0xffffffb, 28, 0x14, 6, 0x3f8, 10, 0x3f9, 10, 0xffa, 12, 0x1ff9, 13, 0x15, 6,
  0xf8, 8, 0x7fa, 11, 0x3fa, 10, 0x3fb, 10, 0xf9, 8, 0x7fb, 11, 0xfa, 8, 0x16, 6, 0x17, 6, 0x18, 6, 0x0, 5, 0x1, 5,
  0x2, 5, 0x19, 6, 0x1a, 6, 0x1b, 6, 0x1c, 6, 0x1d, 6, 0x1e, 6, 0x1f, 6, 0x5c, 7, 0xfb, 8, 0x7ffc, 15, 0x20, 6,
  0xffb, 12, 0x3fc, 10, 0x1ffa, 13, 0x21, 6, 0x5d, 7, 0x5e, 7, 0x5f, 7, 0x60, 7, 0x61, 7, 0x62, 7, 0x63, 7, 0x64, 7,
  0x65, 7, 0x66, 7, 0x67, 7, 0x68, 7, 0x69, 7, 0x6a, 7, 0x6b, 7, 0x6c, 7, 0x6d, 7, 0x6e, 7, 0x6f, 7, 0x70, 7,
  0x71, 7, 0x72, 7, 0xfc, 8, 0x73, 7, 0xfd, 8, 0x1ffb, 13, 0x7fff0, 19, 0x1ffc, 13, 0x3ffc, 14, 0x22, 6, 0x7ffd, 15,
  0x3, 5, 0x23, 6, 0x4, 5, 0x24, 6, 0x5, 5, 0x25, 6, 0x26, 6, 0x27, 6, 0x6, 5, 0x74, 7, 0x75, 7, 0x28, 6, 0x29, 6,
  0x2a, 6, 0x7, 5, 0x2b, 6, 0x76, 7, 0x2c, 6, 0x8, 5, 0x9, 5, 0x2d, 6, 0x77, 7, 0x78, 7, 0x79, 7, 0x7a, 7, 0x7b, 7,
  0x7ffe, 15, 0x7fc, 11, 0x3ffd, 14, 0x1ffd, 13, 0xffffffc, 28, 0xfffe6, 20, 0x3fffd2, 22, 0xfffe7, 20, 0xfffe8, 20,
  0x3fffd3, 22, 0x3fffd4, 22, 0x3fffd5, 22, 0x7fffd9, 23, 0x3fffd6, 22, 0x7fffda, 23, 0x7fffdb, 23, 0x7fffdc, 23,
  0x7fffdd, 23, 0x7fffde, 23, 0xffffeb, 24, 0x7fffdf, 23, 0xffffec, 24, 0xffffed, 24, 0x3fffd7, 22, 0x7fffe0, 23,
  0xffffee, 24, 0x7fffe1, 23, 0x7fffe2, 23, 0x7fffe3, 23, 0x7fffe4, 23, 0x1fffdc, 21, 0x3fffd8, 22, 0x7fffe5, 23,
  0x3fffd9, 22, 0x7fffe6, 23, 0x7fffe7, 23, 0xffffef, 24, 0x3fffda, 22, 0x1fffdd, 21, 0xfffe9, 20, 0x3fffdb, 22,
  0x3fffdc, 22, 0x7fffe8, 23, 0x7fffe9, 23, 0x1fffde, 21, 0x7fffea, 23, 0x3fffdd, 22, 0x3fffde, 22, 0xfffff0, 24,
  0x1fffdf, 21, 0x3fffdf, 22, 0x7fffeb, 23, 0x7fffec, 23, 0x1fffe0, 21, 0x1fffe1, 21, 0x3fffe0, 22, 0x1fffe2, 21,
  0x7fffed, 23, 0x3fffe1, 22, 0x7fffee, 23, 0x7fffef, 23, 0xfffea, 20, 0x3fffe2, 22, 0x3fffe3, 22, 0x3fffe4, 22,
  0x7ffff0, 23, 0x3fffe5, 22, 0x3fffe6, 22, 0x7ffff1, 23, 0x3ffffe0, 26, 0x3ffffe1, 26, 0xfffeb, 20, 0x7fff1, 19,
  0x3fffe7, 22, 0x7ffff2, 23, 0x3fffe8, 22, 0x1ffffec, 25, 0x3ffffe2, 26, 0x3ffffe3, 26, 0x3ffffe4, 26,
  0x7ffffde, 27, 0x7ffffdf, 27, 0x3ffffe5, 26, 0xfffff1, 24, 0x1ffffed, 25, 0x7fff2, 19, 0x1fffe3, 21, 0x3ffffe6, 26,
  0x7ffffe0, 27, 0x7ffffe1, 27, 0x3ffffe7, 26, 0x7ffffe2, 27, 0xfffff2, 24, 0x1fffe4, 21, 0x1fffe5, 21,
  0x3ffffe8, 26, 0x3ffffe9, 26, 0xffffffd, 28, 0x7ffffe3, 27, 0x7ffffe4, 27, 0x7ffffe5, 27, 0xfffec, 20,
  0xfffff3, 24, 0xfffed, 20, 0x1fffe6, 21, 0x3fffe9, 22, 0x1fffe7, 21, 0x1fffe8, 21, 0x7ffff3, 23, 0x3fffea, 22,
  0x3fffeb, 22, 0x1ffffee, 25, 0x1ffffef, 25, 0xfffff4, 24, 0xfffff5, 24, 0x3ffffea, 26, 0x7ffff4, 23, 0x3ffffeb, 26,
  0x7ffffe6, 27, 0x3ffffec, 26, 0x3ffffed, 26, 0x7ffffe7, 27, 0x7ffffe8, 27, 0x7ffffe9, 27, 0x7ffffea, 27,
  0x7ffffeb, 27, 0xffffffe, 28, 0x7ffffec, 27, 0x7ffffed, 27, 0x7ffffee, 27, 0x7ffffef, 27, 0x7fffff0, 27,
  0x3ffffee, 26
]
/** The end-of-string code: 30 one bits; a string must never contain it, padding is a prefix of it. */
const HuffmanEosBits = 30

/**
 * The Huffman code as a binary tree in two arrays: for node n, `tree[2n]` is its 0-child and `tree[2n+1]`
 * its 1-child; a child >= 0 is a node, a child < 0 is the leaf of symbol `-child - 1` (256 = EOS).
 */
const huffmanTree: Int32Array = (() => {
  const tree = new Int32Array(2 * 512).fill(0)
  let nodes = 1
  const insert = (code: number, bits: number, symbol: number) => {
    let node = 0
    for (let i = bits - 1; i >= 0; i--) {
      const slot = 2 * node + ((code >>> i) & 1)
      if (i === 0) {
        tree[slot] = -symbol - 1
        return
      }
      if (tree[slot] === 0) tree[slot] = nodes++
      node = tree[slot]!
    }
  }
  for (let s = 0; s < 256; s++) insert(HuffmanCodes[2 * s]!, HuffmanCodes[2 * s + 1]!, s)
  insert(0x3fff_ffff, HuffmanEosBits, 256)
  return tree
})()

/** Decodes a Huffman-coded string (RFC 7541 §5.2); undefined when the coding or its padding is invalid. */
export const huffmanDecode = (bytes: Uint8Array, start: number, end: number): string | undefined => {
  // each symbol takes at least 5 bits
  const out = Buffer.allocUnsafe(Math.ceil(((end - start) * 8) / 5))
  let length = 0
  let node = 0
  // bits read since the last complete symbol, and whether they were all ones (padding must be)
  let pendingBits = 0
  let allOnes = true
  for (let i = start; i < end; i++) {
    const byte = bytes[i]!
    for (let b = 7; b >= 0; b--) {
      const bit = (byte >>> b) & 1
      const next = huffmanTree[2 * node + bit]!
      pendingBits++
      if (bit === 0) allOnes = false
      if (next < 0) {
        const symbol = -next - 1
        if (symbol === 256) return undefined
        out[length++] = symbol
        node = 0
        pendingBits = 0
        allOnes = true
      } else {
        node = next
      }
    }
  }
  if (pendingBits > 7 || !allOnes) return undefined
  return out.toString("latin1", 0, length)
}

/** Huffman-codes a string (for tests and peers that want it; switchyard's encoder does not). */
export const huffmanEncode = (text: string): Buffer => {
  let bits = 0
  for (let i = 0; i < text.length; i++) bits += HuffmanCodes[2 * (text.charCodeAt(i) & 0xff) + 1]!
  const out = Buffer.alloc(Math.ceil(bits / 8), 0)
  let at = 0
  for (let i = 0; i < text.length; i++) {
    const s = text.charCodeAt(i) & 0xff
    const code = HuffmanCodes[2 * s]!
    const n = HuffmanCodes[2 * s + 1]!
    for (let b = n - 1; b >= 0; b--, at++) if ((code >>> b) & 1) out[at >>> 3]! |= 0x80 >>> (at & 7)
  }
  // padding: the most significant bits of EOS (all ones)
  for (; at % 8 !== 0; at++) out[at >>> 3]! |= 0x80 >>> (at & 7)
  return out
}

const staticByName = new Map<string, number>()
const staticByField = new Map<string, number>()
for (let i = StaticTable.length - 1; i >= 0; i--) {
  const [name, value] = StaticTable[i]!
  staticByName.set(name, i + 1)
  staticByField.set(`${name}\u0000${value}`, i + 1)
}

const compression = (message: string) => new HpackError({ reason: "Compression", message })

/**
 * Decodes the header blocks of one connection, in order (the dynamic table carries over between blocks).
 * A block that fails with `Compression` leaves the decoder unusable: the connection must end
 * (COMPRESSION_ERROR). One over `maxHeaderListBytes` is decoded to the end (the table stays in step)
 * and refused with `HeaderListTooLarge`: only its stream fails.
 */
export class HpackDecoder {
  /** The largest table size the peer may ask for (our SETTINGS_HEADER_TABLE_SIZE). */
  readonly maxTableBytes: number
  /** Most bytes of decoded fields (names, values, 32 per field) one block may carry. */
  readonly maxHeaderListBytes: number
  /** Entries, newest first. */
  private readonly entries: Array<readonly [string, string]> = []
  private tableBytes = 0
  private tableLimit: number
  // the integer read by `integer`, and where reading stopped
  private value = 0
  private at = 0

  constructor(maxHeaderListBytes: number, maxTableBytes: number = DefaultHeaderTableBytes) {
    this.maxHeaderListBytes = maxHeaderListBytes
    this.maxTableBytes = maxTableBytes
    this.tableLimit = maxTableBytes
  }

  /** Current dynamic table size in bytes (for tests). */
  get size(): number {
    return this.tableBytes
  }

  /** Dynamic table entries, newest first (for tests). */
  get table(): ReadonlyArray<readonly [string, string]> {
    return this.entries
  }

  /** Decodes one complete header block to a flat `[name, value, ...]` list. */
  decode(block: Uint8Array): Array<string> | HpackError {
    const out: Array<string> = []
    let listBytes = 0
    let tooLarge = false
    let fieldSeen = false
    this.at = 0
    const end = block.length
    while (this.at < end) {
      const first = block[this.at]!
      let name: string
      let value: string
      if (first & 0x80) {
        // indexed field (§6.1)
        if (!this.integer(block, 7)) return compression("truncated index")
        const entry = this.lookup(this.value)
        if (entry === undefined) return compression(`index ${this.value} out of range`)
        name = entry[0]
        value = entry[1]
      } else if ((first & 0xe0) === 0x20) {
        // dynamic table size update (§6.3): only before the first field of a block
        if (fieldSeen) return compression("table size update after a field")
        if (!this.integer(block, 5)) return compression("truncated table size update")
        if (this.value > this.maxTableBytes) return compression(`table size ${this.value} above the ${this.maxTableBytes} allowed`)
        this.tableLimit = this.value
        this.evict(0)
        continue
      } else {
        // literal: with incremental indexing (01), without (0000) or never indexed (0001)
        const indexing = (first & 0xc0) === 0x40
        if (!this.integer(block, indexing ? 6 : 4)) return compression("truncated name index")
        if (this.value === 0) {
          const n = this.string(block)
          if (n === undefined) return compression("invalid name literal")
          name = n
        } else {
          const entry = this.lookup(this.value)
          if (entry === undefined) return compression(`name index ${this.value} out of range`)
          name = entry[0]
        }
        const v = this.string(block)
        if (v === undefined) return compression("invalid value literal")
        value = v
        if (indexing) this.insert(name, value)
      }
      fieldSeen = true
      listBytes += name.length + value.length + EntryOverheadBytes
      if (listBytes > this.maxHeaderListBytes) tooLarge = true
      if (!tooLarge) out.push(name, value)
    }
    if (tooLarge) {
      return new HpackError({ reason: "HeaderListTooLarge", message: `header list above ${this.maxHeaderListBytes} bytes` })
    }
    return out
  }

  private lookup(index: number): readonly [string, string] | undefined {
    if (index === 0) return undefined
    if (index <= StaticTable.length) return StaticTable[index - 1]
    return this.entries[index - StaticTable.length - 1]
  }

  private insert(name: string, value: string): void {
    const size = name.length + value.length + EntryOverheadBytes
    if (size > this.tableLimit) {
      // an entry larger than the table empties it and is not added (§4.4)
      this.entries.length = 0
      this.tableBytes = 0
      return
    }
    this.evict(size)
    this.entries.unshift([name, value])
    this.tableBytes += size
  }

  /** Drops the oldest entries until `room` more bytes fit under the limit. */
  private evict(room: number): void {
    while (this.tableBytes + room > this.tableLimit && this.entries.length > 0) {
      const [n, v] = this.entries.pop()!
      this.tableBytes -= n.length + v.length + EntryOverheadBytes
    }
  }

  /** Reads an integer with an N-bit prefix (§5.1) at `this.at` into `this.value`. */
  private integer(block: Uint8Array, prefixBits: number): boolean {
    const max = (1 << prefixBits) - 1
    let value = block[this.at++]! & max
    if (value === max) {
      let shift = 0
      for (;;) {
        if (this.at >= block.length) return false
        const byte = block[this.at++]!
        value += (byte & 0x7f) * 2 ** shift
        if (value > MaxHpackInteger) return false
        if ((byte & 0x80) === 0) break
        shift += 7
      }
    }
    this.value = value
    return true
  }

  /** Reads a string literal (§5.2). */
  private string(block: Uint8Array): string | undefined {
    if (this.at >= block.length) return undefined
    const huffman = (block[this.at]! & 0x80) !== 0
    if (!this.integer(block, 7)) return undefined
    const start = this.at
    const stop = start + this.value
    if (stop > block.length) return undefined
    this.at = stop
    if (huffman) return huffmanDecode(block, start, stop)
    return Buffer.from(block.buffer, block.byteOffset, block.byteLength).toString("latin1", start, stop)
  }
}

/** Bytes an integer with an N-bit prefix takes. */
const integerLength = (value: number, prefixBits: number): number => {
  const max = (1 << prefixBits) - 1
  if (value < max) return 1
  let n = 2
  for (let rest = value - max; rest >= 128; rest = Math.floor(rest / 128)) n++
  return n
}

/** Writes an integer with an N-bit prefix; `flags` fills the bits above the prefix. Returns the end. */
const writeInteger = (out: Buffer, at: number, value: number, prefixBits: number, flags: number): number => {
  const max = (1 << prefixBits) - 1
  if (value < max) {
    out[at] = flags | value
    return at + 1
  }
  out[at++] = flags | max
  let rest = value - max
  while (rest >= 128) {
    out[at++] = (rest % 128) | 0x80
    rest = Math.floor(rest / 128)
  }
  out[at] = rest
  return at + 1
}

/**
 * Encodes a flat `[name, value, ...]` list (names already lower-case) as one header block: exact
 * static-table matches indexed, everything else a literal without indexing (so the peer's table is never
 * touched), strings raw (no Huffman). Names and values are written as latin1.
 */
export const encodeHeaderBlock = (headers: ReadonlyArray<string>): Buffer => {
  let length = 0
  const plan = new Int32Array(headers.length >>> 1)
  for (let i = 0, f = 0; i < headers.length; i += 2, f++) {
    const name = headers[i]!
    const value = headers[i + 1]!
    const exact = staticByField.get(`${name}\u0000${value}`)
    if (exact !== undefined) {
      plan[f] = -exact
      length += integerLength(exact, 7)
      continue
    }
    const named = staticByName.get(name) ?? 0
    plan[f] = named
    length += integerLength(named, 4)
    if (named === 0) length += integerLength(name.length, 7) + name.length
    length += integerLength(value.length, 7) + value.length
  }
  const out = Buffer.allocUnsafe(length)
  let at = 0
  for (let i = 0, f = 0; i < headers.length; i += 2, f++) {
    const p = plan[f]!
    if (p < 0) {
      at = writeInteger(out, at, -p, 7, 0x80)
      continue
    }
    at = writeInteger(out, at, p, 4, 0)
    if (p === 0) {
      const name = headers[i]!
      at = writeInteger(out, at, name.length, 7, 0)
      at += out.write(name, at, "latin1")
    }
    const value = headers[i + 1]!
    at = writeInteger(out, at, value.length, 7, 0)
    at += out.write(value, at, "latin1")
  }
  return out
}
