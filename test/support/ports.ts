/**
 * Ports for tests that must name a port before a process binds it (a public port a backend asks for, a
 * gateway restarted on the same address).
 *
 * A port taken from the kernel's ephemeral range and released again can be handed by the kernel to any
 * outgoing connection before the process under test binds it. The ports given here lie below that range,
 * where the kernel never picks a source port, and each vitest worker has its own slice of them, so two
 * test files running at once never pick the same one. Each port is checked free by binding it first.
 */
import * as fs from "node:fs"
import * as net from "node:net"

/** Lowest port the allocator gives. */
const FirstPort = 20_000
/** Workers the range is split for; a pool id above it shares a slice with a lower one. */
const Slices = 8

const ephemeralLow = (): number => {
  try {
    const low = Number(fs.readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0])
    return Number.isInteger(low) && low > FirstPort + Slices * 100 ? low : 32_768
  } catch {
    return 32_768
  }
}

const span = Math.floor((ephemeralLow() - FirstPort) / Slices)
const slice = (Number(process.env["VITEST_POOL_ID"] ?? "1") - 1) % Slices
const sliceStart = FirstPort + slice * span
// a file that runs after another in the same worker starts elsewhere in the slice
let next = Math.floor(Math.random() * span)

const canBind = (port: number): Promise<boolean> =>
  new Promise((resolve) => {
    const server = net.createServer()
    server.once("error", () => resolve(false))
    server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)))
  })

/** A loopback port nothing listens on, outside the kernel's ephemeral range and this worker's own. */
export const freePort = async (): Promise<number> => {
  for (let tries = 0; tries < span; tries++) {
    const port = sliceStart + (next++ % span)
    if (await canBind(port)) return port
  }
  throw new Error(`no free port in ${sliceStart}..${sliceStart + span - 1}`)
}
