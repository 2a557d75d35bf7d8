/**
 * Where the cluster's leases live: put with a TTL, remove, read every lease (bounded). The Redis binding
 * goes through `ioredis`, loaded only when a gateway joins a cluster. It knows nothing of routes: keys
 * and values are the domain's (`domain/ClusterLease.ts`).
 */
import { Effect, Schema, type Scope } from "effect"
import { messageOf, openRedis, type RedisConnectionOptions } from "./RedisConnection.ts"

/** Keys asked for per SCAN step and values per MGET. */
export const LeaseReadBatch = 500

/** A store operation failed (Redis unreachable, refused, timed out). */
export class LeaseStoreError extends Schema.TaggedError<LeaseStoreError>()("LeaseStoreError", {
  reason: Schema.Literals(["Unreachable", "Refused"]),
  message: Schema.String
}) {}

/** What a read found. */
export interface LeaseRead {
  /** Key and value of each lease found (at most `maxKeys`). */
  readonly entries: ReadonlyArray<readonly [string, string]>
  /** True when more keys matched than `maxKeys`: the rest were not read. */
  readonly truncated: boolean
}

export interface LeaseStore {
  /** Sets each key to its value, expiring after `ttlMs` unless set again. */
  readonly put: (entries: ReadonlyArray<readonly [string, string]>, ttlMs: number) => Effect.Effect<void, LeaseStoreError>
  readonly remove: (keys: ReadonlyArray<string>) => Effect.Effect<void, LeaseStoreError>
  /** Every key starting with `prefix` and its value, at most `maxKeys` of them. */
  readonly read: (prefix: string, maxKeys: number) => Effect.Effect<LeaseRead, LeaseStoreError>
  /** Tells the other gateways that this one's leases changed (`message`: its node name). */
  readonly announce: (message: string) => Effect.Effect<void, LeaseStoreError>
  /** Calls `onMessage` with each announcement (its own included) until the scope closes; best effort. */
  readonly onAnnouncement: (onMessage: (message: string) => void) => Effect.Effect<void, never, Scope.Scope>
}

/** The channel on which gateways announce changes of their leases. */
export const ChangesChannel = "switchyard:lease-changes"
/** Longest announcement read (bytes); a longer one is ignored. */
export const MaxAnnouncementBytes = 256

export type RedisStoreOptions = RedisConnectionOptions

/** A lease store on Redis, connected until the scope closes (it reconnects by itself meanwhile). */
export const redisLeaseStore = Effect.fnUntraced(function*(options: RedisStoreOptions) {
  const client = yield* openRedis(options)
  const run = <A>(what: string, f: () => Promise<A>): Effect.Effect<A, LeaseStoreError> =>
    Effect.tryPromise({
      try: f,
      catch: (e) =>
        new LeaseStoreError({
          reason: client.status === "ready" ? "Refused" : "Unreachable",
          message: `Redis ${what}: ${messageOf(e)}`
        })
    })
  return {
    put: (entries, ttlMs) =>
      entries.length === 0 ? Effect.void : run("SET", async () => {
        const pipeline = client.multi()
        for (const [key, value] of entries) pipeline.set(key, value, "PX", ttlMs)
        const results = await pipeline.exec()
        const failed = results?.find(([e]) => e !== null)
        if (results === null || failed !== undefined) throw new Error(failed?.[0]?.message ?? "transaction aborted")
      }),
    remove: (keys) => keys.length === 0 ? Effect.void : run("DEL", async () => void (await client.del(...keys))),
    read: (prefix, maxKeys) =>
      run("SCAN", async () => {
        const keys = new Set<string>()
        let cursor = "0"
        let truncated = false
        do {
          const [next, found] = await client.scan(cursor, "MATCH", `${prefix}*`, "COUNT", LeaseReadBatch)
          cursor = next
          for (const key of found) {
            if (keys.size >= maxKeys) {
              truncated = true
              break
            }
            keys.add(key)
          }
        } while (cursor !== "0" && !truncated)
        const list = [...keys]
        const entries: Array<readonly [string, string]> = []
        for (let i = 0; i < list.length; i += LeaseReadBatch) {
          const batch = list.slice(i, i + LeaseReadBatch)
          const values = await client.mget(...batch)
          // a key that expired between SCAN and MGET reads as null and is left out
          batch.forEach((key, j) => {
            const value = values[j]
            if (value !== null && value !== undefined) entries.push([key, value])
          })
        }
        return { entries, truncated }
      }),
    announce: (message) => run("PUBLISH", async () => void (await client.publish(ChangesChannel, message))),
    onAnnouncement: (onMessage) =>
      Effect.acquireRelease(
        Effect.sync(() => {
          // a subscribed connection takes no other command: a connection of its own, reconnecting by itself
          const subscriber = client.duplicate({ enableOfflineQueue: true })
          subscriber.on("error", (e: unknown) => options.onConnectionError?.(messageOf(e)))
          subscriber.on("message", (_channel: string, message: string) => {
            if (message.length <= MaxAnnouncementBytes) onMessage(message)
          })
          void subscriber.subscribe(ChangesChannel).catch(() => {})
          return subscriber
        }),
        (subscriber) => Effect.sync(() => subscriber.disconnect(false))
      ).pipe(Effect.asVoid)
  } satisfies LeaseStore
})
