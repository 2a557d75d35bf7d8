/**
 * Debian's `redis-server` on loopback for the cluster tests: started on a free port in a fresh temporary
 * directory, without persistence, stopped (and restarted on the same port) by the test. In CI
 * (`CI=true`) a missing redis-server fails the tests; elsewhere they are skipped with the reason.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { freePort } from "../runtime/serverProcess.ts"
import { inCI, type PeerProbe } from "./peers.ts"

/** Longest wait for redis-server to accept connections after it starts, or to exit after a signal. */
export const RedisStartTimeoutMs = 15_000

/** Whether `redis-server` can be run: its name, or why not. */
export const redisBinary = (): PeerProbe<string> => {
  const run = spawnSync("redis-server", ["--version"], { encoding: "utf8" })
  if (run.error !== undefined || run.status !== 0) {
    return { value: undefined, reason: `redis-server is not installed (apt-get install -y redis-server): ${run.error?.message ?? run.stderr}` }
  }
  return { value: "redis-server", reason: undefined }
}

/** Fails in CI when redis-server is missing; elsewhere tells why the tests are skipped. */
export const requireRedis = (): boolean => {
  const probe = redisBinary()
  if (probe.value !== undefined) return true
  if (inCI) throw new Error(probe.reason)
  console.warn(`skipping the cluster tests: ${probe.reason}`)
  return false
}

export interface RedisServer {
  readonly port: number
  readonly url: string
  /** Stops it (SIGTERM, then SIGKILL after the timeout); resolves once it exited. */
  readonly stop: () => Promise<void>
  /** Starts it again on the same port, with no data. */
  readonly restart: () => Promise<void>
  /** Removes its directory after a stop. */
  readonly cleanup: () => Promise<void>
}

const startOn = (port: number, dir: string): Promise<ChildProcess> =>
  new Promise((resolve, reject) => {
    const child = spawn("redis-server", [
      "--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "notice"
    ], { stdio: ["ignore", "pipe", "pipe"] })
    let out = ""
    const timer = setTimeout(() => {
      child.kill("SIGKILL")
      reject(new Error(`redis-server did not accept connections within ${RedisStartTimeoutMs} ms:\n${out}`))
    }, RedisStartTimeoutMs)
    const onData = (d: Buffer) => {
      out += d.toString()
      if (out.includes("Ready to accept connections")) {
        clearTimeout(timer)
        child.stdout!.off("data", onData)
        child.stdout!.resume()
        child.stderr!.resume()
        resolve(child)
      }
    }
    child.stdout!.on("data", onData)
    child.stderr!.on("data", (d: Buffer) => (out += d.toString()))
    child.once("exit", (code) => {
      clearTimeout(timer)
      reject(new Error(`redis-server exited (${code}) before accepting connections:\n${out}`))
    })
  })

const stopChild = (child: ChildProcess): Promise<void> =>
  new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve()
    const timer = setTimeout(() => child.kill("SIGKILL"), RedisStartTimeoutMs)
    child.once("exit", () => {
      clearTimeout(timer)
      resolve()
    })
    child.kill("SIGTERM")
  })

/** Starts a private redis-server on a free loopback port. */
export const startRedis = async (): Promise<RedisServer> => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-redis-"))
  const port = await freePort()
  let child = await startOn(port, dir)
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    stop: () => stopChild(child),
    restart: async () => {
      await stopChild(child)
      child = await startOn(port, dir)
    },
    cleanup: async () => {
      await stopChild(child)
      fs.rmSync(dir, { recursive: true, force: true })
    }
  }
}
