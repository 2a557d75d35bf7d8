/**
 * The pure parts of the gateway's ACME certificates: when a certificate is due for renewal, how long to
 * wait after a failed order (bounded exponential backoff with jitter, at least the CA's `Retry-After`),
 * when a name no route wants any more stops being ordered, where a name's files live in the store, and
 * the challenge paths. No I/O and no clock: times are passed in as epoch milliseconds.
 */

/** Renew a certificate this long before it expires, by default (30 days). */
export const DefaultRenewBeforeMs = 30 * 24 * 60 * 60 * 1000
/** First wait after a failed order. */
export const AcmeBackoffInitialMs = 60 * 1000
/** Longest wait between two orders for a name that keeps failing (6 hours). */
export const AcmeBackoffMaxMs = 6 * 60 * 60 * 1000
/** Shortest wait after the CA said it is rate limiting without a `Retry-After` (1 hour). */
export const AcmeRateLimitBackoffMs = 60 * 60 * 1000
/** Longest `Retry-After` of the CA that is honoured (24 hours): a longer one is waited this long, then asked again. */
export const AcmeRetryAfterMaxMs = 24 * 60 * 60 * 1000
/** How long a name no route wants any more is still ordered (a backend reconnecting or restarting gets it back without a new order); after it, none is. */
export const AcmeUnusedGraceMs = 10 * 60 * 1000
/** Largest share of a backoff added at random, so that gateways restarted together do not order together. */
export const AcmeBackoffJitter = 0.2
/** Most names one gateway obtains certificates for; a route for one more is refused. */
export const MaxAcmeNames = 1_000
/** Most orders in progress at once. */
export const MaxConcurrentAcmeOrders = 4
/** Longest one order may take (account, challenges, finalization, download) before it counts as failed. */
export const AcmeOrderTimeoutMs = 5 * 60 * 1000
/** The path prefix of HTTP-01 challenges (RFC 8555 §8.3). */
export const HttpChallengePrefix = "/.well-known/acme-challenge/"
/** The ALPN protocol of TLS-ALPN-01 validation connections (RFC 8737). */
export const AcmeTlsAlpnProtocol = "acme-tls/1"
/** Largest HTTP-01 token accepted in a challenge path (base64url; CAs use 43 characters). */
export const MaxChallengeTokenLength = 256

/** The challenge types the gateway can answer itself. */
export type AcmeChallengeType = "http-01" | "tls-alpn-01"

/** Shortest time between an issued certificate and the order that renews it (a CA issuing short-lived certificates, or a clock ahead of the CA's, cannot make the gateway order in a loop). */
export const MinRenewalIntervalMs = 60 * 60 * 1000

/**
 * When a certificate valid from `notBeforeMs` to `notAfterMs` should be renewed: `renewBeforeMs` ahead
 * of its expiry, or once two thirds of its lifetime have passed when that is later (a certificate whose
 * whole lifetime is shorter than `renewBeforeMs`); never within `MinRenewalIntervalMs` of `issuedAtMs`,
 * when the gateway has just obtained it.
 */
export const renewAt = (
  validity: { readonly notBeforeMs: number; readonly notAfterMs: number },
  renewBeforeMs: number,
  issuedAtMs?: number | undefined
): number => {
  const lifetime = Math.max(0, validity.notAfterMs - validity.notBeforeMs)
  const due = validity.notAfterMs - Math.min(renewBeforeMs, lifetime / 3)
  return issuedAtMs === undefined ? due : Math.max(due, issuedAtMs + MinRenewalIntervalMs)
}

/** Whole days from `nowMs` until `notAfterMs` (negative once expired). */
export const daysUntil = (notAfterMs: number, nowMs: number): number => (notAfterMs - nowMs) / (24 * 60 * 60 * 1000)

/** What the CA said about a failed order beyond its message. */
export interface CaAnswer {
  /** The CA is rate limiting (`urn:ietf:params:acme:error:rateLimited`, HTTP 429, or its message says so). */
  readonly rateLimited?: boolean | undefined
  /** The CA's `Retry-After`, in milliseconds from the failure (`parseRetryAfter`). */
  readonly retryAfterMs?: number | undefined
}

/**
 * How long to wait before the next order for a name after `failures` consecutive failures (1 for the
 * first): doubling from `AcmeBackoffInitialMs` up to `AcmeBackoffMaxMs`; at least the CA's `Retry-After`
 * (up to `AcmeRetryAfterMaxMs`), or `AcmeRateLimitBackoffMs` after a rate-limit answer without one.
 * `random` is in [0, 1) and adds up to `AcmeBackoffJitter` of the wait.
 */
export const backoffMs = (failures: number, random: number, ca: CaAnswer = {}): number => {
  const exponent = Math.max(0, Math.min(failures - 1, 30))
  let base = Math.min(AcmeBackoffMaxMs, AcmeBackoffInitialMs * 2 ** exponent)
  if (ca.retryAfterMs !== undefined) base = Math.max(base, Math.min(Math.max(ca.retryAfterMs, 0), AcmeRetryAfterMaxMs))
  else if (ca.rateLimited === true) base = Math.max(base, AcmeRateLimitBackoffMs)
  return Math.round(base * (1 + AcmeBackoffJitter * Math.min(Math.max(random, 0), 1)))
}

/** Longest `Retry-After` header value read (a date or a number of seconds is far shorter). */
export const MaxRetryAfterLength = 64

/**
 * A `Retry-After` header value (RFC 9110 §10.2.3: delay-seconds or an HTTP-date) as milliseconds from
 * `nowMs` (0 for a date already past); undefined when it is neither.
 */
export const parseRetryAfter = (value: string, nowMs: number): number | undefined => {
  const text = value.trim()
  if (text.length === 0 || text.length > MaxRetryAfterLength) return undefined
  if (/^\d+$/.test(text)) return Number(text) * 1000
  if (!/^[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT$/.test(text)) return undefined
  const at = Date.parse(text)
  return Number.isNaN(at) ? undefined : Math.max(0, at - nowMs)
}

/**
 * Whether an ACME error says the CA is rate limiting (`urn:ietf:params:acme:error:rateLimited`, RFC 8555
 * §6.7), as the client library reports it in its message.
 */
export const isRateLimited = (message: string): boolean => /rateLimited|rate limit|too many/i.test(message)

/**
 * Whether a name is still ordered: while a route wants it, and for `AcmeUnusedGraceMs` after the last
 * route that wanted it went away at `unusedSinceMs`.
 */
export const stillOrdered = (unusedSinceMs: number | undefined, nowMs: number): boolean =>
  unusedSinceMs === undefined || nowMs - unusedSinceMs < AcmeUnusedGraceMs

/** The HTTP-01 token a request path asks for, or undefined when it is not a challenge path. */
export const httpChallengeToken = (path: string): string | undefined => {
  if (!path.startsWith(HttpChallengePrefix)) return undefined
  const token = path.slice(HttpChallengePrefix.length)
  return token.length > 0 && token.length <= MaxChallengeTokenLength && /^[A-Za-z0-9_-]+$/.test(token) ? token : undefined
}

/**
 * The store's file names for a name's certificate (chain) and key. The name is a checked lowercase DNS
 * name (route domain), so it is safe as a directory name.
 */
export const storedFiles = (name: string): { readonly dir: string; readonly cert: string; readonly key: string } => ({
  dir: name,
  cert: `${name}/fullchain.pem`,
  key: `${name}/key.pem`
})

/** The store's file for the ACME account key. */
export const AccountKeyFile = "account.key.pem"
