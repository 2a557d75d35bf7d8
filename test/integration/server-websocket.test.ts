/**
 * `switchyard server --ws-listen`: the control port also served as a WebSocket path, as a process; a
 * backend connects through `ws://.../tunnel` and serves a public port; the token is refused when wrong.
 */
import { assert, describe, it } from "@effect/vitest"
import * as http from "node:http"
import { listen } from "../../src/runtime/listen.ts"
import { cleanupsPerTest } from "../support/leaks.ts"
import { freePort, get, spawnSwitchyard } from "../runtime/serverProcess.ts"

const Token = "ws-server-test-token-3a9e"

const cleanups = cleanupsPerTest()

const startServer = async () => {
  const proc = spawnSwitchyard(
    ["server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0"],
    { SWITCHYARD_TOKEN: Token }
  )
  cleanups.push(() => proc.stop("SIGKILL"))
  await proc.waitFor("expose a local service")
  const m = /control \(WebSocket\) (ws:\/\/127\.0\.0\.1:\d+\/tunnel)/.exec(proc.output())
  if (!m) throw new Error(`no WebSocket control path in the banner:\n${proc.output()}`)
  return { proc, url: m[1]! }
}

describe("switchyard server --ws-listen", () => {
  it("serves a backend that dials the WebSocket control path", async () => {
    const { url } = await startServer()
    const port = await freePort()
    const tunnel = await listen({ port, http: { pathPrefix: "/ws-backend" } }, { server: url, token: Token, timeoutMs: 20_000 })
    const app = tunnel.serve(http.createServer((req, res) => res.end(`through the WebSocket: ${req.url}`)))
    cleanups.push(() => new Promise<void>((resolve) => tunnel.close(() => { app.close(); resolve() })))
    const answer = await get(port, "/ws-backend/item")
    assert.strictEqual(answer.status, 200)
    assert.strictEqual(answer.body, "through the WebSocket: /ws-backend/item")
    assert.strictEqual((await get(port, "/elsewhere")).status, 404)
  }, 60_000)

  it("refuses a wrong token on the WebSocket path and binds nothing", async () => {
    const { url } = await startServer()
    const port = await freePort()
    const refused = await listen({ port, http: {} }, { server: url, token: "not-the-token", timeoutMs: 10_000 }).then(
      (t) => new Promise<string>((resolve) => t.close(() => resolve("bound"))),
      (e: Error) => e.message
    )
    assert.notStrictEqual(refused, "bound")
    const publicPort = await get(port, "/").then((a) => `answered ${a.status}`, (e: NodeJS.ErrnoException) => e.code)
    assert.strictEqual(publicPort, "ECONNREFUSED")
  }, 60_000)
})
