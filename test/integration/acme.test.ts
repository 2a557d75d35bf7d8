/**
 * ACME certificates against Debian's pebble on loopback: pebble resolves the test names through a DNS
 * responder of the test (A 127.0.0.1) and validates on the gateway's public ports. A certificate is
 * issued through a real HTTP-01 validation and through TLS-ALPN-01, and curl verifies the served chain
 * against pebble's root; a restart serves the stored certificate without a new order; renewal is driven
 * by a TestClock given to the certificate manager; a failed validation is reported and retried after the
 * backoff; a name the token is not granted is refused.
 */
import { assert, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import { X509Certificate } from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import * as tls from "node:tls"
import { Context, Effect, Exit, Redacted, Scope } from "effect"
import { TestClock } from "effect/testing"
import type { TokenGrant } from "../../src/domain/TokenPolicy.ts"
import { AcmeUnusedGraceMs } from "../../src/domain/Acme.ts"
import { AcmeCertificates, type AcmeCertificatesShape, type AcmeConfig } from "../../src/services/acme/AcmeCertificates.ts"
import { TunnelClient } from "../../src/services/client/TunnelClient.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { freePort } from "../services/ListenersFixtures.ts"
import { noLeaks } from "../support/leaks.ts"
import { type DnsResponder, type Pebble, requirePebble, startDns, startPebble } from "../support/pebble.ts"
import { client, gateway, serveHttp, token } from "./tunnelHarness.ts"

const available = requirePebble()
const describePebble = available ? describe : describe.skip

/** Longest real wait for something the CA and the gateway do on their own (an order, a validation). */
const WaitLimitMs = 30_000

interface Lab {
  readonly pebble: Pebble
  readonly dns: DnsResponder
  readonly httpPort: number
  readonly tlsPort: number
  readonly storageDir: string
}

/** pebble validating on two fresh ports, a DNS responder for `names`, a private store; all gone with the scope. */
const lab = (names: ReadonlyArray<string>) =>
  Effect.acquireRelease(
    Effect.promise(async (): Promise<Lab> => {
      const dns = await startDns(names)
      const httpPort = await freePort()
      const tlsPort = await freePort()
      const pebble = await startPebble({ httpPort, tlsPort, dnsPort: dns.port })
      const storageDir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-acme-"))
      return { pebble, dns, httpPort, tlsPort, storageDir }
    }),
    (l) => Effect.promise(async () => {
      await l.pebble.stop()
      await l.dns.close()
      fs.rmSync(l.storageDir, { recursive: true, force: true })
    })
  )

const acmeConfig = (l: Lab, overrides: Partial<AcmeConfig> = {}): AcmeConfig => ({
  directoryUrl: l.pebble.directoryUrl,
  email: "ops@example.com",
  ca: l.pebble.ca,
  storageDir: l.storageDir,
  ...overrides
})

/** A gateway obtaining certificates with `acme`, and a tunnel client to it; both closed with the scope. */
const gatewayWith = (certificates: AcmeCertificatesShape, grants?: ReadonlyArray<TokenGrant>) =>
  Effect.gen(function*() {
    const control = Context.get(
      yield* gateway({ certificates, ...(grants === undefined ? {} : { control: { address: { host: "127.0.0.1", port: 0 }, tokens: grants } }) }),
      ControlPort
    )
    const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
    return { control, tunnel }
  })

/** Polls `check` every 100 ms until it returns a value, failing after `WaitLimitMs`. */
const eventually = <A>(what: string, check: () => A | undefined, extra: () => string = () => "") =>
  Effect.gen(function*() {
    const deadline = Date.now() + WaitLimitMs
    for (;;) {
      const value = check()
      if (value !== undefined) return value
      if (Date.now() > deadline) return yield* Effect.die(new Error(`timed out waiting for ${what}${extra()}`))
      yield* Effect.promise(() => new Promise((r) => setTimeout(r, 100)))
    }
  })

/** curl over HTTPS to `name` on the gateway's TLS port, verifying the chain against `caFile`; exit code and output. */
const curl = (name: string, port: number, caFile: string) =>
  Effect.promise(() =>
    new Promise<{ code: number; out: string }>((resolve) =>
      execFile(
        "curl",
        ["-sS", "--max-time", "10", "--cacert", caFile, "--resolve", `${name}:${port}:127.0.0.1`, `https://${name}:${port}/`],
        (error, stdout, stderr) => resolve({ code: error === null ? 0 : (error as { code?: number }).code ?? 1, out: stdout + stderr })
      )
    )
  )

/** The certificate the gateway serves for `name` (unverified), or the TLS error. */
const servedCertificate = (name: string, port: number) =>
  Effect.promise(() =>
    new Promise<{ cert?: X509Certificate; error?: string }>((resolve) => {
      const socket = tls.connect({ host: "127.0.0.1", port, servername: name, rejectUnauthorized: false }, () => {
        const raw = socket.getPeerX509Certificate()
        socket.destroy()
        resolve(raw === undefined ? { error: "no certificate" } : { cert: raw })
      })
      socket.on("error", (e) => resolve({ error: `${(e as NodeJS.ErrnoException).code ?? ""} ${e.message}` }))
    })
  )

const rootFile = (l: Lab) =>
  Effect.promise(async () => {
    const file = path.join(l.storageDir, "..", `${path.basename(l.storageDir)}-root.pem`)
    fs.writeFileSync(file, await l.pebble.root())
    return file
  }).pipe(Effect.tap((file) => Effect.addFinalizer(() => Effect.sync(() => fs.rmSync(file, { force: true })))))

const hello = (res: { end: (s: string) => void }) => res.end("hello over acme")

describePebble("ACME certificates (pebble)", () => {
  it.live("TLS-ALPN-01: the gateway orders on the first registration, serves the chain by SNI, curl verifies it against pebble's root; key stored 0600", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["app.test"])
      const acme = yield* AcmeCertificates.make(acmeConfig(l, { challenge: "tls-alpn-01" }))
      const { tunnel } = yield* gatewayWith(acme)
      yield* serveHttp(tunnel, { _tag: "Tls", port: l.tlsPort, domainSuffix: "app.test", acme: true, then: "http" }, (_req, res) => hello(res))
      yield* eventually("the certificate", () => acme.status().find((s) => s.state === "valid"), () => `: ${JSON.stringify(acme.status())}\n${l.pebble.output()}`)
      const root = yield* rootFile(l)
      const result = yield* curl("app.test", l.tlsPort, root)
      assert.strictEqual(result.code, 0, result.out)
      assert.strictEqual(result.out, "hello over acme")
      const keyFile = path.join(l.storageDir, "app.test", "key.pem")
      assert.strictEqual(fs.statSync(keyFile).mode & 0o777, 0o600)
      assert.strictEqual(fs.statSync(path.join(l.storageDir, "app.test", "fullchain.pem")).mode & 0o777, 0o600)
      assert.deepStrictEqual(acme.orders(), { issued: 1, failed: 0 })
    })))

  it.live("HTTP-01: answered on the gateway's HTTP public port before any route; the certificate is served and verified", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["web.test"])
      const acme = yield* AcmeCertificates.make(acmeConfig(l, { challenge: "http-01" }))
      const { tunnel } = yield* gatewayWith(acme)
      // the HTTP port carries a catch-all route of its own: the challenge is answered before it
      let routed = 0
      yield* serveHttp(tunnel, { _tag: "Http", port: l.httpPort }, (_req, res) => {
        routed++
        res.end("plain route")
      })
      yield* serveHttp(tunnel, { _tag: "Tls", port: l.tlsPort, domainSuffix: "web.test", acme: true, then: "http" }, (_req, res) => hello(res))
      yield* eventually("the certificate", () => acme.status().find((s) => s.state === "valid"), () => `: ${JSON.stringify(acme.status())}\n${l.pebble.output()}`)
      assert.strictEqual(routed, 0, "the challenge request never reached the route's backend")
      const root = yield* rootFile(l)
      const result = yield* curl("web.test", l.tlsPort, root)
      assert.strictEqual(result.code, 0, result.out)
      assert.strictEqual(result.out, "hello over acme")
    })))

  it.live("a restart serves the stored certificate without a new order", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["keep.test"])
      const route = { _tag: "Tls" as const, port: l.tlsPort, domainSuffix: "keep.test", acme: true as const, then: "http" as const }
      const firstSerial = yield* Effect.scoped(Effect.gen(function*() {
        const acme = yield* AcmeCertificates.make(acmeConfig(l))
        const { tunnel } = yield* gatewayWith(acme)
        yield* serveHttp(tunnel, route, (_req, res) => hello(res))
        yield* eventually("the certificate", () => acme.status().find((s) => s.state === "valid"), () => `: ${JSON.stringify(acme.status())}`)
        const served = yield* servedCertificate("keep.test", l.tlsPort)
        return served.cert!.serialNumber
      }))
      const ordersBefore = l.pebble.output().split("Added order").length
      const acme = yield* AcmeCertificates.make(acmeConfig(l))
      const { tunnel } = yield* gatewayWith(acme)
      yield* serveHttp(tunnel, route, (_req, res) => hello(res))
      const served = yield* servedCertificate("keep.test", l.tlsPort)
      assert.strictEqual(served.cert?.serialNumber, firstSerial, served.error)
      assert.strictEqual(acme.status()[0]?.state, "valid")
      assert.deepStrictEqual(acme.orders(), { issued: 0, failed: 0 })
      const root = yield* rootFile(l)
      const result = yield* curl("keep.test", l.tlsPort, root)
      assert.strictEqual(result.code, 0, result.out)
      assert.strictEqual(l.pebble.output().split("Added order").length, ordersBefore, "pebble received no new order")
    })))

  it.live("renewal is driven by the clock: renewBefore the expiry a new certificate is ordered and served to new connections; an open connection keeps going", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["renew.test"])
      const clock = yield* TestClock.make()
      yield* clock.setTime(Date.now())
      const acme = yield* AcmeCertificates.make(acmeConfig(l, { clock, renewBefore: "30 days" }))
      const { tunnel } = yield* gatewayWith(acme)
      let served = 0
      // a request for /held is answered only once released: it keeps the connection busy across the renewal
      const held: Array<() => void> = []
      yield* serveHttp(tunnel, { _tag: "Tls", port: l.tlsPort, domainSuffix: "renew.test", acme: true, then: "http" }, (req, res) => {
        if (req.url === "/held") held.push(() => res.end(`answer ${++served}`))
        else res.end(`answer ${++served}`)
      })
      const first = yield* eventually("the certificate", () => acme.status().find((s) => s.state === "valid"))
      const before = (yield* servedCertificate("renew.test", l.tlsPort)).cert!
      const root = yield* Effect.promise(() => l.pebble.root())
      // a keep-alive connection opened with the first certificate
      const socket = yield* Effect.acquireRelease(
        Effect.promise(() =>
          new Promise<tls.TLSSocket>((resolve, reject) => {
            const s = tls.connect({ host: "127.0.0.1", port: l.tlsPort, servername: "renew.test", ca: root, ALPNProtocols: ["http/1.1"] }, () => resolve(s))
            s.once("error", reject)
          })
        ),
        (s) => Effect.sync(() => s.destroy())
      )
      const exchange = (path = "/") =>
        new Promise<string>((resolve, reject) => {
          let text = ""
          const onData = (c: Buffer) => {
            text += c.toString()
            const m = /\r\n\r\n(answer \d+)$/.exec(text)
            if (m) {
              socket.off("data", onData)
              resolve(m[1]!)
            }
          }
          socket.on("data", onData)
          socket.once("error", reject)
          socket.once("close", () => reject(new Error(`the connection closed; received ${JSON.stringify(text)}`)))
          socket.write(`GET ${path} HTTP/1.1\r\nHost: renew.test\r\n\r\n`)
        })
      assert.strictEqual(yield* Effect.promise(() => exchange()), "answer 1")
      // a request in flight on that connection while the certificate is renewed
      const inFlight = exchange("/held")
      yield* eventually("the held request to reach the backend", () => held.length === 1 ? true : undefined)
      // nothing happens before the renewal time
      assert.deepStrictEqual(acme.orders(), { issued: 1, failed: 0 })
      const notAfterMs = Date.parse(first.notAfter!)
      const dueIn = notAfterMs - 30 * 24 * 60 * 60 * 1000 - clock.currentTimeMillisUnsafe()
      yield* clock.adjust(dueIn - 60_000)
      yield* Effect.yieldNow
      assert.deepStrictEqual(acme.orders(), { issued: 1, failed: 0 })
      yield* clock.adjust(120_000)
      // the renewal fiber may have read the time before the clock moved and be sleeping from then: while
      // it still waits (valid, not renewing), the clock moves on by the same stretch again
      const deadline = Date.now() + WaitLimitMs
      while (acme.orders().issued < 2) {
        if (Date.now() > deadline) return yield* Effect.die(new Error(`timed out waiting for the renewed certificate: ${JSON.stringify(acme.status())}`))
        yield* Effect.promise(() => new Promise((r) => setTimeout(r, 200)))
        if (acme.orders().issued < 2 && acme.status()[0]?.state === "valid") yield* clock.adjust(dueIn)
      }
      const after = (yield* servedCertificate("renew.test", l.tlsPort)).cert!
      assert.notStrictEqual(after.serialNumber, before.serialNumber, "new connections get the renewed certificate")
      assert.strictEqual(after.checkHost("renew.test"), "renew.test")
      assert.strictEqual(acme.status()[0]?.state, "valid")
      // the connection opened before the renewal still carries its request, with its certificate
      held.shift()!()
      assert.strictEqual(yield* Effect.promise(() => inFlight), "answer 2")
      assert.strictEqual(socket.getPeerX509Certificate()?.serialNumber, before.serialNumber)
    })))

  it.live("a failed validation is reported (status, alert on TLS) and retried after the backoff, then succeeds", () =>
    noLeaks(Effect.gen(function*() {
      // pebble's DNS does not know the name yet: validation fails
      const l = yield* lab([])
      const clock = yield* TestClock.make()
      yield* clock.setTime(Date.now())
      const acme = yield* AcmeCertificates.make(acmeConfig(l, { clock, random: () => 0 }))
      const { tunnel } = yield* gatewayWith(acme)
      yield* serveHttp(tunnel, { _tag: "Tls", port: l.tlsPort, domainSuffix: "late.test", acme: true, then: "http" }, (_req, res) => hello(res))
      const failedStatus = yield* eventually("the failure", () => acme.status().find((s) => s.failures === 1))
      assert.strictEqual(failedStatus.state, "waiting")
      assert.include(failedStatus.lastError ?? "", "late.test")
      // backoff: 60 s for the first failure (no jitter with random() = 0)
      assert.strictEqual(Date.parse(failedStatus.nextAttempt!) - clock.currentTimeMillisUnsafe(), 60_000)
      assert.deepStrictEqual(acme.orders(), { issued: 0, failed: 1 })
      const refused = yield* servedCertificate("late.test", l.tlsPort)
      assert.isUndefined(refused.cert)
      assert.match(refused.error ?? "", /handshake failure/i)
      // the name resolves now; the next order starts only once the backoff is over
      l.dns.names.add("late.test")
      yield* clock.adjust("59 seconds")
      yield* Effect.yieldNow
      assert.deepStrictEqual(acme.orders(), { issued: 0, failed: 1 })
      yield* clock.adjust("2 seconds")
      yield* eventually("the certificate after the retry", () => acme.status().find((s) => s.state === "valid"), () => `: ${JSON.stringify(acme.status())}`)
      assert.deepStrictEqual(acme.orders(), { issued: 1, failed: 1 })
      assert.strictEqual(acme.status()[0]?.failures, 0)
      const root = yield* rootFile(l)
      const result = yield* curl("late.test", l.tlsPort, root)
      assert.strictEqual(result.code, 0, result.out)
    })))

  it.live("reconfigure: a longer renew_before renews at once, without the clock moving; a new email is the account's contact from that order on", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["reload.test"])
      const clock = yield* TestClock.make()
      yield* clock.setTime(Date.now())
      const acme = yield* AcmeCertificates.make(acmeConfig(l, { clock, renewBefore: "30 days" }))
      const { tunnel } = yield* gatewayWith(acme)
      yield* serveHttp(tunnel, { _tag: "Tls", port: l.tlsPort, domainSuffix: "reload.test", acme: true, then: "http" }, (_req, res) => hello(res))
      const first = yield* eventually("the certificate", () => acme.status().find((s) => s.state === "valid"))
      // 40 days before expiry: not due with 30 days, due with 60
      yield* clock.adjust(Date.parse(first.notAfter!) - 40 * 24 * 60 * 60 * 1000 - clock.currentTimeMillisUnsafe())
      yield* Effect.promise(() => new Promise((r) => setTimeout(r, 300)))
      assert.deepStrictEqual(acme.orders(), { issued: 1, failed: 0 })
      const changed = yield* acme.reconfigure(acmeConfig(l, { clock, renewBefore: "60 days", email: "renewals@example.com" }))
      assert.deepStrictEqual(changed, ["email", "renew_before"])
      yield* eventually("the renewal", () => acme.orders().issued === 2 ? true : undefined, () => `: ${JSON.stringify(acme.status())}`)
      // the CA has the new contact for the account (read with the gateway's account key)
      const lib = yield* Effect.promise(() => import("acme-client"))
      const reader = new lib.Client({ directoryUrl: l.pebble.directoryUrl, accountKey: fs.readFileSync(path.join(l.storageDir, "account.key.pem")) })
      const account = yield* Effect.promise(() => reader.createAccount({ onlyReturnExisting: true }))
      assert.deepStrictEqual(account.contact, ["mailto:renewals@example.com"])
      // nothing else changed: nothing reported
      assert.deepStrictEqual(yield* acme.reconfigure(acmeConfig(l, { clock, renewBefore: "60 days", email: "renewals@example.com" })), [])
    })))

  it.live("a name whose route is gone is not renewed after the grace; its stored certificate serves the route when it comes back", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["gone.test"])
      const clock = yield* TestClock.make()
      yield* clock.setTime(Date.now())
      const acme = yield* AcmeCertificates.make(acmeConfig(l, { clock, renewBefore: "30 days" }))
      const { tunnel } = yield* gatewayWith(acme)
      const route = { _tag: "Tls" as const, port: l.tlsPort, domainSuffix: "gone.test", acme: true as const, then: "http" as const }
      const routeFor = Effect.gen(function*() {
        const scope = yield* Scope.make()
        yield* serveHttp(tunnel, route, (_req, res) => hello(res)).pipe(Scope.provide(scope))
        return scope
      })
      const first = yield* routeFor
      const issued = yield* eventually("the certificate", () => acme.status().find((s) => s.state === "valid"), () => `: ${JSON.stringify(acme.status())}`)
      const serial = (yield* servedCertificate("gone.test", l.tlsPort)).cert!.serialNumber
      const orders = () => l.pebble.output().split("Added order").length - 1
      assert.strictEqual(orders(), 1)

      // the route goes: the name is unused at once, parked after the grace
      yield* Scope.close(first, Exit.void)
      const unused = yield* eventually("the name to be unused", () => acme.status().find((s) => s.state === "unused"), () => `: ${JSON.stringify(acme.status())}`)
      assert.strictEqual(Date.parse(unused.unusedSince!), clock.currentTimeMillisUnsafe())
      assert.strictEqual(unused.notAfter, issued.notAfter)
      yield* clock.adjust(AcmeUnusedGraceMs + 1000)
      yield* eventually("the name to be parked", () => acme.contextFor("gone.test") === "no route wants gone.test" ? true : undefined)

      // it comes back before renewal: the stored certificate is served, no new order
      const second = yield* routeFor
      assert.strictEqual((yield* servedCertificate("gone.test", l.tlsPort)).cert?.serialNumber, serial)
      assert.strictEqual(acme.status()[0]?.state, "valid")
      assert.isUndefined(acme.status()[0]?.unusedSince)
      assert.deepStrictEqual(acme.orders(), { issued: 1, failed: 0 })
      assert.strictEqual(orders(), 1)

      // gone again, and the renewal time passes: no order (and the certificate stays in the store)
      yield* Scope.close(second, Exit.void)
      yield* eventually("the name to be unused again", () => acme.status().find((s) => s.state === "unused"))
      yield* clock.adjust(AcmeUnusedGraceMs + 1000)
      yield* eventually("the name to be parked again", () => acme.contextFor("gone.test") === "no route wants gone.test" ? true : undefined)
      const dueIn = Date.parse(issued.notAfter!) - 30 * 24 * 60 * 60 * 1000 - clock.currentTimeMillisUnsafe()
      yield* clock.adjust(dueIn + 60 * 60 * 1000)
      yield* Effect.promise(() => new Promise((r) => setTimeout(r, 500)))
      assert.deepStrictEqual(acme.orders(), { issued: 1, failed: 0 })
      assert.strictEqual(orders(), 1, "pebble received no renewal order")
      assert.strictEqual(acme.status()[0]?.state, "unused")
      assert.isTrue(fs.existsSync(path.join(l.storageDir, "gone.test", "fullchain.pem")))
    })))

  it.live("a name the token is not granted is refused and never ordered; a gateway without ACME refuses acme routes", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["app.granted.test", "other.test"])
      const acme = yield* AcmeCertificates.make(acmeConfig(l))
      const grants: ReadonlyArray<TokenGrant> = [
        { name: "team", token: Redacted.make(token), ports: [{ from: 1024, to: 65_535 }], domainSuffixes: ["granted.test"] }
      ]
      const { tunnel } = yield* gatewayWith(acme, grants)
      const refusal = (t: typeof tunnel, domainSuffix: string) =>
        Effect.gen(function*() {
          const scope = yield* Scope.make()
          const rejected = yield* Effect.promise(() =>
            new Promise<string>((resolve) => {
              Effect.runFork(
                t.addListener({
                  route: { _tag: "Tls", port: l.tlsPort, domainSuffix, acme: true, then: "http" },
                  onConnection: ({ socket }) => socket.destroy(),
                  onRejected: (_g, reason, message) => resolve(`${reason}: ${message}`),
                  onBound: () => resolve("bound")
                }).pipe(Scope.provide(scope))
              )
            })
          )
          yield* Scope.close(scope, Exit.void)
          return rejected
        })
      const refused = yield* refusal(tunnel, "other.test")
      assert.match(refused, /^DomainNotAllowed/)
      assert.deepStrictEqual(acme.status(), [])
      assert.notInclude(l.pebble.output(), "Added order")
      // a gateway that obtains no certificates says so
      const plain = Context.get(yield* gateway(), ControlPort)
      const plainTunnel = Context.get(yield* client([plain.address.port!]), TunnelClient)
      const noAcme = yield* refusal(plainTunnel, "app.granted.test")
      assert.match(noAcme, /^Malformed: this gateway does not obtain certificates/)
    })))
})
