import { assert, describe, it } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import {
  ConfigLoadError,
  loadConfig,
  loadOpsSections,
  ServerFile,
  settingsOf,
  splitOpsSections
} from "../../src/runtime/ConfigLoader.ts"
import { checkServerFile } from "../../src/runtime/server/ServerConfig.ts"

const withDir = <A, E>(f: (dir: string) => Effect.Effect<A, E>) =>
  Effect.acquireUseRelease(
    Effect.sync(() => fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-cfg-"))),
    f,
    (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
  )

const failure = <A>(effect: Effect.Effect<A, ConfigLoadError>) => Effect.flip(effect)

describe("loadConfig", () => {
  it.effect("flags override the environment, which overrides the file", () =>
    withDir((dir) =>
      Effect.gen(function*() {
        const file = path.join(dir, "server.yaml")
        fs.writeFileSync(file, "admin:\n  address: 127.0.0.1:1001\ncontrol:\n  address: 127.0.0.1:2001\npublic_host: 10.0.0.1\n")
        const env = { SWITCHYARD_ADMIN_ADDRESS: "127.0.0.1:1002", SWITCHYARD_CONTROL_ADDRESS: "127.0.0.1:2002" }
        const flags = [{ path: ["admin", "address"], value: "127.0.0.1:1003", flag: "--admin" }]
        const { config, sources } = yield* loadConfig({ schema: ServerFile, file, env, flags })
        assert.strictEqual(config.admin?.address, "127.0.0.1:1003")
        assert.strictEqual(config.control?.address, "127.0.0.1:2002")
        assert.strictEqual(config.public_host, "10.0.0.1")
        assert.strictEqual(sources.get("admin.address"), "--admin")
        assert.strictEqual(sources.get("control.address"), "SWITCHYARD_CONTROL_ADDRESS")
        assert.isFalse(sources.has("public_host"))
      })
    ))

  it.effect("reads JSON files and converts variables to numbers and booleans", () =>
    withDir((dir) =>
      Effect.gen(function*() {
        const file = path.join(dir, "server.json")
        fs.writeFileSync(file, JSON.stringify({ control: { max_sessions: 7 } }))
        const env = { SWITCHYARD_CONTROL_ALLOW_REMOTE_PEERS: "true", SWITCHYARD_DRAIN_TIMEOUT_MS: "2500" }
        const { config } = yield* loadConfig({ schema: ServerFile, file, env })
        assert.strictEqual(config.control?.max_sessions, 7)
        assert.strictEqual(config.control?.allow_remote_peers, true)
        assert.strictEqual(config.drain_timeout_ms, 2500)
      })
    ))

  it.effect("errors name the source, the field path and the value", () =>
    withDir((dir) =>
      Effect.gen(function*() {
        const file = path.join(dir, "server.yaml")
        fs.writeFileSync(file, "control:\n  max_sessions: -3\n")
        const fromFile = yield* failure(loadConfig({ schema: ServerFile, file, env: {} }))
        assert.strictEqual(fromFile.source, file)
        assert.strictEqual(fromFile.field, "control.max_sessions")
        assert.include(fromFile.message, `${file}: control.max_sessions:`)
        assert.include(fromFile.message, "(got -3)")

        const fromEnv = yield* failure(loadConfig({ schema: ServerFile, env: { SWITCHYARD_LOG_LEVEL: "loud" } }))
        assert.strictEqual(fromEnv.message.split(":")[0], "SWITCHYARD_LOG_LEVEL")
        assert.strictEqual(fromEnv.field, "log.level")
        assert.include(fromEnv.message, "\"loud\"")

        const fromFlag = yield* failure(loadConfig({ schema: ServerFile, env: {}, flags: [{ path: ["grace_period_ms"], value: "soon", flag: "--set grace_period_ms" }] }))
        assert.strictEqual(fromFlag.source, "--set grace_period_ms")
        assert.include(fromFlag.message, "(got \"soon\")")

        const unknownFlag = yield* failure(loadConfig({ schema: ServerFile, env: {}, flags: [{ path: ["nope"], value: "1", flag: "--set nope" }] }))
        assert.include(unknownFlag.message, "--set nope: nope: unknown field")

        fs.writeFileSync(file, "control:\n  adress: 127.0.0.1:1\n")
        const typo = yield* failure(loadConfig({ schema: ServerFile, file, env: {} }))
        assert.strictEqual(typo.message, `${file}: control.adress: unknown field`)

        fs.writeFileSync(file, "control: [unclosed\n")
        const syntax = yield* failure(loadConfig({ schema: ServerFile, file, env: {} }))
        assert.strictEqual(syntax.reason, "Syntax")
        assert.include(syntax.message, `${file}: not valid YAML`)

        const missing = yield* failure(loadConfig({ schema: ServerFile, file: path.join(dir, "absent.yaml"), env: {} }))
        assert.strictEqual(missing.reason, "Unreadable")
        assert.include(missing.message, "absent.yaml: cannot read")
      })
    ))

  it.effect("secrets: read from token_file, Redacted, never repeated in errors", () =>
    withDir((dir) =>
      Effect.gen(function*() {
        const secret = path.join(dir, "token")
        fs.writeFileSync(secret, "s3cr3t-value\n")
        const file = path.join(dir, "server.yaml")
        fs.writeFileSync(file, `control:\n  tokens:\n    - name: a\n      token_file: ${secret}\n      ports: [8000, "9000-9010"]\n`)
        const { config } = yield* loadConfig({ schema: ServerFile, file, env: {} })
        const token = config.control!.tokens![0]!.token!
        assert.isTrue(Redacted.isRedacted(token))
        assert.strictEqual(Redacted.value(token), "s3cr3t-value")
        assert.notInclude(JSON.stringify(config), "s3cr3t-value")
        assert.notInclude(String(config.control!.tokens![0]!.token), "s3cr3t-value")

        const viaEnv = yield* loadConfig({ schema: ServerFile, env: { SWITCHYARD_TOKEN_FILE: secret } })
        assert.strictEqual(Redacted.value(viaEnv.config.control!.token!), "s3cr3t-value")

        const both = yield* failure(loadConfig({ schema: ServerFile, env: { SWITCHYARD_TOKEN_FILE: secret, SWITCHYARD_TOKEN: "x" } }))
        assert.include(both.message, "set either token or token_file")

        const unreadable = yield* failure(loadConfig({ schema: ServerFile, env: { SWITCHYARD_TOKEN_FILE: path.join(dir, "none") } }))
        assert.strictEqual(unreadable.source, "SWITCHYARD_TOKEN_FILE")
        assert.include(unreadable.message, "control.token_file: cannot read")

        fs.writeFileSync(file, "control:\n  token: 12345\n")
        const badSecret = yield* failure(loadConfig({ schema: ServerFile, file, env: {} }))
        assert.include(badSecret.message, "control.token")
        assert.notInclude(badSecret.message, "12345")
      })
    ))

  it.effect("TLS pairs of the server's ports: read from their files (or variables), the key Redacted; one without the other refused", () =>
    withDir((dir) =>
      Effect.gen(function*() {
        const cert = path.join(dir, "cert.pem")
        const key = path.join(dir, "key.pem")
        fs.writeFileSync(cert, "-----BEGIN CERTIFICATE-----\ncert\n-----END CERTIFICATE-----\n")
        fs.writeFileSync(key, "-----BEGIN PRIVATE KEY-----\nkey-material\n-----END PRIVATE KEY-----\n")
        const file = path.join(dir, "server.yaml")
        const pair = `tls_cert_file: ${cert}, tls_key_file: ${key}`
        fs.writeFileSync(file, `control: { ${pair}, websocket: { enabled: true, ${pair} } }\nreverse_h2: { enabled: true, ${pair} }\n`)
        const { config } = yield* loadConfig({ schema: ServerFile, file, env: {} })
        for (const section of [config.control!, config.control!.websocket!, config.reverse_h2!]) {
          assert.include(section.tls_cert, "BEGIN CERTIFICATE")
          assert.isTrue(Redacted.isRedacted(section.tls_key))
          assert.include(Redacted.value(section.tls_key!), "key-material")
        }
        assert.notInclude(JSON.stringify(config), "key-material")
        assert.isUndefined(checkServerFile(config))
        const viaEnv = yield* loadConfig({ schema: ServerFile, env: { SWITCHYARD_CONTROL_TLS_CERT_FILE: cert, SWITCHYARD_CONTROL_TLS_KEY_FILE: key } })
        assert.include(viaEnv.config.control!.tls_cert, "BEGIN CERTIFICATE")
        fs.writeFileSync(file, `reverse_h2: { enabled: true, tls_cert_file: ${cert} }\n`)
        const half = checkServerFile((yield* loadConfig({ schema: ServerFile, file, env: {} })).config)
        assert.strictEqual(half?.field, "reverse_h2.tls_cert")
        assert.include(half?.message, "tls_cert and tls_key go together")
      })
    ))

  it("lists every scalar setting with a SWITCHYARD_ variable", () => {
    const settings = settingsOf(ServerFile)
    const names = settings.map((s) => s.path.join("."))
    assert.includeMembers(names, ["control.address", "control.token", "admin.address", "admin.enabled", "log.format", "log.level", "reverse_h2.address"])
    for (const s of settings) assert.match(s.env, /^SWITCHYARD_[A-Z0-9_]+$/)
    assert.strictEqual(settings.find((s) => s.path.join(".") === "control.token")?.env, "SWITCHYARD_TOKEN")
    assert.strictEqual(new Set(settings.map((s) => s.env)).size, settings.length)
  })
})

describe("shared sections of other commands' files", () => {
  it.effect("splits admin/log off a document and applies the environment over them", () =>
    Effect.gen(function*() {
      const { ops, rest } = splitOpsSections({ upstream: "unix:/x", admin: { address: "127.0.0.1:1" }, log: { format: "json" } })
      assert.deepStrictEqual(rest, { upstream: "unix:/x" })
      const decoded = yield* loadOpsSections(ops, "proxy.yaml", [], { SWITCHYARD_LOG_LEVEL: "debug" })
      assert.deepStrictEqual(decoded, { admin: { address: "127.0.0.1:1" }, log: { format: "json", level: "debug" } })
      const bad = yield* Effect.flip(loadOpsSections({ admin: { enabled: "yes" } }, "proxy.yaml", [], {}))
      assert.include(bad.message, "proxy.yaml: admin.enabled")
    }))
})
