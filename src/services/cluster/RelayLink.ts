/**
 * The relay link between two gateways of a cluster: a TCP connection opened by the gateway that needs a
 * route (the dialer) to one whose backends hold it (the listener), authenticated both ways with the
 * cluster's secret (`domain/ClusterRelay.ts`), then a yamux session in which the dialer opens one stream
 * per relayed connection, each starting with the control port's preamble (public port, kind, the public
 * peer). The listener hands each stream to its public listeners, which serve it like a public connection
 * on local backends only. It does not route: the Registry and the Dispatcher do.
 */
import { randomBytes } from "node:crypto"
import type { Duplex } from "node:stream"
import { Duration, Effect, Exit, FiberSet, Redacted, Schema, Scope } from "effect"
import {
  decodeRelayChallenge,
  decodeRelayHello,
  decodeRelayProof,
  decodeRelayWelcome,
  encodeRelayChallenge,
  encodeRelayHello,
  encodeRelayProof,
  encodeRelayWelcome,
  MaxRelayHandshakeBytes,
  proofMatches,
  type RelayOpening,
  relayProof,
  RelayNonceBytes,
  RelayVersion
} from "../../domain/ClusterRelay.ts"
import { ControlProtocolError, encodePreamble, type Preamble } from "../../domain/ControlMessage.ts"
import { acceptWithPreamble } from "../client/TunnelClient.ts"
import { refusedConnection } from "../forward/Upstream.ts"
import { DeferredStream } from "../front/DeferredStream.ts"
import { readFrame, writeFrame } from "../front/ControlHandshake.ts"
import type { Address, Connection, Transport } from "../Transport.ts"
import * as Session from "../yamux/Session.ts"
import { makeStreamDuplex, type StreamSocket } from "../yamux/StreamDuplex.ts"
import { tunnelYamuxConfig } from "../yamux/YamuxConfig.ts"

/** Time a relay connection has to complete its opening, on either side. */
export const RelayHandshakeTimeoutMs = 5_000
/** Most relay connections in their opening at once on the listener; more are closed at once. */
export const MaxRelayHandshakes = 64
/** Most streams asked for on a link that is not up yet; more fail at once (502). */
export const MaxWaitingRelayStreams = 1_024
/** Pause before a link dials again after a failure, growing to `MaxRelayRedialMs`. */
export const RelayRedialMs = 100
export const MaxRelayRedialMs = 2_000
/**
 * How long a link stays up after its last holder left the table: requests still in flight on it finish,
 * and a holder that comes back (its lease read again after a Redis restart) finds the link up.
 */
export const RelayLinkLingerMs = 30_000

/** A relay link could not be opened or was refused. */
export class RelayLinkError extends Schema.TaggedError<RelayLinkError>()("RelayLinkError", {
  reason: Schema.Literals(["Io", "Timeout", "Protocol", "BadProof"]),
  message: Schema.String
}) {}

type TransportShape = Transport["Service"]

const toRelayError = (e: { readonly message: string; readonly _tag: string }): RelayLinkError =>
  e instanceof RelayLinkError ? e : new RelayLinkError({ reason: e._tag === "ControlProtocolError" ? "Protocol" : "Io", message: e.message })

const nonce = (): string => randomBytes(RelayNonceBytes).toString("base64url")

const withTimeout = <A, E, R>(self: Effect.Effect<A, E, R>, what: string): Effect.Effect<A, E | RelayLinkError, R> =>
  self.pipe(Effect.timeoutOrElse({
    duration: Duration.millis(RelayHandshakeTimeoutMs),
    orElse: () => Effect.fail(new RelayLinkError({ reason: "Timeout", message: `no ${what} within ${RelayHandshakeTimeoutMs} ms` }))
  }))

/** A stream relayed to this gateway: the public connection it carries, and the gateway it came from. */
export interface RelayedStream {
  /** The stream as a socket whose `remoteAddress`/`remotePort` are the public peer's (from the preamble). */
  readonly socket: StreamSocket
  readonly preamble: Preamble
  readonly from: string
}

export interface RelayListenerOptions {
  readonly transport: TransportShape
  readonly address: Address
  readonly node: string
  readonly secret: Redacted.Redacted<string>
  /** Each authenticated stream, preamble read. */
  readonly onStream: (stream: RelayedStream) => void
  /** Each refused opening (a bad proof, a timeout, a malformed message), for logs and `/status`. */
  readonly onRefused?: ((remote: string, error: RelayLinkError) => void) | undefined
  /** Each link opened and closed, for logs. */
  readonly onLink?: ((event: "opened" | "closed", node: string, remote: string) => void) | undefined
}

/** Serves relay links on `address` until the scope closes; returns the bound address. */
export const listenRelay = Effect.fnUntraced(function*(options: RelayListenerOptions) {
  const fibers = yield* FiberSet.make()
  const run = yield* FiberSet.runtime(fibers)<never>()
  const secret = Redacted.value(options.secret)
  let opening = 0

  const serveLink = (conn: Connection) =>
    Effect.gen(function*() {
      const remote = `${conn.remoteAddress?.host ?? "?"}:${conn.remoteAddress?.port ?? "?"}`
      const opened = yield* Effect.exit(withTimeout(Effect.gen(function*() {
        const first = yield* readFrame(conn, MaxRelayHandshakeBytes)
        const hello = decodeRelayHello(first.body)
        if (hello instanceof ControlProtocolError) return yield* toRelayError(hello)
        const facts: RelayOpening = { dialerNode: hello.node, dialerNonce: hello.nonce, listenerNode: options.node, listenerNonce: nonce() }
        yield* writeFrame(first.rest, encodeRelayChallenge({
          _tag: "RelayChallenge",
          node: options.node,
          nonce: facts.listenerNonce,
          proof: relayProof(secret, "listener", facts)
        }))
        const second = yield* readFrame(first.rest, MaxRelayHandshakeBytes)
        const proof = decodeRelayProof(second.body)
        if (proof instanceof ControlProtocolError) return yield* toRelayError(proof)
        if (!proofMatches(secret, "dialer", facts, proof.proof)) {
          return yield* new RelayLinkError({ reason: "BadProof", message: `gateway "${hello.node}" did not prove the cluster secret` })
        }
        yield* writeFrame(second.rest, encodeRelayWelcome({ _tag: "RelayWelcome" }))
        return { conn: second.rest, node: hello.node }
      }), "relay opening").pipe(Effect.mapError(toRelayError), Effect.ensuring(Effect.sync(() => void opening--))))
      if (Exit.isFailure(opened)) {
        const failure = opened.cause.reasons.find((r) => r._tag === "Fail")
        if (failure?._tag === "Fail") options.onRefused?.(remote, failure.error)
        conn.destroy()
        return
      }
      const { conn: link, node } = opened.value
      const peerHost = conn.remoteAddress?.host ?? ""
      const peerPort = conn.remoteAddress?.port ?? 0
      const session = yield* Session.make(link, { role: "server", config: tunnelYamuxConfig(undefined) })
      const core = session.core
      options.onLink?.("opened", node, remote)
      // a pooled HTTP stream serves many public clients (each named in X-Forwarded-For by the relaying
      // gateway): its peer is that gateway; a TCP stream's is the public client
      acceptWithPreamble(core, (socket, preamble) => {
        // the per-request instruments say which gateway relayed it
        ;(socket as unknown as { relayedFrom?: string }).relayedFrom = node
        options.onStream({ socket, preamble, from: node })
      }, { host: peerHost, port: peerPort })
      yield* Effect.exit(session.closed)
      options.onLink?.("closed", node, remote)
    }).pipe(Effect.scoped)

  return yield* options.transport.listen(options.address, (conn) => {
    if (opening >= MaxRelayHandshakes) return void conn.destroy()
    opening++
    run(serveLink(conn))
  })
})

/** The dialer's side of one link: streams toward one gateway. */
export interface RelayLink {
  /** A stream carrying `preamble` first; it fails at once (a 502 for HTTP) when the link is down. */
  readonly openNow: (preamble: Preamble) => Duplex
  /** True while the link is down after a failed attempt (its backends are skipped meanwhile). */
  readonly isDown: () => boolean
}

export interface RelayDialerOptions {
  readonly transport: TransportShape
  readonly node: string
  readonly secret: Redacted.Redacted<string>
  /** Each link state change, for logs and `/status`. */
  readonly onLinkState?: ((address: string, state: "up" | "down", detail: string) => void) | undefined
}

export interface RelayDialer {
  /** The link to `address` (host:port), dialed now and kept up while some holder uses it. */
  readonly acquire: (address: Address) => Effect.Effect<RelayLink, never, Scope.Scope>
}

const describeAddress = (address: Address) => `${address.host}:${address.port}`

/** Dials relay links on demand and keeps each up (redialing after a loss) until its last user leaves. */
export const makeRelayDialer = Effect.fnUntraced(function*(options: RelayDialerOptions) {
  const secret = Redacted.value(options.secret)
  const fibers = yield* FiberSet.make()
  const run = yield* FiberSet.runtime(fibers)<never>()
  interface LinkState {
    link: RelayLink
    users: number
    stop: () => void
  }
  const links = new Map<string, LinkState>()

  const openLink = (address: Address) =>
    Effect.gen(function*() {
      const conn = yield* options.transport.dial(address)
      const facts = { dialerNode: options.node, dialerNonce: nonce() }
      yield* writeFrame(conn, encodeRelayHello({ _tag: "RelayHello", v: RelayVersion, node: options.node, nonce: facts.dialerNonce }))
      const first = yield* readFrame(conn, MaxRelayHandshakeBytes)
      const challenge = decodeRelayChallenge(first.body)
      if (challenge instanceof ControlProtocolError) return yield* toRelayError(challenge)
      const opening: RelayOpening = { ...facts, listenerNode: challenge.node, listenerNonce: challenge.nonce }
      if (!proofMatches(secret, "listener", opening, challenge.proof)) {
        return yield* new RelayLinkError({ reason: "BadProof", message: `${describeAddress(address)} ("${challenge.node}") did not prove the cluster secret` })
      }
      yield* writeFrame(first.rest, encodeRelayProof({ _tag: "RelayProof", proof: relayProof(secret, "dialer", opening) }))
      const second = yield* readFrame(first.rest, MaxRelayHandshakeBytes)
      const welcome = decodeRelayWelcome(second.body)
      if (welcome instanceof ControlProtocolError) return yield* toRelayError(welcome)
      return { conn: second.rest, node: challenge.node }
    })

  const makeLink = (address: Address): LinkState => {
    const name = describeAddress(address)
    let core: Session.YamuxSession["core"] | undefined
    let down = false
    let stopped = false
    const waiting: Array<() => void> = []
    const openOn = (session: Session.YamuxSession["core"], preamble: Preamble): Duplex => {
      const s = session.openStream()
      if (s instanceof Error) return refusedConnection(`relay link to ${name}: ${s.message}`)
      const socket = makeStreamDuplex(s)
      socket.write(encodePreamble(preamble))
      return socket
    }
    const link: RelayLink = {
      openNow: (preamble) => {
        if (core !== undefined) return openOn(core, preamble)
        if (down || stopped || waiting.length >= MaxWaitingRelayStreams) return refusedConnection(`relay link to ${name} is down`)
        // asked for before the first opening completed: the stream opens once it does
        const deferred = new DeferredStream()
        waiting.push(() => {
          if (core === undefined) return void deferred.destroy(new Error(`relay link to ${name} could not be opened`))
          deferred.attach(openOn(core, preamble))
        })
        return deferred
      },
      isDown: () => down
    }
    const connectOnce = Effect.gen(function*() {
      const { conn, node } = yield* withTimeout(openLink(address), "relay opening").pipe(Effect.mapError(toRelayError))
      const session = yield* Session.make(conn, { role: "client", config: tunnelYamuxConfig(undefined) })
      core = session.core
      down = false
      options.onLinkState?.(name, "up", `gateway "${node}"`)
      for (const w of waiting.splice(0)) w()
      const closed = yield* Effect.exit(session.closed)
      return Exit.isSuccess(closed) ? "the link closed" : closed.cause.reasons.map((r) => r._tag === "Fail" ? r.error.message : r._tag).join("; ")
    }).pipe(Effect.scoped)
    const supervise = Effect.gen(function*() {
      let attempt = 0
      while (!stopped) {
        const exit = yield* Effect.exit(connectOnce)
        const wasUp = core !== undefined
        core = undefined
        down = true
        for (const w of waiting.splice(0)) w()
        const detail = Exit.isSuccess(exit)
          ? exit.value
          : exit.cause.reasons.map((r) => r._tag === "Fail" ? r.error.message : r._tag).join("; ")
        if (wasUp || attempt === 0) options.onLinkState?.(name, "down", detail)
        attempt = wasUp ? 1 : attempt + 1
        yield* Effect.sleep(Math.min(RelayRedialMs * 2 ** Math.min(attempt, 5), MaxRelayRedialMs))
      }
    })
    const fiber = run(supervise)
    return {
      link,
      users: 0,
      stop: () => {
        stopped = true
        fiber.interruptUnsafe()
      }
    }
  }

  return {
    acquire: (address) =>
      Effect.acquireRelease(
        Effect.sync(() => {
          const key = describeAddress(address)
          let state = links.get(key)
          if (state === undefined) {
            state = makeLink(address)
            links.set(key, state)
          }
          state.users++
          return { key, state }
        }),
        ({ key, state }) =>
          Effect.sync(() => {
            state.users--
            if (state.users > 0) return
            run(Effect.sleep(RelayLinkLingerMs).pipe(Effect.andThen(Effect.sync(() => {
              if (state.users > 0 || links.get(key) !== state) return
              links.delete(key)
              state.stop()
            }))))
          })
      ).pipe(Effect.map(({ state }) => state.link))
  } satisfies RelayDialer
})
