#!/usr/bin/env -S node --max-semi-space-size=8 --heap-growing-percent=50
// The switchyard command. It first checks the Node version, in syntax every Node reads, so an old Node
// gets one line naming the version needed. A checkout (with `src/`) runs the TypeScript sources through
// Node's type stripping; the installed package runs its bundle, `dist/cli/switchyard.mjs`.
const required = [22, 19]
const [major, minor] = process.versions.node.split(".").map(Number)
if (major < required[0] || (major === required[0] && minor < required[1])) {
  process.stderr.write(`switchyard: needs Node.js ${required.join(".")} or later (24 recommended); this is Node.js ${process.versions.node} (${process.execPath})\n`)
  process.exit(1)
}

// `process.getBuiltinModule` rather than an `import` of node:fs, whose namespace would load every fs export
const { existsSync } = process.getBuiltinModule("node:fs")
const sources = new URL("../src/runtime/main.ts", import.meta.url)
if (existsSync(sources)) {
  await import(sources.href)
} else {
  // The bundle's chunks import one another by relative paths inside dist/: each resolves as a URL against
  // its importer. Node's own resolution would realpath and normalise the file path of every import, enough
  // path work at start-up for V8 to optimise Node's path functions, which maps the optimising compiler's
  // code (about 5 MB) into a command that then sits idle.
  const dist = new URL("../dist/", import.meta.url).href
  process.getBuiltinModule("node:module").registerHooks({
    resolve: (specifier, context, nextResolve) => {
      if (context.parentURL?.startsWith(dist) && (specifier.startsWith("./") || specifier.startsWith("../"))) {
        const url = new URL(specifier, context.parentURL).href
        if (url.startsWith(dist)) return { url, shortCircuit: true }
      }
      return nextResolve(specifier, context)
    }
  })
  await import(new URL("../dist/cli/switchyard.mjs", import.meta.url).href)
}
