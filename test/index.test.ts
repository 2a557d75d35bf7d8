/**
 * The public API as a package user gets it: `src/` compiled by the build (`npm run build`'s config) into
 * JavaScript, then a gateway and a backend started through that compiled index only, with a request
 * served end to end. Also runs the examples the way their headers say.
 */
import { assert, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import * as path from "node:path"
import { promisify } from "node:util"
import { activeHandles, expectNoLeaks } from "./support/leaks.ts"
import { freePort } from "./support/ports.ts"

const run = promisify(execFile)
const root = path.resolve(import.meta.dirname, "..")
const node = path.join(root, "node_modules/.bin/node")
const outDir = path.join(root, "node_modules/.cache/switchyard-dist-test")


const get = (port: number, urlPath: string) =>
  new Promise<{ status: number; body: string }>((resolve, reject) => {
    http.get({ host: "127.0.0.1", port, path: urlPath, agent: false }, (res) => {
      let body = ""
      res.setEncoding("utf8")
      res.on("data", (c: string) => (body += c))
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }))
    }).on("error", reject)
  })

describe("public API", () => {
  it("compiles, and its compiled index runs a gateway and a backend end to end", async () => {
    fs.rmSync(outDir, { recursive: true, force: true })
    await run(path.join(root, "node_modules/.bin/tsc"), ["-p", path.join(root, "tsconfig.build.json"), "--outDir", outDir, "--sourceMap", "false"], { cwd: root })
    const api = await import(path.join(outDir, "index.js")) as typeof import("../src/index.ts")
    const { Context, Effect, Exit, Layer, Redacted, Scope } = await import("effect")

    const before = activeHandles()
    const publicPort = await freePort()
    const scope = Scope.makeUnsafe()
    const layer = api.ControlPort.gatewayLayer({
      control: {
        address: { host: "127.0.0.1", port: 0 },
        tokens: [{ name: "t", token: Redacted.make("public-api-token"), ports: [publicPort] }]
      },
      publicHost: "127.0.0.1"
    }).pipe(Layer.provide(api.NodeTransport.layer))
    const context = await Effect.runPromise(Layer.buildWithScope(layer, scope))
    const control = Context.get(context, api.ControlPort)

    const app = http.createServer((req, res) => res.end(`served ${req.url}`))
    const tunnel = await api.listen(
      { port: publicPort, http: { pathPrefix: "/api" } },
      { server: `127.0.0.1:${control.address.port}`, token: "public-api-token" }
    )
    tunnel.serve(app)
    try {
      assert.deepStrictEqual(await get(publicPort, "/api/items"), { status: 200, body: "served /api/items" })
      assert.strictEqual((await get(publicPort, "/other")).status, 404)
    } finally {
      await new Promise<void>((resolve) => tunnel.close(() => resolve()))
      app.closeAllConnections()
      await Effect.runPromise(Scope.close(scope, Exit.void))
    }
    await expectNoLeaks(before)
  }, 120_000)

  it("runs the plain-Node two-services example with one command", async () => {
    const { stdout } = await run(node, ["examples/two-services-node.ts"], { cwd: root, timeout: 60_000 })
    assert.include(stdout, "GET /a -> 200 From A")
    assert.include(stdout, "GET /b -> 200 From B")
  }, 90_000)

  it("runs the Effect two-services example with one command", async () => {
    const { stdout } = await run(node, ["examples/two-services-effect.ts"], { cwd: root, timeout: 60_000 })
    assert.include(stdout, "From A")
    assert.include(stdout, "From B")
  }, 90_000)
})
