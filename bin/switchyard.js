#!/usr/bin/env node
// The switchyard command. Needs Node >= 22.19 (TypeScript sources run through Node's type stripping).
import "../src/runtime/main.ts"
