/**
 * The cluster's route leases as Redis holds them: key names, the lease value (a Schema, bounded in
 * size), the public part of a route a lease describes, the diff of two lease tables, and how long a
 * table read from Redis may still be used. Pure: nothing here talks to Redis or reads a clock.
 */
import { Buffer } from "node:buffer"
import { type Result, Schema } from "effect"
import { HttpRoute, MaxPort, type RouteDefinition, routeKey, TcpRoute } from "./Route.ts"

/** Every lease key starts with this; a gateway scans `LeaseKeyPrefix*` to read the table. */
export const LeaseKeyPrefix = "switchyard:lease:"
/** Every node record key starts with this: `switchyard:node:<node>` (where clients dial the gateway). */
export const NodeKeyPrefix = "switchyard:node:"
/** Most control addresses a gateway tells a client in its `Welcome`. */
export const MaxAdvertisedGateways = 64
/** Longest control address text in a node record. */
export const MaxControlAddressLength = 300
/** Longest node name. */
export const MaxNodeNameLength = 64
/** Largest lease value read or written (bytes of JSON); a larger one is skipped as malformed. */
export const MaxLeaseValueBytes = 4_096
/** Version of the lease value's layout; a value of another version is skipped. */
export const LeaseVersion = 1

const NodeNamePattern = /^[A-Za-z0-9._-]+$/

/** True when `name` can name a gateway in the cluster (letters, digits, `.`, `_`, `-`; at most 64). */
export const isNodeName = (name: string): boolean =>
  name.length > 0 && name.length <= MaxNodeNameLength && NodeNamePattern.test(name)

const NodeName = Schema.String.check(Schema.makeFilter((s: string) => isNodeName(s) || "a node name (letters, digits, . _ -; at most 64)"))
const Port = Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: MaxPort }))

/** A TLS route as other gateways learn it: which port and name, and what follows TLS; never its certificate. */
export const TlsLeaseRoute = Schema.TaggedStruct("Tls", {
  port: Port,
  domainSuffix: Schema.String,
  then: Schema.Literals(["http", "tcp"]),
  pathPrefix: Schema.optionalKey(Schema.String),
  stripPrefix: Schema.optionalKey(Schema.Boolean)
})

/** The public part of a route, as a lease carries it. */
export const LeaseRoute = Schema.Union([HttpRoute, TcpRoute, TlsLeaseRoute])
export type LeaseRoute = typeof LeaseRoute.Type

/** One gateway's claim that its backends serve a route, and where its relay link is. */
export const Lease = Schema.Struct({
  v: Schema.Literal(LeaseVersion),
  node: NodeName,
  /** The holder's relay link, host:port. */
  relay: Schema.String.check(Schema.isNonEmpty(), Schema.isMaxLength(300)),
  route: LeaseRoute,
  /**
   * The token that owns the route on the holder (its name, and whether it shares routes): the route
   * keeps that owner on every gateway, so another token's backend cannot take it over elsewhere.
   */
  owner: Schema.optionalKey(Schema.Struct({ name: Schema.String.check(Schema.isMaxLength(256)), shares: Schema.Boolean }))
})
export type Lease = typeof Lease.Type

/** The public part of a route definition (a TLS route's certificate and key stay on its gateway). */
export const leaseRouteOf = (route: RouteDefinition): LeaseRoute => {
  switch (route._tag) {
    case "Http":
    case "Tcp":
      return route
    case "Tls":
      return {
        _tag: "Tls",
        port: route.port,
        domainSuffix: route.domainSuffix,
        then: route.then,
        ...(route.pathPrefix === undefined ? {} : { pathPrefix: route.pathPrefix }),
        ...(route.stripPrefix === undefined ? {} : { stripPrefix: route.stripPrefix })
      }
  }
}

/** The routing-table key of a lease's route (`routeKey` of the same route). */
export const leaseRouteKey = (route: LeaseRoute): string =>
  route._tag === "Tls" ? routeKey({ ...route, acme: true }) : routeKey(route)

/** The Redis key of `node`'s lease on `route`: `switchyard:lease:<node>:<route key>`. */
export const leaseKey = (node: string, route: LeaseRoute): string => `${LeaseKeyPrefix}${node}:${leaseRouteKey(route)}`

/** The node a lease key names, or `undefined` when it is not a lease key. */
export const nodeOfLeaseKey = (key: string): string | undefined => {
  if (!key.startsWith(LeaseKeyPrefix)) return undefined
  const rest = key.slice(LeaseKeyPrefix.length)
  const colon = rest.indexOf(":")
  const node = colon <= 0 ? "" : rest.slice(0, colon)
  return isNodeName(node) ? node : undefined
}

const encodeLease = Schema.encodeSync(Lease)
const decodeLease = Schema.decodeUnknownResult(Lease)

/** A lease's value as stored. */
export const encodeLeaseValue = (lease: Lease): string => JSON.stringify(encodeLease(lease))

/** Why a stored value is not a lease. */
export interface LeaseValueProblem {
  readonly _tag: "LeaseValueProblem"
  readonly message: string
}

const problem = (message: string): LeaseValueProblem => ({ _tag: "LeaseValueProblem", message })

/**
 * A JSON record read from `key`: parsed within `MaxLeaseValueBytes`, decoded with `decode`, and checked to
 * describe that same key.
 */
const decodeRecord = <A>(
  key: string,
  value: string,
  decode: (json: unknown) => Result.Result<A, { readonly message: string }>,
  keyOf: (record: A) => string
): A | LeaseValueProblem => {
  if (Buffer.byteLength(value, "utf8") > MaxLeaseValueBytes) return problem(`${key}: value larger than ${MaxLeaseValueBytes} bytes`)
  let json: unknown
  try {
    json = JSON.parse(value)
  } catch (e) {
    return problem(`${key}: not JSON: ${(e as Error).message}`)
  }
  const result = decode(json)
  if (result._tag === "Failure") return problem(`${key}: ${result.failure.message.split("\n")[0]}`)
  const described = keyOf(result.success)
  if (described !== key) return problem(`${key}: the value describes ${described}`)
  return result.success
}

/** Reads a stored value; it must name the node its key names. */
export const decodeLeaseValue = (key: string, value: string): Lease | LeaseValueProblem =>
  decodeRecord(key, value, decodeLease, (lease) => leaseKey(lease.node, lease.route))

/** Leases by key. */
export type LeaseTable = ReadonlyMap<string, Lease>

/** What changed from one table to the next. */
export interface LeaseTableDiff {
  readonly added: ReadonlyArray<Lease>
  readonly removed: ReadonlyArray<Lease>
  /** Same key, another value (a holder that moved its relay address): the previous and the next. */
  readonly changed: ReadonlyArray<{ readonly previous: Lease; readonly next: Lease }>
}

const sameLease = (a: Lease, b: Lease): boolean => encodeLeaseValue(a) === encodeLeaseValue(b)

/** The changes that turn `previous` into `next`. */
export const diffLeaseTables = (previous: LeaseTable, next: LeaseTable): LeaseTableDiff => {
  const added: Array<Lease> = []
  const removed: Array<Lease> = []
  const changed: Array<{ previous: Lease; next: Lease }> = []
  for (const [key, lease] of next) {
    const before = previous.get(key)
    if (before === undefined) added.push(lease)
    else if (!sameLease(before, lease)) changed.push({ previous: before, next: lease })
  }
  for (const [key, lease] of previous) if (!next.has(key)) removed.push(lease)
  return { added, removed, changed }
}

/**
 * Whether the last table read from Redis may still be used at `now` (ms): until the lease TTL has
 * passed since the read, every lease in it was still alive or would have been renewed.
 */
export const tableStillValid = (readAt: number | undefined, now: number, leaseTtlMs: number): boolean =>
  readAt !== undefined && now - readAt < leaseTtlMs

/** A gateway's record: where backends dial its control port (as a client names it: `host:port`, `tls://host:port`). */
export const NodeRecord = Schema.Struct({
  v: Schema.Literal(LeaseVersion),
  node: NodeName,
  control: Schema.String.check(Schema.isNonEmpty(), Schema.isMaxLength(MaxControlAddressLength))
})
export type NodeRecord = typeof NodeRecord.Type

/** The Redis key of `node`'s record. */
export const nodeKey = (node: string): string => `${NodeKeyPrefix}${node}`

const encodeNode = Schema.encodeSync(NodeRecord)
const decodeNode = Schema.decodeUnknownResult(NodeRecord)

/** A node record's value as stored. */
export const encodeNodeValue = (record: NodeRecord): string => JSON.stringify(encodeNode(record))

/** Reads a stored node record; it must name the node its key names. */
export const decodeNodeValue = (key: string, value: string): NodeRecord | LeaseValueProblem =>
  decodeRecord(key, value, decodeNode, (record) => nodeKey(record.node))
