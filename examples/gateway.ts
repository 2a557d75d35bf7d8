/**
 * A control-port gateway for the examples: control port on 127.0.0.1:9999 (or CONTROL_PORT), public
 * ports 8000-8999 for token `demo-token` (or SWITCHYARD_TOKEN). Run alone with
 * `npm exec -- node examples/gateway.ts`, or import `startGateway` to embed it.
 */
import { Context, Effect, Exit, Layer, Redacted, Scope } from "effect"
import * as NodeTransport from "../src/runtime/NodeTransport.ts"
import { ControlPort } from "../src/services/front/ControlPort.ts"

export interface RunningGateway {
  readonly controlPort: number
  readonly close: () => Promise<void>
}

export const startGateway = async (options: { controlPort?: number; token?: string } = {}): Promise<RunningGateway> => {
  const scope = Scope.makeUnsafe()
  const layer = ControlPort.gatewayLayer({
    control: {
      address: { host: "127.0.0.1", port: options.controlPort ?? 9999 },
      tokens: [{ name: "demo", token: Redacted.make(options.token ?? "demo-token"), ports: [{ from: 8000, to: 8999 }] }]
    },
    publicHost: "127.0.0.1",
    registry: { gracePeriod: "5 seconds" }
  }).pipe(Layer.provide(NodeTransport.layer))
  const context = await Effect.runPromise(Layer.buildWithScope(layer, scope))
  const control = Context.get(context, ControlPort)
  return {
    controlPort: control.address.port ?? 0,
    close: () => Effect.runPromise(Scope.close(scope, Exit.void))
  }
}

if (import.meta.main) {
  const gateway = await startGateway({
    controlPort: Number(process.env["CONTROL_PORT"] ?? 9999),
    token: process.env["SWITCHYARD_TOKEN"] ?? "demo-token"
  })
  console.log(`gateway: control port 127.0.0.1:${gateway.controlPort}, public ports 8000-8999`)
  const stop = () => void gateway.close().then(() => process.exit(0))
  process.once("SIGINT", stop)
  process.once("SIGTERM", stop)
}
