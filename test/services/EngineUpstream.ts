/**
 * A small upstream on a Unix socket that behaves the way the Docker Engine API documents for the parts
 * Podman cannot exercise here: `101 UPGRADED` hijacks with multiplexed stdout frames and half-close,
 * streams that never end, trailers, large bodies written with backpressure. It records every request it
 * sees, so tests can assert that refused requests never arrived.
 */
import * as fs from "node:fs"
import * as http from "node:http"
import type * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import type { Duplex } from "node:stream"

export interface Seen {
  readonly method: string
  readonly url: string
  readonly rawHeaders: ReadonlyArray<string>
}

export interface EngineUpstream {
  readonly socketPath: string
  readonly seen: Array<Seen>
  /** Requests whose client went away before the response finished. */
  readonly aborted: Array<string>
  /** Bytes written so far by `/big` responses. */
  readonly bigSent: () => number
  readonly close: () => Promise<void>
}

/** Writes the chunks `next` gives until it gives none, waiting for `drain` when the response is full; then ends it. */
const writeAll = (res: http.ServerResponse, next: () => Buffer | undefined): void => {
  const pump = () => {
    for (let chunk = next(); chunk !== undefined; chunk = next()) {
      if (!res.write(chunk)) return void res.once("drain", pump)
    }
    res.end()
  }
  pump()
}

/** `n` bytes in which every 4-byte word holds its own offset: a byte out of place changes the hash. */
export const patternBytes = (n: number): Buffer => {
  const b = Buffer.alloc(n)
  for (let i = 0; i + 4 <= n; i += 4) b.writeUInt32BE(i, i)
  return b
}

/** Docker's stdout frame: stream 1, three zero bytes, big-endian length, payload. */
export const stdoutFrame = (payload: Buffer): Buffer => {
  const head = Buffer.alloc(8)
  head[0] = 1
  head.writeUInt32BE(payload.length, 4)
  return Buffer.concat([head, payload])
}

const STREAM_CHUNK = Buffer.alloc(64 * 1024, 0x61)
const TICK_MS = 5

export const startEngineUpstream = async (): Promise<EngineUpstream> => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-engine-"))
  const socketPath = path.join(dir, "engine.sock")
  const seen: Array<Seen> = []
  const aborted: Array<string> = []
  const timers = new Set<NodeJS.Timeout>()
  const sockets = new Set<Duplex>()
  let bigSent = 0

  const server = http.createServer((req, res) => {
    seen.push({ method: req.method!, url: req.url!, rawHeaders: req.rawHeaders })
    const url = new URL(req.url!, "http://engine")
    res.on("close", () => {
      if (!res.writableFinished) aborted.push(url.pathname)
    })
    switch (url.pathname) {
      case "/v1.41/_ping":
      case "/_ping":
      case "/small":
      case "/v1.41/small":
        res.writeHead(200, { "content-type": "text/plain", "api-version": "1.41" }).end("OK")
        return
      case "/headers":
        res.writeHead(200, { "content-type": "application/json", connection: "keep-alive, x-upstream-hop", "x-upstream-hop": "1", "keep-alive": "timeout=77" })
        res.end(JSON.stringify(req.rawHeaders))
        return
      case "/echo": {
        res.writeHead(200, { "content-type": "application/octet-stream", trailer: "x-request-trailers" })
        req.pipe(res, { end: false })
        req.on("end", () => {
          res.addTrailers({ "x-request-trailers": JSON.stringify(req.trailers) })
          res.end()
        })
        return
      }
      case "/trailers":
        res.writeHead(200, { "content-type": "text/plain", trailer: "x-checksum" })
        res.write("part one,")
        res.write("part two")
        res.addTrailers({ "x-checksum": "abc123" })
        res.end()
        return
      case "/v1.41/events":
      case "/forever": {
        res.writeHead(200, { "content-type": "application/json" })
        res.flushHeaders()
        let n = 0
        const t = setInterval(() => {
          res.write(JSON.stringify({ status: "tick", n: n++ }) + "\n")
        }, TICK_MS)
        timers.add(t)
        res.on("close", () => {
          clearInterval(t)
          timers.delete(t)
        })
        return
      }
      case "/big": {
        const total = Number(url.searchParams.get("bytes") ?? "0")
        res.writeHead(200, { "content-type": "application/octet-stream", "content-length": String(total) })
        let left = total
        writeAll(res, () => {
          if (left === 0) return undefined
          const chunk = left >= STREAM_CHUNK.length ? STREAM_CHUNK : STREAM_CHUNK.subarray(0, left)
          left -= chunk.length
          bigSent += chunk.length
          return chunk
        })
        return
      }
      case "/v1.41/pattern": {
        // `bytes` of a pattern no two 64 KiB blocks share (`patternBytes`), in writes of varied sizes
        const total = Number(url.searchParams.get("bytes") ?? "0")
        res.writeHead(200, { "content-type": "application/octet-stream", "content-length": String(total) })
        const body = patternBytes(total)
        let at = 0
        let step = 0
        writeAll(res, () => {
          if (at === body.length) return undefined
          const n = Math.min(body.length - at, [1000, 70_000, 300_000, 5][step++ % 4]!)
          at += n
          return body.subarray(at - n, at)
        })
        return
      }
      case "/containers/create":
      case "/v1.41/containers/create": {
        // Like the Engine: reads the whole JSON body, then answers.
        let n = 0
        req.on("data", (c: Buffer) => (n += c.length))
        req.on("end", () => res.writeHead(201, { "content-type": "application/json" }).end(JSON.stringify({ Id: `c${n}`, Warnings: [] })))
        return
      }
      case "/v1.41/containers/web/archive":
        // An upload streamed to the Engine (not read by the body policy): answered once it is whole.
        req.resume()
        req.on("end", () => res.writeHead(200).end())
        return
      case "/silent":
        // Sends a head and one line, then nothing: an idle stream.
        res.writeHead(200, { "content-type": "application/json" })
        res.write("{}\n")
        return
      case "/slow": {
        // Answers after `ms` milliseconds.
        const t = setTimeout(() => {
          timers.delete(t)
          res.writeHead(200, { "content-type": "text/plain" }).end("late")
        }, Number(url.searchParams.get("ms") ?? "0"))
        timers.add(t)
        return
      }
      case "/never":
        // Holds the request without answering.
        return
      default:
        res.writeHead(404, { "content-type": "application/json" }).end(JSON.stringify({ message: `no such route ${url.pathname}` }))
    }
  })
  server.on("connection", (s: net.Socket) => {
    sockets.add(s)
    s.on("close", () => sockets.delete(s))
  })
  server.on("upgrade", (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    seen.push({ method: req.method!, url: req.url!, rawHeaders: req.rawHeaders })
    sockets.add(socket)
    socket.on("close", () => sockets.delete(socket))
    socket.on("error", () => socket.destroy())
    const url = new URL(req.url!, "http://engine")
    if (/^\/(v[\d.]+\/)?exec\/[^/]+\/start$/.test(url.pathname) && req.headers.upgrade === "tcp") {
      // Like the Engine: read exec start's JSON body first, then hijack.
      const length = Number(req.headers["content-length"] ?? "0")
      let body = head
      const answer = () => {
        socket.write("HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
        socket.write(stdoutFrame(Buffer.from(`body ${body.subarray(0, length).toString()}\n`)))
        const rest = body.subarray(length)
        if (rest.length > 0) socket.write(stdoutFrame(Buffer.from(rest.toString().toUpperCase())))
        socket.on("data", (d: Buffer) => socket.write(stdoutFrame(Buffer.from(d.toString().toUpperCase()))))
        socket.on("end", () => socket.end(stdoutFrame(Buffer.from("exit 0\n"))))
      }
      if (body.length >= length) return answer()
      const collect = (d: Buffer) => {
        body = Buffer.concat([body, d])
        if (body.length >= length) {
          socket.off("data", collect)
          answer()
        }
      }
      socket.on("data", collect)
      return
    }
    if (!/^\/(v[\d.]+\/)?containers\/[^/]+\/attach$/.test(url.pathname) || req.headers.upgrade !== "tcp") {
      socket.end(`HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 26\r\nConnection: close\r\n\r\n{"message":"no such exec"}`)
      return
    }
    socket.write(
      "HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
    )
    if (head.length > 0) socket.write(stdoutFrame(Buffer.from(head.toString().toUpperCase())))
    socket.on("data", (d: Buffer) => socket.write(stdoutFrame(Buffer.from(d.toString().toUpperCase()))))
    // stdin closed (half-close): the "process" prints its last output and exits, closing stdout.
    // `?tail=N` makes that last output N bytes, so a fast close after a large write can be checked.
    const tail = Number(url.searchParams.get("tail") ?? "0")
    socket.on("end", () => socket.end(tail > 0 ? stdoutFrame(Buffer.alloc(tail, 0x7a)) : stdoutFrame(Buffer.from("exit 0\n"))))
  })
  await new Promise<void>((resolve) => server.listen(socketPath, resolve))
  return {
    socketPath,
    seen,
    aborted,
    bigSent: () => bigSent,
    close: () =>
      new Promise<void>((resolve) => {
        for (const t of timers) clearInterval(t)
        timers.clear()
        for (const s of sockets) s.destroy()
        server.close(() => {
          fs.rmSync(dir, { recursive: true, force: true })
          resolve()
        })
        server.closeAllConnections()
      })
  }
}
