/**
 * A small Prometheus registry (counters, gauges, histograms; text exposition format 0.0.4) and the
 * `Metrics` service holding switchyard's own metric families. Label sets are named and bounded: each
 * label keeps at most `maxLabelValues` distinct values, later ones are counted under `other`.
 * It does not push anywhere nor keep history; the admin endpoint renders it on each scrape.
 */
import { Context, Layer } from "effect"

/** Content type of the exposition format rendered by `MetricRegistry.render`. */
export const ExpositionContentType = "text/plain; version=0.0.4; charset=utf-8"
/** Distinct values one label keeps by default before folding new ones into `OverflowLabelValue`. */
export const DefaultMaxLabelValues = 64
/** The value that stands for every label value beyond a label's limit. */
export const OverflowLabelValue = "other"
/** Default histogram bounds for durations, in seconds. */
export const DurationBucketsSeconds: ReadonlyArray<number> = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
/** Most metric families one registry holds (a misbehaving embedder cannot grow it without bound). */
export const MaxFamilies = 512

const MetricName = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/
const LabelName = /^[a-zA-Z_][a-zA-Z0-9_]*$/

/** One labelled child of a counter. */
export interface CounterChild {
  readonly inc: (amount?: number) => void
  readonly value: () => number
}
/** One labelled child of a gauge. */
export interface GaugeChild {
  readonly set: (value: number) => void
  readonly inc: (amount?: number) => void
  readonly dec: (amount?: number) => void
  readonly value: () => number
}
/** One labelled child of a histogram. */
export interface HistogramChild {
  readonly observe: (value: number) => void
  readonly count: () => number
  readonly sum: () => number
}

/** A family: `labels(...)` resolves (once, ahead of the hot path) the child for a label tuple. */
export interface Family<L extends string, C> {
  readonly name: string
  readonly labelNames: ReadonlyArray<L>
  /** The child for these label values, in `labelNames` order; values past the limit become `other`. */
  readonly labels: (...values: ReadonlyArray<string>) => C
}

export interface FamilyOptions<L extends string> {
  readonly name: string
  readonly help: string
  readonly labelNames?: ReadonlyArray<L> | undefined
  /** Distinct values per label (default `DefaultMaxLabelValues`). */
  readonly maxLabelValues?: number | undefined
}

/** A gauge (or a counter kept elsewhere) sampled at scrape time: `collect` yields (label values, value) pairs. */
export interface SampledGaugeOptions<L extends string> extends FamilyOptions<L> {
  readonly collect: () => Iterable<readonly [ReadonlyArray<string>, number]>
  /** `counter` when the sampled value only grows (its name must then end in `_total`); default `gauge`. */
  readonly type?: "gauge" | "counter" | undefined
}

/** A metric name, label name or bucket list that cannot be rendered. */
export class MetricDefinitionError extends Error {
  override readonly name = "MetricDefinitionError"
}

interface Rendered {
  readonly name: string
  readonly help: string
  readonly type: "counter" | "gauge" | "histogram"
  readonly render: (out: Array<string>) => void
}

const escapeLabel = (value: string): string => value.replace(/\\/g, "\\\\").replace(/"/g, "\\\"").replace(/\n/g, "\\n")
const escapeHelp = (value: string): string => value.replace(/\\/g, "\\\\").replace(/\n/g, "\\n")
const formatNumber = (n: number): string =>
  Number.isNaN(n) ? "NaN" : n === Infinity ? "+Inf" : n === -Infinity ? "-Inf" : String(n)

const labelText = (names: ReadonlyArray<string>, values: ReadonlyArray<string>, extra?: string): string => {
  const parts: Array<string> = []
  for (let i = 0; i < names.length; i++) parts.push(`${names[i]}="${escapeLabel(values[i]!)}"`)
  if (extra !== undefined) parts.push(extra)
  return parts.length === 0 ? "" : `{${parts.join(",")}}`
}

/** Folds label values into bounded sets, per label. */
const makeLabelBounds = (labelCount: number, maxValues: number) => {
  const seen: Array<Set<string>> = Array.from({ length: labelCount }, () => new Set())
  return (values: ReadonlyArray<string>): Array<string> => {
    const out: Array<string> = []
    for (let i = 0; i < labelCount; i++) {
      const v = values[i] ?? ""
      const set = seen[i]!
      if (set.has(v)) out.push(v)
      else if (set.size < maxValues) {
        set.add(v)
        out.push(v)
      } else out.push(OverflowLabelValue)
    }
    return out
  }
}

const validate = <L extends string>(options: FamilyOptions<L>): ReadonlyArray<L> => {
  if (!MetricName.test(options.name)) throw new MetricDefinitionError(`bad metric name "${options.name}"`)
  const labelNames = options.labelNames ?? []
  for (const l of labelNames) {
    if (!LabelName.test(l) || l.startsWith("__") || l === "le") throw new MetricDefinitionError(`bad label name "${l}" on ${options.name}`)
  }
  return labelNames
}

/** Children keyed by their (bounded) label tuple. */
const makeChildren = <C>(labelCount: number, maxValues: number, create: (values: ReadonlyArray<string>) => C) => {
  const bound = makeLabelBounds(labelCount, maxValues)
  const children = new Map<string, { readonly values: ReadonlyArray<string>; readonly child: C }>()
  const get = (values: ReadonlyArray<string>): C => {
    const key = values.join("\u0000")
    const hit = children.get(key)
    if (hit !== undefined) return hit.child
    const bounded = bound(values)
    const boundedKey = bounded.join("\u0000")
    const existing = children.get(boundedKey)
    if (existing !== undefined) return existing.child
    const entry = { values: bounded, child: create(bounded) }
    children.set(boundedKey, entry)
    return entry.child
  }
  return { get, entries: () => children.values() }
}

export interface MetricRegistry {
  readonly counter: <L extends string>(options: FamilyOptions<L>) => Family<L, CounterChild>
  readonly gauge: <L extends string>(options: FamilyOptions<L>) => Family<L, GaugeChild>
  readonly histogram: <L extends string>(options: FamilyOptions<L> & { readonly buckets?: ReadonlyArray<number> | undefined }) => Family<L, HistogramChild>
  /** A gauge read at scrape time (from a live count such as sessions or routes); returns a remover. */
  readonly sampledGauge: <L extends string>(options: SampledGaugeOptions<L>) => () => void
  /** The exposition text of every family. */
  readonly render: () => string
}

/** A new, empty registry. */
export const makeRegistry = (): MetricRegistry => {
  const families = new Map<string, Rendered>()
  const add = (family: Rendered) => {
    if (families.has(family.name)) throw new MetricDefinitionError(`metric ${family.name} is already registered`)
    if (families.size >= MaxFamilies) throw new MetricDefinitionError(`more than ${MaxFamilies} metric families`)
    families.set(family.name, family)
  }

  const counter = <L extends string>(options: FamilyOptions<L>): Family<L, CounterChild> => {
    const labelNames = validate(options)
    if (!options.name.endsWith("_total")) throw new MetricDefinitionError(`counter ${options.name} must end in _total`)
    const children = makeChildren(labelNames.length, options.maxLabelValues ?? DefaultMaxLabelValues, () => {
      let v = 0
      return { inc: (amount = 1) => void (amount > 0 && (v += amount)), value: () => v }
    })
    add({
      name: options.name,
      help: options.help,
      type: "counter",
      render: (out) => {
        for (const { values, child } of children.entries()) out.push(`${options.name}${labelText(labelNames, values)} ${formatNumber(child.value())}`)
      }
    })
    if (labelNames.length === 0) children.get([])
    return { name: options.name, labelNames, labels: (...values) => children.get(values) }
  }

  const gauge = <L extends string>(options: FamilyOptions<L>): Family<L, GaugeChild> => {
    const labelNames = validate(options)
    const children = makeChildren(labelNames.length, options.maxLabelValues ?? DefaultMaxLabelValues, () => {
      let v = 0
      return {
        set: (value: number) => void (v = value),
        inc: (amount = 1) => void (v += amount),
        dec: (amount = 1) => void (v -= amount),
        value: () => v
      }
    })
    add({
      name: options.name,
      help: options.help,
      type: "gauge",
      render: (out) => {
        for (const { values, child } of children.entries()) out.push(`${options.name}${labelText(labelNames, values)} ${formatNumber(child.value())}`)
      }
    })
    if (labelNames.length === 0) children.get([])
    return { name: options.name, labelNames, labels: (...values) => children.get(values) }
  }

  const histogram = <L extends string>(
    options: FamilyOptions<L> & { readonly buckets?: ReadonlyArray<number> | undefined }
  ): Family<L, HistogramChild> => {
    const labelNames = validate(options)
    const buckets = [...(options.buckets ?? DurationBucketsSeconds)]
    for (let i = 1; i < buckets.length; i++) {
      if (!(buckets[i]! > buckets[i - 1]!)) throw new MetricDefinitionError(`buckets of ${options.name} must increase`)
    }
    const children = makeChildren(labelNames.length, options.maxLabelValues ?? DefaultMaxLabelValues, () => {
      const counts = new Float64Array(buckets.length)
      let count = 0
      let sum = 0
      return {
        observe: (value: number) => {
          count++
          sum += value
          // counts are per bucket here and made cumulative when rendered
          for (let i = 0; i < buckets.length; i++) {
            if (value <= buckets[i]!) {
              counts[i]!++
              break
            }
          }
        },
        count: () => count,
        sum: () => sum,
        counts
      }
    })
    add({
      name: options.name,
      help: options.help,
      type: "histogram",
      render: (out) => {
        for (const { values, child } of children.entries()) {
          let cumulative = 0
          for (let i = 0; i < buckets.length; i++) {
            cumulative += child.counts[i]!
            out.push(`${options.name}_bucket${labelText(labelNames, values, `le="${formatNumber(buckets[i]!)}"`)} ${cumulative}`)
          }
          out.push(`${options.name}_bucket${labelText(labelNames, values, `le="+Inf"`)} ${child.count()}`)
          out.push(`${options.name}_sum${labelText(labelNames, values)} ${formatNumber(child.sum())}`)
          out.push(`${options.name}_count${labelText(labelNames, values)} ${child.count()}`)
        }
      }
    })
    if (labelNames.length === 0) children.get([])
    return { name: options.name, labelNames, labels: (...values) => children.get(values) }
  }

  const sampledGauge = <L extends string>(options: SampledGaugeOptions<L>): () => void => {
    const labelNames = validate(options)
    const type = options.type ?? "gauge"
    if (type === "counter" && !options.name.endsWith("_total")) throw new MetricDefinitionError(`counter ${options.name} must end in _total`)
    const maxValues = options.maxLabelValues ?? DefaultMaxLabelValues
    const family: Rendered = {
      name: options.name,
      help: options.help,
      type,
      render: (out) => {
        // bounded per scrape (what is live now), not over the process's life; values folded into
        // `other` are summed, so the total stays right
        const bound = makeLabelBounds(labelNames.length, maxValues)
        const rows = new Map<string, { values: ReadonlyArray<string>; value: number }>()
        for (const [values, value] of options.collect()) {
          const bounded = bound(values)
          const key = bounded.join("\u0000")
          const row = rows.get(key)
          if (row === undefined) rows.set(key, { values: bounded, value })
          else row.value += value
        }
        for (const { values, value } of rows.values()) out.push(`${options.name}${labelText(labelNames, values)} ${formatNumber(value)}`)
      }
    }
    add(family)
    return () => {
      if (families.get(options.name) === family) families.delete(options.name)
    }
  }

  const render = (): string => {
    const out: Array<string> = []
    for (const family of families.values()) {
      out.push(`# HELP ${family.name} ${escapeHelp(family.help)}`)
      out.push(`# TYPE ${family.name} ${family.type}`)
      family.render(out)
    }
    return out.length === 0 ? "" : out.join("\n") + "\n"
  }

  return { counter, gauge, histogram, sampledGauge, render }
}

/** The status class label of an HTTP status: `2xx`, `4xx`, ... */
export const statusClass = (status: number): string =>
  status >= 100 && status < 600 ? `${Math.floor(status / 100)}xx` : "other"

/** switchyard's metric families, registered once per process (or per embedded gateway). */
export interface MetricsShape {
  readonly registry: MetricRegistry
  /** Requests answered, by front door, route and status class. */
  readonly requests: Family<"front_door" | "route" | "status_class", CounterChild>
  /** Time from a request's arrival to its response's end, by front door and route. */
  readonly requestDuration: Family<"front_door" | "route", HistogramChild>
  /** Bytes received from public clients, by route. */
  readonly receivedBytes: Family<"route", CounterChild>
  /** Bytes sent to public clients, by route. */
  readonly sentBytes: Family<"route", CounterChild>
  /** Time a request waited for a backend or a stream slot, by front door. */
  readonly queueWait: Family<"front_door", HistogramChild>
  /** Tunnel handshakes and authentications refused, by front door and reason. */
  readonly rejections: Family<"front_door" | "reason", CounterChild>
  /** Protocol violations seen on tunnels, by front door and kind. */
  readonly protocolErrors: Family<"front_door" | "kind", CounterChild>
  /** Configuration reloads, by result (`applied`, `rejected`). */
  readonly reloads: Family<"result", CounterChild>
  /** Client connections refused or closed to keep a listener within its connection limits, by front door and reason. */
  readonly connectionLimits: Family<"front_door" | "reason", CounterChild>
  /** Tunnel sessions drained because their backend said GoAway, by front door. */
  readonly sessionDrains: Family<"front_door", CounterChild>
}

/** Registers switchyard's families on `registry`. */
export const makeMetrics = (registry: MetricRegistry = makeRegistry()): MetricsShape => ({
  registry,
  requests: registry.counter({
    name: "switchyard_requests_total",
    help: "Requests answered, by front door, route and status class.",
    labelNames: ["front_door", "route", "status_class"]
  }),
  requestDuration: registry.histogram({
    name: "switchyard_request_duration_seconds",
    help: "Time from a request's arrival to the end of its response.",
    labelNames: ["front_door", "route"]
  }),
  receivedBytes: registry.counter({
    name: "switchyard_received_bytes_total",
    help: "Bytes received from public clients (request heads and bodies), by route.",
    labelNames: ["route"]
  }),
  sentBytes: registry.counter({
    name: "switchyard_sent_bytes_total",
    help: "Bytes sent to public clients (response heads and bodies), by route.",
    labelNames: ["route"]
  }),
  queueWait: registry.histogram({
    name: "switchyard_queue_wait_seconds",
    help: "Time a request waited for a backend or a stream slot.",
    labelNames: ["front_door"]
  }),
  rejections: registry.counter({
    name: "switchyard_handshake_rejections_total",
    help: "Tunnel handshakes or authentications refused, by front door and reason.",
    labelNames: ["front_door", "reason"]
  }),
  protocolErrors: registry.counter({
    name: "switchyard_protocol_errors_total",
    help: "Protocol violations seen on tunnels, by front door and kind.",
    labelNames: ["front_door", "kind"]
  }),
  reloads: registry.counter({
    name: "switchyard_config_reloads_total",
    help: "Configuration reloads (SIGHUP), by result.",
    labelNames: ["result"]
  }),
  connectionLimits: registry.counter({
    name: "switchyard_connection_limit_closes_total",
    help: "Client connections refused or closed to keep a listener within its connection limits, by front door and reason.",
    labelNames: ["front_door", "reason"]
  }),
  sessionDrains: registry.counter({
    name: "switchyard_session_drains_total",
    help: "Tunnel sessions drained (no new requests, closed once idle) because their backend said GoAway, by front door.",
    labelNames: ["front_door"]
  })
})

export class Metrics extends Context.Service<Metrics, MetricsShape>()("switchyard/Metrics") {
  /** A fresh registry with switchyard's families. */
  static readonly layer: Layer.Layer<Metrics> = Layer.sync(Metrics, () => makeMetrics())
}
