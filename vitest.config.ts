import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Tests bind real loopback sockets and start real peers; two workers suit the 2-core machines.
    maxWorkers: 2,
    // the default output, then the skipped tests and why (a missing peer outside CI)
    reporters: ["default", "./test/support/skipReporter.ts"]
  }
})
