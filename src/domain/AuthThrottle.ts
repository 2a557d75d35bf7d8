/**
 * Failed authentications per peer address, so that guessing tokens gets slow and then stops: the first
 * few failures cost nothing, each further one makes the answer wait twice as long (up to a cap), and
 * after too many the address is refused outright for a while. Failures are forgotten after a quiet
 * window; a success forgets them at once. Pure bookkeeping with a bounded number of addresses: the caller
 * passes the time, waits and refuses.
 */

export interface AuthThrottleLimits {
  /** Failures from one address answered without delay. */
  readonly freeFailures: number
  /** Delay after the first failure beyond the free ones (ms); doubles with each further failure. */
  readonly baseDelayMs: number
  /** Longest delay (ms). */
  readonly maxDelayMs: number
  /** Failures after which the address is refused before it may try again. */
  readonly refuseAfter: number
  /** How long a refused address stays refused, and how long failures are remembered (ms). */
  readonly windowMs: number
  /** Most addresses remembered (the longest quiet are forgotten first). */
  readonly maxAddresses: number
}

export const DefaultAuthThrottleLimits: AuthThrottleLimits = {
  freeFailures: 3,
  baseDelayMs: 250,
  maxDelayMs: 8_000,
  refuseAfter: 20,
  windowMs: 10 * 60_000,
  maxAddresses: 65_536
}

/** Whether an address may try to authenticate now. */
export type AuthGate =
  | { readonly _tag: "Allow" }
  | { readonly _tag: "Refuse"; readonly retryAfterMs: number }

interface Failures {
  count: number
  lastAt: number
}

export class AuthThrottle {
  readonly limits: AuthThrottleLimits
  private readonly failures = new Map<string, Failures>()

  constructor(limits: AuthThrottleLimits = DefaultAuthThrottleLimits) {
    this.limits = limits
  }

  /** Addresses remembered. */
  get size(): number {
    return this.failures.size
  }

  /** Whether `address` may try at `now` (checked when it connects, before anything is read). */
  gate(address: string, now: number): AuthGate {
    const f = this.current(address, now)
    if (f === undefined || f.count < this.limits.refuseAfter) return { _tag: "Allow" }
    return { _tag: "Refuse", retryAfterMs: f.lastAt + this.limits.windowMs - now }
  }

  /** Records a failure; returns how long to wait before answering it (ms). */
  failed(address: string, now: number): number {
    const f = this.current(address, now) ?? { count: 0, lastAt: now }
    f.count++
    f.lastAt = now
    // Re-inserted so that the map stays ordered by last failure (oldest first).
    this.failures.delete(address)
    this.failures.set(address, f)
    while (this.failures.size > this.limits.maxAddresses) this.failures.delete(this.failures.keys().next().value!)
    const over = f.count - this.limits.freeFailures
    if (over <= 0) return 0
    return Math.min(this.limits.maxDelayMs, this.limits.baseDelayMs * 2 ** Math.min(over - 1, 30))
  }

  /** A success: the address's failures are forgotten. */
  succeeded(address: string): void {
    this.failures.delete(address)
  }

  private current(address: string, now: number): Failures | undefined {
    const f = this.failures.get(address)
    if (f !== undefined && now - f.lastAt >= this.limits.windowMs) {
      this.failures.delete(address)
      return undefined
    }
    return f
  }
}
