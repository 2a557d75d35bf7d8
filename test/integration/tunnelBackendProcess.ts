/**
 * A backend in its own process for the "backend killed" tests: serves `/slow` (head and half the body,
 * then nothing) and `/hang` (nothing at all) through a tunnel to the control port given as argv[2], on
 * the public port argv[3]; prints "ready" once bound. The parent kills it with SIGKILL.
 */
import * as http from "node:http"
import { listen } from "../../src/runtime/listen.ts"

const [controlPort, publicPort] = process.argv.slice(2).map(Number)
const server = http.createServer((req, res) => {
  if (req.url === "/slow") {
    res.writeHead(200, { "content-length": "1000" })
    res.write("x".repeat(500))
  }
  // "/hang": no answer until the process dies
})
const tunnel = await listen({ port: publicPort! }, { server: `127.0.0.1:${controlPort}`, token: "test-token" })
tunnel.serve(server)
process.stdout.write("ready\n")
