import { assert, describe, it } from "@effect/vitest"
import { DEFAULT_BODY_POLICY } from "../../src/domain/BodyPolicy.ts"
import {
  ConfigError,
  decodeSocketProxyFile,
  resolveConfig,
  SOCKET_PROXY_DEFAULTS,
  type SocketProxyConfig,
  type SocketProxyFile
} from "../../src/domain/SocketProxyConfig.ts"

const decode = (input: unknown): SocketProxyFile => {
  const r = decodeSocketProxyFile(input)
  if (r instanceof ConfigError) throw new Error(r.message)
  return r
}

const resolved = (r: SocketProxyConfig | ConfigError): SocketProxyConfig => {
  if (r instanceof ConfigError) throw new Error(r.message)
  return r
}

const failure = (r: unknown): ConfigError => {
  assert.instanceOf(r, ConfigError)
  return r as ConfigError
}

describe("SocketProxyConfig", () => {
  it("resolves a full file with defaults filled in", () => {
    const c = resolved(resolveConfig(decode({
      upstream: "unix:/var/run/docker.sock",
      name: "traefik",
      listen: ["127.0.0.1:2375", { address: "unix:/run/sy/docker.sock", mode: "0660" }],
      allowFrom: ["127.0.0.1", "10.0.0.0/8"],
      rules: [{ deny: "GET /containers/*/logs" }, { preset: "traefik" }, "GET /images/json", { allow: "GET /events", idleTimeoutMs: 0 }],
      limits: { maxSockets: 8 }
    })))
    assert.deepStrictEqual(c.upstream, { _tag: "Unix", path: "/var/run/docker.sock" })
    assert.deepStrictEqual(c.listen, [
      { _tag: "Tcp", host: "127.0.0.1", port: 2375 },
      { _tag: "Unix", path: "/run/sy/docker.sock", mode: 0o660 }
    ])
    assert.strictEqual(c.ruleSet.name, "traefik")
    assert.strictEqual(c.ruleSet.rules[0]!.action, "deny")
    assert.strictEqual(c.limits.maxSockets, 8)
    assert.strictEqual(c.limits.maxHeaderSize, SOCKET_PROXY_DEFAULTS.maxHeaderSize)
    assert.strictEqual(c.forwardedHeaders, "off")
  })

  it("defaults to loopback and the Docker socket, and flags override the file", () => {
    const c = resolved(resolveConfig({}, { presets: ["ping"] }))
    assert.deepStrictEqual(c.listen, [{ _tag: "Tcp", host: "127.0.0.1", port: 2375 }])
    assert.deepStrictEqual(c.upstream, { _tag: "Unix", path: "/var/run/docker.sock" })
    const d = resolved(resolveConfig(decode({ listen: ["0.0.0.0:1"], rules: ["GET /_ping"] }), { listen: ["127.0.0.1:9"], upstream: "127.0.0.1:2376" }))
    assert.deepStrictEqual(d.listen, [{ _tag: "Tcp", host: "127.0.0.1", port: 9 }])
    assert.strictEqual(d.forwardedHeaders, "replace")
  })

  it("client limits: defaults, a share of the pool when the cap is not set, and values as given", () => {
    const d = resolved(resolveConfig({}, { presets: ["ping"] })).limits
    assert.deepStrictEqual(
      [d.minRequestBodyBytesPerSecond, d.requestBodyGracePeriodMs, d.minResponseBytesPerSecond, d.responseGracePeriodMs, d.maxUpstreamSlotsPerClient, d.upstreamSlotWaitMs],
      [240, 5_000, 240, 5_000, 64, 5_000]
    )
    assert.strictEqual(SOCKET_PROXY_DEFAULTS.maxUpstreamSlotsPerClient, SOCKET_PROXY_DEFAULTS.maxSockets / 4)
    // a quarter of a smaller pool, at least one
    assert.strictEqual(resolved(resolveConfig(decode({ rules: ["GET /_ping"], limits: { maxSockets: 8 } }))).limits.maxUpstreamSlotsPerClient, 2)
    assert.strictEqual(resolved(resolveConfig(decode({ rules: ["GET /_ping"], limits: { maxSockets: 2 } }))).limits.maxUpstreamSlotsPerClient, 1)
    const set = resolved(resolveConfig(decode({
      rules: ["GET /_ping"],
      limits: { minRequestBodyBytesPerSecond: 0, requestBodyGracePeriodMs: 1, minResponseBytesPerSecond: 9, responseGracePeriodMs: 2, maxUpstreamSlotsPerClient: 0, upstreamSlotWaitMs: 3 }
    }))).limits
    assert.deepStrictEqual(
      [set.minRequestBodyBytesPerSecond, set.requestBodyGracePeriodMs, set.minResponseBytesPerSecond, set.responseGracePeriodMs, set.maxUpstreamSlotsPerClient, set.upstreamSlotWaitMs],
      [0, 1, 9, 2, 0, 3]
    )
    const bad = decodeSocketProxyFile({ limits: { upstreamSlotWaitMs: -1 } })
    assert.instanceOf(bad, ConfigError)
    assert.strictEqual((bad as ConfigError).field, "limits.upstreamSlotWaitMs")
  })

  it("refuses to start with no allow rule", () => {
    assert.strictEqual(failure(resolveConfig({})).reason, "NoRules")
    assert.strictEqual(failure(resolveConfig({}, { deny: ["GET /x"] })).reason, "NoRules")
  })

  it.each([
    { input: { upstream: 5 }, field: "upstream", value: "5" },
    { input: { listen: [{ address: "unix:/x", mode: 660 }] }, field: "listen[0]", value: "660" },
    { input: { limits: { maxSockets: 0 } }, field: "limits.maxSockets", value: "0" },
    { input: { limits: { maxHeaderSize: "big" } }, field: "limits.maxHeaderSize", value: `"big"` },
    { input: { forwardedHeaders: "yes" }, field: "forwardedHeaders", value: `"yes"` },
    { input: { lisen: [] }, field: "lisen", value: "unknown field" }
  ])("a bad file names $field and the value", ({ input, field, value }) => {
    const e = failure(decodeSocketProxyFile(input))
    assert.include(e.message, field)
    assert.include(e.message, value)
  })

  it.each([
    { file: { upstream: "docker.sock", rules: ["GET /x"] }, field: "upstream", value: `"docker.sock"` },
    { file: { listen: ["localhost"], rules: ["GET /x"] }, field: "listen[0]", value: `"localhost"` },
    { file: { listen: [{ address: "127.0.0.1:1", mode: "0660" }], rules: ["GET /x"] }, field: "listen[0].mode", value: `"0660"` },
    { file: { listen: [{ address: "unix:/x", mode: "999" }], rules: ["GET /x"] }, field: "listen[0].mode", value: `"999"` },
    { file: { allowFrom: ["10.0.0.0/8", "nope"], rules: ["GET /x"] }, field: "allowFrom[1]", value: `"nope"` },
    { file: { rules: ["GET /x", "get /y"] }, field: "rules[1]", value: "get /y" },
    { file: { rules: [{ preset: "traefix" }] }, field: "rules[0].preset", value: "traefix" },
    { file: { rules: [{ allow: "GET ~([" }] }, field: "rules[0].allow", value: "([" }
  ])("a bad value names $field", ({ file, field, value }) => {
    const e = failure(resolveConfig(decode(file)))
    assert.strictEqual(e.field, field)
    assert.include(e.message, value)
  })

  it("names the flag when a flag is bad", () => {
    assert.strictEqual(failure(resolveConfig({}, { allow: ["GET x"] })).field, "--allow")
    assert.strictEqual(failure(resolveConfig({}, { presets: ["x"] })).field, "--preset")
    assert.strictEqual(failure(resolveConfig({}, { presets: ["ping"], allowFrom: ["x"] })).field, "--allow-from")
    assert.strictEqual(failure(resolveConfig({}, { presets: ["ping"], listen: ["x"] })).field, "--listen")
  })

  it("body policy: on by default with every switch off; file switches, flags over them, sockets always protected", () => {
    const c = resolved(resolveConfig({}, { presets: ["ci"] }))
    assert.deepStrictEqual(c.bodyPolicy, {
      ...DEFAULT_BODY_POLICY,
      protectedPaths: [...DEFAULT_BODY_POLICY.protectedPaths]
    })
    const d = resolved(resolveConfig(
      decode({
        upstream: "unix:/srv/engine/engine.sock",
        listen: [{ address: "unix:/run/sy/proxy.sock" }],
        rules: ["POST /containers/create"],
        bodyPolicy: { maxBodyBytes: 65536, allowPrivileged: true, allowCapabilities: ["NET_ADMIN"], allowBindSources: ["/srv/data/", "//home//ci"] }
      }),
      { bodyAllow: ["devices", "host-namespaces"], allowCapability: ["SYS_PTRACE"], allowBindSource: ["/mnt"] }
    ))
    assert.strictEqual(d.bodyPolicy.enabled, true)
    assert.strictEqual(d.bodyPolicy.maxBodyBytes, 65536)
    assert.isTrue(d.bodyPolicy.allowPrivileged && d.bodyPolicy.allowDevices && d.bodyPolicy.allowHostNamespaces)
    assert.isFalse(d.bodyPolicy.allowUnconfined || d.bodyPolicy.allowSysctls || d.bodyPolicy.allowNamespaceJoins || d.bodyPolicy.allowVolumesFrom)
    assert.deepStrictEqual(d.bodyPolicy.allowCapabilities, ["NET_ADMIN", "SYS_PTRACE"])
    assert.deepStrictEqual(d.bodyPolicy.allowBindSources, ["/srv/data", "/home/ci", "/mnt"])
    assert.includeMembers([...d.bodyPolicy.protectedPaths], ["/var/run/docker.sock", "/srv/engine/engine.sock", "/run/sy/proxy.sock"])
    assert.isFalse(resolved(resolveConfig({}, { presets: ["ci"], bodyPolicy: "off" })).bodyPolicy.enabled)
    assert.isFalse(resolved(resolveConfig(decode({ rules: ["GET /_ping"], bodyPolicy: { enabled: false } }))).bodyPolicy.enabled)
  })

  it("body policy: bad values name their field", () => {
    assert.strictEqual(failure(resolveConfig({}, { presets: ["ci"], bodyPolicy: "maybe" })).field, "--body-policy")
    assert.strictEqual(failure(resolveConfig({}, { presets: ["ci"], bodyAllow: ["root"] })).field, "--body-allow")
    assert.strictEqual(failure(resolveConfig({}, { presets: ["ci"], allowBindSource: ["relative/path"] })).field, "--allow-bind-source")
    assert.strictEqual(failure(resolveConfig({}, { presets: ["ci"], allowCapability: ["SYS ADMIN"] })).field, "--allow-capability")
    assert.strictEqual(failure(resolveConfig(decode({ rules: ["GET /_ping"], bodyPolicy: { allowBindSources: ["/a/../b"] } }))).field, "bodyPolicy.allowBindSources[0]")
    assert.strictEqual(failure(decodeSocketProxyFile({ bodyPolicy: { allowPrivilegd: true } })).field, "bodyPolicy.allowPrivilegd")
    assert.strictEqual(failure(decodeSocketProxyFile({ bodyPolicy: { maxBodyBytes: 10 } })).field, "bodyPolicy.maxBodyBytes")
  })

  it("label scope and learning mode: off by default, from the file, flags over it; bad labels name their field", () => {
    const plain = resolved(resolveConfig(decode({ rules: ["GET /_ping"] })))
    assert.isUndefined(plain.containerLabel)
    assert.isFalse(plain.learn)
    assert.strictEqual(plain.groups?.length, 1)
    const file = resolved(resolveConfig(decode({ rules: ["GET /_ping"], container_label: "team=a", mode: "learn" })))
    assert.deepStrictEqual(file.containerLabel, { key: "team", value: "a" })
    assert.isTrue(file.learn)
    const flagged = resolved(resolveConfig(decode({ rules: ["GET /_ping"], container_label: "team=a" }), { containerLabel: "team=b", learn: true }))
    assert.deepStrictEqual(flagged.containerLabel, { key: "team", value: "b" })
    assert.isTrue(flagged.learn)
    assert.strictEqual(failure(resolveConfig(decode({ rules: ["GET /_ping"], container_label: "team" }))).field, "container_label")
    assert.strictEqual(failure(resolveConfig({}, { presets: ["ci"], containerLabel: "=x" })).field, "--container-label")
    assert.strictEqual(failure(decodeSocketProxyFile({ mode: "teach" })).field, "mode")
    assert.strictEqual(failure(resolveConfig(decode({ rules: ["GET /_ping"], listen: [{ address: "127.0.0.1:1", owner: "0" }] }))).field, "listen[0].owner")
  })
})
