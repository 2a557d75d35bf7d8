/**
 * Locating and starting the real third-party peers in `../shared/peers/` for tests.
 * In CI (`CI=true`) a peer that cannot be had is a failure; elsewhere the tests that need it are skipped.
 */
import { execFileSync, spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { recordSkip } from "./skipReasons.ts"

/** Where `../shared/peers` is, relative to the project root. */
export const peersDir = path.resolve(import.meta.dirname, "../../../shared/peers")

/** True when running in CI, where a missing peer must fail rather than skip. */
export const inCI = process.env.CI === "true" || process.env.CI === "1"

export interface PeerProbe<A> {
  /** The peer when it could be had. */
  readonly value: A | undefined
  /** Why it could not, when it could not. */
  readonly reason: string | undefined
}

let yamuxProbe: PeerProbe<string> | undefined

/**
 * The path of the hashicorp/yamux CLI peer (`yamuxpeer`), built on first use by its build script.
 * `SWITCHYARD_YAMUX_PEER` names a prebuilt binary instead.
 */
export const yamuxPeer = (): PeerProbe<string> => {
  if (yamuxProbe) return yamuxProbe
  const fromEnv = process.env.SWITCHYARD_YAMUX_PEER
  if (fromEnv && fs.existsSync(fromEnv)) return (yamuxProbe = { value: fromEnv, reason: undefined })
  const script = path.join(peersDir, "yamux-go/build.sh")
  if (!fs.existsSync(script)) return (yamuxProbe = { value: undefined, reason: `${script} not found` })
  const run = spawnSync("bash", [script], { encoding: "utf8", timeout: 600_000 })
  const out = run.stdout.trim().split("\n").pop() ?? ""
  yamuxProbe = run.status === 0 && out && fs.existsSync(out)
    ? { value: out, reason: undefined }
    : { value: undefined, reason: `yamux-go/build.sh failed: ${run.stderr.slice(-2000)}` }
  return yamuxProbe
}

/** A running Podman API service (the Docker Engine API on a private Unix socket). */
export interface PodmanService {
  readonly socketPath: string
  readonly dir: string
  readonly stop: () => void
}

/** Starts a private Podman API service in a fresh temporary directory. */
export const startPodman = (): PeerProbe<PodmanService> => {
  const script = path.join(peersDir, "podman/start.sh")
  if (!fs.existsSync(script)) return { value: undefined, reason: `${script} not found` }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-podman-"))
  const run = spawnSync("bash", [script, path.join(dir, "podman")], { encoding: "utf8", timeout: 600_000 })
  const socketPath = run.stdout.trim().split("\n").pop() ?? ""
  if (run.status !== 0 || !socketPath) {
    return { value: undefined, reason: `podman/start.sh failed: ${run.stderr.slice(-2000)}` }
  }
  const stop = () => {
    try {
      const pid = Number(fs.readFileSync(path.join(dir, "podman/pid"), "utf8").trim())
      if (pid > 0) process.kill(pid, "SIGTERM")
    } catch {
      // already gone
    }
    try {
      // podman's vfs storage leaves read-only trees; make them writable so the directory can go.
      execFileSync("chmod", ["-R", "u+w", dir])
    } catch {
      // nothing to do
    }
    fs.rmSync(dir, { recursive: true, force: true })
  }
  return { value: { socketPath, dir, stop }, reason: undefined }
}

/** Whether the docker CLI is on PATH. */
export const dockerCli = (): PeerProbe<string> => {
  const run = spawnSync("docker", ["--version"], { encoding: "utf8" })
  return run.status === 0
    ? { value: "docker", reason: undefined }
    : { value: undefined, reason: "docker CLI not found on PATH" }
}

/**
 * Decides what a suite does about a peer: run it, skip it (outside CI), or fail it (in CI).
 * Use as `describe.skipIf(peerMissing(probe))(...)` and call `assertPeer(probe)` in `beforeAll`.
 */
export const peerMissing = <A>(probe: PeerProbe<A>): boolean => {
  const missing = probe.value === undefined && !inCI
  if (missing) recordSkip(`peer missing: ${probe.reason}`)
  return missing
}

/** Throws when the peer is missing: in CI this makes the suite fail instead of skipping. */
export const assertPeer = <A>(probe: PeerProbe<A>): A => {
  if (probe.value === undefined) throw new Error(`required peer is missing: ${probe.reason}`)
  return probe.value
}
