/**
 * A logging upstream for smuggling tests: it records every byte that reaches it, connection by
 * connection, exactly as received, and answers each complete request with a short `200` (keep-alive),
 * so the proxy in front of it behaves as with a real server. It never interprets a request beyond
 * finding where it ends; what the assertions look at is the raw log.
 */
import * as fs from "node:fs"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import type { Duplex } from "node:stream"
import { BodyFramer, Http1Error, requestHeadReader } from "../../src/domain/Http1Parser.ts"

export interface RawLog {
  /** Bytes received, one entry per connection, in the order connections arrived. */
  readonly connections: Array<Array<Buffer>>
  /** Everything received on every connection, concatenated in connection order (latin1). */
  readonly text: () => string
  /** Forgets what was logged (connections stay open and keep logging). */
  readonly clear: () => void
}

export const OK_RESPONSE = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

/**
 * Serves one connection: logs it into `log` and answers each request as it completes with `reply` (by
 * default `OK_RESPONSE`; one with `Connection: close` is followed by the close). Bytes it cannot read as
 * a request are logged and left unanswered.
 */
export const serveRaw = (log: RawLog, socket: Duplex, reply: (head: string) => string = () => OK_RESPONSE): void => {
  const mine: Array<Buffer> = []
  log.connections.push(mine)
  let reader = requestHeadReader({ maxHeaderSize: 64 * 1024, maxHeadersCount: 200 })
  let framer: BodyFramer | undefined
  let head = ""
  let broken = false
  socket.on("error", () => socket.destroy())
  socket.on("data", (chunk: Buffer) => {
    mine.push(Buffer.from(chunk))
    let rest = chunk
    while (!broken && rest.length > 0) {
      if (framer === undefined) {
        const step = reader.push(rest)
        if (step._tag === "Need") return
        if (step._tag === "Error") {
          broken = true
          return
        }
        head = rest.subarray(0, rest.length - step.rest.length).toString("latin1")
        framer = new BodyFramer(step.head.framing, 64 * 1024, 400)
        rest = step.rest
      }
      if (!framer.done) {
        const n = framer.consume(rest, 0)
        if (n instanceof Http1Error) {
          broken = true
          return
        }
        rest = rest.subarray(n)
      }
      if (framer.done) {
        framer = undefined
        reader = requestHeadReader({ maxHeaderSize: 64 * 1024, maxHeadersCount: 200 })
        const response = reply(head)
        socket.write(response)
        // A close-delimited or `Connection: close` answer ends the connection.
        if (/\r\nconnection: close\r\n/i.test(response.slice(0, response.indexOf("\r\n\r\n") + 2))) {
          socket.end()
          broken = true
        }
      }
    }
  })
}

export const makeRawLog = (): RawLog => {
  const connections: Array<Array<Buffer>> = []
  return {
    connections,
    text: () => connections.map((c) => Buffer.concat(c).toString("latin1")).join(""),
    clear: () => {
      for (const c of connections) c.length = 0
    }
  }
}

export interface RawUnixUpstream {
  readonly socketPath: string
  readonly log: RawLog
  /** Sets how requests are answered from now on. */
  readonly setReply: (reply: (head: string) => string) => void
  readonly close: () => Promise<void>
}

/** A logging upstream on a fresh Unix socket (the socket proxy's upstream). */
export const startRawUnixUpstream = async (): Promise<RawUnixUpstream> => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-raw-"))
  const socketPath = path.join(dir, "engine.sock")
  const log = makeRawLog()
  let reply: (head: string) => string = () => OK_RESPONSE
  const sockets = new Set<net.Socket>()
  const server = net.createServer((socket) => {
    sockets.add(socket)
    socket.once("close", () => sockets.delete(socket))
    serveRaw(log, socket, (head) => reply(head))
  })
  await new Promise<void>((resolve) => server.listen(socketPath, resolve))
  return {
    socketPath,
    log,
    setReply: (r) => void (reply = r),
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy()
        server.close(() => {
          fs.rmSync(dir, { recursive: true, force: true })
          resolve()
        })
      })
  }
}

/**
 * Sends `bytes` on a fresh TCP connection and half-closes it (unless `halfClose` is false: Docker
 * clients keep writing open), and returns everything the peer sent until it closed (bounded: the
 * connection is destroyed after `limitMs`).
 */
export const exchange = (port: number, bytes: string | Buffer, limitMs = 10_000, halfClose = true): Promise<string> =>
  new Promise((resolve, reject) => {
    const s = net.connect(port, "127.0.0.1")
    const out: Array<Buffer> = []
    const timer = setTimeout(() => {
      s.destroy()
      reject(new Error(`no close within ${limitMs} ms; received ${JSON.stringify(Buffer.concat(out).toString("latin1"))}`))
    }, limitMs)
    s.on("data", (d: Buffer) => out.push(d))
    s.on("error", () => {})
    s.on("close", () => {
      clearTimeout(timer)
      resolve(Buffer.concat(out).toString("latin1"))
    })
    if (halfClose) s.end(bytes)
    else s.write(bytes)
  })
