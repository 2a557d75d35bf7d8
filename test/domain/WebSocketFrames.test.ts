/**
 * The WebSocket frame decoder: RFC 6455's own examples as hex goldens, every input fed whole, byte at
 * a time and in random splits (the events must not change), fragmentation with control frames between
 * fragments, masked and unmasked frames by role, each rule a receiver enforces (with its close code),
 * the message limit (1009), holding between events, and random frame sequences against an
 * independent encoder written here from the RFC.
 */
import { assert, describe, it } from "@effect/vitest"
import { Schema } from "effect"
import { encodeClosePayload, readClosePayload } from "../../src/domain/WebSocketClose.ts"
import { encodeFrameHeader } from "../../src/domain/WebSocketFrameHeader.ts"
import { FrameDecoder, type FrameEvents, Opcode } from "../../src/domain/WebSocketFrames.ts"

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ""), "hex")

const unmask = (data: Buffer, key: Buffer): void => {
  for (let i = 0; i < data.length; i++) data[i] = data[i]! ^ key[i & 3]!
}

/** What a decoder handed over, with adjacent payload merged (splits of the input must not show). */
interface Decoded {
  readonly events: Array<string>
  readonly violation: string | undefined
}

const recorder = (log: Array<string>): FrameEvents => ({
  messageStart: (binary) => log.push(binary ? "binary" : "text"),
  messageData: (payload) => {
    const last = log[log.length - 1]
    if (last !== undefined && last.startsWith("data:")) log[log.length - 1] = last + payload.toString("hex")
    else log.push(`data:${payload.toString("hex")}`)
  },
  messageEnd: () => log.push("end"),
  control: (opcode, payload) => log.push(`control:${opcode}:${payload.toString("hex")}`)
})

/** Decodes `input` fed in pieces cut at `cuts` (offsets); copies, since payload is unmasked in place. */
const decode = (input: Buffer, cuts: ReadonlyArray<number>, options: { masked: boolean; max?: number }): Decoded => {
  const decoder = new FrameDecoder({ maxMessageBytes: options.max ?? 1 << 20, expectMasked: options.masked, unmask })
  const events: Array<string> = []
  const sink = recorder(events)
  const copy = Buffer.from(input)
  const points = [...new Set(cuts.filter((c) => c > 0 && c < copy.length))].sort((a, b) => a - b)
  let from = 0
  for (const to of [...points, copy.length]) {
    const taken = decoder.read(copy.subarray(from, to), sink)
    if (decoder.failed !== undefined) break
    assert.strictEqual(taken, to - from)
    from = to
  }
  const v = decoder.failed
  return { events, violation: v === undefined ? undefined : `${v.code}` }
}

const everyByte = (n: number): Array<number> => Array.from({ length: n }, (_, i) => i)

/** The same events whole, byte at a time, and split in two everywhere. */
const decodesAlike = (input: Buffer, options: { masked: boolean; max?: number }): Decoded => {
  const whole = decode(input, [], options)
  assert.deepStrictEqual(decode(input, everyByte(input.length), options), whole, "byte at a time")
  for (let cut = 1; cut < Math.min(input.length, 40); cut++) assert.deepStrictEqual(decode(input, [cut], options), whole, `split at ${cut}`)
  return whole
}

/** An independent frame encoder, straight from RFC 6455 §5.2. */
const frame = (fin: boolean, opcode: number, payload: Buffer, key?: Buffer, rsv = 0): Buffer => {
  const len = payload.length
  const ext = len < 126 ? Buffer.alloc(0) : len < 65536 ? Buffer.from([len >> 8, len & 0xff]) : (() => {
    const b = Buffer.alloc(8)
    b.writeBigUInt64BE(BigInt(len))
    return b
  })()
  const b0 = (fin ? 0x80 : 0) | (rsv << 4) | opcode
  const b1 = (key === undefined ? 0 : 0x80) | (len < 126 ? len : len < 65536 ? 126 : 127)
  const body = Buffer.from(payload)
  if (key !== undefined) for (let i = 0; i < body.length; i++) body[i] = body[i]! ^ key[i & 3]!
  return Buffer.concat([Buffer.from([b0, b1]), ext, key ?? Buffer.alloc(0), body])
}

describe("FrameDecoder goldens (RFC 6455 §5.7)", () => {
  it("a single-frame unmasked text message", () => {
    const d = decodesAlike(hex("81 05 48 65 6c 6c 6f"), { masked: false })
    assert.deepStrictEqual(d, { events: ["text", "data:48656c6c6f", "end"], violation: undefined })
  })

  it("a single-frame masked text message", () => {
    const d = decodesAlike(hex("81 85 37 fa 21 3d 7f 9f 4d 51 58"), { masked: true })
    assert.deepStrictEqual(d.events, ["text", "data:48656c6c6f", "end"])
  })

  it("a fragmented unmasked text message", () => {
    const d = decodesAlike(hex("01 03 48 65 6c 80 02 6c 6f"), { masked: false })
    assert.deepStrictEqual(d.events, ["text", "data:48656c6c6f", "end"])
  })

  it("an unmasked ping and a masked pong", () => {
    assert.deepStrictEqual(decodesAlike(hex("89 05 48 65 6c 6c 6f"), { masked: false }).events, ["control:9:48656c6c6f"])
    assert.deepStrictEqual(decodesAlike(hex("8a 85 37 fa 21 3d 7f 9f 4d 51 58"), { masked: true }).events, ["control:10:48656c6c6f"])
  })

  it("256 bytes in the 16-bit length form, 64 KiB in the 64-bit form", () => {
    const p256 = Buffer.alloc(256, 7)
    assert.deepStrictEqual(decodesAlike(Buffer.concat([hex("82 7e 01 00"), p256]), { masked: false }).events, ["binary", `data:${p256.toString("hex")}`, "end"])
    const p64k = Buffer.alloc(65536, 9)
    const d = decode(Buffer.concat([hex("82 7f 00 00 00 00 00 01 00 00"), p64k]), [3, 10, 11, 40000], { masked: false })
    assert.deepStrictEqual(d.events, ["binary", `data:${p64k.toString("hex")}`, "end"])
  })

  it("the header switchyard writes is the header the decoder reads", () => {
    const key = hex("01 02 03 04")
    for (const len of [0, 1, 125, 126, 65535, 65536, 70000]) {
      const payload = Buffer.alloc(len, 0x5a)
      const masked = Buffer.from(payload)
      unmask(masked, key)
      const wire = Buffer.concat([encodeFrameHeader(true, Opcode.Binary, len, key), masked])
      assert.deepStrictEqual(wire, frame(true, Opcode.Binary, payload, key), `length ${len}`)
      const d = decode(wire, [1, 2, 5, 9], { masked: true })
      assert.deepStrictEqual(d.events, len === 0 ? ["binary", "end"] : ["binary", `data:${payload.toString("hex")}`, "end"])
    }
  })
})

describe("FrameDecoder messages", () => {
  it("control frames between the fragments of a message are handed over where they stand", () => {
    const key = hex("aa bb cc dd")
    const input = Buffer.concat([
      frame(false, Opcode.Binary, Buffer.from("one"), key),
      frame(true, Opcode.Ping, Buffer.from("p1"), key),
      frame(false, Opcode.Continuation, Buffer.alloc(0), key),
      frame(true, Opcode.Pong, Buffer.alloc(0), key),
      frame(true, Opcode.Continuation, Buffer.from("two"), key),
      frame(true, Opcode.Text, Buffer.from("x"), key)
    ])
    const d = decodesAlike(input, { masked: true })
    assert.deepStrictEqual(d.events, [
      "binary",
      "data:6f6e65",
      "control:9:7031",
      "control:10:",
      "data:74776f",
      "end",
      "text",
      "data:78",
      "end"
    ])
  })

  it("an empty message, and the all-zero key (payload as sent)", () => {
    const zero = Buffer.alloc(4)
    const d = decodesAlike(Buffer.concat([frame(true, Opcode.Binary, Buffer.alloc(0), zero), frame(true, Opcode.Binary, Buffer.from("ab"), zero)]), { masked: true })
    assert.deepStrictEqual(d.events, ["binary", "end", "binary", "data:6162", "end"])
  })

  it("holds after an event, hands the rest over on release, and takes no more while held", () => {
    const input = Buffer.concat([frame(true, Opcode.Binary, Buffer.from("abc")), frame(true, Opcode.Ping, Buffer.from("x")), frame(true, Opcode.Binary, Buffer.from("de"))])
    const decoder = new FrameDecoder({ maxMessageBytes: 100, expectMasked: false, unmask })
    const log: Array<string> = []
    const base = recorder(log)
    let holdAfterData = true
    const sink: FrameEvents = {
      ...base,
      messageData: (p) => {
        base.messageData(p)
        if (holdAfterData) decoder.hold()
      }
    }
    const taken = decoder.read(input, sink)
    assert.strictEqual(taken, 5)
    assert.deepStrictEqual(log, ["binary", "data:616263"])
    assert.strictEqual(decoder.read(input.subarray(taken), sink), 0, "held: nothing taken")
    holdAfterData = false
    decoder.release()
    assert.strictEqual(decoder.read(input.subarray(taken), sink), input.length - taken)
    assert.deepStrictEqual(log, ["binary", "data:616263", "end", "control:9:78", "binary", "data:6465", "end"])
  })
})

describe("FrameDecoder violations", () => {
  const cases: ReadonlyArray<readonly [string, Buffer, boolean, string]> = [
    ["reserved bit 1", frame(true, Opcode.Binary, Buffer.from("a"), undefined, 4), false, "1002"],
    ["reserved bits 2 and 3", frame(true, Opcode.Text, Buffer.from("a"), undefined, 3), false, "1002"],
    ["reserved data opcode 3", frame(true, 3, Buffer.from("a")), false, "1002"],
    ["reserved control opcode 11", frame(true, 11, Buffer.alloc(0)), false, "1002"],
    ["a fragmented ping", frame(false, Opcode.Ping, Buffer.alloc(0)), false, "1002"],
    ["a 126-byte ping", frame(true, Opcode.Ping, Buffer.alloc(126)), false, "1002"],
    ["a continuation outside a message", frame(true, Opcode.Continuation, Buffer.from("a")), false, "1002"],
    ["a new message mid-message", Buffer.concat([frame(false, Opcode.Binary, Buffer.from("a")), frame(true, Opcode.Text, Buffer.from("b"))]), false, "1002"],
    ["an unmasked frame from a client", frame(true, Opcode.Binary, Buffer.from("a")), true, "1002"],
    ["a masked frame from a server", frame(true, Opcode.Binary, Buffer.from("a"), hex("01020304")), false, "1002"],
    ["a 64-bit length with its top bit set", hex("82 7f 80 00 00 00 00 00 00 01"), false, "1002"]
  ]
  for (const [name, input, masked, code] of cases) {
    it(`${name}: ${code}, and nothing of the frame is handed over`, () => {
      const d = decodesAlike(input, { masked })
      assert.strictEqual(d.violation, code)
      assert.isFalse(d.events.some((e) => e.startsWith("data:") && e !== "data:61"), "no payload of the bad frame")
    })
  }

  it("a message over the limit is 1009 at the header that crosses it, across frames too", () => {
    assert.strictEqual(decodesAlike(frame(true, Opcode.Binary, Buffer.alloc(11)), { masked: false, max: 10 }).violation, "1009")
    assert.strictEqual(decodesAlike(frame(true, Opcode.Binary, Buffer.alloc(10)), { masked: false, max: 10 }).violation, undefined)
    const split = Buffer.concat([frame(false, Opcode.Binary, Buffer.alloc(6)), frame(true, Opcode.Continuation, Buffer.alloc(5))])
    const d = decodesAlike(split, { masked: false, max: 10 })
    assert.strictEqual(d.violation, "1009")
    assert.deepStrictEqual(d.events, ["binary", `data:${"00".repeat(6)}`])
    // a length of 2^62 is refused at once, never waited for
    assert.strictEqual(decode(hex("82 7f 40 00 00 00 00 00 00 00"), [], { masked: false }).violation, "1009")
    // control frames do not count toward the message
    const withPing = Buffer.concat([frame(false, Opcode.Binary, Buffer.alloc(6)), frame(true, Opcode.Ping, Buffer.alloc(100)), frame(true, Opcode.Continuation, Buffer.alloc(4))])
    assert.strictEqual(decodesAlike(withPing, { masked: false, max: 10 }).violation, undefined)
  })
})

describe("close frame payloads", () => {
  it("reads codes and reasons, and refuses what RFC 6455 §7.4 forbids", () => {
    assert.deepStrictEqual(readClosePayload(Buffer.alloc(0)), { _tag: "Close", code: 1005, reason: "" })
    assert.deepStrictEqual(readClosePayload(encodeClosePayload(1000, "bye")), { _tag: "Close", code: 1000, reason: "bye" })
    assert.deepStrictEqual(readClosePayload(hex("0f a0")), { _tag: "Close", code: 4000, reason: "" })
    assert.strictEqual(readClosePayload(hex("03")).code, 1002)
    for (const code of [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000]) {
      const p = Buffer.alloc(2)
      p.writeUInt16BE(code)
      assert.strictEqual(readClosePayload(p)._tag, "Invalid", `code ${code}`)
    }
    assert.deepStrictEqual(readClosePayload(hex("03 e8 ff fe")), { _tag: "Invalid", code: 1007, message: "websocket: a close reason that is not UTF-8" })
    // a reason is cut to fit the 125-byte control frame
    assert.isAtMost(encodeClosePayload(1011, "é".repeat(200)).length, 125)
  })
})

describe("FrameDecoder against random frame sequences", () => {
  const Message = Schema.Struct({
    binary: Schema.Boolean,
    parts: Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 300 }))).check(Schema.isBetweenLength(1, 4)),
    pingAfter: Schema.Array(Schema.Boolean)
  })
  it.prop(
    "every message and control frame comes out in order, however the input is cut",
    {
      messages: Schema.Array(Message).check(Schema.isBetweenLength(1, 6)),
      masked: Schema.Boolean,
      cuts: Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 4000 })))
    },
    ({ messages, masked, cuts }) => {
      const frames: Array<Buffer> = []
      const expected: Array<string> = []
      let seed = 1
      const key = () => (masked ? Buffer.from([seed * 7 & 0xff, seed * 13 & 0xff, seed * 17 & 0xff, seed++ & 0xff]) : undefined)
      for (const m of messages) {
        expected.push(m.binary ? "binary" : "text")
        let data = ""
        m.parts.forEach((n, i) => {
          const payload = Buffer.alloc(n, (seed + i) & 0xff)
          frames.push(frame(i === m.parts.length - 1, i === 0 ? (m.binary ? Opcode.Binary : Opcode.Text) : Opcode.Continuation, payload, key()))
          if (n > 0) {
            data += payload.toString("hex")
            if (expected[expected.length - 1]!.startsWith("data:")) expected[expected.length - 1] += payload.toString("hex")
            else expected.push(`data:${payload.toString("hex")}`)
          }
          if (m.pingAfter[i] === true && i < m.parts.length - 1) {
            frames.push(frame(true, Opcode.Ping, Buffer.from([i]), key()))
            expected.push(`control:9:${Buffer.from([i]).toString("hex")}`)
          }
        })
        void data
        expected.push("end")
      }
      const input = Buffer.concat(frames)
      const d = decode(input, cuts, { masked })
      assert.strictEqual(d.violation, undefined)
      assert.deepStrictEqual(d.events, expected)
    },
    { arbitrary: { runs: 300 } }
  )

  it.prop(
    "random bytes never throw: the decoder takes them or stops with 1002/1009",
    { bytes: Schema.Uint8Array, masked: Schema.Boolean },
    ({ bytes, masked }) => {
      const d = decode(Buffer.from(bytes), everyByte(bytes.length), { masked, max: 1000 })
      assert.include([undefined, "1002", "1009"], d.violation)
    },
    { arbitrary: { runs: 500 } }
  )
})
