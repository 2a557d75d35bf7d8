import { assert, describe, it } from "@effect/vitest"
import { Schema } from "effect"
import {
  bestMatch,
  describeConflict,
  describeRoute,
  findConflict,
  forwardedTarget,
  type HttpRoute,
  matchesDomain,
  matchesPath,
  isRoutingRejection,
  normalizeHost,
  RouteDefinition,
  routeKey,
  routingTarget
} from "../../src/domain/Route.ts"

const decodeRoute = Schema.decodeUnknownResult(RouteDefinition)

const Labels = Schema.Array(Schema.Literals(["a", "b", "ab", "x-1"])).check(Schema.isMaxLength(4))
const Segments = Schema.Array(Schema.Literals(["a", "b", "ab", "a.b"])).check(Schema.isMaxLength(4))

/** Reference: suffix labels are the trailing labels of the host. */
const labelSuffix = (suffix: ReadonlyArray<string>, host: ReadonlyArray<string>): boolean =>
  suffix.length <= host.length && suffix.every((label, i) => host[host.length - suffix.length + i] === label)

describe("Route validation", () => {
  it("accepts the three kinds of route", () => {
    assert.strictEqual(decodeRoute({ _tag: "Http", port: 8000, pathPrefix: "/a", domainSuffix: "example.com" })._tag, "Success")
    assert.strictEqual(decodeRoute({ _tag: "Tcp", port: 22 })._tag, "Success")
    assert.strictEqual(
      decodeRoute({ _tag: "Tls", port: 443, domainSuffix: "a.test", cert: "C", key: "K", then: "http" })._tag,
      "Success"
    )
  })

  it.each([
    { _tag: "Http", port: 0 },
    { _tag: "Http", port: 65_536 },
    { _tag: "Http", port: 80.5 },
    { _tag: "Http", port: 80, pathPrefix: "a" },
    { _tag: "Http", port: 80, pathPrefix: "/a/" },
    { _tag: "Http", port: 80, pathPrefix: "/a/../b" },
    { _tag: "Http", port: 80, pathPrefix: "/a?x" },
    { _tag: "Http", port: 80, domainSuffix: "Example.com" },
    { _tag: "Http", port: 80, domainSuffix: "example.com." },
    { _tag: "Http", port: 80, domainSuffix: "-bad.com" },
    { _tag: "Http", port: 80, domainSuffix: "" },
    { _tag: "Tls", port: 443, domainSuffix: "a.test", cert: "", key: "K", then: "http" },
    { _tag: "Tls", port: 443, domainSuffix: "a.test", cert: "C", key: "K", then: "udp" },
    { _tag: "Udp", port: 53 }
  ])("rejects %j", (input) => {
    assert.strictEqual(decodeRoute(input)._tag, "Failure")
  })
})

describe("Route matching", () => {
  it("strips port, case and trailing dot from hosts", () => {
    assert.strictEqual(normalizeHost("A.Example.COM:8080"), "a.example.com")
    assert.strictEqual(normalizeHost("example.com."), "example.com")
    assert.strictEqual(normalizeHost("[::1]:8000"), "::1")
    assert.strictEqual(normalizeHost("::1"), "::1")
    assert.strictEqual(normalizeHost(undefined), "")
  })

  it("routes on the normalised path and forwards it: dot-segments removed, unreserved escapes decoded", () => {
    const cases: Array<[string, string, string]> = [
      ["/a/b?x=1", "/a/b", "/a/b?x=1"],
      ["/public/../admin", "/admin", "/admin"],
      ["/public/%2e%2e/admin?q=/../", "/admin", "/admin?q=/../"],
      ["/public/%2E%2e/admin", "/admin", "/admin"],
      ["/public/.%2e/admin", "/admin", "/admin"],
      ["/public/./x", "/public/x", "/public/x"],
      ["/public/x/..", "/public/", "/public/"],
      ["/..", "/", "/"],
      ["/../../a", "/a", "/a"],
      ["/%70ublic/x", "/public/x", "/public/x"],
      ["/a%20b/%c3%a9", "/a%20b/%C3%A9", "/a%20b/%C3%A9"],
      ["/a//b", "/a//b", "/a//b"],
      ["/.well-known/x", "/.well-known/x", "/.well-known/x"],
      ["/a;v=1/b", "/a;v=1/b", "/a;v=1/b"],
      ["*", "*", "*"]
    ]
    for (const [target, path, forwarded] of cases) {
      const r = routingTarget(target)
      assert.deepStrictEqual(isRoutingRejection(r) ? r : { path: r.path, target: r.target }, { path, target: forwarded }, target)
    }
  })

  it("refuses targets whose meaning depends on who decodes them", () => {
    const cases: Array<[string, string]> = [
      ["/public/..;/admin", "DotSegmentParameter"],
      ["/public/.;x/admin", "DotSegmentParameter"],
      ["/public/%2e%2e;/admin", "DotSegmentParameter"],
      ["/public/..%2fadmin", "EncodedSeparator"],
      ["/public/%2F../admin", "EncodedSeparator"],
      ["/public/..%5cadmin", "EncodedSeparator"],
      ["/public/..\\admin", "EncodedSeparator"],
      ["/public/%252e%252e/admin", "EncodedPercent"],
      ["/public/%00", "ControlCharacter"],
      ["/public/%zz", "BadPercentEncoding"],
      ["/public/%2", "BadPercentEncoding"],
      ["/a#frag", "Fragment"],
      ["http://h/a", "NotOriginForm"]
    ]
    for (const [target, problem] of cases) {
      const r = routingTarget(target)
      assert.strictEqual(isRoutingRejection(r) ? r.problem : "accepted", problem, target)
    }
  })

  it("matches domain suffixes on label boundaries", () => {
    assert.isTrue(matchesDomain("example.com", "example.com"))
    assert.isTrue(matchesDomain("example.com", "a.b.example.com"))
    assert.isFalse(matchesDomain("example.com", "badexample.com"))
    assert.isFalse(matchesDomain("example.com", "example.com.evil"))
    assert.isTrue(matchesDomain(undefined, "anything"))
  })

  it("matches path prefixes on segment boundaries", () => {
    assert.isTrue(matchesPath("/a", "/a"))
    assert.isTrue(matchesPath("/a", "/a/"))
    assert.isTrue(matchesPath("/a", "/a/x"))
    assert.isFalse(matchesPath("/a", "/ab"))
    assert.isFalse(matchesPath("/a", "/"))
    assert.isTrue(matchesPath("/", "/anything"))
  })

  it.prop("domain matching agrees with label-wise comparison", [Labels, Labels], ([suffix, host]) => {
    const expected = suffix.length === 0 ? true : labelSuffix(suffix, host)
    const got = matchesDomain(suffix.length === 0 ? undefined : suffix.join("."), host.join("."))
    assert.strictEqual(got, expected)
  })

  it.prop("path matching agrees with segment-wise comparison", [Segments, Segments], ([prefix, path]) => {
    const expected = prefix.length <= path.length && prefix.every((s, i) => path[i] === s)
    const got = matchesPath(prefix.length === 0 ? undefined : "/" + prefix.join("/"), "/" + path.join("/"))
    assert.strictEqual(got, expected)
  })

  it.prop("host normalization is idempotent and case-insensitive", [Labels, Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 65_535 }))], ([labels, port]) => {
    const host = labels.join(".")
    const once = normalizeHost(`${host.toUpperCase()}:${port}`)
    assert.strictEqual(once, host)
    assert.strictEqual(normalizeHost(once), once)
  })

  const RouteSet = Schema.Array(Schema.Tuple([Labels, Segments])).check(Schema.isMaxLength(6))

  it.prop(
    "bestMatch returns a matching route than which no matching route is more specific",
    [RouteSet, Labels, Segments],
    ([specs, hostLabels, pathSegments]) => {
      const routes: Array<HttpRoute> = specs.map(([labels, segments]) => ({
        _tag: "Http",
        port: 80,
        ...(labels.length > 0 ? { domainSuffix: labels.join(".") } : {}),
        ...(segments.length > 0 ? { pathPrefix: "/" + segments.join("/") } : {})
      }))
      const host = hostLabels.join(".")
      const path = "/" + pathSegments.join("/")
      const matching = routes.filter((r) => matchesDomain(r.domainSuffix, host) && matchesPath(r.pathPrefix, path))
      const best = bestMatch(routes, { _tag: "Http", port: 80, host, path })
      if (matching.length === 0) {
        assert.isUndefined(best)
        return
      }
      assert.isDefined(best)
      assert.include(matching, best)
      const score = (r: HttpRoute) => [r.domainSuffix === undefined ? -1 : r.domainSuffix.length, r.pathPrefix?.length ?? 0] as const
      const [d, p] = score(best!)
      for (const other of matching) {
        const [od, op] = score(other)
        assert.isFalse(od > d || (od === d && op > p), `${routeKey(other)} beats ${routeKey(best!)}`)
      }
    }
  )

  it("prefers the longest domain suffix over the longest path", () => {
    const routes: Array<RouteDefinition> = [
      { _tag: "Http", port: 80, pathPrefix: "/a/b/c" },
      { _tag: "Http", port: 80, domainSuffix: "x.test", pathPrefix: "/a" },
      { _tag: "Http", port: 80, domainSuffix: "y.x.test" },
      { _tag: "Http", port: 81, domainSuffix: "z.y.x.test" }
    ]
    assert.deepStrictEqual(bestMatch(routes, { _tag: "Http", port: 80, host: "z.y.x.test", path: "/a/b/c" }), routes[2])
    assert.deepStrictEqual(bestMatch(routes, { _tag: "Http", port: 80, host: "x.test", path: "/a/b/c" }), routes[1])
    assert.deepStrictEqual(bestMatch(routes, { _tag: "Http", port: 80, host: "other", path: "/a/b/c/d" }), routes[0])
    assert.isUndefined(bestMatch(routes, { _tag: "Http", port: 80, host: "other", path: "/a/b" }))
  })

  it("routes TLS by server name, then path for then: http", () => {
    const a = { _tag: "Tls", port: 443, domainSuffix: "a.test", cert: "A", key: "A", then: "http" } as const
    const a2 = { ...a, pathPrefix: "/api" }
    const b = { _tag: "Tls", port: 443, domainSuffix: "b.test", cert: "B", key: "B", then: "tcp" } as const
    const routes = [a, a2, b]
    assert.strictEqual(bestMatch(routes, { _tag: "Tls", port: 443, serverName: "www.a.test" }), a)
    assert.strictEqual(bestMatch(routes, { _tag: "Tls", port: 443, serverName: "a.test", path: "/api/x" }), a2)
    assert.strictEqual(bestMatch(routes, { _tag: "Tls", port: 443, serverName: "b.test" }), b)
    assert.isUndefined(bestMatch(routes, { _tag: "Tls", port: 443, serverName: "c.test" }))
  })

  it("reports port kind conflicts as values", () => {
    const http: RouteDefinition = { _tag: "Http", port: 8000 }
    const tcp: RouteDefinition = { _tag: "Tcp", port: 8000 }
    const conflict = findConflict([http], tcp)
    assert.deepStrictEqual(conflict, { _tag: "PortKindConflict", port: 8000, wanted: "tcp", existing: "http" })
    assert.match(describeConflict(conflict!), /port 8000 already serves http/)
    assert.isUndefined(findConflict([http], { _tag: "Http", port: 8000, pathPrefix: "/a" }))
    assert.isUndefined(findConflict([http], { _tag: "Tcp", port: 8001 }))
    const tls = { _tag: "Tls", port: 443, domainSuffix: "a.test", cert: "C", key: "K", then: "http" } as const
    assert.strictEqual(findConflict([tls], { ...tls, then: "tcp" })?._tag, "TlsModeConflict")
  })

  it("gives equal keys to routes that share backends", () => {
    assert.strictEqual(routeKey({ _tag: "Http", port: 1 }), routeKey({ _tag: "Http", port: 1, pathPrefix: "/" }))
    assert.notStrictEqual(routeKey({ _tag: "Http", port: 1, pathPrefix: "/a" }), routeKey({ _tag: "Http", port: 1 }))
    assert.strictEqual(
      routeKey({ _tag: "Tls", port: 443, domainSuffix: "a", cert: "1", key: "1", then: "tcp" }),
      routeKey({ _tag: "Tls", port: 443, domainSuffix: "a", cert: "2", key: "2", then: "tcp" })
    )
  })
})

describe("forwardedTarget (strip_path)", () => {
  const strip = (pathPrefix: string): RouteDefinition => ({ _tag: "Http", port: 80, pathPrefix, stripPrefix: true })
  it("removes the prefix at a segment boundary, keeping the query", () => {
    const cases: ReadonlyArray<readonly [string, string]> = [
      ["/app/x", "/x"],
      ["/app", "/"],
      ["/app/", "/"],
      ["/app?q=1", "/?q=1"],
      ["/app/x/y?q=/app", "/x/y?q=/app"],
      ["/app/app/x", "/app/x"]
    ]
    for (const [target, forwarded] of cases) assert.strictEqual(forwardedTarget(strip("/app"), target), forwarded, target)
    assert.strictEqual(forwardedTarget(strip("/a/b"), "/a/b/c"), "/c")
  })

  it("leaves the target alone without strip, for a / prefix, a raw TCP route, or a target the prefix does not match", () => {
    assert.strictEqual(forwardedTarget({ _tag: "Http", port: 80, pathPrefix: "/app" }, "/app/x"), "/app/x")
    assert.strictEqual(forwardedTarget(strip("/"), "/x"), "/x")
    assert.strictEqual(forwardedTarget({ _tag: "Tcp", port: 80 }, "/app/x"), "/app/x")
    assert.strictEqual(forwardedTarget(strip("/app"), "/apple"), "/apple")
    assert.strictEqual(forwardedTarget({ _tag: "Tls", port: 443, domainSuffix: "a.test", cert: "c", key: "k", then: "http", pathPrefix: "/v1", stripPrefix: true }, "/v1/users"), "/users")
  })

  it("is carried in the route's wire form and named in its description, not in its key", () => {
    const decoded = decodeRoute({ _tag: "Http", port: 80, pathPrefix: "/app", stripPrefix: true })
    assert.isTrue(decoded._tag === "Success" && decoded.success._tag === "Http" && decoded.success.stripPrefix === true)
    assert.strictEqual(describeRoute(strip("/app")), "http :80 */app (prefix stripped)")
    assert.strictEqual(routeKey(strip("/app")), routeKey({ _tag: "Http", port: 80, pathPrefix: "/app" }))
  })
})
