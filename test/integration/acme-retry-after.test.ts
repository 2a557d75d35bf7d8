/**
 * The CA's `Retry-After`: a real HTTP server on loopback acts as the ACME directory and refuses the
 * account with 429 + `Retry-After` (seconds), 503 + `Retry-After` (an HTTP date) and 429 without one. The
 * certificate manager, timed by a TestClock, ends the order at the first such answer (the library does not
 * sleep through it), reports the CA's answer, and orders again only once the CA's wait is over.
 */
import { assert, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as http from "node:http"
import type { AddressInfo } from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { Effect } from "effect"
import { TestClock } from "effect/testing"
import { AcmeCertificates } from "../../src/services/acme/AcmeCertificates.ts"
import { noLeaks } from "../support/leaks.ts"

/** Longest real wait for the manager to reach the directory. */
const WaitLimitMs = 10_000

interface Refusal {
  readonly status: number
  readonly headers: Record<string, string>
  readonly problem: { readonly type: string; readonly detail: string }
}

/** An ACME directory whose account endpoint answers each POST with the next refusal; counts the POSTs. */
const directory = (refusals: Array<() => Refusal>) =>
  Effect.acquireRelease(
    Effect.promise(() =>
      new Promise<{ url: string; accountPosts: () => number; server: http.Server }>((resolve) => {
        let posts = 0
        let base = ""
        const server = http.createServer((req, res) => {
          req.resume()
          if (req.url === "/directory") {
            res.setHeader("content-type", "application/json")
            res.end(JSON.stringify({ newNonce: `${base}/nonce`, newAccount: `${base}/account`, newOrder: `${base}/order` }))
          } else if (req.url === "/nonce") {
            res.setHeader("replay-nonce", `nonce-${Math.random().toString(36).slice(2)}`)
            res.end()
          } else if (req.url === "/account" && req.method === "POST") {
            posts++
            const next = refusals.shift()
            const refusal = next === undefined ? { status: 500, headers: {}, problem: { type: "urn:ietf:params:acme:error:serverInternal", detail: "no more answers" } } : next()
            res.writeHead(refusal.status, { "content-type": "application/problem+json", "replay-nonce": "n", ...refusal.headers })
            res.end(JSON.stringify(refusal.problem))
          } else {
            res.statusCode = 404
            res.end()
          }
        })
        server.listen(0, "127.0.0.1", () => {
          base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
          resolve({ url: `${base}/directory`, accountPosts: () => posts, server })
        })
      })
    ),
    ({ server }) => Effect.promise(() => new Promise<void>((resolve) => {
      server.closeAllConnections()
      server.close(() => resolve())
    }))
  )

const store = Effect.acquireRelease(
  Effect.sync(() => fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-acme-retry-"))),
  (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
)

/** Polls `check` every 50 ms until it returns a value, failing after `WaitLimitMs`. */
const eventually = <A>(what: string, check: () => A | undefined, extra: () => string = () => "") =>
  Effect.gen(function*() {
    const deadline = Date.now() + WaitLimitMs
    for (;;) {
      const value = check()
      if (value !== undefined) return value
      if (Date.now() > deadline) return yield* Effect.die(new Error(`timed out waiting for ${what}${extra()}`))
      yield* Effect.promise(() => new Promise((r) => setTimeout(r, 50)))
    }
  })

/** Lets the manager's fibers and the loopback server run for a moment of real time. */
const settle = Effect.promise(() => new Promise((r) => setTimeout(r, 300)))

const rateLimited = "urn:ietf:params:acme:error:rateLimited"

describe("ACME: the CA's Retry-After", () => {
  it.live("429 + Retry-After seconds, 503 + Retry-After date, 429 without: each order ends at once and the next waits what the CA asked", () =>
    noLeaks(Effect.gen(function*() {
      const clock = yield* TestClock.make()
      // a whole second, so that an HTTP date (second resolution) is exact
      const start = Math.floor(Date.now() / 1000) * 1000
      yield* clock.setTime(start)
      const ca = yield* directory([
        () => ({ status: 429, headers: { "retry-after": "7200" }, problem: { type: rateLimited, detail: "too many new accounts\nfrom this address" } }),
        () => ({
          status: 503,
          headers: { "retry-after": new Date(clock.currentTimeMillisUnsafe() + 3 * 60 * 60 * 1000).toUTCString() },
          problem: { type: "urn:ietf:params:acme:error:serverInternal", detail: "maintenance" }
        }),
        () => ({ status: 429, headers: {}, problem: { type: rateLimited, detail: "slow down" } })
      ])
      const failures: Array<string> = []
      const acme = yield* AcmeCertificates.make({
        directoryUrl: ca.url,
        email: "ops@example.com",
        storageDir: yield* store,
        clock,
        random: () => 0,
        onFailure: (_name, reason) => failures.push(reason)
      })
      assert.isUndefined(acme.want("limited.test"))

      // 1: 429 with Retry-After: 7200 (rate limited) — waited two hours, not the one-hour default
      const first = yield* eventually("the first failure", () => acme.status().find((s) => s.failures === 1), () => JSON.stringify(acme.status()))
      assert.strictEqual(ca.accountPosts(), 1, "the library did not retry the refused request itself")
      assert.strictEqual(first.state, "waiting")
      assert.strictEqual(first.lastError, `the CA answered 429 ${rateLimited}: too many new accounts from this address (Retry-After: 7200)`)
      assert.strictEqual(Date.parse(first.nextAttempt!) - start, 7200_000)
      assert.deepStrictEqual(failures, [first.lastError])
      assert.match(acme.contextFor("limited.test") as string, /429/)
      yield* clock.adjust("7199 seconds")
      yield* settle
      assert.strictEqual(ca.accountPosts(), 1, "no order before the CA's Retry-After")
      yield* clock.adjust("1 second")

      // 2: 503 with Retry-After as an HTTP date three hours ahead — longer than the 2-minute backoff
      const second = yield* eventually("the second failure", () => acme.status().find((s) => s.failures === 2), () => JSON.stringify(acme.status()))
      assert.strictEqual(ca.accountPosts(), 2)
      assert.include(second.lastError ?? "", "503 urn:ietf:params:acme:error:serverInternal: maintenance (Retry-After: ")
      const secondAt = start + 7200_000
      assert.strictEqual(Date.parse(second.nextAttempt!) - secondAt, 3 * 60 * 60 * 1000)
      yield* clock.adjust(3 * 60 * 60 * 1000 - 1000)
      yield* settle
      assert.strictEqual(ca.accountPosts(), 2, "no order before the date the CA gave")
      yield* clock.adjust("1 second")

      // 3: 429 without Retry-After: the one-hour rate-limit wait (more than the 4-minute backoff)
      const third = yield* eventually("the third failure", () => acme.status().find((s) => s.failures === 3), () => JSON.stringify(acme.status()))
      assert.strictEqual(ca.accountPosts(), 3)
      assert.strictEqual(third.lastError, `the CA answered 429 ${rateLimited}: slow down`)
      assert.strictEqual(Date.parse(third.nextAttempt!) - (secondAt + 3 * 60 * 60 * 1000), 60 * 60 * 1000)
      assert.deepStrictEqual(acme.orders(), { issued: 0, failed: 3 })
    })))
})
