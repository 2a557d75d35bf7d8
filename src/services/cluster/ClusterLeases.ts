/**
 * A gateway's part in the cluster's route table: every heartbeat (and soon after each change of the
 * local routing table) it publishes a lease for each route its own backends hold, withdraws the leases of
 * routes it no longer holds, and reads the other gateways' leases. While the store cannot be reached the
 * last table read stays in use until the lease TTL has passed since that read, then it is dropped and
 * the gateway says so; when the store answers again everything is published again. It does not relay
 * (the relay link does) and does not decide which backend serves (the Dispatcher does).
 */
import { Clock, Deferred, Effect, type Redacted } from "effect"
import type { Scope } from "effect"
import {
  decodeLeaseValue,
  decodeNodeValue,
  encodeNodeValue,
  MaxAdvertisedGateways,
  nodeKey,
  NodeKeyPrefix,
  diffLeaseTables,
  encodeLeaseValue,
  type Lease,
  leaseKey,
  LeaseKeyPrefix,
  leaseRouteOf,
  type LeaseTable,
  type LeaseTableDiff,
  LeaseVersion,
  tableStillValid
} from "../../domain/ClusterLease.ts"
import type { Backend } from "../Backend.ts"
import type { RegistryShape } from "../Registry.ts"
import type { LeaseStore } from "./LeaseStore.ts"

/** Most leases read from the store; more are left unread (and said so). */
export const DefaultMaxLeases = 10_000
/** Shortest time between two publications caused by changes of the local table (ms). */
export const MinPublishIntervalMs = 100

/** A cluster this gateway joins. */
export interface ClusterConfig {
  /** `redis://host:port` (or `rediss://`); may carry a password. */
  readonly redisUrl: string
  readonly node: string
  /** The relay link's address as the other gateways dial it. */
  readonly advertise: { readonly host: string; readonly port: number }
  readonly secret: Redacted.Redacted<string>
  readonly leaseTtlMs: number
  readonly heartbeatMs: number
  readonly maxLeases?: number | undefined
  /**
   * Where backends dial this gateway's control port, as a client names it (`host:port`,
   * `tls://host:port`); published so the other gateways can tell their clients. None: not published.
   */
  readonly control?: (() => string | undefined) | undefined
  /** `cluster.control_advertise`: the control address told to clients, when set. */
  readonly controlAdvertise?: string | undefined
}

/** Where the store stands, as `/status` shows it. */
export interface ClusterStoreState {
  /** `connecting` until the first read; `connected`; `unreachable` since the first failure after that. */
  readonly store: "connecting" | "connected" | "unreachable"
  /** Clock time (ms) of the last successful read of the table. */
  readonly lastReadAt: number | undefined
  /** True while the table in use comes from a read older than the lease TTL, which is then empty. */
  readonly stale: boolean
  readonly lastError: string | undefined
  /** Leases this gateway keeps alive. */
  readonly published: number
  /** The other gateways' leases in use. */
  readonly remote: number
  /** True when the last read found more leases than the limit. */
  readonly truncated: boolean
}

export interface ClusterLeasesShape {
  readonly node: string
  /** The other gateways' leases in use (the last table read, while still valid). */
  readonly table: () => LeaseTable
  readonly state: () => ClusterStoreState
  /** The other gateways' control addresses (from their node records, last read while still valid). */
  readonly gateways: () => ReadonlyArray<string>
  /**
   * Deletes this gateway's leases and publishes none from now on (the gateway is stopping: the others
   * stop relaying to it within a heartbeat); the others' leases are still read.
   */
  readonly withdraw: Effect.Effect<void>
}

export interface ClusterLeasesOptions {
  readonly config: ClusterConfig
  readonly store: LeaseStore
  readonly registry: RegistryShape
  /** Whether a backend is this gateway's own (a backend reached over a relay link is not published). */
  readonly isLocal: (backend: Backend) => boolean
  /** Applies each change of the table in use (before `table()` returns the new one). */
  readonly onChange?: ((diff: LeaseTableDiff, table: LeaseTable) => Effect.Effect<void>) | undefined
}

const advertised = (config: ClusterConfig): string =>
  config.advertise.host.includes(":") ? `[${config.advertise.host}]:${config.advertise.port}` : `${config.advertise.host}:${config.advertise.port}`

/** The leases the local backends of `registry` justify, by key. */
export const localLeases = (config: ClusterConfig, registry: RegistryShape, isLocal: (backend: Backend) => boolean): Map<string, Lease> => {
  const out = new Map<string, Lease>()
  const relay = advertised(config)
  for (const entry of registry.snapshot()) {
    if (!entry.backends.some((b) => isLocal(b) && !b.isClosed())) continue
    const route = leaseRouteOf(entry.route)
    const owner = entry.owner === undefined ? {} : { owner: { name: entry.owner.name, shares: entry.owner.shares } }
    out.set(leaseKey(config.node, route), { v: LeaseVersion, node: config.node, relay, route, ...owner })
  }
  return out
}

const sameKeys = (a: ReadonlySet<string>, b: ReadonlySet<string>): boolean => a.size === b.size && [...a].every((k) => b.has(k))

/** Publishes this gateway's leases and follows the others' until the scope closes. */
export const makeClusterLeases = Effect.fnUntraced(function*(options: ClusterLeasesOptions): Effect.fn.Return<ClusterLeasesShape, never, Scope.Scope> {
  const { config, store, registry } = options
  const maxLeases = config.maxLeases ?? DefaultMaxLeases
  let table: LeaseTable = new Map()
  let gateways: ReadonlyArray<string> = []
  let published = new Set<string>()
  let state: ClusterStoreState = {
    store: "connecting",
    lastReadAt: undefined,
    stale: false,
    lastError: undefined,
    published: 0,
    remote: 0,
    truncated: false
  }
  const malformedSeen = new Set<string>()
  let withdrawn = false
  // before the first read, the TTL counts from the start
  const startedAt = yield* Clock.currentTimeMillis

  const replaceTable = (next: LeaseTable) =>
    Effect.suspend(() => {
      const diff = diffLeaseTables(table, next)
      table = next
      state = { ...state, remote: next.size }
      if (diff.added.length === 0 && diff.removed.length === 0 && diff.changed.length === 0) return Effect.void
      return options.onChange === undefined ? Effect.void : options.onChange(diff, next)
    })

  /** Publishes, withdraws and reads once; a failure leaves the previous table in use. */
  const syncOnce = Effect.gen(function*() {
    const now = yield* Clock.currentTimeMillis
    const mine = withdrawn ? new Map<string, Lease>() : localLeases(config, registry, options.isLocal)
    const result = yield* Effect.result(Effect.gen(function*() {
      // everything is set again each time: a store that lost its data (restarted) has it back at once
      const control = withdrawn ? undefined : config.control?.()
      const record = control === undefined ? [] : [[nodeKey(config.node), encodeNodeValue({ v: LeaseVersion, node: config.node, control })] as const]
      yield* store.put([...record, ...[...mine].map(([key, lease]) => [key, encodeLeaseValue(lease)] as const)], config.leaseTtlMs)
      const gone = [...published].filter((key) => !mine.has(key))
      yield* store.remove(gone)
      published = new Set(mine.keys())
      const leases = yield* store.read(LeaseKeyPrefix, maxLeases)
      const nodes = yield* store.read(NodeKeyPrefix, MaxAdvertisedGateways + 1)
      return { ...leases, nodes: nodes.entries }
    }))
    if (result._tag === "Failure") {
      const wasUp = state.store !== "unreachable"
      state = { ...state, store: "unreachable", lastError: result.failure.message }
      if (wasUp) yield* Effect.logWarning(`cluster store unreachable: ${result.failure.message}; serving local routes and the last table read until ${config.leaseTtlMs} ms after it`)
      if (!state.stale && !tableStillValid(state.lastReadAt ?? startedAt, now, config.leaseTtlMs)) {
        state = { ...state, stale: true }
        yield* Effect.logWarning(`cluster store unreachable for longer than the lease TTL (${config.leaseTtlMs} ms): the other gateways' routes are dropped; serving local routes only`)
        yield* replaceTable(new Map())
        gateways = []
      }
      return
    }
    const read = result.success
    const next = new Map<string, Lease>()
    // leases under this node's name that it does not hold (left by its previous run) are deleted
    const leftOver: Array<string> = []
    for (const [key, value] of read.entries) {
      const lease = decodeLeaseValue(key, value)
      if ("_tag" in lease && lease._tag === "LeaseValueProblem") {
        if (!malformedSeen.has(key) && malformedSeen.size < maxLeases) {
          malformedSeen.add(key)
          yield* Effect.logWarning(`cluster lease skipped: ${lease.message}`)
        }
        continue
      }
      const good = lease as Lease
      if (good.node === config.node) {
        if (!published.has(key)) leftOver.push(key)
        continue
      }
      next.set(key, good)
    }
    const others: Array<string> = []
    for (const [key, value] of read.nodes) {
      const record = decodeNodeValue(key, value)
      if ("_tag" in record || record.node === config.node || others.length >= MaxAdvertisedGateways) continue
      others.push(record.control)
    }
    gateways = others.sort()
    if (leftOver.length > 0) {
      yield* store.remove(leftOver).pipe(Effect.ignore)
      yield* Effect.logInfo(`deleted ${leftOver.length} lease(s) of this node that it no longer holds`)
    }
    if (read.truncated && !state.truncated) yield* Effect.logWarning(`cluster store holds more than ${maxLeases} leases: the rest are not read`)
    const recovered = state.store === "unreachable"
    state = { ...state, store: "connected", lastReadAt: now, stale: false, lastError: recovered ? state.lastError : undefined, published: published.size, truncated: read.truncated }
    if (recovered) yield* Effect.logInfo(`cluster store reachable again: ${published.size} lease(s) published, ${next.size} read`)
    yield* replaceTable(next)
  })

  // Each turn waits for the heartbeat or a change of the local table, whichever comes first; changes
  // are published at most every MinPublishIntervalMs.
  // Another gateway announced a change of its leases: the next turn comes at once. Announcements
  // coalesce (one pending wake-up at most); the heartbeat's read still catches one that was missed.
  let announced = Deferred.makeUnsafe<void>()
  yield* store.onAnnouncement((node) => {
    if (node !== config.node) Deferred.doneUnsafe(announced, Effect.void)
  })
  const loop = Effect.gen(function*() {
    let seen = registry.version()
    while (true) {
      const before = published
      yield* syncOnce
      // this gateway's own leases changed: the others are told now rather than at their next heartbeat
      if (!sameKeys(before, published)) yield* store.announce(config.node).pipe(Effect.ignore)
      const wake = announced
      yield* Effect.raceFirst(Effect.raceFirst(Effect.sleep(config.heartbeatMs), registry.awaitChange(seen)), Deferred.await(wake))
      if (Deferred.isDoneUnsafe(wake)) announced = Deferred.makeUnsafe<void>()
      seen = registry.version()
      yield* Effect.sleep(MinPublishIntervalMs)
    }
  })
  // on the way out the leases are withdrawn, so other gateways stop relaying here at once
  yield* Effect.addFinalizer(() =>
    store.remove([...published, ...(config.control === undefined ? [] : [nodeKey(config.node)])]).pipe(
      Effect.timeout(config.heartbeatMs),
      Effect.catch(() => Effect.void),
      Effect.andThen(Effect.sync(() => void (published = new Set())))
    )
  )
  yield* Effect.forkScoped(loop.pipe(Effect.annotateLogs({ component: "cluster" })))

  return {
    node: config.node,
    table: () => table,
    state: () => ({ ...state, published: published.size }),
    gateways: () => gateways,
    withdraw: Effect.suspend(() => {
      withdrawn = true
      return store.remove([...published, nodeKey(config.node)]).pipe(
        Effect.andThen(store.announce(config.node)),
        Effect.timeout(config.heartbeatMs),
        Effect.andThen(Effect.sync(() => void (published = new Set()))),
        Effect.catch(() => Effect.void),
        Effect.annotateLogs({ component: "cluster" })
      )
    })
  }
})
