/**
 * What a backend's `Content-Length` fields declare (RFC 9110 §8.6), for the front doors that relay a
 * backend's answer to a public client from a head that is not HTTP/1.1 on the wire (an HTTP/2 response,
 * a wsp answer's `Header` map). Strict as the HTTP/1.1 head parser is: one field, one decimal value; a
 * list, even of identical values, is refused rather than collapsed. It reads no bodies.
 */
import { MAX_CONTENT_LENGTH_DIGITS } from "./Http1Parser.ts"

/** A `Content-Length` a proxy may not relay nor frame a body by. */
export interface InvalidContentLength {
  readonly _tag: "InvalidContentLength"
  readonly message: string
}

const invalid = (message: string): InvalidContentLength => ({ _tag: "InvalidContentLength", message })

const DECIMAL = /^[0-9]+$/

/**
 * The length the `Content-Length` field values declare: `undefined` when there is none, the refusal when
 * there are several fields or the value is not one decimal number of at most `MAX_CONTENT_LENGTH_DIGITS`
 * digits (surrounding whitespace included: the value is relayed as it is).
 */
export const declaredContentLength = (values: ReadonlyArray<string>): number | undefined | InvalidContentLength => {
  if (values.length === 0) return undefined
  if (values.length > 1) return invalid(`${values.length} content-length fields`)
  const value = values[0]!
  if (value.length === 0 || value.length > MAX_CONTENT_LENGTH_DIGITS || !DECIMAL.test(value)) {
    return invalid(`invalid content-length "${value.slice(0, 32)}"`)
  }
  return Number(value)
}

/** The `Content-Length` values of a flat `[name, value, ...]` list (names compared case-insensitively). */
export const contentLengthValues = (fields: ReadonlyArray<string>): Array<string> => {
  const out: Array<string> = []
  for (let i = 0; i < fields.length; i += 2) {
    const name = fields[i]!
    if (name.length === 14 && name.toLowerCase() === "content-length") out.push(fields[i + 1]!)
  }
  return out
}

export const isInvalidContentLength = (x: number | undefined | InvalidContentLength): x is InvalidContentLength =>
  typeof x === "object"
