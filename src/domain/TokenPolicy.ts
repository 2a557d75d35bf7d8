/**
 * Who may register what: each token is granted a set of ports and, optionally, domain suffixes.
 * Tokens are compared in constant time (SHA-256 of both sides, then `timingSafeEqual`, over every grant).
 * Pure apart from hashing; it does not count sessions (the control port enforces that limit).
 */
import { Buffer } from "node:buffer"
import { createHash, timingSafeEqual } from "node:crypto"
import * as Redacted from "effect/Redacted"
import { Schema } from "effect"
import { isDomainSuffix, matchesDomain, MaxPort, type RouteDefinition } from "./Route.ts"

/** An inclusive range of ports. */
export interface PortRange {
  readonly from: number
  readonly to: number
}

/** What one token may do. */
export interface TokenGrant {
  /** Name used in logs and metrics (never the token). */
  readonly name: string
  readonly token: Redacted.Redacted<string>
  /** Ports this token may serve; a number or an inclusive range. */
  readonly ports: ReadonlyArray<number | PortRange>
  /**
   * Domain suffixes this token may claim; a route's `domainSuffix` must be inside one of them. When
   * absent, any domain is allowed, including routes without a domain.
   */
  readonly domainSuffixes?: ReadonlyArray<string> | undefined
  /**
   * Routes of this token may be joined by backends of other tokens that share theirs, and it may join
   * theirs (default false: a route belongs to the token that registered it first).
   */
  readonly shareRoutes?: boolean | undefined
}

/** Why a granted token still may not serve a route. */
export type GrantRefusal =
  | { readonly _tag: "PortNotAllowed"; readonly port: number }
  | { readonly _tag: "DomainNotAllowed"; readonly domainSuffix: string | undefined }

/** A compiled set of grants. */
export interface TokenPolicy {
  /** The grant whose token equals `token`, or `undefined`. Takes the same time whichever grant matches. */
  readonly authenticate: (token: Redacted.Redacted<string>) => TokenGrant | undefined
  /** `undefined` when `grant` allows `route`, else why not. */
  readonly authorize: (grant: TokenGrant, route: RouteDefinition) => GrantRefusal | undefined
}

const digest = (value: string): Buffer => createHash("sha256").update(value, "utf8").digest()

const routeDomain = (route: RouteDefinition): string | undefined =>
  route._tag === "Tcp" ? undefined : route.domainSuffix

/** True when `grant` lists `port`. */
export const grantsPort = (grant: TokenGrant, port: number): boolean =>
  grant.ports.some((p) => typeof p === "number" ? p === port : port >= p.from && port <= p.to)

/** Compiles grants into a policy. Token hashes are computed once here. */
export const makeTokenPolicy = (grants: ReadonlyArray<TokenGrant>): TokenPolicy => {
  const hashed = grants.map((grant) => ({ grant, hash: digest(Redacted.value(grant.token)) }))
  return {
    authenticate: (token) => {
      const candidate = digest(Redacted.value(token))
      let found: TokenGrant | undefined
      // every grant is compared, so the time taken does not reveal which one matched
      for (const { grant, hash } of hashed) {
        if (timingSafeEqual(hash, candidate) && found === undefined) found = grant
      }
      return found
    },
    authorize: (grant, route) => {
      if (!grantsPort(grant, route.port)) return { _tag: "PortNotAllowed", port: route.port }
      if (grant.domainSuffixes === undefined) return undefined
      const domain = routeDomain(route)
      if (domain === undefined) return { _tag: "DomainNotAllowed", domainSuffix: undefined }
      return grant.domainSuffixes.some((allowed) => matchesDomain(allowed, domain))
        ? undefined
        : { _tag: "DomainNotAllowed", domainSuffix: domain }
    }
  }
}

/** A grant written on a command line or in an environment variable could not be read. */
export class TokenGrantError extends Schema.TaggedError<TokenGrantError>()("TokenGrantError", {
  reason: Schema.Literals(["Malformed", "BadPort", "BadDomain"]),
  message: Schema.String
}) {}

const parsePorts = (text: string): Array<number | PortRange> | TokenGrantError => {
  const out: Array<number | PortRange> = []
  for (const part of text.split(",")) {
    const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(part.trim())
    const from = m ? Number(m[1]) : Number.NaN
    const to = m?.[2] !== undefined ? Number(m[2]) : from
    if (!m || from < 1 || to > MaxPort || to < from) {
      return new TokenGrantError({ reason: "BadPort", message: `"${part}" is not a port (1-${MaxPort}) or a range a-b` })
    }
    out.push(from === to ? from : { from, to })
  }
  return out
}

/**
 * Reads a grant written as `name:token:ports[:domains]`, e.g. `team-a:s3cret:8000,9000-9099:a.example.com`
 * (ports: numbers or ranges, comma-separated; domains: suffixes, comma-separated, optional). The error
 * never repeats the token.
 */
export const parseTokenGrant = (text: string): TokenGrant | TokenGrantError => {
  const parts = text.split(":")
  if (parts.length < 3 || parts.length > 4 || parts[0] === "" || parts[1] === "") {
    return new TokenGrantError({ reason: "Malformed", message: "expected name:token:ports[:domains]" })
  }
  const [name, token, portText, domainText] = parts as [string, string, string, string | undefined]
  const ports = parsePorts(portText)
  if (ports instanceof TokenGrantError) return ports
  if (domainText === undefined || domainText === "") return { name, token: Redacted.make(token), ports }
  const domainSuffixes = domainText.split(",").map((d) => d.trim().toLowerCase())
  const bad = domainSuffixes.find((d) => !isDomainSuffix(d))
  if (bad !== undefined) return new TokenGrantError({ reason: "BadDomain", message: `"${bad}" is not a domain suffix` })
  return { name, token: Redacted.make(token), ports, domainSuffixes }
}
