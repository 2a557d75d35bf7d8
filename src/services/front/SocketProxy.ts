/**
 * The Docker socket proxy front door: listens on TCP and/or Unix sockets, refuses clients outside the
 * allowlist, canonicalises each request path, applies the rule set (first match wins, deny by default)
 * and hands allowed requests and upgrades to the forwarding core's raw HTTP/1.1 engine. Denials are 403 in
 * Docker's error shape and never reach upstream. The bodies of container, exec and service creates are read
 * and judged by the body policy before anything is sent (`BodyInspection`); other bodies stream unread.
 * With a label scope (`ScopedAdmission`) containers outside it are invisible; in learning mode
 * (`RuleLearning`) what the rules or body policy would refuse is forwarded and logged instead. It
 * cannot see Unix-socket peer uids (Node does not expose SO_PEERCRED): access to a Unix listener is
 * governed by its file mode and directory.
 */
import { Context, Effect, Layer, Schema } from "effect"
import type { Scope } from "effect"
import * as fs from "node:fs"
import * as net from "node:net"
import { type Decision, decide, denialMessage, type RuleSet } from "../../domain/AccessRule.ts"
import { bodyEndpoint } from "../../domain/BodyPolicy.ts"
import { clientAllowed } from "../../domain/ClientAllowlist.ts"
import { LogSampler } from "../../domain/LogSampler.ts"
import type { ClientLimitKind, ClientLimits } from "../../domain/ClientLimits.ts"
import { type CanonicalTarget, canonicalTarget, isTargetRejection, type TargetRejection } from "../../domain/HttpHeaders.ts"
import { Learned, type LearnedRequest, learnMessage } from "../../domain/RuleLearning.ts"
import type { ListenAddress, SocketProxyConfig } from "../../domain/SocketProxyConfig.ts"
import { makeClientLimitReporter } from "../forward/ClientLimitReporter.ts"
import { dockerErrors } from "../forward/ErrorResponse.ts"
import { STREAM_HIGH_WATER_MARK } from "../forward/HttpLimits.ts"
import type { Admission, Http1Request, Http1Server, PendingAdmission } from "../forward/http1/Admission.ts"
import { tcpUpstream, unixUpstream } from "../forward/Upstream.ts"
import { type ForwarderShape, makeForwarder } from "../Forwarder.ts"
import { type GuardAction, makeConnectionGuard } from "../ConnectionGuard.ts"
import { makeBodyInspection } from "./BodyInspection.ts"
import { makeScopedAdmission } from "./ScopedAdmission.ts"
import { makeScopeResolver } from "./ScopeResolver.ts"

/** What each connection-limit action means, for the log line. */
const connectionLimitMessages: Record<GuardAction, string> = {
  ListenerFull: "refused a connection: the listener has maxConnections open and none of them is silent",
  AddressFull: "refused a connection: its address has maxConnectionsPerAddress open and none of them is silent",
  EvictedIdle: "closed the oldest idle connection (nothing sent yet, or between requests) to admit a new one",
  SilentTimeout: "closed a connection that sent nothing for silentTimeoutMs"
}

export class SocketProxyError extends Schema.TaggedError<SocketProxyError>()("SocketProxyError", {
  reason: Schema.Literals(["BindFailed", "AddressInUse"]),
  address: Schema.String,
  message: Schema.String
}) {}

/** A listener as bound: TCP with its real port, or a Unix socket path. */
export type BoundAddress =
  | { readonly _tag: "Tcp"; readonly host: string; readonly port: number }
  | { readonly _tag: "Unix"; readonly path: string }

/** Request outcomes since start, for metrics. */
export interface SocketProxyStats {
  /** Forwarded to the upstream. */
  readonly allowed: number
  /** Refused by the rules or the body policy (403). */
  readonly denied: number
  /** Refused before the rules: client not in allowFrom, or a request target that was refused; or a body that could not be read (400, 408, 411, 413). */
  readonly rejected: number
  /** Client connections refused or closed to keep a listener within `maxConnections`, `maxConnectionsPerAddress` or `silentTimeoutMs`. */
  readonly connectionLimitCloses: number
  /** Requests refused and connections cut by the client limits (data rates, upstream slots), by limit. */
  readonly limited: Readonly<Record<ClientLimitKind, number>>
  /** Requests answered 404 because their container is outside the label scope, or refused (403) by it. */
  readonly outOfScope: number
  /** Requests learning mode forwarded although the rules or the body policy would have refused them. */
  readonly learned: number
}

export interface SocketProxyShape {
  readonly addresses: ReadonlyArray<BoundAddress>
  /** The rule set in force (of the first listener group). */
  readonly ruleSet: () => RuleSet
  /** Replaces the rule set of listener group `group` (default the first) for requests that arrive from now on (SIGHUP reload). */
  readonly replaceRules: (ruleSet: RuleSet, group?: number) => Effect.Effect<void>
  /** Request outcomes of every listener together. */
  readonly stats: () => SocketProxyStats
  /** Request outcomes by listener, with the rule set serving it. */
  readonly listenerStats: () => ReadonlyArray<ListenerStats>
  /** What learning mode let through (distinct requests, bounded), by rule set in learning mode. */
  readonly learned: () => ReadonlyArray<{ readonly ruleSet: string; readonly requests: ReadonlyArray<LearnedRequest> }>
  readonly forwarder: ForwarderShape
}

/** One listener's request outcomes and the rule set that serves it. */
export interface ListenerStats {
  /** `unix:/path` or `host:port` as bound. */
  readonly listener: string
  readonly ruleSet: string
  readonly stats: SocketProxyStats
}

/** One listener as served: its address, group and counters. */
interface ServedListener {
  readonly address: BoundAddress
  readonly group: number
  readonly ruleSet: () => RuleSet
  readonly replaceRules: (ruleSet: RuleSet) => void
  readonly stats: () => SocketProxyStats
  readonly learned: () => Iterable<LearnedRequest>
  /** In learning mode. */
  readonly learning: boolean
}

const describeBound = (a: BoundAddress): string => a._tag === "Unix" ? `unix:${a.path}` : describeListen({ ...a })

const sumStats = (all: ReadonlyArray<SocketProxyStats>): SocketProxyStats => {
  const limited = {} as Record<ClientLimitKind, number>
  for (const s of all) for (const [k, v] of Object.entries(s.limited)) limited[k as ClientLimitKind] = (limited[k as ClientLimitKind] ?? 0) + v
  const sum = (f: (s: SocketProxyStats) => number) => all.reduce((n, s) => n + f(s), 0)
  return {
    allowed: sum((s) => s.allowed),
    denied: sum((s) => s.denied),
    rejected: sum((s) => s.rejected),
    connectionLimitCloses: sum((s) => s.connectionLimitCloses),
    limited,
    outOfScope: sum((s) => s.outOfScope),
    learned: sum((s) => s.learned)
  }
}

/** Most (method, target) verdicts remembered per listener; the oldest are forgotten first. */
export const VERDICT_MEMO_ENTRIES = 1024
/** Longest request target whose verdict is remembered. */
export const VERDICT_MEMO_TARGET_LENGTH = 256

/** What the rule set says of one method and target: the target's canonical form and the decision on it. */
interface Verdict {
  readonly target: CanonicalTarget | TargetRejection
  readonly decision: Decision | undefined
}

/** The media type whose body Go's `ParseForm` reads into the request's parameters. */
const FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
/** Bytes outside ASCII: Go trims Unicode spaces and folds Unicode case where JavaScript would not. */
const NON_ASCII = /[^\x00-\x7f]/

/**
 * How a Content-Type reads to the Engine: `"form"` when Go's `mime.ParseMediaType` would give the form
 * media type (the part before `;`, trimmed, any case), `"ambiguous"` when it holds bytes outside ASCII
 * (whose trimming and case folding differ between Go and JavaScript), else `"other"`.
 */
const contentTypeKind = (contentType: string): "form" | "ambiguous" | "other" => {
  if (NON_ASCII.test(contentType)) return "ambiguous"
  const semi = contentType.indexOf(";")
  const media = (semi === -1 ? contentType : contentType.slice(0, semi)).trim().toLowerCase()
  return media === FORM_MEDIA_TYPE ? "form" : "other"
}
/** Methods whose body Go's `ParseForm` reads. */
const FORM_METHODS: ReadonlySet<string> = new Set(["POST", "PUT", "PATCH"])

/** Marks connections from clients outside `allowFrom`; their requests get a 403. */
const refusedClient = Symbol("switchyard/refusedClient")

const describeListen = (a: ListenAddress): string =>
  a._tag === "Unix" ? `unix:${a.path}` : a.host.includes(":") ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`

/** Removes a stale socket file (nothing answers on it); refuses when something does, or it is not a socket. */
const clearStaleSocket = (path: string): Effect.Effect<void, SocketProxyError> =>
  Effect.callback<void, SocketProxyError>((resume) => {
    let stat: fs.Stats
    try {
      stat = fs.lstatSync(path)
    } catch {
      resume(Effect.void)
      return
    }
    if (!stat.isSocket()) {
      resume(Effect.fail(new SocketProxyError({ reason: "AddressInUse", address: `unix:${path}`, message: `unix:${path} exists and is not a socket` })))
      return
    }
    const probe = net.createConnection({ path })
    probe.once("connect", () => {
      probe.destroy()
      resume(Effect.fail(new SocketProxyError({ reason: "AddressInUse", address: `unix:${path}`, message: `unix:${path} is in use by another process` })))
    })
    probe.once("error", () => {
      probe.destroy()
      try {
        fs.unlinkSync(path)
      } catch {
        // removed meanwhile
      }
      resume(Effect.void)
    })
  })

/**
 * Binds one listener for the scope's lifetime. Closing it stops accepting, lets requests in flight finish
 * for up to `drainMs`, then closes every connection left and removes the socket file.
 */
const bind = (
  server: net.Server,
  engine: Http1Server,
  address: ListenAddress,
  drainMs: number
): Effect.Effect<BoundAddress, SocketProxyError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.gen(function*() {
      if (address._tag === "Unix") yield* clearStaleSocket(address.path)
      return yield* Effect.callback<BoundAddress, SocketProxyError>((resume) => {
        const onError = (err: Error & { code?: string }) => {
          resume(Effect.fail(
            new SocketProxyError({
              reason: err.code === "EADDRINUSE" ? "AddressInUse" : "BindFailed",
              address: describeListen(address),
              message: `${describeListen(address)}: ${err.message}`
            })
          ))
        }
        server.once("error", onError)
        const done = () => {
          server.off("error", onError)
          if (address._tag === "Unix") {
            try {
              if (address.mode !== undefined) fs.chmodSync(address.path, address.mode)
              if (address.owner !== undefined) fs.chownSync(address.path, address.owner.uid, address.owner.gid ?? -1)
            } catch (e) {
              server.close()
              onError(e as Error)
              return
            }
            resume(Effect.succeed({ _tag: "Unix", path: address.path }))
          } else {
            resume(Effect.succeed({ _tag: "Tcp", host: address.host, port: (server.address() as net.AddressInfo).port }))
          }
        }
        if (address._tag === "Unix") server.listen(address.path, done)
        else server.listen(address.port, address.host, done)
      })
    }),
    (bound) =>
      Effect.promise(() =>
        Promise.all([
          new Promise<void>((resolve) => server.close(() => resolve())),
          engine.close(drainMs)
        ])
      ).pipe(
        Effect.andThen(Effect.sync(() => {
          if (bound._tag === "Unix") {
            try {
              fs.unlinkSync(bound.path)
            } catch {
              // already gone
            }
          }
        }))
      )
  )

/**
 * Starts the socket proxy: one forwarder to the upstream, and each listener of each listener group
 * served with its group's rule set, body policy and label scope (and counters of its own). Everything
 * it opened closes with the scope.
 */
export const makeSocketProxy = Effect.fn("SocketProxy.make")(function*(config: SocketProxyConfig): Effect.fn.Return<
  SocketProxyShape,
  SocketProxyError,
  Scope.Scope
> {
  const services = yield* Effect.context<never>()
  const warn = (message: string) => void Effect.runForkWith(services)(Effect.logWarning(message))
  const limits = config.limits
  const pool = { maxSockets: limits.maxSockets, maxFreeSockets: limits.maxFreeSockets }
  const forwarder = yield* makeForwarder({
    upstream: config.upstream._tag === "Unix"
      ? unixUpstream(config.upstream.path, pool)
      : tcpUpstream(config.upstream.host, config.upstream.port, pool),
    forwardedHeaders: config.forwardedHeaders,
    responseTimeoutMs: limits.responseTimeoutMs,
    idleTimeoutMs: limits.idleTimeoutMs,
    errors: dockerErrors,
    onUpstreamError: warn
  })
  const served: Array<ServedListener> = []
  for (const [group, groupConfig] of (config.groups ?? [config]).entries()) {
    for (const address of groupConfig.listen) served.push(yield* serveListener({ ...groupConfig, listen: [address] }, group, forwarder))
  }
  return {
    addresses: served.map((l) => l.address),
    ruleSet: () => served[0]!.ruleSet(),
    replaceRules: (next, group = 0) =>
      Effect.sync(() => {
        for (const l of served) if (l.group === group) l.replaceRules(next)
      }),
    stats: () => sumStats(served.map((l) => l.stats())),
    listenerStats: () => served.map((l) => ({ listener: describeBound(l.address), ruleSet: l.ruleSet().name, stats: l.stats() })),
    learned: () => {
      const byName = new Map<string, Learned>()
      for (const l of served) {
        if (!l.learning) continue
        const name = l.ruleSet().name
        const set = byName.get(name) ?? new Learned()
        for (const r of l.learned()) set.add(r)
        byName.set(name, set)
      }
      return [...byName.entries()].map(([ruleSet, set]) => ({ ruleSet, requests: [...set.values()] }))
    },
    forwarder
  }
})

/** Serves one listener (`config.listen` holds its one address) with its group's rules, body policy and scope. */
const serveListener = Effect.fnUntraced(function*(config: SocketProxyConfig, group: number, forwarder: ForwarderShape): Effect.fn.Return<
  ServedListener,
  SocketProxyError,
  Scope.Scope
> {
  const services = yield* Effect.context<never>()
  const runLog = Effect.runForkWith(services)
  const warn = (message: string) => void runLog(Effect.logWarning(message))
  const info = (message: string) => void runLog(Effect.logInfo(message))
  const limits = config.limits
  // Where each log line says a request arrived (the bound address once known).
  let listener = describeListen(config.listen[0]!)
  const from = (socket: { readonly remoteAddress?: string | undefined }) => `[listener ${listener}, client ${socket.remoteAddress ?? "local"}]`
  let ruleSet = config.ruleSet
  // Docker clients repeat their requests: the verdicts of recent ones under the current rule set are
  // kept (pure functions of method, target and rules; cleared when the rules are replaced).
  const verdicts = new Map<string, Verdict>()
  const verdictOf = (method: string, rawTarget: string): Verdict => {
    const key = rawTarget.length <= VERDICT_MEMO_TARGET_LENGTH ? `${method} ${rawTarget}` : undefined
    if (key !== undefined) {
      const known = verdicts.get(key)
      if (known !== undefined) return known
    }
    const target = canonicalTarget(rawTarget)
    const verdict: Verdict = {
      target,
      decision: isTargetRejection(target) ? undefined : decide(ruleSet, { method, path: target.path, query: target.query })
    }
    if (key !== undefined) {
      if (verdicts.size >= VERDICT_MEMO_ENTRIES) verdicts.delete(verdicts.keys().next().value!)
      verdicts.set(key, verdict)
    }
    return verdict
  }
  const allowFrom = config.allowFrom
  let allowed = 0
  let denied = 0
  let rejected = 0
  let connectionLimitCloses = 0
  let outOfScope = 0
  let learnedCount = 0
  const learned = new Learned()
  const learn = (why: string, request: LearnedRequest) => {
    learnedCount++
    learned.add(request)
    warn(learnMessage(ruleSet.name, why, request))
  }

  const refuse = (status: number, message: string): Admission => ({ _tag: "Refuse", status, message })
  const limited = makeClientLimitReporter((line) => warn(`switchyard socket-proxy: ${line}`))
  const bodyPolicy = config.bodyPolicy
  const inspection = makeBodyInspection({
    policy: () => bodyPolicy,
    ruleSetName: () => ruleSet.name,
    onRefuse: (status, message) => {
      if (status === 403) denied++
      else rejected++
      warn(message)
    },
    forward: (front) => forwarder.exchange(front, forwarder.upstream, limits),
    learning: () => config.learn,
    onWouldRefuse: (verdict, value, method, path) =>
      learn(`the body policy: ${verdict.field}: ${verdict.reason}; bodyPolicy.${verdict.check}`, { _tag: "Body", ruleSet: ruleSet.name, method, path, field: verdict.field, check: verdict.check!, reason: verdict.reason, value })
  })
  const resolver = config.containerLabel === undefined ? undefined : makeScopeResolver({ upstream: config.upstream, label: config.containerLabel })
  const scope = resolver === undefined || config.containerLabel === undefined ? undefined : makeScopedAdmission({
    label: config.containerLabel,
    resolver,
    ruleSetName: () => ruleSet.name,
    onRefuse: (status, message) => {
      if (status === 404 || status === 403) outOfScope++
      else rejected++
      warn(`${message} [listener ${listener}]`)
    }
  })
  if (resolver !== undefined) yield* Effect.addFinalizer(() => Effect.sync(resolver.close))

  /** Checks client, path, rules and (for creates) the body: what to forward, or the refusal to answer. */
  const admit = (req: Http1Request): Admission | PendingAdmission => {
    const socket = req.socket as net.Socket & { [refusedClient]?: boolean }
    const method = req.method
    if (socket[refusedClient] === true) {
      rejected++
      const message = `switchyard socket-proxy: client ${socket.remoteAddress} is not in allowFrom of rule set "${ruleSet.name}"`
      warn(`${message} ${from(socket)}`)
      return refuse(403, message)
    }
    // The Engine's Go handlers merge a form-encoded POST/PUT/PATCH body into the query parameters, where
    // rules cannot see it. The Docker API never sends such bodies, so they are refused.
    const contentType = req.contentType === undefined ? "other" : contentTypeKind(req.contentType)
    if (contentType === "ambiguous" || (contentType === "form" && FORM_METHODS.has(method))) {
      rejected++
      const message = contentType === "ambiguous"
        ? "switchyard socket-proxy: a Content-Type with bytes outside ASCII is not accepted"
        : "switchyard socket-proxy: form-encoded request bodies are not accepted"
      warn(`${message}: ${method} ${JSON.stringify(req.target)}`)
      return refuse(400, message)
    }
    const { target, decision: decided } = verdictOf(method, req.target)
    if (isTargetRejection(target)) {
      rejected++
      const message = `switchyard socket-proxy: rejected request target (${target.detail})`
      warn(`${message}: ${method} ${JSON.stringify(req.target)}`)
      return refuse(400, message)
    }
    const decision = decided!
    if (!decision.allowed && !config.learn) {
      denied++
      const request = { method, path: target.path, query: target.query }
      const message = denialMessage(ruleSet, request, decision)
      warn(`${message} ${from(socket)}`)
      return refuse(403, message)
    }
    if (!decision.allowed) {
      const why = decision.rule === undefined ? "no rule matched" : `rule "${decision.rule.source}"`
      learn(`${why} ${from(socket)}`, { _tag: "Rule", ruleSet: ruleSet.name, method, path: target.path })
    }
    const forward = (upstreamTarget: string, labelBody: boolean): Admission => {
      const endpoint = bodyPolicy.enabled ? bodyEndpoint(method, target.path) : undefined
      const onAllowed = () => {
        allowed++
        if (config.logAllowed) info(`allowed ${method} ${target.path} by "${decision.rule?.source ?? "learning mode"}"`)
      }
      if (endpoint !== undefined || labelBody) {
        // the body is judged before anything goes upstream
        const message = inspection.upstream(endpoint, method, target.path, labelBody ? config.containerLabel : undefined, onAllowed)
        return { _tag: "Forward", path: upstreamTarget, idleTimeoutMs: decision.rule?.idleTimeoutMs, message }
      }
      onAllowed()
      return { _tag: "Forward", path: upstreamTarget, idleTimeoutMs: decision.rule?.idleTimeoutMs }
    }
    return scope === undefined ? forward(target.upstreamTarget, false) : scope.admit(method, target, forward)
  }

  // Connections refused or closed by the connection limits: logged (sampled) and counted.
  const connectionLimitLog = new LogSampler()
  const onConnectionLimit = (action: GuardAction, address: string | undefined) => {
    connectionLimitCloses++
    const suppressed = connectionLimitLog.take(action, Date.now())
    if (suppressed === undefined) return
    const more = suppressed > 0 ? ` (and ${suppressed} more since the last line)` : ""
    warn(`switchyard socket-proxy: ${connectionLimitMessages[action]} (${address ?? "a Unix-socket client"})${more}`)
  }
  const clientLimits: ClientLimits = {
    minRequestBodyBytesPerSecond: limits.minRequestBodyBytesPerSecond,
    requestBodyGracePeriodMs: limits.requestBodyGracePeriodMs,
    minResponseBytesPerSecond: limits.minResponseBytesPerSecond,
    responseGracePeriodMs: limits.responseGracePeriodMs,
    maxUpstreamSlotsPerClient: limits.maxUpstreamSlotsPerClient,
    upstreamSlotWaitMs: limits.upstreamSlotWaitMs
  }

  const address = config.listen[0]!
  const engine = forwarder.serveHttp1({ limits, admit, clientLimits, onClientLimit: limited.onClientLimit })
  const checkClient = address._tag === "Tcp" && allowFrom !== undefined
  const server = net.createServer({ allowHalfOpen: true, noDelay: true, highWaterMark: STREAM_HIGH_WATER_MARK })
  const guard = makeConnectionGuard(
    { maxConnections: limits.maxConnections, maxPerAddress: limits.maxConnectionsPerAddress, silentTimeoutMs: limits.silentTimeoutMs },
    true,
    onConnectionLimit,
    engine.betweenRequests
  )
  yield* Effect.addFinalizer(() => Effect.sync(guard.close))
  server.on("connection", (socket: net.Socket & { [refusedClient]?: boolean }) => {
    if (!guard.admit(socket)) return
    if (checkClient && !clientAllowed(allowFrom, socket.remoteAddress)) socket[refusedClient] = true
    engine.accept(socket)
  })
  const bound = yield* bind(server, engine, address, limits.drainTimeoutMs)
  listener = describeBound(bound)
  // Runs before the listener closes: a body being read would hold `server.close` open.
  yield* Effect.addFinalizer(() => Effect.sync(inspection.close))
  return {
    address: bound,
    group,
    ruleSet: () => ruleSet,
    replaceRules: (next) => {
      ruleSet = next
      verdicts.clear()
    },
    stats: () => ({ allowed, denied, rejected, connectionLimitCloses, limited: limited.counts(), outOfScope, learned: learnedCount }),
    learned: () => learned.values(),
    learning: config.learn
  }
})

/** The socket proxy as a service: `SocketProxy.layer(config)` in an Effect app. */
export class SocketProxy extends Context.Service<SocketProxy, SocketProxyShape>()("switchyard/SocketProxy") {
  static readonly make = makeSocketProxy
  static readonly layer = (config: SocketProxyConfig): Layer.Layer<SocketProxy, SocketProxyError> =>
    Layer.effect(SocketProxy, makeSocketProxy(config))
}
