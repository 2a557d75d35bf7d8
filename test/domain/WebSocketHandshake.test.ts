/**
 * The opening handshake's rules: RFC 6455's own key and accept value, what a server accepts or refuses
 * (and with which status), and what a client checks in a 101 answer.
 */
import { assert, describe, it } from "@effect/vitest"
import {
  acceptResponse,
  acceptValue,
  checkUpgradeRequest,
  checkUpgradeResponse,
  newHandshakeKey,
  refusalResponse,
  upgradeRequestHeaders
} from "../../src/domain/WebSocketHandshake.ts"

const key = "dGhlIHNhbXBsZSBub25jZQ=="
const good = { upgrade: "websocket", connection: "Upgrade", "sec-websocket-key": key, "sec-websocket-version": "13" }

describe("WebSocket handshake", () => {
  it("RFC 6455 §1.3: the sample key's accept value", () => {
    assert.strictEqual(acceptValue(key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    assert.strictEqual(
      acceptResponse(key),
      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
  })

  it("a server accepts a well-formed upgrade, tokens in any case and in lists", () => {
    assert.deepStrictEqual(checkUpgradeRequest("GET", "1.1", good), { _tag: "Accept", key })
    assert.deepStrictEqual(checkUpgradeRequest("GET", "1.1", { ...good, upgrade: "WebSocket", connection: "keep-alive, upgrade" }), { _tag: "Accept", key })
  })

  it("a server refuses everything else, with 426 only for another version", () => {
    const refused = (method: string, version: string, headers: Record<string, string | Array<string> | undefined>) => {
      const c = checkUpgradeRequest(method, version, headers)
      return c._tag === "Refuse" ? c.status : 0
    }
    assert.strictEqual(refused("POST", "1.1", good), 400)
    assert.strictEqual(refused("GET", "1.0", good), 400)
    assert.strictEqual(refused("GET", "1.1", { ...good, upgrade: "h2c" }), 400)
    assert.strictEqual(refused("GET", "1.1", { ...good, connection: "close" }), 400)
    assert.strictEqual(refused("GET", "1.1", { ...good, "sec-websocket-version": "8" }), 426)
    assert.strictEqual(refused("GET", "1.1", { ...good, "sec-websocket-version": undefined }), 426)
    assert.strictEqual(refused("GET", "1.1", { ...good, "sec-websocket-key": undefined }), 400)
    assert.strictEqual(refused("GET", "1.1", { ...good, "sec-websocket-key": "short==" }), 400)
    assert.strictEqual(refused("GET", "1.1", { ...good, "sec-websocket-key": [key, key] }), 400)
    assert.match(refusalResponse(426, "no"), /^HTTP\/1\.1 426 Upgrade Required\r\n.*Sec-WebSocket-Version: 13\r\n/s)
  })

  it("a client sends a fresh 16-byte key and checks the answer", () => {
    const k = newHandshakeKey()
    assert.strictEqual(Buffer.from(k, "base64").length, 16)
    assert.notStrictEqual(newHandshakeKey(), k)
    assert.strictEqual(upgradeRequestHeaders(k)["Sec-WebSocket-Key"], k)
    const answer = { upgrade: "websocket", connection: "Upgrade", "sec-websocket-accept": acceptValue(k) }
    assert.isUndefined(checkUpgradeResponse(k, answer))
    assert.match(checkUpgradeResponse(k, { ...answer, "sec-websocket-accept": acceptValue(key) })!, /does not match/)
    assert.match(checkUpgradeResponse(k, { ...answer, upgrade: undefined })!, /Upgrade/)
    assert.match(checkUpgradeResponse(k, { ...answer, "sec-websocket-extensions": "permessage-deflate" })!, /extension/)
    assert.match(checkUpgradeResponse(k, { ...answer, "sec-websocket-protocol": "chat" })!, /subprotocol/)
  })
})
