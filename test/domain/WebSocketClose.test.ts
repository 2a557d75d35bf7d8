import { assert, describe, it } from "@effect/vitest"
import { CloseCode, closeError, closeReason, isCleanClose, MaxCloseReasonBytes } from "../../src/domain/WebSocketClose.ts"

describe("WebSocketClose", () => {
  it("pins the close codes (RFC 6455 §7.4.1)", () => {
    assert.deepStrictEqual(CloseCode, {
      Normal: 1000,
      GoingAway: 1001,
      ProtocolError: 1002,
      UnsupportedData: 1003,
      NoStatus: 1005,
      Abnormal: 1006,
      InvalidPayload: 1007,
      PolicyViolation: 1008,
      TooLarge: 1009,
      InternalError: 1011,
      TryAgainLater: 1013
    })
  })

  it("1000 and 1005 are clean; the others are typed errors with their code", () => {
    assert.isTrue(isCleanClose(1000) && isCleanClose(1005))
    assert.isUndefined(closeError(1000, ""))
    const tooLarge = closeError(1009, "Max payload size exceeded")
    assert.strictEqual(tooLarge?.reason, "TooLarge")
    assert.strictEqual(tooLarge?.code, 1009)
    assert.match(tooLarge!.message, /1009 \(TooLarge\): Max payload size exceeded/)
    assert.strictEqual(closeError(4321, "")?.reason, "OtherCode")
    assert.strictEqual(closeError(1006, "")?.reason, "Abnormal")
  })

  it("close reasons are cut to fit a control frame, by UTF-8 bytes", () => {
    assert.strictEqual(closeReason("short"), "short")
    const long = "é".repeat(200)
    const cut = closeReason(long)
    assert.isAtMost(new TextEncoder().encode(cut).length, MaxCloseReasonBytes)
    assert.isTrue(long.startsWith(cut) && cut.length > 50)
  })
})
