/**
 * Debian's `pebble` (an ACME test CA) on loopback for the ACME tests, with a small DNS responder that
 * pebble's validation authority asks (`-dnsserver`): it answers A 127.0.0.1 for the names it is given and
 * NXDOMAIN for the others. Pebble's own HTTPS certificate is made with openssl for 127.0.0.1. In CI
 * (`CI=true`) a missing pebble fails the tests; elsewhere they are skipped with the reason.
 */
import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process"
import * as dgram from "node:dgram"
import * as fs from "node:fs"
import * as https from "node:https"
import * as os from "node:os"
import * as path from "node:path"
import { freePort } from "../services/ListenersFixtures.ts"
import { inCI, type PeerProbe } from "./peers.ts"

/** Longest wait for pebble to answer its directory after it starts. */
export const PebbleStartTimeoutMs = 15_000

/** Whether `pebble` can be run: its path, or why not. */
export const pebbleBinary = (): PeerProbe<string> => {
  const run = spawnSync("pebble", ["-h"], { encoding: "utf8" })
  if (run.error !== undefined) return { value: undefined, reason: `pebble is not installed (apt-get install -y pebble): ${run.error.message}` }
  return { value: "pebble", reason: undefined }
}

/** Fails in CI when pebble is missing; elsewhere tells why the tests are skipped. */
export const requirePebble = (): boolean => {
  const probe = pebbleBinary()
  if (probe.value !== undefined) return true
  if (inCI) throw new Error(probe.reason)
  console.warn(`skipping the ACME tests: ${probe.reason}`)
  return false
}

/** A DNS responder on 127.0.0.1 (UDP): A 127.0.0.1 for names in `names`, NXDOMAIN for the rest. */
export interface DnsResponder {
  readonly port: number
  readonly names: Set<string>
  readonly close: () => Promise<void>
}

const readName = (msg: Buffer, offset: number): { name: string; end: number } | undefined => {
  const labels: Array<string> = []
  let i = offset
  while (i < msg.length) {
    const len = msg[i]!
    if (len === 0) return { name: labels.join(".").toLowerCase(), end: i + 1 }
    if (len > 63 || i + 1 + len > msg.length) return undefined
    labels.push(msg.subarray(i + 1, i + 1 + len).toString("latin1"))
    i += 1 + len
  }
  return undefined
}

export const startDns = (names: Iterable<string>): Promise<DnsResponder> =>
  new Promise((resolve, reject) => {
    const known = new Set([...names].map((n) => n.toLowerCase()))
    const socket = dgram.createSocket("udp4")
    socket.on("message", (msg, rinfo) => {
      if (msg.length < 12 || msg.readUInt16BE(4) !== 1) return
      const question = readName(msg, 12)
      if (question === undefined || question.end + 4 > msg.length) return
      const qtype = msg.readUInt16BE(question.end)
      const questionBytes = msg.subarray(12, question.end + 4)
      const found = known.has(question.name)
      const answer = found && qtype === 1
        ? Buffer.from([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1])
        : Buffer.alloc(0)
      const header = Buffer.alloc(12)
      header.writeUInt16BE(msg.readUInt16BE(0), 0)
      // response, recursion desired and available; NXDOMAIN for unknown names
      header.writeUInt16BE(found ? 0x8180 : 0x8183, 2)
      header.writeUInt16BE(1, 4)
      header.writeUInt16BE(answer.length > 0 ? 1 : 0, 6)
      socket.send(Buffer.concat([header, questionBytes, answer]), rinfo.port, rinfo.address)
    })
    socket.once("error", reject)
    socket.bind(0, "127.0.0.1", () => {
      resolve({
        port: socket.address().port,
        names: known,
        close: () => new Promise((done) => socket.close(() => done()))
      })
    })
  })

export interface Pebble {
  /** The ACME directory URL. */
  readonly directoryUrl: string
  /** Pebble's HTTPS certificate, to trust for the directory. */
  readonly ca: string
  /** The root that signs issued certificates (from pebble's management endpoint). */
  readonly root: () => Promise<string>
  /** Pebble's output so far (for failure messages). */
  readonly output: () => string
  readonly stop: () => Promise<void>
}

const getText = (url: string, ca: string): Promise<string> =>
  new Promise((resolve, reject) => {
    const req = https.get(url, { ca, agent: false, timeout: 5_000 }, (res) => {
      const chunks: Array<Buffer> = []
      res.on("data", (c: Buffer) => chunks.push(c))
      res.on("end", () => res.statusCode === 200 ? resolve(Buffer.concat(chunks).toString("utf8")) : reject(new Error(`${url}: ${res.statusCode}`)))
      res.on("error", reject)
    })
    req.on("timeout", () => req.destroy(new Error(`${url}: timed out`)))
    req.on("error", reject)
  })

/**
 * Starts pebble validating HTTP-01 on `httpPort` and TLS-ALPN-01 on `tlsPort` of the names `dns`
 * resolves; resolves once its directory answers (at most `PebbleStartTimeoutMs`).
 */
export const startPebble = async (options: { readonly httpPort: number; readonly tlsPort: number; readonly dnsPort: number }): Promise<Pebble> => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-pebble-"))
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-keyout", path.join(dir, "key.pem"), "-out", path.join(dir, "cert.pem"), "-days", "2",
    "-subj", "/CN=pebble", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"
  ], { stdio: "ignore" })
  const ca = fs.readFileSync(path.join(dir, "cert.pem"), "utf8")
  const listenPort = await freePort()
  const managementPort = await freePort()
  fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({
    pebble: {
      listenAddress: `127.0.0.1:${listenPort}`,
      managementListenAddress: `127.0.0.1:${managementPort}`,
      certificate: path.join(dir, "cert.pem"),
      privateKey: path.join(dir, "key.pem"),
      httpPort: options.httpPort,
      tlsPort: options.tlsPort,
      ocspResponderURL: "",
      externalAccountBindingRequired: false
    }
  }))
  let output = ""
  const child: ChildProcess = spawn("pebble", ["-config", path.join(dir, "config.json"), "-dnsserver", `127.0.0.1:${options.dnsPort}`], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, PEBBLE_VA_NOSLEEP: "1", PEBBLE_WFE_NONCEREJECT: "0", PEBBLE_AUTHZREUSE: "0" }
  })
  const keep = (chunk: Buffer) => {
    output = (output + chunk.toString("utf8")).slice(-20_000)
  }
  child.stdout?.on("data", keep)
  child.stderr?.on("data", keep)
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()))
  const stop = async () => {
    child.kill("SIGTERM")
    await exited
    fs.rmSync(dir, { recursive: true, force: true })
  }
  const directoryUrl = `https://127.0.0.1:${listenPort}/dir`
  const deadline = Date.now() + PebbleStartTimeoutMs
  for (;;) {
    try {
      await getText(directoryUrl, ca)
      break
    } catch (e) {
      if (Date.now() > deadline || child.exitCode !== null) {
        await stop()
        throw new Error(`pebble did not start: ${(e as Error).message}\n${output}`)
      }
      await new Promise((r) => setTimeout(r, 100))
    }
  }
  return {
    directoryUrl,
    ca,
    root: () => getText(`https://127.0.0.1:${managementPort}/roots/0`, ca),
    output: () => output,
    stop
  }
}
