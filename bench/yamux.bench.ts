/**
 * `npm run bench -- yamux`: yamux throughput, latency and per-stream memory, each against a baseline
 * measured in the same run (raw TCP on loopback, and hashicorp/yamux talking to itself).
 */
import { spawn } from "node:child_process"
import * as net from "node:net"
import { setFlagsFromString } from "node:v8"
import { runInNewContext } from "node:vm"
import { fromSocket } from "../src/runtime/NodeTransport.ts"
import { makeMemoryPair } from "../src/services/Transport.ts"
import { type NodeYamuxSession, startSession } from "../src/services/yamux/NodeSession.ts"
import type { StreamSocket } from "../src/services/yamux/StreamDuplex.ts"
import { yamuxPeer } from "../test/support/peers.ts"
import { freePort, mbps, now, quantile, report } from "./support.ts"

const SUITE = "yamux"
/** Bytes pushed through one stream (or one raw socket) per throughput run, and the time cap. */
const THROUGHPUT_BYTES = 512 * 1024 * 1024
const THROUGHPUT_MAX_MS = 3_000
const CHUNK = 64 * 1024
const MULTI_STREAMS = 16
const ECHO_SAMPLES = 3_000
const MEMORY_STREAMS = 10_000

const loopbackPair = async (): Promise<{ a: net.Socket; b: net.Socket; close: () => Promise<void> }> => {
  const server = net.createServer({ allowHalfOpen: true })
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r))
  const accepted = new Promise<net.Socket>((r) => server.once("connection", r))
  const a = net.connect({ port: (server.address() as net.AddressInfo).port, host: "127.0.0.1", allowHalfOpen: true })
  await new Promise((r) => a.once("connect", r))
  const b = await accepted
  a.setNoDelay(true)
  b.setNoDelay(true)
  return {
    a,
    b,
    close: async () => {
      a.destroy()
      b.destroy()
      await new Promise((r) => server.close(r))
    }
  }
}

const yamuxPair = async () => {
  const { a, b, close } = await loopbackPair()
  const client = await startSession(fromSocket(a), { role: "client" })
  const server = await startSession(fromSocket(b), { role: "server" })
  return {
    client,
    server,
    close: async () => {
      await client.close()
      await server.close()
      await close()
    }
  }
}

/** Writes until `bytes` or the time cap, honouring backpressure; resolves with bytes written. */
const pump = (w: NodeJS.WritableStream, bytes: number, deadline: number): Promise<number> =>
  new Promise((resolve) => {
    const chunk = Buffer.alloc(CHUNK, 0x5a)
    let sent = 0
    const go = () => {
      while (sent < bytes && now() < deadline) {
        sent += chunk.length
        if (!w.write(chunk)) return void w.once("drain", go)
      }
      w.end()
      resolve(sent)
    }
    go()
  })

const drain = (r: NodeJS.ReadableStream): Promise<number> =>
  new Promise((resolve, reject) => {
    let n = 0
    r.on("data", (d: Buffer) => (n += d.length))
    r.once("end", () => resolve(n))
    r.once("error", reject)
  })

/** Throughput of `streams` parallel senders from `open()` into `accept()`, in MB/s. */
const streamThroughput = async (
  open: () => NodeJS.WritableStream,
  accept: () => Promise<NodeJS.ReadableStream>,
  streams: number
): Promise<number> => {
  const start = now()
  const deadline = start + THROUGHPUT_MAX_MS
  const per = Math.floor(THROUGHPUT_BYTES / streams)
  const jobs = Array.from({ length: streams }, async () => {
    const w = open()
    const r = await accept()
    const [, got] = await Promise.all([pump(w, per, deadline), drain(r)])
    return got
  })
  const total = (await Promise.all(jobs)).reduce((a, b) => a + b, 0)
  return mbps(total, now() - start)
}

const rawThroughput = async (): Promise<number> => {
  const { a, b, close } = await loopbackPair()
  try {
    return await streamThroughput(() => a, async () => b, 1)
  } finally {
    await close()
  }
}

const yamuxThroughput = async (streams: number): Promise<number> => {
  const { client, server, close } = await yamuxPair()
  try {
    const accepted: Array<StreamSocket> = []
    const waiting: Array<(s: StreamSocket) => void> = []
    server.onSocket((s) => {
      const w = waiting.shift()
      if (w) w(s)
      else accepted.push(s)
    })
    const accept = () =>
      new Promise<StreamSocket>((r) => {
        const s = accepted.shift()
        if (s) r(s)
        else waiting.push(r)
      })
    return await streamThroughput(() => client.openSocket(), accept, streams)
  } finally {
    await close()
  }
}

/** 1-byte ping-pong round trips in microseconds. */
const echoLatency = async (a: NodeJS.ReadWriteStream, b: NodeJS.ReadWriteStream): Promise<Array<number>> => {
  b.on("data", (d: Buffer) => b.write(d))
  // the run ends by destroying one end (an RST for yamux): not an error here
  b.on("error", () => {})
  const samples: Array<number> = []
  const one = Buffer.from([1])
  for (let i = 0; i < ECHO_SAMPLES; i++) {
    const t = now()
    await new Promise<void>((resolve) => {
      a.once("data", () => resolve())
      a.write(one)
    })
    samples.push((now() - t) * 1000)
  }
  return samples
}

const gc = (): void => {
  setFlagsFromString("--expose-gc")
  const collect = runInNewContext("gc") as () => void
  collect()
  collect()
}

/** Heap bytes per concurrently open stream (both ends of the session are in this process: per side). */
const streamMemory = async (): Promise<number> => {
  const [a, b] = makeMemoryPair()
  const client = await startSession(a, { role: "client", config: { enableKeepAlive: false } })
  const server = await startSession(b, { role: "server", config: { enableKeepAlive: false } })
  const held: Array<unknown> = []
  server.onSocket((s) => {
    s.on("error", () => {}) // the resets at the end arrive as errors, like ECONNRESET
    held.push(s)
  })
  const opened: Array<StreamSocket> = []
  gc()
  const before = process.memoryUsage().heapUsed
  for (let i = 0; i < MEMORY_STREAMS; i++) {
    opened.push(client.openSocket())
    if (i % 200 === 199) await new Promise((r) => setImmediate(r))
  }
  while (held.length < MEMORY_STREAMS) await new Promise((r) => setImmediate(r))
  gc()
  const after = process.memoryUsage().heapUsed
  if (client.streamCount() !== MEMORY_STREAMS) throw new Error(`only ${client.streamCount()} streams open`)
  const perSide = (after - before) / MEMORY_STREAMS / 2
  for (const s of opened) s.destroy()
  await client.close()
  await server.close()
  return perSide
}

const runPeer = (bin: string, args: ReadonlyArray<string>) => {
  const child = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"] })
  let out = ""
  let err = ""
  child.stdout.on("data", (d) => (out += d))
  child.stderr.on("data", (d) => (err += d))
  const ready = new Promise<void>((r) => {
    const check = () => (err.includes("listening") ? r() : undefined)
    child.stderr.on("data", check)
  })
  const exit = new Promise<string>((resolve, reject) =>
    child.once("exit", (code) => (code === 0 ? resolve(out) : reject(new Error(`yamuxpeer failed: ${err}${out}`))))
  )
  exit.catch(() => {}) // killed on purpose when no longer needed
  return { child, ready, exit, kill: () => child.kill("SIGKILL") }
}

const GO_ROUNDS = 4
const GO_LOAD = ["-n", "16", "-size", String(4 * 1024 * 1024), "-rounds", String(GO_ROUNDS)]
const goRate = (stdout: string): number => Number(/\(([\d.]+) MB\/s each way\)/.exec(stdout)?.[1] ?? Number.NaN)

/** Go client load against our echo server; Go reports MB/s each way. */
const goAgainstUs = async (bin: string): Promise<number> => {
  const listener = net.createServer({ allowHalfOpen: true })
  await new Promise<void>((r) => listener.listen(0, "127.0.0.1", r))
  const sessions: Array<NodeYamuxSession> = []
  listener.on("connection", async (socket) => {
    const s = await startSession(fromSocket(socket), { role: "server" })
    sessions.push(s)
    s.onSocket((st) => st.pipe(st))
  })
  const port = (listener.address() as net.AddressInfo).port
  const peer = runPeer(bin, ["-dial", `127.0.0.1:${port}`, "-yamux", "client", "-act", "load", ...GO_LOAD])
  try {
    return goRate(await peer.exit)
  } finally {
    for (const s of sessions) await s.close()
    await new Promise((r) => listener.close(r))
  }
}

/** Our client load against the Go echo server, same shape as the Go load, MB/s each way. */
const usAgainstGo = async (bin: string): Promise<number> => {
  const port = await freePort()
  const peer = runPeer(bin, ["-listen", `127.0.0.1:${port}`, "-yamux", "server", "-act", "echo"])
  await peer.ready
  const socket = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true })
  await new Promise((r) => socket.once("connect", r))
  const session = await startSession(fromSocket(socket), { role: "client" })
  try {
    const size = 4 * 1024 * 1024
    const payload = Buffer.alloc(size, 0x33)
    const start = now()
    for (let round = 0; round < GO_ROUNDS; round++) {
      await Promise.all(Array.from({ length: 16 }, async () => {
        const st = session.openSocket()
        const got = new Promise<number>((resolve) => {
          let n = 0
          st.on("data", (d: Buffer) => {
            n += d.length
            if (n >= size) resolve(n)
          })
        })
        st.write(payload)
        await got
        st.end()
        await new Promise((r) => st.once("close", r).resume())
      }))
    }
    return mbps(GO_ROUNDS * 16 * size, now() - start)
  } finally {
    await session.close()
    peer.kill()
  }
}

/** hashicorp/yamux against itself, same load. */
const goAgainstGo = async (bin: string): Promise<number> => {
  const port = await freePort()
  const server = runPeer(bin, ["-listen", `127.0.0.1:${port}`, "-yamux", "server", "-act", "echo"])
  await server.ready
  const client = runPeer(bin, ["-dial", `127.0.0.1:${port}`, "-yamux", "client", "-act", "load", ...GO_LOAD])
  try {
    return goRate(await client.exit)
  } finally {
    server.kill()
  }
}

/** Runs each measurement REPEATS times, interleaved, and keeps the median of each (the machine is shared). */
const REPEATS = 3
const medians = async (fs: ReadonlyArray<() => Promise<number>>): Promise<Array<number>> => {
  const runs: Array<Array<number>> = fs.map(() => [])
  for (let r = 0; r < REPEATS; r++) {
    for (const [i, f] of fs.entries()) runs[i]!.push(await f())
  }
  return runs.map((xs) => quantile(xs, 0.5))
}

export const run = async (): Promise<void> => {
  const [raw, single, multi] = await medians([rawThroughput, () => yamuxThroughput(1), () => yamuxThroughput(MULTI_STREAMS)])
  report(SUITE, "raw_tcp_throughput", raw!, "MB/s")
  report(SUITE, "single_stream_throughput", single!, "MB/s")
  report(SUITE, "single_stream_vs_raw_tcp", single! / raw!, "ratio")
  report(SUITE, "streams16_throughput", multi!, "MB/s")

  const probe = yamuxPeer()
  if (probe.value) {
    const bin = probe.value
    // one unreported round each way first, so JIT warm-up is not counted against either side
    await goAgainstUs(bin)
    await usAgainstGo(bin)
    const [goUs, usGo, goGo] = await medians([() => goAgainstUs(bin), () => usAgainstGo(bin), () => goAgainstGo(bin)])
    report(SUITE, "go_client_to_our_server", goUs!, "MB/s")
    report(SUITE, "our_client_to_go_server", usGo!, "MB/s")
    report(SUITE, "go_to_go", goGo!, "MB/s")
    report(SUITE, "go_client_to_our_server_vs_go_to_go", goUs! / goGo!, "ratio")
    report(SUITE, "our_client_to_go_server_vs_go_to_go", usGo! / goGo!, "ratio")
  } else {
    process.stderr.write(`yamux bench: Go peer unavailable (${probe.reason}); Go figures skipped\n`)
  }

  report(SUITE, "memory_per_stream", await streamMemory(), "bytes")

  const rawPair = await loopbackPair()
  const rawEcho = await echoLatency(rawPair.a, rawPair.b)
  await rawPair.close()
  const y = await yamuxPair()
  const acc = y.server.acceptSocket()
  const st = y.client.openSocket()
  const yEcho = await echoLatency(st, await acc)
  st.destroy()
  await y.close()
  report(SUITE, "echo_rtt_p50", quantile(yEcho, 0.5), "us")
  report(SUITE, "echo_rtt_p99", quantile(yEcho, 0.99), "us")
  report(SUITE, "raw_tcp_echo_rtt_p50", quantile(rawEcho, 0.5), "us")
  report(SUITE, "raw_tcp_echo_rtt_p99", quantile(rawEcho, 0.99), "us")
}
