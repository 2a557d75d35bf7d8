/**
 * The package as users get it: `npm pack` of this checkout (which builds `dist/`), installed from the
 * tarball into a fresh project, and every long-running command started from that install with Node 24.
 * Shared by the package test and `npm run bench -- package`. It measures nothing and asserts nothing.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"

const root = path.resolve(import.meta.dirname, "..")
/** Longest wait for a command started from the install to print its admin address. */
export const StartTimeoutMs = 30_000
/** Longest time `npm pack` plus `npm install` may take. */
export const InstallTimeoutMs = 600_000

export interface InstalledPackage {
  /** The project the tarball was installed into. */
  readonly dir: string
  /** `node_modules/<name>` inside it. */
  readonly packageDir: string
  /** The installed `bin/switchyard.js`. */
  readonly bin: string
  readonly remove: () => void
}

/** Packs this checkout and installs the tarball into a new temporary project. */
export const packAndInstall = (): InstalledPackage => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-package-"))
  const remove = () => fs.rmSync(dir, { recursive: true, force: true })
  try {
    const name = (JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8")) as { name: string }).name
    const packed = execFileSync("npm", ["pack", "--silent", "--pack-destination", dir], { cwd: root, encoding: "utf8", timeout: InstallTimeoutMs })
    const tarball = path.join(dir, packed.trim().split("\n").pop()!)
    const project = path.join(dir, "project")
    fs.mkdirSync(project)
    fs.writeFileSync(path.join(project, "package.json"), JSON.stringify({ name: "switchyard-install-check", private: true }))
    execFileSync("npm", ["install", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error", tarball], {
      cwd: project,
      encoding: "utf8",
      timeout: InstallTimeoutMs
    })
    const packageDir = path.join(project, "node_modules", name)
    return { dir: project, packageDir, bin: path.join(packageDir, "bin/switchyard.js"), remove }
  } catch (e) {
    remove()
    throw e
  }
}

/** A port that was free on 127.0.0.1 a moment ago (for addresses a config file must name). */
export const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const server = net.createServer()
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as net.AddressInfo).port
      server.close(() => resolve(port))
    })
  })

export interface StartedCommand {
  readonly command: string
  readonly child: ChildProcess
  readonly pid: number
  /** The admin endpoint's port, from its start-up line. */
  readonly adminPort: number
  readonly output: () => string
  /** SIGTERM, then the exit code (SIGKILL after `StartTimeoutMs`). */
  readonly stop: () => Promise<number | null>
}

const AdminLine = /admin endpoint\s+(?:on\s+)?http:\/\/127\.0\.0\.1:(\d+)/

/** Starts `switchyard <args>` from `bin` with this Node; resolves once it printed its admin address. */
export const startCommand = (bin: string, command: string, args: ReadonlyArray<string>, env: Record<string, string> = {}): Promise<StartedCommand> =>
  new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [bin, command, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, SWITCHYARD_TOKEN: "", SWITCHYARD_TOKEN_FILE: "", SWITCHYARD_SHUTDOWN_DELAY_MS: "0", ...env }
    })
    let out = ""
    const exited = new Promise<number | null>((done) => child.on("close", (code) => done(code)))
    const stop = async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM")
      const killer = setTimeout(() => child.kill("SIGKILL"), StartTimeoutMs)
      const code = await exited
      clearTimeout(killer)
      return code
    }
    const timer = setTimeout(() => {
      void stop()
      reject(new Error(`switchyard ${command} printed no admin address within ${StartTimeoutMs} ms:\n${out}`))
    }, StartTimeoutMs)
    const onData = (d: Buffer) => {
      out += d.toString()
      const m = AdminLine.exec(out)
      if (m !== null) {
        clearTimeout(timer)
        resolve({ command, child, pid: child.pid!, adminPort: Number(m[1]), output: () => out, stop })
      }
    }
    child.stdout!.on("data", onData)
    child.stderr!.on("data", onData)
    void exited.then((code) => {
      clearTimeout(timer)
      reject(new Error(`switchyard ${command} exited with ${code} before it was up:\n${out}`))
    })
  })

/**
 * Starts the five long-running commands from `bin`, idle: a gateway, a client exposing a local port
 * through it, a socket proxy, a wsp server and a wsp client registered with it. Config files go to `dir`.
 */
export const startEveryCommand = async (bin: string, dir: string): Promise<ReadonlyArray<StartedCommand>> => {
  const started: Array<StartedCommand> = []
  try {
    const token = "installed-package-token-5d1e"
    const server = await startCommand(bin, "server", ["--control", "127.0.0.1:0", "--admin", "127.0.0.1:0"], { SWITCHYARD_TOKEN: token })
    started.push(server)
    const control = /control port\s+127\.0\.0\.1:(\d+)/.exec(server.output())
    if (control === null) throw new Error(`no control port in:\n${server.output()}`)
    started.push(
      await startCommand(bin, "client", [
        "--server", `127.0.0.1:${control[1]}`, "--expose", `127.0.0.1:${await freePort()}`, "--port", String(await freePort()), "--admin", "127.0.0.1:0"
      ], { SWITCHYARD_TOKEN: token })
    )
    started.push(
      await startCommand(bin, "socket-proxy", [
        "--upstream", `unix:${path.join(dir, "docker.sock")}`, "--listen", "127.0.0.1:0", "--preset", "ping", "--admin", "127.0.0.1:0"
      ])
    )
    const wspPort = await freePort()
    const secret = "installed-package-wsp-secret"
    fs.writeFileSync(path.join(dir, "wsp_server.cfg"), `host: 127.0.0.1\nport: ${wspPort}\nsecretkey: ${secret}\n`)
    fs.writeFileSync(
      path.join(dir, "wsp_client.cfg"),
      `targets:\n  - ws://127.0.0.1:${wspPort}/register\nsecretkey: ${secret}\npoolidlesize: 1\npoolmaxsize: 4\n`
    )
    started.push(await startCommand(bin, "wsp-server", ["--config", path.join(dir, "wsp_server.cfg"), "--admin", "127.0.0.1:0"]))
    started.push(await startCommand(bin, "wsp-client", ["--config", path.join(dir, "wsp_client.cfg"), "--admin", "127.0.0.1:0"]))
    return started
  } catch (e) {
    await Promise.all(started.map((s) => s.stop()))
    throw e
  }
}
