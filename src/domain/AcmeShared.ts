/**
 * The ACME certificates clustered gateways share in Redis: the keys of a name's certificate entry and of
 * its order lock, the entry's format, the encryption of its private key with a key derived from the
 * cluster's secret (HKDF-SHA-256, then AES-256-GCM with the name as associated data, so an entry cannot
 * be moved to another name), the size bounds, and the timing of the lock's lease. No I/O and no clock.
 */
import { Buffer } from "node:buffer"
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from "node:crypto"

/** Prefix of the certificate entries (`switchyard:acme:cert:<name>`). */
export const CertificateKeyPrefix = "switchyard:acme:cert:"
/** Prefix of the order locks (`switchyard:acme:lock:<name>`). */
export const OrderLockKeyPrefix = "switchyard:acme:lock:"
/** The channel on which a gateway announces a certificate it stored (the name as the message). */
export const CertificatesChannel = "switchyard:acme-certificates"
/** Largest certificate entry written or read (bytes); a larger one is refused. */
export const MaxSharedCertificateBytes = 64 * 1024
/** Longest name announced on `CertificatesChannel` (a DNS name is at most 253). */
export const MaxAnnouncedNameBytes = 253
/** Lifetime of an order lock that its holder does not renew (a holder that died frees the name after it). */
export const DefaultOrderLockLeaseMs = 60 * 1000
/** How often a gateway waiting for another's order reads the store again (at most; an announcement wakes it sooner). */
export const MaxLockPollMs = 5 * 1000
/** How often a gateway in a cluster reads the store for a newer certificate of a name it serves (besides announcements). */
export const SharedReadIntervalMs = 5 * 60 * 1000
/** How long a gateway that cannot reach the store waits before asking again, while it serves a certificate. */
export const SharedStoreRetryMs = 30 * 1000
/** Entry format version. */
export const SharedCertificateVersion = 1

export const certificateKey = (name: string): string => `${CertificateKeyPrefix}${name}`
export const orderLockKey = (name: string): string => `${OrderLockKeyPrefix}${name}`

/** The lock holder renews its lease this often: three times per lease. */
export const lockRenewEveryMs = (leaseMs: number): number => Math.max(1, Math.floor(leaseMs / 3))

/** A waiting gateway looks at the store and the lock this often: twice per lease, at most `MaxLockPollMs`. */
export const lockPollMs = (leaseMs: number): number => Math.max(1, Math.min(MaxLockPollMs, Math.floor(leaseMs / 2)))

const HkdfSalt = "switchyard acme store"
const HkdfInfo = "certificate private keys v1"
const IvBytes = 12
const TagBytes = 16

/** The AES-256 key protecting private keys in the store, derived from the cluster's secret. */
export const deriveStoreKey = (secret: string): Buffer =>
  Buffer.from(hkdfSync("sha256", Buffer.from(secret, "utf8"), Buffer.from(HkdfSalt), Buffer.from(HkdfInfo), 32))

/** A certificate chain and its private key, both PEM. */
export interface SharedCertificate {
  readonly cert: string
  readonly key: string
}

/** Why an entry read from the store cannot be used. */
export type SharedEntryProblem = "too large" | "malformed" | "another version" | "not decryptable with this cluster's secret"

/** The store's value for `name`: the chain in clear, the key sealed (base64 of IV, GCM tag and ciphertext). */
export const encodeSharedCertificate = (storeKey: Buffer, name: string, certificate: SharedCertificate): string | undefined => {
  const iv = randomBytes(IvBytes)
  const cipher = createCipheriv("aes-256-gcm", storeKey, iv)
  cipher.setAAD(Buffer.from(name, "utf8"))
  const sealed = Buffer.concat([cipher.update(certificate.key, "utf8"), cipher.final()])
  const value = JSON.stringify({
    v: SharedCertificateVersion,
    name,
    cert: certificate.cert,
    key: Buffer.concat([iv, cipher.getAuthTag(), sealed]).toString("base64")
  })
  return Buffer.byteLength(value) > MaxSharedCertificateBytes ? undefined : value
}

/** The certificate of a store value for `name`, or why it cannot be used. */
export const decodeSharedCertificate = (storeKey: Buffer, name: string, value: string): SharedCertificate | SharedEntryProblem => {
  if (Buffer.byteLength(value) > MaxSharedCertificateBytes) return "too large"
  let parsed: unknown
  try {
    parsed = JSON.parse(value)
  } catch {
    return "malformed"
  }
  if (typeof parsed !== "object" || parsed === null) return "malformed"
  const entry = parsed as { readonly v?: unknown; readonly name?: unknown; readonly cert?: unknown; readonly key?: unknown }
  if (entry.v !== SharedCertificateVersion) return "another version"
  if (entry.name !== name || typeof entry.cert !== "string" || typeof entry.key !== "string") return "malformed"
  const sealed = Buffer.from(entry.key, "base64")
  if (sealed.length <= IvBytes + TagBytes) return "malformed"
  try {
    const decipher = createDecipheriv("aes-256-gcm", storeKey, sealed.subarray(0, IvBytes))
    decipher.setAAD(Buffer.from(name, "utf8"))
    decipher.setAuthTag(sealed.subarray(IvBytes, IvBytes + TagBytes))
    const key = Buffer.concat([decipher.update(sealed.subarray(IvBytes + TagBytes)), decipher.final()]).toString("utf8")
    return { cert: entry.cert, key }
  } catch {
    return "not decryptable with this cluster's secret"
  }
}

/**
 * The channel on which the gateway ordering a name hands its pending challenge answers to the others,
 * since the CA's validation may reach any gateway of the cluster (behind a load balancer or DNS).
 */
export const ChallengesChannel = "switchyard:acme-challenges"
/** Prefix of the counters with which gateways acknowledge a challenge handed to them. */
export const ChallengeAckKeyPrefix = "switchyard:acme:challenge-ack:"
/** Largest challenge message sent or read (bytes). */
export const MaxChallengeMessageBytes = 16 * 1024
/** Longest wait of the ordering gateway for the others to acknowledge a challenge before the CA is told to validate. */
export const ChallengeAckWaitMs = 5 * 1000
/** Most challenge answers of other gateways kept at once; more are not kept. */
export const MaxSharedChallenges = 1_000

/** A pending challenge answer: HTTP-01 (its token and key authorization) or TLS-ALPN-01 (the name's validation certificate). */
export type SharedChallenge =
  | { readonly type: "http-01"; readonly token: string; readonly keyAuthorization: string }
  | { readonly type: "tls-alpn-01"; readonly name: string; readonly cert: string; readonly key: string }

/** A challenge handed to the others (`add`) or withdrawn once validated (`remove`), with its message id. */
export interface ChallengeMessage {
  readonly id: string
  readonly node: string
  readonly op: "add" | "remove"
  readonly challenge: SharedChallenge
}

const ChallengeAad = Buffer.from("switchyard acme challenge")

/** A challenge message, sealed whole (a TLS-ALPN-01 answer carries a private key); undefined when too large. */
export const encodeChallengeMessage = (storeKey: Buffer, message: ChallengeMessage): string | undefined => {
  const iv = randomBytes(IvBytes)
  const cipher = createCipheriv("aes-256-gcm", storeKey, iv)
  cipher.setAAD(ChallengeAad)
  const sealed = Buffer.concat([cipher.update(JSON.stringify(message), "utf8"), cipher.final()])
  const value = Buffer.concat([iv, cipher.getAuthTag(), sealed]).toString("base64")
  return value.length > MaxChallengeMessageBytes ? undefined : value
}

/** The challenge message of `value`, or undefined when it is too large, not sealed with this cluster's secret, or malformed. */
export const decodeChallengeMessage = (storeKey: Buffer, value: string): ChallengeMessage | undefined => {
  if (value.length > MaxChallengeMessageBytes) return undefined
  const sealed = Buffer.from(value, "base64")
  if (sealed.length <= IvBytes + TagBytes) return undefined
  try {
    const decipher = createDecipheriv("aes-256-gcm", storeKey, sealed.subarray(0, IvBytes))
    decipher.setAAD(ChallengeAad)
    decipher.setAuthTag(sealed.subarray(IvBytes, IvBytes + TagBytes))
    const parsed: unknown = JSON.parse(Buffer.concat([decipher.update(sealed.subarray(IvBytes + TagBytes)), decipher.final()]).toString("utf8"))
    if (typeof parsed !== "object" || parsed === null) return undefined
    const m = parsed as { id?: unknown; node?: unknown; op?: unknown; challenge?: { type?: unknown; token?: unknown; keyAuthorization?: unknown; name?: unknown; cert?: unknown; key?: unknown } }
    if (typeof m.id !== "string" || typeof m.node !== "string" || (m.op !== "add" && m.op !== "remove") || m.challenge === undefined) return undefined
    const c = m.challenge
    if (c.type === "http-01" && typeof c.token === "string" && typeof c.keyAuthorization === "string") {
      return { id: m.id, node: m.node, op: m.op, challenge: { type: "http-01", token: c.token, keyAuthorization: c.keyAuthorization } }
    }
    if (c.type === "tls-alpn-01" && typeof c.name === "string" && typeof c.cert === "string" && typeof c.key === "string") {
      return { id: m.id, node: m.node, op: m.op, challenge: { type: "tls-alpn-01", name: c.name, cert: c.cert, key: c.key } }
    }
    return undefined
  } catch {
    return undefined
  }
}
