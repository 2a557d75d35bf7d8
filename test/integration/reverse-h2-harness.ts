/**
 * Loopback fixtures for the reverse-HTTP/2 tests: a gateway (routing table, dispatcher, public listeners
 * and the tunnel port), plain Node `http2` backends that dial the tunnel port themselves, and a public
 * HTTP/1.1 client that reports aborted responses instead of hiding them.
 */
import * as http from "node:http"
import type * as http2 from "node:http2"
import * as net from "node:net"
import { Effect, Layer, type Scope } from "effect"
import { encodeHeaderBlock, HpackDecoder } from "../../src/domain/Hpack.ts"
import {
  ClientPreface,
  DefaultMaxFrameBytes,
  encodeDataHeader,
  encodeHeaders,
  encodePing,
  encodeSettings,
  Flag,
  FrameType,
  Http2FrameParser,
  SettingsAck
} from "../../src/domain/Http2Frame.ts"
import { Dispatcher } from "../../src/services/Dispatcher.ts"
import { Forwarder } from "../../src/services/Forwarder.ts"
import { tcpUpstream } from "../../src/services/forward/Upstream.ts"
import { Listeners } from "../../src/services/Listeners.ts"
import { Registry } from "../../src/services/Registry.ts"
import { ReverseH2, type ReverseH2Config } from "../../src/services/front/ReverseH2.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"

/** Registry + Dispatcher + Listeners forwarding through the shared Forwarder, plus the tunnel port. */
export const gatewayLayer = (config: ReverseH2Config) => {
  const core = Layer.unwrap(Effect.gen(function*() {
    const forwarder = yield* Forwarder.make({
      // routed requests go to their leased backend; this default is never reached
      upstream: tcpUpstream("127.0.0.1", 9, { maxSockets: 1, maxFreeSockets: 0 }),
      responseTimeoutMs: 0,
      idleTimeoutMs: 0
    })
    return Layer.effect(
      Listeners,
      Listeners.make({ host: "127.0.0.1", forwarder })
    )
  })).pipe(Layer.provideMerge(Dispatcher.layer()), Layer.provideMerge(Registry.layer({ gracePeriod: "30 seconds" })))
  return ReverseH2.layer({ address: { host: "127.0.0.1", port: 0 }, ...config }).pipe(Layer.provideMerge(core))
}

/** Runs `body` with a fresh gateway, then checks that nothing it opened is left. */
export const withGateway = <A, E>(
  config: ReverseH2Config,
  body: Effect.Effect<A, E, ReverseH2 | Listeners | Registry | Dispatcher | Scope.Scope>
) =>
  Effect.gen(function*() {
    const before = activeHandles()
    const result = yield* body.pipe(Effect.scoped, Effect.provide(gatewayLayer(config)))
    yield* Effect.promise(() => expectNoLeaks(before))
    return result
  })

/** A port that was free a moment ago on 127.0.0.1. */
export { freePort } from "../support/ports.ts"

/** Lets I/O run until `check` holds (bounded by `tries` turns of the event loop with a short pause). */
export const until = (check: () => boolean, what: string, tries = 500) =>
  Effect.promise(async () => {
    for (let i = 0; i < tries; i++) {
      if (check()) return
      await new Promise((resolve) => setTimeout(resolve, 10))
    }
    throw new Error(`timed out waiting for ${what}`)
  })

/**
 * A Node `http2` server dialing the tunnel port, ptth-style: no switchyard code, the connection it
 * opened is handed to the server as if it had been accepted. Closed with the scope.
 */
export const dialBackend = (tunnelPort: number, server: http2.Http2Server) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<net.Socket>((resolve, reject) => {
        const socket = net.connect({ host: "127.0.0.1", port: tunnelPort }, () => {
          socket.off("error", reject)
          socket.on("error", () => socket.destroy())
          server.emit("connection", socket)
          resolve(socket)
        })
        socket.once("error", reject)
      })
    ),
    (socket) => Effect.sync(() => socket.destroy())
  )

/** Closes an `http2` server that only served dialed connections. */
export const closeServer = (server: http2.Http2Server) =>
  Effect.addFinalizer(() => Effect.promise(() => new Promise<void>((resolve) => server.close(() => resolve()))))

export interface Reply {
  readonly status: number
  readonly headers: http.IncomingHttpHeaders
  readonly body: string
  readonly trailers: NodeJS.Dict<string>
  /** True when the response ended before its end (connection cut). */
  readonly aborted: boolean
}

/** One public request (no connection reuse); an aborted response is reported, not thrown. */
export const request = (
  port: number,
  path: string,
  options: { method?: string; headers?: http.OutgoingHttpHeaders; body?: string | Buffer } = {}
): Promise<Reply> =>
  new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, path, method: options.method ?? "GET", headers: options.headers, agent: false })
    req.on("error", (error) => reject(error))
    req.on("response", (res) => {
      const chunks: Array<Buffer> = []
      let aborted = false
      res.on("data", (c: Buffer) => chunks.push(c))
      res.on("aborted", () => void (aborted = true))
      res.on("error", () => void (aborted = true))
      res.on("close", () =>
        resolve({
          status: res.statusCode ?? 0,
          headers: res.headers,
          body: Buffer.concat(chunks).toString(),
          trailers: res.trailers,
          aborted: aborted || !res.complete
        })
      )
    })
    if (options.body !== undefined) req.end(options.body)
    else req.end()
  })

/** The frames a scripted backend answers one request with (all written at once). */
export type ScriptedAnswer = (streamId: number, request: { readonly method: string; readonly path: string }) => ReadonlyArray<Buffer>

export interface ScriptedBackend {
  /** `METHOD path` of each request received, in order. */
  readonly requests: Array<string>
  /** `[stream id, error code]` of each RST_STREAM received from the gateway. */
  readonly resets: Array<readonly [number, number]>
  /** The backend's end of the tunnel connection (the gateway names the backend by it). */
  readonly localPort: number
}

/**
 * A backend written with the frame codec, for answers no HTTP/2 library would send (a body disagreeing
 * with its content-length, two content-length fields): it dials the tunnel port, exchanges SETTINGS,
 * answers PINGs and each request with `answer`'s frames. Closed with the scope.
 */
export const dialScriptedBackend = (tunnelPort: number, answer: ScriptedAnswer) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ readonly socket: net.Socket; readonly backend: ScriptedBackend }>((resolve, reject) => {
        const backend = { requests: [], resets: [], localPort: 0 } as { -readonly [K in keyof ScriptedBackend]: ScriptedBackend[K] }
        const decoder = new HpackDecoder(64 * 1024)
        let preface: Buffer | undefined = Buffer.alloc(0)
        const socket = net.connect({ host: "127.0.0.1", port: tunnelPort }, () => {
          socket.off("error", reject)
          socket.on("error", () => socket.destroy())
          socket.write(encodeSettings([]))
          backend.localPort = socket.localPort ?? 0
          resolve({ socket, backend })
        })
        const parser = new Http2FrameParser({ maxFrameBytes: DefaultMaxFrameBytes * 64, maxHeaderBlockBytes: 64 * 1024 }, {
          dataStart: () => {},
          data: () => {},
          dataEnd: () => {},
          headers: (id, _flags, block) => {
            const fields = decoder.decode(block)
            if (!Array.isArray(fields)) return void socket.destroy()
            const value = (name: string) => fields[fields.indexOf(name) + 1] ?? ""
            const request = { method: value(":method"), path: value(":path") }
            backend.requests.push(`${request.method} ${request.path}`)
            socket.write(Buffer.concat(answer(id, request)))
          },
          frame: (type, flags, id, payload) => {
            if (type === FrameType.SETTINGS && (flags & Flag.ACK) === 0) socket.write(SettingsAck)
            else if (type === FrameType.PING && (flags & Flag.ACK) === 0) socket.write(encodePing(payload, true))
            else if (type === FrameType.RST_STREAM) backend.resets.push([id, payload.readUInt32BE(0)])
          }
        })
        socket.on("data", (chunk: Buffer) => {
          if (preface !== undefined) {
            preface = Buffer.concat([preface, chunk])
            if (preface.length < ClientPreface.length) return
            chunk = preface.subarray(ClientPreface.length)
            preface = undefined
          }
          if (parser.push(chunk) !== undefined) socket.destroy()
        })
        socket.once("error", reject)
      })
    ),
    ({ socket }) => Effect.sync(() => socket.destroy())
  ).pipe(Effect.map(({ backend }) => backend))

/** A response head and a body as frames: `body` in one DATA frame ending the stream. */
export const scriptedResponse = (streamId: number, fields: ReadonlyArray<string>, body?: string): Array<Buffer> => {
  const head = encodeHeaders(streamId, encodeHeaderBlock(fields), body === undefined, DefaultMaxFrameBytes)
  if (body === undefined) return [head]
  const bytes = Buffer.from(body)
  return [head, encodeDataHeader(streamId, bytes.length, true), bytes]
}

/**
 * Writes `text` on one public connection and gathers every byte until the gateway closes it (bounded by
 * `timeoutMs`); the `Date` header is blanked so the bytes can be compared exactly.
 */
export const rawExchange = (port: number, text: string, timeoutMs = 5_000): Promise<string> =>
  new Promise((resolve, reject) => {
    const chunks: Array<Buffer> = []
    const socket = net.connect({ host: "127.0.0.1", port }, () => socket.write(text))
    const timer = setTimeout(() => {
      socket.destroy()
      reject(new Error(`the connection was not closed within ${timeoutMs} ms; got ${JSON.stringify(Buffer.concat(chunks).toString("latin1"))}`))
    }, timeoutMs)
    socket.on("data", (chunk: Buffer) => chunks.push(chunk))
    socket.on("error", () => {})
    socket.on("close", () => {
      clearTimeout(timer)
      resolve(Buffer.concat(chunks).toString("latin1").replace(/\r\nDate: [^\r]*\r\n/gi, "\r\nDate: -\r\n"))
    })
  })
