import { describe, expect, it } from "@effect/vitest"
import { encodeFrameHeader } from "../../src/domain/WebSocketFrameHeader.ts"

describe("WebSocketFrameHeader", () => {
  it("writes each length form, FIN, opcode and the masking key (hex goldens)", () => {
    const key = Uint8Array.from([1, 2, 3, 4])
    expect(encodeFrameHeader(true, 2, 5, undefined).toString("hex")).toBe("8205")
    expect(encodeFrameHeader(false, 2, 125, key).toString("hex")).toBe("02fd01020304")
    expect(encodeFrameHeader(false, 0, 126, key).toString("hex")).toBe("00fe007e01020304")
    expect(encodeFrameHeader(true, 0, 65535, undefined).toString("hex")).toBe("807effff")
    expect(encodeFrameHeader(true, 0, 65536, key).toString("hex")).toBe("80ff000000000001000001020304")
    expect(encodeFrameHeader(false, 2, 2 ** 40 + 7, undefined).toString("hex")).toBe("027f0000010000000007")
  })
})
