/**
 * Resolves what a socket-proxy client names (a container name, id or id prefix; an exec id) to the
 * container the Engine means, by asking the Engine (`GET /containers/{name}/json`, `/exec/{id}/json`),
 * and says whether that container carries the scope's label. Answers are cached briefly by the name as
 * asked; a cached answer is only ever used to pin a call to the full id it resolved to, and a
 * container's labels never change, so a stale entry can send a call to a container that is gone (404),
 * never to one outside the scope. Lookups of the same name share one request; lookups, responses and
 * the cache are bounded. It does not decide rules or read request bodies.
 */
import { Buffer } from "node:buffer"
import * as http from "node:http"
import { type ContainerLabel, inspectPath, labelsInScope } from "../../domain/LabelScope.ts"
import type { UpstreamAddress } from "../../domain/SocketProxyConfig.ts"

/** How long a resolved name is reused (ms). */
export const SCOPE_CACHE_TTL_MS = 2_000
/** Most names kept in the cache; the oldest goes first. */
export const SCOPE_CACHE_ENTRIES = 4_096
/** Most lookups waiting or in flight at once; more are answered 503. */
export const MAX_PENDING_LOOKUPS = 1_024
/** Most connections to the Engine used for lookups at once. */
export const LOOKUP_SOCKETS = 8
/** Largest inspect response read (bytes); larger fails the lookup. */
export const MAX_LOOKUP_RESPONSE_BYTES = 4 * 1024 * 1024
/** Time a lookup may take before it fails (ms). */
export const LOOKUP_TIMEOUT_MS = 10_000

/** A name as the Engine resolved it. */
export type Resolution =
  /** The container (or the exec's container) exists: its full id (the exec's id for an exec) and whether it is in scope. */
  | { readonly _tag: "Found"; readonly id: string; readonly inScope: boolean }
  /** The Engine knows no such container or exec. */
  | { readonly _tag: "Missing" }
  /** The lookup itself failed (Engine unreachable, an unexpected answer, too slow, too many waiting). */
  | { readonly _tag: "Failed"; readonly status: 502 | 503 | 504; readonly reason: string }

export interface ScopeResolverOptions {
  readonly upstream: UpstreamAddress
  readonly label: ContainerLabel
  /** The clock for cache expiry (ms). */
  readonly now?: (() => number) | undefined
}

export interface ScopeResolver {
  /** A cached answer still fresh, or `undefined`. */
  readonly cached: (kind: "containers" | "exec", name: string) => Resolution | undefined
  /** Resolves `name`, calling `done` once (possibly at once); returns a canceller. */
  readonly resolve: (kind: "containers" | "exec", name: string, done: (r: Resolution) => void) => () => void
  /** Lookups waiting or in flight. */
  readonly pending: () => number
  /** Ends lookups in flight and the connections they use. */
  readonly close: () => void
}

interface Fetched {
  readonly status: number
  readonly body: unknown
}

export const makeScopeResolver = (options: ScopeResolverOptions): ScopeResolver => {
  const now = options.now ?? Date.now
  const agent = new http.Agent({ keepAlive: true, maxSockets: LOOKUP_SOCKETS, maxFreeSockets: LOOKUP_SOCKETS })
  const cache = new Map<string, { readonly at: number; readonly resolution: Resolution }>()
  const waiting = new Map<string, Set<(r: Resolution) => void>>()
  const requests = new Set<http.ClientRequest>()
  let pendingCount = 0
  let closed = false

  const fetchJson = (path: string, done: (r: Fetched | Resolution) => void): void => {
    const base = options.upstream._tag === "Unix"
      ? { socketPath: options.upstream.path }
      : { host: options.upstream.host, port: options.upstream.port }
    const req = http.request({ ...base, agent, method: "GET", path, headers: { host: "docker" }, timeout: LOOKUP_TIMEOUT_MS })
    requests.add(req)
    let finished = false
    const finish = (r: Fetched | Resolution) => {
      if (finished) return
      finished = true
      requests.delete(req)
      done(r)
    }
    req.on("timeout", () => {
      req.destroy()
      finish({ _tag: "Failed", status: 504, reason: `the Engine did not answer a lookup within ${LOOKUP_TIMEOUT_MS} ms` })
    })
    req.on("error", (e) => finish({ _tag: "Failed", status: 502, reason: `the Engine could not be asked: ${e.message}` }))
    req.on("response", (res) => {
      const chunks: Array<Buffer> = []
      let size = 0
      res.on("data", (chunk: Buffer) => {
        size += chunk.length
        if (size > MAX_LOOKUP_RESPONSE_BYTES) {
          req.destroy()
          finish({ _tag: "Failed", status: 502, reason: `a lookup answer larger than ${MAX_LOOKUP_RESPONSE_BYTES} bytes` })
          return
        }
        chunks.push(chunk)
      })
      res.on("error", (e) => finish({ _tag: "Failed", status: 502, reason: `the lookup answer broke off: ${e.message}` }))
      res.on("end", () => {
        let body: unknown = undefined
        try {
          body = JSON.parse(Buffer.concat(chunks).toString("utf8"))
        } catch {
          // judged below by status
        }
        finish({ status: res.statusCode ?? 0, body })
      })
    })
    req.end()
  }

  const asResolution = (r: Fetched | Resolution, read: (body: Record<string, unknown>) => Resolution | undefined): Resolution => {
    if ("_tag" in r) return r
    if (r.status === 404) return { _tag: "Missing" }
    const body = r.body !== null && typeof r.body === "object" ? r.body as Record<string, unknown> : undefined
    const resolved = r.status === 200 && body !== undefined ? read(body) : undefined
    return resolved ?? { _tag: "Failed", status: 502, reason: `the Engine answered a lookup with status ${r.status}` }
  }

  const readContainer = (body: Record<string, unknown>): Resolution | undefined => {
    const id = body["Id"]
    const config = body["Config"]
    if (typeof id !== "string" || !/^[0-9a-f]{64}$/.test(id)) return undefined
    const labels = config !== null && typeof config === "object" ? (config as Record<string, unknown>)["Labels"] : undefined
    return { _tag: "Found", id, inScope: labelsInScope(options.label, labels) }
  }

  const lookup = (kind: "containers" | "exec", name: string, done: (r: Resolution) => void): void => {
    if (kind === "containers") {
      fetchJson(inspectPath("containers", name), (r) => done(asResolution(r, readContainer)))
      return
    }
    fetchJson(inspectPath("exec", name), (r) => {
      const exec = asResolution(r, (body) => {
        const id = body["ID"]
        const container = body["ContainerID"]
        return typeof id === "string" && /^[0-9a-f]{64}$/.test(id) && typeof container === "string" && container.length > 0
          ? { _tag: "Found", id: `${id}\n${container}`, inScope: false }
          : undefined
      })
      if (exec._tag !== "Found") return done(exec)
      const [execId, container] = exec.id.split("\n") as [string, string]
      // The exec's container, by the id the Engine gave: in scope or not, as any container.
      resolveContainer("containers", container, (c) =>
        done(c._tag === "Found" ? { _tag: "Found", id: execId, inScope: c.inScope } : c._tag === "Missing" ? { _tag: "Missing" } : c))
    })
  }

  const key = (kind: string, name: string) => `${kind}\n${name}`

  const cached = (kind: "containers" | "exec", name: string): Resolution | undefined => {
    const entry = cache.get(key(kind, name))
    if (entry === undefined) return undefined
    if (now() - entry.at >= SCOPE_CACHE_TTL_MS) {
      cache.delete(key(kind, name))
      return undefined
    }
    return entry.resolution
  }

  const remember = (k: string, resolution: Resolution) => {
    // Only answers about containers that exist are kept: a name created a moment later must resolve.
    if (resolution._tag !== "Found") return
    cache.delete(k)
    cache.set(k, { at: now(), resolution })
    while (cache.size > SCOPE_CACHE_ENTRIES) cache.delete(cache.keys().next().value!)
  }

  const resolveContainer = (kind: "containers" | "exec", name: string, done: (r: Resolution) => void): () => void => {
    const hit = cached(kind, name)
    if (hit !== undefined) {
      done(hit)
      return () => {}
    }
    if (closed) {
      done({ _tag: "Failed", status: 503, reason: "shutting down" })
      return () => {}
    }
    const k = key(kind, name)
    let group = waiting.get(k)
    if (group === undefined) {
      if (pendingCount >= MAX_PENDING_LOOKUPS) {
        done({ _tag: "Failed", status: 503, reason: `${MAX_PENDING_LOOKUPS} lookups are already waiting` })
        return () => {}
      }
      group = new Set()
      waiting.set(k, group)
      pendingCount++
      const members = group
      lookup(kind, name, (r) => {
        pendingCount--
        waiting.delete(k)
        if (!closed) remember(k, r)
        for (const callback of members) callback(r)
      })
    }
    const callback = (r: Resolution) => done(r)
    group.add(callback)
    return () => void group.delete(callback)
  }

  return {
    cached,
    resolve: resolveContainer,
    pending: () => pendingCount,
    close: () => {
      closed = true
      for (const req of requests) req.destroy()
      requests.clear()
      cache.clear()
      agent.destroy()
    }
  }
}
