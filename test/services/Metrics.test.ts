import { describe, expect, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import {
  DefaultMaxLabelValues,
  makeMetrics,
  makeRegistry,
  MetricDefinitionError,
  OverflowLabelValue,
  statusClass
} from "../../src/services/Metrics.ts"

const lines = (text: string) => text.split("\n").filter((l) => l.length > 0)

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
    expect(r.render()).toBe([
      "# HELP t_requests_total Requests.",
      "# TYPE t_requests_total counter",
      "t_requests_total{route=\"a\",code=\"2xx\"} 3",
      "t_requests_total{route=\"b\\\"\\\\\\n\",code=\"5xx\"} 1",
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
      ""
    ].join("\n"))
  })

  it("refuses names Prometheus cannot read, counters without _total, duplicates and unordered buckets", () => {
    const r = makeRegistry()
    expect(() => r.counter({ name: "bad-name_total", help: "" })).toThrow(MetricDefinitionError)
    expect(() => r.counter({ name: "no_suffix", help: "" })).toThrow(/_total/)
    expect(() => r.gauge({ name: "g", help: "", labelNames: ["le"] })).toThrow(MetricDefinitionError)
    expect(() => r.histogram({ name: "h", help: "", buckets: [1, 1] })).toThrow(/increase/)
    r.gauge({ name: "dup", help: "" })
    expect(() => r.gauge({ name: "dup", help: "" })).toThrow(/already/)
  })

  it("bounds each label's distinct values and counts the rest under `other`", () => {
    const r = makeRegistry()
    const c = r.counter({ name: "t_total", help: "", labelNames: ["route"], maxLabelValues: 3 })
    for (let i = 0; i < 10; i++) c.labels(`r${i}`).inc()
    const out = lines(r.render()).filter((l) => !l.startsWith("#"))
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
        const samples = lines(r.render()).filter((l) => !l.startsWith("#"))
        expect(samples.length).toBeLessThanOrEqual(6)
        expect(samples.reduce((n, l) => n + Number(l.split(" ").pop()), 0)).toBe(values.length)
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
    expect(lines(r.render()).slice(2)).toEqual(["t_backends{route=\"a\"} 1", "t_backends{route=\"other\"} 5"])
    n = 4
    expect(lines(r.render())[2]).toBe("t_backends{route=\"a\"} 4")
    remove()
    expect(r.render()).toBe("")
    expect(() => r.sampledGauge({ name: "t_x", help: "", type: "counter", collect: () => [] })).toThrow(/_total/)
  })

  it("bounds sampled gauges per scrape, so values that went away free their place", () => {
    const r = makeRegistry()
    let live = ["a", "b"]
    r.sampledGauge({ name: "t_live", help: "", labelNames: ["route"], maxLabelValues: 2, collect: () => live.map((v) => [[v], 1] as const) })
    expect(lines(r.render()).slice(2)).toEqual(["t_live{route=\"a\"} 1", "t_live{route=\"b\"} 1"])
    live = ["c", "d", "e"]
    expect(lines(r.render()).slice(2)).toEqual(["t_live{route=\"c\"} 1", "t_live{route=\"d\"} 1", "t_live{route=\"other\"} 1"])
  })

  it("switchyard's families follow Prometheus naming (units, _total)", () => {
    const m = makeMetrics()
    m.requests.labels("control", "r", statusClass(204)).inc()
    m.requestDuration.labels("control", "r").observe(0.01)
    const text = m.registry.render()
    for (const line of lines(text).filter((l) => l.startsWith("# TYPE"))) {
      const [, , name, type] = line.split(" ")
      if (type === "counter") expect(name).toMatch(/_total$/)
      if (name!.includes("duration") || name!.includes("wait")) expect(name).toMatch(/_seconds$/)
      if (name!.includes("bytes")) expect(name).toMatch(/_bytes_total$/)
    }
    expect(text).toContain("switchyard_requests_total{front_door=\"control\",route=\"r\",status_class=\"2xx\"} 1")
    expect([statusClass(101), statusClass(404), statusClass(503), statusClass(700)]).toEqual(["1xx", "4xx", "5xx", "other"])
  })
})
