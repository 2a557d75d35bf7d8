/**
 * Test helpers for the routing core: backends for registry and dispatcher logic, where no bytes flow
 * (their upstream points at the discard port and is never used), with a closable flag.
 */
import { PassThrough } from "node:stream"
import { Effect } from "effect"
import { type Backend, BackendUnavailable } from "../../src/services/Backend.ts"
import { tcpUpstream } from "../../src/services/forward/Upstream.ts"

export interface TestBackend extends Backend {
  close(): void
}

export const makeTestBackend = (id: string): TestBackend => {
  let closed = false
  const backend: TestBackend = {
    id,
    label: `test ${id}`,
    inFlight: 0,
    upstream: tcpUpstream("127.0.0.1", 9, { maxSockets: 1, maxFreeSockets: 0 }),
    connect: () =>
      closed
        ? Effect.fail(new BackendUnavailable({ reason: "Closed", message: `${id} is closed` }))
        : Effect.sync(() => new PassThrough()),
    isClosed: () => closed,
    close: () => {
      closed = true
    }
  }
  return backend
}
