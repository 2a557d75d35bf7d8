import { describe, expect, it } from "@effect/vitest"
import { Effect, Metric, Schema } from "effect"
import {
  DefaultMaxLabelValues,
  DurationBucketsSeconds,
  makeMetrics,
  makeRegistry,
  MetricDefinitionError,
  OverflowLabelValue,
  statusClass
} from "../../src/services/Metrics.ts"

const lines = (text: string) => text.split("\n").filter((l) => l.length > 0)
/** The sample lines of an exposition (no `# HELP` / `# TYPE`). */
const samples = (text: string) => lines(text).filter((l) => !l.startsWith("#"))

describe("MetricRegistry", () => {
  it("renders counters, gauges and histograms in the 0.0.4 text format", () => {
    const r = makeRegistry()
    const c = r.counter({ name: "t_requests_total", help: "Requests.", labelNames: ["route", "code"] })
    const g = r.gauge({ name: "t_open", help: "Open things." })
    const h = r.histogram({ name: "t_seconds", help: "Durations.", buckets: [0.1, 1] })
    c.labels("a", "2xx").inc()
    c.labels("a", "2xx").inc(2)
    c.labels("b\"\\\n", "5xx").inc()
    g.labels().set(5)
    g.labels().dec()
    h.labels().observe(0.05)
    h.labels().observe(0.5)
    h.labels().observe(3)
    // families come in the order of their first series: t_requests_total has none until a child is resolved
    expect(r.render()).toBe([
      "# HELP t_open Open things.",
      "# TYPE t_open gauge",
      "t_open 4",
      "# HELP t_seconds Durations.",
      "# TYPE t_seconds histogram",
      "t_seconds_bucket{le=\"0.1\"} 1",
      "t_seconds_bucket{le=\"1\"} 2",
      "t_seconds_bucket{le=\"+Inf\"} 3",
      "t_seconds_sum 3.55",
      "t_seconds_count 3",
      "# HELP t_requests_total Requests.",
      "# TYPE t_requests_total counter",
      "t_requests_total{route=\"a\",code=\"2xx\"} 3",
      "t_requests_total{route=\"b\\\"\\\\\\n\",code=\"5xx\"} 1",
      ""
    ].join("\n"))
  })

  it("refuses names Prometheus cannot read, counters without _total, duplicates and unordered buckets", () => {
    const r = makeRegistry()
    expect(() => r.counter({ name: "bad-name_total", help: "" })).toThrow(MetricDefinitionError)
    expect(() => r.counter({ name: "no_suffix", help: "" })).toThrow(/_total/)
    expect(() => r.gauge({ name: "g", help: "", labelNames: ["le"] })).toThrow(MetricDefinitionError)
    expect(() => r.histogram({ name: "h", help: "", buckets: [1, 1] })).toThrow(/increase/)
    // names and labels PrometheusMetrics would rewrite or leave out
    expect(() => r.gauge({ name: "two__underscores", help: "" })).toThrow(MetricDefinitionError)
    expect(() => r.gauge({ name: "trailing_", help: "" })).toThrow(MetricDefinitionError)
    expect(() => r.gauge({ name: ":colon", help: "" })).toThrow(MetricDefinitionError)
    expect(() => r.gauge({ name: "g", help: "", labelNames: ["unit"] })).toThrow(MetricDefinitionError)
    expect(() => r.gauge({ name: "g", help: "", labelNames: ["time_unit"] })).toThrow(MetricDefinitionError)
    expect(() => r.gauge({ name: "g", help: "", labelNames: ["a__b"] })).toThrow(MetricDefinitionError)
    r.gauge({ name: "dup", help: "" })
    expect(() => r.gauge({ name: "dup", help: "" })).toThrow(/already/)
  })

  it("bounds each label's distinct values and counts the rest under `other`", () => {
    const r = makeRegistry()
    const c = r.counter({ name: "t_total", help: "", labelNames: ["route"], maxLabelValues: 3 })
    for (let i = 0; i < 10; i++) c.labels(`r${i}`).inc()
    const out = samples(r.render())
    expect(out).toEqual(["t_total{route=\"r0\"} 1", "t_total{route=\"r1\"} 1", "t_total{route=\"r2\"} 1", `t_total{route="${OverflowLabelValue}"} 7`])
    expect(DefaultMaxLabelValues).toBeGreaterThan(0)
  })

  it.effect.prop(
    "never renders more children than the label limit allows, and keeps the total",
    { values: Schema.Array(Schema.String).check(Schema.isMaxLength(200)) },
    ({ values }) =>
      Effect.sync(() => {
        const r = makeRegistry()
        const c = r.counter({ name: "p_total", help: "", labelNames: ["v"], maxLabelValues: 5 })
        for (const v of values) c.labels(v).inc()
        const rendered = samples(r.render())
        expect(rendered.length).toBeLessThanOrEqual(6)
        expect(rendered.reduce((n, l) => n + Number(l.split(" ").pop()), 0)).toBe(values.length)
      })
  )

  it("samples gauges at scrape time, folding overflow into `other` with sums, and can be removed", () => {
    const r = makeRegistry()
    let n = 1
    const remove = r.sampledGauge({
      name: "t_backends",
      help: "",
      labelNames: ["route"],
      maxLabelValues: 1,
      collect: () => [[["a"], n], [["b"], 2], [["c"], 3]]
    })
    expect(samples(r.render())).toEqual(["t_backends{route=\"a\"} 1", "t_backends{route=\"other\"} 5"])
    n = 4
    expect(samples(r.render())[0]).toBe("t_backends{route=\"a\"} 4")
    remove()
    expect(r.render()).toBe("")
    expect(() => r.sampledGauge({ name: "t_x", help: "", type: "counter", collect: () => [] })).toThrow(/_total/)
  })

  it("bounds sampled gauges per scrape, so values that went away free their place", () => {
    const r = makeRegistry()
    let live = ["a", "b"]
    r.sampledGauge({ name: "t_live", help: "", labelNames: ["route"], maxLabelValues: 2, collect: () => live.map((v) => [[v], 1] as const) })
    expect(samples(r.render())).toEqual(["t_live{route=\"a\"} 1", "t_live{route=\"b\"} 1"])
    live = ["c", "d", "e"]
    expect(samples(r.render())).toEqual(["t_live{route=\"c\"} 1", "t_live{route=\"d\"} 1", "t_live{route=\"other\"} 1"])
  })

  it("switchyard's families follow Prometheus naming (units, _total)", () => {
    const m = makeMetrics()
    m.requests.labels("control", "r", statusClass(204)).inc()
    m.requestDuration.labels("control", "r").observe(0.01)
    // a family renders once it has a series: give every one of them a child
    const families = Object.values(m).filter((f) => "labels" in f)
    for (const family of families) family.labels(...family.labelNames.map(() => "x"))
    const text = m.registry.render()
    const types = lines(text).filter((l) => l.startsWith("# TYPE"))
    expect(types.length).toBe(families.length)
    for (const line of types) {
      const [, , name, type] = line.split(" ")
      if (type === "counter") expect(name).toMatch(/_total$/)
      if (name!.includes("duration") || name!.includes("wait")) expect(name).toMatch(/_seconds$/)
      if (name!.includes("bytes")) expect(name).toMatch(/_bytes_total$/)
    }
    expect(text).toContain("switchyard_requests_total{front_door=\"control\",route=\"r\",status_class=\"2xx\"} 1")
    expect([statusClass(101), statusClass(404), statusClass(503), statusClass(700)]).toEqual(["1xx", "4xx", "5xx", "other"])
  })

  it("folds label values past DefaultMaxLabelValues into `other` before they reach Effect's series", () => {
    const m = makeMetrics()
    const extra = 10
    for (let i = 0; i < DefaultMaxLabelValues + extra; i++) m.requests.labels("control", `r${i}`, "2xx").inc()
    m.requests.labels("control", "r0", "2xx").inc()
    const series = Metric.snapshotUnsafe(m.registry.context).filter((s) => s.id === "switchyard_requests_total")
    expect(series.length).toBe(DefaultMaxLabelValues + 1)
    expect(series.every((s) => s.type === "Counter")).toBe(true)
    const text = m.registry.render()
    expect(text).toContain(`switchyard_requests_total{front_door="control",route="r0",status_class="2xx"} 2`)
    expect(text).toContain(`switchyard_requests_total{front_door="control",route="${OverflowLabelValue}",status_class="2xx"} ${extra}`)
    expect(text).not.toContain(`route="r${DefaultMaxLabelValues}"`)
    // each label has its own bound: the route's overflow does not touch the other labels
    m.requests.labels("reverse_h2", `r${DefaultMaxLabelValues + 1}`, "5xx").inc()
    expect(m.registry.render()).toContain(`switchyard_requests_total{front_door="reverse_h2",route="${OverflowLabelValue}",status_class="5xx"} 1`)
  })

  it("renders each histogram series as cumulative buckets, +Inf, sum and count", () => {
    const m = makeMetrics()
    const child = m.requestDuration.labels("control", "r")
    for (const seconds of [0.003, 0.2, 40]) child.observe(seconds)
    m.requestDuration.labels("reverse_h2", "r").observe(0.5)
    expect(child.count()).toBe(3)
    expect(child.sum()).toBeCloseTo(40.203)
    const text = m.registry.render()
    expect(text).toContain("# TYPE switchyard_request_duration_seconds histogram\n")
    const labels = "front_door=\"control\",route=\"r\""
    const mine = samples(text).filter((l) => l.startsWith("switchyard_request_duration_seconds") && l.includes(labels))
    expect(mine).toEqual([
      ...DurationBucketsSeconds.map((le) => `switchyard_request_duration_seconds_bucket{${labels},le="${le}"} ${le < 0.003 ? 0 : le < 0.2 ? 1 : 2}`),
      `switchyard_request_duration_seconds_bucket{${labels},le="+Inf"} 3`,
      `switchyard_request_duration_seconds_sum{${labels}} ${0.003 + 0.2 + 40}`,
      `switchyard_request_duration_seconds_count{${labels}} 3`
    ])
    expect(text).toContain("switchyard_request_duration_seconds_count{front_door=\"reverse_h2\",route=\"r\"} 1")
  })

  it("renders sampled counters as counters", () => {
    const r = makeRegistry()
    r.sampledGauge({ name: "t_seen_total", help: "Seen.", type: "counter", labelNames: ["kind"], collect: () => [[["a"], 7]] })
    expect(lines(r.render())).toEqual(["# HELP t_seen_total Seen.", "# TYPE t_seen_total counter", "t_seen_total{kind=\"a\"} 7"])
  })
})
