/**
 * The relay link's opening between two gateways of a cluster: three length-prefixed JSON messages that
 * prove to each side that the other holds the cluster's secret, without sending it. Each side brings a
 * fresh random nonce and each proof is an HMAC-SHA256 over both nonces and both node names, so a
 * recorded opening proves nothing on another connection. Proofs are compared in constant time. Pure:
 * no sockets; the service (`services/cluster/RelayLink.ts`) sends and reads the frames.
 */
import { Buffer } from "node:buffer"
import { createHmac, timingSafeEqual } from "node:crypto"
import { Schema } from "effect"
import { ControlProtocolError, frame } from "./ControlMessage.ts"
import { isNodeName } from "./ClusterLease.ts"

/** Version of the relay opening; another is refused. */
export const RelayVersion = 1
/** Largest opening message read (bytes), before the peer has proved anything. */
export const MaxRelayHandshakeBytes = 1_024
/** Random bytes in a nonce. */
export const RelayNonceBytes = 32
/** Bytes of an HMAC-SHA256 proof. */
export const RelayProofBytes = 32

const NodeName = Schema.String.check(Schema.makeFilter((s: string) => isNodeName(s) || "a node name"))
/** base64url of `RelayNonceBytes` or `RelayProofBytes` bytes. */
const Base64Url32 = Schema.String.check(Schema.isPattern(/^[A-Za-z0-9_-]{43}$/))

/** Dialer → listener: who dials, and its nonce. */
export const RelayHello = Schema.TaggedStruct("RelayHello", { v: Schema.Literal(RelayVersion), node: NodeName, nonce: Base64Url32 })
export type RelayHello = typeof RelayHello.Type
/** Listener → dialer: who listens, its nonce, and its proof. */
export const RelayChallenge = Schema.TaggedStruct("RelayChallenge", { node: NodeName, nonce: Base64Url32, proof: Base64Url32 })
export type RelayChallenge = typeof RelayChallenge.Type
/** Dialer → listener: the dialer's proof. */
export const RelayProof = Schema.TaggedStruct("RelayProof", { proof: Base64Url32 })
export type RelayProof = typeof RelayProof.Type
/** Listener → dialer: the link is open (the yamux session starts after it). */
export const RelayWelcome = Schema.TaggedStruct("RelayWelcome", {})
export type RelayWelcome = typeof RelayWelcome.Type

/** The facts both proofs cover. */
export interface RelayOpening {
  readonly dialerNode: string
  readonly dialerNonce: string
  readonly listenerNode: string
  readonly listenerNonce: string
}

/** The proof `role` sends for an opening: HMAC-SHA256(secret, role, both nonces, both nodes), base64url. */
export const relayProof = (secret: string, role: "dialer" | "listener", opening: RelayOpening): string =>
  createHmac("sha256", secret)
    .update(`switchyard-relay/${RelayVersion}\n${role}\n${opening.dialerNonce}\n${opening.listenerNonce}\n${opening.dialerNode}\n${opening.listenerNode}`)
    .digest("base64url")

/** Whether `got` is the proof `role` owes for the opening (constant time over the proof bytes). */
export const proofMatches = (secret: string, role: "dialer" | "listener", opening: RelayOpening, got: string): boolean => {
  const expected = Buffer.from(relayProof(secret, role, opening), "base64url")
  const given = Buffer.from(got, "base64url")
  // both sides of the comparison are HMAC outputs of the same length, whatever the peer sent
  const padded = Buffer.alloc(RelayProofBytes)
  given.copy(padded, 0, 0, RelayProofBytes)
  return timingSafeEqual(expected, padded) && given.length === RelayProofBytes
}

const encoder = new TextEncoder()
const decoder = new TextDecoder("utf-8", { fatal: true })

const encodeWith = <S extends Schema.Codec<any, any>>(schema: S) => {
  const encode = Schema.encodeSync(schema as any) as (value: S["Type"]) => unknown
  return (value: S["Type"]): Uint8Array => frame(encoder.encode(JSON.stringify(encode(value))))
}

const decodeWith = <S extends Schema.Codec<any, any>>(schema: S) => {
  const decode = Schema.decodeUnknownResult(schema as any) as (input: unknown) => import("effect/Result").Result<S["Type"], { message: string }>
  return (body: Uint8Array): S["Type"] | ControlProtocolError => {
    let json: unknown
    try {
      json = JSON.parse(decoder.decode(body))
    } catch (e) {
      return new ControlProtocolError({ reason: "BadJson", message: `not UTF-8 JSON: ${(e as Error).message}` })
    }
    const result = decode(json)
    if (result._tag === "Failure") return new ControlProtocolError({ reason: "BadMessage", message: result.failure.message.split("\n")[0]! })
    return result.success
  }
}

export const encodeRelayHello = encodeWith(RelayHello)
export const decodeRelayHello = decodeWith(RelayHello)
export const encodeRelayChallenge = encodeWith(RelayChallenge)
export const decodeRelayChallenge = decodeWith(RelayChallenge)
export const encodeRelayProof = encodeWith(RelayProof)
export const decodeRelayProof = decodeWith(RelayProof)
export const encodeRelayWelcome = encodeWith(RelayWelcome)
export const decodeRelayWelcome = decodeWith(RelayWelcome)
