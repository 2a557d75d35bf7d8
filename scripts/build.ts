/**
 * `npm run build`: the published package's `dist/`.
 * - `dist/cli/`: the `switchyard` command, one tree-shaken ES module bundle of switchyard and Effect (each
 *   subcommand a chunk loaded when it runs). Only `bufferutil` stays outside: it is native and optional.
 * - `dist/index.js` + `dist/**\/*.d.ts`: the library entry for embedding; its dependencies (Effect above
 *   all, which an embedding app shares) stay imports.
 * It builds nothing else and runs no tests.
 */
import { execFileSync } from "node:child_process"
import * as fs from "node:fs"
import { builtinModules } from "node:module"
import * as path from "node:path"
import * as esbuild from "esbuild"
import packageJson from "../package.json" with { type: "json" }

const root = path.resolve(import.meta.dirname, "..")
const dist = path.join(root, "dist")
/** The oldest Node the package runs on (`engines.node`), as esbuild's target. */
const target = `node${packageJson.engines.node.replace(/^>=\s*/, "")}`

fs.rmSync(dist, { recursive: true, force: true })

// A bundled ES module has no `require`; a CommonJS dependency inside the bundle may still call it.
const requireShim = `import { createRequire as __switchyardRequire } from "node:module"; const require = __switchyardRequire(import.meta.url);`

/**
 * Node's built-in modules through `require`: an ES `import` of one builds a namespace of every export,
 * which evaluates lazy getters (`node:http`'s `WebSocket` loads undici, about 14 MB of resident memory).
 */
const builtinsByRequire: esbuild.Plugin = {
  name: "builtins-by-require",
  setup(build) {
    const names = builtinModules.map((name) => name.replace(/[/]/g, "\\/")).join("|")
    build.onResolve({ filter: new RegExp(`^(node:.*|${names})$`) }, (args) =>
      args.namespace === "builtin-require" ? { path: args.path, external: true } : { path: args.path, namespace: "builtin-require" })
    build.onLoad({ filter: /.*/, namespace: "builtin-require" }, (args) => ({
      contents: `module.exports = require(${JSON.stringify(args.path)})`,
      loader: "js"
    }))
  }
}

/**
 * `yaml` as ES modules (the package's ESM build, which warns through `console.warn` instead of
 * `process.emitWarning`): its CommonJS build, bundled, would lose its named exports to a dynamic `import()`.
 */
const yamlAsEsm: esbuild.Plugin = {
  name: "yaml-as-esm",
  setup(build) {
    build.onResolve({ filter: /^yaml$/ }, () => ({ path: path.join(root, "node_modules/yaml/browser/index.js") }))
  }
}

await esbuild.build({
  absWorkingDir: root,
  entryPoints: { switchyard: "src/runtime/main.ts" },
  plugins: [builtinsByRequire, yamlAsEsm],
  outdir: "dist/cli",
  outExtension: { ".js": ".mjs" },
  chunkNames: "chunks/[name]-[hash]",
  bundle: true,
  splitting: true,
  format: "esm",
  platform: "node",
  target,
  treeShaking: true,
  minify: process.env.SWITCHYARD_BUILD_NO_MINIFY === undefined,
  legalComments: "linked",
  sourcemap: "linked",
  sourcesContent: false,
  external: ["bufferutil"],
  banner: { js: requireShim },
  logLevel: "warning"
})

await esbuild.build({
  absWorkingDir: root,
  entryPoints: { index: "src/index.ts" },
  outdir: "dist",
  bundle: true,
  format: "esm",
  platform: "node",
  target,
  treeShaking: true,
  sourcemap: "linked",
  sourcesContent: false,
  external: Object.keys(packageJson.dependencies),
  logLevel: "warning"
})

// Types for embedding: `dist/index.d.ts` and the modules it names.
execFileSync(process.execPath, [path.join(root, "node_modules/typescript/bin/tsc"), "-p", "tsconfig.build.json", "--emitDeclarationOnly"], {
  cwd: root,
  stdio: "inherit"
})
