/**
 * `npm run bench -- cluster`: two gateways of a cluster on a private redis-server, a backend connected to
 * g1 only (`switchyard client --expose`). The local path calls g1's public port (127.0.0.11); the relayed
 * path calls g2's (127.0.0.12), which relays every request over its relay link to g1. Figures (see
 * compare.ts): req/s and the relayed path's ratio to the local one, latency, one-at-a-time latency,
 * 100 MiB downloads, and each switchyard process's CPU per request and per 100 MiB, in the same run.
 */
import { comparePaths, defaultSettings } from "./compare.ts"
import { type BenchProcess, benchToken, startBackend, startProcess, startSwitchyard, stopAll } from "./roles.ts"
import { answered, freePort } from "./support.ts"

const suite = "cluster"
const secret = "bench-cluster-secret-3a7f"
const publicHosts = ["127.0.0.11", "127.0.0.12"] as const

/** A gateway of the cluster, its public ports on `publicHost`. */
const startGateway = async (node: string, publicHost: string, redisUrl: string): Promise<{ process: BenchProcess; control: number }> => {
  const control = await freePort()
  const relay = await freePort()
  const gateway = await startSwitchyard(node, [
    "server",
    "--control", `127.0.0.1:${control}`,
    "--token", benchToken,
    "--no-admin",
    "--public-host", publicHost,
    "--cluster-redis", redisUrl,
    "--cluster-node", node,
    "--cluster-advertise", `127.0.0.1:${relay}`,
    "--set", "drain_timeout_ms=1000"
  ], { ready: /switchyard gateway running/, gc: true })
  return { process: gateway, control }
}

export const run = async (): Promise<void> => {
  const started: Array<BenchProcess> = []
  try {
    const redisPort = await freePort()
    started.push(await startProcess("redis", "redis-server", [
      "--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", "/tmp"
    ], { ready: /Ready to accept connections/ }))
    const redisUrl = `redis://127.0.0.1:${redisPort}`
    // the gateways read the shared secret from their environment, inherited from this process
    process.env.SWITCHYARD_CLUSTER_SECRET = secret
    const backend = await startBackend(defaultSettings.downloadBytes)
    started.push(backend.process)
    const g1 = await startGateway("g1", publicHosts[0], redisUrl)
    started.push(g1.process)
    const g2 = await startGateway("g2", publicHosts[1], redisUrl)
    started.push(g2.process)
    const publicPort = await freePort()
    const client = await startSwitchyard("client", [
      "client", "--server", `127.0.0.1:${g1.control}`, "--token", benchToken,
      "--expose", `127.0.0.1:${backend.port}`, "--port", String(publicPort)
    ], { ready: /switchyard client:/ })
    started.push(client)
    for (const host of publicHosts) await answered(`http://${host}:${publicPort}/`)

    const url = (host: string, path: string) => ({ url: `http://${host}:${publicPort}${path}` })
    await comparePaths(suite, [
      { name: "local", small: url(publicHosts[0], "/"), download: url(publicHosts[0], "/big"), parties: [g1.process, client] },
      { name: "relayed", small: url(publicHosts[1], "/"), download: url(publicHosts[1], "/big"), parties: [g2.process, g1.process, client] }
    ], { ...defaultSettings, oneAtATimeRounds: 2 })
  } finally {
    await stopAll(started)
  }
}
