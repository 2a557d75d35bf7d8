/**
 * The socket proxy's request-body policy: which Docker API calls carry a body that can give a container
 * the host (container create and update, exec create, service create and update), and the checks on
 * those bodies: privileged mode, host namespaces, added capabilities, devices, confinement turned off,
 * sysctls, host paths bind-mounted and volumes taken from other containers. Each check is a switch,
 * refusing by default. Bodies are read with `StrictJson` (keys as Go matches them, duplicates refused).
 * Pure: bytes in, a verdict out. It does not read Podman's native (libpod) create bodies: it refuses them.
 */
import { isJsonError, JsonObject, type JsonValue, parseStrictJson } from "./StrictJson.ts"

/** The calls whose bodies are checked, by the body shape they carry. */
export type BodyEndpoint =
  /** `POST /containers/create`: a container config with `HostConfig` (and the deprecated top-level copy). */
  | "ContainerCreate"
  /** `POST /containers/{id}/update`: resources, shaped as part of a `HostConfig`. */
  | "ContainerUpdate"
  /** `POST /containers/{id}/exec` (also Podman's `/libpod/containers/{id}/exec`): an exec config. */
  | "ExecCreate"
  /** `POST /services/create`, `POST /services/{id}/update`: a service spec. */
  | "ServiceSpec"
  /** Podman's own create calls (`/libpod/containers/create`, pods, kube play): a shape not checked here. */
  | "PodmanNative"

/** The policy's switches; every `allow...` is off and every list empty by default. */
export interface BodyPolicy {
  /** Check bodies at all (off: they are forwarded unread, as before). */
  readonly enabled: boolean
  /** Largest body read (bytes); larger gets 413. */
  readonly maxBodyBytes: number
  /** `HostConfig.Privileged`, exec `Privileged`, plugin services. */
  readonly allowPrivileged: boolean
  /** `NetworkMode`, `PidMode`, `IpcMode`, `UTSMode`, `UsernsMode`, `CgroupnsMode` = `host`; a service on the `host` network. */
  readonly allowHostNamespaces: boolean
  /** `PidMode`, `IpcMode`, `NetworkMode` = `container:<id>` (joining another container's namespace). */
  readonly allowNamespaceJoins: boolean
  /** Capabilities `CapAdd` may name (upper case, without `CAP_`); `ALL` only when listed. */
  readonly allowCapabilities: ReadonlyArray<string>
  /** `Devices`, `DeviceRequests`, `DeviceCgroupRules`. */
  readonly allowDevices: boolean
  /** `SecurityOpt` beyond the confining forms, `MaskedPaths`/`ReadonlyPaths`, a service's `Privileges` turning confinement off. */
  readonly allowUnconfined: boolean
  /** `Sysctls`. */
  readonly allowSysctls: boolean
  /** `VolumesFrom` (the mounts of another container, which this policy did not check). */
  readonly allowVolumesFrom: boolean
  /** Host paths that bind mounts may use, with everything under them (absolute). */
  readonly allowBindSources: ReadonlyArray<string>
  /** Paths never bind-mounted, nor any directory above them (the Engine's sockets). */
  readonly protectedPaths: ReadonlyArray<string>
}

/** Largest body read by default (1 MiB; a create body is a few KiB). */
export const DEFAULT_MAX_BODY_BYTES = 1024 * 1024

/** Sockets that give control of the host's engine: never bind-mounted, whatever `allowBindSources` says. */
export const ENGINE_SOCKETS: ReadonlyArray<string> = [
  "/var/run/docker.sock",
  "/run/docker.sock",
  "/var/run/podman/podman.sock",
  "/run/podman/podman.sock",
  "/run/containerd/containerd.sock"
]

export const DEFAULT_BODY_POLICY: BodyPolicy = {
  enabled: true,
  maxBodyBytes: DEFAULT_MAX_BODY_BYTES,
  allowPrivileged: false,
  allowHostNamespaces: false,
  allowNamespaceJoins: false,
  allowCapabilities: [],
  allowDevices: false,
  allowUnconfined: false,
  allowSysctls: false,
  allowVolumesFrom: false,
  allowBindSources: [],
  protectedPaths: ENGINE_SOCKETS
}

/** The checks, each named after the switch that allows what it refuses. */
export type BodyCheck =
  | "allowPrivileged"
  | "allowHostNamespaces"
  | "allowNamespaceJoins"
  | "allowCapabilities"
  | "allowDevices"
  | "allowUnconfined"
  | "allowSysctls"
  | "allowVolumesFrom"
  | "allowBindSources"

/** What a check refuses, in words, for the refusal message. */
export const CHECK_DESCRIPTIONS: Readonly<Record<BodyCheck, string>> = {
  allowPrivileged: "privileged containers",
  allowHostNamespaces: "host namespaces",
  allowNamespaceJoins: "joining another container's namespaces",
  allowCapabilities: "added capabilities",
  allowDevices: "host devices",
  allowUnconfined: "turning confinement off",
  allowSysctls: "sysctls",
  allowVolumesFrom: "volumes from other containers",
  allowBindSources: "bind mounts of host paths"
}

/** The verdict on one body. */
export type BodyVerdict =
  | { readonly _tag: "Allow" }
  | {
    readonly _tag: "Refuse"
    /** 400 unreadable, 403 refused by a check, 413 too large. */
    readonly status: 400 | 403 | 413
    /** The field refused, as the API names it (`HostConfig.Privileged`); "" for the body as a whole. */
    readonly field: string
    /** The switch that would allow it (`undefined` for unreadable bodies: none does). */
    readonly check: BodyCheck | undefined
    /** What is wrong, without the rule set's name. */
    readonly reason: string
  }

const ALLOW: BodyVerdict = { _tag: "Allow" }

/** The refusal thrown inside a check, caught at `checkBody`. */
class Refusal {
  readonly verdict: BodyVerdict
  constructor(verdict: BodyVerdict) {
    this.verdict = verdict
  }
}

const refuse = (field: string, check: BodyCheck, reason: string): never => {
  throw new Refusal({ _tag: "Refuse", status: 403, field, check, reason })
}
const unreadable = (field: string, reason: string): never => {
  throw new Refusal({ _tag: "Refuse", status: 400, field, check: undefined, reason })
}

const at = (prefix: string, name: string): string => prefix.length === 0 ? name : `${prefix}.${name}`

// ---- endpoints ----

const ENDPOINTS: ReadonlyArray<readonly [RegExp, BodyEndpoint]> = [
  [/^\/containers\/create\/?$/, "ContainerCreate"],
  [/^\/containers\/.+\/update\/?$/, "ContainerUpdate"],
  [/^(?:\/libpod)?\/containers\/.+\/exec\/?$/, "ExecCreate"],
  [/^\/services\/create\/?$/, "ServiceSpec"],
  [/^\/services\/.+\/update\/?$/, "ServiceSpec"],
  [/^\/libpod\/containers\/create\/?$/, "PodmanNative"],
  [/^\/libpod\/containers\/.+\/update\/?$/, "PodmanNative"],
  [/^\/libpod\/pods\/create\/?$/, "PodmanNative"],
  [/^\/libpod\/(?:play\/kube|kube\/play)\/?$/, "PodmanNative"]
]

/**
 * The body shape of a request, by method and canonical path (no API version prefix), or `undefined`
 * when its body is not checked. The Engine's router reads `{name:.*}` across segments, so an id may
 * hold `/`.
 */
export const bodyEndpoint = (method: string, path: string): BodyEndpoint | undefined => {
  if (method !== "POST") return undefined
  for (const [pattern, endpoint] of ENDPOINTS) if (pattern.test(path)) return endpoint
  return undefined
}

// ---- reading fields as Go would decode them ----

const objectAt = (v: JsonValue | undefined, field: string): JsonObject | undefined => {
  if (v === undefined || v === null) return undefined
  if (v instanceof JsonObject) return v
  return unreadable(field, "expected an object")
}

const arrayAt = (v: JsonValue | undefined, field: string): ReadonlyArray<JsonValue> => {
  if (v === undefined || v === null) return []
  if (Array.isArray(v)) return v as ReadonlyArray<JsonValue>
  return unreadable(field, "expected an array")
}

const boolAt = (v: JsonValue | undefined, field: string): boolean => {
  if (v === undefined || v === null) return false
  if (typeof v === "boolean") return v
  return unreadable(field, "expected true or false")
}

const stringAt = (v: JsonValue | undefined, field: string): string => {
  if (v === undefined || v === null) return ""
  if (typeof v === "string") return v
  return unreadable(field, "expected a string")
}

/** A list of strings; with `single`, a lone string too (the Engine's `strslice`, as in `CapAdd`). */
const stringsAt = (v: JsonValue | undefined, field: string, single = false): ReadonlyArray<string> => {
  if (single && typeof v === "string") return [v]
  return arrayAt(v, field).map((s, i) => stringAt(s, `${field}[${i}]`))
}

const nonEmpty = (v: JsonValue | undefined, field: string): boolean => {
  if (v === undefined || v === null) return false
  if (Array.isArray(v)) return v.length > 0
  if (v instanceof JsonObject) return v.size > 0
  return unreadable(field, "expected an array or an object")
}

// ---- checks ----

/** A capability as the Engine normalises it: upper case, without `CAP_`. */
export const normalizeCapability = (cap: string): string => {
  const upper = cap.trim().toUpperCase()
  return upper.startsWith("CAP_") ? upper.slice(4) : upper
}

/** A host path as compared: absolute, `//` and `.` segments removed, no trailing `/`; `undefined` with `..`. */
export const normalizeHostPath = (p: string): string | undefined => {
  const segments: Array<string> = []
  for (const s of p.split("/")) {
    if (s === "" || s === ".") continue
    if (s === "..") return undefined
    segments.push(s)
  }
  return "/" + segments.join("/")
}

const under = (path: string, root: string): boolean => root === "/" || path === root || path.startsWith(root + "/")

const checkHostPath = (policy: BodyPolicy, source: string, field: string): void => {
  const path = normalizeHostPath(source)
  if (path === undefined) return refuse(field, "allowBindSources", `host path ${JSON.stringify(source)} has a .. segment`)
  for (const p of policy.protectedPaths) {
    if (under(p, path)) return refuse(field, "allowBindSources", `host path ${JSON.stringify(source)} is or holds the engine's socket ${p}, never mounted`)
  }
  if (policy.allowBindSources.some((root) => under(path, root))) return
  refuse(field, "allowBindSources", `host path ${JSON.stringify(source)} is not under an allowed bind source`)
}

/** `Mounts` entries (`container` and service `ContainerSpec` share the shape). */
const checkMounts = (policy: BodyPolicy, v: JsonValue | undefined, field: string): void => {
  arrayAt(v, field).forEach((m, i) => {
    const f = `${field}[${i}]`
    const mount = objectAt(m, f)
    if (mount === undefined) return
    const type = stringAt(mount.get("Type"), `${f}.Type`)
    switch (type) {
      case "bind":
      case "npipe":
        return checkHostPath(policy, stringAt(mount.get("Source"), `${f}.Source`), `${f}.Source`)
      case "volume": {
        // The local driver's `type=none,o=bind,device=/path` makes a volume a bind mount of a host path.
        const options = objectAt(mount.get("VolumeOptions"), `${f}.VolumeOptions`)
        const driver = objectAt(options?.get("DriverConfig"), `${f}.VolumeOptions.DriverConfig`)
        if (driver !== undefined && nonEmpty(driver.get("Options"), `${f}.VolumeOptions.DriverConfig.Options`)) {
          refuse(`${f}.VolumeOptions.DriverConfig.Options`, "allowBindSources", "volume driver options can bind-mount a host path")
        }
        return
      }
      case "tmpfs":
      case "image":
      case "cluster":
        return
      default:
        unreadable(`${f}.Type`, `mount type ${JSON.stringify(type)} is not one the policy knows`)
    }
  })
}

/** `Binds` entries `source:target[:options]`: an absolute source is a host path. */
const checkBinds = (policy: BodyPolicy, v: JsonValue | undefined, field: string): void => {
  stringsAt(v, field).forEach((bind, i) => {
    const colon = bind.indexOf(":")
    if (colon === -1) return // an anonymous volume at that container path
    const source = bind.slice(0, colon)
    if (source.startsWith("/")) checkHostPath(policy, source, `${field}[${i}]`)
  })
}

const checkCapabilities = (policy: BodyPolicy, v: JsonValue | undefined, field: string): void => {
  const allowed = new Set(policy.allowCapabilities.map(normalizeCapability))
  for (const cap of stringsAt(v, field, true)) {
    if (!allowed.has(normalizeCapability(cap))) refuse(field, "allowCapabilities", `capability ${JSON.stringify(cap)} is not in the allowed list`)
  }
}

const NAMESPACE_MODES = ["NetworkMode", "PidMode", "IpcMode", "UTSMode", "UsernsMode", "CgroupnsMode"] as const
const JOINABLE: ReadonlySet<string> = new Set(["NetworkMode", "PidMode", "IpcMode"])

/**
 * `SecurityOpt` entries that keep confinement: `no-new-privileges` (any value), SELinux labels other
 * than `disable` and the unconfined types, AppArmor profiles other than `unconfined`, the default
 * seccomp profile. Anything else (`seccomp=unconfined`, a custom seccomp profile, `apparmor=unconfined`,
 * `label=disable`, `systempaths=unconfined`, `writable-cgroups=true`, unknown options) is refused.
 */
const CONFINING_SECURITY_OPT = /^(?:no-new-privileges(?:[=:](?:true|false))?|label[=:](?:user|role|level):[^\s]*|label[=:]type:(?!(?:spc_t|unconfined_t)$)[A-Za-z0-9_]+|apparmor[=:](?!unconfined$)[A-Za-z0-9_.\-/]+|seccomp[=:](?:builtin|default))$/

/** A `HostConfig` (or the update body, or the deprecated top-level copy of a create body). */
const checkHostConfig = (policy: BodyPolicy, hc: JsonObject, prefix: string): void => {
  if (!policy.allowPrivileged && boolAt(hc.get("Privileged"), at(prefix, "Privileged"))) {
    refuse(at(prefix, "Privileged"), "allowPrivileged", "a privileged container")
  }
  for (const name of NAMESPACE_MODES) {
    const field = at(prefix, name)
    const mode = stringAt(hc.get(name), field).toLowerCase()
    const kind = mode.split(":")[0]
    if (kind === "host" && !policy.allowHostNamespaces) refuse(field, "allowHostNamespaces", `${name} ${JSON.stringify(mode)} shares the host's namespace`)
    if (kind === "container" && JOINABLE.has(name) && !policy.allowNamespaceJoins) {
      refuse(field, "allowNamespaceJoins", `${name} ${JSON.stringify(mode)} joins another container's namespace`)
    }
  }
  checkCapabilities(policy, hc.get("CapAdd"), at(prefix, "CapAdd"))
  checkCapabilities(policy, hc.get("Capabilities"), at(prefix, "Capabilities"))
  if (!policy.allowDevices) {
    for (const name of ["Devices", "DeviceRequests", "DeviceCgroupRules"]) {
      if (nonEmpty(hc.get(name), at(prefix, name))) refuse(at(prefix, name), "allowDevices", "host devices")
    }
  }
  if (!policy.allowUnconfined) {
    stringsAt(hc.get("SecurityOpt"), at(prefix, "SecurityOpt")).forEach((opt, i) => {
      if (!CONFINING_SECURITY_OPT.test(opt)) {
        refuse(`${at(prefix, "SecurityOpt")}[${i}]`, "allowUnconfined", `security option ${JSON.stringify(opt)} is not one that keeps confinement`)
      }
    })
    for (const name of ["MaskedPaths", "ReadonlyPaths"]) {
      const v = hc.get(name)
      if (v !== undefined && v !== null) refuse(at(prefix, name), "allowUnconfined", `${name} replaces the engine's default list`)
    }
  }
  if (!policy.allowSysctls && nonEmpty(hc.get("Sysctls"), at(prefix, "Sysctls"))) refuse(at(prefix, "Sysctls"), "allowSysctls", "sysctls")
  if (!policy.allowVolumesFrom && nonEmpty(hc.get("VolumesFrom"), at(prefix, "VolumesFrom"))) {
    refuse(at(prefix, "VolumesFrom"), "allowVolumesFrom", "mounts taken from another container")
  }
  checkBinds(policy, hc.get("Binds"), at(prefix, "Binds"))
  checkMounts(policy, hc.get("Mounts"), at(prefix, "Mounts"))
}

/** Service networks: attaching to the `host` network is the host's network namespace. */
const checkServiceNetworks = (policy: BodyPolicy, v: JsonValue | undefined, field: string): void => {
  arrayAt(v, field).forEach((n, i) => {
    const net = objectAt(n, `${field}[${i}]`)
    const target = stringAt(net?.get("Target"), `${field}[${i}].Target`)
    if (target.toLowerCase() === "host" && !policy.allowHostNamespaces) refuse(`${field}[${i}].Target`, "allowHostNamespaces", "the host network")
  })
}

const checkServiceSpec = (policy: BodyPolicy, spec: JsonObject): void => {
  checkServiceNetworks(policy, spec.get("Networks"), "Networks")
  const task = objectAt(spec.get("TaskTemplate"), "TaskTemplate")
  if (task === undefined) return
  checkServiceNetworks(policy, task.get("Networks"), "TaskTemplate.Networks")
  const runtime = stringAt(task.get("Runtime"), "TaskTemplate.Runtime").toLowerCase()
  if (!policy.allowPrivileged) {
    // A plugin service installs a plugin with the privileges it asks for.
    if (runtime !== "" && runtime !== "container") refuse("TaskTemplate.Runtime", "allowPrivileged", `runtime ${JSON.stringify(runtime)}`)
    if (objectAt(task.get("PluginSpec"), "TaskTemplate.PluginSpec") !== undefined) refuse("TaskTemplate.PluginSpec", "allowPrivileged", "a plugin")
  }
  const p = "TaskTemplate.ContainerSpec"
  const cs = objectAt(task.get("ContainerSpec"), p)
  if (cs === undefined) return
  const privileges = objectAt(cs.get("Privileges"), `${p}.Privileges`)
  if (privileges !== undefined && !policy.allowUnconfined) {
    const selinux = objectAt(privileges.get("SELinuxContext"), `${p}.Privileges.SELinuxContext`)
    if (boolAt(selinux?.get("Disable"), `${p}.Privileges.SELinuxContext.Disable`)) {
      refuse(`${p}.Privileges.SELinuxContext.Disable`, "allowUnconfined", "SELinux labelling disabled")
    }
    const seccomp = objectAt(privileges.get("Seccomp"), `${p}.Privileges.Seccomp`)
    const seccompMode = stringAt(seccomp?.get("Mode"), `${p}.Privileges.Seccomp.Mode`)
    if (seccompMode !== "" && seccompMode !== "default") refuse(`${p}.Privileges.Seccomp.Mode`, "allowUnconfined", `seccomp mode ${JSON.stringify(seccompMode)}`)
    const apparmor = objectAt(privileges.get("AppArmor"), `${p}.Privileges.AppArmor`)
    const apparmorMode = stringAt(apparmor?.get("Mode"), `${p}.Privileges.AppArmor.Mode`)
    if (apparmorMode !== "" && apparmorMode !== "default") refuse(`${p}.Privileges.AppArmor.Mode`, "allowUnconfined", `AppArmor mode ${JSON.stringify(apparmorMode)}`)
  }
  checkCapabilities(policy, cs.get("CapabilityAdd"), `${p}.CapabilityAdd`)
  if (!policy.allowSysctls && nonEmpty(cs.get("Sysctls"), `${p}.Sysctls`)) refuse(`${p}.Sysctls`, "allowSysctls", "sysctls")
  checkMounts(policy, cs.get("Mounts"), `${p}.Mounts`)
}

/**
 * Judges one body. The whole body must be one JSON object read strictly (400 otherwise); then every
 * check of its endpoint runs, and the first field refused is the verdict.
 */
export const checkBody = (policy: BodyPolicy, endpoint: BodyEndpoint, body: Uint8Array): BodyVerdict => {
  if (body.length > policy.maxBodyBytes) {
    return { _tag: "Refuse", status: 413, field: "", check: undefined, reason: `a body larger than ${policy.maxBodyBytes} bytes is not read` }
  }
  if (endpoint === "PodmanNative") {
    return {
      _tag: "Refuse",
      status: 403,
      field: "",
      check: undefined,
      reason: "Podman's native create bodies are not checked by the body policy, so they are refused while it is on (bodyPolicy.enabled)"
    }
  }
  const value = parseStrictJson(body)
  if (isJsonError(value)) return { _tag: "Refuse", status: 400, field: "", check: undefined, reason: `the body is not read: ${value.message} (at ${value.offset})` }
  if (!(value instanceof JsonObject)) return { _tag: "Refuse", status: 400, field: "", check: undefined, reason: "the body must be a JSON object" }
  try {
    switch (endpoint) {
      case "ContainerCreate": {
        // The Engine reads HostConfig fields at the top level too when `HostConfig` is absent.
        checkHostConfig(policy, value, "")
        const hc = objectAt(value.get("HostConfig"), "HostConfig")
        if (hc !== undefined) checkHostConfig(policy, hc, "HostConfig")
        break
      }
      case "ContainerUpdate":
        checkHostConfig(policy, value, "")
        break
      case "ExecCreate":
        if (!policy.allowPrivileged && boolAt(value.get("Privileged"), "Privileged")) refuse("Privileged", "allowPrivileged", "a privileged exec")
        break
      case "ServiceSpec":
        checkServiceSpec(policy, value)
        break
    }
  } catch (e) {
    if (e instanceof Refusal) return e.verdict
    throw e
  }
  return ALLOW
}

/** The one-line answer to a refused body, in the socket proxy's voice. */
export const bodyRefusalMessage = (ruleSet: string, method: string, path: string, verdict: Extract<BodyVerdict, { _tag: "Refuse" }>): string => {
  const what = verdict.field.length > 0 ? `${verdict.field}: ${verdict.reason}` : verdict.reason
  const why = verdict.check === undefined
    ? ""
    : ` (${CHECK_DESCRIPTIONS[verdict.check]}; allowed by bodyPolicy.${verdict.check})`
  return `switchyard socket-proxy: ${method} ${path} refused by the body policy of rule set "${ruleSet}": ${what}${why}`
}
