import { assert, describe, it } from "@effect/vitest"
import {
  ClientPreface,
  encodeDataHeader,
  encodeFrame,
  encodeGoaway,
  encodeHeaders,
  encodePing,
  encodeRstStream,
  encodeSettings,
  encodeWindowUpdate,
  ErrorCode,
  Flag,
  FrameHeaderBytes,
  FrameType,
  Http2FrameError,
  Http2FrameParser
} from "../../src/domain/Http2Frame.ts"

interface Seen {
  readonly events: Array<string>
  readonly data: Map<number, Array<Buffer>>
  readonly parser: Http2FrameParser
}

const parser = (maxFrameBytes = 16_384, maxHeaderBlockBytes = 1024): Seen => {
  const events: Array<string> = []
  const data = new Map<number, Array<Buffer>>()
  const p = new Http2FrameParser({ maxFrameBytes, maxHeaderBlockBytes }, {
    dataStart: (id, flags, length) => events.push(`dataStart ${id} ${flags} ${length}`),
    data: (id, chunk) => {
      data.set(id, [...(data.get(id) ?? []), Buffer.from(chunk)])
    },
    dataEnd: (id, flags) => events.push(`dataEnd ${id} ${flags}`),
    headers: (id, flags, block) => events.push(`headers ${id} ${flags} ${block.toString("hex")}`),
    frame: (type, flags, id, payload) => events.push(`frame ${type} ${flags} ${id} ${payload.toString("hex")}`)
  })
  return { events, data, parser: p }
}

/** Feeds bytes one at a time (every split point) and returns the first error. */
const feedBytewise = (p: Http2FrameParser, bytes: Buffer): Http2FrameError | undefined => {
  for (let i = 0; i < bytes.length; i++) {
    const error = p.push(bytes.subarray(i, i + 1))
    if (error !== undefined) return error
  }
  return undefined
}

const padded = (id: number, payload: Buffer, pad: number, endStream: boolean): Buffer => {
  const body = Buffer.concat([Buffer.from([pad]), payload, Buffer.alloc(pad)])
  return encodeFrame(FrameType.DATA, Flag.PADDED | (endStream ? Flag.END_STREAM : 0), id, body)
}

describe("Http2Frame", () => {
  it("pins the wire numbers and the preface", () => {
    assert.strictEqual(ClientPreface.toString("latin1"), "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert.deepStrictEqual([FrameType.DATA, FrameType.HEADERS, FrameType.SETTINGS, FrameType.GOAWAY, FrameType.CONTINUATION], [0, 1, 4, 7, 9])
    assert.deepStrictEqual([ErrorCode.PROTOCOL_ERROR, ErrorCode.FLOW_CONTROL_ERROR, ErrorCode.REFUSED_STREAM, ErrorCode.CANCEL], [1, 3, 7, 8])
    assert.strictEqual(encodeWindowUpdate(3, 1000).toString("hex"), "000004080000000003000003e8")
    assert.strictEqual(encodeRstStream(5, 8).toString("hex"), "00000403000000000500000008")
    assert.strictEqual(encodeSettings([[4, 65535]]).toString("hex"), "000006040000000000000400" + "00ffff")
  })

  it("parses every frame kind whatever the read boundaries; DATA is streamed with its padding removed", () => {
    const bytes = Buffer.concat([
      encodeSettings([[3, 100], [4, 1 << 20]]),
      encodeHeaders(1, Buffer.from("8286", "hex"), false, 16_384),
      encodeDataHeader(1, 5, false),
      Buffer.from("hello"),
      padded(1, Buffer.from("world"), 7, true),
      encodePing(Buffer.from("12345678"), true),
      encodeFrame(0x42, 0, 0, Buffer.from("ignored")),
      encodeFrame(FrameType.PRIORITY, 0, 3, Buffer.alloc(5)),
      encodeGoaway(1, 0, "bye")
    ])
    for (const split of ["whole", "bytewise"] as const) {
      const seen = parser()
      const error = split === "whole" ? seen.parser.push(bytes) : feedBytewise(seen.parser, bytes)
      assert.isUndefined(error)
      assert.deepStrictEqual(seen.events, [
        "frame 4 0 0 000300000064000400100000",
        "headers 1 4 8286",
        "dataStart 1 0 5",
        "dataEnd 1 0",
        "dataStart 1 9 13",
        "dataEnd 1 9",
        "frame 6 1 0 3132333435363738",
        "frame 7 0 0 0000000100000000627965"
      ])
      assert.strictEqual(Buffer.concat(seen.data.get(1)!).toString(), "helloworld")
    }
  })

  it("joins HEADERS and CONTINUATION, with padding and priority removed", () => {
    const block = Buffer.from("0123456789abcdef", "hex")
    const first = Buffer.concat([Buffer.from([2]), Buffer.alloc(5), block.subarray(0, 3), Buffer.alloc(2)])
    const bytes = Buffer.concat([
      encodeFrame(FrameType.HEADERS, Flag.PADDED | Flag.PRIORITY | Flag.END_STREAM, 3, first),
      encodeFrame(FrameType.CONTINUATION, 0, 3, block.subarray(3, 5)),
      encodeFrame(FrameType.CONTINUATION, Flag.END_HEADERS, 3, block.subarray(5))
    ])
    const seen = parser()
    assert.isUndefined(feedBytewise(seen.parser, bytes))
    assert.deepStrictEqual(seen.events, [`headers 3 ${Flag.PADDED | Flag.PRIORITY | Flag.END_STREAM} ${block.toString("hex")}`])
    // what the encoder splits, the parser joins
    const big = Buffer.alloc(40_000, 7)
    const again = parser(16_384, 64 * 1024)
    assert.isUndefined(again.parser.push(encodeHeaders(5, big, true, 16_384)))
    assert.strictEqual(again.events.length, 1)
    assert.isTrue(again.events[0]!.startsWith(`headers 5 ${Flag.END_STREAM} 0707`), "the flags are the HEADERS frame's")
    assert.strictEqual(again.events[0]!.split(" ")[3]!.length, 80_000)
  })

  const refused = (bytes: Buffer, reason: Http2FrameError["reason"], code: number, limits?: { frame?: number; block?: number }) => {
    const seen = parser(limits?.frame, limits?.block)
    const error = seen.parser.push(bytes)
    assert.instanceOf(error, Http2FrameError)
    assert.strictEqual(error?.reason, reason)
    assert.strictEqual(error?.code, code)
    // dead after the first error
    assert.strictEqual(seen.parser.push(encodeSettings([])), error)
  }

  it("refuses frames that break the size rules", () => {
    refused(encodeDataHeader(1, 16_385, false), "FrameSize", ErrorCode.FRAME_SIZE_ERROR)
    refused(encodeFrame(FrameType.PING, 0, 0, Buffer.alloc(7)), "FrameSize", ErrorCode.FRAME_SIZE_ERROR)
    refused(encodeFrame(FrameType.SETTINGS, 0, 0, Buffer.alloc(5)), "FrameSize", ErrorCode.FRAME_SIZE_ERROR)
    refused(encodeFrame(FrameType.SETTINGS, Flag.ACK, 0, Buffer.alloc(6)), "FrameSize", ErrorCode.FRAME_SIZE_ERROR)
    refused(encodeFrame(FrameType.WINDOW_UPDATE, 0, 0, Buffer.alloc(3)), "FrameSize", ErrorCode.FRAME_SIZE_ERROR)
    refused(encodeFrame(FrameType.RST_STREAM, 0, 1, Buffer.alloc(8)), "FrameSize", ErrorCode.FRAME_SIZE_ERROR)
    refused(encodeFrame(FrameType.GOAWAY, 0, 0, Buffer.alloc(4)), "FrameSize", ErrorCode.FRAME_SIZE_ERROR)
    refused(encodeFrame(FrameType.PRIORITY, 0, 1, Buffer.alloc(4)), "FrameSize", ErrorCode.FRAME_SIZE_ERROR)
  })

  it("refuses frames on the wrong stream and broken header blocks", () => {
    refused(encodeDataHeader(0, 0, false), "Protocol", ErrorCode.PROTOCOL_ERROR)
    refused(encodeFrame(FrameType.HEADERS, Flag.END_HEADERS, 0, Buffer.from("82", "hex")), "Protocol", ErrorCode.PROTOCOL_ERROR)
    refused(encodePing(Buffer.alloc(8), false).fill(1, 5, 9), "Protocol", ErrorCode.PROTOCOL_ERROR)
    refused(encodeFrame(FrameType.CONTINUATION, Flag.END_HEADERS, 1, Buffer.from("82", "hex")), "Protocol", ErrorCode.PROTOCOL_ERROR)
    // another frame in the middle of a header block
    refused(Buffer.concat([encodeFrame(FrameType.HEADERS, 0, 1, Buffer.from("82", "hex")), encodePing(Buffer.alloc(8), false)]), "Protocol", ErrorCode.PROTOCOL_ERROR)
    // a CONTINUATION for another stream
    refused(
      Buffer.concat([encodeFrame(FrameType.HEADERS, 0, 1, Buffer.from("82", "hex")), encodeFrame(FrameType.CONTINUATION, Flag.END_HEADERS, 3, Buffer.from("82", "hex"))]),
      "Protocol",
      ErrorCode.PROTOCOL_ERROR
    )
    refused(padded(1, Buffer.from("x"), 0, false).fill(9, FrameHeaderBytes, FrameHeaderBytes + 1), "Protocol", ErrorCode.PROTOCOL_ERROR)
    // a header block beyond the limit, however it is split
    refused(
      Buffer.concat([encodeFrame(FrameType.HEADERS, 0, 1, Buffer.alloc(600)), encodeFrame(FrameType.CONTINUATION, 0, 1, Buffer.alloc(600))]),
      "HeaderBlockTooLarge",
      ErrorCode.ENHANCE_YOUR_CALM
    )
  })
})
