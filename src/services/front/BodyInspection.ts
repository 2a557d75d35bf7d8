/**
 * Judges the body of a socket-proxy request before anything of it goes upstream: an upstream reached
 * by messages that stands in front of the Engine's. The engine reads the body for it (Content-Length
 * only: a chunked body gets 411), at most `maxBodyBytes` (413 before a byte is read) and at the
 * client-limit rate; the whole body is judged by `checkBody`, then either refused in Docker's error
 * shape or sent to the Engine over a pooled connection, byte for byte, or, for a create under a label
 * scope, as its labelled rewrite (`labelBody`) with the Content-Length to match. It holds at most one
 * body per exchange, and the exchange reads no further request meanwhile.
 */
import { Buffer } from "node:buffer"
import type { Duplex } from "node:stream"
import { type BodyEndpoint, type BodyPolicy, bodyRefusalMessage, type BodyVerdict, checkBody } from "../../domain/BodyPolicy.ts"
import { headerValue } from "../../domain/HttpHeaders.ts"
import { type ContainerLabel, labelBody } from "../../domain/LabelScope.ts"
import { learnBody } from "../../domain/RuleLearning.ts"
import { dockerErrors, writeRawError } from "../forward/ErrorResponse.ts"
import type { ExchangeFront, MessageUpstream } from "../forward/Exchange.ts"

export interface BodyInspectionOptions {
  readonly policy: () => BodyPolicy
  readonly ruleSetName: () => string
  /** Told each refusal: status and message (for the log and the counters). */
  readonly onRefuse: (status: number, message: string) => void
  /**
   * Learning mode: a body the policy refuses (403) only by switches is forwarded, and `onWouldRefuse`
   * told each refusal (`learnBody`); one that no switch allows is still refused.
   */
  readonly learning?: (() => boolean) | undefined
  /** Told each refusal of a body learning mode forwarded: the verdict and the value a list switch needs. */
  readonly onWouldRefuse?:
    | ((verdict: Extract<BodyVerdict, { _tag: "Refuse" }>, value: string | undefined, method: string, path: string) => void)
    | undefined
  /** Sends an allowed exchange on to the Engine (a pooled HTTP/1.1 connection). */
  readonly forward: (front: ExchangeFront) => void
}

export interface BodyInspection {
  /**
   * The upstream that reads the request body, judges it as `endpoint` (unless `undefined`) and, with
   * `label`, adds the label to it; `onAllowed` is told when the exchange goes on to the Engine.
   */
  readonly upstream: (
    endpoint: BodyEndpoint | undefined,
    method: string,
    path: string,
    label: ContainerLabel | undefined,
    onAllowed: () => void
  ) => MessageUpstream
  /** Answers the exchanges whose body is being read 503, and later ones too (shutdown). */
  readonly close: () => void
}

/**
 * `front` with its body already read: the Engine reads `body` (with the Content-Length to match) and
 * no `Expect`, which the engine answered when it started reading.
 */
const replaying = (front: ExchangeFront, body: Buffer): ExchangeFront => {
  const headers: Array<string> = []
  const fields = front.request.headers
  for (let i = 0; i < fields.length; i += 2) {
    const name = fields[i]!.toLowerCase()
    if (name !== "content-length" && name !== "expect") headers.push(fields[i]!, fields[i + 1]!)
  }
  if (body.length > 0 || front.request.hasBody) headers.push("Content-Length", String(body.length))
  return {
    ...front,
    request: { ...front.request, headers, hasBody: body.length > 0 },
    readBody: (onData, onEnd) => {
      if (body.length > 0) onData(body)
      onEnd(undefined)
    },
    resumeBody: () => {}
  }
}

export const makeBodyInspection = (options: BodyInspectionOptions): BodyInspection => {
  const reading = new Set<ExchangeFront>()
  let closed = false

  const refuse = (front: ExchangeFront, status: number, message: string) => {
    reading.delete(front)
    options.onRefuse(status, message)
    front.fail(status, message)
  }

  const upstream = (
    endpoint: BodyEndpoint | undefined,
    method: string,
    path: string,
    label: ContainerLabel | undefined,
    onAllowed: () => void
  ): MessageUpstream => ({
    exchange: (front) => {
      if (closed) return front.fail(503, "switchyard: shutting down")
      const policy = options.policy()
      const fail = (verdict: Extract<BodyVerdict, { _tag: "Refuse" }>) =>
        refuse(front, verdict.status, bodyRefusalMessage(options.ruleSetName(), method, path, verdict))
      const declared = headerValue(front.request.headers, "content-length")
      if (front.request.hasBody && declared === undefined) {
        return refuse(
          front,
          411,
          `switchyard socket-proxy: ${method} ${path}: the body policy reads bodies with a Content-Length only (chunked bodies are refused)`
        )
      }
      const length = declared === undefined ? 0 : Number(declared)
      if (length > policy.maxBodyBytes) {
        return fail({ _tag: "Refuse", status: 413, field: "", check: undefined, reason: `a body larger than ${policy.maxBodyBytes} bytes is not read` })
      }
      const judge = (body: Buffer) => {
        reading.delete(front)
        if (front.isGone()) return
        const verdict = endpoint === undefined ? undefined : checkBody(policy, endpoint, body)
        if (verdict?._tag === "Refuse") {
          if (verdict.status !== 403 || options.learning?.() !== true || endpoint === undefined) return fail(verdict)
          const learned = learnBody(policy, endpoint, body)
          if (learned.verdict._tag === "Refuse") return fail(learned.verdict)
          for (const r of learned.refusals) options.onWouldRefuse?.(r.verdict, r.value, method, path)
        }
        let forwarded = body
        if (label !== undefined) {
          const labelled = labelBody(body, label)
          if (labelled._tag === "Refuse") {
            return refuse(front, labelled.status, `switchyard socket-proxy: ${method} ${path} refused by the label scope of rule set "${options.ruleSetName()}": ${labelled.reason}`)
          }
          if (labelled._tag === "Rewritten") forwarded = labelled.body
        }
        onAllowed()
        options.forward(replaying(front, forwarded))
      }
      if (!front.request.hasBody) return judge(Buffer.alloc(0))
      reading.add(front)
      front.onGone(() => reading.delete(front))
      // the engine bounds the body by its Content-Length, checked above against `maxBodyBytes`
      const chunks: Array<Buffer> = []
      let have = 0
      front.readBody((chunk) => {
        chunks.push(chunk)
        have += chunk.length
        return true
      }, () => judge(Buffer.concat(chunks, have)))
    },
    upgrade: (_request, _protocol, socket: Duplex) => {
      // no endpoint with a judged body switches protocols
      const message = `switchyard socket-proxy: ${method} ${path}: a request whose body the policy reads cannot upgrade`
      options.onRefuse(400, message)
      writeRawError(socket, dockerErrors, 400, message)
    }
  })

  return {
    upstream,
    close: () => {
      closed = true
      for (const front of [...reading]) front.fail(503, "switchyard: shutting down")
      reading.clear()
    }
  }
}
