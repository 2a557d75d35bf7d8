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

/**
 * Node's built-in modules through `process.getBuiltinModule`: an ES `import` of one builds a namespace of
 * every export, which evaluates lazy getters (`node:http`'s `WebSocket` loads undici, about 14 MB of
 * resident memory). Not through a `require` made by `createRequire` in every chunk either: that is file
 * path work at each chunk's start-up, and path work at start-up gets Node's path functions optimised,
 * which maps V8's optimising compiler into a command that then sits idle (see `bin/switchyard.js`).
 * A bundled ES module has no `require`; a CommonJS dependency that calls it for an optional package
 * (`debug`'s `supports-color`) gets the error its `try` expects.
 */
const builtinsByGetBuiltinModule: esbuild.Plugin = {
  name: "builtins-by-getBuiltinModule",
  setup(build) {
    const names = builtinModules.map((name) => name.replace(/[/]/g, "\\/")).join("|")
    build.onResolve({ filter: new RegExp(`^(node:.*|${names})$`) }, (args) => ({ path: args.path, namespace: "builtin" }))
    build.onLoad({ filter: /.*/, namespace: "builtin" }, (args) => ({
      contents: `module.exports = process.getBuiltinModule(${JSON.stringify(args.path)})`,
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

/**
 * Where the shared Effect code splits into chunks. V8 compiles a module's top level in one piece: the
 * parse of one 500 KB chunk took 12 MB of C heap, which the allocator kept after the compile ended, so
 * every idle command carried it. Each boundary is an extra entry point importing some of Effect's largest
 * modules (importing, not using: it keeps no code alive). esbuild puts code in one chunk only when the same
 * entry points reach it, so Effect's code splits at these modules, into chunks of 200 KB at most. The
 * boundary entries are deleted after the build, with any other output no command can load.
 */
const chunkBoundaries: Record<string, ReadonlyArray<string>> = {
  schema: ["Schema.js"],
  schemaAst: ["SchemaAST.js"],
  core: ["internal/effect.js"],
  stream: ["Stream.js", "Channel.js"],
  pubsub: ["PubSub.js", "Queue.js"]
}
const chunkBoundaryPlugin: esbuild.Plugin = {
  name: "chunk-boundaries",
  setup(build) {
    build.onResolve({ filter: /^chunk-boundary:/ }, (args) => ({ path: args.path.slice("chunk-boundary:".length), namespace: "chunk-boundary" }))
    build.onLoad({ filter: /.*/, namespace: "chunk-boundary" }, (args) => ({
      contents: chunkBoundaries[args.path]!.map((file, i) => `import * as m${i} from ${JSON.stringify(path.join(root, "node_modules/effect/dist", file))}`).join("\n"),
      loader: "js",
      resolveDir: root
    }))
  }
}

const cli = await esbuild.build({
  absWorkingDir: root,
  entryPoints: {
    switchyard: "src/runtime/main.ts",
    ...Object.fromEntries(Object.keys(chunkBoundaries).map((name) => [`boundary-${name}`, `chunk-boundary:${name}`]))
  },
  plugins: [builtinsByGetBuiltinModule, yamlAsEsm, chunkBoundaryPlugin],
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
  metafile: true,
  logLevel: "warning"
})

// Only what the command can load stays: the outputs reachable from its entry, by static or dynamic import.
const loadable = new Set<string>()
const reach = (output: string) => {
  if (loadable.has(output)) return
  loadable.add(output)
  for (const i of cli.metafile.outputs[output]!.imports) if (!i.external) reach(i.path)
}
reach("dist/cli/switchyard.mjs")
for (const output of Object.keys(cli.metafile.outputs)) {
  if (output.endsWith(".mjs") && !loadable.has(output)) for (const file of [output, `${output}.map`]) fs.rmSync(path.join(root, file), { force: true })
}
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
