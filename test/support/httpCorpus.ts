/**
 * A seeded generator of HTTP/1.1 request messages for differential parsing: well-formed requests built
 * from a small grammar (request line, fields, a body framed by Content-Length, chunked coding or nothing),
 * then, for most messages, mutations in the classic request-smuggling shapes (CL.TE, TE.CL, TE.TE
 * obfuscations, obs-fold, bare LF/CR, NUL, chunk-size tricks, duplicated fields, Connection nominations).
 * Pure: the same seed gives the same messages. It does not decide what is valid; the parsers do.
 */

/** A small, fast, seeded PRNG (mulberry32). */
export class Rng {
  private state: number

  constructor(seed: number) {
    this.state = seed >>> 0
  }

  /** A uniform 32-bit unsigned integer. */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0
    let t = this.state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return (t ^ (t >>> 14)) >>> 0
  }

  /** An integer in `[0, n)`. */
  int(n: number): number {
    return n <= 1 ? 0 : this.next() % n
  }

  /** True with probability `p`. */
  chance(p: number): boolean {
    return this.next() / 0x1_0000_0000 < p
  }

  pick<A>(items: ReadonlyArray<A>): A {
    return items[this.int(items.length)]!
  }
}

/** A request before it is written out: every part is raw text (latin1), so mutations can reach any byte. */
interface Draft {
  method: string
  target: string
  version: string
  /** Separators of the request line (normally one SP each). */
  sp1: string
  sp2: string
  /** Each field as `[name, separator after the name (":" and OWS), value, trailing OWS]`. */
  fields: Array<[string, string, string, string]>
  /** Line ending of each head line. */
  eol: string
  /** The body exactly as it goes on the wire (chunk framing included). */
  body: string
  /** Bytes put before the request line. */
  preamble: string
}

const METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
const ODD_METHODS = ["get", "Post", "FOO", "PROPFIND", "PURGE", "M-SEARCH", "QUERY", "CONNECT", "TRACE", "G\u0000T", "GET\t", "POST /"]
const VERSIONS_ODD = ["HTTP/1.2", "HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.10", "HTTP/1.1 ", "HTTP/1", "HTTP/11", " HTTP/1.1", "HTTP/1.1\u0000"]
const FIELD_NAMES = ["Accept", "User-Agent", "X-Request-Id", "Cookie", "Accept-Encoding", "Content-Type", "X-Forwarded-For", "Authorization", "Cache-Control", "Via", "TE", "Trailer", "Expect", "X-HTTP-Method-Override", "Keep-Alive"]
const TRAILER_NAMES = ["Checksum", "X-Trailer", "Expires", "Server-Timing"]
const CONNECTION_TOKENS = ["close", "keep-alive", "upgrade", "content-length", "transfer-encoding", "host", "content-type", "te", "x-foo", "Close", "KEEP-ALIVE"]
const TE_VALUES = [
  "chunked",
  "Chunked",
  "CHUNKED",
  " chunked",
  "chunked ",
  "\tchunked",
  "chunked, identity",
  "identity, chunked",
  "gzip, chunked",
  "chunked, chunked",
  "xchunked",
  "chunkedx",
  "chunk",
  "\"chunked\"",
  "chunked;q=1",
  "chunked,",
  ",chunked",
  "identity",
  "gzip",
  "",
  "\u000bchunked",
  "\u000cchunked",
  "chunked\u0000",
  "ch\u0000unked",
  "cHuNkEd",
  "chunked\r\n ",
  "\u00a0chunked"
]
const TE_NAMES = ["Transfer-Encoding", "transfer-encoding", "TRANSFER-ENCODING", "Transfer-Encoding ", "Transfer_Encoding", " Transfer-Encoding", "Transfer-Encoding\t", "Transfer-Encodings", "X-Transfer-Encoding", "Transfer-\u0000Encoding"]
const CL_NAMES = ["Content-Length", "content-length", "CONTENT-LENGTH", "Content-Length ", "Content_Length", "Content-Length\t", " Content-Length"]
const CL_TRICKS = (n: number): Array<string> => [
  `+${n}`,
  `0x${n.toString(16)}`,
  ` ${n} `,
  `${n}, ${n}`,
  `${n},${n}`,
  `${n}, ${n + 1}`,
  `0${n}`,
  `00000000000000000${n}`,
  `-${n}`,
  `${n}.0`,
  `${n}e0`,
  `${n} ${n}`,
  "",
  `${n}\u0000`,
  `\u000b${n}`,
  "18446744073709551617",
  "99999999999999999999",
  `${n}a`,
  `"${n}"`
]
const SEPARATORS = [":", ": ", ":\t", ":  ", ": \t", " :", "\t:", ":\u000b", ":\u000c", ":\u0000", "::"]
const PCHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@%"
const ODD_TARGET_BYTES = ["\"", "<", ">", "{", "}", "|", "\\", "^", "`", "#", "[", "]", "\u007f", "\u0080", "\u00ff", "\t", "\u0000", "\u000b", "\u000c", " ", "\r", "\n"]
const VALUE_CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@%\"/?<>{}[]\\|^`#\t"
const CONTROL_BYTES = ["\u0000", "\r", "\n", "\t", "\u000b", "\u000c", "\u001f", "\u007f", " ", "\u0080", "\u00ff"]

const word = (rng: Rng, alphabet: string, min: number, max: number): string => {
  const n = min + rng.int(max - min + 1)
  let s = ""
  for (let i = 0; i < n; i++) s += alphabet[rng.int(alphabet.length)]
  return s
}

const randomTarget = (rng: Rng, method: string): string => {
  switch (rng.int(12)) {
    case 0:
      return `http://${word(rng, "abcdefghij", 1, 8)}.example${rng.chance(0.5) ? `:${rng.int(65536)}` : ""}/${word(rng, PCHARS, 0, 12)}`
    case 1:
      return method === "OPTIONS" ? "*" : `https://h/${word(rng, PCHARS, 0, 6)}`
    case 2:
      return `${word(rng, "abcdefghij", 1, 8)}.example:${rng.int(65536)}`
    case 3:
      return `/${word(rng, PCHARS, 0, 10)}?${word(rng, PCHARS + "/?", 0, 16)}`
    default: {
      let path = ""
      const segments = rng.int(4)
      for (let i = 0; i <= segments; i++) path += `/${word(rng, PCHARS, 0, 8)}`
      return path
    }
  }
}

const randomValue = (rng: Rng): string => {
  const v = word(rng, VALUE_CHARS, 0, 24)
  return rng.chance(0.05) ? v + String.fromCharCode(0x80 + rng.int(128)) : v
}

const hexSize = (rng: Rng, n: number): string => {
  const h = n.toString(16)
  switch (rng.int(8)) {
    case 0:
      return h.toUpperCase()
    case 1:
      return "0".repeat(1 + rng.int(3)) + h
    default:
      return h
  }
}

const chunkExt = (rng: Rng): string => {
  if (!rng.chance(0.25)) return ""
  return rng.pick([";a=b", ";a", ";name=\"quoted value\"", ";a=b;c=d", ";a=\"x\\\"y\"", ";a=", ";=b", "; a=b", ";a =b", ";a= b", ";a b", ";\"", ";a=\"b", ";a=\u0001", ";a=b c", ";a=\u0080", ";a=\"\u007f\"", ";a\u0000"])
}

/** A chunked body with 0 to 4 data chunks, extensions, and sometimes trailers. */
const chunkedBody = (rng: Rng): string => {
  let body = ""
  const chunks = rng.int(5)
  for (let i = 0; i < chunks; i++) {
    const data = word(rng, PCHARS + "\r\n\u0000 ", 1, 40)
    body += `${hexSize(rng, data.length)}${chunkExt(rng)}\r\n${data}\r\n`
  }
  body += `${rng.chance(0.1) ? "000" : "0"}${chunkExt(rng)}\r\n`
  const trailers = rng.chance(0.3) ? 1 + rng.int(2) : 0
  for (let i = 0; i < trailers; i++) body += `${rng.pick(TRAILER_NAMES)}: ${randomValue(rng)}\r\n`
  return body + "\r\n"
}

/** A well-formed request. */
const baseDraft = (rng: Rng): Draft => {
  const method = rng.pick(METHODS)
  const fields: Draft["fields"] = []
  const version = rng.chance(0.85) ? "HTTP/1.1" : "HTTP/1.0"
  if (version === "HTTP/1.1" || rng.chance(0.5)) fields.push([rng.pick(["Host", "host", "HOST"]), ": ", `${word(rng, "abcdefghij", 1, 10)}.example`, ""])
  const extra = rng.int(5)
  for (let i = 0; i < extra; i++) {
    const name = rng.chance(0.8) ? rng.pick(FIELD_NAMES) : word(rng, "abcdefghijklmnopqrstuvwxyz-!#$%&'*+.^_`|~0123456789", 1, 12)
    fields.splice(rng.int(fields.length + 1), 0, [name, rng.pick([": ", ":", ":\t", ":  "]), randomValue(rng), rng.pick(["", "", "", " ", "\t"])])
  }
  let body = ""
  switch (rng.int(3)) {
    case 0:
      break
    case 1: {
      body = word(rng, PCHARS + "\r\n\u0000 ", 0, 40)
      fields.push(["Content-Length", ": ", String(body.length), ""])
      break
    }
    case 2: {
      if (version === "HTTP/1.1" || rng.chance(0.2)) {
        body = chunkedBody(rng)
        fields.push(["Transfer-Encoding", ": ", "chunked", ""])
      }
    }
  }
  const target = randomTarget(rng, method)
  // An absolute-form target mostly names the Host it is sent with (switchyard refuses one that does not).
  const authority = /^https?:\/\/([^/?#]*)/.exec(target)
  const host = fieldIndex({ fields } as Draft, "host")
  if (authority !== null && host >= 0 && rng.chance(0.7)) fields[host]![2] = authority[1]!
  return { method, target, version, sp1: " ", sp2: " ", fields, eol: "\r\n", body, preamble: "" }
}

const fieldIndex = (d: Draft, lowerName: string): number => d.fields.findIndex((f) => f[0].trim().toLowerCase() === lowerName)

/** Mutations applied to the draft, each a smuggling shape or a grammar corner. */
const MUTATIONS: ReadonlyArray<(rng: Rng, d: Draft) => void> = [
  // TE.TE: obfuscated Transfer-Encoding values or names.
  (rng, d) => {
    const i = fieldIndex(d, "transfer-encoding")
    const value = rng.pick(TE_VALUES)
    if (i >= 0) d.fields[i]![2] = value
    else d.fields.push(["Transfer-Encoding", ": ", value, ""])
    if (!d.body.endsWith("\r\n\r\n") || rng.chance(0.3)) d.body = chunkedBody(rng)
  },
  (rng, d) => {
    const i = fieldIndex(d, "transfer-encoding")
    if (i >= 0) d.fields[i]![0] = rng.pick(TE_NAMES)
    else d.fields.push([rng.pick(TE_NAMES), ": ", "chunked", ""])
    d.body = chunkedBody(rng)
  },
  // CL.TE and TE.CL: both framings, with a length that fits one reading or the other.
  (rng, d) => {
    const chunked = chunkedBody(rng)
    const smuggled = rng.chance(0.5) ? "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n" : "G"
    d.body = rng.chance(0.5) ? chunked + smuggled : chunked
    const length = rng.pick([chunked.length, d.body.length, 4, 0, 3])
    const te: [string, string, string, string] = ["Transfer-Encoding", ": ", rng.pick(["chunked", "chunked", " chunked", "xchunked", "identity, chunked"]), ""]
    const cl: [string, string, string, string] = ["Content-Length", ": ", String(length), ""]
    if (rng.chance(0.5)) d.fields.push(te, cl)
    else d.fields.push(cl, te)
  },
  // Content-Length tricks.
  (rng, d) => {
    const n = d.body.length
    const value = rng.pick(CL_TRICKS(n))
    const i = fieldIndex(d, "content-length")
    if (i >= 0) d.fields[i]![2] = value
    else d.fields.push([rng.pick(CL_NAMES), ": ", value, ""])
  },
  (rng, d) => {
    const i = fieldIndex(d, "content-length")
    if (i >= 0) d.fields[i]![0] = rng.pick(CL_NAMES)
    else d.fields.push([rng.pick(CL_NAMES), ": ", String(d.body.length), ""])
  },
  // A length that disagrees with the body actually sent.
  (rng, d) => {
    const i = fieldIndex(d, "content-length")
    const delta = rng.pick([-3, -1, 1, 5, 20])
    if (i >= 0) d.fields[i]![2] = String(Math.max(0, Number(d.fields[i]![2]) + delta))
    else d.fields.push(["Content-Length", ": ", String(Math.max(0, d.body.length + delta)), ""])
  },
  // Duplicated framing or routing fields, same or different values.
  (rng, d) => {
    const name = rng.pick(["content-length", "transfer-encoding", "host", "content-type", "connection", "x-http-method-override", "expect"])
    const i = fieldIndex(d, name)
    const copy: [string, string, string, string] = i >= 0 ? [...d.fields[i]!] : [name, ": ", name === "content-length" ? String(d.body.length) : "chunked", ""]
    if (rng.chance(0.5)) copy[2] = name === "content-length" ? String(d.body.length + rng.int(3)) : rng.pick(["chunked", "identity", "b.example", "text/plain", "close"])
    d.fields.splice(rng.int(d.fields.length + 1), 0, copy)
    if (i < 0) d.fields.push([...copy])
  },
  // Connection nominating a framing or routing field, or asking for an upgrade.
  (rng, d) => {
    const tokens = [rng.pick(CONNECTION_TOKENS)]
    if (rng.chance(0.4)) tokens.push(rng.pick(CONNECTION_TOKENS))
    d.fields.push([rng.pick(["Connection", "connection", "Proxy-Connection"]), ": ", tokens.join(rng.pick([", ", ",", " , "])), ""])
    if (tokens.includes("upgrade") && rng.chance(0.7)) d.fields.push(["Upgrade", ": ", rng.pick(["websocket", "h2c", "", "foo/1"]), ""])
  },
  // obs-fold: a field continued on a line starting with whitespace.
  (rng, d) => {
    if (d.fields.length === 0) return
    const f = d.fields[rng.int(d.fields.length)]!
    f[2] = rng.chance(0.5) ? `${f[2]}\r\n${rng.pick([" ", "\t"])}${randomValue(rng)}` : `\r\n ${f[2]}`
  },
  (rng, d) => {
    d.fields.splice(rng.int(d.fields.length + 1), 0, [" Transfer-Encoding", ": ", "chunked", ""])
    if (rng.chance(0.5)) d.body = chunkedBody(rng)
  },
  // Separator and whitespace corners of a field line.
  (rng, d) => {
    if (d.fields.length === 0) return
    d.fields[rng.int(d.fields.length)]![1] = rng.pick(SEPARATORS)
  },
  (rng, d) => {
    if (d.fields.length === 0) return
    d.fields[rng.int(d.fields.length)]![3] = rng.pick([" ", "\t", " \t ", "\u000b", "\u0000", "\r", "\u000c"])
  },
  // Bare LF or bare CR as a line ending.
  (rng, d) => {
    d.eol = rng.pick(["\n", "\r", "\r\r\n", "\n\r"])
  },
  // Control bytes inside a field value or name.
  (rng, d) => {
    if (d.fields.length === 0) return
    const f = d.fields[rng.int(d.fields.length)]!
    const part = rng.chance(0.7) ? 2 : 0
    const at = rng.int(f[part].length + 1)
    f[part] = f[part].slice(0, at) + rng.pick(CONTROL_BYTES) + f[part].slice(at)
  },
  // Request-line corners.
  (rng, d) => {
    switch (rng.int(6)) {
      case 0:
        d.method = rng.pick(ODD_METHODS)
        break
      case 1:
        d.version = rng.pick(VERSIONS_ODD)
        break
      case 2:
        d.sp1 = rng.pick(["  ", "\t", " \t", "\u000b", ""])
        break
      case 3:
        d.sp2 = rng.pick(["  ", "\t", "\r", ""])
        break
      case 4: {
        const at = rng.int(d.target.length + 1)
        d.target = d.target.slice(0, at) + rng.pick(ODD_TARGET_BYTES) + d.target.slice(at)
        break
      }
      case 5:
        d.target = rng.pick(["", "*", "//", "/%00", "/?a=b#frag", "http://a.example", "http://a.example?x", "a.example:443", "/../../etc", "http://user@a.example/"])
    }
  },
  // Empty lines (or junk) before the request line.
  (rng, d) => {
    d.preamble = rng.pick(["\r\n", "\r\n\r\n", "\n", "\r", " ", "\u0000", "\r\n \r\n"])
  },
  // HTTP/1.0 with chunked coding.
  (rng, d) => {
    d.version = "HTTP/1.0"
    if (fieldIndex(d, "transfer-encoding") < 0) d.fields.push(["Transfer-Encoding", ": ", "chunked", ""])
    d.body = chunkedBody(rng)
  },
  // Missing Host, or an empty one.
  (rng, d) => {
    const i = fieldIndex(d, "host")
    if (i >= 0 && rng.chance(0.5)) d.fields.splice(i, 1)
    else if (i >= 0) d.fields[i]![2] = rng.pick(["", " ", "a b", "a\u0000b", "[::1]:80", "a.example:80"])
  },
  // Chunk-size and chunk-line tricks.
  (rng, d) => {
    if (fieldIndex(d, "transfer-encoding") < 0) d.fields.push(["Transfer-Encoding", ": ", "chunked", ""])
    const data = word(rng, PCHARS, 1, 12)
    const size = data.length.toString(16)
    const line = rng.pick([
      `0x${size}`,
      ` ${size}`,
      `${size} `,
      `${size}\t`,
      `${size} ;a=b`,
      `${size};a=b `,
      `-${size}`,
      `+${size}`,
      `${"0".repeat(14)}${size}`,
      `${"0".repeat(20)}${size}`,
      "ffffffffffffffff0",
      "10000000000000000",
      `${size}${size}`,
      `${size}\u0000`,
      `${size}\r`,
      `${size}g`,
      ""
    ])
    const after = rng.pick(["\r\n", "\n", "\r\r\n"])
    const tail = rng.pick(["\r\n", "", "\n", "XX", "\r"])
    d.body = `${line}${after}${data}${tail}0\r\n\r\n`
  },
  (rng, d) => {
    if (fieldIndex(d, "transfer-encoding") < 0) d.fields.push(["Transfer-Encoding", ": ", "chunked", ""])
    const data = word(rng, PCHARS, 1, 12)
    const size = data.length.toString(16)
    // Data longer or shorter than its size, or the last chunk or its end mangled.
    d.body = rng.pick([
      `${size}\r\n${data}x\r\n0\r\n\r\n`,
      `${size}\r\n${data.slice(1)}\r\n0\r\n\r\n`,
      `${size}\r\n${data}\r\n0\r\n`,
      `${size}\r\n${data}\r\n0\n\n`,
      `${size}\r\n${data}\r\n0\r\n\n`,
      `${size}\r\n${data}\r\n0\r\n\r`,
      `${size}\r\n${data}\r\n0;a\r\n\r\n`,
      `${size}\r\n${data}\r\n00\r\n\r\n`,
      `${size}\r\n${data}\r\n\r\n0\r\n\r\n`
    ])
  },
  // Trailers that are not field lines, or that try to frame the message.
  (rng, d) => {
    if (fieldIndex(d, "transfer-encoding") < 0) d.fields.push(["Transfer-Encoding", ": ", "chunked", ""])
    const trailer = rng.pick([
      "GET /smuggled HTTP/1.1\r\n",
      "GET /smuggled HTTP/1.1\r\nHost: x\r\n",
      "Content-Length: 5\r\n",
      "Transfer-Encoding: chunked\r\n",
      "X: a\r\n b\r\n",
      " X: a\r\n",
      "X : a\r\n",
      "X\r\n",
      ": a\r\n",
      "X: a\u0000b\r\n",
      "X: a\rb\r\n",
      "X: a\nY: b\r\n",
      "X:a\r\n",
      "X: \u0080\r\n",
      "X\t: a\r\n"
    ])
    d.body = `${rng.chance(0.5) ? "3\r\nabc\r\n" : ""}0\r\n${trailer}\r\n`
  },
  // Expect headers.
  (rng, d) => {
    d.fields.push(["Expect", ": ", rng.pick(["100-continue", "100-Continue", "foo", ""]), ""])
  }
]

/** Byte-level edits on the written message: anything the draft mutations did not reach. */
const byteMutation = (rng: Rng, bytes: string, headEnd: number): string => {
  const at = rng.int(rng.chance(0.8) ? headEnd + 1 : bytes.length + 1)
  switch (rng.int(5)) {
    case 0:
      return bytes.slice(0, at) + rng.pick(CONTROL_BYTES) + bytes.slice(at)
    case 1:
      return bytes.slice(0, at) + bytes.slice(at + 1)
    case 2:
      return bytes.slice(0, at) + bytes.slice(at, at + 1) + bytes.slice(at)
    case 3: {
      // One CRLF loses its CR or its LF.
      const crlf = bytes.indexOf("\r\n", at)
      if (crlf === -1) return bytes
      return bytes.slice(0, crlf) + (rng.chance(0.5) ? "\n" : "\r") + bytes.slice(crlf + 2)
    }
    default:
      return bytes.slice(0, at) + String.fromCharCode(rng.int(256)) + bytes.slice(at + 1)
  }
}

const write = (d: Draft): { text: string; headEnd: number } => {
  let head = `${d.preamble}${d.method}${d.sp1}${d.target}${d.sp2}${d.version}${d.eol}`
  for (const [name, sep, value, ows] of d.fields) head += `${name}${sep}${value}${ows}${d.eol}`
  head += d.eol
  return { text: head + d.body, headEnd: head.length }
}

/** One generated message. */
export const generateMessage = (rng: Rng): Buffer => {
  const d = baseDraft(rng)
  const mutations = rng.chance(0.25) ? 0 : 1 + rng.int(rng.chance(0.8) ? 2 : 4)
  for (let i = 0; i < mutations; i++) rng.pick(MUTATIONS)(rng, d)
  let { text, headEnd } = write(d)
  if (rng.chance(0.15)) text = byteMutation(rng, text, headEnd)
  return Buffer.from(text, "latin1")
}

/** `count` messages from `seed`, in batches of `batchSize`. */
export function* corpus(seed: number, count: number, batchSize: number): Generator<Array<Buffer>> {
  const rng = new Rng(seed)
  for (let done = 0; done < count; ) {
    const n = Math.min(batchSize, count - done)
    const batch: Array<Buffer> = []
    for (let i = 0; i < n; i++) batch.push(generateMessage(rng))
    done += n
    yield batch
  }
}

/** Hand-picked classic smuggling shapes (each is followed by the sentinel when checked). */
export const CLASSIC_SHAPES: ReadonlyArray<readonly [string, string]> = [
  ["CL.TE", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED"],
  ["TE.CL", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"],
  ["TE.TE space before colon", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"],
  ["TE.TE xchunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"],
  ["TE.TE leading space", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  chunked\r\n\r\n0\r\n\r\n"],
  ["TE.TE vertical tab", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\u000bchunked\r\n\r\n0\r\n\r\n"],
  ["TE.TE two fields", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n"],
  ["TE.TE chunked, identity", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"],
  ["TE obs-fold", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"],
  ["TE in HTTP/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
  ["CL plus sign", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello"],
  ["CL hex", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello"],
  ["CL list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello"],
  ["CL twice", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"],
  ["CL padded", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length:  5 \r\n\r\nhello"],
  ["bare LF in head", "GET / HTTP/1.1\nHost: a\n\n"],
  ["bare CR in head", "GET / HTTP/1.1\rHost: a\r\n\r\n"],
  ["NUL in value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\u0000b\r\n\r\n"],
  ["CR in value", "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n"],
  ["chunk size 0x", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"],
  ["chunk size overflow", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n"],
  ["chunk size space", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n"],
  ["chunk ext bad char", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a b\r\nhello\r\n0\r\n\r\n"],
  ["chunk bare LF", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"],
  ["chunk data without CRLF", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"],
  ["request line in trailers", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"],
  ["Connection: content-length", "POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"],
  ["Connection: transfer-encoding", "POST / HTTP/1.1\r\nHost: a\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
  ["Connection: host", "GET / HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n"],
  ["absolute-form", "GET http://b.example/x HTTP/1.1\r\nHost: a\r\n\r\n"],
  ["authority-form on GET", "GET b.example:80 HTTP/1.1\r\nHost: a\r\n\r\n"],
  ["duplicate Host", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"],
  ["chunked with trailers", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\"b c\"\r\nhello\r\n0\r\nChecksum: x\r\n\r\n"]
]
