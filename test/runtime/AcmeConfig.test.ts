/**
 * The ACME settings: `acme.*` in the server's file (with `--acme-directory`, `--acme-email`, `--acme-ca`)
 * and `tls_acme` / `--tls-acme` in the client's, checked before anything is bound.
 */
import { assert, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { Duration, Effect } from "effect"
import { ConfigLoadError, loadConfig, ServerFile } from "../../src/runtime/ConfigLoader.ts"
import { toRoute } from "../../src/runtime/listen.ts"
import { resolveServerConfig } from "../../src/runtime/server/ServerConfig.ts"
import { spawnSwitchyard } from "./serverProcess.ts"

const resolve = (acme: ServerFile["acme"]) => resolveServerConfig({ acme })

describe("acme settings", () => {
  it("resolve to the certificate manager's config, defaults filled in", () => {
    const config = resolve({ directory: "https://acme.example/dir", email: "ops@example.com" })
    assert.notInstanceOf(config, ConfigLoadError)
    if (config instanceof ConfigLoadError) return
    assert.strictEqual(config.acme?.directoryUrl, "https://acme.example/dir")
    assert.strictEqual(config.acme?.email, "ops@example.com")
    assert.strictEqual(config.acme?.challenge, "tls-alpn-01")
    assert.strictEqual(config.acme?.storageDir, path.join(os.homedir(), ".local/share/switchyard/acme"))
    assert.strictEqual(Duration.toMillis(Duration.fromInputUnsafe(config.acme!.renewBefore!)), 30 * 24 * 60 * 60 * 1000)
    const custom = resolve({ directory: "https://acme.example/dir", email: "ops@example.com", renew_before: "720 hours", storage_dir: "certs", challenge: "http-01" })
    if (custom instanceof ConfigLoadError) return assert.fail(custom.message)
    assert.strictEqual(Duration.toMillis(Duration.fromInputUnsafe(custom.acme!.renewBefore!)), 720 * 60 * 60 * 1000)
    assert.strictEqual(custom.acme?.storageDir, path.resolve("certs"))
    assert.strictEqual(custom.acme?.challenge, "http-01")
    assert.isUndefined(custom.acme?.clusterLockMs, "the default lease of the cluster's order locks")
    const locked = resolve({ directory: "https://acme.example/dir", email: "ops@example.com", cluster_lock_ms: 10_000 })
    if (locked instanceof ConfigLoadError) return assert.fail(locked.message)
    assert.strictEqual(locked.acme?.clusterLockMs, 10_000)
    const none = resolveServerConfig({})
    if (none instanceof ConfigLoadError) return assert.fail(none.message)
    assert.isUndefined(none.acme)
  })

  it("refuse what cannot work, naming the field", () => {
    const cases: Array<[ServerFile["acme"], string, RegExp]> = [
      [{ email: "ops@example.com" }, "acme.directory", /required/],
      [{ directory: "http://acme.example/dir", email: "ops@example.com" }, "acme.directory", /https/],
      [{ directory: "not a url", email: "ops@example.com" }, "acme.directory", /not a URL/],
      [{ directory: "https://acme.example/dir" }, "acme.email", /required/],
      [{ directory: "https://acme.example/dir", email: "nobody" }, "acme.email", /not an email/],
      [{ directory: "https://acme.example/dir", email: "ops@example.com", renew_before: "soon" }, "acme.renew_before", /positive duration/]
    ]
    for (const [acme, field, message] of cases) {
      const result = resolve(acme)
      assert.instanceOf(result, ConfigLoadError, JSON.stringify(acme))
      if (result instanceof ConfigLoadError) {
        assert.strictEqual(result.field, field)
        assert.match(result.message, message)
      }
    }
  })

  it.effect("acme.ca_file is read into acme.ca", () =>
    Effect.gen(function*() {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-acme-cfg-"))
      yield* Effect.addFinalizer(() => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true })))
      const ca = path.join(dir, "ca.pem")
      fs.writeFileSync(ca, "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n")
      const flags = [
        { path: ["acme", "directory"], value: "https://acme.example/dir", flag: "--acme-directory" },
        { path: ["acme", "email"], value: "ops@example.com", flag: "--acme-email" },
        { path: ["acme", "ca_file"], value: ca, flag: "--acme-ca" }
      ]
      const { config } = yield* loadConfig({ schema: ServerFile, env: {}, flags })
      const resolved = resolveServerConfig(config)
      if (resolved instanceof ConfigLoadError) return assert.fail(resolved.message)
      assert.include(resolved.acme?.ca, "BEGIN CERTIFICATE")
    }).pipe(Effect.scoped))

  it("listen() asks for an acme route with tls: { domainSuffix, acme: true }", () => {
    assert.deepStrictEqual(toRoute({ port: 443, tls: { domainSuffix: "app.test", acme: true } }), {
      _tag: "Tls",
      port: 443,
      domainSuffix: "app.test",
      acme: true,
      then: "http"
    })
  })

  it.live("the commands check them before starting: server flags, client --tls-acme", () =>
    Effect.promise(async () => {
      const server = spawnSwitchyard(["server", "--check-config", "--acme-directory", "https://acme.example/dir", "--acme-email", "nobody"])
      assert.strictEqual(await server.exited, 78)
      assert.include(server.output(), "acme.email")
      const serverOk = spawnSwitchyard(["server", "--check-config", "--acme-directory", "https://acme.example/dir", "--acme-email", "ops@example.com"])
      assert.strictEqual(await serverOk.exited, 0, serverOk.output())
      const base = ["client", "--check-config", "--token", "t", "--expose", "127.0.0.1:3000", "--port", "8443", "--tls-acme"]
      const noDomain = spawnSwitchyard(base)
      assert.strictEqual(await noDomain.exited, 78)
      assert.include(noDomain.output(), "tls_acme needs the host name")
      const clientOk = spawnSwitchyard([...base, "--domain", "app.example.com"])
      assert.strictEqual(await clientOk.exited, 0, clientOk.output())
    }), 60_000)
})
