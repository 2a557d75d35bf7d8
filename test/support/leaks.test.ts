import { describe, expect, it } from "@effect/vitest"
import * as net from "node:net"
import { activeHandles, expectNoLeaks } from "./leaks.ts"

describe("expectNoLeaks", () => {
  it("reports a server left listening, and passes once it is closed", async () => {
    const before = activeHandles()
    const server = net.createServer()
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
    await expect(expectNoLeaks(before, 100)).rejects.toThrow(/TCPServerWrap/)
    await new Promise<void>((resolve) => server.close(() => resolve()))
    await expectNoLeaks(before)
  })
})
