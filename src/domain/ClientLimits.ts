/**
 * Limits that keep one client from holding what all clients share (pooled upstream connections, tunnel
 * streams): a minimum request-body data rate, a minimum rate at which a client takes the response bytes
 * queued for it, a cap on the upstream slots one client address holds, and a bounded wait for a free
 * slot. Pure: names, defaults and arithmetic. The HTTP/1.1 engine measures time and bytes and enforces them.
 */

/** Least average request-body rate once the grace period is over (bytes/s); 0 = no minimum. */
export const DEFAULT_MIN_REQUEST_BODY_BYTES_PER_SECOND = 240
/** Time a request body may take to reach the minimum rate, counted while switchyard reads it (ms). */
export const DEFAULT_REQUEST_BODY_GRACE_PERIOD_MS = 5_000
/** Least rate at which a client takes response bytes switchyard has queued for it (bytes/s); 0 = no minimum. */
export const DEFAULT_MIN_RESPONSE_BYTES_PER_SECOND = 240
/** Time added to each wait for a client to take queued response bytes (ms). */
export const DEFAULT_RESPONSE_GRACE_PERIOD_MS = 5_000
/** Time a request waits for a free upstream slot before a 503 (ms); 0 = no bound. */
export const DEFAULT_UPSTREAM_SLOT_WAIT_MS = 5_000
/** Without a configured cap, one client address may hold this fraction (1/n) of a pool's slots. */
export const SLOTS_PER_CLIENT_DIVISOR = 4
/** How often the engine checks the data rates of the connections it watches (ms). */
export const RATE_CHECK_INTERVAL_MS = 1_000

/** The limits as a front door configures them. */
export interface ClientLimits {
  /** Least average request-body rate after the grace period (bytes/s); 0 = none. */
  readonly minRequestBodyBytesPerSecond: number
  /** Grace period of the request-body rate (ms). */
  readonly requestBodyGracePeriodMs: number
  /** Least rate at which a client takes queued response bytes (bytes/s); 0 = none. */
  readonly minResponseBytesPerSecond: number
  /** Grace period added to each wait for a client to take queued response bytes (ms). */
  readonly responseGracePeriodMs: number
  /**
   * Most upstream slots (pooled connections, tunnel streams) one client address holds at once, per
   * upstream; `undefined` = a quarter of the upstream's pool (at least 1); 0 = no cap.
   */
  readonly maxUpstreamSlotsPerClient: number | undefined
  /** Time a request waits for a free upstream slot before a 503 (ms); 0 = no bound. */
  readonly upstreamSlotWaitMs: number
}

export const CLIENT_LIMIT_DEFAULTS: ClientLimits = {
  minRequestBodyBytesPerSecond: DEFAULT_MIN_REQUEST_BODY_BYTES_PER_SECOND,
  requestBodyGracePeriodMs: DEFAULT_REQUEST_BODY_GRACE_PERIOD_MS,
  minResponseBytesPerSecond: DEFAULT_MIN_RESPONSE_BYTES_PER_SECOND,
  responseGracePeriodMs: DEFAULT_RESPONSE_GRACE_PERIOD_MS,
  maxUpstreamSlotsPerClient: undefined,
  upstreamSlotWaitMs: DEFAULT_UPSTREAM_SLOT_WAIT_MS
}

/** Which limit refused a client (the metric's `limit` label). */
export type ClientLimitKind =
  /** A request body below the minimum rate: 408, or the connection cut once a response head went out. */
  | "request_body_rate"
  /** A client not taking queued response bytes at the minimum rate: the connection is closed. */
  | "response_rate"
  /** A request of a client at its slot cap found none of its slots free in time: 503. */
  | "client_slots"
  /** A request found no free upstream slot in time: 503. */
  | "slot_wait"
  /** A request head not complete in time: 408. */
  | "head_timeout"

export const CLIENT_LIMIT_KINDS: ReadonlyArray<ClientLimitKind> = [
  "request_body_rate",
  "response_rate",
  "client_slots",
  "slot_wait",
  "head_timeout"
]

/**
 * Whether a request body is too slow: past the grace period, fewer bytes than the minimum rate over the
 * whole time it was read (time paused by switchyard's own backpressure is not part of `elapsedMs`).
 */
export const requestBodyTooSlow = (minBytesPerSecond: number, gracePeriodMs: number, bytes: number, elapsedMs: number): boolean =>
  minBytesPerSecond > 0 && elapsedMs > gracePeriodMs && bytes * 1000 < minBytesPerSecond * elapsedMs

/**
 * Time a client may take to take `queuedBytes` of response (ms): the grace period plus the bytes at the
 * minimum rate; `Infinity` when there is no minimum. The wait starts over at each sign of progress, with
 * what is still queued.
 */
export const responseTakeDeadlineMs = (minBytesPerSecond: number, gracePeriodMs: number, queuedBytes: number): number =>
  minBytesPerSecond > 0 ? gracePeriodMs + (queuedBytes * 1000) / minBytesPerSecond : Infinity

/** The slots one client address may hold in a pool of `poolSize`; `Infinity` when uncapped. */
export const slotsPerClient = (configured: number | undefined, poolSize: number): number =>
  configured === undefined ? Math.max(1, Math.floor(poolSize / SLOTS_PER_CLIENT_DIVISOR)) : configured === 0 ? Infinity : configured

/**
 * The key a client's slots are counted under: its IP address (an IPv4-mapped IPv6 address as IPv4), or
 * `undefined` for peers without one (Unix sockets, whose access the socket file's mode governs): these
 * are not capped, as they cannot be told apart.
 */
export const clientKey = (remoteAddress: string | undefined): string | undefined =>
  remoteAddress === undefined || remoteAddress === "" ? undefined : remoteAddress.startsWith("::ffff:") ? remoteAddress.slice(7) : remoteAddress

/** Least time between two log lines of one limit (ms): refusals in between are counted into the next. */
export const CLIENT_LIMIT_LOG_INTERVAL_MS = 10_000

/** What happened to the client, per limit, for the log line. */
export const CLIENT_LIMIT_OUTCOMES: Readonly<Record<ClientLimitKind, string>> = {
  request_body_rate: "request body below the minimum data rate: 408, connection closed",
  response_rate: "response bytes not taken at the minimum data rate: connection closed",
  client_slots: "already holds its share of upstream connections and none came free in time: 503",
  slot_wait: "no upstream connection came free in time: 503",
  head_timeout: "request head not received in time: 408"
}

/** Longest request target quoted in a log line. */
const MAX_LOGGED_TARGET = 200

/** The log line for `count` refusals by `limit` (the last one's client and request). */
export const clientLimitLogLine = (limit: ClientLimitKind, client: string, method: string, target: string, count: number): string => {
  const shown = target.length > MAX_LOGGED_TARGET ? target.slice(0, MAX_LOGGED_TARGET) + "..." : target
  const request = method === "" ? "" : ` (${method} ${JSON.stringify(shown)})`
  const more = count > 1 ? `; ${count - 1} more since the last line` : ""
  return `client ${client}: ${CLIENT_LIMIT_OUTCOMES[limit]}${request}${more}`
}
