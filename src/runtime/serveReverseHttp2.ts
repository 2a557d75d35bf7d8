/**
 * Reverse HTTP/2 from plain Node: `serveReverseHttp2(handler or http2 server, options)` dials the
 * gateway's tunnel port and serves the given handler over the connections it keeps; `close()` ends
 * them. The Effect Layer behind it is `H2Client.layer`. It does not start a gateway.
 */
import * as http2 from "node:http2"
import { Context, Effect, Exit, Layer, Scope } from "effect"
import { H2Client, type H2ClientConfig, type H2ClientError, type H2ClientShape } from "../services/client/H2Client.ts"

/** What `serveReverseHttp2` returns. */
export interface ReverseHttp2Handle {
  /** Connections currently serving. */
  readonly connected: () => number
  /** Connection attempts made so far. */
  readonly attempts: () => number
  /** The latest failed attempt (unreachable gateway, refused token...), if any. */
  readonly lastError: () => H2ClientError | undefined
  /** Closes every connection (and the `http2` server, when it was made here from a handler). */
  readonly close: () => Promise<void>
}

/** A request handler in Node's `http2` compatibility API (`(req, res) => ...`). */
export type ReverseHttp2Handler = (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void

/**
 * Serves `handler` (or an existing `http2` server, e.g. one with `settings` or a `stream` listener)
 * over connections to the gateway. Options are `H2ClientConfig`: `gateway`, `token`, `routes`,
 * `connections`, `tls`, `backoff`.
 */
export const serveReverseHttp2 = async (
  handler: ReverseHttp2Handler | http2.Http2Server | http2.Http2SecureServer,
  options: H2ClientConfig
): Promise<ReverseHttp2Handle> => {
  const owned = typeof handler === "function"
  const server = typeof handler === "function" ? http2.createServer(handler) : handler
  const scope = Scope.makeUnsafe()
  const context = await Effect.runPromise(Layer.buildWithScope(H2Client.layer(server, options), scope))
  const client: H2ClientShape = Context.get(context, H2Client)
  let closing: Promise<void> | undefined
  return {
    connected: client.connected,
    attempts: client.attempts,
    lastError: client.lastError,
    close: () =>
      closing ??= Effect.runPromise(Scope.close(scope, Exit.void)).then(() => {
        if (owned) server.close()
      })
  }
}
