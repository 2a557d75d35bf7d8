import { assert, describe, it } from "@effect/vitest"
import { bypassesProxy, parseProxyUrl, ProxyConfigError, proxyFor, readProxyEnvironment } from "../../src/domain/ProxyEnv.ts"

describe("ProxyEnv", () => {
  it("reads lower-case variables first, then upper-case; empty values are unset", () => {
    assert.deepStrictEqual(readProxyEnvironment({ http_proxy: "a:1", HTTP_PROXY: "b:2", HTTPS_PROXY: "c:3", no_proxy: " " }), {
      httpProxy: "a:1",
      httpsProxy: "c:3",
      noProxy: undefined
    })
  })

  it("uses HTTPS_PROXY for wss and HTTP_PROXY for ws", () => {
    const env = { httpProxy: "http://plain:3128", httpsProxy: "http://secure:3129" }
    const ws = proxyFor({ secure: false, host: "gw.example.com", port: 80 }, env)
    const wss = proxyFor({ secure: true, host: "gw.example.com", port: 443 }, env)
    assert.strictEqual(ws instanceof ProxyConfigError ? "" : ws?.host, "plain")
    assert.strictEqual(wss instanceof ProxyConfigError ? "" : wss?.port, 3129)
    assert.isUndefined(proxyFor({ secure: true, host: "gw.example.com", port: 443 }, { httpProxy: "http://plain:3128" }))
  })

  it("NO_PROXY: names with their subdomains, leading dots and wildcards, ports, CIDR, *", () => {
    const list = "internal.example, .corp.test,*.lab.test, host.test:8443, 10.0.0.0/8, [::1]"
    assert.isTrue(bypassesProxy(list, "internal.example", 443))
    assert.isTrue(bypassesProxy(list, "gw.internal.example", 443))
    assert.isFalse(bypassesProxy(list, "notinternal.example", 443))
    assert.isTrue(bypassesProxy(list, "a.corp.test", 80))
    assert.isTrue(bypassesProxy(list, "x.lab.test", 80))
    assert.isTrue(bypassesProxy(list, "host.test", 8443))
    assert.isFalse(bypassesProxy(list, "host.test", 443))
    assert.isTrue(bypassesProxy(list, "10.1.2.3", 443))
    assert.isFalse(bypassesProxy(list, "11.1.2.3", 443))
    assert.isTrue(bypassesProxy(list, "[::1]", 443))
    assert.isTrue(bypassesProxy(list, "GW.INTERNAL.EXAMPLE.", 443))
    assert.isTrue(bypassesProxy("*", "anything", 1))
    assert.isFalse(bypassesProxy(undefined, "anything", 1))
    assert.isUndefined(proxyFor({ secure: false, host: "10.9.9.9", port: 80 }, { httpProxy: "p:1", noProxy: list }))
  })

  it("proxy URLs: bare host:port is http, credentials become Basic, other schemes are refused", () => {
    const bare = parseProxyUrl("proxy.local:3128")
    assert.isFalse(bare instanceof ProxyConfigError)
    if (!(bare instanceof ProxyConfigError)) {
      assert.strictEqual(bare.secure, false)
      assert.strictEqual(bare.port, 3128)
      assert.isUndefined(bare.authorization)
    }
    const withAuth = parseProxyUrl("https://al%40ice:p%3Ass@proxy.local")
    assert.isFalse(withAuth instanceof ProxyConfigError)
    if (!(withAuth instanceof ProxyConfigError)) {
      assert.strictEqual(withAuth.secure, true)
      assert.strictEqual(withAuth.port, 443)
      assert.strictEqual(withAuth.authorization, `Basic ${Buffer.from("al@ice:p:ss").toString("base64")}`)
    }
    const socks = parseProxyUrl("socks5://proxy:1080")
    assert.isTrue(socks instanceof ProxyConfigError && socks.reason === "UnsupportedScheme")
    const bad = parseProxyUrl("http://")
    assert.isTrue(bad instanceof ProxyConfigError && bad.reason === "BadUrl")
  })
})
