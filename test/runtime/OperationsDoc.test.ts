/**
 * docs/OPERATIONS.md stays in step with the code: its configuration tables are the ones generated from
 * the schemas, and every metric family the code registers is in its metrics reference.
 */
import { assert, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as path from "node:path"
import { ClientFile, OpsFile, ServerFile, settingsTable } from "../../src/runtime/ConfigLoader.ts"

const root = path.resolve(import.meta.dirname, "../..")
const doc = fs.readFileSync(path.join(root, "docs/OPERATIONS.md"), "utf8")

const block = (name: string): string => {
  const m = new RegExp(`<!-- config:${name}:begin -->\\n([\\s\\S]*?)\\n<!-- config:${name}:end -->`).exec(doc)
  assert.isNotNull(m, `docs/OPERATIONS.md has no config:${name} block`)
  return m![1]!
}

describe("docs/OPERATIONS.md", () => {
  it("holds the configuration tables generated from the schemas", () => {
    assert.strictEqual(block("server"), settingsTable(ServerFile), "regenerate the server table from settingsTable(ServerFile)")
    assert.strictEqual(block("client"), settingsTable(ClientFile), "regenerate the client table from settingsTable(ClientFile)")
    assert.strictEqual(block("ops"), settingsTable(OpsFile), "regenerate the shared table from settingsTable(OpsFile)")
  })

  it("lists every metric family registered in the code", () => {
    const sources = ["src/services/Metrics.ts", "src/runtime/Admin.ts", "src/runtime/server/GatewayInstruments.ts", "src/runtime/server/runGateway.ts"]
    const names = new Set<string>()
    for (const file of sources) {
      for (const m of fs.readFileSync(path.join(root, file), "utf8").matchAll(/name: "(switchyard_[a-z_]+)"/g)) names.add(m[1]!)
    }
    assert.isAbove(names.size, 15)
    for (const name of names) assert.include(doc, `| \`${name}\` |`, `${name} is missing from the metrics reference`)
  })

  it("the README's quick start is the two commands and the banner the gateway prints", () => {
    const readme = fs.readFileSync(path.join(root, "README.md"), "utf8")
    assert.match(readme, /npm ci && npm start[\s\S]*admin endpoint {3}http:\/\/127\.0\.0\.1:7090[\s\S]*switchyard client --server 127\.0\.0\.1:9999/)
    assert.match(readme, /\nnpm test\b/)
  })
})
