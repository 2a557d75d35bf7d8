/**
 * Masking for WebSocket frames switchyard writes or reads itself (RFC 6455 §5.3): fresh random keys
 * drawn from a pooled random source, XOR masking into any output at any key phase, and unmasking in
 * place, natively with `bufferutil` (as `ws` does) or in JavaScript where it is not installed. It builds
 * and parses no frames.
 */
import { Buffer } from "node:buffer"
import { randomFillSync } from "node:crypto"
import { createRequire } from "node:module"

/** Random bytes drawn at once for masking keys (four per frame). */
export const MASK_KEY_POOL_BYTES = 4096

type NativeMask = (source: Uint8Array, key: Uint8Array, output: Uint8Array, offset: number, length: number) => void
type NativeUnmask = (data: Uint8Array, key: Uint8Array) => void

const loadNative = (): { readonly mask?: unknown; readonly unmask?: unknown } => {
  try {
    return createRequire(import.meta.url)("bufferutil") as { readonly mask?: unknown; readonly unmask?: unknown }
  } catch {
    return {}
  }
}

const bufferutil = loadNative()
const native = typeof bufferutil.mask === "function" ? bufferutil.mask as NativeMask : undefined
const nativeUnmask = typeof bufferutil.unmask === "function" ? bufferutil.unmask as NativeUnmask : undefined

/** Unmasks `data` in place with `key` (4 bytes), as payload starting at position 0 of its frame. */
export const unmaskInPlace: (data: Buffer, key: Buffer) => void = nativeUnmask ?? ((data, key) => {
  for (let i = 0; i < data.length; i++) data[i] = data[i]! ^ key[i & 3]!
})

const maskJs: NativeMask = (source, key, output, offset, length) => {
  for (let i = 0; i < length; i++) output[offset + i] = source[i]! ^ key[i & 3]!
}

const maskAt: NativeMask = native ?? maskJs

const keyPool = new Uint8Array(MASK_KEY_POOL_BYTES)
let keyAt = MASK_KEY_POOL_BYTES

/** Fills `key` (4 bytes) with the next random masking key, never all zero (that would mask nothing). */
export const nextMaskKey = (key: Uint8Array): void => {
  do {
    if (keyAt === MASK_KEY_POOL_BYTES) {
      randomFillSync(keyPool)
      keyAt = 0
    }
    key[0] = keyPool[keyAt]!
    key[1] = keyPool[keyAt + 1]!
    key[2] = keyPool[keyAt + 2]!
    key[3] = keyPool[keyAt + 3]!
    keyAt += 4
  } while ((key[0]! | key[1]! | key[2]! | key[3]!) === 0)
}

const rotated = new Uint8Array(4)

/**
 * Writes `source` masked with `key` into `output` at `offset`, as payload bytes starting at position
 * `phase` of their frame (so a frame's payload may be masked piece by piece). `output` may be `source`.
 */
export const maskInto = (source: Uint8Array, key: Uint8Array, phase: number, output: Uint8Array, offset: number): void => {
  if (source.length === 0) return
  const p = phase & 3
  if (p === 0) return maskAt(source, key, output, offset, source.length)
  rotated[0] = key[p]!
  rotated[1] = key[(p + 1) & 3]!
  rotated[2] = key[(p + 2) & 3]!
  rotated[3] = key[(p + 3) & 3]!
  maskAt(source, rotated, output, offset, source.length)
}
