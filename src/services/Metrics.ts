/**
 * switchyard's metric families on Effect's `Metric`, and the registry that makes them: every family is
 * a counter, gauge or histogram of `effect/Metric` kept in a `Metric.MetricRegistry` of its own, and
 * `render` is `PrometheusMetrics` (text exposition format 0.0.4). What stays here: label sets are named
 * and bounded (each label keeps at most `maxLabelValues` distinct values, later ones are counted under
 * `other`), a family resolves a child once, ahead of the hot path, and sampled gauges are read right
 * before rendering. It does not push anywhere nor keep history; the admin endpoint renders it on each scrape.
 */
import { Context, Layer, Metric } from "effect"
import { PrometheusMetrics } from "effect/observability"

/** Content type of the exposition `render` returns (the one `PrometheusMetrics.layerHttp` serves). */
export const ExpositionContentType = "text/plain; version=0.0.4; charset=utf-8"
/** Distinct values one label keeps by default before folding new ones into `OverflowLabelValue`. */
export const DefaultMaxLabelValues = 64
/** The value that stands for every label value beyond a label's limit. */
export const OverflowLabelValue = "other"
/** Default histogram bounds for durations, in seconds. */
export const DurationBucketsSeconds: ReadonlyArray<number> = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
/** Most metric families one registry holds (a misbehaving embedder cannot grow it without bound). */
export const MaxFamilies = 512

// names `PrometheusMetrics` renders as given: it would rewrite a leading colon, `__` and a trailing `_`
const MetricName = /^[a-zA-Z_][a-zA-Z0-9_:]*$/
const LabelName = /^[a-zA-Z_][a-zA-Z0-9_]*$/
/** `le` is the bucket label; `PrometheusMetrics` leaves `unit` and `time_unit` out of the exposition. */
const ReservedLabelNames: ReadonlySet<string> = new Set(["le", "unit", "time_unit"])

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

/** A metric name, label name or bucket list that cannot be rendered as given. */
export class MetricDefinitionError extends Error {
  override readonly name = "MetricDefinitionError"
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

/** The attributes of a series: label names to (bounded) values, in `labelNames` order. */
const attributesOf = (labelNames: ReadonlyArray<string>, values: ReadonlyArray<string>): Record<string, string> => {
  const attributes: Record<string, string> = {}
  for (let i = 0; i < labelNames.length; i++) attributes[labelNames[i]!] = values[i]!
  return attributes
}

const validate = <L extends string>(options: FamilyOptions<L>): ReadonlyArray<L> => {
  const name = options.name
  if (!MetricName.test(name) || name.includes("__") || name.endsWith("_")) throw new MetricDefinitionError(`bad metric name "${name}"`)
  const labelNames = options.labelNames ?? []
  for (const l of labelNames) {
    if (!LabelName.test(l) || l.includes("__") || ReservedLabelNames.has(l)) throw new MetricDefinitionError(`bad label name "${l}" on ${name}`)
  }
  return labelNames
}

const requireTotal = (name: string): void => {
  if (!name.endsWith("_total")) throw new MetricDefinitionError(`counter ${name} must end in _total`)
}

/** A family whose children are created on first use and kept, keyed by their (bounded) label tuple. */
const makeFamily = <L extends string, C>(
  options: FamilyOptions<L>,
  labelNames: ReadonlyArray<L>,
  create: (attributes: Record<string, string>) => C
): Family<L, C> => {
  const bound = makeLabelBounds(labelNames.length, options.maxLabelValues ?? DefaultMaxLabelValues)
  const children = new Map<string, C>()
  const labels = (...values: ReadonlyArray<string>): C => {
    const hit = children.get(values.join("\u0000"))
    if (hit !== undefined) return hit
    const bounded = bound(values)
    const key = bounded.join("\u0000")
    let child = children.get(key)
    if (child === undefined) children.set(key, child = create(attributesOf(labelNames, bounded)))
    return child
  }
  // a family without labels has its one series from the start
  if (labelNames.length === 0) labels()
  return { name: options.name, labelNames, labels }
}

const noUpdate = (): void => {}

/** What the last scrape read for one series of a sampled gauge; the series' `get` reads it. */
interface SampledCell {
  value: number
}
/** One series of a sampled gauge, registered with Effect until a scrape no longer yields it. */
interface SampledRow {
  readonly cell: SampledCell
  readonly registration: Metric.Registration
}

export interface MetricRegistry {
  /** Where the series live (a `Metric.MetricRegistry` of this registry's own), for `Metric` and `PrometheusMetrics` APIs. */
  readonly context: Context.Context<never>
  readonly counter: <L extends string>(options: FamilyOptions<L>) => Family<L, CounterChild>
  readonly gauge: <L extends string>(options: FamilyOptions<L>) => Family<L, GaugeChild>
  readonly histogram: <L extends string>(options: FamilyOptions<L> & { readonly buckets?: ReadonlyArray<number> | undefined }) => Family<L, HistogramChild>
  /** A gauge read at scrape time (from a live count such as sessions or routes); returns a remover. */
  readonly sampledGauge: <L extends string>(options: SampledGaugeOptions<L>) => () => void
  /** Reads the sampled gauges, then renders every series with `PrometheusMetrics`. */
  readonly render: () => string
}

/** A new, empty registry. */
export const makeRegistry = (): MetricRegistry => {
  const context: Context.Context<never> = Context.make(Metric.MetricRegistry, new Map())
  const families = new Set<string>()
  /** Reads each sampled family into its series, by family name. */
  const samplers = new Map<string, () => void>()
  const claim = (name: string) => {
    if (families.has(name)) throw new MetricDefinitionError(`metric ${name} is already registered`)
    if (families.size >= MaxFamilies) throw new MetricDefinitionError(`more than ${MaxFamilies} metric families`)
    families.add(name)
  }

  const counter = <L extends string>(options: FamilyOptions<L>): Family<L, CounterChild> => {
    const labelNames = validate(options)
    requireTotal(options.name)
    claim(options.name)
    return makeFamily(options, labelNames, (attributes) => {
      const metric = Metric.counter(options.name, { description: options.help, attributes, incremental: true })
      // the series is rendered (at 0) from the moment its child exists
      metric.valueUnsafe(context)
      return {
        inc: (amount = 1) => metric.updateUnsafe(amount, context),
        value: () => metric.valueUnsafe(context).count
      }
    })
  }

  const gauge = <L extends string>(options: FamilyOptions<L>): Family<L, GaugeChild> => {
    const labelNames = validate(options)
    claim(options.name)
    return makeFamily(options, labelNames, (attributes) => {
      const metric = Metric.gauge(options.name, { description: options.help, attributes })
      metric.valueUnsafe(context)
      return {
        set: (value: number) => metric.updateUnsafe(value, context),
        inc: (amount = 1) => metric.modifyUnsafe(amount, context),
        dec: (amount = 1) => metric.modifyUnsafe(-amount, context),
        value: () => metric.valueUnsafe(context).value
      }
    })
  }

  const histogram = <L extends string>(
    options: FamilyOptions<L> & { readonly buckets?: ReadonlyArray<number> | undefined }
  ): Family<L, HistogramChild> => {
    const labelNames = validate(options)
    const boundaries = options.buckets ?? DurationBucketsSeconds
    for (let i = 1; i < boundaries.length; i++) {
      if (!(boundaries[i]! > boundaries[i - 1]!)) throw new MetricDefinitionError(`buckets of ${options.name} must increase`)
    }
    claim(options.name)
    return makeFamily(options, labelNames, (attributes) => {
      const metric = Metric.histogram(options.name, { description: options.help, attributes, boundaries })
      metric.valueUnsafe(context)
      return {
        observe: (value: number) => metric.updateUnsafe(value, context),
        count: () => metric.valueUnsafe(context).count,
        sum: () => metric.valueUnsafe(context).sum
      }
    })
  }

  const sampledGauge = <L extends string>(options: SampledGaugeOptions<L>): () => void => {
    const labelNames = validate(options)
    const isCounter = options.type === "counter"
    if (isCounter) requireTotal(options.name)
    claim(options.name)
    const maxValues = options.maxLabelValues ?? DefaultMaxLabelValues
    const register = (bounded: ReadonlyArray<string>, cell: SampledCell): Metric.Registration => {
      const attributes = attributesOf(labelNames, bounded)
      return isCounter
        ? Metric.registerUnsafe(Metric.counter(options.name, { description: options.help, attributes, incremental: true }), context, {
          get: () => ({ count: cell.value, incremental: true }),
          update: noUpdate,
          modify: noUpdate
        })
        : Metric.registerUnsafe(Metric.gauge(options.name, { description: options.help, attributes }), context, {
          get: () => ({ value: cell.value }),
          update: noUpdate,
          modify: noUpdate
        })
    }
    let rows = new Map<string, SampledRow>()
    const sample = () => {
      // bounded per scrape (what is live now), not over the process's life; values folded into
      // `other` are summed, so the total stays right
      const bound = makeLabelBounds(labelNames.length, maxValues)
      const next = new Map<string, SampledRow>()
      for (const [values, value] of options.collect()) {
        const bounded = bound(values)
        const key = bounded.join("\u0000")
        const seen = next.get(key)
        if (seen !== undefined) {
          seen.cell.value += value
          continue
        }
        let row = rows.get(key)
        if (row === undefined) {
          const cell = { value }
          row = { cell, registration: register(bounded, cell) }
        } else row.cell.value = value
        next.set(key, row)
      }
      for (const [key, row] of rows) if (!next.has(key)) row.registration.remove()
      rows = next
    }
    samplers.set(options.name, sample)
    return () => {
      if (samplers.get(options.name) !== sample) return
      samplers.delete(options.name)
      families.delete(options.name)
      for (const row of rows.values()) row.registration.remove()
      rows = new Map()
    }
  }

  const render = (): string => {
    for (const sample of samplers.values()) sample()
    return PrometheusMetrics.formatUnsafe(context)
  }

  return { context, counter, gauge, histogram, sampledGauge, render }
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
