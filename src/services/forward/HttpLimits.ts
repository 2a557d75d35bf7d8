/**
 * The limits every HTTP/1.1 front door's connections are held to (head size, count and time, a whole
 * request's time, keep-alive, connections), as the raw engine applies them, and the write mark of client
 * sockets. Values only.
 */
export interface HttpLimits {
  /** Largest request head (bytes). */
  readonly maxHeaderSize: number
  /** Most request headers kept. More is a 431. */
  readonly maxHeadersCount: number
  /** Time to receive a request head (ms). */
  readonly headersTimeoutMs: number
  /** Time to receive a whole request (ms); 0 = none. */
  readonly requestTimeoutMs: number
  /** Idle time of a keep-alive client connection between requests (ms). */
  readonly keepAliveTimeoutMs: number
  /**
   * Most client connections open at once; more are closed on arrival. With one request in flight per
   * connection, this also bounds the requests waiting for a pooled upstream connection.
   */
  readonly maxConnections: number
}

/**
 * Buffer size at which a client socket reports backpressure (bytes). Larger than Node's 16 KiB default so
 * a 64 KiB upstream read is written without pausing the upstream on every chunk; one per connection.
 */
export const STREAM_HIGH_WATER_MARK = 256 * 1024
