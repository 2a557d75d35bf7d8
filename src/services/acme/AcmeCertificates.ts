/**
 * The gateway's own certificates for TLS routes registered with `acme`: for each name it obtains a
 * certificate from an ACME CA (RFC 8555, through the `acme-client` library), answering the CA's
 * HTTP-01 or TLS-ALPN-01 challenge on the gateway's public ports (`CertificateSource`), keeps it and its
 * key on disk (mode 0600) so a restart serves it without a new order, and renews it `renewBefore` its
 * expiry. A failed order is retried after a bounded exponential backoff with jitter, never before the
 * CA's `Retry-After` (up to `AcmeRetryAfterMaxMs`; an answer of the CA carrying one, or saying it is rate
 * limiting, ends the order at once instead of the library waiting it out); each failure is logged as a
 * warning and shown in `status()`. New connections get a renewed certificate at once; connections
 * already open keep theirs. A name whose last route went away is still ordered for `AcmeUnusedGraceMs`,
 * then neither ordered nor renewed (its stored files stay, and a route asking for it again reuses them).
 * One fiber per name in use, all in the scope that made the service; at most `MaxConcurrentAcmeOrders`
 * orders run at once.
 */
import { Buffer } from "node:buffer"
import type * as AcmeClient from "acme-client"
import { AsyncLocalStorage } from "node:async_hooks"
import { X509Certificate } from "node:crypto"
import * as fs from "node:fs"
import * as https from "node:https"
import * as path from "node:path"
import * as tls from "node:tls"
import { Clock, Context, Deferred, Duration, Effect, Exit, FiberSet, Layer, Option, Schema, Scope, Semaphore } from "effect"
import {
  AccountKeyFile,
  AcmeOrderTimeoutMs,
  AcmeUnusedGraceMs,
  type AcmeChallengeType,
  backoffMs,
  type CaAnswer,
  daysUntil,
  DefaultRenewBeforeMs,
  httpChallengeToken,
  HttpChallengePrefix,
  isRateLimited,
  MaxAcmeNames,
  MaxConcurrentAcmeOrders,
  parseRetryAfter,
  renewAt,
  stillOrdered,
  storedFiles
} from "../../domain/Acme.ts"
import { lockPollMs, MaxSharedChallenges, type SharedChallenge, SharedReadIntervalMs, SharedStoreRetryMs } from "../../domain/AcmeShared.ts"
import type { CertificateSource } from "../Listeners.ts"
import { holdingLock, type SharedCertificatesShape } from "./SharedCertificates.ts"

export interface AcmeConfig {
  /** The CA's ACME directory URL (e.g. Let's Encrypt's `https://acme-v02.api.letsencrypt.org/directory`). */
  readonly directoryUrl: string
  /** Contact address registered with the account (the CA's expiry and policy mail). */
  readonly email: string
  /** PEM CA certificate(s) trusted for the directory's HTTPS besides the system's (a private or test CA). */
  readonly ca?: string | undefined
  /** Where the account key and each name's certificate and key are kept (created 0700). */
  readonly storageDir: string
  /** Renew this long before expiry (default 30 days). */
  readonly renewBefore?: Duration.Input | undefined
  /** The challenge the gateway answers (default `tls-alpn-01`, on the route's TLS port). */
  readonly challenge?: AcmeChallengeType | undefined
  /** The clock renewals and backoffs are timed by (default the fiber's; tests pass a `TestClock`). */
  readonly clock?: Clock.Clock | undefined
  /** Source of the backoff jitter, in [0, 1) (default `Math.random`). */
  readonly random?: (() => number) | undefined
  /** Told of each failed order, with its one-line reason (the gateway's recent errors). */
  readonly onFailure?: ((name: string, reason: string) => void) | undefined
  /**
   * The cluster's certificate store, when the gateway is in a cluster: a name is looked up there before
   * it is ordered, ordered only under the name's lock, and each certificate obtained is stored there.
   */
  readonly shared?: SharedCertificatesShape | undefined
  /** `acme.cluster_lock_ms`: the lease of the order locks of `shared` (applies when the store is made, at start). */
  readonly clusterLockMs?: number | undefined
}

/** Where one name stands, for `/status`, `switchyard status` and the metrics. */
export interface AcmeNameStatus {
  readonly name: string
  /**
   * `ordering` (no certificate yet), `valid`, `renewing` (valid, a new one on order), `waiting` (after a
   * failure) or `unused` (no route wants it any more: not renewed, and not ordered once the grace is over).
   */
  readonly state: "ordering" | "valid" | "renewing" | "waiting" | "unused"
  /** Expiry of the certificate served (ISO 8601), when there is one. */
  readonly notAfter?: string | undefined
  readonly daysLeft?: number | undefined
  /** Consecutive failed orders. */
  readonly failures: number
  readonly lastError?: string | undefined
  /** When the next order starts, after a failure (ISO 8601). */
  readonly nextAttempt?: string | undefined
  /** When the last route that wanted the name went away (ISO 8601), while none wants it. */
  readonly unusedSince?: string | undefined
  /**
   * Where the certificate served came from: `ordered` (by this gateway), `disk` (this gateway's store,
   * after a restart) or `cluster` (the cluster's store: another gateway ordered it).
   */
  readonly source?: CertificateSourceKind | undefined
  /** In a cluster, while another gateway holds the name's order lock: this one waits for its certificate. */
  readonly waitingForCluster?: boolean | undefined
}

export type CertificateSourceKind = "ordered" | "disk" | "cluster"

export interface AcmeCertificatesShape extends CertificateSource {
  /** Starts managing `name` (a route asked for it); why it cannot, when it cannot. */
  readonly want: (name: string) => string | undefined
  /** A route that wanted `name` is gone (one call per successful `want`). */
  readonly release: (name: string) => void
  /**
   * Applies reloaded settings: `directory` (the next orders go to that CA, with the same account key),
   * `email`, `ca` and `renewBefore` take effect at once (after a new directory or CA, names waiting after
   * a failure order again at once); `storageDir` and `challenge` need a restart (a warning names each).
   * Returns the settings changed.
   */
  readonly reconfigure: (next: AcmeConfig) => Effect.Effect<ReadonlyArray<string>>
  readonly status: () => ReadonlyArray<AcmeNameStatus>
  /** Orders that ended with a certificate, and orders that failed, since start. */
  readonly orders: () => { readonly issued: number; readonly failed: number }
  /** Certificates taken from the cluster's store (another gateway ordered them), since start. */
  readonly fromCluster: () => number
}

/** The certificate manager cannot start: its store cannot be created, read or written. */
export class AcmeError extends Schema.TaggedError<AcmeError>()("AcmeError", {
  reason: Schema.Literals(["Storage"]),
  message: Schema.String
}) {}

export class AcmeCertificates extends Context.Service<AcmeCertificates, AcmeCertificatesShape>()("switchyard/AcmeCertificates") {
  static readonly layer = (config: AcmeConfig): Layer.Layer<AcmeCertificates, AcmeError> => Layer.effect(AcmeCertificates, make(config))
  static readonly make = (config: AcmeConfig): Effect.Effect<AcmeCertificatesShape, AcmeError, Scope.Scope> => make(config)
}

interface NameState {
  readonly name: string
  phase: Exclude<AcmeNameStatus["state"], "unused">
  context: tls.SecureContext | undefined
  notAfterMs: number | undefined
  notBeforeMs: number | undefined
  /** When the gateway obtained the certificate it serves (absent for one loaded from the store). */
  issuedAtMs: number | undefined
  failures: number
  lastError: string | undefined
  nextAttemptMs: number | undefined
  /** Routes that want the name. */
  users: number
  /** Since when no route wants it. */
  unusedSinceMs: number | undefined
  /** Whether its fiber runs (it ends once the name is unused past the grace). */
  running: boolean
  source: CertificateSourceKind | undefined
  /** Completed (and replaced) when the cluster's store announces a certificate for the name. */
  wake: Deferred.Deferred<void>
  /** The store announced a certificate for the name since it was last read. */
  storeChanged: boolean
  /** When the cluster's store was last read for the name. */
  lastStoreReadMs: number | undefined
  /** Another gateway holds the name's order lock. */
  waitingForCluster: boolean
}

/** Writes `text` to `file` with mode 0600, through a temporary file renamed over it. */
const writePrivate = (file: string, text: string): void => {
  const temporary = `${file}.${process.pid}.tmp`
  fs.writeFileSync(temporary, text, { mode: 0o600 })
  fs.renameSync(temporary, file)
}

/** A stored certificate and key for `name`, when both are readable, match the name and still valid at `nowMs`. */
const loadStored = (dir: string, name: string, nowMs: number): { readonly cert: string; readonly key: string; readonly validity: Validity } | undefined => {
  const files = storedFiles(name)
  try {
    const cert = fs.readFileSync(path.join(dir, files.cert), "utf8")
    const key = fs.readFileSync(path.join(dir, files.key), "utf8")
    const x509 = new X509Certificate(cert)
    const validity = validityOf(x509)
    if (x509.checkHost(name) === undefined || !(validity.notAfterMs > nowMs)) return undefined
    return { cert, key, validity }
  } catch {
    return undefined
  }
}

interface Validity {
  readonly notBeforeMs: number
  readonly notAfterMs: number
}

const validityOf = (x509: X509Certificate): Validity => ({
  notBeforeMs: new Date(x509.validFrom).getTime(),
  notAfterMs: new Date(x509.validTo).getTime()
})

/** CA certificates trusted for ACME directories besides the system's, by every manager of the process. */
const extraCas = new Set<string>()

/** What the CA answered to the requests of one order, when it refused one with a reason to wait. */
interface CaRefusal {
  status: number | undefined
  retryAfter: string | undefined
  rateLimited: boolean
  message: string | undefined
}

/** The order each request of the ACME library belongs to (its answers are noted there). */
const orderAnswers = new AsyncLocalStorage<CaRefusal>()
const RateLimitedProblem = "urn:ietf:params:acme:error:rateLimited"
/** Longest CA problem detail kept in a message. */
const MaxProblemDetailLength = 300

/**
 * Reads every response of the ACME library's HTTP client: an error answer that carries a `Retry-After`,
 * or says the CA is rate limiting (429, `rateLimited`), is noted on its order and ends the request at
 * once, so the order fails and the gateway waits as long as the CA asked (the library itself would sleep
 * through each `Retry-After` and try again). Other answers pass unchanged.
 */
const noteCaRefusal = (data: unknown, headers: unknown, status?: number): unknown => {
  const order = orderAnswers.getStore()
  if (order === undefined || status === undefined || status < 400) return data
  const retryAfterHeader = (headers as Record<string, unknown> | undefined)?.["retry-after"]
  const retryAfter = typeof retryAfterHeader === "string" ? retryAfterHeader : undefined
  const problem = typeof data === "object" && data !== null ? data as { readonly type?: unknown; readonly detail?: unknown } : {}
  const type = typeof problem.type === "string" ? problem.type : undefined
  const rateLimited = status === 429 || type === RateLimitedProblem
  if (retryAfter === undefined && !rateLimited) return data
  const detail = typeof problem.detail === "string" ? problem.detail.replace(/\s+/g, " ").slice(0, MaxProblemDetailLength) : undefined
  order.status = status
  order.retryAfter = retryAfter
  order.rateLimited = rateLimited
  order.message = `the CA answered ${status}${type === undefined ? "" : ` ${type}`}${detail === undefined ? "" : `: ${detail}`}` +
    (retryAfter === undefined ? "" : ` (Retry-After: ${retryAfter.slice(0, 64)})`)
  throw new Error(order.message)
}
let refusalsNoted = false

const messageOf = (e: unknown): string => (e instanceof Error ? e.message : String(e)).replace(/\s+/g, " ").slice(0, 500)

const make = Effect.fnUntraced(function*(config: AcmeConfig) {
  const renewBeforeOf = (c: AcmeConfig) => c.renewBefore === undefined ? DefaultRenewBeforeMs : Duration.toMillis(Duration.fromInputUnsafe(c.renewBefore))
  // what a reload may change (`reconfigure`)
  let renewBeforeMs = renewBeforeOf(config)
  let email = config.email
  let directoryUrl = config.directoryUrl
  let ca = config.ca
  /** Completed (and replaced) when the settings change: sleeping fibers look again at once. */
  let settingsChanged = Deferred.makeUnsafe<void>()
  const challengeType: AcmeChallengeType = config.challenge ?? "tls-alpn-01"
  const random = config.random ?? Math.random
  const dir = config.storageDir
  const accountKeyPath = path.join(dir, AccountKeyFile)
  const storedKey = yield* Effect.try({
    try: () => {
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 })
      fs.accessSync(dir, fs.constants.W_OK)
      return fs.existsSync(accountKeyPath) ? fs.readFileSync(accountKeyPath) : undefined
    },
    catch: (e) => new AcmeError({ reason: "Storage", message: `the ACME store ${dir} cannot be used: ${messageOf(e)}` })
  })
  if (config.ca !== undefined) extraCas.add(config.ca)
  // the ACME library (and its HTTP client) is loaded only by a gateway that obtains certificates
  // (a CommonJS module: its exports are the namespace's `default` once bundled, and named ones besides from Node)
  const loaded = (yield* Effect.promise(() => import("acme-client"))) as typeof AcmeClient & { readonly default?: typeof AcmeClient }
  const acme: typeof AcmeClient = loaded.default ?? loaded
  // acme-client makes its requests through its own axios instance, whose agent is public API: one agent
  // for the process, trusting the system's CAs and every `ca` given, keeping no idle connection open
  const useAgent = () => {
    acme.axios.defaults.httpsAgent = new https.Agent({ keepAlive: false, ...(extraCas.size === 0 ? {} : { ca: [...tls.rootCertificates, ...extraCas] }) })
  }
  useAgent()
  if (!refusalsNoted) {
    // its response transformers are public configuration too: one more, after the library's JSON parsing
    const transformers = acme.axios.defaults.transformResponse
    acme.axios.defaults.transformResponse = [...(transformers === undefined ? [] : Array.isArray(transformers) ? transformers : [transformers]), noteCaRefusal]
    refusalsNoted = true
  }
  let accountKey: Buffer
  if (storedKey !== undefined) accountKey = storedKey
  else {
    accountKey = yield* Effect.promise(() => acme.crypto.createPrivateEcdsaKey())
    const created = accountKey
    yield* Effect.try({
      try: () => writePrivate(accountKeyPath, created.toString()),
      catch: (e) => new AcmeError({ reason: "Storage", message: `the ACME account key cannot be stored in ${dir}: ${messageOf(e)}` })
    })
  }
  let client = new acme.Client({ directoryUrl, accountKey })
  /** The contact the CA has for the account of `client`, once an order registered it. */
  let registeredEmail: string | undefined

  const names = new Map<string, NameState>()
  const httpAnswers = new Map<string, string>()
  const alpnContexts = new Map<string, tls.SecureContext>()
  let issued = 0
  let failed = 0
  let fromCluster = 0
  const shared = config.shared
  const orderSlots = yield* Semaphore.make(MaxConcurrentAcmeOrders)
  const fibers = yield* FiberSet.make()
  const runFork = yield* FiberSet.runtime(fibers)<never>()
  const withClock = <A, E, R>(effect: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
    config.clock === undefined ? effect : Effect.provideService(effect, Clock.Clock, config.clock)
  if (shared !== undefined) {
    // a certificate another gateway stored wakes the fiber of its name, which reads it
    // and the challenge answers of the gateway ordering a name are answered here too (the CA may validate on any gateway)
    const remote = new Map<string, number>()
    yield* shared.subscribe({
      onStored: (announced) => {
        const state = names.get(announced.toLowerCase())
        if (state === undefined) return
        state.storeChanged = true
        const previous = state.wake
        state.wake = Deferred.makeUnsafe<void>()
        Deferred.doneUnsafe(previous, Exit.void)
      },
      onChallenge: (message) => {
        if (message.node === shared.node) return
        const c = message.challenge
        const key = c.type === "http-01" ? `http:${c.token}` : `alpn:${c.name.toLowerCase()}`
        const drop = () => {
          remote.delete(key)
          if (c.type === "http-01") httpAnswers.delete(c.token)
          else alpnContexts.delete(c.name.toLowerCase())
        }
        if (message.op === "remove") return drop()
        // answers whose order ended without a withdrawal (its gateway died) go after the longest order
        const now = Date.now()
        for (const [k, at] of remote) {
          if (now - at < AcmeOrderTimeoutMs) break
          remote.delete(k)
          if (k.startsWith("http:")) httpAnswers.delete(k.slice(5))
          else alpnContexts.delete(k.slice(5))
        }
        if (remote.size >= MaxSharedChallenges && !remote.has(key)) return
        try {
          if (c.type === "http-01") {
            if (httpChallengeToken(`${HttpChallengePrefix}${c.token}`) === undefined) return
            httpAnswers.set(c.token, c.keyAuthorization)
          } else alpnContexts.set(c.name.toLowerCase(), tls.createSecureContext({ key: c.key, cert: c.cert }))
          remote.delete(key)
          remote.set(key, now)
        } catch {
          drop()
        }
      }
    })
  }
  yield* Effect.addFinalizer(() => Effect.sync(() => {
    httpAnswers.clear()
    alpnContexts.clear()
  }))

  /** One order for `name`: a fresh key, the challenges answered, the chain and key stored; what the CA refused with, noted in `answers`. */
  const order = (name: string, answers: CaRefusal): Promise<{ readonly cert: string; readonly key: string }> =>
    orderAnswers.run(answers, async () => {
      const [key, csr] = await acme.crypto.createCsr({ commonName: name, altNames: [name] }, await acme.crypto.createPrivateEcdsaKey())
      const orderClient = client
      const contact = email
      let accountKnown = true
      try {
        orderClient.getAccountUrl()
      } catch {
        accountKnown = false
      }
      // an account the CA knows gets a contact changed by a reload before the next order; a new one is registered with it
      if (accountKnown && registeredEmail !== contact) await orderClient.updateAccount({ contact: [`mailto:${contact}`] })
      if (orderClient === client) registeredEmail = contact
      const cert = await orderClient.auto({
        csr,
        email: contact,
        termsOfServiceAgreed: true,
        challengePriority: [challengeType],
        // the gateway answers the challenge itself; the CA's validation is the check
        skipChallengeVerification: true,
        challengeCreateFn: async (authz, challenge, keyAuthorization) => {
          // the library's challenge type lists only http-01 and dns-01; tls-alpn-01 comes as well
          const type: string = challenge.type
          let answer: SharedChallenge
          if (challenge.type === "http-01") {
            httpAnswers.set(challenge.token, keyAuthorization)
            answer = { type: "http-01", token: challenge.token, keyAuthorization }
          } else if (type === "tls-alpn-01") {
            const [alpnKey, alpnCert] = await acme.crypto.createAlpnCertificate(authz, keyAuthorization)
            const challenged = authz.identifier.value.toLowerCase()
            alpnContexts.set(challenged, tls.createSecureContext({ key: alpnKey, cert: alpnCert }))
            answer = { type: "tls-alpn-01", name: challenged, cert: alpnCert.toString(), key: alpnKey.toString() }
          } else throw new Error(`challenge ${type} is not answered by the gateway`)
          // in a cluster every gateway answers it: the CA is told to validate once they hold it (or after a bounded wait)
          if (shared !== undefined) await Effect.runPromise(Effect.exit(shared.shareChallenge("add", answer)))
        },
        challengeRemoveFn: async (authz, challenge) => {
          const challenged = authz.identifier.value.toLowerCase()
          if (challenge.type === "http-01") httpAnswers.delete(challenge.token)
          else alpnContexts.delete(challenged)
          if (shared !== undefined) {
            const answer: SharedChallenge = challenge.type === "http-01"
              ? { type: "http-01", token: challenge.token, keyAuthorization: "" }
              : { type: "tls-alpn-01", name: challenged, cert: "", key: "" }
            await Effect.runPromise(Effect.exit(shared.shareChallenge("remove", answer)))
          }
        }
      })
      storeOnDisk(name, cert, key.toString())
      return { cert, key: key.toString() }
    })

  const storeOnDisk = (name: string, cert: string, key: string) => {
    const files = storedFiles(name)
    fs.mkdirSync(path.join(dir, files.dir), { recursive: true, mode: 0o700 })
    writePrivate(path.join(dir, files.key), key)
    writePrivate(path.join(dir, files.cert), cert)
  }

  const install = (state: NameState, cert: string, key: string, validity: Validity, issuedAtMs: number | undefined, source: CertificateSourceKind) => {
    state.context = tls.createSecureContext({ cert, key })
    state.source = source
    state.waitingForCluster = false
    state.notAfterMs = validity.notAfterMs
    state.notBeforeMs = validity.notBeforeMs
    state.issuedAtMs = issuedAtMs
    state.phase = "valid"
    state.failures = 0
    state.lastError = undefined
    state.nextAttemptMs = undefined
  }

  /** How long to sleep towards `target`: woken at the latest when the grace of an unused name ends, and every `AcmeUnusedGraceMs` to see whether it became unused. */
  const wakeIn = (state: NameState, target: number, now: number): number =>
    Math.max(1, Math.min(target - now, state.unusedSinceMs === undefined ? AcmeUnusedGraceMs : state.unusedSinceMs + AcmeUnusedGraceMs - now))

  /** Sleeps `ms`, or less when the settings change or the cluster's store announces the name meanwhile. */
  const sleepOrWake = (ms: number, state: NameState) =>
    Effect.raceFirst(Effect.sleep(Duration.millis(ms)), Effect.raceFirst(Deferred.await(settingsChanged), Deferred.await(state.wake)))

  /** Stops managing an unused name: its fiber ends and its certificate leaves memory (the store keeps it). */
  const park = (state: NameState) =>
    Effect.gen(function*() {
      state.running = false
      state.context = undefined
      state.source = undefined
      state.waitingForCluster = false
      state.nextAttemptMs = undefined
      yield* Effect.logInfo(`no route wants ${state.name} any more: its certificate is no longer renewed (the stored one is kept)`)
    })

  /**
   * Keeps `name`'s certificate: orders when there is none or it is due, waits otherwise, backs off on
   * failure; ends when no route has wanted the name for the grace.
   */
  const manage = (state: NameState) =>
    Effect.gen(function*() {
      for (;;) {
        const now = yield* Clock.currentTimeMillis
        if (!stillOrdered(state.unusedSinceMs, now)) return yield* park(state)
        if (state.notAfterMs !== undefined && state.notBeforeMs !== undefined && state.nextAttemptMs === undefined) {
          const due = renewAt({ notBeforeMs: state.notBeforeMs, notAfterMs: state.notAfterMs }, renewBeforeMs, state.issuedAtMs)
          if (now < due) {
            if (shared !== undefined) {
              // in a cluster another gateway may renew it first: the store is read on its announcement and every `SharedReadIntervalMs`
              if (yield* newerFromCluster(state, shared, now)) continue
              yield* sleepOrWake(Math.min(wakeIn(state, due, now), SharedReadIntervalMs), state)
              continue
            }
            yield* sleepOrWake(wakeIn(state, due, now), state)
            continue
          }
        }
        if (state.nextAttemptMs !== undefined && now < state.nextAttemptMs) {
          yield* sleepOrWake(wakeIn(state, state.nextAttemptMs, now), state)
          continue
        }
        state.phase = state.context === undefined ? "ordering" : "renewing"
        state.nextAttemptMs = undefined
        /** The name's order lock in the cluster, while this gateway holds it. */
        let lockToken: string | undefined
        if (shared !== undefined) {
          const turn = yield* clusterTurn(state, shared, now)
          if (turn.done) continue
          lockToken = turn.token
        }
        yield* Effect.logInfo(`ordering a certificate for ${state.name} (${challengeType})`)
        const answers: CaRefusal = { status: undefined, retryAfter: undefined, rateLimited: false, message: undefined }
        const ordering = orderSlots.withPermits(1)(
          Effect.tryPromise({ try: () => order(state.name, answers), catch: messageOf }).pipe(
            Effect.timeoutOption(Duration.millis(AcmeOrderTimeoutMs)),
            Effect.flatMap(Option.match({
              onNone: () => Effect.fail(`the order did not complete within ${AcmeOrderTimeoutMs / 1000} s`),
              onSome: Effect.succeed
            })),
            Effect.exit
          )
        )
        const result = yield* (shared === undefined || lockToken === undefined ? ordering : holdingLock(shared, state.name, lockToken, ordering))
        const after = yield* Clock.currentTimeMillis
        if (Exit.isSuccess(result)) {
          const validity = validityOf(new X509Certificate(result.value.cert))
          install(state, result.value.cert, result.value.key, validity, after, "ordered")
          issued++
          yield* Effect.logInfo(`certificate for ${state.name} issued, valid until ${new Date(validity.notAfterMs).toISOString()}`)
          if (shared !== undefined) {
            yield* shareIssued(state.name, shared, result.value, validity)
            if (lockToken !== undefined) yield* unlock(shared, state.name, lockToken)
          }
          continue
        }
        if (shared !== undefined && lockToken !== undefined) yield* unlock(shared, state.name, lockToken)
        const failure = result.cause.reasons.find((r) => r._tag === "Fail")
        const reason = answers.message ?? (failure?._tag === "Fail" ? String(failure.error) : "the order was interrupted")
        failed++
        state.failures++
        state.lastError = reason
        const ca: CaAnswer = {
          rateLimited: answers.rateLimited || isRateLimited(reason),
          retryAfterMs: answers.retryAfter === undefined ? undefined : parseRetryAfter(answers.retryAfter, after)
        }
        const wait = backoffMs(state.failures, random(), ca)
        state.nextAttemptMs = after + wait
        state.phase = "waiting"
        config.onFailure?.(state.name, reason)
        yield* Effect.logWarning(
          `no certificate for ${state.name}${state.context === undefined ? " (TLS connections for it are refused until there is one)" : " renewed"}: ${reason}; ` +
            `next order in ${Math.round(wait / 1000)} s${ca.retryAfterMs === undefined ? "" : " (the CA's Retry-After)"} (failure ${state.failures})`
        )
      }
    }).pipe(withClock, Effect.annotateLogs({ component: "acme", name: state.name }))

  /**
   * Takes `certificate` from the cluster's store for `state` when it is for the name, valid and newer than
   * the one served; true when it did. Like one ordered here, it is not renewed within
   * `MinRenewalIntervalMs` of being taken.
   */
  const adopt = (state: NameState, certificate: { readonly cert: string; readonly key: string }, now: number) =>
    Effect.gen(function*() {
      let validity: Validity
      try {
        const x509 = new X509Certificate(certificate.cert)
        if (x509.checkHost(state.name) === undefined) return false
        validity = validityOf(x509)
      } catch {
        return false
      }
      if (!(validity.notAfterMs > now)) return false
      if (state.notAfterMs !== undefined && validity.notAfterMs <= state.notAfterMs) return false
      try {
        install(state, certificate.cert, certificate.key, validity, now, "cluster")
      } catch (e) {
        yield* Effect.logWarning(`the cluster's certificate for ${state.name} cannot be used: ${messageOf(e)}`)
        return false
      }
      fromCluster++
      yield* Effect.logInfo(`certificate for ${state.name} taken from the cluster's store (no order), valid until ${new Date(validity.notAfterMs).toISOString()}`)
      try {
        storeOnDisk(state.name, certificate.cert, certificate.key)
      } catch (e) {
        yield* Effect.logWarning(`the cluster's certificate for ${state.name} cannot be stored in ${dir}: ${messageOf(e)}`)
      }
      return true
    })

  /** Reads the cluster's store for a newer certificate of a name served, when it announced one or the last read is old; true when one was taken. */
  const newerFromCluster = (state: NameState, store: SharedCertificatesShape, now: number) =>
    Effect.gen(function*() {
      if (!state.storeChanged && state.lastStoreReadMs !== undefined && now - state.lastStoreReadMs < SharedReadIntervalMs) return false
      state.storeChanged = false
      state.lastStoreReadMs = now
      const found = yield* Effect.exit(store.read(state.name))
      if (Exit.isFailure(found)) return false
      return found.value === undefined ? false : yield* adopt(state, found.value, now)
    })

  /**
   * The store cannot be read or locked: a name without a valid certificate is ordered without the lock;
   * one whose certificate is still valid waits for the store (asked again after `SharedStoreRetryMs`).
   */
  const storeFailed = (state: NameState, message: string, now: number) =>
    Effect.gen(function*() {
      state.waitingForCluster = false
      if (state.context === undefined || state.notAfterMs === undefined || state.notAfterMs <= now) {
        yield* Effect.logWarning(`the cluster's certificate store cannot be used (${message}): ordering ${state.name} without the cluster's lock`)
        return { done: false as const, token: undefined }
      }
      state.lastError = `the cluster's certificate store cannot be used: ${message}`
      state.nextAttemptMs = now + SharedStoreRetryMs
      yield* Effect.logWarning(`the cluster's certificate store cannot be used (${message}): ${state.name} is renewed once it answers (asked again in ${SharedStoreRetryMs / 1000} s)`)
      return { done: true as const }
    })

  /**
   * A name due for an order in a cluster: a valid certificate in the store is taken instead; otherwise
   * this gateway takes the name's lock and orders (`done: false` with the lock's token), or waits while
   * another gateway holds it (`done: true`, after one poll interval or its announcement).
   */
  const clusterTurn = (state: NameState, store: SharedCertificatesShape, now: number) =>
    Effect.gen(function*(): Effect.fn.Return<{ readonly done: true } | { readonly done: false; readonly token: string | undefined }> {
      const lookUp = Effect.gen(function*() {
        state.storeChanged = false
        state.lastStoreReadMs = now
        const found = yield* Effect.exit(store.read(state.name))
        if (Exit.isSuccess(found)) return found.value !== undefined && (yield* adopt(state, found.value, now)) ? "taken" as const : "none" as const
        const error = found.cause.reasons.find((r) => r._tag === "Fail")
        const message = error?._tag === "Fail" ? error.error.message : "the read was interrupted"
        if (error?._tag === "Fail" && error.error.reason === "Unusable") {
          // replaced by the next certificate ordered
          yield* Effect.logWarning(`${message}: it is ordered again`)
          return "none" as const
        }
        return message
      })
      const first = yield* lookUp
      if (first === "taken") return { done: true }
      if (first !== "none") return yield* storeFailed(state, first, now)
      const token = store.token()
      const locked = yield* Effect.exit(store.lock(state.name, token))
      if (Exit.isFailure(locked)) {
        const error = locked.cause.reasons.find((r) => r._tag === "Fail")
        return yield* storeFailed(state, error?._tag === "Fail" ? error.error.message : "the lock was interrupted", now)
      }
      if (!locked.value) {
        if (!state.waitingForCluster) yield* Effect.logInfo(`another gateway of the cluster is ordering ${state.name}: waiting for its certificate`)
        state.waitingForCluster = true
        yield* sleepOrWake(lockPollMs(store.lockLeaseMs), state)
        return { done: true }
      }
      state.waitingForCluster = false
      // the holder before may have stored its certificate between the read and the lock
      const again = yield* lookUp
      if (again === "taken") {
        yield* unlock(store, state.name, token)
        return { done: true }
      }
      return { done: false, token }
    })

  const unlock = (store: SharedCertificatesShape, name: string, token: string) =>
    Effect.exit(store.unlock(name, token)).pipe(Effect.asVoid)

  /** Stores a certificate this gateway obtained in the cluster's store (announced to the others). */
  const shareIssued = (name: string, store: SharedCertificatesShape, certificate: { readonly cert: string; readonly key: string }, validity: Validity) =>
    Effect.gen(function*() {
      // Redis expires the entry with the certificate (its time is the wall clock's)
      const written = yield* Effect.exit(store.write(name, certificate, validity.notAfterMs - Date.now()))
      if (Exit.isFailure(written)) {
        const error = written.cause.reasons.find((r) => r._tag === "Fail")
        yield* Effect.logWarning(`the certificate for ${name} is not in the cluster's store: ${error?._tag === "Fail" ? error.error.message : "interrupted"}`)
      }
    })

  const nowMs = () => config.clock === undefined ? Date.now() : config.clock.currentTimeMillisUnsafe()

  /** Starts (or restarts) the fiber of `state`, with the stored certificate when it has none in memory. */
  const start = (state: NameState) => {
    if (state.context === undefined) {
      const stored = loadStored(dir, state.name, nowMs())
      if (stored !== undefined) install(state, stored.cert, stored.key, stored.validity, undefined, "disk")
    }
    state.running = true
    runFork(manage(state))
  }

  const want = (name: string): string | undefined => {
    const key = name.toLowerCase()
    const known = names.get(key)
    if (known !== undefined) {
      known.users++
      known.unusedSinceMs = undefined
      if (!known.running) start(known)
      return undefined
    }
    if (names.size >= MaxAcmeNames) {
      // a name parked for lack of routes makes room (its files stay in the store)
      const parked = [...names.values()].find((s) => !s.running)
      if (parked === undefined) return `this gateway already obtains certificates for ${MaxAcmeNames} names`
      names.delete(parked.name)
    }
    const state: NameState = {
      name: key,
      phase: "ordering",
      context: undefined,
      notAfterMs: undefined,
      notBeforeMs: undefined,
      issuedAtMs: undefined,
      failures: 0,
      lastError: undefined,
      nextAttemptMs: undefined,
      users: 1,
      unusedSinceMs: undefined,
      running: false,
      source: undefined,
      wake: Deferred.makeUnsafe<void>(),
      storeChanged: false,
      lastStoreReadMs: undefined,
      waitingForCluster: false
    }
    names.set(key, state)
    start(state)
    return undefined
  }

  const release = (name: string): void => {
    const state = names.get(name.toLowerCase())
    if (state === undefined || state.users === 0) return
    state.users--
    if (state.users === 0) state.unusedSinceMs = nowMs()
  }

  const reconfigure = (next: AcmeConfig) =>
    Effect.gen(function*() {
      const changed: Array<string> = []
      if (next.storageDir !== dir) {
        yield* Effect.logWarning(`acme.storage_dir changed to ${next.storageDir}: it applies after a restart; certificates stay in ${dir} until then`)
      }
      if (next.clusterLockMs !== config.clusterLockMs) {
        yield* Effect.logWarning(`acme.cluster_lock_ms changed to ${next.clusterLockMs ?? "the default"}: it applies after a restart`)
      }
      if ((next.challenge ?? "tls-alpn-01") !== challengeType) {
        yield* Effect.logWarning(`acme.challenge changed to ${next.challenge ?? "tls-alpn-01"}: it applies after a restart; orders keep answering ${challengeType} until then`)
      }
      if (next.ca !== ca) {
        // trusted from now on by every request to a directory (a CA taken out is trusted until a restart)
        if (next.ca !== undefined) extraCas.add(next.ca)
        useAgent()
        if (ca !== undefined && next.ca !== ca) {
          yield* Effect.logWarning("acme.ca (ca_file): the CA certificate replaced stays trusted for ACME directories until a restart")
        }
        ca = next.ca
        changed.push("ca_file")
      }
      if (next.directoryUrl !== directoryUrl) {
        // the same account key, registered at the new CA by the next order; orders in progress finish with the old one
        directoryUrl = next.directoryUrl
        client = new acme.Client({ directoryUrl, accountKey })
        registeredEmail = undefined
        changed.push("directory")
      }
      if (next.email !== email) {
        email = next.email
        changed.push("email")
      }
      const nextRenewBefore = renewBeforeOf(next)
      if (nextRenewBefore !== renewBeforeMs) {
        renewBeforeMs = nextRenewBefore
        changed.push("renew_before")
      }
      if (changed.includes("directory") || changed.includes("ca_file")) {
        // another CA, or another trust for it: names waiting after a failure order again at once
        for (const state of names.values()) if (state.phase === "waiting") state.nextAttemptMs = undefined
      }
      if (changed.length > 0) {
        const previous = settingsChanged
        settingsChanged = Deferred.makeUnsafe<void>()
        Deferred.doneUnsafe(previous, Exit.void)
        yield* Effect.logInfo(`ACME settings reloaded: ${changed.map((c) => `acme.${c}`).join(", ")} (next orders use them; certificates already served are kept)`)
      }
      return changed
    }).pipe(Effect.annotateLogs({ component: "acme" }))

  return AcmeCertificates.of({
    want,
    release,
    reconfigure,
    contextFor: (name) => {
      const state = names.get(name)
      if (state === undefined) return `no certificate was asked for ${name}`
      if (!state.running) return `no route wants ${name}`
      if (state.context !== undefined) return state.context
      return state.lastError === undefined ? `the certificate for ${name} is being ordered` : `no certificate for ${name}: ${state.lastError}`
    },
    alpnChallenge: (name) => alpnContexts.get(name),
    httpChallenge: (requestPath) => {
      const token = httpChallengeToken(requestPath)
      return token === undefined ? undefined : httpAnswers.get(token)
    },
    status: () =>
      [...names.values()].map((s) => ({
        name: s.name,
        state: s.unusedSinceMs === undefined ? s.phase : "unused" as const,
        ...(s.notAfterMs === undefined
          ? {}
          : { notAfter: new Date(s.notAfterMs).toISOString(), daysLeft: Math.floor(daysUntil(s.notAfterMs, nowMs()) * 10) / 10 }),
        failures: s.failures,
        ...(s.lastError === undefined ? {} : { lastError: s.lastError }),
        ...(s.nextAttemptMs === undefined ? {} : { nextAttempt: new Date(s.nextAttemptMs).toISOString() }),
        ...(s.unusedSinceMs === undefined ? {} : { unusedSince: new Date(s.unusedSinceMs).toISOString() }),
        ...(s.source === undefined ? {} : { source: s.source }),
        ...(s.waitingForCluster ? { waitingForCluster: true } : {})
      })),
    orders: () => ({ issued, failed }),
    fromCluster: () => fromCluster
  })
})
