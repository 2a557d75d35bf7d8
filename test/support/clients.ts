/**
 * Loopback clients for limit and isolation tests: a bounded GET from a chosen local address (the healthy
 * tenant), and an upload whose body trickles in (the attacker).
 */
import * as http from "node:http"
import * as net from "node:net"

/** One GET on a connection of its own from `localAddress`; fails if no answer comes within `ms`. */
export const getFrom = (port: number, target: string, localAddress: string, ms: number): Promise<{ status: number; body: string }> =>
  new Promise((resolve, reject) => {
    const req = http.get({ host: "127.0.0.1", port, path: target, localAddress, agent: false }, (res) => {
      let body = ""
      res.on("data", (c) => (body += c))
      res.on("end", () => resolve({ status: res.statusCode!, body }))
    })
    req.setTimeout(ms, () => req.destroy(new Error(`no answer to GET ${target} from ${localAddress} within ${ms} ms`)))
    req.on("error", reject)
  })

export interface Trickler {
  readonly socket: net.Socket
  /** Resolves when the connection closed. */
  readonly closed: Promise<void>
  /** What was answered so far (latin1). */
  readonly text: () => string
}

/**
 * From 127.0.0.1: writes `head` (ending in the first body bytes), then one more `byte` every `everyMs`
 * while the connection stays open; collects what it is answered.
 */
export const trickle = (port: number, head: string, byte: string, everyMs: number): Trickler => {
  const socket = net.connect({ port, host: "127.0.0.1", localAddress: "127.0.0.1" })
  let received = ""
  socket.on("data", (d: Buffer) => (received += d.toString("latin1")))
  socket.on("error", () => {})
  socket.write(head)
  const timer = setInterval(() => {
    if (socket.writable) socket.write(byte)
  }, everyMs)
  const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()))
  void closed.then(() => clearInterval(timer))
  return { socket, closed, text: () => received }
}
