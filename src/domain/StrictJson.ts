/**
 * A strict JSON reader for request bodies a policy must judge exactly as the Docker Engine will read
 * them. Go's `encoding/json` matches object keys to struct fields case-insensitively (`privileged` is
 * `Privileged`, and since Go 1.21 `ſ`, `K` and `İ` fold to `S`, `K` and `I`) and takes the last of
 * duplicated keys; so this reader refuses any object with two keys that fold to the same name, at every
 * level, and keys objects by their folded name. It also refuses what Go refuses (a byte-order mark,
 * control characters in strings, bad escapes, trailing data) and nesting deeper than a bound.
 * Pure: bytes in, a value or an error out. It does not keep the original spelling of keys.
 */

/** A JSON object, keyed by folded name (see `foldKey`). */
export class JsonObject {
  readonly entries: ReadonlyMap<string, JsonValue>
  constructor(entries: ReadonlyMap<string, JsonValue>) {
    this.entries = entries
  }
  /** The value of the key that Go would match to the field `name` (any case), or `undefined`. */
  get(name: string): JsonValue | undefined {
    return this.entries.get(foldKey(name))
  }
  get size(): number {
    return this.entries.size
  }
}

export type JsonValue = null | boolean | number | string | ReadonlyArray<JsonValue> | JsonObject

/** Why a body is not read. */
export type JsonErrorReason = "Syntax" | "DuplicateKey" | "TooDeep"

export interface JsonError {
  readonly _tag: "JsonError"
  readonly reason: JsonErrorReason
  /** Character offset in the decoded text. */
  readonly offset: number
  readonly message: string
}

export const isJsonError = (v: JsonValue | JsonError): v is JsonError =>
  v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof JsonObject) && (v as JsonError)._tag === "JsonError"

/** Deepest nesting of arrays and objects accepted (Docker bodies are a few levels deep). */
export const MAX_JSON_DEPTH = 64

/**
 * The name Go's `encoding/json` compares a key by: ASCII letters upper-cased, and each other character
 * mapped through upper(lower(c)) as Go's `unicode` does for the characters that fold onto ASCII
 * (`ſ` U+017F → `S`, `K` U+212A → `K`, `İ` U+0130 → `I`). Other characters are compared as JavaScript
 * upper-cases a single character, which can only make two keys equal, never a key equal to a field.
 */
export const foldKey = (key: string): string => {
  let out = ""
  for (const ch of key) {
    const c = ch.codePointAt(0)!
    if (c < 0x80) out += c >= 0x61 && c <= 0x7a ? String.fromCharCode(c - 0x20) : ch
    else if (c === 0x017f) out += "S"
    else if (c === 0x212a) out += "K"
    else if (c === 0x0130) out += "I"
    else {
      const lower = ch.toLowerCase()
      const upper = [...lower].length === 1 ? lower.toUpperCase() : ch
      out += [...upper].length === 1 ? upper : ch
    }
  }
  return out
}

const decoder = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true })

const fail = (reason: JsonErrorReason, offset: number, message: string): JsonError => ({ _tag: "JsonError", reason, offset, message })

/** Thrown inside the parser, caught at its entry. */
class Stop {
  readonly error: JsonError
  constructor(error: JsonError) {
    this.error = error
  }
}

const isWs = (c: number): boolean => c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d
const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y

class Reader {
  readonly text: string
  pos = 0
  constructor(text: string) {
    this.text = text
  }

  stop(reason: JsonErrorReason, message: string, at = this.pos): never {
    throw new Stop(fail(reason, at, message))
  }

  skipWs(): void {
    const t = this.text
    while (this.pos < t.length && isWs(t.charCodeAt(this.pos))) this.pos++
  }

  value(depth: number): JsonValue {
    this.skipWs()
    const t = this.text
    if (this.pos >= t.length) this.stop("Syntax", "unexpected end of input")
    const c = t.charCodeAt(this.pos)
    switch (c) {
      case 0x7b: // {
        return this.object(depth + 1)
      case 0x5b: // [
        return this.array(depth + 1)
      case 0x22: // "
        return this.string()
      case 0x74: // t
        return this.literal("true", true)
      case 0x66: // f
        return this.literal("false", false)
      case 0x6e: // n
        return this.literal("null", null)
      default: {
        NUMBER.lastIndex = this.pos
        const m = NUMBER.exec(t)
        if (m === null || m[0].length === 0 || m[0] === "-") this.stop("Syntax", `unexpected character ${JSON.stringify(t[this.pos])}`)
        this.pos += m[0].length
        return Number(m[0])
      }
    }
  }

  literal<A extends JsonValue>(word: string, value: A): A {
    if (!this.text.startsWith(word, this.pos)) this.stop("Syntax", `unexpected character ${JSON.stringify(this.text[this.pos])}`)
    this.pos += word.length
    return value
  }

  string(): string {
    const t = this.text
    let out = ""
    let from = ++this.pos
    for (;;) {
      if (this.pos >= t.length) this.stop("Syntax", "unterminated string")
      const c = t.charCodeAt(this.pos)
      if (c === 0x22) {
        out += t.slice(from, this.pos++)
        return out
      }
      if (c < 0x20) this.stop("Syntax", "control character in a string")
      if (c !== 0x5c) {
        this.pos++
        continue
      }
      out += t.slice(from, this.pos)
      const e = t[this.pos + 1]
      switch (e) {
        case "\"":
        case "\\":
        case "/":
          out += e
          break
        case "b":
          out += "\b"
          break
        case "f":
          out += "\f"
          break
        case "n":
          out += "\n"
          break
        case "r":
          out += "\r"
          break
        case "t":
          out += "\t"
          break
        case "u": {
          const hex = t.slice(this.pos + 2, this.pos + 6)
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) this.stop("Syntax", "bad \\u escape")
          out += String.fromCharCode(parseInt(hex, 16))
          this.pos += 4
          break
        }
        default:
          this.stop("Syntax", "bad escape in a string")
      }
      this.pos += 2
      from = this.pos
    }
  }

  array(depth: number): ReadonlyArray<JsonValue> {
    if (depth > MAX_JSON_DEPTH) this.stop("TooDeep", `nested deeper than ${MAX_JSON_DEPTH}`)
    this.pos++
    const out: Array<JsonValue> = []
    this.skipWs()
    if (this.text.charCodeAt(this.pos) === 0x5d) {
      this.pos++
      return out
    }
    for (;;) {
      out.push(this.value(depth))
      this.skipWs()
      const c = this.text.charCodeAt(this.pos)
      this.pos++
      if (c === 0x5d) return out
      if (c !== 0x2c) this.stop("Syntax", "expected , or ] in an array", this.pos - 1)
    }
  }

  object(depth: number): JsonObject {
    if (depth > MAX_JSON_DEPTH) this.stop("TooDeep", `nested deeper than ${MAX_JSON_DEPTH}`)
    this.pos++
    const entries = new Map<string, JsonValue>()
    this.skipWs()
    if (this.text.charCodeAt(this.pos) === 0x7d) {
      this.pos++
      return new JsonObject(entries)
    }
    for (;;) {
      this.skipWs()
      const at = this.pos
      if (this.text.charCodeAt(this.pos) !== 0x22) this.stop("Syntax", "expected a key in an object")
      const key = this.string()
      const folded = foldKey(key)
      if (entries.has(folded)) {
        this.stop("DuplicateKey", `key ${JSON.stringify(key)} given twice (keys are compared ignoring case)`, at)
      }
      this.skipWs()
      if (this.text.charCodeAt(this.pos) !== 0x3a) this.stop("Syntax", "expected : after a key")
      this.pos++
      entries.set(folded, this.value(depth))
      this.skipWs()
      const c = this.text.charCodeAt(this.pos)
      this.pos++
      if (c === 0x7d) return new JsonObject(entries)
      if (c !== 0x2c) this.stop("Syntax", "expected , or } in an object", this.pos - 1)
    }
  }
}

/** Reads one JSON document from `text`: whitespace around it only. */
export const parseStrictJsonText = (text: string): JsonValue | JsonError => {
  const reader = new Reader(text)
  try {
    const value = reader.value(0)
    reader.skipWs()
    if (reader.pos !== text.length) return fail("Syntax", reader.pos, "data after the JSON value")
    return value
  } catch (e) {
    if (e instanceof Stop) return e.error
    throw e
  }
}

/**
 * Reads one JSON document from UTF-8 bytes. Invalid UTF-8 inside a string reads as U+FFFD (as Go reads
 * it); elsewhere it is a syntax error, and so is a byte-order mark.
 */
export const parseStrictJson = (bytes: Uint8Array): JsonValue | JsonError => parseStrictJsonText(decoder.decode(bytes))
