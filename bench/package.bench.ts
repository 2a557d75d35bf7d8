/**
 * `npm run bench -- package`: the package as users install it (`npm pack`, then `npm install` of the
 * tarball into a fresh project) and the idle resident memory of each long-running command started from
 * that install: `package.<command>.rss_idle_mb`, VmRSS read from /proc once the command has been up and
 * idle for a few seconds (the client connected to the gateway, the wsp client registered with its server).
 */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { packAndInstall, startEveryCommand } from "../scripts/installedPackage.ts"
import { memoryMb, report } from "./support.ts"

const SUITE = "package"
/** How long every command stays idle before its memory is read. */
const IDLE_MS = 5_000

export const run = async (): Promise<void> => {
  const installed = packAndInstall()
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "switchyard-bench-package-"))
  try {
    const commands = await startEveryCommand(installed.bin, dir)
    try {
      await new Promise((resolve) => setTimeout(resolve, IDLE_MS))
      for (const c of commands) report(SUITE, `${c.command}.rss_idle_mb`, memoryMb(c.pid).rss, "MB")
    } finally {
      for (const c of [...commands].reverse()) await c.stop()
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true })
    installed.remove()
  }
}
