/**
 * ACME as operators run it: `switchyard server --acme-directory … --acme-email … --acme-ca …` and two
 * `switchyard client --domain … --tls-acme` processes against Debian's pebble. One name resolves for
 * pebble and gets a certificate that curl verifies against pebble's root; the other does not, and its
 * failure shows as a WARN line in the gateway's log, in `switchyard status` and in `/metrics`; once the
 * first backend stops, its name shows as unused in `/status`, `switchyard status` and `/metrics`. SIGHUP
 * reloads the ACME settings: a corrected directory is used at once; a changed store says it needs a restart.
 */
import { assert, beforeEach, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import * as fs from "node:fs"
import * as http from "node:http"
import * as os from "node:os"
import * as path from "node:path"
import { Effect } from "effect"
import { cleanupsPerTest } from "../support/leaks.ts"
import { requirePebble, startDns, startPebble } from "../support/pebble.ts"
import { addressAfter, freePort, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"

const available = requirePebble()
const describePebble = available ? describe : describe.skip

const Token = "acme-cli-token-7d21"
/** Longest real wait for an order, a validation or a log line. */
const WaitLimitMs = 45_000

let dir: string
const cleanups = cleanupsPerTest()

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-acme-cli-"))
  const mine = dir
  cleanups.push(async () => fs.rmSync(mine, { recursive: true, force: true }))
})

const run = (file: string, args: ReadonlyArray<string>) =>
  new Promise<{ code: number; out: string }>((resolve) =>
    execFile(file, args, { timeout: 20_000 }, (error, stdout, stderr) =>
      resolve({ code: error === null ? 0 : (error as { code?: number }).code ?? 1, out: stdout + stderr }))
  )

const until = async (what: string, check: () => Promise<boolean>) => {
  const deadline = Date.now() + WaitLimitMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 200))
  }
}

describePebble("switchyard server with ACME, switchyard client --tls-acme (processes, pebble)", () => {
  it.live("a granted name gets a verified certificate; a name pebble cannot validate is reported in the log, status and metrics", () =>
    Effect.promise(async () => {
      const dns = await startDns(["ok.test"])
      cleanups.push(() => dns.close())
      const tlsPort = await freePort()
      const pebble = await startPebble({ httpPort: await freePort(), tlsPort, dnsPort: dns.port })
      cleanups.push(() => pebble.stop())
      const caFile = path.join(dir, "pebble-https.pem")
      fs.writeFileSync(caFile, pebble.ca)
      const storage = path.join(dir, "store")

      const server = spawnSwitchyard([
        "server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--token", Token,
        "--acme-directory", pebble.directoryUrl, "--acme-email", "ops@example.com", "--acme-ca", caFile,
        "--set", `acme.storage_dir=${storage}`
      ])
      cleanups.push(() => server.stop("SIGKILL"))
      await server.waitFor("expose a local service")
      const control = addressAfter(server.output(), /control port/)
      const admin = addressAfter(server.output(), /admin endpoint/)

      const local = http.createServer((_req, res) => res.end("served by the backend"))
      await new Promise<void>((resolve) => local.listen(0, "127.0.0.1", resolve))
      cleanups.push(() => new Promise<void>((resolve) => { local.closeAllConnections(); local.close(() => resolve()) }))
      const localPort = (local.address() as { port: number }).port
      const clients = ["ok.test", "nope.test"].map((domain) => {
        const client = spawnSwitchyard([
          "client", "--server", `127.0.0.1:${control.port}`, "--token", Token, "--expose", `127.0.0.1:${localPort}`,
          "--port", String(tlsPort), "--domain", domain, "--tls-acme", "--no-admin"
        ])
        cleanups.push(() => client.stop("SIGKILL"))
        return client
      })

      // the granted, resolvable name: issued and verified by curl against pebble's root
      const rootFile = path.join(dir, "root.pem")
      fs.writeFileSync(rootFile, await pebble.root())
      let last = { code: -1, out: "" }
      await until("a verified certificate for ok.test", async () => {
        last = await run("curl", ["-sS", "--max-time", "5", "--cacert", rootFile, "--resolve", `ok.test:${tlsPort}:127.0.0.1`, `https://ok.test:${tlsPort}/`])
        return last.code === 0
      }).catch((e) => { throw new Error(`${(e as Error).message}: ${last.out}\n${server.output()}`) })
      assert.strictEqual(last.out, "served by the backend")
      assert.strictEqual(fs.statSync(path.join(storage, "ok.test", "key.pem")).mode & 0o777, 0o600)

      // the name pebble cannot resolve: a WARN line naming it, status and metrics say why
      await server.waitFor(/level=WARN.*no certificate for nope\.test/, WaitLimitMs)
      const refused = await run("curl", ["-sS", "--max-time", "5", "--cacert", rootFile, "--resolve", `nope.test:${tlsPort}:127.0.0.1`, `https://nope.test:${tlsPort}/`])
      assert.notStrictEqual(refused.code, 0)
      assert.match(refused.out, /alert|handshake/i)
      const status = await run(process.execPath, [path.resolve(import.meta.dirname, "../../src/runtime/main.ts"), "status", "--admin", `127.0.0.1:${admin.port}`])
      assert.strictEqual(status.code, 0, status.out)
      assert.match(status.out, /CERTIFICATE\s+STATE\s+SOURCE/)
      assert.match(status.out, /ok\.test\s+valid\s+ordered/)
      assert.match(status.out, /nope\.test\s+waiting/)
      const json = JSON.parse((await get(admin.port, "/status")).body) as { certificates: Array<{ name: string; lastError?: string; failures: number }>; recentErrors: Array<{ message: string }> }
      const nope = json.certificates.find((c) => c.name === "nope.test")
      assert.strictEqual(nope?.failures, 1)
      assert.include(nope?.lastError ?? "", "nope.test")
      assert.isTrue(json.recentErrors.some((e) => e.message.includes("no certificate for nope.test")))
      const metrics = (await get(admin.port, "/metrics")).body
      assert.strictEqual(sample(metrics, "switchyard_acme_orders_total", { result: "issued" }), 1)
      assert.strictEqual(sample(metrics, "switchyard_acme_orders_total", { result: "failed" }), 1)
      assert.isAbove(sample(metrics, "switchyard_acme_certificate_days_left", { name: "ok.test" }), 30)
      assert.strictEqual(sample(metrics, "switchyard_acme_names", { state: "waiting" }), 1)

      // the backend of ok.test stops: its name is unused (not renewed after the grace), shown as such
      assert.strictEqual(await clients[0]!.stop("SIGTERM"), 0)
      await until("ok.test to be unused", async () =>
        (JSON.parse((await get(admin.port, "/status")).body) as { certificates: Array<{ name: string; state: string }> })
          .certificates.some((c) => c.name === "ok.test" && c.state === "unused"))
      const unused = (JSON.parse((await get(admin.port, "/status")).body) as { certificates: Array<{ name: string; unusedSince?: string }> })
        .certificates.find((c) => c.name === "ok.test")
      assert.isAbove(Date.parse(unused?.unusedSince ?? ""), 0)
      const after = await run(process.execPath, [path.resolve(import.meta.dirname, "../../src/runtime/main.ts"), "status", "--admin", `127.0.0.1:${admin.port}`])
      assert.match(after.out, /ok\.test\s+unused since \d{4}-/)
      const metricsAfter = (await get(admin.port, "/metrics")).body
      assert.strictEqual(sample(metricsAfter, "switchyard_acme_names", { state: "unused" }), 1)
      assert.notInclude(metricsAfter, `switchyard_acme_certificate_days_left{name="ok.test"}`)
    }), 150_000)

  it.live("SIGHUP: a corrected directory and a new email apply at once (the failed name is ordered again and verified); a new storage_dir, challenge or a removed acme section is a WARN naming it", () =>
    Effect.promise(async () => {
      const dns = await startDns(["fixed.test"])
      cleanups.push(() => dns.close())
      const tlsPort = await freePort()
      const pebble = await startPebble({ httpPort: await freePort(), tlsPort, dnsPort: dns.port })
      cleanups.push(() => pebble.stop())
      const caFile = path.join(dir, "pebble-https.pem")
      fs.writeFileSync(caFile, pebble.ca)
      const storage = path.join(dir, "store")
      const config = path.join(dir, "server.yaml")
      const writeConfig = (directory: string, email: string, store: string) =>
        fs.writeFileSync(config, [
          "acme:",
          `  directory: ${directory}`,
          `  email: ${email}`,
          `  ca_file: ${caFile}`,
          `  storage_dir: ${store}`
        ].join("\n") + "\n")
      // a directory URL pebble does not serve: every order fails
      writeConfig(new URL("/not-the-directory", pebble.directoryUrl).href, "ops@example.com", storage)
      const server = spawnSwitchyard(["server", "--config", config, "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--token", Token])
      cleanups.push(() => server.stop("SIGKILL"))
      await server.waitFor("expose a local service")
      const control = addressAfter(server.output(), /control port/)

      const local = http.createServer((_req, res) => res.end("served after the reload"))
      await new Promise<void>((resolve) => local.listen(0, "127.0.0.1", resolve))
      cleanups.push(() => new Promise<void>((resolve) => { local.closeAllConnections(); local.close(() => resolve()) }))
      const client = spawnSwitchyard([
        "client", "--server", `127.0.0.1:${control.port}`, "--token", Token, "--expose", `127.0.0.1:${(local.address() as { port: number }).port}`,
        "--port", String(tlsPort), "--domain", "fixed.test", "--tls-acme", "--no-admin"
      ])
      cleanups.push(() => client.stop("SIGKILL"))
      // the first backoff: 60 s plus up to 20 % of jitter
      await server.waitFor(/level=WARN.*no certificate for fixed\.test.*next order in (6\d|7[0-2]) s/, WaitLimitMs)

      writeConfig(pebble.directoryUrl, "certs@example.com", path.join(dir, "elsewhere"))
      server.child.kill("SIGHUP")
      await server.waitFor("configuration reloaded", WaitLimitMs)
      assert.match(server.output(), /level=WARN.*acme\.storage_dir changed to .*elsewhere: it applies after a restart/)
      assert.match(server.output(), /ACME settings reloaded: acme\.directory, acme\.email/)

      // ordered again at once (not after the minute of backoff), from the corrected directory
      const rootFile = path.join(dir, "root.pem")
      fs.writeFileSync(rootFile, await pebble.root())
      let last = { code: -1, out: "" }
      await until("a verified certificate for fixed.test", async () => {
        last = await run("curl", ["-sS", "--max-time", "5", "--cacert", rootFile, "--resolve", `fixed.test:${tlsPort}:127.0.0.1`, `https://fixed.test:${tlsPort}/`])
        return last.code === 0
      }).catch((e) => { throw new Error(`${(e as Error).message}: ${last.out}\n${server.output()}`) })
      assert.strictEqual(last.out, "served after the reload")
      // the store is still the one the gateway started with
      assert.isTrue(fs.existsSync(path.join(storage, "fixed.test", "fullchain.pem")))
      assert.isFalse(fs.existsSync(path.join(dir, "elsewhere")))

      // a new challenge, then no acme section at all: each a WARN naming the setting; the certificate stays served
      fs.appendFileSync(config, "  challenge: http-01\n")
      server.child.kill("SIGHUP")
      await server.waitFor(/level=WARN.*acme\.challenge changed to http-01: it applies after a restart/, WaitLimitMs)
      fs.writeFileSync(config, "log:\n  format: logfmt\n")
      server.child.kill("SIGHUP")
      await server.waitFor(/level=WARN.*acme\.directory was removed: the gateway keeps obtaining and renewing certificates until a restart/, WaitLimitMs)
      const still = await run("curl", ["-sS", "--max-time", "5", "--cacert", rootFile, "--resolve", `fixed.test:${tlsPort}:127.0.0.1`, `https://fixed.test:${tlsPort}/`])
      assert.strictEqual(still.code, 0, still.out)
    }), 150_000)
})
