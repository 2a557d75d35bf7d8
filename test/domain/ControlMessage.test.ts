import { assert, describe, it } from "@effect/vitest"
import { Redacted, Schema } from "effect"
import {
  ControlProtocolError,
  decodeControlReply,
  decodeControlRequest,
  decodeHello,
  decodeHelloReply,
  decodePreamble,
  encodeControlReply,
  encodeControlRequest,
  encodeHello,
  encodeHelloReply,
  encodePreamble,
  frame,
  FrameHeaderBytes,
  FrameReader,
  makeHello,
  MaxControlMessageBytes,
  MaxPreambleBytes,
  type Preamble,
  ProtocolVersion
} from "../../src/domain/ControlMessage.ts"

const hex = (bytes: Uint8Array) => Buffer.from(bytes).toString("hex")
const text = (bytes: Uint8Array) => Buffer.from(bytes).toString("utf8")

/** Feeds `bytes` one at a time and collects every frame body. */
const feedByteAtATime = (reader: FrameReader, bytes: Uint8Array): Array<Uint8Array> => {
  const out: Array<Uint8Array> = []
  for (let i = 0; i < bytes.length; i++) {
    const failed = reader.push(bytes.subarray(i, i + 1))
    if (failed) throw failed
    for (;;) {
      const next = reader.next()
      if (next === undefined) break
      if (next instanceof ControlProtocolError) throw next
      out.push(next)
    }
  }
  return out
}

describe("ControlMessage framing", () => {
  it("prefixes frames with a big-endian u32 length (golden)", () => {
    assert.strictEqual(hex(frame(new TextEncoder().encode("{}"))), "000000027b7d")
    assert.strictEqual(hex(frame(new Uint8Array(0))), "00000000")
  })

  it("encodes a preamble as length-prefixed JSON (golden)", () => {
    const preamble: Preamble = {
      _tag: "Preamble",
      listenerId: 1,
      protocol: "http",
      remoteAddress: "127.0.0.1",
      remotePort: 50000,
      localPort: 8000
    }
    const bytes = encodePreamble(preamble)
    const json = '{"_tag":"Preamble","listenerId":1,"protocol":"http","remoteAddress":"127.0.0.1","remotePort":50000,"localPort":8000}'
    assert.strictEqual(hex(bytes.subarray(0, FrameHeaderBytes)), json.length.toString(16).padStart(8, "0"))
    assert.strictEqual(text(bytes.subarray(FrameHeaderBytes)), json)
    assert.deepStrictEqual(decodePreamble(bytes.subarray(FrameHeaderBytes)), preamble)
  })

  it("writes the token in clear on the wire but never in logs", () => {
    const hello = makeHello(Redacted.make("s3cret"), [{ _tag: "Http", port: 8000, pathPrefix: "/a" }], "svc-a")
    const bytes = encodeHello(hello)
    assert.strictEqual(
      text(bytes.subarray(FrameHeaderBytes)),
      `{"_tag":"Hello","version":${ProtocolVersion},"token":"s3cret","listeners":[{"_tag":"Http","port":8000,"pathPrefix":"/a"}],"label":"svc-a"}`
    )
    const decoded = decodeHello(bytes.subarray(FrameHeaderBytes))
    assert.notInstanceOf(decoded, ControlProtocolError)
    const ok = decoded as Exclude<typeof decoded, ControlProtocolError>
    assert.strictEqual(Redacted.value(ok.token), "s3cret")
    assert.notInclude(String(ok.token), "s3cret")
    assert.notInclude(JSON.stringify(ok.token), "s3cret")
  })

  it("reads frames fed one byte at a time, and the bytes that follow them", () => {
    const welcome = encodeHelloReply({
      _tag: "Welcome",
      version: ProtocolVersion,
      sessionId: "s1",
      listeners: [{ listenerId: 7, route: { _tag: "Tcp", port: 2222 } }]
    })
    const request = encodeControlRequest({ _tag: "AddListener", requestId: 1, route: { _tag: "Http", port: 80 } })
    const trailing = Uint8Array.of(0, 1, 2)
    const all = new Uint8Array([...welcome, ...request])
    const reader = new FrameReader(MaxControlMessageBytes)
    const bodies = feedByteAtATime(reader, all)
    assert.strictEqual(bodies.length, 2)
    const reply = decodeHelloReply(bodies[0]!)
    assert.deepStrictEqual(reply, {
      _tag: "Welcome",
      version: ProtocolVersion,
      sessionId: "s1",
      listeners: [{ listenerId: 7, route: { _tag: "Tcp", port: 2222 } }]
    })
    assert.deepStrictEqual(decodeControlRequest(bodies[1]!), { _tag: "AddListener", requestId: 1, route: { _tag: "Http", port: 80 } })
    reader.push(trailing)
    assert.isUndefined(reader.next())
    assert.strictEqual(hex(reader.remainder()), "000102")
    assert.strictEqual(reader.bufferedBytes, 0)
  })

  it("reads several frames from one chunk and keeps what follows", () => {
    const one = encodeControlReply({ _tag: "ListenerRemoved", requestId: 2, listenerId: 3 })
    const two = encodeControlReply({ _tag: "ListenerRejected", requestId: 4, reason: "Conflict", message: "port 80 is tcp" })
    const reader = new FrameReader(MaxControlMessageBytes)
    reader.push(new Uint8Array([...one, ...two, 0xff]))
    const a = reader.next() as Uint8Array
    const b = reader.next() as Uint8Array
    assert.deepStrictEqual(decodeControlReply(a), { _tag: "ListenerRemoved", requestId: 2, listenerId: 3 })
    assert.deepStrictEqual(decodeControlReply(b), { _tag: "ListenerRejected", requestId: 4, reason: "Conflict", message: "port 80 is tcp" })
    assert.isUndefined(reader.next())
    assert.strictEqual(hex(reader.remainder()), "ff")
  })

  it("hands over another protocol's bytes behind the last frame, even when they read as a huge length", () => {
    const welcome = encodeHelloReply({ _tag: "Welcome", version: ProtocolVersion, sessionId: "s2", listeners: [] })
    // the HTTP/2 client preface starts "PRI " = 0x50524920, far beyond any frame limit
    const preface = new TextEncoder().encode("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    const reader = new FrameReader(MaxPreambleBytes)
    assert.isUndefined(reader.push(new Uint8Array([...welcome, ...preface])))
    const body = reader.next()
    assert.instanceOf(body, Uint8Array)
    assert.strictEqual(new TextDecoder().decode(reader.remainder()), "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
  })

  it("refuses an oversized length before buffering the body, and stays failed", () => {
    const reader = new FrameReader(MaxPreambleBytes)
    const header = new Uint8Array(4)
    new DataView(header.buffer).setUint32(0, MaxPreambleBytes + 1)
    const failed = reader.push(header)
    assert.instanceOf(failed, ControlProtocolError)
    assert.strictEqual(failed!.reason, "TooLarge")
    assert.strictEqual(reader.bufferedBytes, 0)
    assert.instanceOf(reader.next(), ControlProtocolError)
    assert.instanceOf(reader.push(Uint8Array.of(1)), ControlProtocolError)
  })

  it("treats an HTTP request on the control port as an oversized frame", () => {
    const reader = new FrameReader(MaxControlMessageBytes)
    const failed = reader.push(new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert.strictEqual(failed?.reason, "TooLarge")
  })

  it("reports bad JSON and bad messages with distinct reasons", () => {
    const notJson = decodeHello(new TextEncoder().encode("{nope"))
    assert.instanceOf(notJson, ControlProtocolError)
    assert.strictEqual((notJson as ControlProtocolError).reason, "BadJson")
    const notUtf8 = decodeHello(Uint8Array.of(0xff, 0xfe))
    assert.strictEqual((notUtf8 as ControlProtocolError).reason, "BadJson")
    const wrongShape = decodeHello(new TextEncoder().encode('{"_tag":"Hello","version":1,"token":"t","listeners":[{"_tag":"Http","port":0}]}'))
    assert.strictEqual((wrongShape as ControlProtocolError).reason, "BadMessage")
    assert.match((wrongShape as ControlProtocolError).message, /port/)
    const wrongTag = decodePreamble(new TextEncoder().encode('{"_tag":"Hello"}'))
    assert.strictEqual((wrongTag as ControlProtocolError).reason, "BadMessage")
  })

  it("refuses to encode a preamble larger than its limit", () => {
    assert.throws(() =>
      encodePreamble({
        _tag: "Preamble",
        listenerId: 1,
        protocol: "tcp",
        remoteAddress: "x".repeat(MaxPreambleBytes),
        remotePort: 1,
        localPort: 1
      })
    )
  })

  const PreambleArb = Schema.Struct({
    listenerId: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 2 ** 32 - 1 })),
    remoteAddress: Schema.String.check(Schema.isMaxLength(64)),
    remotePort: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 65_535 })),
    split: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 400 }))
  })

  it.prop("preambles survive encode, arbitrary split and decode", [PreambleArb], ([p]) => {
    const preamble: Preamble = {
      _tag: "Preamble",
      listenerId: p.listenerId,
      protocol: "tls-tcp",
      remoteAddress: p.remoteAddress,
      remotePort: p.remotePort,
      localPort: 443,
      serverName: "a.test"
    }
    const bytes = encodePreamble(preamble)
    const at = Math.min(p.split, bytes.length)
    const reader = new FrameReader(MaxPreambleBytes)
    reader.push(bytes.subarray(0, at))
    const early = reader.next()
    if (at < bytes.length) assert.isUndefined(early)
    reader.push(bytes.subarray(at))
    const body = early ?? reader.next()
    assert.deepStrictEqual(decodePreamble(body as Uint8Array), preamble)
  })
})
