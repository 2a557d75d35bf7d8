#!/usr/bin/env -S node --max-semi-space-size=8
// The switchyard command (Node >= 22.19). An installed package runs its compiled `dist/`; a checkout
// runs the TypeScript sources directly through Node's type stripping.
const installed = import.meta.url.includes("/node_modules/")
const entry = installed ? "../dist/runtime/main.js" : "../src/runtime/main.ts"
await import(new URL(entry, import.meta.url).href)
