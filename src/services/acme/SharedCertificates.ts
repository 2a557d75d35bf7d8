/**
 * The cluster's certificate store on Redis, through `ioredis` (loaded only by a gateway in a cluster
 * that obtains certificates): each name's certificate chain and sealed private key
 * (`domain/AcmeShared.ts`), kept until the certificate expires; the order lock of a name (SET NX PX with
 * a token of its holder, renewed and deleted only by that holder, by compare-and-set scripts); and the
 * announcements of stored certificates on a pub/sub channel.
 */
import { randomUUID } from "node:crypto"
import { Duration, Effect, Exit, Redacted, Schema, type Scope } from "effect"
import { messageOf, openRedis } from "../cluster/RedisConnection.ts"
import {
  ChallengeAckKeyPrefix,
  ChallengeAckWaitMs,
  type ChallengeMessage,
  ChallengesChannel,
  decodeChallengeMessage,
  encodeChallengeMessage,
  type SharedChallenge,
  certificateKey,
  CertificatesChannel,
  decodeSharedCertificate,
  DefaultOrderLockLeaseMs,
  deriveStoreKey,
  lockRenewEveryMs,
  encodeSharedCertificate,
  MaxAnnouncedNameBytes,
  MaxSharedCertificateBytes,
  orderLockKey,
  type SharedCertificate
} from "../../domain/AcmeShared.ts"

/** A store operation failed (Redis unreachable, refused, timed out), or an entry cannot be used. */
export class SharedStoreError extends Schema.TaggedError<SharedStoreError>()("SharedStoreError", {
  reason: Schema.Literals(["Unreachable", "Refused", "Unusable"]),
  message: Schema.String
}) {}

export interface SharedCertificatesShape {
  /** This gateway's node name (part of its lock tokens). */
  readonly node: string
  /** Lifetime of an order lock not renewed. */
  readonly lockLeaseMs: number
  /** The certificate stored for `name`, if any. */
  readonly read: (name: string) => Effect.Effect<SharedCertificate | undefined, SharedStoreError>
  /** Stores `name`'s certificate until `expiresInMs` from now, and announces it. */
  readonly write: (name: string, certificate: SharedCertificate, expiresInMs: number) => Effect.Effect<void, SharedStoreError>
  /** A fresh token for one hold of a lock. */
  readonly token: () => string
  /** Takes `name`'s order lock for one lease; false when another holds it. */
  readonly lock: (name: string, token: string) => Effect.Effect<boolean, SharedStoreError>
  /** Renews the lease of a lock held with `token`; false when it is no longer held with it. */
  readonly extend: (name: string, token: string) => Effect.Effect<boolean, SharedStoreError>
  /** Deletes the lock when held with `token`; false when it was not. */
  readonly unlock: (name: string, token: string) => Effect.Effect<boolean, SharedStoreError>
  /**
   * Hands a pending challenge answer to the other gateways (`add`), and waits until every gateway
   * subscribed acknowledged it, at most `ChallengeAckWaitMs`; or withdraws it (`remove`, no wait).
   * Returns how many gateways acknowledged it (this one included).
   */
  readonly shareChallenge: (op: "add" | "remove", challenge: SharedChallenge) => Effect.Effect<number, SharedStoreError>
  /**
   * Until the scope closes, calls `onStored` with each name a gateway stored (its own included) and
   * `onChallenge` with each challenge answer handed over by another gateway; best effort.
   */
  readonly subscribe: (handlers: {
    readonly onStored: (name: string) => void
    readonly onChallenge: (message: ChallengeMessage) => void
  }) => Effect.Effect<void, never, Scope.Scope>
}

export interface SharedCertificatesOptions {
  readonly url: string
  readonly node: string
  /** The cluster's shared secret: the private keys in the store are sealed with a key derived from it. */
  readonly secret: Redacted.Redacted<string>
  /** Bound on each command and on a connection attempt (ms). */
  readonly commandTimeoutMs: number
  /** Lifetime of an order lock not renewed (default `DefaultOrderLockLeaseMs`). */
  readonly lockLeaseMs?: number | undefined
  /** Called on each connection error Redis reports (the store keeps reconnecting). */
  readonly onConnectionError?: ((message: string) => void) | undefined
}

/** Time between two reads of a challenge's acknowledgements (ms). */
const ChallengeAckPollMs = 20
/** Lifetime of a challenge's acknowledgement counter (ms). */
const ChallengeAckTtlMs = 60_000
/** Renews the lease when the lock still holds the caller's token. */
const ExtendScript = `if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) else return 0 end`
/** Deletes the lock when it still holds the caller's token. */
const UnlockScript = `if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end`

/** The certificate store on Redis, connected until the scope closes (it reconnects by itself meanwhile). */
export const redisSharedCertificates = Effect.fnUntraced(function*(options: SharedCertificatesOptions): Effect.fn.Return<SharedCertificatesShape, never, Scope.Scope> {
  const storeKey = deriveStoreKey(Redacted.value(options.secret))
  const lockLeaseMs = options.lockLeaseMs ?? DefaultOrderLockLeaseMs
  // the first command waits for the connection (bounded), so a gateway starting beside its Redis reads the store
  const client = yield* openRedis(options)
  const run = <A>(what: string, f: () => Promise<A>): Effect.Effect<A, SharedStoreError> =>
    Effect.tryPromise({
      try: f,
      catch: (e) => new SharedStoreError({ reason: client.status === "ready" ? "Refused" : "Unreachable", message: `Redis ${what}: ${messageOf(e)}` })
    })
  return {
    node: options.node,
    lockLeaseMs,
    read: (name) =>
      // at most one byte more than an entry may have: a larger value is refused without reading it whole
      run("GETRANGE", () => client.getrange(certificateKey(name), 0, MaxSharedCertificateBytes)).pipe(
        Effect.flatMap((value) => {
          if (value.length === 0) return Effect.succeed(undefined)
          const decoded = decodeSharedCertificate(storeKey, name, value)
          return typeof decoded === "string"
            ? Effect.fail(new SharedStoreError({ reason: "Unusable", message: `the cluster's certificate entry for ${name} is ${decoded}` }))
            : Effect.succeed(decoded)
        })
      ),
    write: (name, certificate, expiresInMs) => {
      const value = encodeSharedCertificate(storeKey, name, certificate)
      if (value === undefined) {
        return Effect.fail(new SharedStoreError({ reason: "Unusable", message: `the certificate for ${name} is larger than ${MaxSharedCertificateBytes} bytes: not stored in the cluster` }))
      }
      return run("SET", async () => {
        await client.set(certificateKey(name), value, "PX", Math.max(1, Math.floor(expiresInMs)))
        await client.publish(CertificatesChannel, name)
      })
    },
    token: () => `${options.node}:${randomUUID()}`,
    lock: (name, token) => run("SET NX", async () => (await client.set(orderLockKey(name), token, "PX", lockLeaseMs, "NX")) === "OK"),
    extend: (name, token) => run("EVAL", async () => Number(await client.eval(ExtendScript, 1, orderLockKey(name), token, String(lockLeaseMs))) === 1),
    unlock: (name, token) => run("EVAL", async () => Number(await client.eval(UnlockScript, 1, orderLockKey(name), token)) === 1),
    shareChallenge: (op, challenge) => {
      const id = randomUUID()
      const message = encodeChallengeMessage(storeKey, { id, node: options.node, op, challenge })
      if (message === undefined) return Effect.fail(new SharedStoreError({ reason: "Unusable", message: "the challenge answer is too large to hand over" }))
      return run("PUBLISH", async () => {
        const receivers = await client.publish(ChallengesChannel, message)
        if (op === "remove") return receivers
        // every subscribed gateway counts the challenge once it holds it
        const deadline = Date.now() + ChallengeAckWaitMs
        for (;;) {
          const acknowledged = Number(await client.get(`${ChallengeAckKeyPrefix}${id}`) ?? 0)
          if (acknowledged >= receivers || Date.now() >= deadline) return acknowledged
          await new Promise((resolve) => setTimeout(resolve, ChallengeAckPollMs))
        }
      })
    },
    subscribe: (handlers) =>
      Effect.acquireRelease(
        Effect.sync(() => {
          // a subscribed connection takes no other command: a connection of its own, reconnecting by itself
          const subscriber = client.duplicate({ enableOfflineQueue: true })
          subscriber.on("error", (e: unknown) => options.onConnectionError?.(messageOf(e)))
          subscriber.on("message", (channel: string, message: string) => {
            if (channel === CertificatesChannel) {
              if (message.length <= MaxAnnouncedNameBytes) handlers.onStored(message)
              return
            }
            const decoded = decodeChallengeMessage(storeKey, message)
            if (decoded === undefined) return
            handlers.onChallenge(decoded)
            if (decoded.op === "add") {
              const ack = `${ChallengeAckKeyPrefix}${decoded.id}`
              void client.multi().incr(ack).pexpire(ack, ChallengeAckTtlMs).exec().catch(() => {})
            }
          })
          void subscriber.subscribe(CertificatesChannel, ChallengesChannel).catch(() => {})
          return subscriber
        }),
        (subscriber) => Effect.sync(() => subscriber.disconnect(false))
      ).pipe(Effect.asVoid)
  }
})

/**
 * Runs `work` holding `name`'s order lock (taken with `token`), renewing its lease every third of it on
 * the fiber's clock while `work` runs; a renewal that finds the lock gone is logged (another gateway may
 * order the name too). The lock is deleted if `work` is interrupted; otherwise the caller deletes it
 * once the certificate is stored.
 */
export const holdingLock = <A, E, R>(store: SharedCertificatesShape, name: string, token: string, work: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> => {
  const renewing = Effect.forever(
    Effect.gen(function*() {
      yield* Effect.sleep(Duration.millis(lockRenewEveryMs(store.lockLeaseMs)))
      const kept = yield* Effect.exit(store.extend(name, token))
      if (Exit.isSuccess(kept) && !kept.value) {
        yield* Effect.logWarning(`the cluster's order lock for ${name} was lost (its lease ran out): another gateway may order it too`)
      }
    })
  )
  return Effect.raceFirst(work, renewing).pipe(Effect.onInterrupt(() => Effect.asVoid(Effect.exit(store.unlock(name, token)))))
}
