/**
 * A token bucket as plain numbers and pure functions: `perSecond` tokens flow in each second, up to
 * `burst`; a take that finds too few tokens is refused and takes nothing. No clock and no I/O: callers
 * pass the time they read (ms) and keep the two numbers of state (tokens, and when they were counted).
 */

export interface RateLimit {
  /** Tokens added per second (the sustained rate allowed). */
  readonly perSecond: number
  /** Most tokens the bucket holds (what may be taken at once after a quiet spell). */
  readonly burst: number
}

/** A limit of `perSecond` whose burst is one second's worth. */
export const perSecond = (n: number): RateLimit => ({ perSecond: n, burst: n })

/** Whether `limit` can be used: a positive finite rate and a burst of at least one token. */
export const isValidRateLimit = (limit: RateLimit): boolean =>
  Number.isFinite(limit.perSecond) && limit.perSecond > 0 && Number.isFinite(limit.burst) && limit.burst >= 1

/**
 * The tokens in a bucket at `now` that held `tokens` at `at`: refilled for the time in between (none
 * when the clock went back), never above the burst.
 */
export const tokensAt = (limit: RateLimit, tokens: number, at: number, now: number): number => {
  const elapsed = now > at ? now - at : 0
  const refilled = tokens + (elapsed * limit.perSecond) / 1000
  return refilled < limit.burst ? refilled : limit.burst
}

/**
 * Takes `n` tokens at `now` from a bucket that held `tokens` at `at`: the tokens left (counted at
 * `now`), or `-1` when fewer than `n` are there (the caller's state is then unchanged by the refusal
 * except for the refill, which it may keep or drop).
 */
export const takeTokens = (limit: RateLimit, tokens: number, at: number, now: number, n: number): number => {
  const available = tokensAt(limit, tokens, at, now)
  return available >= n ? available - n : -1
}

/**
 * A bucket's state for callers on a hot path: two numbers, mutated in place by `take`. Starts full.
 */
export class TokenBucket {
  readonly limit: RateLimit
  private tokens: number
  private at: number

  constructor(limit: RateLimit, now: number) {
    this.limit = limit
    this.tokens = limit.burst
    this.at = now
  }

  /** Takes `n` tokens at `now`; false (nothing taken) when there are fewer. */
  take(now: number, n: number): boolean {
    const left = takeTokens(this.limit, this.tokens, this.at, now, n)
    if (left < 0) return false
    this.tokens = left
    if (now > this.at) this.at = now
    return true
  }

  /** Tokens available at `now`. */
  available(now: number): number {
    return tokensAt(this.limit, this.tokens, this.at, now)
  }
}
