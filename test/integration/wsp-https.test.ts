/**
 * wsp-client calling `https://` destinations: HTTP/1.1 on the pooled connections of the forwarding
 * core, over TLS verified against the process's trusted CAs (a real HTTPS server on loopback with a
 * throwaway certificate added to them for the test).
 */
import { afterAll, beforeAll, describe, expect, it } from "@effect/vitest"
import * as https from "node:https"
import type * as net from "node:net"
import * as tls from "node:tls"
import { Effect } from "effect"
import { makeWspClient } from "../../src/services/client/WspClient.ts"
import { makeWspServer } from "../../src/services/front/WspServer.ts"
import { noLeaks } from "../support/leaks.ts"
import { makeCertificate } from "../services/ListenersFixtures.ts"
import { callE, clientConfig, pattern, serverConfig, waitFor } from "./wspSupport.ts"

const trusted = makeCertificate("localhost")
const untrusted = makeCertificate("localhost")
const defaultCAs = tls.getCACertificates("default")

beforeAll(() => tls.setDefaultCACertificates([...defaultCAs, trusted.cert]))
afterAll(() => tls.setDefaultCACertificates(defaultCAs))

/** An HTTPS server: `/echo` answers the body back, `/bytes?n=` sends n bytes; the connections it saw. */
const httpsDestination = (certificate: { readonly cert: string; readonly key: string }) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ server: https.Server; port: number; sockets: Set<net.Socket> }>((resolve) => {
        const sockets = new Set<net.Socket>()
        const server = https.createServer({ cert: certificate.cert, key: certificate.key }, (req, res) => {
          const chunks: Array<Buffer> = []
          req.on("data", (c: Buffer) => chunks.push(c))
          req.on("end", () => {
            const url = new URL(req.url ?? "/", "https://x")
            if (url.pathname === "/echo") {
              const body = Buffer.concat(chunks)
              res.writeHead(200, { "Content-Length": String(body.length), "X-Method": req.method ?? "", "X-Host": req.headers.host ?? "" })
              res.end(body)
            } else {
              const n = Number(url.searchParams.get("n") ?? "0")
              res.writeHead(200, { "Content-Length": String(n) })
              res.end(pattern(n))
            }
          })
        })
        server.on("secureConnection", (s: net.Socket) => {
          sockets.add(s)
          s.once("close", () => sockets.delete(s))
        })
        server.listen(0, "127.0.0.1", () => resolve({ server, port: (server.address() as net.AddressInfo).port, sockets }))
      })
    ),
    ({ server }) =>
      Effect.promise(() =>
        new Promise<void>((resolve) => {
          server.close(() => resolve())
          server.closeAllConnections()
        })
      )
  )

const setup = Effect.gen(function*() {
  const server = yield* makeWspServer(serverConfig())
  const target = `ws://127.0.0.1:${server.address.port}/register`
  yield* makeWspClient(clientConfig(target))
  yield* waitFor("pool filled", () => server.stats().idle >= clientConfig(target).poolIdleSize)
  return server.address.port
})

describe("wsp-client: https:// destinations", () => {
  it.live("carries uploads and downloads over a verified TLS connection, reused across requests", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* httpsDestination(trusted)
      const port = yield* setup
      const body = pattern(700_000, 5)
      const up = yield* callE(port, { method: "POST", destination: `https://localhost:${dest.port}/echo`, body })
      expect(up.status).toBe(200)
      expect(up.headers["x-method"]).toBe("POST")
      expect(up.headers["x-host"]).toBe(`localhost:${dest.port}`)
      expect(Buffer.compare(up.body, body)).toBe(0)
      const n = 3 * 1024 * 1024 + 17
      const down = yield* callE(port, { destination: `https://localhost:${dest.port}/bytes?n=${n}` })
      expect(down.status).toBe(200)
      expect(Buffer.compare(down.body, pattern(n))).toBe(0)
      // sequential requests reuse the pooled TLS connection
      expect(dest.sockets.size).toBe(1)
    })))

  it.live("refuses a destination whose certificate is not trusted (527, naming the certificate)", () =>
    noLeaks(Effect.gen(function*() {
      const dest = yield* httpsDestination(untrusted)
      const port = yield* setup
      const reply = yield* callE(port, { destination: `https://localhost:${dest.port}/bytes?n=10` })
      expect(reply.status).toBe(527)
      expect(reply.body.toString()).toMatch(/certificate/i)
    })))
})
