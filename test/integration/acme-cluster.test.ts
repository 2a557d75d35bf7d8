/**
 * ACME certificates shared by clustered gateways, against Debian's pebble and redis-server on loopback:
 * two gateways in this process, each with its own certificate manager and disk store, share the cluster's
 * certificate store on one redis-server. A name both want is ordered once (counted at pebble) and both
 * serve the same certificate, verified against pebble's root; the CA's validation reaching the gateway
 * that did not order is answered there; a lock left by a holder that died expires with its lease and the
 * waiting gateway orders then; the private key is not readable in Redis; a renewal is ordered by one
 * gateway and picked up by the other; with Redis stopped a name is still ordered. As processes
 * (`switchyard server` in a cluster with ACME, and `switchyard client --tls-acme`): one order for two
 * gateways, shown in `/status` and the metrics; a gateway killed with -9 while it holds the lock leaves
 * the name to the other once the lease ran out.
 */
import { assert, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import { X509Certificate } from "node:crypto"
import * as fs from "node:fs"
import * as http from "node:http"
import * as os from "node:os"
import * as path from "node:path"
import * as tls from "node:tls"
import { type Clock, Context, Effect, Redacted } from "effect"
import { TestClock } from "effect/testing"
import { certificateKey, orderLockKey } from "../../src/domain/AcmeShared.ts"
import { AcmeCertificates, type AcmeCertificatesShape, type AcmeConfig } from "../../src/services/acme/AcmeCertificates.ts"
import { redisSharedCertificates } from "../../src/services/acme/SharedCertificates.ts"
import { TunnelClient } from "../../src/services/client/TunnelClient.ts"
import { ControlPort } from "../../src/services/front/ControlPort.ts"
import { freePort } from "../services/ListenersFixtures.ts"
import { noLeaks } from "../support/leaks.ts"
import { type DnsResponder, type Pebble, requirePebble, startDns, startPebble } from "../support/pebble.ts"
import { type RedisServer, requireRedis, startRedis } from "../support/redis.ts"
import { addressAfter, get, sample, spawnSwitchyard } from "../runtime/serverProcess.ts"
import { client, gateway, serveHttp } from "./tunnelHarness.ts"

const available = requirePebble() && requireRedis()
const describeLab = available ? describe : describe.skip

/** Longest real wait for something the CA and the gateways do on their own (an order, a validation). */
const WaitLimitMs = 30_000
const Secret = Redacted.make("a-cluster-secret-of-enough-length")

interface Lab {
  readonly pebble: Pebble
  readonly dns: DnsResponder
  readonly redis: RedisServer
  /** Where pebble validates HTTP-01 and TLS-ALPN-01 (the first gateway's ports). */
  readonly httpPort: number
  readonly tlsPort: number
  /** The second gateway's TLS port (pebble never validates there). */
  readonly otherTlsPort: number
  readonly dirs: ReadonlyArray<string>
}

const lab = (names: ReadonlyArray<string>) =>
  Effect.acquireRelease(
    Effect.promise(async (): Promise<Lab> => {
      const dns = await startDns(names)
      const httpPort = await freePort()
      const tlsPort = await freePort()
      const otherTlsPort = await freePort()
      const pebble = await startPebble({ httpPort, tlsPort, dnsPort: dns.port })
      const redis = await startRedis()
      const dirs = [0, 1].map(() => fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-acme-cluster-")))
      return { pebble, dns, redis, httpPort, tlsPort, otherTlsPort, dirs }
    }),
    (l) => Effect.promise(async () => {
      await l.pebble.stop()
      await l.dns.close()
      await l.redis.cleanup()
      for (const dir of l.dirs) fs.rmSync(dir, { recursive: true, force: true })
    })
  )

/** One gateway of the cluster: a certificate manager with the cluster's store, a gateway using it, a tunnel client to it. */
const member = (l: Lab, index: number, overrides: Partial<AcmeConfig> & { readonly lockLeaseMs?: number } = {}) =>
  Effect.gen(function*() {
    const { lockLeaseMs, ...acmeOverrides } = overrides
    const shared = yield* redisSharedCertificates({ url: l.redis.url, node: `g${index + 1}`, secret: Secret, commandTimeoutMs: 2_000, lockLeaseMs })
    const acme = yield* AcmeCertificates.make({
      directoryUrl: l.pebble.directoryUrl,
      email: "ops@example.com",
      ca: l.pebble.ca,
      storageDir: l.dirs[index]!,
      shared,
      ...acmeOverrides
    })
    const control = Context.get(yield* gateway({ certificates: acme }), ControlPort)
    const tunnel = Context.get(yield* client([control.address.port!]), TunnelClient)
    return { acme, tunnel }
  })

const tlsRoute = (port: number, name: string) => ({ _tag: "Tls" as const, port, domainSuffix: name, acme: true as const, then: "http" as const })

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

const servedSerial = (name: string, port: number) =>
  Effect.promise(() =>
    new Promise<string>((resolve) => {
      const socket = tls.connect({ host: "127.0.0.1", port, servername: name, rejectUnauthorized: false }, () => {
        const raw = socket.getPeerX509Certificate()
        socket.destroy()
        resolve(raw?.serialNumber ?? "no certificate")
      })
      socket.on("error", (e) => resolve(`error ${e.message}`))
    })
  )

const rootFile = (l: Lab) =>
  Effect.promise(async () => {
    const file = path.join(l.dirs[0]!, "..", `${path.basename(l.dirs[0]!)}-root.pem`)
    fs.writeFileSync(file, await l.pebble.root())
    return file
  }).pipe(Effect.tap((file) => Effect.addFinalizer(() => Effect.sync(() => fs.rmSync(file, { force: true })))))

/** A client of the lab's redis-server for the test's own reads and writes, closed with the scope. */
const redisClient = (l: Lab) =>
  Effect.acquireRelease(
    Effect.promise(async () => {
      const { Redis } = await import("ioredis")
      const redis = new Redis(l.redis.url, { maxRetriesPerRequest: 0 })
      await redis.ping()
      return redis
    }),
    (redis) => Effect.sync(() => redis.disconnect(false))
  )

const orders = (l: Lab) => l.pebble.output().split("Added order").length - 1

const hello = (index: number) => (_req: unknown, res: { end: (s: string) => void }) => res.end(`hello from g${index + 1}`)

const sourceOf = (acme: AcmeCertificatesShape, name: string) => acme.status().find((s) => s.name === name)

describeLab("ACME certificates shared by a cluster (pebble, redis-server)", () => {
  it.live("a name wanted on two gateways at once is ordered once; both serve the same certificate, verified against pebble's root; the key is sealed in Redis", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["both.test"])
      const g1 = yield* member(l, 0)
      const g2 = yield* member(l, 1)
      yield* Effect.all([
        serveHttp(g1.tunnel, tlsRoute(l.tlsPort, "both.test"), hello(0)),
        serveHttp(g2.tunnel, tlsRoute(l.otherTlsPort, "both.test"), hello(1))
      ], { concurrency: "unbounded" })
      const status = () => [sourceOf(g1.acme, "both.test"), sourceOf(g2.acme, "both.test")]
      yield* eventually("both certificates", () => status().every((s) => s?.state === "valid") ? true : undefined, () => `: ${JSON.stringify(status())}\n${l.pebble.output()}`)
      assert.strictEqual(orders(l), 1, "pebble received one order")
      assert.strictEqual(g1.acme.orders().issued + g2.acme.orders().issued, 1)
      assert.strictEqual(g1.acme.fromCluster() + g2.acme.fromCluster(), 1)
      assert.sameMembers(status().map((s) => s?.source), ["ordered", "cluster"])
      const serial1 = yield* servedSerial("both.test", l.tlsPort)
      const serial2 = yield* servedSerial("both.test", l.otherTlsPort)
      assert.strictEqual(serial1, serial2)
      const root = yield* rootFile(l)
      const via1 = yield* curl("both.test", l.tlsPort, root)
      const via2 = yield* curl("both.test", l.otherTlsPort, root)
      assert.strictEqual(via1.code, 0, via1.out)
      assert.strictEqual(via1.out, "hello from g1")
      assert.strictEqual(via2.code, 0, via2.out)
      assert.strictEqual(via2.out, "hello from g2")
      // in Redis: the chain in clear, the key sealed; on each gateway's disk both, mode 0600
      const redis = yield* redisClient(l)
      const entry = yield* Effect.promise(() => redis.get(certificateKey("both.test")))
      assert.isNotNull(entry)
      assert.include(entry!, "BEGIN CERTIFICATE")
      assert.notInclude(entry!, "PRIVATE KEY")
      const pttl = yield* Effect.promise(() => redis.pttl(certificateKey("both.test")))
      assert.isAbove(pttl, 0, "the entry expires with the certificate")
      assert.strictEqual(yield* Effect.promise(() => redis.exists(orderLockKey("both.test"))), 0, "the lock was released")
      for (const dir of l.dirs) {
        assert.strictEqual(fs.statSync(path.join(dir, "both.test", "key.pem")).mode & 0o777, 0o600)
        assert.strictEqual(new X509Certificate(fs.readFileSync(path.join(dir, "both.test", "fullchain.pem"))).serialNumber, serial1)
      }
    })))

  it.live("the CA's HTTP-01 validation reaching the gateway that did not order is answered there (the challenge is handed over)", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["handed.test"])
      // g1 holds pebble's HTTP port (a plain route of its own) and does not want the name; g2 orders it
      const g1 = yield* member(l, 0, { challenge: "http-01" })
      const g2 = yield* member(l, 1, { challenge: "http-01" })
      let routed = 0
      yield* serveHttp(g1.tunnel, { _tag: "Http", port: l.httpPort }, (_req, res) => {
        routed++
        res.end("plain route")
      })
      yield* serveHttp(g2.tunnel, tlsRoute(l.otherTlsPort, "handed.test"), hello(1))
      yield* eventually("the certificate", () => sourceOf(g2.acme, "handed.test")?.state === "valid" ? true : undefined, () => `: ${JSON.stringify(g2.acme.status())}\n${l.pebble.output()}`)
      assert.strictEqual(routed, 0, "the validation was answered by g1 before any route")
      assert.deepStrictEqual(g2.acme.orders(), { issued: 1, failed: 0 })
      assert.deepStrictEqual(g1.acme.status(), [])
      const root = yield* rootFile(l)
      const result = yield* curl("handed.test", l.otherTlsPort, root)
      assert.strictEqual(result.code, 0, result.out)
    })))

  it.live("a lock whose holder died expires with its lease: the waiting gateway orders then; meanwhile it waits, orders nothing and says so", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["orphan.test"])
      const redis = yield* redisClient(l)
      // a gateway that took the lock and died: its token stays until the lease runs out
      const leaseMs = 3_000
      yield* Effect.promise(() => redis.set(orderLockKey("orphan.test"), "g9:died", "PX", leaseMs))
      const g1 = yield* member(l, 0, { lockLeaseMs: leaseMs })
      yield* serveHttp(g1.tunnel, tlsRoute(l.tlsPort, "orphan.test"), hello(0))
      yield* eventually("the wait", () => sourceOf(g1.acme, "orphan.test")?.waitingForCluster === true ? true : undefined, () => `: ${JSON.stringify(g1.acme.status())}`)
      assert.strictEqual(orders(l), 0)
      assert.strictEqual(sourceOf(g1.acme, "orphan.test")?.state, "ordering")
      yield* eventually("the certificate", () => sourceOf(g1.acme, "orphan.test")?.state === "valid" ? true : undefined, () => `: ${JSON.stringify(g1.acme.status())}\n${l.pebble.output()}`)
      assert.strictEqual(orders(l), 1)
      assert.strictEqual(sourceOf(g1.acme, "orphan.test")?.source, "ordered")
      assert.isUndefined(sourceOf(g1.acme, "orphan.test")?.waitingForCluster)
      const root = yield* rootFile(l)
      const result = yield* curl("orphan.test", l.tlsPort, root)
      assert.strictEqual(result.code, 0, result.out)
    })))

  it.live("Redis stopped: a name without a certificate is still ordered, without the lock, and served", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["alone.test"])
      const g1 = yield* member(l, 0)
      yield* Effect.promise(() => l.redis.stop())
      yield* serveHttp(g1.tunnel, tlsRoute(l.tlsPort, "alone.test"), hello(0))
      yield* eventually("the certificate", () => sourceOf(g1.acme, "alone.test")?.state === "valid" ? true : undefined, () => `: ${JSON.stringify(g1.acme.status())}\n${l.pebble.output()}`)
      assert.strictEqual(sourceOf(g1.acme, "alone.test")?.source, "ordered")
      assert.deepStrictEqual(g1.acme.orders(), { issued: 1, failed: 0 })
      const root = yield* rootFile(l)
      const result = yield* curl("alone.test", l.tlsPort, root)
      assert.strictEqual(result.code, 0, result.out)
    })))

  it.live("a gateway joining later serves the cluster's certificate without an order; a renewal is ordered by one gateway and picked up by the other", () =>
    noLeaks(Effect.gen(function*() {
      const l = yield* lab(["later.test"])
      const clock = yield* TestClock.make()
      yield* clock.setTime(Date.now())
      const withClock = { clock: clock as Clock.Clock, renewBefore: "30 days" as const }
      const g1 = yield* member(l, 0, withClock)
      yield* serveHttp(g1.tunnel, tlsRoute(l.tlsPort, "later.test"), hello(0))
      const first = yield* eventually("the first certificate", () => sourceOf(g1.acme, "later.test")?.state === "valid" ? sourceOf(g1.acme, "later.test") : undefined, () => `: ${JSON.stringify(g1.acme.status())}`)
      const firstSerial = yield* servedSerial("later.test", l.tlsPort)
      const g2 = yield* member(l, 1, withClock)
      yield* serveHttp(g2.tunnel, tlsRoute(l.otherTlsPort, "later.test"), hello(1))
      yield* eventually("g2's certificate", () => sourceOf(g2.acme, "later.test")?.state === "valid" ? true : undefined, () => `: ${JSON.stringify(g2.acme.status())}`)
      assert.strictEqual(sourceOf(g2.acme, "later.test")?.source, "cluster")
      assert.strictEqual(yield* servedSerial("later.test", l.otherTlsPort), firstSerial)
      assert.strictEqual(orders(l), 1)
      // the renewal time comes for both: one orders, the other takes the new certificate from the store
      const dueIn = Date.parse(first.notAfter!) - 30 * 24 * 60 * 60 * 1000 - clock.currentTimeMillisUnsafe()
      yield* clock.adjust(dueIn + 60_000)
      const renewed = () => g1.acme.orders().issued + g2.acme.orders().issued >= 2 && [g1, g2].every((g) => sourceOf(g.acme, "later.test")?.state === "valid")
      const deadline = Date.now() + WaitLimitMs
      while (!renewed()) {
        if (Date.now() > deadline) return yield* Effect.die(new Error(`timed out waiting for the renewal: ${JSON.stringify([g1.acme.status(), g2.acme.status()])}`))
        yield* Effect.promise(() => new Promise((r) => setTimeout(r, 200)))
        // a fiber that read the time before the clock moved sleeps from then: while both still wait, the clock moves on again
        if (g1.acme.orders().issued + g2.acme.orders().issued < 2 && [g1, g2].every((g) => sourceOf(g.acme, "later.test")?.state === "valid")) {
          yield* clock.adjust(60_000)
        }
      }
      const serial1 = yield* servedSerial("later.test", l.tlsPort)
      const serial2 = yield* servedSerial("later.test", l.otherTlsPort)
      assert.notStrictEqual(serial1, firstSerial)
      assert.strictEqual(serial2, serial1, "both serve the renewed certificate")
      assert.sameMembers([g1, g2].map((g) => sourceOf(g.acme, "later.test")?.source), ["ordered", "cluster"])
      assert.strictEqual(orders(l), 2, "one renewal order for the cluster")
      assert.strictEqual(g1.acme.orders().issued + g2.acme.orders().issued, 2)
    })))
})

const ProcessToken = "acme-cluster-token-51c0"
const ProcessSecret = "acme-cluster-secret-2f9d61b7"

/** A `switchyard server` in the lab's cluster with ACME, its public ports on `publicHost`. */
const startServer = async (l: Lab, node: string, publicHost: string, caFile: string, storage: string, extra: ReadonlyArray<string> = []) => {
  const relay = await freePort()
  const proc = spawnSwitchyard([
    "server", "--control", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--token", ProcessToken, "--public-host", publicHost,
    "--cluster-redis", l.redis.url, "--cluster-node", node, "--cluster-advertise", `127.0.0.1:${relay}`,
    "--acme-directory", l.pebble.directoryUrl, "--acme-email", "ops@example.com", "--acme-ca", caFile,
    "--set", `acme.storage_dir=${storage}`, ...extra
  ], { SWITCHYARD_CLUSTER_SECRET: ProcessSecret })
  await proc.waitFor("expose a local service")
  return { proc, control: addressAfter(proc.output(), /control port/), admin: addressAfter(proc.output(), /admin endpoint/) }
}

interface CertificateEntry {
  readonly name: string
  readonly state: string
  readonly source?: string
}

describeLab("switchyard server in a cluster with ACME (processes, pebble, redis-server)", () => {
  it.live("two gateways whose backends want the same name: one order, both serve it, /status and the metrics say where it came from", () =>
    Effect.gen(function*() {
      const l = yield* lab(["proc.test"])
      const caFile = path.join(l.dirs[0]!, "pebble-https.pem")
      fs.writeFileSync(caFile, l.pebble.ca)
      const servers = yield* Effect.acquireRelease(
        Effect.promise(async () => [
          await startServer(l, "g1", "127.0.0.1", caFile, path.join(l.dirs[0]!, "store")),
          await startServer(l, "g2", "127.0.0.12", caFile, path.join(l.dirs[1]!, "store"))
        ]),
        (all) => Effect.promise(async () => void (await Promise.all(all.map((s) => s.proc.stop("SIGKILL")))))
      )
      const local = http.createServer((_req, res) => res.end("served by the backend"))
      yield* Effect.acquireRelease(
        Effect.promise(() => new Promise<void>((resolve) => local.listen(0, "127.0.0.1", resolve))),
        () => Effect.promise(() => new Promise<void>((resolve) => { local.closeAllConnections(); local.close(() => resolve()) }))
      )
      const localPort = (local.address() as { port: number }).port
      const backendOf = (control: { port: number }) =>
        Effect.acquireRelease(
          Effect.sync(() => spawnSwitchyard([
            "client", "--server", `127.0.0.1:${control.port}`, "--token", ProcessToken, "--expose", `127.0.0.1:${localPort}`,
            "--port", String(l.tlsPort), "--domain", "proc.test", "--tls-acme", "--no-admin"
          ])),
          (c) => Effect.promise(async () => void (await c.stop("SIGKILL")))
        )
      const certificatesOf = (admin: { port: number }) =>
        Effect.promise(async () => (JSON.parse((await get(admin.port, "/status")).body) as { certificates?: Array<CertificateEntry> }).certificates ?? [])
      // g1's backend first: the port pebble validates on is open whichever gateway orders
      yield* backendOf(servers[0]!.control)
      const bound = Date.now() + WaitLimitMs
      while (!(yield* certificatesOf(servers[0]!.admin)).some((c) => c.name === "proc.test")) {
        if (Date.now() > bound) return yield* Effect.die(new Error(`g1 never wanted proc.test:\n${servers[0]!.proc.output()}`))
        yield* Effect.promise(() => new Promise((r) => setTimeout(r, 50)))
      }
      yield* backendOf(servers[1]!.control)
      const deadline = Date.now() + WaitLimitMs
      let seen: Array<ReadonlyArray<CertificateEntry>> = []
      for (;;) {
        seen = [yield* certificatesOf(servers[0]!.admin), yield* certificatesOf(servers[1]!.admin)]
        if (seen.every((list) => list.some((c) => c.name === "proc.test" && c.state === "valid"))) break
        if (Date.now() > deadline) {
          return yield* Effect.die(new Error(`timed out waiting for both certificates: ${JSON.stringify(seen)}\n${servers.map((s) => s.proc.output()).join("\n")}`))
        }
        yield* Effect.promise(() => new Promise((r) => setTimeout(r, 200)))
      }
      assert.strictEqual(orders(l), 1, "pebble received one order")
      assert.sameMembers(seen.map((list) => list.find((c) => c.name === "proc.test")?.source), ["ordered", "cluster"])
      const metrics = yield* Effect.promise(() => Promise.all(servers.map(async (s) => (await get(s.admin.port, "/metrics")).body)))
      assert.strictEqual(metrics.reduce((n, m) => n + sample(m, "switchyard_acme_orders_total", { result: "issued" }), 0), 1)
      assert.strictEqual(metrics.reduce((n, m) => n + sample(m, "switchyard_acme_cluster_certificates_total"), 0), 1)
      assert.isTrue(servers.some((s) => /certificate for proc\.test taken from the cluster's store/.test(s.proc.output())))
      const root = yield* rootFile(l)
      for (const host of ["127.0.0.1", "127.0.0.12"]) {
        const result = yield* Effect.promise(() =>
          new Promise<{ code: number; out: string }>((resolve) =>
            execFile(
              "curl",
              ["-sS", "--max-time", "10", "--cacert", root, "--resolve", `proc.test:${l.tlsPort}:${host}`, `https://proc.test:${l.tlsPort}/`],
              (error, stdout, stderr) => resolve({ code: error === null ? 0 : (error as { code?: number }).code ?? 1, out: stdout + stderr })
            )
          )
        )
        assert.strictEqual(result.code, 0, `${host}: ${result.out}`)
        assert.strictEqual(result.out, "served by the backend")
      }
    }).pipe(Effect.scoped), 120_000)

  it.live("a gateway killed (-9) while it holds a name's order lock: the lock expires with its lease (acme.cluster_lock_ms) and the other gateway orders the name", () =>
    Effect.gen(function*() {
      const l = yield* lab(["kill.test"])
      const caFile = path.join(l.dirs[0]!, "pebble-https.pem")
      fs.writeFileSync(caFile, l.pebble.ca)
      const lease = ["--set", "acme.cluster_lock_ms=10000"]
      const local = http.createServer((_req, res) => res.end("served by the backend"))
      yield* Effect.acquireRelease(
        Effect.promise(() => new Promise<void>((resolve) => local.listen(0, "127.0.0.1", resolve))),
        () => Effect.promise(() => new Promise<void>((resolve) => { local.closeAllConnections(); local.close(() => resolve()) }))
      )
      const localPort = (local.address() as { port: number }).port
      const backendOf = (control: { port: number }) =>
        Effect.acquireRelease(
          Effect.sync(() => spawnSwitchyard([
            "client", "--server", `127.0.0.1:${control.port}`, "--token", ProcessToken, "--expose", `127.0.0.1:${localPort}`,
            "--port", String(l.tlsPort), "--domain", "kill.test", "--tls-acme", "--no-admin"
          ])),
          (c) => Effect.promise(async () => void (await c.stop("SIGKILL")))
        )
      // a listener on the challenge channel that never acknowledges: g1 holds the lock and waits for it
      // (at most 5 s) before the CA validates; meanwhile it is killed
      const raw = yield* redisClient(l)
      const listener = raw.duplicate()
      yield* Effect.addFinalizer(() => Effect.sync(() => listener.disconnect(false)))
      let handedOver = 0
      listener.on("message", () => handedOver++)
      yield* Effect.promise(() => listener.subscribe("switchyard:acme-challenges"))
      const g1 = yield* Effect.acquireRelease(
        Effect.promise(() => startServer(l, "g1", "127.0.0.1", caFile, path.join(l.dirs[0]!, "store"), lease)),
        (s) => Effect.promise(async () => void (await s.proc.stop("SIGKILL")))
      )
      yield* backendOf(g1.control)
      yield* eventually("g1 to hand over its challenge", () => handedOver > 0 ? true : undefined, () => g1.proc.output())
      yield* Effect.promise(() => g1.proc.stop("SIGKILL"))
      yield* Effect.promise(() => listener.unsubscribe())
      const holder = yield* Effect.promise(() => raw.get(orderLockKey("kill.test")))
      assert.match(holder ?? "", /^g1:/, "the dead gateway's lock is still there")
      assert.strictEqual(orders(l), 1)

      const g2 = yield* Effect.acquireRelease(
        Effect.promise(() => startServer(l, "g2", "127.0.0.1", caFile, path.join(l.dirs[1]!, "store"), lease)),
        (s) => Effect.promise(async () => void (await s.proc.stop("SIGKILL")))
      )
      yield* backendOf(g2.control)
      const deadline = Date.now() + WaitLimitMs
      let entry: CertificateEntry | undefined
      for (;;) {
        const list = (JSON.parse((yield* Effect.promise(() => get(g2.admin.port, "/status"))).body) as { certificates?: Array<CertificateEntry> }).certificates ?? []
        entry = list.find((c) => c.name === "kill.test")
        if (entry?.state === "valid") break
        if (Date.now() > deadline) return yield* Effect.die(new Error(`timed out waiting for g2's certificate: ${JSON.stringify(entry)}\n${g2.proc.output()}`))
        yield* Effect.promise(() => new Promise((r) => setTimeout(r, 200)))
      }
      assert.strictEqual(entry.source, "ordered")
      assert.strictEqual(orders(l), 2, "g2 ordered once the lease ran out")
      assert.match(g2.proc.output(), /another gateway of the cluster is ordering kill\.test/)
      const root = yield* rootFile(l)
      const result = yield* curl("kill.test", l.tlsPort, root)
      assert.strictEqual(result.code, 0, result.out)
      assert.strictEqual(result.out, "served by the backend")
    }).pipe(Effect.scoped), 120_000)
})
