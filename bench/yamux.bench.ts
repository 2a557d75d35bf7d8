/**
 * `npm run bench -- yamux`: yamux throughput and latency between two processes on loopback, each against
 * a baseline measured in the same run (raw TCP between the same two kinds of process, and hashicorp/yamux
 * talking to itself), and memory per stream. Our side of every path runs in its own process (this file,
 * started with a role): a `sender` that dials and drives the streams when the bench tells it to on stdin,
 * and a `receiver` that accepts and drains (`sink`) or echoes them; the Go peer is a process of its own.
 * Figures: MB/s and ratio per path, each of our processes' CPU per 100 MiB and RSS idle and peak, echo
 * round trips, and heap per open stream (both ends in the bench process: a memory figure, not a rate).
 */
import * as net from "node:net"
import { createInterface } from "node:readline"
import { setFlagsFromString } from "node:v8"
import { runInNewContext } from "node:vm"
import { fromSocket } from "../src/runtime/NodeTransport.ts"
import { makeMemoryPair } from "../src/services/Transport.ts"
import { type NodeYamuxSession, startSession } from "../src/services/yamux/NodeSession.ts"
import type { StreamSocket } from "../src/services/yamux/StreamDuplex.ts"
import { yamuxPeer } from "../test/support/peers.ts"
import { announce, type BenchProcess, closeOnSignal, RoleVariable, startProcess, startRole, stopAll } from "./roles.ts"
import { freePort, meterPath, note, type PathMeter, quantile, report } from "./support.ts"

const suite = "yamux"
/** Bytes pushed per throughput run (over all its streams), and the time cap. */
const throughputBytes = 512 * 1024 * 1024
const throughputMaxMs = 3_000
const chunkBytes = 64 * 1024
const multiStreams = 16
const echoSamples = 3_000
const memoryStreams = 10_000
/** The Go-shaped load: streams per round, bytes each way per stream, rounds. */
const goStreams = 16
const goSize = 4 * 1024 * 1024
const goRounds = 4
/** Interleaved repeats of each measurement (the median is reported; the machine is shared). */
const repeats = 3

// ---------------------------------------------------------------------------------------------------
// Roles: our two sides, each alone in its process.

type Transport = "raw" | "yamux"

/** A duplex the roles treat alike: a TCP socket, or a yamux stream as a socket. */
type Pipe = net.Socket | StreamSocket

const drainThenEnd = (s: Pipe) => {
  s.on("error", () => {})
  s.on("end", () => s.end())
  s.resume()
}
const echo = (s: Pipe) => {
  s.on("error", () => {})
  s.pipe(s)
}

/** Accepts connections (raw) or streams (yamux) on a loopback port, and drains or echoes each. */
const receiverMain = async (transport: Transport, mode: "sink" | "echo") => {
  const serve = mode === "sink" ? drainThenEnd : echo
  const sessions: Array<NodeYamuxSession> = []
  const server = net.createServer({ allowHalfOpen: true, noDelay: true }, async (socket) => {
    if (transport === "raw") return serve(socket)
    const session = await startSession(fromSocket(socket), { role: "server" })
    sessions.push(session)
    session.onSocket(serve)
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  announce("port", (server.address() as net.AddressInfo).port)
  announce("ready")
  closeOnSignal(async () => {
    for (const s of sessions) await s.close()
    server.close()
  })
}

const connect = async (port: number): Promise<net.Socket> => {
  const socket = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true, noDelay: true })
  await new Promise((resolve, reject) => socket.once("connect", resolve).once("error", reject))
  return socket
}

/** Writes `bytes` (or until `deadline`), ends, and resolves once the peer has ended too; bytes written. */
const pumpOne = (s: Pipe, bytes: number, deadline: number): Promise<number> =>
  new Promise((resolve, reject) => {
    const chunk = Buffer.alloc(chunkBytes, 0x5a)
    let sent = 0
    s.on("error", reject)
    s.on("end", () => resolve(sent))
    s.resume()
    const go = () => {
      while (sent < bytes && performance.now() < deadline) {
        sent += chunk.length
        if (!s.write(chunk)) return void s.once("drain", go)
      }
      s.end()
    }
    go()
  })

/** Writes `size` bytes and reads them back, then ends. */
const echoOne = (s: Pipe, payload: Buffer): Promise<void> =>
  new Promise((resolve, reject) => {
    let got = 0
    s.on("error", reject)
    s.on("data", (d: Buffer) => {
      got += d.length
      if (got >= payload.length) s.end()
    })
    s.on("end", () => resolve())
    s.write(payload)
  })

/** 1-byte ping-pong round trips on one stream, in microseconds. */
const roundTrips = async (s: Pipe, samples: number): Promise<Array<number>> => {
  const out: Array<number> = []
  const one = Buffer.from([1])
  for (let i = 0; i < samples; i++) {
    const t = performance.now()
    await new Promise<void>((resolve) => {
      s.once("data", () => resolve())
      s.write(one)
    })
    out.push((performance.now() - t) * 1000)
  }
  s.destroy()
  return out
}

/**
 * Dials the receiver at `port` (one yamux session for all commands; a TCP connection per stream when
 * raw) and runs the commands read from stdin, one `result …` line each: `pump <streams>` (MB/s),
 * `echo` (the Go-shaped load, MB/s each way), `rtt` (p50 and p99 in µs).
 */
const senderMain = async (transport: Transport, port: number) => {
  const session = transport === "yamux" ? await startSession(fromSocket(await connect(port)), { role: "client" }) : undefined
  const open = async (): Promise<Pipe> => session === undefined ? connect(port) : session.openSocket()
  const commands: Record<string, (arg: number) => Promise<string>> = {
    pump: async (streams) => {
      const start = performance.now()
      const per = Math.floor(throughputBytes / streams)
      const sent = await Promise.all(Array.from({ length: streams }, async () => pumpOne(await open(), per, start + throughputMaxMs)))
      const total = sent.reduce((a, b) => a + b, 0)
      return `${total} ${total / 1e6 / ((performance.now() - start) / 1000)}`
    },
    echo: async () => {
      const payload = Buffer.alloc(goSize, 0x33)
      const start = performance.now()
      for (let round = 0; round < goRounds; round++) {
        await Promise.all(Array.from({ length: goStreams }, async () => echoOne(await open(), payload)))
      }
      const total = goRounds * goStreams * goSize
      return `${total} ${total / 1e6 / ((performance.now() - start) / 1000)}`
    },
    rtt: async () => {
      const samples = await roundTrips(await open(), echoSamples)
      return `${quantile(samples, 0.5)} ${quantile(samples, 0.99)}`
    }
  }
  createInterface({ input: process.stdin }).on("line", (line) => {
    const [name, arg] = line.split(" ")
    void commands[name!]!(Number(arg)).then((r) => announce("result", r), (e: Error) => announce("failed", e.message))
  })
  announce("ready")
  closeOnSignal(async () => {
    await session?.close()
  })
}

const role = process.env[RoleVariable]
const transportOf = () => process.env.SWITCHYARD_YAMUX_BENCH_TRANSPORT as Transport
if (role === "yamux-receiver") await receiverMain(transportOf(), process.env.SWITCHYARD_YAMUX_BENCH_MODE as "sink" | "echo")
if (role === "yamux-sender") await senderMain(transportOf(), Number(process.env.SWITCHYARD_YAMUX_BENCH_PORT))

// ---------------------------------------------------------------------------------------------------
// Bench.

const file = import.meta.filename

const startReceiver = (transport: Transport, mode: "sink" | "echo") =>
  startRole(file, "yamux-receiver", { SWITCHYARD_YAMUX_BENCH_TRANSPORT: transport, SWITCHYARD_YAMUX_BENCH_MODE: mode }, "receiver")

const startSender = (transport: Transport, port: string | number) =>
  startRole(file, "yamux-sender", { SWITCHYARD_YAMUX_BENCH_TRANSPORT: transport, SWITCHYARD_YAMUX_BENCH_PORT: String(port) }, "sender")

/** Runs one command in a sender; its result fields. */
const command = async (sender: BenchProcess, line: string): Promise<Array<number>> => {
  const result = sender.nextLine(/^(result|failed) /)
  sender.send(line)
  const [kind, ...fields] = (await result).split(" ")
  if (kind === "failed") throw new Error(`${sender.name} ${line}: ${fields.join(" ")}`)
  return fields.map(Number)
}

/** A measured path: what to run once (bytes moved, MB/s), and the processes it is metered on. */
interface ThroughputPath {
  readonly name: string
  readonly meter: PathMeter
  readonly once: () => Promise<{ readonly bytes: number; readonly rate: number }>
}

/** Runs every path `repeats` times, interleaved, after one unmetered warm-up each; median MB/s per path. */
const medians = async (paths: ReadonlyArray<ThroughputPath>): Promise<Map<string, number>> => {
  const rates = new Map<string, Array<number>>(paths.map((p) => [p.name, []]))
  for (const p of paths) await p.meter.unmetered(p.once)
  for (let r = 0; r < repeats; r++) {
    for (const p of paths) rates.get(p.name)!.push((await p.meter.transfer(p.once, (d) => d.bytes)).rate)
  }
  return new Map([...rates].map(([name, rs]) => [name, quantile(rs, 0.5)]))
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
  for (let i = 0; i < memoryStreams; i++) {
    opened.push(client.openSocket())
    if (i % 200 === 199) await new Promise((r) => setImmediate(r))
  }
  while (held.length < memoryStreams) await new Promise((r) => setImmediate(r))
  gc()
  const after = process.memoryUsage().heapUsed
  if (client.streamCount() !== memoryStreams) throw new Error(`only ${client.streamCount()} streams open`)
  const perSide = (after - before) / memoryStreams / 2
  for (const s of opened) s.destroy()
  await client.close()
  await server.close()
  return perSide
}

/** The Go peer (`yamuxpeer`) as a process; resolves once it listens (server) or at once (client). */
const startGo = (bin: string, args: ReadonlyArray<string>, listens: boolean) =>
  startProcess("go", bin, args, { ready: listens ? /listening/ : () => Promise.resolve() })

const goLoadArgs = ["-n", String(goStreams), "-size", String(goSize), "-rounds", String(goRounds)]
const goRate = (output: string): number => Number(/\(([\d.]+) MB\/s each way\)/.exec(output)?.[1] ?? Number.NaN)

/** A Go load client against `port`: MB/s each way, once it has exited. */
const goLoad = async (bin: string, port: string | number): Promise<number> => {
  const client = await startGo(bin, ["-dial", `127.0.0.1:${port}`, "-yamux", "client", "-act", "load", ...goLoadArgs], false)
  const code = await new Promise<number | null>((resolve) =>
    client.child.exitCode !== null ? resolve(client.child.exitCode) : client.child.once("exit", resolve)
  )
  if (code !== 0) throw new Error(`yamuxpeer load failed:\n${client.output()}`)
  return goRate(client.output())
}

const throughput = async (started: Array<BenchProcess>): Promise<void> => {
  const pair = async (name: string, transport: Transport, streams: number): Promise<ThroughputPath> => {
    const receiver = await startReceiver(transport, "sink")
    started.push(receiver)
    const sender = await startSender(transport, await receiver.value("port"))
    started.push(sender)
    const meter = meterPath(suite, name, [sender, receiver])
    return { name, meter, once: async () => {
      const [bytes, rate] = await command(sender, `pump ${streams}`)
      return { bytes: bytes!, rate: rate! }
    } }
  }
  const paths = [await pair("raw_tcp", "raw", 1), await pair("one_stream", "yamux", 1), await pair("streams16", "yamux", multiStreams)]
  const rates = await medians(paths)
  const raw = rates.get("raw_tcp")!
  for (const p of paths) {
    report(suite, `${p.name}.MB_per_s`, rates.get(p.name)!, "MB/s")
    if (p.name !== "raw_tcp") report(suite, `${p.name}.ratio`, rates.get(p.name)! / raw, "x raw_tcp")
    p.meter.report()
  }
}

const interop = async (bin: string, started: Array<BenchProcess>): Promise<void> => {
  // Go's load client against our echo receiver; our sender's Go-shaped load against Go's echo server
  const receiver = await startReceiver("yamux", "echo")
  started.push(receiver)
  const receiverPort = await receiver.value("port")
  const goPort = await freePort()
  started.push(await startGo(bin, ["-listen", `127.0.0.1:${goPort}`, "-yamux", "server", "-act", "echo"], true))
  const sender = await startSender("yamux", goPort)
  started.push(sender)
  const moved = goRounds * goStreams * goSize
  const paths: Array<ThroughputPath> = [
    { name: "go_to_go", meter: meterPath(suite, "go_to_go", []), once: async () => ({ bytes: moved, rate: await goLoad(bin, goPort) }) },
    { name: "go_client_to_ours", meter: meterPath(suite, "go_client_to_ours", [receiver]), once: async () => ({ bytes: moved, rate: await goLoad(bin, receiverPort) }) },
    {
      name: "ours_to_go_server",
      meter: meterPath(suite, "ours_to_go_server", [sender]),
      once: async () => {
        const [bytes, rate] = await command(sender, "echo")
        return { bytes: bytes!, rate: rate! }
      }
    }
  ]
  const rates = await medians(paths)
  const goGo = rates.get("go_to_go")!
  for (const p of paths) {
    report(suite, `${p.name}.MB_per_s_each_way`, rates.get(p.name)!, "MB/s")
    if (p.name !== "go_to_go") report(suite, `${p.name}.ratio`, rates.get(p.name)! / goGo, "x go_to_go")
    p.meter.report()
  }
}

const latency = async (started: Array<BenchProcess>): Promise<void> => {
  for (const [name, transport] of [["raw_tcp", "raw"], ["yamux", "yamux"]] as const) {
    const receiver = await startReceiver(transport, "echo")
    started.push(receiver)
    const sender = await startSender(transport, await receiver.value("port"))
    started.push(sender)
    await command(sender, "rtt")
    const [p50, p99] = await command(sender, "rtt")
    report(suite, `${name}.echo_rtt_p50_us`, p50!, "us")
    report(suite, `${name}.echo_rtt_p99_us`, p99!, "us")
  }
}

export const run = async (): Promise<void> => {
  const started: Array<BenchProcess> = []
  try {
    await throughput(started)
    await stopAll(started.splice(0))
    const probe = yamuxPeer()
    if (probe.value !== undefined) {
      await interop(probe.value, started)
      await stopAll(started.splice(0))
    } else {
      note(suite, `Go peer unavailable (${probe.reason}); Go figures skipped`)
    }
    await latency(started)
  } finally {
    await stopAll(started)
  }
  report(suite, "memory_per_stream_bytes", await streamMemory(), "bytes")
}
