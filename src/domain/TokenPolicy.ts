/**
 * Who may register what: each token is granted a set of ports and, optionally, domain suffixes.
 * Tokens are compared in constant time (SHA-256 of both sides, then `timingSafeEqual`, over every grant).
 * Pure apart from hashing; it does not count sessions (the control port enforces that limit).
 */
import { createHash, timingSafeEqual } from "node:crypto"
import * as Redacted from "effect/Redacted"
import { matchesDomain, type RouteDefinition } from "./Route.ts"

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
