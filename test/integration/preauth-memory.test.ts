/**
 * `switchyard server` as a process: a few hundred connections that each try to send a 1 MiB `Hello`
 * before authenticating (from 20 loopback addresses, so the per-address cap does not turn them away)
 * are closed from their length prefix, and the gateway's resident memory barely moves. Before the
 * `Hello` limit each one held its megabyte.
 */
import { assert, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as net from "node:net"
import { cleanupsPerTest } from "../support/leaks.ts"
import { addressAfter, spawnSwitchyard } from "../runtime/serverProcess.ts"

const cleanups = cleanupsPerTest()

/** Connections opened, each announcing and sending (all but one byte of) a 1 MiB `Hello`. */
const Connections = 300
/** Most the gateway's resident set may grow while they try (it grew by about 190 MB without the limit). */
const MaxGrowthBytes = 64 * 1024 * 1024
/** Longest wait for the gateway to close them all. */
const CloseTimeoutMs = 15_000

const residentBytes = (pid: number): number => {
  const status = fs.readFileSync(`/proc/${pid}/status`, "utf8")
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) * 1024
}

describe("switchyard server before authentication", () => {
  it.skipIf(process.platform !== "linux")("keeps its memory while hundreds of peers send 1 MiB Hellos without a token", async () => {
    const proc = spawnSwitchyard(["server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0"], { SWITCHYARD_TOKEN: "preauth-memory-token-5c1d" })
    cleanups.push(() => proc.stop("SIGKILL"))
    await proc.waitFor("expose a local service")
    const control = addressAfter(proc.output(), /control port/)
    const pid = proc.child.pid!
    await new Promise((resolve) => setTimeout(resolve, 300))
    const before = residentBytes(pid)

    const body = Buffer.alloc(1024 * 1024, 0x61)
    const prefix = Buffer.alloc(4)
    prefix.writeUInt32BE(body.length)
    const sockets: Array<net.Socket> = []
    cleanups.push(async () => sockets.forEach((s) => s.destroy()))
    let closed = 0
    let peak = before
    const allClosed = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${Connections - closed} connections still open after ${CloseTimeoutMs} ms`)), CloseTimeoutMs)
      for (let i = 0; i < Connections; i++) {
        const socket = net.createConnection({ host: control.host, port: control.port, localAddress: `127.0.1.${2 + (i % 20)}` })
        sockets.push(socket)
        socket.on("error", () => {})
        socket.on("connect", () => {
          socket.write(prefix)
          socket.write(body.subarray(0, body.length - 1))
        })
        socket.on("close", () => {
          peak = Math.max(peak, residentBytes(pid))
          if (++closed === Connections) {
            clearTimeout(timer)
            resolve()
          }
        })
      }
    })
    await allClosed
    await new Promise((resolve) => setTimeout(resolve, 300))
    peak = Math.max(peak, residentBytes(pid))
    assert.isBelow(peak - before, MaxGrowthBytes, `resident memory grew from ${before} to ${peak} bytes`)
    await proc.waitFor(/HelloTooLarge/)
  }, 60_000)
})
