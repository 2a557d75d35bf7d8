/**
 * Which TCP clients may use a listener: IPv4/IPv6 addresses and CIDR blocks, parsed once and matched
 * per connection. Pure. It knows nothing about Unix-socket peers (Node does not expose their uid).
 */
import { isIP } from "node:net"

/** One parsed block: address bytes and prefix length. */
interface Block {
  readonly bytes: Uint8Array
  readonly prefix: number
  readonly source: string
}

export interface ClientAllowlist {
  readonly blocks: ReadonlyArray<Block>
}

const parseV4 = (text: string): Uint8Array | undefined => {
  const parts = text.split(".")
  if (parts.length !== 4) return undefined
  const out = new Uint8Array(4)
  for (let i = 0; i < 4; i++) {
    if (!/^\d{1,3}$/.test(parts[i]!)) return undefined
    const n = Number(parts[i])
    if (n > 255) return undefined
    out[i] = n
  }
  return out
}

const parseV6 = (text: string): Uint8Array | undefined => {
  if (isIP(text) !== 6) return undefined
  let head = text
  let v4Tail: Uint8Array | undefined
  const lastColon = text.lastIndexOf(":")
  if (text.slice(lastColon + 1).includes(".")) {
    v4Tail = parseV4(text.slice(lastColon + 1))
    if (!v4Tail) return undefined
    head = text.slice(0, lastColon + 1) + "0:0"
  }
  const [left, right] = head.includes("::") ? head.split("::") as [string, string] : [head, undefined]
  const l = left.length > 0 ? left.split(":") : []
  const r = right !== undefined && right.length > 0 ? right.split(":") : []
  const groups = right === undefined ? l : [...l, ...Array(8 - l.length - r.length).fill("0"), ...r]
  if (groups.length !== 8) return undefined
  const out = new Uint8Array(16)
  groups.forEach((g, i) => {
    const n = parseInt(g, 16)
    out[i * 2] = n >> 8
    out[i * 2 + 1] = n & 0xff
  })
  if (v4Tail) out.set(v4Tail, 12)
  return out
}

/** Address bytes of an IPv4 or IPv6 literal; IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes IPv4. */
export const addressBytes = (text: string): Uint8Array | undefined => {
  const v4 = parseV4(text)
  if (v4) return v4
  const v6 = parseV6(text)
  if (v6 && v6.slice(0, 10).every((b) => b === 0) && v6[10] === 0xff && v6[11] === 0xff) return v6.slice(12)
  return v6
}

/** Parses `10.0.0.0/8`, `::1`, `fd00::/8`...; a bare address is a full-length block. */
export const parseBlock = (text: string): Block | string => {
  const slash = text.indexOf("/")
  const addr = slash === -1 ? text : text.slice(0, slash)
  const bytes = addressBytes(addr)
  if (!bytes) return `"${text}" is not an IP address or CIDR block`
  const max = bytes.length * 8
  const prefix = slash === -1 ? max : Number(text.slice(slash + 1))
  if (!/^\d+$/.test(slash === -1 ? String(max) : text.slice(slash + 1)) || prefix > max) {
    return `"${text}" has a bad prefix length (0..${max})`
  }
  return { bytes, prefix, source: text }
}

/** Parses a list of blocks; the first bad entry is reported with its index. */
export const parseAllowlist = (entries: ReadonlyArray<string>): ClientAllowlist | { readonly index: number; readonly message: string } => {
  const blocks: Array<Block> = []
  for (let i = 0; i < entries.length; i++) {
    const b = parseBlock(entries[i]!)
    if (typeof b === "string") return { index: i, message: b }
    blocks.push(b)
  }
  return { blocks }
}

const inBlock = (block: Block, addr: Uint8Array): boolean => {
  if (block.bytes.length !== addr.length) return false
  let bits = block.prefix
  for (let i = 0; bits > 0; i++, bits -= 8) {
    const mask = bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff
    if ((block.bytes[i]! & mask) !== (addr[i]! & mask)) return false
  }
  return true
}

/** Whether a client address is allowed. An unparseable address is never allowed. */
export const clientAllowed = (list: ClientAllowlist, address: string | undefined): boolean => {
  if (address === undefined) return false
  const bytes = addressBytes(address)
  if (!bytes) return false
  return list.blocks.some((b) => inBlock(b, bytes))
}
