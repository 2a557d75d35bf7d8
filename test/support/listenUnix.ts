/**
 * An HTTP server on a Unix socket for engine tests, whose connections are tracked so that closing it
 * does not wait for kept-alive connections.
 */
import type * as http from "node:http"
import type * as net from "node:net"

/** Listens `server` on `socketPath`; the returned function destroys its connections and closes it. */
export const listenUnix = async (server: http.Server, socketPath: string): Promise<() => Promise<void>> => {
  const sockets = new Set<net.Socket>()
  server.on("connection", (s: net.Socket) => {
    sockets.add(s)
    s.once("close", () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(socketPath, resolve))
  return async () => {
    for (const s of sockets) s.destroy()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
}
