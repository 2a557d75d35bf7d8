/**
 * Shared pieces for the yamux tests: session pairs over an in-memory connection or loopback TCP, echo
 * servers and byte helpers.
 */
import { Effect } from "effect"
import * as net from "node:net"
import type { Scope } from "effect"
import type { Frame, FrameType } from "../../../src/domain/Frame.ts"
import { encodeFrame, makeFrameParser } from "../../../src/domain/FrameCodec.ts"
import { fromSocket } from "../../../src/runtime/NodeTransport.ts"
import { type Connection, makeMemoryPair, type MemoryPairOptions } from "../../../src/services/Transport.ts"
import { type NodeYamuxSession, startSession } from "../../../src/services/yamux/NodeSession.ts"
import * as Session from "../../../src/services/yamux/Session.ts"
import type { YamuxStream } from "../../../src/services/yamux/Stream.ts"
import type { YamuxConfig } from "../../../src/services/yamux/YamuxConfig.ts"
import type { YamuxError } from "../../../src/services/yamux/YamuxError.ts"

export const sessionPair = (
  config?: Partial<YamuxConfig>,
  memory?: MemoryPairOptions
): Effect.Effect<
  { client: Session.YamuxSession; server: Session.YamuxSession; a: Connection; b: Connection },
  never,
  Scope.Scope
> =>
  Effect.gen(function*() {
    const [a, b] = makeMemoryPair(memory)
    const client = yield* Session.make(a, { role: "client", config })
    const server = yield* Session.make(b, { role: "server", config })
    return { client, server, a, b }
  })

/** Reads a stream to EOF. */
export const readAll = (stream: YamuxStream): Effect.Effect<Uint8Array, YamuxError> =>
  Effect.gen(function*() {
    const parts: Array<Uint8Array> = []
    let total = 0
    while (true) {
      const chunk = yield* stream.read()
      if (chunk === undefined) break
      parts.push(chunk)
      total += chunk.length
    }
    return concat(parts, total)
  })

/** Reads exactly `n` bytes (fails on early EOF). */
export const readExactly = (stream: YamuxStream, n: number): Effect.Effect<Uint8Array, YamuxError | Error> =>
  Effect.gen(function*() {
    const parts: Array<Uint8Array> = []
    let total = 0
    while (total < n) {
      const chunk = yield* stream.read()
      if (chunk === undefined) return yield* Effect.fail(new Error(`EOF after ${total} of ${n} bytes`))
      parts.push(chunk)
      total += chunk.length
    }
    return concat(parts, total)
  })

export const concat = (parts: ReadonlyArray<Uint8Array>, total = parts.reduce((n, p) => n + p.length, 0)) => {
  const out = new Uint8Array(total)
  let o = 0
  for (const p of parts) {
    out.set(p, o)
    o += p.length
  }
  return out
}

/** Deterministic pseudo-random bytes. */
export const pattern = (n: number, seed = 1): Uint8Array => {
  const out = new Uint8Array(n)
  let x = seed >>> 0 || 1
  for (let i = 0; i < n; i++) {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    out[i] = x & 0xff
  }
  return out
}

export const equalBytes = (a: Uint8Array, b: Uint8Array): boolean => Buffer.from(a).equals(Buffer.from(b))

/** Accepts streams forever and echoes each until the peer's FIN, then FINs. */
export const echoServer = (session: Session.YamuxSession): Effect.Effect<void, never, Scope.Scope> =>
  Effect.forkScoped(
    Effect.forever(
      Effect.gen(function*() {
        const stream = yield* session.accept()
        yield* Effect.forkScoped(
          Effect.gen(function*() {
            while (true) {
              const chunk = yield* stream.read()
              if (chunk === undefined) break
              yield* stream.write(chunk)
            }
            yield* stream.closeWrite()
          }).pipe(Effect.ignore)
        )
      })
    ).pipe(Effect.ignore)
  ).pipe(Effect.asVoid)

/** A hand-driven peer on a raw connection: sees every frame our session sends, sends any bytes. */
export interface RawPeer {
  readonly frames: Array<Frame>
  readonly send: (...frames: ReadonlyArray<Frame>) => void
  readonly sendBytes: (bytes: Uint8Array) => void
  readonly ended: () => boolean
  /** Waits (a few event-loop turns at a time) until `pred` holds for the frames seen. */
  readonly waitFor: (pred: (frames: ReadonlyArray<Frame>) => boolean) => Effect.Effect<void>
}

export const rawPeer = (conn: Connection): RawPeer => {
  const frames: Array<Frame> = []
  const parser = makeFrameParser({ maxFrameSize: 16 * 1024 * 1024 })
  let ended = false
  conn.start({
    onData: (chunk) => {
      const r = parser.push(chunk)
      frames.push(...r.frames)
    },
    onEnd: () => {
      ended = true
      conn.end()
    },
    onClose: () => {
      ended = true
    }
  })
  const sendBytes = (bytes: Uint8Array) => conn.write([bytes], () => {})
  return {
    frames,
    send: (...fs) => sendBytes(concat(fs.map(encodeFrame))),
    sendBytes,
    ended: () => ended,
    waitFor: (pred) =>
      Effect.gen(function*() {
        for (let i = 0; i < 10_000 && !pred(frames); i++) yield* Effect.promise(() => new Promise((r) => setImmediate(r)))
        if (!pred(frames)) return yield* Effect.die(new Error("condition not reached"))
      })
  }
}

export const frame = (type: FrameType, flags: number, streamId: number, length: number, body?: Uint8Array): Frame => ({
  type,
  flags,
  streamId,
  length: body ? body.length : length,
  body: type === 0 ? body ?? new Uint8Array(0) : undefined
})

/** Two sessions (`NodeSession`) over a real loopback TCP connection. */
export const tcpSessions = async (): Promise<{ client: NodeYamuxSession; server: NodeYamuxSession; close: () => Promise<void> }> => {
  const listener = net.createServer()
  await new Promise<void>((r) => listener.listen(0, "127.0.0.1", r))
  const accepted = new Promise<net.Socket>((r) => listener.once("connection", r))
  const dialed = net.connect((listener.address() as net.AddressInfo).port, "127.0.0.1")
  await new Promise((r) => dialed.once("connect", r))
  const server = await startSession(fromSocket(await accepted), { role: "server" })
  const client = await startSession(fromSocket(dialed), { role: "client" })
  return {
    client,
    server,
    close: async () => {
      await client.close()
      await server.close()
      await new Promise((r) => listener.close(r))
    }
  }
}
