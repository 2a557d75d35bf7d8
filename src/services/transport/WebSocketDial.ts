/**
 * Dials a `ws://` or `wss://` URL and returns it as a `WebSocketConnection`, going through the HTTP
 * proxy that `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (or an explicit proxy URL) names, with `CONNECT`.
 * TLS is verified against the system CAs plus any `ca` given. It does not retry: callers reconnect.
 */
import { Duration, Effect } from "effect"
import type { Scope } from "effect"
import { parseProxyUrl, ProxyConfigError, proxyFor, readProxyEnvironment } from "../../domain/ProxyEnv.ts"
import type { ProxyChoice } from "../../domain/ProxyEnv.ts"
import { WebSocketError } from "../../domain/WebSocketClose.ts"
import { connectThroughProxy } from "./HttpConnectProxy.ts"
import { DefaultMaxPayload, fromEndpoint, MaxMessageBytes, type WebSocketConnection, type WebSocketConnectionOptions } from "./WebSocketConnection.ts"
import type { WebSocketEndpoint } from "./WebSocketEndpoint.ts"
import { openWebSocket } from "./WebSocketOpen.ts"

/** Time the WebSocket opening handshake (after any proxy tunnel) may take. */
export const DefaultOpenTimeout: Duration.Duration = Duration.seconds(10)

/** A WebSocket endpoint to dial, and how. */
export interface WebSocketTarget extends WebSocketConnectionOptions {
  /** `ws://host[:port]/path` or `wss://…`. */
  readonly url: string
  /** Extra PEM CA certificates trusted for `wss://` (in addition to the system's). */
  readonly ca?: string | ReadonlyArray<string> | undefined
  /** Verify the server's certificate (default true). */
  readonly rejectUnauthorized?: boolean | undefined
  /** A proxy URL, or `false` for none; by default `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` decide. */
  readonly proxy?: string | false | undefined
  /** Extra headers on the opening request (e.g. for an authenticating reverse proxy in front). */
  readonly headers?: Readonly<Record<string, string>> | undefined
  /**
   * Mask client frames with a random key, as RFC 6455 requires (default `true`; `bufferutil` does it in
   * native code). `false` sends an all-zero key: only for `wss://` or trusted links where no cleartext
   * intermediary can read the frames, to save the masking passes.
   */
  readonly maskFrames?: boolean | undefined
  readonly openTimeout?: Duration.Input | undefined
}

/** A parsed `ws://`/`wss://` URL. */
export interface WebSocketUrl {
  readonly url: URL
  readonly secure: boolean
  readonly host: string
  readonly port: number
}

/** Parses a tunnel URL; only `ws:` and `wss:` are accepted. */
export const parseWebSocketUrl = (text: string): WebSocketUrl | WebSocketError => {
  let url: URL
  try {
    url = new URL(text)
  } catch {
    return new WebSocketError({ reason: "BadUrl", message: `"${displayUrl(text)}" is not a URL` })
  }
  if (url.protocol !== "ws:" && url.protocol !== "wss:") {
    return new WebSocketError({ reason: "BadUrl", message: `"${displayUrl(text)}": expected a ws:// or wss:// URL` })
  }
  const secure = url.protocol === "wss:"
  const host = url.hostname.startsWith("[") ? url.hostname.slice(1, -1) : url.hostname
  return { url, secure, host, port: url.port === "" ? (secure ? 443 : 80) : Number(url.port) }
}

/** The URL as logs and errors show it: any `user:password@` is removed. */
export const displayUrl = (text: string): string => {
  try {
    const url = new URL(text)
    if (url.username === "" && url.password === "") return text
    url.username = ""
    url.password = ""
    return url.href
  } catch {
    return text.replace(/\/\/[^/@]*@/, "//")
  }
}

/** True when `text` names a WebSocket endpoint rather than a `host:port`. */
export const isWebSocketUrl = (text: string): boolean => /^wss?:\/\//i.test(text.trim())

/** The `Authorization` a URL's `user:password@` stands for (Basic), if it has one. */
const urlAuthorization = (url: URL): Record<string, string> =>
  url.username === "" && url.password === ""
    ? {}
    : { Authorization: `Basic ${Buffer.from(`${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`).toString("base64")}` }

const choose = (target: WebSocketTarget, parsed: WebSocketUrl, env: Readonly<Record<string, string | undefined>>): ProxyChoice | undefined | WebSocketError => {
  const choice = target.proxy === false
    ? undefined
    : target.proxy !== undefined
    ? parseProxyUrl(target.proxy)
    : proxyFor(parsed, readProxyEnvironment(env))
  return choice instanceof ProxyConfigError ? new WebSocketError({ reason: "Proxy", message: choice.message }) : choice
}

/**
 * Opens the WebSocket (through the proxy when one applies); it is terminated when the scope closes.
 * Fails with `WebSocketError`: `BadUrl`, `Proxy` (the proxy refused or is unreachable), `Handshake`
 * (unreachable, TLS failure, or an HTTP answer other than 101, named in the message).
 */
export const dialWebSocket = (
  target: WebSocketTarget,
  env: Readonly<Record<string, string | undefined>> = process.env
): Effect.Effect<WebSocketConnection, WebSocketError, Scope.Scope> =>
  Effect.gen(function*() {
    const parsed = parseWebSocketUrl(target.url)
    if (parsed instanceof WebSocketError) return yield* parsed
    const proxy = choose(target, parsed, env)
    if (proxy instanceof WebSocketError) return yield* proxy
    const openTimeout = Duration.fromInputUnsafe(target.openTimeout ?? DefaultOpenTimeout)
    const tunnel = proxy === undefined ? undefined : yield* connectThroughProxy(proxy, parsed.host, parsed.port, openTimeout)
    const opened = yield* Effect.acquireRelease(
      Effect.callback<{ endpoint: WebSocketEndpoint }, WebSocketError>((resume) => {
        const cancel = openWebSocket({
          secure: parsed.secure,
          host: parsed.host,
          port: parsed.port,
          path: `${parsed.url.pathname}${parsed.url.search}`,
          headers: { ...urlAuthorization(parsed.url), ...target.headers },
          ca: target.ca === undefined ? undefined : typeof target.ca === "string" ? [target.ca] : target.ca,
          rejectUnauthorized: target.rejectUnauthorized ?? true,
          tunnel,
          maskFrames: target.maskFrames ?? true,
          maxMessageBytes: target.maxPayload ?? DefaultMaxPayload,
          maxSendMessageBytes: target.maxMessageBytes ?? MaxMessageBytes,
          binaryOnly: true,
          timeoutMs: Duration.toMillis(openTimeout)
        }, (outcome) => {
          if (outcome._tag === "Open") return resume(Effect.succeed({ endpoint: outcome.endpoint }))
          tunnel?.destroy()
          resume(Effect.fail(new WebSocketError({ reason: "Handshake", message: `${displayUrl(target.url)}: ${outcome.message}` })))
        })
        return Effect.sync(cancel)
      }),
      ({ endpoint }) => Effect.sync(() => endpoint.terminate())
    )
    const s = opened.endpoint.socket
    return yield* fromEndpoint(opened.endpoint, {
      ...target,
      localAddress: { host: s.localAddress, port: s.localPort },
      remoteAddress: tunnel !== undefined ? { host: parsed.host, port: parsed.port } : { host: s.remoteAddress, port: s.remotePort }
    })
  })
