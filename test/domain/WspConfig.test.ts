import { describe, expect, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as path from "node:path"
import { Redacted } from "effect"
import { isOpen } from "../../src/domain/DestinationRules.ts"
import { parseWspClientConfig, parseWspServerConfig, WspConfigError } from "../../src/domain/WspConfig.ts"

const fixture = (name: string) => fs.readFileSync(path.join(import.meta.dirname, "../fixtures/wsp", name), "utf8")
const newId = () => "generated-id"

describe("wsp server config", () => {
  it("reads the sample wsp_server.cfg as wsp ships it", () => {
    const parsed = parseWspServerConfig(fixture("wsp_server.cfg"))
    if (parsed instanceof WspConfigError) throw parsed
    expect(parsed.config).toMatchObject({ host: "127.0.0.1", port: 8080, timeout: 1000, idleTimeout: 60_000 })
    expect(Redacted.value(parsed.config.secretKey)).toBe("")
    expect(isOpen(parsed.config.rules)).toBe(true)
    expect(parsed.unknownKeys).toEqual([])
  })

  it("applies wsp's defaults to an empty file and reports unknown keys", () => {
    const parsed = parseWspServerConfig("secretkey: s3cret\nfrobnicate: 1\nrequestkey: k\nmaxheaders: 50\n")
    if (parsed instanceof WspConfigError) throw parsed
    expect(parsed.config).toMatchObject({ host: "127.0.0.1", port: 8080, timeout: 1000, maxHeaders: 50 })
    expect(Redacted.value(parsed.config.secretKey)).toBe("s3cret")
    expect(parsed.config.requestKey && Redacted.value(parsed.config.requestKey)).toBe("k")
    expect(parsed.unknownKeys).toEqual(["frobnicate"])
    expect(String(parsed.config.secretKey)).not.toContain("s3cret")
  })

  it("waits 60 s for a response head and keeps registration closed without a secretkey unless opened", () => {
    const byDefault = parseWspServerConfig("port: 0\n")
    if (byDefault instanceof WspConfigError) throw byDefault
    expect(byDefault.config).toMatchObject({ responseTimeout: 60_000, openRegistration: false })
    const set = parseWspServerConfig("responsetimeout: 2500\ninsecureopenregistration: true\n")
    if (set instanceof WspConfigError) throw set
    expect(set.config).toMatchObject({ responseTimeout: 2500, openRegistration: true })
    expect(set.unknownKeys).toEqual([])
    const bad = parseWspServerConfig("responsetimeout: -1\n")
    expect((bad as WspConfigError).field).toBe("responsetimeout")
  })

  it("names the field and the bad value", () => {
    const bad = parseWspServerConfig(fixture("wsp_server_bad.cfg"))
    expect(bad).toBeInstanceOf(WspConfigError)
    expect((bad as WspConfigError).field).toBe("port")
    expect((bad as WspConfigError).value).toBe("80800")
    expect((bad as WspConfigError).message).toContain("port")
    const negative = parseWspServerConfig("timeout: -5\n") as WspConfigError
    expect([negative.field, negative.value]).toEqual(["timeout", "-5"])
    const text = parseWspServerConfig("host: [1]\n") as WspConfigError
    expect([text.field, text.value]).toEqual(["host", "[1]"])
    const yaml = parseWspServerConfig("host: [\n") as WspConfigError
    expect(yaml.reason).toBe("InvalidYaml")
  })

  it("compiles server-side rules and names a bad pattern", () => {
    const bad = parseWspServerConfig("blacklist:\n - url: \"(\"\n") as WspConfigError
    expect(bad.reason).toBe("InvalidPattern")
    expect(bad.field).toBe("blacklist[0].url")
  })
})

describe("wsp client config", () => {
  it("reads the sample wsp_client.cfg as wsp ships it", () => {
    const parsed = parseWspClientConfig(fixture("wsp_client.cfg"), newId)
    if (parsed instanceof WspConfigError) throw parsed
    expect(parsed.config).toMatchObject({
      id: "generated-id",
      targets: ["ws://127.0.0.1:8080/register"],
      poolIdleSize: 1,
      poolMaxSize: 100
    })
    expect(isOpen(parsed.config.rules)).toBe(true)
  })

  it("reads rules, several targets and an explicit id", () => {
    const parsed = parseWspClientConfig(fixture("wsp_client_rules.cfg"), newId)
    if (parsed instanceof WspConfigError) throw parsed
    expect(parsed.config.id).toBe("edge-1")
    expect(parsed.config.targets).toHaveLength(2)
    expect(parsed.config.rules.blacklist).toHaveLength(1)
    expect(parsed.config.rules.whitelist[0]!.headers.map(([n]) => n)).toEqual(["X-CUSTOM-HEADER"])
    expect(Redacted.value(parsed.config.secretKey)).toBe("ThisIsASecret")
    expect(parsed.config.maskFrames).toBe(true)
    const unmasked = parseWspClientConfig("maskframes: false\n", newId)
    if (unmasked instanceof WspConfigError) throw unmasked
    expect(unmasked.config.maskFrames).toBe(false)
  })

  it("names the field and the bad value", () => {
    const target = parseWspClientConfig("targets:\n - ws://ok/register\n - http://nope\n", newId) as WspConfigError
    expect([target.field, target.value]).toEqual(["targets[1]", "\"http://nope\""])
    const size = parseWspClientConfig("poolidlesize: ten\n", newId) as WspConfigError
    expect([size.field, size.value]).toEqual(["poolidlesize", "\"ten\""])
    const id = parseWspClientConfig("id: a_b\n", newId) as WspConfigError
    expect(id.field).toBe("id")
    const header = parseWspClientConfig("whitelist:\n - headers:\n     X-A: 5\n", newId) as WspConfigError
    expect([header.field, header.value]).toEqual(["whitelist[0].headers.X-A", "5"])
    const max = parseWspClientConfig("poolmaxsize: 0\n", newId) as WspConfigError
    expect(max.field).toBe("poolmaxsize")
  })
})
