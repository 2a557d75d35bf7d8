/**
 * Reads the body of a socket-proxy request the body policy must judge before anything goes upstream:
 * the engine hands the connection over (a `Handoff` admission) with what it read; the whole body is read
 * here within `maxBodyBytes` (Content-Length only: a chunked body gets 411) and at the client-limit
 * rate, judged by `checkBody`, and then either refused in Docker's error shape (connection closed) or put
 * back on the socket and the connection served by the engine again, with a mark so the request passes
 * straight through its second admission. The body goes back byte for byte, or, for a create under a
 * label scope, as its labelled rewrite (`labelBody`) with the Content-Length to match. It holds at most
 * one body per connection.
 */
import type * as net from "node:net"
import { RATE_CHECK_INTERVAL_MS, requestBodyTooSlow } from "../../domain/ClientLimits.ts"
import { type BodyEndpoint, type BodyPolicy, bodyRefusalMessage, type BodyVerdict, checkBody } from "../../domain/BodyPolicy.ts"
import { type ContainerLabel, labelBody } from "../../domain/LabelScope.ts"
import { learnBody } from "../../domain/RuleLearning.ts"
import { type HeadLimits, requestHeadReader } from "../../domain/Http1Parser.ts"
import type { Admission, ClientLimitEvent, Http1Request } from "../forward/http1/Admission.ts"
import { dockerErrors, writeRawError } from "../forward/ErrorResponse.ts"
import { closeAfterFlush } from "../forward/Flush.ts"

/** Marks a connection whose next request was read and allowed here: its method and target. */
const passedBody = Symbol("switchyard/passedBody")
/** The engine serving the listener a connection came from (to serve it again after the check). */
const servedBy = Symbol("switchyard/servedBy")

type MarkedSocket = net.Socket & {
  [passedBody]?: { readonly method: string; readonly target: string }
  [servedBy]?: (socket: net.Socket) => void
}

export interface BodyInspectionOptions {
  readonly policy: () => BodyPolicy
  readonly ruleSetName: () => string
  readonly headLimits: HeadLimits
  /** Least average body rate after the grace period (bytes/s; 0 = none), as the engine applies it. */
  readonly minBytesPerSecond: number
  readonly gracePeriodMs: number
  /** Told each refusal: status and message (for the log and the counters). */
  readonly onRefuse: (status: number, message: string) => void
  /** Told each body cut for arriving below the minimum rate (a client limit, logged sampled). */
  readonly onSlowBody: (event: ClientLimitEvent) => void
  /**
   * Learning mode: a body the policy refuses (403) only by switches is forwarded, and `onWouldRefuse`
   * told each refusal (`learnBody`); one that no switch allows is still refused.
   */
  readonly learning?: (() => boolean) | undefined
  /** Told each refusal of a body learning mode forwarded: the verdict and the value a list switch needs. */
  readonly onWouldRefuse?:
    | ((verdict: Extract<BodyVerdict, { _tag: "Refuse" }>, value: string | undefined, method: string, path: string) => void)
    | undefined
}

export interface BodyInspection {
  /** Remembers which engine serves `socket` (call when it is accepted). */
  readonly servedBy: (socket: net.Socket, accept: (socket: net.Socket) => void) => void
  /**
   * Whether `request` is the one this inspection allowed and put back (its mark is taken): it is then
   * forwarded without a second reading. A marked connection presenting another request is a bug: refused.
   */
  readonly passed: (request: Http1Request) => boolean | "mismatch"
  /**
   * The admission that takes the connection, reads the body, judges it as `endpoint` (unless
   * `undefined`) and, with `label`, adds the label to it.
   */
  readonly admission: (endpoint: BodyEndpoint | undefined, method: string, path: string, label?: ContainerLabel | undefined) => Admission
  /** Closes the connections whose body is being read, and answers later ones 503 (shutdown). */
  readonly close: () => void
}

const CONTINUE = "HTTP/1.1 100 Continue\r\n\r\n"

/** The head to put back: as received without `Expect` (answered here), and with `length` as its Content-Length when given. */
const headWith = (
  head: { readonly method: string; readonly originTarget: string; readonly versionMinor: number; readonly headers: ReadonlyArray<string> },
  length: number | undefined
): Buffer => {
  let text = `${head.method} ${head.originTarget} HTTP/1.${head.versionMinor}\r\n`
  for (let i = 0; i < head.headers.length; i += 2) {
    const name = head.headers[i]!.toLowerCase()
    if (name === "expect" || (length !== undefined && name === "content-length")) continue
    text += `${head.headers[i]}: ${head.headers[i + 1]}\r\n`
  }
  if (length !== undefined) text += `Content-Length: ${length}\r\n`
  return Buffer.from(text + "\r\n", "latin1")
}

export const makeBodyInspection = (options: BodyInspectionOptions): BodyInspection => {
  const reading = new Set<net.Socket>()
  let closed = false

  const refuse = (socket: net.Socket, status: number, message: string, report = true) => {
    reading.delete(socket)
    if (report) options.onRefuse(status, message)
    socket.resume() // discard what else arrives until the client reads the answer and leaves
    writeRawError(socket, dockerErrors, status, message)
    closeAfterFlush(socket)
  }

  const take = (endpoint: BodyEndpoint | undefined, method: string, path: string, label: ContainerLabel | undefined) => (raw: net.Socket, bytes: Buffer): void => {
    const socket = raw as MarkedSocket
    const accept = socket[servedBy]
    const step = requestHeadReader(options.headLimits).push(bytes)
    if (step._tag !== "Head" || accept === undefined) {
      socket.destroy()
      return
    }
    if (closed) {
      socket.resume()
      writeRawError(socket, dockerErrors, 503, "switchyard: shutting down")
      closeAfterFlush(socket)
      return
    }
    reading.add(socket)
    const head = step.head
    const policy = options.policy()
    const fail = (verdict: Extract<BodyVerdict, { _tag: "Refuse" }>) =>
      refuse(socket, verdict.status, bodyRefusalMessage(options.ruleSetName(), method, path, verdict))
    if (head.framing._tag === "Chunked") {
      return refuse(
        socket,
        411,
        `switchyard socket-proxy: ${method} ${path}: the body policy reads bodies with a Content-Length only (chunked bodies are refused)`
      )
    }
    const length = head.framing._tag === "Length" ? head.framing.length : 0
    if (length > policy.maxBodyBytes) {
      return fail({ _tag: "Refuse", status: 413, field: "", check: undefined, reason: `a body larger than ${policy.maxBodyBytes} bytes is not read` })
    }
    // The head to put back: as handed over, without `Expect: 100-continue`, answered here.
    let headBytes = bytes.subarray(0, bytes.length - step.rest.length)
    if (head.expectContinue) headBytes = headWith(head, undefined)
    const chunks: Array<Buffer> = [step.rest]
    let have = step.rest.length
    const started = performance.now()
    let timer: NodeJS.Timeout | undefined
    const stop = () => {
      if (timer !== undefined) clearInterval(timer)
      socket.off("data", onData)
      socket.off("close", onGone)
      socket.off("end", onGone)
      socket.off("error", onGone)
    }
    const finish = () => {
      stop()
      socket.pause()
      const all = Buffer.concat(chunks, have)
      const body = all.subarray(0, length)
      const verdict = endpoint === undefined ? undefined : checkBody(policy, endpoint, body)
      if (verdict?._tag === "Refuse") {
        if (verdict.status !== 403 || options.learning?.() !== true || endpoint === undefined) return fail(verdict)
        const learned = learnBody(policy, endpoint, body)
        if (learned.verdict._tag === "Refuse") return fail(learned.verdict)
        for (const r of learned.refusals) options.onWouldRefuse?.(r.verdict, r.value, method, path)
      }
      let forwarded = all
      if (label !== undefined) {
        const labelled = labelBody(body, label)
        if (labelled._tag === "Refuse") {
          return refuse(socket, labelled.status, `switchyard socket-proxy: ${method} ${path} refused by the label scope of rule set "${options.ruleSetName()}": ${labelled.reason}`)
        }
        if (labelled._tag === "Rewritten") {
          headBytes = headWith(head, labelled.body.length)
          forwarded = Buffer.concat([labelled.body, all.subarray(length)])
        }
      }
      reading.delete(socket)
      socket[passedBody] = { method: head.method, target: head.target }
      socket.unshift(Buffer.concat([headBytes, forwarded]))
      accept(socket)
      socket.resume()
    }
    const onData = (chunk: Buffer) => {
      chunks.push(chunk)
      have += chunk.length
      if (have >= length) finish()
    }
    const onGone = () => {
      stop()
      reading.delete(socket)
      socket.destroy()
    }
    if (have >= length) return finish()
    if (head.expectContinue) socket.write(CONTINUE)
    socket.on("data", onData)
    socket.once("close", onGone)
    socket.once("end", onGone)
    socket.once("error", onGone)
    if (options.minBytesPerSecond > 0) {
      timer = setInterval(() => {
        if (requestBodyTooSlow(options.minBytesPerSecond, options.gracePeriodMs, have - step.rest.length, performance.now() - started)) {
          stop()
          options.onSlowBody({ limit: "request_body_rate", client: socket.remoteAddress ?? "local", method: head.method, target: head.target })
          refuse(socket, 408, `switchyard socket-proxy: request body arrived slower than ${options.minBytesPerSecond} bytes/s`, false)
        }
      }, RATE_CHECK_INTERVAL_MS)
      timer.unref()
    }
    socket.resume()
  }

  return {
    servedBy: (socket, accept) => {
      ;(socket as MarkedSocket)[servedBy] = accept
    },
    passed: (request) => {
      const socket = request.socket as MarkedSocket
      const mark = socket[passedBody]
      if (mark === undefined) return false
      socket[passedBody] = undefined
      return mark.method === request.method && mark.target === request.target ? true : "mismatch"
    },
    admission: (endpoint, method, path, label) => ({ _tag: "Handoff", take: take(endpoint, method, path, label) }),
    close: () => {
      closed = true
      for (const socket of reading) socket.destroy()
      reading.clear()
    }
  }
}
