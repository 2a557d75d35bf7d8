/**
 * `npm run bench [-- suite ...]`: runs the named suites (all when none is named), each a module in
 * bench/ exporting `run(): Promise<void>` that prints its figures through `report`.
 */
import * as fs from "node:fs"
import * as path from "node:path"

const here = import.meta.dirname
const available = fs.readdirSync(here)
  .filter((f) => f.endsWith(".bench.ts"))
  .map((f) => f.slice(0, -".bench.ts".length))
  .sort()

const wanted = process.argv.slice(2).filter((a) => !a.startsWith("-"))
const suites = wanted.length > 0 ? wanted : available
for (const suite of suites) {
  if (!available.includes(suite)) {
    process.stderr.write(`unknown bench suite "${suite}"; available: ${available.join(", ")}\n`)
    process.exit(2)
  }
}
for (const suite of suites) {
  const mod = (await import(path.join(here, `${suite}.bench.ts`))) as { run: () => Promise<void> }
  await mod.run()
}
process.exit(0)
