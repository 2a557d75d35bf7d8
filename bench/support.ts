/**
 * Shared helpers for `npm run bench`: every figure is printed as `<suite>.<figure>: <value> <unit>`,
 * one per line, so runs can be compared and recorded in docs/PERFORMANCE.md.
 */
import type * as http from "node:http"
import * as net from "node:net"
import { performance } from "node:perf_hooks"

/** A port that was free on 127.0.0.1 a moment ago. */
export const freePort = (): Promise<number> =>
  new Promise((resolve) => {
    const server = net.createServer()
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as net.AddressInfo).port
      server.close(() => resolve(port))
    })
  })

/** Answers with `body` (Content-Length set), written `sliceBytes` at a time with backpressure. */
export const sendInSlices = (
  res: Pick<http.ServerResponse, "writeHead" | "write" | "end" | "once">,
  body: Buffer,
  sliceBytes: number
): void => {
  res.writeHead(200, { "content-length": String(body.length) })
  let offset = 0
  const write = (): void => {
    while (offset < body.length) {
      const end = Math.min(offset + sliceBytes, body.length)
      const ok = res.write(body.subarray(offset, end))
      offset = end
      if (!ok) return void res.once("drain", write)
    }
    res.end()
  }
  write()
}

/** Prints one figure. */
export const report = (suite: string, figure: string, value: number, unit: string): void => {
  const shown = Number.isInteger(value) ? String(value) : value.toFixed(Math.abs(value) >= 100 ? 1 : 3)
  process.stdout.write(`${suite}.${figure}: ${shown} ${unit}\n`)
}

/** The value at quantile `q` (0..1) of `samples`. */
export const quantile = (samples: ReadonlyArray<number>, q: number): number => {
  if (samples.length === 0) return Number.NaN
  const sorted = [...samples].sort((a, b) => a - b)
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))
  return sorted[i]!
}

/** Milliseconds since an arbitrary origin, with sub-millisecond precision. */
export const now = (): number => performance.now()

/** Runs `f` and returns how many milliseconds it took. */
export const timed = async (f: () => Promise<unknown>): Promise<number> => {
  const start = now()
  await f()
  return now() - start
}

/** Megabytes (10^6 bytes) per second. */
export const mbps = (bytes: number, ms: number): number => bytes / 1e6 / (ms / 1000)
