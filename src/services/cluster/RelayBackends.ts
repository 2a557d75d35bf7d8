/**
 * The other gateways' routes as backends of this gateway's routing table: one relay backend per lease
 * of the cluster table, registered through the `Listeners` so the route's public port opens here too.
 * Its HTTP requests travel on pooled streams of the relay link to the holder, and each TCP connection on
 * a stream of its own; the Dispatcher picks it only when the route has no local backend. A TLS route's
 * connections are relayed raw (the client's TLS, ClientHello included, on a stream of its own) and
 * terminated by the holder: its certificate and key never leave it.
 */
import type { Duplex } from "node:stream"
import { Effect, Exit, Scope } from "effect"
import { type Lease, leaseKey, type LeaseTable, type LeaseTableDiff } from "../../domain/ClusterLease.ts"
import { MaxPreambleAddressLength, type Preamble } from "../../domain/ControlMessage.ts"
import type { RouteDefinition } from "../../domain/Route.ts"
import type { Backend, ConnectionMeta } from "../Backend.ts"
import { streamUpstream } from "../forward/Upstream.ts"
import type { ListenersShape } from "../Listeners.ts"
import type { RelayDialer, RelayLink } from "./RelayLink.ts"

/** Most relay streams carrying HTTP requests to one holder of one route at once. */
export const MaxRelayHttpStreams = 256
/** Most idle relay streams kept for reuse per holder and route. */
export const MaxIdleRelayHttpStreams = 32

/**
 * The route a lease names, as this gateway registers it. A TLS route is registered without a
 * certificate (as one the holder obtains itself): this gateway reads only its name and never terminates
 * its TLS for the relay backend.
 */
export const relayedRoute = (lease: Lease): RouteDefinition | undefined => {
  const route = lease.route
  if (route._tag !== "Tls") return route
  return {
    _tag: "Tls",
    port: route.port,
    domainSuffix: route.domainSuffix,
    then: route.then,
    acme: true,
    ...(route.pathPrefix === undefined ? {} : { pathPrefix: route.pathPrefix }),
    ...(route.stripPrefix === undefined ? {} : { stripPrefix: route.stripPrefix })
  }
}

const parseRelay = (text: string): { host: string; port: number } | undefined => {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(text)
  const port = m === null ? Number.NaN : Number(m[3])
  return m === null || port < 1 || port > 65_535 ? undefined : { host: (m[1] ?? m[2])!, port }
}

/** A backend reaching `lease`'s holder over `link`. */
export const relayBackend = (lease: Lease, route: RouteDefinition, link: RelayLink, isGone: () => boolean): Backend => {
  const preamble = (meta: Omit<ConnectionMeta, "localPort">): Preamble => ({
    _tag: "Preamble",
    listenerId: 0,
    protocol: meta.protocol,
    remoteAddress: meta.remoteAddress.slice(0, MaxPreambleAddressLength),
    remotePort: meta.remotePort,
    localPort: route.port,
    ...(meta.localAddress ? { localAddress: meta.localAddress.slice(0, MaxPreambleAddressLength) } : {}),
    ...(meta.serverName ? { serverName: meta.serverName } : {})
  })
  const httpPreamble = preamble({ protocol: "http", remoteAddress: "", remotePort: 0 })
  const isClosed = () => isGone() || link.isDown()
  return {
    id: `relay/${lease.node}/${leaseKey(lease.node, lease.route)}`,
    label: `relay ${lease.node} ${lease.relay}`,
    inFlight: 0,
    upstream: streamUpstream({
      describe: `relay to ${lease.node} (${lease.relay})`,
      limits: { maxSockets: MaxRelayHttpStreams, maxFreeSockets: MaxIdleRelayHttpStreams },
      connect: () => link.openNow(httpPreamble),
      retiring: isClosed
    }),
    connect: (meta) => Effect.sync((): Duplex => link.openNow(preamble(meta))),
    isClosed,
    relayedVia: lease.node,
    // the route keeps its owner here too: another token's backend is refused on it as on the holder
    ...(lease.owner === undefined ? {} : { owner: lease.owner })
  }
}

export interface RelayBackendsOptions {
  readonly listeners: ListenersShape
  readonly dialer: RelayDialer
  /** A lease whose route could not be registered here (a port this gateway serves as another kind). */
  readonly onRefused: (lease: Lease, message: string) => Effect.Effect<void>
}

/** Keeps one relay backend per relayed lease of the table; each goes when its lease leaves the table. */
export const makeRelayBackends = Effect.fnUntraced(function*(options: RelayBackendsOptions) {
  const scope = yield* Scope.Scope
  const held = new Map<string, { readonly scope: Scope.Closeable; gone: boolean }>()

  const remove = (key: string) =>
    Effect.suspend(() => {
      const entry = held.get(key)
      if (entry === undefined) return Effect.void
      held.delete(key)
      entry.gone = true
      return Scope.close(entry.scope, Exit.void)
    })

  const add = (lease: Lease) =>
    Effect.gen(function*() {
      const route = relayedRoute(lease)
      const address = parseRelay(lease.relay)
      if (route === undefined) return
      if (address === undefined) return yield* options.onRefused(lease, `relay address ${JSON.stringify(lease.relay)} is not host:port`)
      const key = leaseKey(lease.node, lease.route)
      const own = yield* Scope.fork(scope)
      const entry = { scope: own, gone: false }
      held.set(key, entry)
      const bound = yield* Effect.exit(Effect.gen(function*() {
        const link = yield* options.dialer.acquire(address)
        yield* options.listeners.bind(route, relayBackend(lease, route, link, () => entry.gone))
      }).pipe(Scope.provide(own)))
      if (Exit.isFailure(bound)) {
        yield* remove(key)
        const failure = bound.cause.reasons.find((r) => r._tag === "Fail")
        yield* options.onRefused(lease, failure?._tag === "Fail" ? failure.error.message : "could not be registered")
      }
    })

  /** Applies one change of the cluster table. */
  const apply = (diff: LeaseTableDiff, _table: LeaseTable) =>
    Effect.gen(function*() {
      for (const lease of diff.removed) yield* remove(leaseKey(lease.node, lease.route))
      for (const { previous, next } of diff.changed) {
        yield* remove(leaseKey(previous.node, previous.route))
        yield* add(next)
      }
      for (const lease of diff.added) yield* add(lease)
    })

  return { apply, count: () => held.size }
})
