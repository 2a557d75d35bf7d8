/**
 * The raw HTTP/1.1 engine's numbers: limits on what one client may make it hold, and the thresholds of
 * its backpressure and write coalescing. Values only; the engine's files read them from here.
 */

/** Largest body an upgrade request may carry (exec start sends a small JSON object). */
export const ENGINE_MAX_UPGRADE_BODY = 64 * 1024
/** Time allowed for an upgrade request's body to arrive (ms). */
export const ENGINE_UPGRADE_BODY_TIMEOUT_MS = 30_000
/** Most bytes of pipelined requests held while a response is in flight (the client is paused beyond). */
export const MAX_PIPELINED_BYTES = 256 * 1024

/**
 * Bytes queued on the receiving socket (client or upstream) above which the sending side stops being
 * read; it is read again once the queue is written out. Higher than a socket's own high-water mark so a
 * large read is not paused for every partially written chunk; with one read in flight it bounds what a
 * slow reader holds per connection.
 */
export const WRITE_QUEUE_PAUSE_BYTES = 512 * 1024

/** Most interim (1xx) responses relayed for one request; an upstream sending more is answered 502. */
export const MAX_INTERIM_RESPONSES = 16
/** Response bodies up to this size that arrive with their head are copied into one write with it. */
export const COALESCE_BYTES = 16 * 1024
/** Methods a request may be repeated with when its pooled connection failed before any answer. */
export const IDEMPOTENT: ReadonlySet<string> = new Set(["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
