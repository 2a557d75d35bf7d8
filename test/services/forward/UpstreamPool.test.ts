import { afterEach, assert, beforeEach, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { setTimeout as sleep } from "node:timers/promises"
import { unixUpstream } from "../../../src/services/forward/Upstream.ts"
import {
  type ConnectionOwner,
  type PooledConnection,
  UPSTREAM_READ_BUFFER_BYTES,
  UPSTREAM_READ_BUFFER_MAX_BYTES,
  UpstreamPool
} from "../../../src/services/forward/UpstreamPool.ts"
import { activeHandles, expectNoLeaks, type HandleCounts } from "../../support/leaks.ts"

const BURST = 4 * 1024 * 1024

let before: HandleCounts
let dir: string
let server: net.Server
const sockets = new Set<net.Socket>()

/** Each line received is answered with `BURST` bytes written at once. */
const startServer = async (socketPath: string): Promise<net.Server> => {
  const s = net.createServer((socket) => {
    sockets.add(socket)
    socket.on("close", () => sockets.delete(socket))
    socket.on("data", () => socket.write(Buffer.alloc(BURST, 0x61)))
  })
  await new Promise<void>((resolve) => s.listen(socketPath, resolve))
  return s
}

const waitFor = async (what: string, cond: () => boolean): Promise<void> => {
  for (let i = 0; i < 500; i++) {
    if (cond()) return
    await sleep(10)
  }
  throw new Error(`timed out waiting for ${what}`)
}

/** An exchange: records the size of every read it is given until `BURST` bytes came. */
const exchange = (pool: UpstreamPool, reads: Array<number>): Promise<PooledConnection> =>
  new Promise((resolve, reject) => {
    let got = 0
    pool.acquire({
      granted: (conn) => {
        const owner: ConnectionOwner = {
          upstreamData: (chunk) => {
            reads.push(chunk.length)
            got += chunk.length
            if (got === BURST) {
              pool.release(conn, true)
              resolve(conn)
            }
          },
          upstreamEnd: () => reject(new Error("ended")),
          upstreamClose: () => reject(new Error("closed")),
          upstreamDrain: () => {}
        }
        conn.owner = owner
        conn.socket.write("go\n")
      },
      refused: (message) => reject(new Error(message))
    }, false)
  })

beforeEach(async () => {
  before = activeHandles()
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-pool-test-"))
  server = await startServer(path.join(dir, "up.sock"))
})

afterEach(async () => {
  for (const s of sockets) s.destroy()
  await new Promise<void>((resolve) => server.close(() => resolve()))
  fs.rmSync(dir, { recursive: true, force: true })
  await expectNoLeaks(before)
})

describe("UpstreamPool", () => {
  it("reads a streaming response in large reads, and starts the next exchange with a small buffer again", async () => {
    const pool = new UpstreamPool(unixUpstream(path.join(dir, "up.sock"), { maxSockets: 1, maxFreeSockets: 1 }), 1, 1, () => {})
    const first: Array<number> = []
    const conn = await exchange(pool, first)
    assert.isAtMost(first[0]!, UPSTREAM_READ_BUFFER_BYTES)
    assert.isAtMost(Math.max(...first), UPSTREAM_READ_BUFFER_MAX_BYTES)
    // A full small buffer made the next reads larger than it.
    assert.isAbove(Math.max(...first), UPSTREAM_READ_BUFFER_BYTES)
    assert.deepStrictEqual(pool.stats(), { busy: 0, idle: 1, waiting: 0 })
    const second: Array<number> = []
    const again = await exchange(pool, second)
    assert.strictEqual(again, conn, "the idle connection was reused")
    assert.isAtMost(second[0]!, UPSTREAM_READ_BUFFER_BYTES)
    assert.isAbove(Math.max(...second), UPSTREAM_READ_BUFFER_BYTES)
    pool.close()
    await waitFor("the connection to close", () => conn.socket.destroyed && sockets.size === 0)
  })

  it("keeps idle connections beyond maxFreeSockets for the linger time, reusing them, then closes the oldest", async () => {
    const lingerMs = 200
    const pool = new UpstreamPool(unixUpstream(path.join(dir, "up.sock"), { maxSockets: 3, maxFreeSockets: 1 }), 3, 1, () => {}, undefined, lingerMs)
    const held: Array<PooledConnection> = []
    const take = () =>
      pool.acquire({ granted: (conn) => void held.push(conn), refused: (message) => assert.fail(message) }, false)
    take()
    take()
    take()
    await waitFor("three upstream connections", () => sockets.size === 3)
    const [a, b, c] = held as [PooledConnection, PooledConnection, PooledConnection]
    pool.release(a, true)
    pool.release(b, true)
    pool.release(c, true)
    // the surplus stays idle for reuse: the next requests open nothing
    assert.deepStrictEqual(pool.stats(), { busy: 0, idle: 3, waiting: 0 })
    take()
    take()
    assert.strictEqual(held[3], c, "the most recently released connection is reused first")
    assert.strictEqual(held[4], b)
    pool.release(b, true)
    pool.release(c, true)
    assert.strictEqual(sockets.size, 3)
    // after the linger time only maxFreeSockets stay: the least recently used one was closed
    await waitFor("the surplus to be closed", () => pool.stats().idle === 1 && sockets.size === 1)
    assert.isTrue(a.socket.destroyed)
    assert.isTrue(b.socket.destroyed)
    assert.isFalse(c.socket.destroyed)
    pool.close()
    await waitFor("the connection to close", () => sockets.size === 0)
  })

  it("with maxFreeSockets 0 closes every connection when its exchange ends", async () => {
    const pool = new UpstreamPool(unixUpstream(path.join(dir, "up.sock"), { maxSockets: 1, maxFreeSockets: 0 }), 1, 0, () => {})
    let conn: PooledConnection | undefined
    pool.acquire({ granted: (c) => void (conn = c), refused: (message) => assert.fail(message) }, false)
    await waitFor("the upstream connection", () => sockets.size === 1)
    pool.release(conn!, true)
    assert.strictEqual(pool.stats().idle, 0)
    assert.isTrue(conn!.socket.destroyed)
    await waitFor("the connection to close", () => sockets.size === 0 && pool.stats().busy === 0)
  })

  it("a client at its cap waits for one of its own connections while other clients are served", async () => {
    const pool = new UpstreamPool(unixUpstream(path.join(dir, "up.sock"), { maxSockets: 3, maxFreeSockets: 3 }), 3, 3, () => {})
    const log: Array<string> = []
    const held: Array<PooledConnection> = []
    const waiter = (name: string, client: string | undefined, slotLimit: number | undefined) => ({
      client,
      slotLimit,
      granted: (conn: PooledConnection) => {
        log.push(`${name} granted`)
        held.push(conn)
      },
      refused: (message: string) => void log.push(`${name} refused: ${message}`)
    })
    const a1 = waiter("a1", "10.0.0.1", 1)
    const a2 = waiter("a2", "10.0.0.1", 1)
    const b1 = waiter("b1", "10.0.0.2", 1)
    const u1 = waiter("u1", undefined, 1)
    assert.isFalse(pool.acquire(a1, false))
    // a second request of the same client queues although connections are free
    assert.isTrue(pool.acquire(a2, false))
    assert.isTrue(pool.atCap(a2))
    assert.strictEqual(pool.heldBy("10.0.0.1"), 1)
    // another client, and one without an address, are served at once
    assert.isFalse(pool.acquire(b1, false))
    assert.isFalse(pool.acquire(u1, false))
    assert.deepStrictEqual(log, ["a1 granted", "b1 granted", "u1 granted"])
    assert.deepStrictEqual(pool.stats(), { busy: 3, idle: 0, waiting: 1 })
    // b1's connection goes back: a2 is still at its cap and keeps waiting; it stays idle
    pool.release(held[1]!, true)
    assert.deepStrictEqual(pool.stats(), { busy: 2, idle: 1, waiting: 1 })
    // a1's goes back: a2 gets it
    pool.release(held[0]!, true)
    assert.deepStrictEqual(log, ["a1 granted", "b1 granted", "u1 granted", "a2 granted"])
    assert.strictEqual(held[3], held[0])
    assert.strictEqual(pool.heldBy("10.0.0.1"), 1)
    assert.strictEqual(pool.heldBy("10.0.0.2"), 0)
    // a closed connection gives its client's count back too
    held[3]!.destroy()
    await waitFor("the count to drop", () => pool.heldBy("10.0.0.1") === 0)
    // a waiter that gives up leaves the queue
    assert.isFalse(pool.acquire(waiter("a3", "10.0.0.1", 1), false))
    const a4 = waiter("a4", "10.0.0.1", 1)
    assert.isTrue(pool.acquire(a4, false))
    pool.cancel(a4)
    assert.strictEqual(pool.stats().waiting, 0)
    pool.close()
    for (const c of held) c.destroy()
    await waitFor("the connections to close", () => sockets.size === 0)
  })
})
