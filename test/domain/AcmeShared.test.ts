import { assert, describe, it } from "@effect/vitest"
import { generateKeyPairSync } from "node:crypto"
import {
  decodeChallengeMessage,
  decodeSharedCertificate,
  deriveStoreKey,
  encodeChallengeMessage,
  encodeSharedCertificate,
  lockPollMs,
  lockRenewEveryMs,
  MaxChallengeMessageBytes,
  MaxLockPollMs,
  MaxSharedCertificateBytes
} from "../../src/domain/AcmeShared.ts"

const key = generateKeyPairSync("ec", { namedCurve: "prime256v1" }).privateKey.export({ type: "pkcs8", format: "pem" }).toString()
const certificate = { cert: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", key }
const storeKey = deriveStoreKey("a-cluster-secret-of-enough-length")

describe("AcmeShared", () => {
  it("seals the private key with the cluster's secret: the value holds the chain, never the key in clear; it opens with the same secret", () => {
    const value = encodeSharedCertificate(storeKey, "app.test", certificate)!
    assert.include(value, "BEGIN CERTIFICATE")
    assert.notInclude(value, "PRIVATE KEY")
    assert.notInclude(value, key.split("\n")[1]!)
    assert.deepStrictEqual(decodeSharedCertificate(storeKey, "app.test", value), certificate)
    // a fresh IV each time
    assert.notStrictEqual(encodeSharedCertificate(storeKey, "app.test", certificate), value)
  })

  it("another secret, another name, a changed byte or an oversized value are refused", () => {
    const value = encodeSharedCertificate(storeKey, "app.test", certificate)!
    assert.strictEqual(decodeSharedCertificate(deriveStoreKey("another-secret-of-enough-length"), "app.test", value), "not decryptable with this cluster's secret")
    assert.strictEqual(decodeSharedCertificate(storeKey, "other.test", value), "malformed")
    const entry = JSON.parse(value) as { key: string }
    const sealed = Buffer.from(entry.key, "base64")
    sealed[sealed.length - 1] ^= 1
    const tampered = JSON.stringify({ ...JSON.parse(value), key: sealed.toString("base64") })
    assert.strictEqual(decodeSharedCertificate(storeKey, "app.test", tampered), "not decryptable with this cluster's secret")
    // the entry claims another name: the name is bound to the key's encryption as well
    const moved = JSON.stringify({ ...JSON.parse(value), name: "other.test" })
    assert.strictEqual(decodeSharedCertificate(storeKey, "other.test", moved), "not decryptable with this cluster's secret")
    assert.strictEqual(decodeSharedCertificate(storeKey, "app.test", "x".repeat(MaxSharedCertificateBytes + 1)), "too large")
    assert.strictEqual(decodeSharedCertificate(storeKey, "app.test", "{"), "malformed")
    assert.strictEqual(decodeSharedCertificate(storeKey, "app.test", JSON.stringify({ ...JSON.parse(value), v: 2 })), "another version")
    assert.isUndefined(encodeSharedCertificate(storeKey, "app.test", { cert: "x".repeat(MaxSharedCertificateBytes), key }))
  })

  it("challenge messages are sealed whole and bounded", () => {
    const message = { id: "1", node: "g1", op: "add" as const, challenge: { type: "tls-alpn-01" as const, name: "app.test", cert: certificate.cert, key } }
    const value = encodeChallengeMessage(storeKey, message)!
    assert.notInclude(Buffer.from(value, "base64").toString("latin1"), "PRIVATE KEY")
    assert.deepStrictEqual(decodeChallengeMessage(storeKey, value), message)
    assert.isUndefined(decodeChallengeMessage(deriveStoreKey("another-secret-of-enough-length"), value))
    assert.isUndefined(decodeChallengeMessage(storeKey, "A".repeat(MaxChallengeMessageBytes + 1)))
    const http = { id: "2", node: "g2", op: "remove" as const, challenge: { type: "http-01" as const, token: "abc", keyAuthorization: "abc.def" } }
    assert.deepStrictEqual(decodeChallengeMessage(storeKey, encodeChallengeMessage(storeKey, http)!), http)
    assert.isUndefined(encodeChallengeMessage(storeKey, { ...message, challenge: { ...message.challenge, cert: "x".repeat(MaxChallengeMessageBytes) } }))
  })

  it("the lock is renewed three times per lease; a waiting gateway looks twice per lease, at most every MaxLockPollMs", () => {
    assert.strictEqual(lockRenewEveryMs(60_000), 20_000)
    assert.strictEqual(lockPollMs(2_000), 1_000)
    assert.strictEqual(lockPollMs(60_000), MaxLockPollMs)
  })
})
