/**
 * Loopback fixtures for the listener and tunnel tests: real HTTP and TCP servers as backends, a plain
 * HTTP client without connection reuse, free ports, and throwaway TLS certificates made with openssl.
 */
import { execFileSync } from "node:child_process"
import { mkdtempSync, readFileSync, rmSync } from "node:fs"
import * as http from "node:http"
import * as net from "node:net"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Scope } from "effect"
import type { Backend } from "../../src/services/Backend.ts"
import { tcpUpstream } from "../../src/services/forward/Upstream.ts"

/** A port that was free a moment ago on 127.0.0.1. */
export { freePort } from "../support/ports.ts"

/** Starts `server` on an ephemeral loopback port, closed (with its connections) when the scope closes. */
export const serve = <S extends net.Server>(server: S): Effect.Effect<number, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<number>((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as net.AddressInfo).port)))
    ),
    () =>
      Effect.promise(() =>
        new Promise<void>((resolve) => {
          if ("closeAllConnections" in server) (server as unknown as http.Server).closeAllConnections()
          server.close(() => resolve())
        })
      )
  )

/** An HTTP backend answering `text` to every request (and echoing method and path in headers). */
export const textServer = (text: string) =>
  serve(http.createServer((req, res) => {
    req.resume()
    req.on("end", () => {
      res.writeHead(200, { "content-type": "text/plain", "x-path": req.url ?? "" })
      res.end(text)
    })
  }))

/** A TCP echo server. */
export const echoServer = () =>
  serve(net.createServer({ allowHalfOpen: true }, (socket) => {
    socket.on("error", () => socket.destroy())
    socket.pipe(socket)
  }))

export interface DirectBackend extends Backend {
  /** Marks the backend gone and drops its pooled connections. */
  close(): void
}

/** A backend reaching a loopback server directly; its pooled connections close with the scope. */
export const directBackend = (id: string, port: number): Effect.Effect<DirectBackend, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const upstream = tcpUpstream("127.0.0.1", port, { maxSockets: 64, maxFreeSockets: 8 })
      let closed = false
      const backend: DirectBackend = {
        id,
        label: `direct ${id}`,
        inFlight: 0,
        upstream,
        connect: () => Effect.sync(() => net.createConnection({ host: "127.0.0.1", port, allowHalfOpen: true })),
        isClosed: () => closed,
        close: () => {
          closed = true
        }
      }
      return backend
    }),
    (backend) => Effect.sync(() => backend.close())
  )

export interface Response {
  readonly status: number
  readonly body: string
  readonly headers: http.IncomingHttpHeaders
}

/** One request on a fresh connection (no keep-alive, so nothing stays open). */
export const request = (port: number, path: string, host = "localhost", address = "127.0.0.1"): Promise<Response> =>
  new Promise((resolve, reject) => {
    const req = http.request({ host: address, port, path, headers: { host }, agent: false }, (res) => {
      const chunks: Array<Buffer> = []
      res.on("data", (c: Buffer) => chunks.push(c))
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString(), headers: res.headers }))
      res.on("error", reject)
    })
    req.on("error", reject)
    req.end()
  })

/** Sends `data` on a TCP connection, half-closes, and returns everything received. */
export const tcpRoundTrip = (port: number, data: string): Promise<string> =>
  new Promise((resolve, reject) => {
    const socket = net.createConnection({ host: "127.0.0.1", port, allowHalfOpen: true })
    const chunks: Array<Buffer> = []
    socket.on("data", (c: Buffer) => chunks.push(c))
    socket.on("end", () => {
      socket.end()
      resolve(Buffer.concat(chunks).toString())
    })
    socket.on("error", reject)
    socket.end(data)
  })

export interface TestCertificate {
  readonly cert: string
  readonly key: string
}

/** A self-signed certificate for `name` and `*.name`, made with the system's openssl. */
export const makeCertificate = (name: string): TestCertificate => {
  const dir = mkdtempSync(join(tmpdir(), "switchyard-cert-"))
  try {
    execFileSync("openssl", [
      "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
      "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem"), "-days", "2",
      "-subj", `/CN=${name}`, "-addext", `subjectAltName=DNS:${name},DNS:*.${name}`
    ], { stdio: "ignore" })
    return { cert: readFileSync(join(dir, "cert.pem"), "utf8"), key: readFileSync(join(dir, "key.pem"), "utf8") }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}
