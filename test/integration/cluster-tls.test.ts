/**
 * TLS routes across a cluster of three gateways on Debian's `redis-server`: a TLS route whose backend
 * is connected to g1 only answers through g2 and g3 with g1's certificate (the others read the
 * ClientHello's name and relay the raw TLS; the certificate and key never leave g1), over HTTP/1.1,
 * HTTP/2 and `then: tcp`, with the public client in X-Forwarded-For and every response delivered; a
 * gateway with a local backend of the route terminates TLS itself; with the holder killed, a connection
 * is refused at once; a ClientHello without a name or for an unknown name is refused as on any TLS
 * port; one larger than 16 KiB or too slow is cut, counted and said.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import * as http2 from "node:http2"
import * as https from "node:https"
import * as net from "node:net"
import * as tls from "node:tls"
import { X509Certificate } from "node:crypto"
import { Effect } from "effect"
import { Redis } from "ioredis"
import { MaxClientHelloBytes } from "../../src/domain/TlsClientHello.ts"
import { DefaultTlsHandshakeTimeoutMs } from "../../src/services/Listeners.ts"
import { listen } from "../../src/runtime/listen.ts"
import { freePort, get, sample } from "../runtime/serverProcess.ts"
import { makeCertificate } from "../services/ListenersFixtures.ts"
import { requireRedis } from "../support/redis.ts"
import { cleanups, type Gateway, ServedWithinMs, startGateway, Token, waitForOutput, withRedis } from "./clusterHarness.ts"

interface TlsReply {
  readonly status: number
  readonly body: string
  readonly fingerprint: string
}

const httpsGet = (host: string, port: number, servername: string, ca: string, p: string, timeoutMs = 2_000): Promise<TlsReply> =>
  new Promise((resolve, reject) => {
    const req = https.get({ host, port, servername, ca, path: p, agent: false, timeout: timeoutMs, headers: { host: servername } }, (res) => {
      const fingerprint = (res.socket as tls.TLSSocket).getPeerX509Certificate()?.fingerprint256 ?? ""
      let body = ""
      res.setEncoding("utf8")
      res.on("data", (c) => (body += c))
      res.on("end", () => resolve({ status: res.statusCode!, body, fingerprint }))
      res.on("error", reject)
    })
    req.on("timeout", () => req.destroy(new Error(`no answer from ${host}:${port} within ${timeoutMs} ms`)))
    req.on("error", reject)
  })

/** One HTTP/2 request (ALPN h2) to `https://servername` through `host:port`. */
const h2Get = (host: string, port: number, servername: string, ca: string, p: string): Promise<string> =>
  new Promise((resolve, reject) => {
    const session = http2.connect(`https://${servername}:${port}`, { host, servername, ca })
    const timer = setTimeout(() => {
      session.destroy()
      reject(new Error(`no HTTP/2 answer from ${host}:${port} within 5 s`))
    }, 5_000)
    session.on("error", (e) => {
      clearTimeout(timer)
      reject(e)
    })
    const stream = session.request({ ":path": p })
    let body = ""
    stream.setEncoding("utf8")
    stream.on("data", (c) => (body += c))
    stream.on("end", () => {
      clearTimeout(timer)
      session.close()
      resolve(body)
    })
    stream.on("error", reject)
  })

/** Retries until `https://servername` through `host:port` answers 200, failing after `ServedWithinMs`. */
const servedOverTls = async (host: string, port: number, servername: string, ca: string, p: string): Promise<TlsReply> => {
  const deadline = Date.now() + ServedWithinMs
  let last = "nothing"
  while (Date.now() < deadline) {
    try {
      const reply = await httpsGet(host, port, servername, ca, p)
      if (reply.status === 200) return reply
      last = `${reply.status} ${reply.body}`
    } catch (e) {
      last = (e as Error).message
    }
    await new Promise((r) => setTimeout(r, 100))
  }
  throw new Error(`https://${servername}${p} through ${host}:${port} not served within ${ServedWithinMs} ms: ${last}`)
}

/** How a TLS connection attempt ended: the handshake's outcome, then what the server sent back. */
const tlsAttempt = (host: string, port: number, options: tls.ConnectionOptions, send?: string): Promise<string> =>
  new Promise((resolve) => {
    const socket = tls.connect({ host, port, ...options }, () => {
      if (send === undefined) return
      socket.write(send)
    })
    const timer = setTimeout(() => {
      socket.destroy()
      resolve("no outcome within 5 s")
    }, 5_000)
    socket.on("data", (d) => {
      clearTimeout(timer)
      socket.end()
      resolve(`data:${d.toString()}`)
    })
    socket.on("error", (e) => {
      clearTimeout(timer)
      resolve(`error:${e.message}`)
    })
    socket.on("close", () => {
      clearTimeout(timer)
      resolve("closed")
    })
  })

/** Writes raw bytes to `host:port` and resolves with how long the gateway took to close the connection. */
const closedAfter = (host: string, port: number, write: (socket: net.Socket) => void, boundMs: number): Promise<number> =>
  new Promise((resolve, reject) => {
    const started = Date.now()
    const socket = net.connect({ host, port }, () => write(socket))
    const timer = setTimeout(() => {
      socket.destroy()
      reject(new Error(`the gateway did not close the connection within ${boundMs} ms`))
    }, boundMs)
    socket.on("error", () => {})
    socket.on("close", () => {
      clearTimeout(timer)
      resolve(Date.now() - started)
    })
  })

const startTlsBackends = async (g: Gateway, port: number) => {
  const app = makeCertificate("app.test")
  const raw = makeCertificate("raw.test")
  const web = await listen(
    { port, tls: { domainSuffix: "app.test", cert: app.cert, key: app.key, then: "http" } },
    { server: `127.0.0.1:${g.control.port}`, token: Token, timeoutMs: 20_000 }
  )
  const server = web.serve(http.createServer((req, res) => res.end(`web ${req.url} host=${req.headers.host} xff=${req.headers["x-forwarded-for"]}`)))
  const echo = await listen(
    { port, tls: { domainSuffix: "raw.test", cert: raw.cert, key: raw.key, then: "tcp" } },
    { server: `127.0.0.1:${g.control.port}`, token: Token, timeoutMs: 20_000 }
  )
  echo.on("connection", (socket: net.Socket) => {
    socket.on("data", (d) => socket.write(`echo:${d.toString()}`))
    socket.on("end", () => socket.end())
  })
  cleanups.push(() => new Promise<void>((resolve) => web.close(() => { server.close(); resolve() })))
  cleanups.push(() => new Promise<void>((resolve) => echo.close(() => resolve())))
  return { app, raw }
}

describe.runIf(requireRedis())("cluster TLS passthrough", () => {
  it.live("a TLS route on g1 answers through g2 and g3 with g1's certificate; no name or an unknown name is refused", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const gateways = await Promise.all([0, 1, 2].map((i) => startGateway(redis, i, undefined, ["--set", "log.access_log=true"])))
      const port = await freePort()
      const { app, raw } = await startTlsBackends(gateways[0]!, port)
      const appFingerprint = new X509Certificate(app.cert).fingerprint256
      for (const g of gateways) {
        const reply = await servedOverTls(g.host, port, "app.test", app.cert, `/from-${g.node}`)
        // the public client, as g1 saw it in the relay stream's preamble (the relaying gateway cannot add to the encrypted request)
        assert.match(reply.body, new RegExp(`^web /from-${g.node} host=app\\.test xff=127\\.0\\.0\\.1$`))
        assert.strictEqual(reply.fingerprint, appFingerprint)
        // HTTP/2 (ALPN h2), terminated where the certificate is
        assert.strictEqual(await h2Get(g.host, port, "app.test", app.cert, `/h2-${g.node}`), `web /h2-${g.node} host=app.test:${port} xff=127.0.0.1`)
        // raw TLS: the backend reads the plaintext g1 decrypted
        assert.strictEqual(await tlsAttempt(g.host, port, { servername: "raw.test", ca: raw.cert }, `hi ${g.node}`), `data:echo:hi ${g.node}`)
      }
      // the holder's access log and metrics say the requests were relayed, and by which gateway
      await waitForOutput(gateways[0]!.output, /log=access .*path=\/from-g2 .*node=g1 relayed=true/)
      await waitForOutput(gateways[0]!.output, /log=access .*path=\/from-g1 .*node=g1 relayed=false/)
      const inbound = (await get(gateways[0]!.admin.port, "/metrics")).body
      assert.isAtLeast(sample(inbound, "switchyard_cluster_relayed_requests_total", { direction: "in", node: "g3" }), 1)
      // one connection after another, each closed by the holder after its response (Connection: close):
      // every response reaches the client before the relayed stream closes
      for (let i = 0; i < 30; i++) {
        const reply = await httpsGet(gateways[1 + (i % 2)]!.host, port, "app.test", app.cert, `/n${i}`)
        assert.strictEqual(reply.body, `web /n${i} host=app.test xff=127.0.0.1`)
      }
      for (const g of gateways.slice(1)) {
        // the relaying gateways list the routes with relay backends only: nothing of them is local there
        const status = JSON.parse((await get(g.admin.port, "/status")).body)
        const route = status.routes.find((r: { route: string }) => r.route === `tls:${port}:app.test:http:/`)
        assert.deepStrictEqual(route.backends.length, 1, JSON.stringify(status.routes))
        assert.match(route.backends[0], /^relay g1 127\.0\.0\.1:\d+$/)
        // no name (an IP address is not sent as SNI), or a name no route has: the handshake fails as on any TLS port
        assert.match(await tlsAttempt(g.host, port, { ca: app.cert, checkServerIdentity: () => undefined }), /^(error|closed)/)
        assert.match(await tlsAttempt(g.host, port, { servername: "other.test", ca: app.cert }), /^(error|closed)/)
      }
      // only g1 ever held the certificate: the others' leases carry the name, never the PEM
      const store = new Redis(redis.port, "127.0.0.1", { lazyConnect: true, maxRetriesPerRequest: 1 })
      cleanups.push(async () => void store.disconnect())
      await store.connect()
      const keys = (await store.keys("switchyard:lease:*")).filter((k) => k.includes(":tls:"))
      assert.strictEqual(keys.length, 2, JSON.stringify(keys))
      for (const key of keys) {
        const value = (await store.get(key)) ?? ""
        assert.notInclude(value, "BEGIN")
        assert.include(value, `"domainSuffix"`)
      }
    }))

  it.live("where the route has a local backend, TLS is terminated there with that backend's certificate", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const [g1, g2] = await Promise.all([0, 1].map((i) => startGateway(redis, i)))
      const port = await freePort()
      const { app } = await startTlsBackends(g1!, port)
      await servedOverTls(g2!.host, port, "app.test", app.cert, "/relayed")
      // a backend of the same route on g2, with a certificate of its own
      const own = makeCertificate("app.test")
      const local = await listen(
        { port, tls: { domainSuffix: "app.test", cert: own.cert, key: own.key, then: "http" } },
        { server: `127.0.0.1:${g2!.control.port}`, token: Token, timeoutMs: 20_000 }
      )
      const server = local.serve(http.createServer((req, res) => res.end(`local ${req.url}`)))
      cleanups.push(() => new Promise<void>((resolve) => local.close(() => { server.close(); resolve() })))
      const ownFingerprint = new X509Certificate(own.cert).fingerprint256
      for (let i = 0; i < 5; i++) {
        const reply = await servedOverTls(g2!.host, port, "app.test", own.cert, `/local-${i}`)
        assert.strictEqual(reply.body, `local /local-${i}`)
        assert.strictEqual(reply.fingerprint, ownFingerprint)
      }
      // g1 still serves its own backend with its own certificate
      const atG1 = await servedOverTls(g1!.host, port, "app.test", app.cert, "/g1")
      assert.strictEqual(atG1.fingerprint, new X509Certificate(app.cert).fingerprint256)
    }))

  it.live("with its holder gone (killed with -9), a relaying gateway refuses the TLS connection at once rather than holding it", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const [g1, g2] = await Promise.all([0, 1].map((i) => startGateway(redis, i)))
      const port = await freePort()
      const { app } = await startTlsBackends(g1!, port)
      await servedOverTls(g2!.host, port, "app.test", app.cert, "/before")
      await g1!.stop("SIGKILL")
      await waitForOutput(g2!.output, /relay link to 127\.0\.0\.1:\d+ down/)
      // no holder reachable: handed to g2's own TLS termination, which has no certificate for the name
      assert.match(await tlsAttempt(g2!.host, port, { servername: "app.test", ca: app.cert }), /^(error|closed)/)
    }))

  it.live("a ClientHello sent a byte at a time is relayed; one larger than 16 KiB or slower than the TLS handshake timeout is cut, counted and said", () =>
    Effect.promise(async () => {
      const redis = await withRedis()
      const gateways = await Promise.all([0, 1].map((i) => startGateway(redis, i)))
      const port = await freePort()
      const { app } = await startTlsBackends(gateways[0]!, port)
      const g2 = gateways[1]!
      await servedOverTls(g2.host, port, "app.test", app.cert, "/ready")
      // a ClientHello that arrives a byte at a time is read whole and relayed
      const trickle = net.createServer((client) => {
        const upstream = net.connect({ host: g2.host, port, noDelay: true })
        let first = true
        client.on("data", (chunk: Buffer) => {
          if (!first) return void upstream.write(chunk)
          first = false
          client.pause()
          let i = 0
          const next = () => {
            if (i === chunk.length) return void client.resume()
            upstream.write(chunk.subarray(i, ++i))
            setTimeout(next, 1)
          }
          next()
        })
        upstream.pipe(client)
        client.on("error", () => upstream.destroy())
        upstream.on("error", () => client.destroy())
        client.on("close", () => upstream.destroy())
      })
      await new Promise<void>((resolve) => trickle.listen(0, "127.0.0.1", resolve))
      cleanups.push(() => new Promise<void>((resolve) => trickle.close(() => resolve())))
      const tricklePort = (trickle.address() as net.AddressInfo).port
      const trickled = await httpsGet("127.0.0.1", tricklePort, "app.test", app.cert, "/trickled", 8_000)
      assert.strictEqual(trickled.body, "web /trickled host=app.test xff=127.0.0.1")
      // one handshake record that would hold more than the limit: cut once the limit is read
      const record = Buffer.alloc(5 + 0x4000 + 1_000)
      record.set([0x16, 0x03, 0x03, 0x40, 0x00, 0x01, 0x00, 0x4f, 0xfc])
      await closedAfter(g2.host, port, (socket) => socket.write(record), 5_000)
      // half a ClientHello, then nothing: cut after the handshake timeout
      await closedAfter(g2.host, port, (socket) => socket.write(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x40, 0x01])), DefaultTlsHandshakeTimeoutMs + 5_000)
      await waitForOutput(g2.output, new RegExp(`level=warn.*whose TLS ClientHello was larger than ${MaxClientHelloBytes} bytes`, "i"))
      await waitForOutput(g2.output, /level=warn.*did not send its TLS ClientHello within the TLS handshake timeout/i)
      const metrics = (await get(g2.admin.port, "/metrics")).body
      assert.strictEqual(sample(metrics, "switchyard_connection_limit_closes_total", { front_door: "public", reason: "ClientHelloTooLarge" }), 1)
      assert.strictEqual(sample(metrics, "switchyard_connection_limit_closes_total", { front_door: "public", reason: "ClientHelloTimeout" }), 1)
      // the port still serves
      assert.strictEqual((await httpsGet(g2.host, port, "app.test", app.cert, "/after")).body, "web /after host=app.test xff=127.0.0.1")
    }))
})
