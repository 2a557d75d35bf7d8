/**
 * The pooled HTTP/1.1 connection kind of upstream for a front door whose exchanges are messages (the
 * HTTP/2 public port): the request head written with the engine's head rules (`Http1Heads`), the body
 * framed (its length, else chunked, with trailers), the response head read and checked by the engine's
 * parser, its body de-framed (`BodyFramer`: chunk data as views) and handed to the front with
 * backpressure both ways, and the connection given back to its pool when the response ends cleanly.
 * Interim responses are not relayed. It picks no backend and never retries after a byte was sent.
 */
import { Buffer } from "node:buffer"
import { lastChunkBytes, requestHeadBytes, trailerFields } from "../../domain/Http1Heads.ts"
import { BodyFramer, type HeadLimits, type ResponseHead, responseFraming, responseHeadReader } from "../../domain/Http1Parser.ts"
import { contentLengthValues, declaredContentLength } from "../../domain/ContentLength.ts"
import { headerValue, relayableTrailer, responseHeaders } from "../../domain/HttpHeaders.ts"
import type { ExchangeFront } from "./Exchange.ts"
import { connectionRefusal } from "./Upstream.ts"
import type { ConnectionOwner, ConnectionWaiter, PooledConnection, UpstreamPool } from "./UpstreamPool.ts"

/** Bytes queued toward the upstream above which the front's body is paused until they drain. */
export const UpstreamQueueBytes = 512 * 1024
/** Most interim (1xx) responses skipped before the final one; more is a broken upstream. */
export const MaxInterimResponses = 16

/** Body parts up to this size are copied for the front, so the connection's read buffer is used again. */
export const CopyBelowBytes = 4 * 1024

/** Methods for which a request without a body needs no `Content-Length: 0` to say so. */
const BODYLESS_BY_DEFAULT: ReadonlySet<string> = new Set(["GET", "HEAD", "DELETE", "OPTIONS", "TRACE"])

export interface Http1ExchangeOptions {
  readonly limits: HeadLimits & { readonly maxHeaderSize: number }
  /** Time allowed for the response head (ms); then 504. 0 = none. */
  readonly responseTimeoutMs: number
  /** No bytes from the upstream for this long, once answering, cuts the exchange (ms). 0 = none. */
  readonly idleTimeoutMs: number
  /** Told a one-line description of each upstream failure. */
  readonly report: (message: string) => void
  /** Called once when the exchange is over, whatever the outcome. */
  readonly onDone: () => void
  /** The client the pool counts the connection against, and its share. */
  readonly client?: string | undefined
  readonly slotLimit?: number | undefined
}

const errorText = (err: (Error & { code?: string }) | undefined): string => err === undefined ? "connection closed" : err.code ?? err.message

/** Trailer fields a request may pass on (flat), the others dropped. */
const relayableTrailers = (fields: ReadonlyArray<string>): Array<string> => {
  const out: Array<string> = []
  for (let i = 0; i < fields.length; i += 2) {
    if (fields[i]!.charCodeAt(0) !== 58 && relayableTrailer(fields[i]!.toLowerCase())) out.push(fields[i]!, fields[i + 1]!)
  }
  return out
}

/** Carries the exchange of `front` on a connection of `pool`. */
export const exchangeOverHttp1 = (pool: UpstreamPool, front: ExchangeFront, options: Http1ExchangeOptions): void => {
  const request = front.request
  const describe = pool.upstream.describe
  const headers = [...request.headers]
  if (headerValue(headers, "host") === undefined && request.authority !== undefined) headers.unshift("Host", request.authority)
  // the body a length declares is the body the upstream reads: a front whose framing is not HTTP/1.1
  // (HTTP/2 DATA frames) must send exactly that many bytes, or the connection is not used again
  const declared = declaredContentLength(contentLengthValues(headers))
  if (typeof declared === "object") {
    options.onDone()
    front.fail(400, `switchyard: a request with ${declared.message}`)
    return
  }
  if (!request.hasBody && declared !== undefined && declared !== 0) {
    options.onDone()
    front.fail(400, "switchyard: a request declaring a content-length without a body")
    return
  }
  const chunked = request.hasBody && declared === undefined
  if (!request.hasBody && declared === undefined && !BODYLESS_BY_DEFAULT.has(request.method)) headers.push("Content-Length", "0")
  const head = requestHeadBytes({ method: request.method, path: request.path, headers }, 1, chunked)
  let bodyBytes = 0

  let conn: PooledConnection | undefined
  let done = false
  let answered = false
  let requestEnded = !request.hasBody
  let interim = 0
  let paused = false
  let timer: NodeJS.Timeout | undefined
  const reader = responseHeadReader(options.limits)
  let framer: BodyFramer | undefined
  let keepAlive = true

  const clearTimer = () => {
    if (timer !== undefined) clearTimeout(timer)
    timer = undefined
  }
  const finish = (reusable: boolean) => {
    if (done) return
    done = true
    clearTimer()
    pool.cancel(waiter)
    const c = conn
    conn = undefined
    if (c !== undefined) {
      c.owner = undefined
      if (paused) c.socket.resume()
      if (c.pool !== undefined && reusable) c.pool.release(c, true)
      else c.destroy()
    }
    options.onDone()
  }
  const failWith = (status: number, message: string, detail: string) => {
    finish(false)
    options.report(detail)
    front.fail(status, message)
  }
  const cut = (detail: string) => {
    finish(false)
    options.report(detail)
    front.abort()
  }

  const onResponseHead = (response: ResponseHead, rest: Buffer) => {
    const framing = responseFraming(request.method, response)
    framer = new BodyFramer(framing, options.limits.maxHeaderSize, 502)
    keepAlive = response.keepAlive && response.versionMinor === 1
    let fields = responseHeaders(response.headers)
    if (response.transferCodings.length > 0) {
      // a coding frames the body: its length (if any) is not relayed, and the connection is not reused
      fields = fields.filter((_, i, all) => i % 2 === 0 ? all[i]!.toLowerCase() !== "content-length" : all[i - 1]!.toLowerCase() !== "content-length")
      if (contentLengthValues(response.headers).length > 0) keepAlive = false
    }
    const refused = front.respond(response.status, fields, framing._tag === "None")
    if (refused !== undefined) {
      failWith(502, `switchyard: upstream ${describe} sent a response that cannot be relayed`, `upstream ${describe} sent a response head that cannot be relayed: ${refused}`)
      return
    }
    answered = true
    clearTimer()
    if (options.idleTimeoutMs > 0) timer = setTimeout(() => cut(`upstream ${describe} was idle too long: ${request.method} ${request.target}`), options.idleTimeoutMs)
    if (framer.done || rest.length > 0) onBody(rest)
  }

  const onBody = (chunk: Buffer) => {
    const f = framer!
    timer?.refresh()
    let flowing = true
    // a small part is copied (from Node's shared pool), so the read buffer takes the next read; a large
    // one is handed on as it is, under a hold on the read released once the front door wrote it out,
    // and the next read goes into fresh memory
    const pass = (part: Buffer) => {
      if (part.length <= CopyBelowBytes) {
        if (!front.write(Buffer.from(part))) flowing = false
        return
      }
      if (!front.write(part, conn?.holdRead())) flowing = false
    }
    const n = f.consume(chunk, 0, (start, end) => pass(chunk.subarray(start, end)))
    if (typeof n !== "number") {
      cut(`upstream ${describe} sent a malformed body: ${n.message}`)
      return
    }
    if (!f.isChunked && f.forwardable > 0) pass(f.forwardable === chunk.length ? chunk : chunk.subarray(0, f.forwardable))
    if (f.done) {
      const surplus = chunk.length - n
      if (surplus > 0) options.report(`upstream ${describe} sent ${surplus} bytes past the end of its response; the connection is dropped`)
      const refused = front.end(f.trailers === undefined ? undefined : trailerFields(f.trailers))
      finish(surplus === 0 && requestEnded && keepAlive && !f.closeDelimited)
      if (refused !== undefined) {
        options.report(`upstream ${describe} sent trailers that cannot be relayed: ${refused}`)
        front.abort()
      }
      return
    }
    if (!flowing && conn !== undefined && !paused) {
      paused = true
      conn.socket.pause()
    }
  }

  const owner: ConnectionOwner = {
    upstreamData: (chunk) => {
      if (done) return
      if (framer !== undefined) return onBody(chunk)
      let step = reader.push(chunk)
      for (;;) {
        if (step._tag === "Need") return
        if (step._tag === "Error") {
          failWith(502, `switchyard: upstream ${describe} sent a response that cannot be relayed`, `upstream ${describe} sent a response that cannot be relayed: ${step.error.message}`)
          return
        }
        const response = step.head
        if (response.status >= 100 && response.status < 200) {
          if (response.status === 101 || ++interim > MaxInterimResponses) {
            failWith(502, `switchyard: upstream ${describe} sent a response that cannot be relayed`, `upstream ${describe} sent an unexpected 101 or too many interim responses`)
            return
          }
          if (step.rest.length === 0) return
          step = reader.push(step.rest)
          continue
        }
        return onResponseHead(response, step.rest)
      }
    },
    upstreamEnd: () => {
      if (done) return
      if (framer !== undefined && framer.closeDelimited) {
        framer.done = true
        const refused = front.end(undefined)
        finish(false)
        if (refused !== undefined) front.abort()
        return
      }
      conn?.destroy()
    },
    upstreamClose: (error) => {
      if (done) return
      if (!answered) failWith(502, `switchyard: upstream ${describe} unreachable (${errorText(error)})`, `upstream ${describe} unreachable: ${errorText(error)}`)
      else cut(`upstream ${describe} broke a response: ${errorText(error)}`)
    },
    upstreamDrain: () => {
      if (!done) front.resumeBody()
    }
  }

  const sendBody = (c: PooledConnection) => {
    front.readBody((chunk) => {
      if (done || chunk.length === 0) return true
      const s = c.socket
      bodyBytes += chunk.length
      if (declared !== undefined && bodyBytes > declared) {
        if (answered) cut(`a request body longer than its content-length (${declared}) for upstream ${describe}`)
        else failWith(400, "switchyard: a request body longer than its content-length", `a request body longer than its content-length (${declared}) for upstream ${describe}`)
        return true
      }
      if (chunked) {
        s.cork()
        s.write(`${chunk.length.toString(16)}\r\n`)
        s.write(chunk)
        s.write("\r\n")
        s.uncork()
      } else s.write(chunk)
      return s.writableLength < UpstreamQueueBytes
    }, (trailers) => {
      if (done) return
      if (declared !== undefined && bodyBytes !== declared) {
        if (answered) cut(`a request body shorter than its content-length (${declared}) for upstream ${describe}`)
        else failWith(400, "switchyard: a request body shorter than its content-length", `a request body shorter than its content-length (${declared}) for upstream ${describe}`)
        return
      }
      requestEnded = true
      if (chunked) c.socket.write(lastChunkBytes(trailers === undefined ? undefined : relayableTrailers(trailers)))
    })
  }

  const waiter: ConnectionWaiter = {
    client: options.client,
    slotLimit: options.slotLimit,
    granted: (c) => {
      if (done) {
        if (c.pool !== undefined) c.pool.release(c, c.usable())
        else c.destroy()
        return
      }
      const refusal = connectionRefusal(c.socket)
      if (refusal !== undefined) {
        c.destroy()
        failWith(502, `switchyard: upstream ${describe} refused the request before it was sent: ${refusal}`, `upstream ${describe} refused the request before it was sent: ${refusal}`)
        return
      }
      conn = c
      c.owner = owner
      c.socket.write(head)
      if (request.hasBody) sendBody(c)
    },
    refused: (message) => {
      if (done) return
      done = true
      clearTimer()
      options.onDone()
      front.fail(503, message)
    }
  }

  front.onGone(() => finish(false))
  front.onDrain(() => {
    if (paused && conn !== undefined) {
      paused = false
      conn.socket.resume()
    }
  })
  if (options.responseTimeoutMs > 0) {
    timer = setTimeout(() => {
      timer = undefined
      if (!answered) failWith(504, `switchyard: upstream ${describe} timed out before answering`, `upstream ${describe} did not answer in time: ${request.method} ${request.target}`)
    }, options.responseTimeoutMs)
  }
  pool.acquire(waiter, false)
}
