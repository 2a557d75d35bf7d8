/**
 * Node's own HTTP/1.1 parser (llhttp, strict: `insecureHTTPParser: false`) as a test oracle: one reused
 * `node:http` server is handed in-memory sockets (`server.emit("connection", duplex)`), each fed one input,
 * and reports which requests it completed (method, target, raw fields, body, raw trailers) and whether it
 * refused the bytes. No TCP, no responses: the server's writes are dropped.
 */
import * as http from "node:http"
import { Duplex } from "node:stream"

/** One request as a parser read it: its head, and once it ended, its body and trailers. */
export interface ParsedRequest {
  readonly method: string
  readonly target: string
  readonly versionMinor: number
  /** Flat `[name, value, ...]` as received. */
  readonly headers: ReadonlyArray<string>
  /** The body ended (for an upgrade: the head was read). */
  readonly complete: boolean
  /** The body as delivered (chunk framing removed); empty while it has not ended. */
  readonly body: Buffer
  /** Flat `[name, value, ...]` of the trailer section. */
  readonly trailers: ReadonlyArray<string>
  /** The request switched protocols (`Connection: upgrade` with `Upgrade`): bytes after it are not HTTP. */
  readonly upgrade: boolean
}

/** How parsing of one input ended. */
export type Terminal =
  /** No error and no open body (bytes of an unfinished head are not visible from outside llhttp). */
  | { readonly _tag: "End" }
  /** The last request's body is still open. */
  | { readonly _tag: "Pending" }
  | { readonly _tag: "Error"; readonly code: string }
  /** The last request switched protocols; later bytes are not parsed. */
  | { readonly _tag: "Upgraded" }

export interface OracleTrace {
  readonly requests: ReadonlyArray<ParsedRequest>
  readonly terminal: Terminal
}

/** A head limit above switchyard's own, so llhttp is never the stricter one on size alone. */
const ORACLE_MAX_HEADER_SIZE = 256 * 1024
/** Rounds of `setImmediate` to wait for a socket's events to settle (parsing itself is synchronous). */
const SETTLE_ROUNDS = 3

interface Probe {
  /** Requests whose head arrived, in order (a body may still be open). */
  readonly requests: Array<ParsedRequest>
  error: string | undefined
  upgraded: boolean
}

const probes = new WeakMap<object, Probe>()

/** A socket whose writes are dropped and whose reads are the bytes pushed into it. */
const memorySocket = (): Duplex =>
  new Duplex({
    read() {},
    write(_chunk, _encoding, callback) {
      callback()
    }
  })

const headOf = (req: http.IncomingMessage, upgrade: boolean): ParsedRequest => ({
  method: req.method ?? "",
  target: req.url ?? "",
  versionMinor: req.httpVersionMinor,
  headers: [...req.rawHeaders],
  upgrade,
  complete: upgrade,
  body: Buffer.alloc(0),
  trailers: []
})

/** Records one request's head, collects its body, and marks it complete on `end`. */
const collect = (req: http.IncomingMessage, socket: object): void => {
  const probe = probes.get(socket)
  if (probe === undefined) return
  const index = probe.requests.length
  probe.requests.push(headOf(req, false))
  const parts: Array<Buffer> = []
  req.on("data", (b: Buffer) => parts.push(b))
  req.on("error", () => {})
  req.on("end", () => {
    probe.requests[index] = { ...probe.requests[index]!, complete: true, body: Buffer.concat(parts), trailers: [...req.rawTrailers] }
  })
}

export interface Oracle {
  /** Feeds each input to a fresh in-memory connection and reports what llhttp made of it. */
  readonly parseAll: (inputs: ReadonlyArray<Buffer>) => Promise<Array<OracleTrace>>
  readonly close: () => void
}

export const makeOracle = (): Oracle => {
  const server = http.createServer({
    insecureHTTPParser: false,
    maxHeaderSize: ORACLE_MAX_HEADER_SIZE,
    requireHostHeader: false,
    requestTimeout: 0,
    // Upgrades are reported through the `upgrade` event, whoever listens.
    shouldUpgradeCallback: () => true
  })
  server.maxHeadersCount = 0
  const onRequest = (req: http.IncomingMessage): void => collect(req, req.socket)
  server.on("request", onRequest)
  // Expectations are answered by llhttp's caller, not by llhttp: treat them as plain requests.
  server.on("checkContinue", onRequest)
  server.on("checkExpectation", onRequest)
  const onSwitch = (req: http.IncomingMessage, socket: Duplex): void => {
    const probe = probes.get(socket)
    if (probe === undefined) return
    // What follows the head (a body included) is the upgraded connection's data, not HTTP.
    probe.requests.push(headOf(req, true))
    probe.upgraded = true
  }
  server.on("upgrade", onSwitch)
  server.on("connect", onSwitch)
  server.on("clientError", (err: Error & { code?: string }, socket: Duplex) => {
    const probe = probes.get(socket)
    // The socket stays open until the batch settles, so a request completed before the error still reports its end.
    if (probe !== undefined && probe.error === undefined) probe.error = err.code ?? err.message
  })

  const parseAll = async (inputs: ReadonlyArray<Buffer>): Promise<Array<OracleTrace>> => {
    const sockets = inputs.map(() => {
      const socket = memorySocket()
      probes.set(socket, { requests: [], error: undefined, upgraded: false })
      server.emit("connection", socket)
      return socket
    })
    inputs.forEach((input, i) => sockets[i]!.push(input))
    for (let round = 0; round < SETTLE_ROUNDS; round++) await new Promise((resolve) => setImmediate(resolve))
    const traces = sockets.map((socket): OracleTrace => {
      const probe = probes.get(socket)!
      const requests = probe.requests
      const terminal: Terminal =
        probe.error !== undefined
          ? { _tag: "Error", code: probe.error }
          : probe.upgraded
          ? { _tag: "Upgraded" }
          : requests.length > 0 && !requests[requests.length - 1]!.complete
          ? { _tag: "Pending" }
          : { _tag: "End" }
      return { requests, terminal }
    })
    for (const socket of sockets) {
      probes.delete(socket)
      socket.destroy()
    }
    return traces
  }

  return { parseAll, close: () => server.close() }
}
