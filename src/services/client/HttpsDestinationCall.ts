/**
 * One wsp request to an `https://` destination through Node's `https` client, behind the same
 * interface as the raw HTTP/1.1 exchange (`DestinationExchange`), so wsp-client relays both alike.
 * It does not check rules or build wsp messages; plain `http://` destinations never come here.
 */
import * as https from "node:https"
import type { ClientRequest, IncomingMessage, OutgoingHttpHeaders } from "node:http"
import type { DestinationCall, DestinationResponder } from "./DestinationExchange.ts"
import type { DestinationTarget, RequestBodyFraming } from "../../domain/DestinationRequestHead.ts"
import { goHeaderFromFields, responseContentLength } from "../../domain/DestinationRequestHead.ts"
import { withoutHopByHop } from "../../domain/WspMessage.ts"
import type { GoHeader } from "../../domain/WspMessage.ts"

const dropOnRequest: ReadonlySet<string> = new Set(["host", "content-length"])
const EMPTY = Buffer.alloc(0)

/**
 * Opens the request. Node hands over each response chunk in a fresh buffer; the latest is held until
 * the next turn of the event loop so that when the end follows at once the last chunk carries the end
 * (no empty closing frame) while a stream that pauses still has every chunk passed on without delay.
 * Returns the error message when the request cannot be made.
 */
export const httpsDestinationCall = (
  agent: https.Agent,
  target: DestinationTarget,
  method: string,
  header: GoHeader,
  contentLength: number,
  framing: RequestBodyFraming,
  maxHeaders: number,
  responder: DestinationResponder
): DestinationCall | string => {
  const headers: Record<string, ReadonlyArray<string> | string> = withoutHopByHop(header, dropOnRequest)
  if (framing === "Length") headers["Content-Length"] = String(contentLength)
  let req: ClientRequest
  try {
    req = https.request({
      host: target.host,
      port: target.port,
      path: target.path,
      method,
      headers: { Host: target.authority, ...headers } as OutgoingHttpHeaders,
      agent
    })
  } catch (e) {
    return (e as Error).message
  }
  let live = true
  let responded = false
  let res: IncomingMessage | undefined
  const fail = (message: string) => {
    if (!live) return
    live = false
    req.destroy()
    responder.failed(message, responded)
  }
  req.once("error", (err) => fail(responded ? `response body failed: ${err.message}` : err.message))
  req.on("drain", () => {
    if (live) responder.drained()
  })
  req.once("response", (incoming) => {
    res = incoming
    if (Object.keys(incoming.headersDistinct).length > maxHeaders) return fail(`more than ${maxHeaders} response headers`)
    responded = true
    const status = incoming.statusCode ?? 502
    const declared = incoming.headers["content-length"]
    const noBody = method === "HEAD" || status === 204 || status === 304
    responder.head(
      status,
      goHeaderFromFields(incoming.rawHeaders),
      responseContentLength(declared !== undefined && /^[0-9]+$/.test(declared) ? Number(declared) : undefined, noBody)
    )
    let held: Buffer | undefined
    let flushing = false
    const flush = () => {
      flushing = false
      if (held === undefined || !live) return
      const chunk = held
      held = undefined
      responder.data(chunk, false)
    }
    incoming.on("data", (chunk: Buffer) => {
      if (!live) return
      if (held !== undefined) responder.data(held, false)
      held = chunk
      if (!flushing) {
        flushing = true
        setImmediate(flush)
      }
    })
    incoming.once("end", () => {
      if (!live) return
      live = false
      const chunk = held ?? EMPTY
      held = undefined
      responder.data(chunk, true)
    })
    incoming.once("error", (err) => fail(`response body failed: ${err.message}`))
  })
  return {
    write: (chunk) => (live ? req.write(chunk) : true),
    end: () => {
      if (live) req.end()
    },
    pause: () => res?.pause(),
    resume: () => res?.resume(),
    holdChunk: () => undefined,
    destroy: () => {
      live = false
      req.destroy()
    }
  }
}
