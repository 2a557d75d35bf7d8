/**
 * Test helpers for the routing core: in-memory backends (for registry and dispatcher logic, where no
 * bytes flow) with a closable flag.
 */
import { Agent } from "node:http"
import { PassThrough } from "node:stream"
import { Effect } from "effect"
import { type Backend, BackendUnavailable } from "../../src/services/Backend.ts"

export interface TestBackend extends Backend {
  close(): void
}

export const makeTestBackend = (id: string): TestBackend => {
  let closed = false
  const backend: TestBackend = {
    id,
    label: `test ${id}`,
    inFlight: 0,
    agent: new Agent({ keepAlive: false }),
    connect: () =>
      closed
        ? Effect.fail(new BackendUnavailable({ reason: "Closed", message: `${id} is closed` }))
        : Effect.sync(() => new PassThrough()),
    isClosed: () => closed,
    close: () => {
      closed = true
      backend.agent.destroy()
    }
  }
  return backend
}
