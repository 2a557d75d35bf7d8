/**
 * The drop-in binaries: `switchyard wsp-server` and `switchyard wsp-client` started as processes with
 * wsp-style YAML files, a request carried through them, then SIGTERM.
 */
import { describe, expect, it } from "@effect/vitest"
import { type ChildProcess, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { Effect } from "effect"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { call, destination, waitFor } from "./wspSupport.ts"

const main = path.resolve(import.meta.dirname, "../../src/runtime/main.ts")

interface Running {
  readonly child: ChildProcess
  readonly output: () => string
}

const start = (args: ReadonlyArray<string>) =>
  Effect.acquireRelease(
    Effect.sync((): Running => {
      const child = spawn(process.execPath, [main, ...args], { stdio: ["ignore", "pipe", "pipe"] })
      let output = ""
      child.stdout!.on("data", (c: Buffer) => (output += c.toString()))
      child.stderr!.on("data", (c: Buffer) => (output += c.toString()))
      return { child, output: () => output }
    }),
    ({ child }) =>
      Effect.promise(() =>
        new Promise<void>((resolve) => {
          if (child.exitCode !== null || child.signalCode !== null) return resolve()
          child.once("exit", () => resolve())
          child.kill("SIGKILL")
        })
      )
  )

const exited = (child: ChildProcess) =>
  Effect.promise(() =>
    new Promise<number | string>((resolve) => {
      if (child.exitCode !== null) return resolve(child.exitCode)
      child.once("exit", (code, signal) => resolve(code ?? signal ?? "unknown"))
    })
  )

const tempDir = Effect.acquireRelease(
  Effect.sync(() => fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-wsp-"))),
  (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
)

describe("switchyard wsp-server and wsp-client processes", () => {
  it.live("carry a request with wsp's config files and stop on SIGTERM", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.scoped(Effect.gen(function*() {
        const dir = yield* tempDir
        const dest = yield* destination
        fs.writeFileSync(path.join(dir, "wsp_server.cfg"), "---\nhost : 127.0.0.1\nport : 0\ntimeout : 3000\nsecretkey : s3cret\n")
        const server = yield* start(["wsp-server", "--config", path.join(dir, "wsp_server.cfg")])
        yield* waitFor("server listening", () => /listening on http:\/\/127\.0\.0\.1:\d+/.test(server.output()), 30_000)
        const port = Number(/listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(server.output())![1])
        fs.writeFileSync(
          path.join(dir, "wsp_client.cfg"),
          `---\ntargets :\n - ws://127.0.0.1:${port}/register\npoolidlesize : 2\npoolmaxsize : 4\nsecretkey : s3cret\n`
        )
        const client = yield* start(["wsp-client", "--config", path.join(dir, "wsp_client.cfg")])
        yield* waitFor("client started", () => client.output().includes("connecting to"), 30_000)
        expect(client.output()).toMatch(/every destination is allowed/)
        const reply = yield* Effect.promise(async () => {
          const deadline = Date.now() + 10_000
          for (;;) {
            const r = await call(port, { method: "POST", destination: dest.url("/echo"), body: Buffer.from("through the binaries") })
            if (r.status === 200 || Date.now() > deadline) return r
            await new Promise((resolve) => setTimeout(resolve, 50))
          }
        })
        expect(reply.status).toBe(200)
        expect(reply.body.toString()).toBe("through the binaries")
        client.child.kill("SIGTERM")
        server.child.kill("SIGTERM")
        // both exit by themselves (interrupted, closing their scopes), not by a signal left unhandled
        const codes = [yield* exited(client.child), yield* exited(server.child)]
        expect(codes.every((c) => typeof c === "number")).toBe(true)
        expect(server.output()).not.toContain("s3cret")
        expect(client.output()).not.toContain("s3cret")
      }))
      yield* Effect.promise(() => expectNoLeaks(before))
    }), 60_000)

  it.live("refuse a bad config, naming the field and the value", () =>
    Effect.scoped(Effect.gen(function*() {
      const dir = yield* tempDir
      fs.writeFileSync(path.join(dir, "bad.cfg"), "targets :\n - http://not-a-websocket/register\n")
      const client = yield* start(["wsp-client", "--config", path.join(dir, "bad.cfg")])
      const code = yield* exited(client.child)
      expect(code).not.toBe(0)
      expect(client.output()).toContain("field targets[0] has invalid value \"http://not-a-websocket/register\"")
    })), 60_000)
})
