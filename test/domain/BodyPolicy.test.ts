import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import {
  type BodyCheck,
  type BodyEndpoint,
  bodyEndpoint,
  bodyRefusalMessage,
  type BodyPolicy,
  type BodyVerdict,
  checkBody,
  DEFAULT_BODY_POLICY,
  normalizeHostPath
} from "../../src/domain/BodyPolicy.ts"

const body = (v: unknown): Buffer => Buffer.from(typeof v === "string" ? v : JSON.stringify(v))
const verdict = (endpoint: BodyEndpoint, v: unknown, policy: BodyPolicy = DEFAULT_BODY_POLICY): BodyVerdict => checkBody(policy, endpoint, body(v))
const refused = (endpoint: BodyEndpoint, v: unknown, policy: BodyPolicy = DEFAULT_BODY_POLICY) => {
  const r = verdict(endpoint, v, policy)
  if (r._tag !== "Refuse") throw new Error(`allowed: ${JSON.stringify(v)}`)
  return r
}
const create = (hostConfig: Record<string, unknown>) => ({ Image: "busybox", Cmd: ["true"], HostConfig: hostConfig })

describe("BodyPolicy", () => {
  it("finds the checked endpoints on canonical paths", () => {
    assert.strictEqual(bodyEndpoint("POST", "/containers/create"), "ContainerCreate")
    assert.strictEqual(bodyEndpoint("POST", "/containers/create/"), "ContainerCreate")
    assert.strictEqual(bodyEndpoint("POST", "/containers/abc/update"), "ContainerUpdate")
    assert.strictEqual(bodyEndpoint("POST", "/containers/a/b/update"), "ContainerUpdate")
    assert.strictEqual(bodyEndpoint("POST", "/containers/abc/exec"), "ExecCreate")
    assert.strictEqual(bodyEndpoint("POST", "/libpod/containers/abc/exec"), "ExecCreate")
    assert.strictEqual(bodyEndpoint("POST", "/services/create"), "ServiceSpec")
    assert.strictEqual(bodyEndpoint("POST", "/services/web/update"), "ServiceSpec")
    assert.strictEqual(bodyEndpoint("POST", "/libpod/containers/create"), "PodmanNative")
    assert.strictEqual(bodyEndpoint("POST", "/libpod/pods/create"), "PodmanNative")
    assert.strictEqual(bodyEndpoint("POST", "/libpod/play/kube"), "PodmanNative")
    assert.isUndefined(bodyEndpoint("GET", "/containers/create"))
    assert.isUndefined(bodyEndpoint("POST", "/containers/abc/start"))
    assert.isUndefined(bodyEndpoint("POST", "/exec/abc/start"))
  })

  it("allows plain bodies", () => {
    assert.strictEqual(verdict("ContainerCreate", create({ NetworkMode: "bridge", Binds: ["data:/data", "/anon"], CapAdd: null, CapDrop: ["ALL"] }))._tag, "Allow")
    assert.strictEqual(verdict("ContainerCreate", create({ Mounts: [{ Type: "volume", Source: "v", Target: "/v" }, { Type: "tmpfs", Target: "/t" }] }))._tag, "Allow")
    assert.strictEqual(verdict("ContainerCreate", create({ SecurityOpt: ["no-new-privileges", "label=type:container_t", "apparmor=docker-default"] }))._tag, "Allow")
    assert.strictEqual(verdict("ContainerCreate", { Image: "busybox" })._tag, "Allow")
    assert.strictEqual(verdict("ContainerUpdate", { Memory: 1024, RestartPolicy: { Name: "always" } })._tag, "Allow")
    assert.strictEqual(verdict("ExecCreate", { Cmd: ["sh"], User: "root", Privileged: false })._tag, "Allow")
    assert.strictEqual(verdict("ServiceSpec", { Name: "web", TaskTemplate: { ContainerSpec: { Image: "nginx" } } })._tag, "Allow")
  })

  /** Each refused field: [endpoint, body, field named, switch]. */
  const goldens: ReadonlyArray<readonly [BodyEndpoint, unknown, string, BodyCheck]> = [
    ["ContainerCreate", create({ Privileged: true }), "HostConfig.Privileged", "allowPrivileged"],
    ["ContainerCreate", { Image: "x", Privileged: true }, "Privileged", "allowPrivileged"],
    ["ContainerCreate", `{"Image":"x","HostConfig":{"privileged":true}}`, "HostConfig.Privileged", "allowPrivileged"],
    ["ContainerCreate", `{"Image":"x","hostconfig":{"PRIVILEGED":true}}`, "HostConfig.Privileged", "allowPrivileged"],
    ["ContainerCreate", `{"Image":"x","HostConfig":{"pr\u0130vileged":true}}`, "HostConfig.Privileged", "allowPrivileged"],
    ["ContainerCreate", `{"Image":"x","HostConfig":{"Privil\\u0065ged":true}}`, "HostConfig.Privileged", "allowPrivileged"],
    ["ContainerCreate", create({ NetworkMode: "host" }), "HostConfig.NetworkMode", "allowHostNamespaces"],
    ["ContainerCreate", create({ PidMode: "host" }), "HostConfig.PidMode", "allowHostNamespaces"],
    ["ContainerCreate", create({ IpcMode: "host" }), "HostConfig.IpcMode", "allowHostNamespaces"],
    ["ContainerCreate", create({ UTSMode: "host" }), "HostConfig.UTSMode", "allowHostNamespaces"],
    ["ContainerCreate", create({ UsernsMode: "host" }), "HostConfig.UsernsMode", "allowHostNamespaces"],
    ["ContainerCreate", create({ CgroupnsMode: "host" }), "HostConfig.CgroupnsMode", "allowHostNamespaces"],
    ["ContainerCreate", `{"HostConfig":{"pidmode":"HOST"}}`, "HostConfig.PidMode", "allowHostNamespaces"],
    ["ContainerCreate", create({ PidMode: "container:abc" }), "HostConfig.PidMode", "allowNamespaceJoins"],
    ["ContainerCreate", create({ IpcMode: "container:abc" }), "HostConfig.IpcMode", "allowNamespaceJoins"],
    ["ContainerCreate", create({ NetworkMode: "container:abc" }), "HostConfig.NetworkMode", "allowNamespaceJoins"],
    ["ContainerCreate", create({ CapAdd: ["SYS_ADMIN"] }), "HostConfig.CapAdd", "allowCapabilities"],
    ["ContainerCreate", create({ CapAdd: "cap_sys_admin" }), "HostConfig.CapAdd", "allowCapabilities"],
    ["ContainerCreate", create({ CapAdd: ["ALL"] }), "HostConfig.CapAdd", "allowCapabilities"],
    ["ContainerCreate", create({ Capabilities: ["CAP_SYS_ADMIN"] }), "HostConfig.Capabilities", "allowCapabilities"],
    ["ContainerCreate", create({ Devices: [{ PathOnHost: "/dev/null", PathInContainer: "/dev/null", CgroupPermissions: "rwm" }] }), "HostConfig.Devices", "allowDevices"],
    ["ContainerCreate", create({ DeviceRequests: [{ Count: -1, Capabilities: [["gpu"]] }] }), "HostConfig.DeviceRequests", "allowDevices"],
    ["ContainerCreate", create({ DeviceCgroupRules: ["c 1:3 rwm"] }), "HostConfig.DeviceCgroupRules", "allowDevices"],
    ["ContainerCreate", create({ SecurityOpt: ["seccomp=unconfined"] }), "HostConfig.SecurityOpt[0]", "allowUnconfined"],
    ["ContainerCreate", create({ SecurityOpt: ["no-new-privileges", "seccomp:unconfined"] }), "HostConfig.SecurityOpt[1]", "allowUnconfined"],
    ["ContainerCreate", create({ SecurityOpt: ["apparmor=unconfined"] }), "HostConfig.SecurityOpt[0]", "allowUnconfined"],
    ["ContainerCreate", create({ SecurityOpt: ["apparmor:unconfined"] }), "HostConfig.SecurityOpt[0]", "allowUnconfined"],
    ["ContainerCreate", create({ SecurityOpt: ["label=disable"] }), "HostConfig.SecurityOpt[0]", "allowUnconfined"],
    ["ContainerCreate", create({ SecurityOpt: ["label:disable"] }), "HostConfig.SecurityOpt[0]", "allowUnconfined"],
    ["ContainerCreate", create({ SecurityOpt: ["label=type:spc_t"] }), "HostConfig.SecurityOpt[0]", "allowUnconfined"],
    ["ContainerCreate", create({ SecurityOpt: ["systempaths=unconfined"] }), "HostConfig.SecurityOpt[0]", "allowUnconfined"],
    ["ContainerCreate", create({ SecurityOpt: [`seccomp={"defaultAction":"SCMP_ACT_ALLOW"}`] }), "HostConfig.SecurityOpt[0]", "allowUnconfined"],
    ["ContainerCreate", create({ MaskedPaths: [] }), "HostConfig.MaskedPaths", "allowUnconfined"],
    ["ContainerCreate", create({ Sysctls: { "kernel.core_pattern": "|/x" } }), "HostConfig.Sysctls", "allowSysctls"],
    ["ContainerCreate", `{"HostConfig":{"\u017fysctls":{"net.ipv4.ip_forward":"1"}}}`, "HostConfig.Sysctls", "allowSysctls"],
    ["ContainerCreate", create({ VolumesFrom: ["other"] }), "HostConfig.VolumesFrom", "allowVolumesFrom"],
    ["ContainerCreate", create({ Binds: ["/:/host"] }), "HostConfig.Binds[0]", "allowBindSources"],
    ["ContainerCreate", create({ Binds: ["v:/v", "/etc:/etc:ro"] }), "HostConfig.Binds[1]", "allowBindSources"],
    ["ContainerCreate", create({ Binds: ["/var/run/docker.sock:/var/run/docker.sock"] }), "HostConfig.Binds[0]", "allowBindSources"],
    ["ContainerCreate", create({ Mounts: [{ Type: "bind", Source: "/", Target: "/host" }] }), "HostConfig.Mounts[0].Source", "allowBindSources"],
    ["ContainerCreate", `{"HostConfig":{"Mounts":[{"type":"bind","SOURCE":"/etc","Target":"/e"}]}}`, "HostConfig.Mounts[0].Source", "allowBindSources"],
    [
      "ContainerCreate",
      create({ Mounts: [{ Type: "volume", Source: "v", Target: "/v", VolumeOptions: { DriverConfig: { Name: "local", Options: { type: "none", o: "bind", device: "/" } } } }] }),
      "HostConfig.Mounts[0].VolumeOptions.DriverConfig.Options",
      "allowBindSources"
    ],
    ["ContainerUpdate", { Devices: [{ PathOnHost: "/dev/sda" }] }, "Devices", "allowDevices"],
    ["ExecCreate", { Cmd: ["sh"], Privileged: true }, "Privileged", "allowPrivileged"],
    ["ExecCreate", `{"Cmd":["sh"],"privileged":true}`, "Privileged", "allowPrivileged"],
    ["ServiceSpec", { TaskTemplate: { ContainerSpec: { Image: "x", CapabilityAdd: ["NET_ADMIN"] } } }, "TaskTemplate.ContainerSpec.CapabilityAdd", "allowCapabilities"],
    ["ServiceSpec", { TaskTemplate: { ContainerSpec: { Image: "x", Mounts: [{ Type: "bind", Source: "/etc", Target: "/e" }] } } }, "TaskTemplate.ContainerSpec.Mounts[0].Source", "allowBindSources"],
    ["ServiceSpec", { TaskTemplate: { ContainerSpec: { Image: "x", Sysctls: { a: "1" } } } }, "TaskTemplate.ContainerSpec.Sysctls", "allowSysctls"],
    ["ServiceSpec", { TaskTemplate: { ContainerSpec: { Image: "x", Privileges: { Seccomp: { Mode: "unconfined" } } } } }, "TaskTemplate.ContainerSpec.Privileges.Seccomp.Mode", "allowUnconfined"],
    ["ServiceSpec", { TaskTemplate: { ContainerSpec: { Image: "x", Privileges: { AppArmor: { Mode: "disabled" } } } } }, "TaskTemplate.ContainerSpec.Privileges.AppArmor.Mode", "allowUnconfined"],
    ["ServiceSpec", { TaskTemplate: { ContainerSpec: { Image: "x", Privileges: { SELinuxContext: { Disable: true } } } } }, "TaskTemplate.ContainerSpec.Privileges.SELinuxContext.Disable", "allowUnconfined"],
    ["ServiceSpec", { TaskTemplate: { ContainerSpec: { Image: "x" }, Networks: [{ Target: "host" }] } }, "TaskTemplate.Networks[0].Target", "allowHostNamespaces"],
    ["ServiceSpec", { TaskTemplate: { Runtime: "plugin", PluginSpec: { Name: "x" } } }, "TaskTemplate.Runtime", "allowPrivileged"]
  ]

  it("goldens: each refused field is named with its switch, and the switch allows it", () => {
    for (const [endpoint, v, field, check] of goldens) {
      const r = refused(endpoint, v)
      assert.strictEqual(r.status, 403, JSON.stringify(v))
      assert.strictEqual(r.field, field, JSON.stringify(v))
      assert.strictEqual(r.check, check, JSON.stringify(v))
      const open: BodyPolicy = {
        ...DEFAULT_BODY_POLICY,
        [check]: check === "allowCapabilities" ? ["SYS_ADMIN", "ALL", "NET_ADMIN"] : check === "allowBindSources" ? ["/"] : true
      }
      const after = verdict(endpoint, v, open)
      if (String(v).includes("docker.sock") || JSON.stringify(v).includes("docker.sock") || JSON.stringify(v).includes(`"Source":"/"`) || JSON.stringify(v).includes(`"/:/host"`) || JSON.stringify(v).includes("DriverConfig")) {
        // the engine's socket (and any directory holding it) stays refused; so do volume driver options
        assert.strictEqual(after._tag, "Refuse", JSON.stringify(v))
      } else assert.strictEqual(after._tag, "Allow", `${JSON.stringify(v)} with ${check}: ${JSON.stringify(after)}`)
    }
  })

  it("bind sources: under an allowed path only, no .., never the engine's socket", () => {
    const policy: BodyPolicy = { ...DEFAULT_BODY_POLICY, allowBindSources: ["/srv/data"] }
    assert.strictEqual(verdict("ContainerCreate", create({ Binds: ["/srv/data:/d", "/srv/data/x:/x:ro"] }), policy)._tag, "Allow")
    assert.strictEqual(verdict("ContainerCreate", create({ Binds: ["//srv//data/./x:/x"] }), policy)._tag, "Allow")
    assert.strictEqual(refused("ContainerCreate", create({ Binds: ["/srv/database:/d"] }), policy).check, "allowBindSources")
    assert.strictEqual(refused("ContainerCreate", create({ Binds: ["/srv/data/../../etc:/d"] }), policy).check, "allowBindSources")
    const everything: BodyPolicy = { ...DEFAULT_BODY_POLICY, allowBindSources: ["/"] }
    assert.strictEqual(verdict("ContainerCreate", create({ Binds: ["/home:/h"] }), everything)._tag, "Allow")
    for (const source of ["/var/run/docker.sock", "/run/docker.sock", "/var/run", "/run", "/", "/var"]) {
      assert.include(refused("ContainerCreate", create({ Binds: [`${source}:/s`] }), everything).reason, "socket", source)
    }
    assert.strictEqual(normalizeHostPath("/a//b/./c/"), "/a/b/c")
    assert.isUndefined(normalizeHostPath("/a/../b"))
  })

  it("capabilities: allowed by name in any spelling", () => {
    const policy: BodyPolicy = { ...DEFAULT_BODY_POLICY, allowCapabilities: ["NET_ADMIN"] }
    assert.strictEqual(verdict("ContainerCreate", create({ CapAdd: ["net_admin", "CAP_NET_ADMIN"] }), policy)._tag, "Allow")
    assert.strictEqual(refused("ContainerCreate", create({ CapAdd: ["NET_ADMIN", "SYS_ADMIN"] }), policy).check, "allowCapabilities")
  })

  it("unreadable bodies are 400, oversized 413, Podman's native shapes 403", () => {
    for (
      const text of [
        ``,
        `[]`,
        `"x"`,
        `null`,
        `{"Image":"x"`,
        `{"HostConfig":{"Privileged":false,"Privileged":true}}`,
        `{"HostConfig":{"Privileged":false,"privileged":true}}`,
        `{"HostConfig":{"Privileged":"true"}}`,
        `{"HostConfig":{"Binds":"/:/host"}}`,
        `{"HostConfig":{"Mounts":[{"Type":"Bind","Source":"/"}]}}`,
        `{"HostConfig":[]}`,
        `{"Image":"x"} {"HostConfig":{"Privileged":true}}`
      ]
    ) assert.strictEqual(refused("ContainerCreate", text).status, 400, text)
    const small: BodyPolicy = { ...DEFAULT_BODY_POLICY, maxBodyBytes: 16 }
    assert.strictEqual(refused("ContainerCreate", { Image: "busybox:latest" }, small).status, 413)
    assert.strictEqual(refused("PodmanNative", { image: "busybox", privileged: true }).status, 403)
  })

  it("the refusal message names the call, the rule set, the field and the switch", () => {
    const r = refused("ContainerCreate", create({ Privileged: true }))
    assert.strictEqual(
      bodyRefusalMessage("ci", "POST", "/containers/create", r),
      `switchyard socket-proxy: POST /containers/create refused by the body policy of rule set "ci": HostConfig.Privileged: a privileged container (privileged containers; allowed by bodyPolicy.allowPrivileged)`
    )
  })

  // ---- property: a random create body is allowed exactly when every field it sets is allowed ----

  /** One field a body may set: how it is written, and the switch that must be on for it (none: always fine). */
  const FEATURES: ReadonlyArray<readonly [string, unknown, BodyCheck | undefined]> = [
    ["Privileged", true, "allowPrivileged"],
    ["Privileged", false, undefined],
    ["NetworkMode", "host", "allowHostNamespaces"],
    ["NetworkMode", "bridge", undefined],
    ["PidMode", "container:x", "allowNamespaceJoins"],
    ["IpcMode", "private", undefined],
    ["UTSMode", "host", "allowHostNamespaces"],
    ["CapAdd", ["SYS_ADMIN"], "allowCapabilities"],
    ["CapDrop", ["ALL"], undefined],
    ["Devices", [{ PathOnHost: "/dev/null" }], "allowDevices"],
    ["DeviceCgroupRules", [], undefined],
    ["SecurityOpt", ["seccomp=unconfined"], "allowUnconfined"],
    ["SecurityOpt", ["no-new-privileges:true"], undefined],
    ["Sysctls", { "net.core.somaxconn": "1024" }, "allowSysctls"],
    ["Sysctls", {}, undefined],
    ["VolumesFrom", ["x"], "allowVolumesFrom"],
    ["Binds", ["/srv:/srv"], "allowBindSources"],
    ["Binds", ["named:/n"], undefined],
    ["Mounts", [{ Type: "bind", Source: "/etc", Target: "/e" }], "allowBindSources"],
    ["Mounts", [{ Type: "tmpfs", Target: "/t" }], undefined],
    ["Memory", 1 << 20, undefined]
  ]
  const CHECKS: ReadonlyArray<BodyCheck> = [
    "allowPrivileged",
    "allowHostNamespaces",
    "allowNamespaceJoins",
    "allowCapabilities",
    "allowDevices",
    "allowUnconfined",
    "allowSysctls",
    "allowVolumesFrom",
    "allowBindSources"
  ]
  const between = (minimum: number, maximum: number) => Schema.Int.check(Schema.isBetween({ minimum, maximum }))

  it.effect.prop("a random create body is allowed only if the policy allows every field it sets", {
    picks: Schema.Array(Schema.Tuple([between(0, FEATURES.length - 1), between(0, 3)])).check(Schema.isBetweenLength(0, 8)),
    switches: Schema.Array(Schema.Boolean).check(Schema.isBetweenLength(CHECKS.length, CHECKS.length))
  }, ({ picks, switches }) =>
    Effect.sync(() => {
      const policy: Record<string, unknown> = { ...DEFAULT_BODY_POLICY }
      CHECKS.forEach((c, i) => {
        if (switches[i]) policy[c] = c === "allowCapabilities" ? ["SYS_ADMIN"] : c === "allowBindSources" ? ["/srv", "/etc"] : true
      })
      // each field once (the last pick of a name wins), spelled in one of four case forms
      const chosen = new Map<string, readonly [string, unknown, BodyCheck | undefined]>()
      for (const [f, spelling] of picks) {
        const feature = FEATURES[f]!
        const name = [feature[0], feature[0].toLowerCase(), feature[0].toUpperCase(), feature[0][0]!.toLowerCase() + feature[0].slice(1)][spelling]!
        chosen.set(feature[0], [name, feature[1], feature[2]])
      }
      const hostConfig = Object.fromEntries([...chosen.values()].map(([name, value]) => [name, value]))
      const needed = [...chosen.values()].map(([, , check]) => check).filter((c) => c !== undefined)
      const expected = needed.every((c) => policy[c] !== false && !(Array.isArray(policy[c]) && (policy[c] as Array<unknown>).length === 0))
      const r = checkBody(policy as unknown as BodyPolicy, "ContainerCreate", body({ Image: "busybox", HostConfig: hostConfig }))
      assert.strictEqual(r._tag === "Allow", expected, `${JSON.stringify(hostConfig)} under ${JSON.stringify(switches)}: ${JSON.stringify(r)}`)
    }))
})
