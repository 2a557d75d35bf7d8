/**
 * The routes a client configuration asks for: the single-route shorthand or a `routes` list, checked
 * before dialling (each error names its field), and a route's state on its gateways in one phrase.
 */
import { assert, describe, it } from "@effect/vitest"
import { Redacted } from "effect"
import { ConfigLoadError, type ClientFile } from "../../src/runtime/ConfigLoader.ts"
import { routeState, specsOf } from "../../src/runtime/commands/clientRoutes.ts"

const token = Redacted.make("t")
const errorOf = (config: ClientFile): string => {
  const result = specsOf(config)
  assert.instanceOf(result, ConfigLoadError)
  return (result as ConfigLoadError).message
}

describe("client routes", () => {
  it("reads the single-route shorthand, strip_path included", () => {
    const specs = specsOf({ token, expose: "127.0.0.1:3000", port: 8000, path: "/app", strip_path: true })
    assert.notInstanceOf(specs, ConfigLoadError)
    assert.deepStrictEqual(specs, [{ route: { _tag: "Http", port: 8000, pathPrefix: "/app", stripPrefix: true }, expose: { host: "127.0.0.1", port: 3000 }, proxyProtocol: undefined }])
  })

  it("reads a routes list in order: HTTP, raw TCP with a PROXY header, TLS with a lowercased name", () => {
    const specs = specsOf({
      token,
      routes: [
        { expose: "127.0.0.1:3000", port: 8000, domain: "web.example.com" },
        { expose: "127.0.0.1:5432", port: 5432, tcp: true, proxy_protocol: "v2" },
        { expose: "127.0.0.1:3001", port: 8443, domain: "App.Example.com", path: "/v1", strip_path: true, tls_cert: "CERT", tls_key: Redacted.make("KEY") }
      ]
    })
    assert.notInstanceOf(specs, ConfigLoadError)
    const list = specs as Exclude<typeof specs, ConfigLoadError>
    assert.deepStrictEqual(list.map((s) => s.route), [
      { _tag: "Http", port: 8000, domainSuffix: "web.example.com" },
      { _tag: "Tcp", port: 5432 },
      { _tag: "Tls", port: 8443, domainSuffix: "app.example.com", cert: "CERT", key: "KEY", then: "http", pathPrefix: "/v1", stripPrefix: true }
    ])
    assert.deepStrictEqual(list.map((s) => s.proxyProtocol), [undefined, "v2", undefined])
  })

  it("refuses both forms at once, naming the single-route field that is set", () => {
    assert.match(errorOf({ token, port: 8000, routes: [{ expose: "127.0.0.1:1", port: 8001 }] }), /^routes: set either routes or the single-route fields, not both \(port is set too: move it into a route\)$/)
    assert.match(errorOf({ token, strip_path: false, routes: [{ expose: "127.0.0.1:1", port: 8001 }] }), /strip_path is set too/)
  })

  it("names the route and field at fault", () => {
    const cases: ReadonlyArray<readonly [ClientFile["routes"], RegExp]> = [
      [[], /^routes: the list is empty/],
      [[{ expose: "127.0.0.1:1", port: 1 }, { expose: "127.0.0.1:1", port: 1, path: "api" }], /^routes\.1\.path: "api" must start with \//],
      [[{ expose: "127.0.0.1:1", port: 1, path: "/a/" }], /^routes\.0\.path: "\/a\/" is not a path prefix/],
      [[{ expose: "127.0.0.1:1", port: 1, domain: "https://x" }], /^routes\.0\.domain: "https:\/\/x" is not a host name/],
      [[{ expose: "nowhere", port: 1 }], /^routes\.0\.expose: /],
      [[{ expose: "127.0.0.1:1", port: 1, tls_cert: "C" }], /^routes\.0\.tls_key: tls_cert needs its private key/],
      [[{ expose: "127.0.0.1:1", port: 1, tls_key: Redacted.make("K") }], /^routes\.0\.tls_cert: tls_key needs its certificate/],
      [[{ expose: "127.0.0.1:1", port: 1, proxy_protocol: "v1" }], /^routes\.0\.proxy_protocol: a PROXY header goes on raw TCP/],
      [[{ expose: "127.0.0.1:1", port: 1, strip_path: true }], /^routes\.0\.strip_path: needs a path prefix to strip/],
      [[{ expose: "127.0.0.1:1", port: 1, tcp: true, path: "/a", strip_path: true }], /^routes\.0\.strip_path: a raw TCP route has no path to strip/],
      [[{ expose: "127.0.0.1:1", port: 1, path: "/a" }, { expose: "127.0.0.1:2", port: 1, path: "/a", strip_path: true }], /^routes\.1: http :1 \*\/a \(prefix stripped\) is routes\.0 again/]
    ]
    for (const [routes, message] of cases) assert.match(errorOf({ token, routes }), message, JSON.stringify(routes))
    assert.match(errorOf({ routes: [{ expose: "127.0.0.1:1", port: 1 }] }), /^token: required/)
    assert.match(errorOf({ token, port: 1 }), /^expose: required/)
  })

  it("says where a route stands on its gateways in one phrase", () => {
    const g = (state: "bound" | "pending" | "refused", error?: string) => ({ gateway: "g", state, ...(error === undefined ? {} : { error }) })
    assert.strictEqual(routeState([g("bound"), g("bound")]), "bound")
    assert.strictEqual(routeState([g("pending")]), "pending")
    assert.strictEqual(routeState([g("bound"), g("pending")]), "bound on 1 of 2")
    assert.strictEqual(routeState([g("refused", "gateway g refused …: Conflict: …")]), "refused: gateway g refused …: Conflict: …")
    assert.strictEqual(routeState([g("bound"), g("refused", "why")]), "bound on 1 of 2: why")
  })
})
