/**
 * Opens a TCP tunnel through an HTTP proxy with `CONNECT host:port` (RFC 9110 §9.3.6), over plain TCP
 * or TLS to the proxy, with Basic credentials from the proxy URL. It returns the raw socket to the
 * target; whatever runs on it (TLS, WebSocket) is the caller's.
 */
import * as http from "node:http"
import * as https from "node:https"
import type * as net from "node:net"
import { Duration, Effect } from "effect"
import type { Scope } from "effect"
import type { ProxyChoice } from "../../domain/ProxyEnv.ts"
import { WebSocketError } from "../../domain/WebSocketClose.ts"

/** Time a proxy has to answer `CONNECT`. */
export const DefaultProxyConnectTimeout: Duration.Duration = Duration.seconds(10)

/** The authority a `CONNECT` names (`[v6]:port` for IPv6 literals). */
export const connectAuthority = (host: string, port: number): string => host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`

/**
 * A socket tunnelled through `proxy` to `host:port`, destroyed when the scope closes. Fails with
 * `WebSocketError` (reason `Proxy`) naming the proxy's status when it refuses (407: credentials).
 */
export const connectThroughProxy = (
  proxy: ProxyChoice,
  host: string,
  port: number,
  timeout: Duration.Input = DefaultProxyConnectTimeout
): Effect.Effect<net.Socket, WebSocketError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.callback<net.Socket, WebSocketError>((resume) => {
      const authority = connectAuthority(host, port)
      const headers: Record<string, string> = { host: authority }
      if (proxy.authorization !== undefined) headers["proxy-authorization"] = proxy.authorization
      const options: http.RequestOptions = {
        method: "CONNECT",
        host: proxy.host,
        port: proxy.port,
        path: authority,
        headers,
        agent: false,
        timeout: Duration.toMillis(Duration.fromInputUnsafe(timeout))
      }
      const req = proxy.secure ? https.request({ ...options, servername: proxy.host }) : http.request(options)
      let settled = false
      const fail = (message: string) => {
        if (settled) return
        settled = true
        req.destroy()
        resume(Effect.fail(new WebSocketError({ reason: "Proxy", message: `proxy ${proxy.host}:${proxy.port}: ${message}` })))
      }
      req.once("connect", (res, socket, head) => {
        if (res.statusCode !== 200) {
          socket.destroy()
          return fail(`CONNECT ${authority} answered ${res.statusCode} ${res.statusMessage ?? ""}`.trim())
        }
        if (settled) return void socket.destroy()
        settled = true
        if (head.length > 0) socket.unshift(head)
        socket.setTimeout(0)
        resume(Effect.succeed(socket))
      })
      // a proxy that answers CONNECT with an ordinary response (some do for errors)
      req.once("response", (res) => {
        res.resume()
        fail(`CONNECT ${authority} answered ${res.statusCode} ${res.statusMessage ?? ""}`.trim())
      })
      req.once("timeout", () => fail(`no answer to CONNECT ${authority} within ${Duration.format(Duration.fromInputUnsafe(timeout))}`))
      req.on("error", (e) => fail(e.message))
      req.end()
      return Effect.sync(() => {
        settled = true
        req.destroy()
      })
    }),
    (socket) => Effect.sync(() => socket.destroy())
  )
