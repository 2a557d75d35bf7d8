/**
 * Two services on one public port, plain Node: service A answers /a, service B answers /b, both through
 * the same gateway port 8000. Run with `npm exec -- node examples/two-services-node.ts`; it starts a
 * gateway in-process on a free control port, asks for both paths, prints the answers and exits.
 * Against a separate gateway: `SWITCHYARD_SERVER=host:9999 SWITCHYARD_TOKEN=... ` and `--stay`.
 */
import * as http from "node:http"
import { listen } from "../src/runtime/listen.ts"
import { startGateway } from "./gateway.ts"

const stay = process.argv.includes("--stay")
const external = process.env["SWITCHYARD_SERVER"]
const gateway = external === undefined ? await startGateway({ controlPort: 0 }) : undefined
const server = external ?? `127.0.0.1:${gateway!.controlPort}`
const token = process.env["SWITCHYARD_TOKEN"] ?? "demo-token"

// Each service is an ordinary http.Server fed by a tunnel listener instead of a local port.
const serviceA = http.createServer((_req, res) => res.end("From A\n"))
const serviceB = http.createServer((_req, res) => res.end("From B\n"))
const tunnelA = await listen({ port: 8000, http: { pathPrefix: "/a" } }, { server, token, label: "service-a" })
const tunnelB = await listen({ port: 8000, http: { pathPrefix: "/b" } }, { server, token, label: "service-b" })
tunnelA.serve(serviceA)
tunnelB.serve(serviceB)

const get = (path: string) =>
  new Promise<string>((resolve, reject) => {
    http.get({ host: "127.0.0.1", port: 8000, path, agent: false }, (res) => {
      let body = ""
      res.on("data", (c: Buffer) => (body += c))
      res.on("end", () => resolve(`${res.statusCode} ${body.trim()}`))
    }).on("error", reject)
  })

for (const path of ["/a", "/b", "/a/deeper"]) console.log(`GET ${path} -> ${await get(path)}`)

const shutdown = async () => {
  await new Promise<void>((resolve) => tunnelA.close(() => resolve()))
  await new Promise<void>((resolve) => tunnelB.close(() => resolve()))
  serviceA.closeAllConnections()
  serviceB.closeAllConnections()
  await gateway?.close()
}
if (stay) {
  console.log("serving http://127.0.0.1:8000/a and /b; Ctrl-C to stop")
  process.once("SIGINT", () => void shutdown())
} else {
  await shutdown()
}
