/**
 * Admission of client connections to one listener: a cap in total and per peer address, where a full
 * listener makes room by closing its oldest idle connection (one that has sent nothing, or one between
 * requests) instead of turning newcomers away, and a deadline for connections that stay silent. Pure
 * bookkeeping: the caller says what is idle or silent and closes what it is told to; no sockets, no timers.
 */

/** The limits of one listener. */
export interface ConnectionLimits {
  /** Most connections open at once. */
  readonly maxConnections: number
  /** Most connections open at once from one peer address (unaddressed peers, e.g. Unix sockets, are not counted). */
  readonly maxPerAddress: number
  /** Time a connection may stay without sending a byte (ms; 0 = no limit). */
  readonly silentTimeoutMs: number
}

/** What to do with a new connection. */
export type Admission<K> =
  | { readonly _tag: "Admit"; readonly evict: K | undefined }
  | { readonly _tag: "Refuse"; readonly reason: "ListenerFull" | "AddressFull" }

interface Entry {
  readonly address: string | undefined
  readonly openedAt: number
}

/** The connections of one listener, oldest first. */
export class ConnectionTable<K> {
  readonly limits: ConnectionLimits
  private readonly entries = new Map<K, Entry>()
  private readonly perAddress = new Map<string, number>()

  constructor(limits: ConnectionLimits) {
    this.limits = limits
  }

  get size(): number {
    return this.entries.size
  }

  /** Connections open from `address`. */
  countOf(address: string): number {
    return this.perAddress.get(address) ?? 0
  }

  /**
   * Decides on a new connection from `address` (the caller records it with `add` when admitted, after
   * closing `evict`, which it must also `remove`). A full address or listener makes room by evicting its
   * oldest connection that `isIdle` says carries nothing (sent nothing yet, or waits between requests);
   * with none, the newcomer is refused.
   */
  admit(address: string | undefined, isIdle: (key: K) => boolean): Admission<K> {
    if (address !== undefined && this.countOf(address) >= this.limits.maxPerAddress) {
      const evict = this.oldestIdle(isIdle, address)
      return evict === undefined ? { _tag: "Refuse", reason: "AddressFull" } : { _tag: "Admit", evict }
    }
    if (this.entries.size >= this.limits.maxConnections) {
      const evict = this.oldestIdle(isIdle, undefined)
      return evict === undefined ? { _tag: "Refuse", reason: "ListenerFull" } : { _tag: "Admit", evict }
    }
    return { _tag: "Admit", evict: undefined }
  }

  add(key: K, address: string | undefined, now: number): void {
    if (this.entries.has(key)) return
    this.entries.set(key, { address, openedAt: now })
    if (address !== undefined) this.perAddress.set(address, this.countOf(address) + 1)
  }

  remove(key: K): void {
    const entry = this.entries.get(key)
    if (entry === undefined) return
    this.entries.delete(key)
    if (entry.address !== undefined) {
      const n = this.countOf(entry.address) - 1
      if (n <= 0) this.perAddress.delete(entry.address)
      else this.perAddress.set(entry.address, n)
    }
  }

  /** Connections silent for longer than the limit at `now`, oldest first (the caller closes and removes them). */
  expired(now: number, isSilent: (key: K) => boolean): Array<K> {
    const out: Array<K> = []
    const limit = this.limits.silentTimeoutMs
    if (limit <= 0) return out
    for (const [key, entry] of this.entries) {
      // Entries are in opening order: the rest are younger.
      if (now - entry.openedAt < limit) break
      if (isSilent(key)) out.push(key)
    }
    return out
  }

  private oldestIdle(isIdle: (key: K) => boolean, address: string | undefined): K | undefined {
    for (const [key, entry] of this.entries) {
      if (address !== undefined && entry.address !== address) continue
      if (isIdle(key)) return key
    }
    return undefined
  }
}
