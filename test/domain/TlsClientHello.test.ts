import { assert, describe, it } from "@effect/vitest"
import * as net from "node:net"
import * as tls from "node:tls"
import { MaxClientHelloBytes, readClientHello } from "../../src/domain/TlsClientHello.ts"

const hex = (s: string): Uint8Array => Buffer.from(s.replace(/\s+/g, ""), "hex")
const ascii = (s: string): string => Buffer.from(s, "ascii").toString("hex")

// One record: a ClientHello (TLS 1.2 layout) with one cipher suite and a server_name of example.com.
const helloBody = "0303" + "00".repeat(32) + "00" + "00021301" + "0100" +
  "0014" + "0000" + "0010" + "000e" + "00" + "000b" + ascii("example.com")
const golden = hex("160301" + "0043" + "01" + "00003f" + helloBody)

// The same ClientHello split across two handshake records (10 bytes, then the rest).
const handshake = "01" + "00003f" + helloBody
const splitAt = 10 * 2
const fragmented = hex(
  "160303" + "000a" + handshake.slice(0, splitAt) +
    "160303" + (handshake.length / 2 - 10).toString(16).padStart(4, "0") + handshake.slice(splitAt)
)

// Without extensions: no server name.
const noExtensions = hex("160301" + "002d" + "01" + "000029" + "0303" + "00".repeat(32) + "00" + "00021301" + "0100")

// With another extension (ALPN "h2") before the server name.
const alpnThenSni = hex(
  "160301" + "004c" + "01" + "000048" + "0303" + "00".repeat(32) + "00" + "00021301" + "0100" +
    "001d" + "0010" + "0005" + "0003" + "02" + ascii("h2") +
    "0000" + "0010" + "000e" + "00" + "000b" + ascii("Example.COM")
)

describe("readClientHello", () => {
  it("reads the server name of a one-record ClientHello (golden)", () => {
    assert.strictEqual(golden.length, 72)
    assert.deepStrictEqual(readClientHello(golden), { _tag: "ClientHello", serverName: "example.com", bytes: 72 })
  })

  it("is incomplete on every proper prefix, byte at a time", () => {
    for (let n = 0; n < golden.length; n++) {
      // the record header first, then the whole record
      assert.deepStrictEqual(readClientHello(golden.subarray(0, n)), { _tag: "Incomplete", needed: n < 5 ? 5 : 72 }, `prefix of ${n} bytes`)
    }
  })

  it("joins a ClientHello split across handshake records, byte at a time", () => {
    for (let n = 0; n < fragmented.length; n++) {
      assert.strictEqual(readClientHello(fragmented.subarray(0, n))._tag, "Incomplete", `prefix of ${n} bytes`)
    }
    assert.deepStrictEqual(readClientHello(fragmented), { _tag: "ClientHello", serverName: "example.com", bytes: fragmented.length })
  })

  it("reads no name from a ClientHello without extensions", () => {
    assert.deepStrictEqual(readClientHello(noExtensions), { _tag: "ClientHello", serverName: "", bytes: noExtensions.length })
  })

  it("skips other extensions and lowercases the name", () => {
    assert.deepStrictEqual(readClientHello(alpnThenSni), { _tag: "ClientHello", serverName: "example.com", bytes: alpnThenSni.length })
  })

  it("ignores bytes after the ClientHello (the client's next records)", () => {
    const more = Buffer.concat([golden, hex("140303000101")])
    assert.deepStrictEqual(readClientHello(more), { _tag: "ClientHello", serverName: "example.com", bytes: 72 })
  })

  it("refuses what is not a ClientHello", () => {
    assert.strictEqual(readClientHello(Buffer.from("GET / HTTP/1.1\r\n"))._tag, "Malformed")
    // a handshake record whose message is a ServerHello (type 2)
    assert.strictEqual(readClientHello(hex("160303000402000000"))._tag, "Malformed")
    // a record version that is not 3.x
    assert.strictEqual(readClientHello(hex("160201000401000000"))._tag, "Malformed")
    // extensions whose length overruns the message
    const broken = Buffer.from(golden)
    broken[5 + 4 + 2 + 32 + 1 + 4 + 2] = 0x7f
    assert.strictEqual(readClientHello(broken)._tag, "Malformed")
    // a server name with a byte no host name has
    const odd = Buffer.from(golden)
    odd[odd.length - 1] = 0x2f
    assert.strictEqual(readClientHello(odd)._tag, "Malformed")
  })

  it("says TooLarge once the limit is read without a whole ClientHello", () => {
    // a ClientHello announcing 20,000 bytes, spread over records
    const records = Buffer.concat([
      hex("160303" + "0004" + "01" + "004e20"),
      ...Array.from({ length: 20 }, () => Buffer.concat([hex("16030303e8"), Buffer.alloc(1_000)]))
    ])
    // incomplete until the first record's handshake header says how long the ClientHello is, too large from then on
    for (let n = 0; n < 9; n++) assert.strictEqual(readClientHello(records.subarray(0, n))._tag, "Incomplete")
    for (let n = 9; n < MaxClientHelloBytes; n += 997) assert.strictEqual(readClientHello(records.subarray(0, n))._tag, "TooLarge")
    assert.deepStrictEqual(readClientHello(records), { _tag: "TooLarge", limit: MaxClientHelloBytes })
    assert.deepStrictEqual(readClientHello(golden, 40), { _tag: "TooLarge", limit: 40 })
  })

  it("reads the server name of the ClientHello Node's TLS client sends", async () => {
    const got = await new Promise<Buffer>((resolve, reject) => {
      const chunks: Array<Buffer> = []
      const server = net.createServer((socket) => {
        socket.on("data", (chunk: Buffer) => {
          chunks.push(chunk)
          const all = Buffer.concat(chunks)
          if (readClientHello(all)._tag !== "Incomplete") {
            socket.destroy()
            server.close()
            resolve(all)
          }
        })
      })
      const timer = setTimeout(() => reject(new Error("no ClientHello within 5 s")), 5_000)
      server.listen(0, "127.0.0.1", () => {
        const port = (server.address() as net.AddressInfo).port
        const client = tls.connect({ host: "127.0.0.1", port, servername: "api.example.org", ALPNProtocols: ["h2", "http/1.1"] })
        client.on("error", () => {})
        client.on("close", () => clearTimeout(timer))
      })
    })
    const read = readClientHello(got)
    assert.strictEqual(read._tag, "ClientHello")
    if (read._tag === "ClientHello") assert.strictEqual(read.serverName, "api.example.org")
    for (let n = 0; n < (read._tag === "ClientHello" ? read.bytes : 0); n++) {
      assert.strictEqual(readClientHello(got.subarray(0, n))._tag, "Incomplete")
    }
  })
})
