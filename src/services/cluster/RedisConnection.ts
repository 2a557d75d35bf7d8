/**
 * The cluster's connections to Redis (the route leases, the shared ACME certificates): `ioredis` loaded
 * only by a gateway that joins a cluster, commands that fail at once while the connection is down (the
 * gateway goes on with what it knows), reconnection by itself, closed with the scope.
 */
import type * as IORedis from "ioredis"
import { Effect, type Scope } from "effect"

/** Longest pause between two reconnection attempts (ms). */
export const MaxReconnectDelayMs = 2_000

export interface RedisConnectionOptions {
  readonly url: string
  /** Bound on each command and on a connection attempt (ms). */
  readonly commandTimeoutMs: number
  /** Called on each connection error Redis reports (the client keeps reconnecting). */
  readonly onConnectionError?: ((message: string) => void) | undefined
}

/** An error's message, for the one-line errors the cluster reports. */
export const messageOf = (e: unknown): string => e instanceof Error ? e.message : String(e)

/**
 * A Redis client for `options.url`, returned once it is ready or `commandTimeoutMs` has passed (a
 * gateway starting beside its Redis does not report it unreachable); disconnected when the scope closes.
 */
export const openRedis = Effect.fnUntraced(function*(options: RedisConnectionOptions): Effect.fn.Return<IORedis.Redis, never, Scope.Scope> {
  // a CommonJS module: its exports are the namespace's `default` once bundled, and named ones besides from Node
  const loaded = (yield* Effect.promise(() => import("ioredis"))) as typeof IORedis & { readonly default?: typeof IORedis }
  const Redis = (loaded.default ?? loaded).Redis
  const client = yield* Effect.acquireRelease(
    Effect.sync(() => {
      const redis = new Redis(options.url, {
        enableOfflineQueue: false,
        maxRetriesPerRequest: 0,
        connectTimeout: options.commandTimeoutMs,
        commandTimeout: options.commandTimeoutMs,
        retryStrategy: (times: number) => Math.min(times * 100, MaxReconnectDelayMs)
      })
      redis.on("error", (e: unknown) => options.onConnectionError?.(messageOf(e)))
      return redis
    }),
    (redis) => Effect.sync(() => redis.disconnect(false))
  )
  yield* Effect.callback<void>((resume) => {
    if (client.status === "ready") return resume(Effect.void)
    const done = () => {
      clearTimeout(timer)
      client.off("ready", done)
      resume(Effect.void)
    }
    const timer = setTimeout(done, options.commandTimeoutMs)
    client.once("ready", done)
    return Effect.sync(() => {
      clearTimeout(timer)
      client.off("ready", done)
    })
  })
  return client
})
