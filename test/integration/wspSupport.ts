/**
 * Shared pieces for the wsp tests: configs, a real destination HTTP server that records what reached
 * it, a caller that talks to `/request`, and waiting on conditions in real time.
 */
import * as http from "node:http"
import { setTimeout as sleep } from "node:timers/promises"
import { Effect, Redacted } from "effect"
import type { Scope } from "effect"
import { allowAll } from "../../src/domain/DestinationRules.ts"
import type { DestinationRules } from "../../src/domain/DestinationRules.ts"
import type { WspClientConfig, WspServerConfig } from "../../src/domain/WspConfig.ts"

export const secret = "ThisIsASecret"

export const serverConfig = (overrides: Partial<WspServerConfig> = {}): WspServerConfig => ({
  host: "127.0.0.1",
  port: 0,
  timeout: 1000,
  idleTimeout: 60_000,
  secretKey: Redacted.make(secret),
  rules: allowAll,
  requestKey: undefined,
  maxMessageSize: 256 * 1024 * 1024,
  maxHeaders: 256,
  maxConcurrentRequests: 1024,
  maxConnectionsPerPool: 1000,
  maxPools: 100,
  pingInterval: 0,
  responseTimeout: 60_000,
  openRegistration: false,
  ...overrides
})

export const clientConfig = (target: string, overrides: Partial<WspClientConfig> = {}): WspClientConfig => ({
  id: "test-client",
  targets: [target],
  poolIdleSize: 2,
  poolMaxSize: 10,
  secretKey: Redacted.make(secret),
  rules: allowAll as DestinationRules,
  maxMessageSize: 256 * 1024 * 1024,
  maxHeaders: 256,
  pingInterval: 0,
  backoffInitial: 50,
  backoffMax: 500,
  maskFrames: true,
  ...overrides
})

export interface Destination {
  readonly port: number
  readonly url: (path: string) => string
  /** Requests that reached the destination, in order. */
  readonly seen: Array<{ method: string; url: string; headers: http.IncomingHttpHeaders; bodyLength: number }>
  /** Highest number of requests it was serving at once. */
  readonly maxConcurrent: () => number
  /** Finishes the oldest `/hold` response still open; false when none is. */
  readonly release: () => boolean
  /** Request body bytes received so far, counted as they arrive. */
  readonly bytesArrived: () => number
}

/**
 * A real HTTP server: `/echo` answers the method and body back, `/bytes?n=` sends n bytes of a
 * pattern, `/stream?chunks=&size=` sends chunks without a length, `/slow?ms=` answers after a delay,
 * `/hold` sends "first\n" and the rest ("second\n") only when `release()` is called.
 */
export const destination: Effect.Effect<Destination, never, Scope.Scope> = Effect.acquireRelease(
  Effect.promise(async () => {
    const seen: Destination["seen"] = []
    const held: Array<() => void> = []
    let arrived = 0
    let current = 0
    let max = 0
    const server = http.createServer((req, res) => {
      current++
      max = Math.max(max, current)
      res.once("close", () => current--)
      const chunks: Array<Buffer> = []
      req.on("data", (c: Buffer) => {
        arrived += c.length
        chunks.push(c)
      })
      req.on("end", () => {
        const body = Buffer.concat(chunks)
        seen.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers, bodyLength: body.length })
        const url = new URL(req.url ?? "/", "http://x")
        if (url.pathname === "/echo") {
          res.writeHead(200, {
            "Content-Type": "application/octet-stream",
            "Content-Length": String(body.length),
            "X-Method": req.method ?? ""
          })
          res.end(body)
        } else if (url.pathname === "/bytes") {
          const n = Number(url.searchParams.get("n") ?? "0")
          const buf = Buffer.alloc(n)
          for (let i = 0; i < n; i++) buf[i] = i % 251
          res.writeHead(200, { "Content-Length": String(n) })
          res.end(buf)
        } else if (url.pathname === "/stream") {
          const chunks = Number(url.searchParams.get("chunks") ?? "10")
          const size = Number(url.searchParams.get("size") ?? "1000")
          res.writeHead(200, { "Content-Type": "text/plain" })
          let i = 0
          const next = () => {
            if (i === chunks) {
              res.end()
              return
            }
            res.write(Buffer.alloc(size, 97 + (i % 26)))
            i++
            setImmediate(next)
          }
          next()
        } else if (url.pathname === "/hold") {
          res.writeHead(200, { "Content-Type": "text/plain" })
          res.write("first\n")
          held.push(() => res.end("second\n"))
        } else if (url.pathname === "/slow") {
          const t = setTimeout(() => res.end("slow"), Number(url.searchParams.get("ms") ?? "100"))
          res.once("close", () => clearTimeout(t))
        } else {
          res.writeHead(404)
          res.end("not found")
        }
      })
    })
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
    const port = (server.address() as { port: number }).port
    return { server, port, seen, max: () => max, held, arrived: () => arrived }
  }),
  ({ server }) =>
    Effect.promise(() => new Promise<void>((resolve) => {
      server.close(() => resolve())
      server.closeAllConnections()
    }))
).pipe(Effect.map(({ port, seen, max, held, arrived }) => ({
  port,
  url: (p: string) => `http://127.0.0.1:${port}${p}`,
  seen,
  maxConcurrent: max,
  release: () => {
    const next = held.shift()
    next?.()
    return next !== undefined
  },
  bytesArrived: arrived
})))

export interface Reply {
  readonly status: number
  readonly headers: http.IncomingHttpHeaders
  readonly body: Buffer
}

/** Calls the wsp server's `/request` (or any path) with a fresh connection and reads the whole reply. */
export const call = (
  port: number,
  options: { path?: string; method?: string; destination?: string; body?: Buffer; headers?: Record<string, string> }
): Promise<Reply> =>
  new Promise((resolve, reject) => {
    const headers: Record<string, string> = { ...options.headers }
    if (options.destination !== undefined) headers["X-Proxy-Destination"] = options.destination
    const req = http.request(
      { host: "127.0.0.1", port, path: options.path ?? "/request", method: options.method ?? "GET", headers, agent: false },
      (res) => {
        const chunks: Array<Buffer> = []
        res.on("data", (c: Buffer) => chunks.push(c))
        res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }))
        res.on("error", reject)
      }
    )
    req.on("error", reject)
    req.end(options.body)
  })

export const callE = (port: number, options: Parameters<typeof call>[1]) => Effect.promise(() => call(port, options))

/** Waits (in real time, polling) until `condition` holds, failing after `timeoutMs`. */
export const waitFor = (what: string, condition: () => boolean, timeoutMs = 5_000) =>
  Effect.promise(async () => {
    const deadline = Date.now() + timeoutMs
    while (!condition()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
      await sleep(10)
    }
  })

/** A pattern buffer of `n` bytes. */
export const pattern = (n: number, seed = 7): Buffer => {
  const buf = Buffer.alloc(n)
  for (let i = 0; i < n; i++) buf[i] = (i * 31 + seed) & 0xff
  return buf
}

/** A message a hand-driven WebSocket end received. */
export interface WsMessage {
  readonly data: Buffer
  readonly isBinary: boolean
}

/** The messages a hand-driven WebSocket end received, taken one at a time in arrival order. */
export class MessageInbox {
  readonly inbox: Array<WsMessage> = []
  closed = false
  closeCode = 0
  private waiting: (() => void) | undefined

  /** Records a message (for the subclass's `message` listener). */
  protected received(message: WsMessage): void {
    this.inbox.push(message)
    this.waiting?.()
  }

  /** Records the close (for the subclass's `close` listener). */
  protected ended(code: number): void {
    this.closed = true
    this.closeCode = code
    this.waiting?.()
  }

  /** The next message, in real time; fails once the connection closed with none left. */
  next(): Promise<WsMessage> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const m = this.inbox.shift()
        if (m !== undefined) {
          this.waiting = undefined
          resolve(m)
        } else if (this.closed) reject(new Error("connection closed"))
        else this.waiting = check
      }
      check()
    })
  }
}
