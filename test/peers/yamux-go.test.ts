/**
 * Interop with hashicorp/yamux (the `yamuxpeer` CLI): both yamux roles, both dial directions, over
 * TCP and Unix sockets, with byte-exact echo loads, pings and GoAway.
 */
import { assert, beforeAll, describe, it } from "@effect/vitest"
import { Deferred, Duration, Effect, Exit, Fiber, Queue } from "effect"
import type { Scope } from "effect"
import { type ChildProcess, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import * as NodeTransport from "../../src/runtime/NodeTransport.ts"
import type { Address, Connection } from "../../src/services/Transport.ts"
import * as Session from "../../src/services/yamux/Session.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { assertPeer, peerMissing, yamuxPeer } from "../support/peers.ts"
import { freePort } from "../support/ports.ts"
import { echoServer, equalBytes, pattern, readExactly } from "../services/yamux/harness.ts"

const probe = yamuxPeer()


interface Peer {
  readonly child: ChildProcess
  readonly exit: Effect.Effect<{ code: number | null; stdout: string; stderr: string }>
}

/** Starts yamuxpeer; killed when the scope closes. With `-listen`, waits until it is listening. */
const startPeer = (args: ReadonlyArray<string>): Effect.Effect<Peer, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.callback<Peer>((resume) => {
      const child = spawn(assertPeer(probe), ["-keepalive=true", ...args], { stdio: ["ignore", "pipe", "pipe"] })
      let stdout = ""
      let stderr = ""
      let ready = !args.includes("-listen")
      const exited = new Promise<{ code: number | null; stdout: string; stderr: string }>((res) =>
        child.once("exit", (code) => res({ code, stdout, stderr }))
      )
      const peer: Peer = { child, exit: Effect.promise(() => exited) }
      child.stdout!.on("data", (d) => (stdout += d))
      child.stderr!.on("data", (d) => {
        stderr += d
        if (!ready && stderr.includes("listening")) {
          ready = true
          resume(Effect.succeed(peer))
        }
      })
      if (ready) resume(Effect.succeed(peer))
    }),
    ({ child }) =>
      Effect.callback<void>((resume) => {
        if (child.exitCode !== null || child.signalCode !== null) return resume(Effect.void)
        child.once("exit", () => resume(Effect.void))
        child.kill("SIGKILL")
      })
  )

/** Our load: `n` concurrent streams each sending `size` bytes and reading the same back, `rounds` times. */
const load = (session: Session.YamuxSession, n: number, size: number, rounds: number) =>
  Effect.gen(function*() {
    for (let r = 0; r < rounds; r++) {
      yield* Effect.forEach(
        Array.from({ length: n }, (_, i) => i),
        (i) =>
          Effect.gen(function*() {
            const payload = pattern(size, r * 1000 + i + 1)
            const s = yield* session.open()
            const writer = yield* Effect.forkChild(s.write(payload))
            const got = yield* readExactly(s, size)
            yield* Fiber.join(writer)
            yield* s.closeWrite()
            const eof = yield* s.read()
            assert.isUndefined(eof, "EOF after the echo")
            assert.isTrue(equalBytes(got, payload), `stream ${s.id} echo differs`)
          }),
        { concurrency: "unbounded", discard: true }
      )
    }
  })

type Kind = "tcp" | "unix"

const addressFor = (kind: Kind) =>
  Effect.promise(async () => {
    if (kind === "tcp") {
      const port = await freePort()
      return { flag: `127.0.0.1:${port}`, address: { host: "127.0.0.1", port } as Address }
    }
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-yamux-"))
    const p = path.join(dir, "peer.sock")
    return { flag: `unix:${p}`, address: { path: p } as Address }
  })

/** Our side listens; yields the first connection the peer makes. */
const listenOnce = (address: Address): Effect.Effect<Effect.Effect<Connection>, never, Scope.Scope> =>
  Effect.gen(function*() {
    const conns = yield* Queue.bounded<Connection>(4)
    yield* NodeTransport.listen(address, (c) => {
      Queue.offerUnsafe(conns, c)
    }).pipe(Effect.orDie)
    return Queue.take(conns)
  })

const loads = [
  { name: "16 x 1 MiB x 4", n: 16, size: 1024 * 1024, rounds: 4 },
  { name: "200 x 1 KiB x 10", n: 200, size: 1024, rounds: 10 }
] as const

describe.skipIf(peerMissing(probe))("yamux interop with hashicorp/yamux", () => {
  beforeAll(() => {
    assertPeer(probe)
  })

  for (const kind of ["tcp", "unix"] as const) {
    for (const l of loads) {
      it.live(`${kind}: our client dials the Go echo server, ${l.name}`, () =>
        Effect.gen(function*() {
          const before = activeHandles()
          yield* Effect.scoped(Effect.gen(function*() {
            const { flag, address } = yield* addressFor(kind)
            yield* startPeer(["-listen", flag, "-yamux", "server", "-act", "echo"])
            const conn = yield* NodeTransport.dial(address).pipe(Effect.orDie)
            const session = yield* Session.make(conn, { role: "client" })
            yield* load(session, l.n, l.size, l.rounds)
            const rtt = yield* session.ping()
            assert.isTrue(Duration.toMillis(rtt) >= 0)
          }))
          yield* Effect.promise(() => expectNoLeaks(before))
        }))

      it.live(`${kind}: Go client dials our echo server, ${l.name}`, () =>
        Effect.gen(function*() {
          const before = activeHandles()
          yield* Effect.scoped(Effect.gen(function*() {
            const { flag, address } = yield* addressFor(kind)
            const next = yield* listenOnce(address)
            const peer = yield* startPeer([
              "-dial", flag, "-yamux", "client", "-act", "load",
              "-n", String(l.n), "-size", String(l.size), "-rounds", String(l.rounds)
            ])
            const conn = yield* next
            const session = yield* Session.make(conn, { role: "server" })
            yield* echoServer(session)
            const result = yield* peer.exit
            assert.strictEqual(result.code, 0, result.stderr + result.stdout)
            assert.include(result.stdout, "OK streams=")
            assert.include(result.stdout, "err=<nil>", "the Go side's ping was answered")
            // The Go side closes its session (without GoAway) when done: ours ends as RemoteClosed.
            const exit = yield* Effect.exit(session.closed)
            assert.isTrue(Exit.isFailure(exit))
          }))
          yield* Effect.promise(() => expectNoLeaks(before))
        }))

      it.live(`${kind}: reverse layout, the Go side dials as yamux server, we open streams, ${l.name}`, () =>
        Effect.gen(function*() {
          const before = activeHandles()
          yield* Effect.scoped(Effect.gen(function*() {
            const { flag, address } = yield* addressFor(kind)
            const next = yield* listenOnce(address)
            yield* startPeer(["-dial", flag, "-yamux", "server", "-act", "echo"])
            const session = yield* Session.make(yield* next, { role: "client" })
            yield* load(session, l.n, l.size, l.rounds)
            yield* session.ping()
          }))
          yield* Effect.promise(() => expectNoLeaks(before))
        }))

      it.live(`${kind}: reverse layout, we dial as yamux server, the Go side listens and opens streams, ${l.name}`, () =>
        Effect.gen(function*() {
          const before = activeHandles()
          yield* Effect.scoped(Effect.gen(function*() {
            const { flag, address } = yield* addressFor(kind)
            const peer = yield* startPeer([
              "-listen", flag, "-once", "-yamux", "client", "-act", "load",
              "-n", String(l.n), "-size", String(l.size), "-rounds", String(l.rounds)
            ])
            const conn = yield* NodeTransport.dial(address).pipe(Effect.orDie)
            const session = yield* Session.make(conn, { role: "server" })
            yield* echoServer(session)
            const result = yield* peer.exit
            assert.strictEqual(result.code, 0, result.stderr + result.stdout)
            assert.include(result.stdout, "err=<nil>", "the Go side's ping was answered")
          }))
          yield* Effect.promise(() => expectNoLeaks(before))
        }))
    }
  }

  it.live("window auto-tuning: the Go side honours the grown windows we grant, both ways", () =>
    Effect.gen(function*() {
      const config = { maxAutoTuneWindow: 4 * 1024 * 1024 }
      const { flag, address } = yield* addressFor("tcp")
      // Go opens streams and we echo: our receive windows grow while Go sends
      const next = yield* listenOnce(address)
      const peer = yield* startPeer(["-dial", flag, "-yamux", "client", "-act", "load", "-n", "4", "-size", String(8 * 1024 * 1024)])
      const session = yield* Session.make(yield* next, { role: "server", config })
      let largest = 0
      yield* Effect.forkScoped(Effect.forever(Effect.gen(function*() {
        const s = yield* session.accept()
        yield* Effect.forkScoped(Effect.ignore(Effect.gen(function*() {
          while (true) {
            const chunk = yield* s.read()
            largest = Math.max(largest, s.core.recvMax)
            if (chunk === undefined) break
            yield* s.write(chunk)
          }
          yield* s.closeWrite()
        })))
      })).pipe(Effect.ignore))
      const result = yield* peer.exit
      assert.strictEqual(result.code, 0, result.stderr + result.stdout)
      assert.isAbove(largest, 256 * 1024, "our receive windows grew")
      // we open streams against the Go echo server: our windows grow while the echo comes back
      const { flag: flag2, address: address2 } = yield* addressFor("tcp")
      yield* startPeer(["-listen", flag2, "-yamux", "server", "-act", "echo"])
      const ours = yield* Session.make(yield* NodeTransport.dial(address2).pipe(Effect.orDie), { role: "client", config })
      yield* load(ours, 4, 8 * 1024 * 1024, 1)
    }))

  it.live("GoAway: after ours, our opens fail and the Go echo server still serves open streams", () =>
    Effect.gen(function*() {
      const { flag, address } = yield* addressFor("tcp")
      yield* startPeer(["-listen", flag, "-yamux", "server", "-act", "echo"])
      const session = yield* Session.make(yield* NodeTransport.dial(address).pipe(Effect.orDie), { role: "client" })
      const s = yield* session.open()
      yield* session.goAway()
      const refused = yield* Effect.flip(session.open())
      assert.strictEqual(refused.reason, "LocalGoAway")
      const payload = pattern(4096)
      yield* s.write(payload)
      const got = yield* readExactly(s, payload.length)
      assert.isTrue(equalBytes(got, payload))
      yield* session.ping()
    }))

  it.live("a Go peer that disappears ends our session with RemoteClosed and fails open streams", () =>
    Effect.gen(function*() {
      const { flag, address } = yield* addressFor("tcp")
      const peer = yield* startPeer(["-listen", flag, "-yamux", "server", "-act", "echo"])
      const session = yield* Session.make(yield* NodeTransport.dial(address).pipe(Effect.orDie), { role: "client" })
      const s = yield* session.open()
      yield* s.write(pattern(10))
      yield* readExactly(s, 10)
      const done = yield* Deferred.make<void>()
      peer.child.once("exit", () => Deferred.doneUnsafe(done, Effect.void))
      peer.child.kill("SIGKILL")
      yield* Deferred.await(done)
      const err = yield* Effect.flip(session.closed)
      assert.strictEqual(err.reason, "RemoteClosed")
      const readErr = yield* Effect.flip(s.read())
      assert.strictEqual(readErr._tag, "YamuxError")
    }))
})
