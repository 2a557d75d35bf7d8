/**
 * `switchyard client --tcp --proxy-protocol v1|v2` in front of nginx listening with `proxy_protocol`:
 * nginx parses the header the client writes and answers with the two ends it names, which must be the
 * public peer that connected to the gateway and the gateway's public address and port. nginx is a real third-party parser of both versions; in CI a
 * missing nginx fails these tests, elsewhere they are skipped.
 */
import { assert, describe, it } from "@effect/vitest"
import { type ChildProcess, spawn, spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { Context, Effect } from "effect"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { spawnSwitchyard } from "../runtime/serverProcess.ts"
import { freePort } from "../services/ListenersFixtures.ts"
import { activeHandles, expectNoLeaks } from "../support/leaks.ts"
import { inCI } from "../support/peers.ts"
import { gateway, token } from "./tunnelHarness.ts"

const nginx = spawnSync("nginx", ["-v"], { encoding: "utf8" }).status === 0
if (!nginx && inCI) throw new Error("nginx is not installed (apt-get install nginx)")
const describePeer = nginx ? describe : describe.skip

/** nginx answering with the source and destination of the PROXY header on a port that expects one. */
const startNginx = (port: number) =>
  Effect.acquireRelease(
    Effect.promise(async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-nginx-"))
      fs.writeFileSync(path.join(dir, "nginx.conf"), `
worker_processes 1;
master_process off;
daemon off;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  server {
    listen 127.0.0.1:${port} proxy_protocol;
    location / { return 200 "$proxy_protocol_addr:$proxy_protocol_port $proxy_protocol_server_addr:$proxy_protocol_server_port"; }
  }
}
`)
      const child: ChildProcess = spawn("nginx", ["-c", path.join(dir, "nginx.conf"), "-p", dir], { stdio: "ignore" })
      // listening once a plain connection is accepted (nginx then waits for the header we never send)
      for (let i = 0; i < 200; i++) {
        const up = await new Promise<boolean>((resolve) => {
          const s = net.connect({ host: "127.0.0.1", port }, () => {
            s.destroy()
            resolve(true)
          })
          s.on("error", () => resolve(false))
        })
        if (up) break
        await new Promise((resolve) => setTimeout(resolve, 25))
      }
      return { child, dir }
    }),
    ({ child, dir }) =>
      Effect.promise(() =>
        new Promise<void>((resolve) => {
          const done = () => {
            fs.rmSync(dir, { recursive: true, force: true })
            resolve()
          }
          if (child.exitCode !== null || child.signalCode !== null) return done()
          child.once("exit", done)
          child.kill("SIGKILL")
        })
      )
  )

/** A raw TCP exchange on `port`: sends an HTTP/1.0 GET, returns the body and the local port used. */
const getOverTcp = (port: number) =>
  new Promise<{ body: string; localPort: number }>((resolve, reject) => {
    const socket = net.connect({ host: "127.0.0.1", port }, () => socket.write("GET / HTTP/1.0\r\nHost: x\r\n\r\n"))
    const chunks: Array<Buffer> = []
    socket.on("data", (c: Buffer) => chunks.push(c))
    socket.on("error", reject)
    socket.on("close", () => {
      const text = Buffer.concat(chunks).toString("latin1")
      resolve({ body: text.slice(text.indexOf("\r\n\r\n") + 4), localPort: localPort! })
    })
    let localPort: number | undefined
    socket.once("connect", () => void (localPort = socket.localPort))
  })

describePeer("PROXY protocol toward the backend (nginx as the backend)", () => {
  it.live("v1 and v2: nginx reads the public peer's address and port from the header the client writes", () =>
    Effect.gen(function*() {
      const before = activeHandles()
      yield* Effect.gen(function*() {
        const control = Context.get(yield* gateway(), ControlPort)
        for (const version of ["v1", "v2"] as const) {
          const backendPort = yield* Effect.promise(freePort)
          const publicPort = yield* Effect.promise(freePort)
          yield* startNginx(backendPort)
          const client = yield* Effect.acquireRelease(
            Effect.sync(() =>
              spawnSwitchyard([
                "client", "--server", `127.0.0.1:${control.address.port}`, "--tcp", "--port", String(publicPort),
                "--expose", `127.0.0.1:${backendPort}`, "--proxy-protocol", version, "--log-level", "warn"
              ], { SWITCHYARD_TOKEN: token, SWITCHYARD_ADMIN_ADDRESS: "127.0.0.1:0" })
            ),
            (p) => Effect.promise(() => p.stop("SIGKILL"))
          )
          yield* Effect.promise(() => client.waitFor("switchyard client: tcp"))
          let reply: { body: string; localPort: number } | undefined
          for (let i = 0; i < 300 && reply?.body.startsWith("127.0.0.1:") !== true; i++) {
            reply = yield* Effect.promise(() => getOverTcp(publicPort).catch(() => undefined))
            if (reply?.body.startsWith("127.0.0.1:") !== true) yield* Effect.sleep("30 millis")
          }
          // the public peer, and the gateway's public address and port it connected to
          assert.strictEqual(reply?.body, `127.0.0.1:${reply?.localPort} 127.0.0.1:${publicPort}`, `${version}: nginx saw the public peer`)
          assert.strictEqual(yield* Effect.promise(() => client.stop("SIGTERM")), 0)
        }
      }).pipe(Effect.scoped)
      yield* Effect.promise(() => expectNoLeaks(before))
    }))

  it.live("a PROXY header is refused for an HTTP route, with the reason", () =>
    Effect.promise(async () => {
      const refused = spawnSwitchyard(["client", "--check-config", "--port", "8000", "--expose", "127.0.0.1:1", "--proxy-protocol", "v1"], { SWITCHYARD_TOKEN: token })
      assert.strictEqual(await refused.exited, 78)
      assert.include(refused.output(), "proxy_protocol")
      const bad = spawnSwitchyard(["client", "--check-config", "--tcp", "--port", "8000", "--expose", "127.0.0.1:1", "--proxy-protocol", "v3"], { SWITCHYARD_TOKEN: token })
      assert.strictEqual(await bad.exited, 78)
      assert.include(bad.output(), "proxy_protocol")
    }))
})
