import { assert, describe, it } from "@effect/vitest"
import { createHmac } from "node:crypto"
import {
  decodeRelayChallenge,
  decodeRelayHello,
  decodeRelayProof,
  encodeRelayChallenge,
  encodeRelayHello,
  encodeRelayProof,
  MaxRelayHandshakeBytes,
  proofMatches,
  type RelayOpening,
  relayProof,
  RelayProofBytes,
  RelayVersion
} from "../../src/domain/ClusterRelay.ts"
import { ControlProtocolError } from "../../src/domain/ControlMessage.ts"

const nonceA = Buffer.alloc(32, 0xa1).toString("base64url")
const nonceB = Buffer.alloc(32, 0xb2).toString("base64url")
const opening: RelayOpening = { dialerNode: "g2", dialerNonce: nonceA, listenerNode: "g1", listenerNonce: nonceB }
const secret = "a-cluster-secret-of-length"

describe("ClusterRelay", () => {
  it("pins the numbers and the proof's construction", () => {
    assert.strictEqual(RelayVersion, 1)
    assert.strictEqual(MaxRelayHandshakeBytes, 1024)
    assert.strictEqual(RelayProofBytes, 32)
    const expected = createHmac("sha256", secret).update(`switchyard-relay/1\ndialer\n${nonceA}\n${nonceB}\ng2\ng1`).digest("base64url")
    assert.strictEqual(relayProof(secret, "dialer", opening), expected)
  })

  it("a proof holds only for its secret, its role, both nonces and both nodes", () => {
    const proof = relayProof(secret, "dialer", opening)
    assert.isTrue(proofMatches(secret, "dialer", opening, proof))
    assert.isFalse(proofMatches("another-secret-of-length", "dialer", opening, proof))
    // the listener's proof cannot be sent back as the dialer's
    assert.isFalse(proofMatches(secret, "listener", opening, proof))
    // a proof recorded on one connection is worthless on another: the listener's nonce differs
    assert.isFalse(proofMatches(secret, "dialer", { ...opening, listenerNonce: Buffer.alloc(32, 0xc3).toString("base64url") }, proof))
    assert.isFalse(proofMatches(secret, "dialer", { ...opening, dialerNode: "g3" }, proof))
    // truncated, extended or empty proofs are refused without throwing
    assert.isFalse(proofMatches(secret, "dialer", opening, proof.slice(0, 20)))
    assert.isFalse(proofMatches(secret, "dialer", opening, proof + "AAAA"))
    assert.isFalse(proofMatches(secret, "dialer", opening, ""))
  })

  it("encodes and decodes the opening messages, framed, and refuses what is not one", () => {
    const hello = encodeRelayHello({ _tag: "RelayHello", v: 1, node: "g2", nonce: nonceA })
    assert.strictEqual(new DataView(hello.buffer, hello.byteOffset).getUint32(0), hello.length - 4)
    assert.deepStrictEqual(decodeRelayHello(hello.subarray(4)), { _tag: "RelayHello", v: 1, node: "g2", nonce: nonceA })
    const challenge = encodeRelayChallenge({ _tag: "RelayChallenge", node: "g1", nonce: nonceB, proof: relayProof(secret, "listener", opening) })
    assert.strictEqual((decodeRelayChallenge(challenge.subarray(4)) as { node: string }).node, "g1")
    const proof = encodeRelayProof({ _tag: "RelayProof", proof: relayProof(secret, "dialer", opening) })
    assert.isFalse(decodeRelayProof(proof.subarray(4)) instanceof ControlProtocolError)
    const bad = [
      JSON.stringify({ _tag: "RelayHello", v: 2, node: "g2", nonce: nonceA }),
      JSON.stringify({ _tag: "RelayHello", v: 1, node: "g 2", nonce: nonceA }),
      JSON.stringify({ _tag: "RelayHello", v: 1, node: "g2", nonce: "short" }),
      "{",
      JSON.stringify({ _tag: "RelayProof", proof: nonceA })
    ]
    for (const text of bad) assert.instanceOf(decodeRelayHello(new TextEncoder().encode(text)), ControlProtocolError, text)
  })
})
