import { performance } from "node:perf_hooks"
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest"
import { Deadline } from "../../src/services/Deadline.ts"

// Node's timers and the clock Deadline reads (`performance.now()` of node:perf_hooks) moved together by
// the fake clock.
beforeEach(() => {
  vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "Date"] })
  vi.spyOn(performance, "now").mockImplementation(() => Date.now())
})
afterEach(() => {
  vi.restoreAllMocks()
  vi.useRealTimers()
})

describe("Deadline", () => {
  it("fires once at its deadline", () => {
    const d = new Deadline()
    let fired = 0
    d.arm(100, () => fired++)
    vi.advanceTimersByTime(99)
    expect(fired).toBe(0)
    vi.advanceTimersByTime(1)
    expect(fired).toBe(1)
    expect(d.armed).toBe(false)
    vi.advanceTimersByTime(1000)
    expect(fired).toBe(1)
    expect(vi.getTimerCount()).toBe(0)
  })

  it("re-armed later fires at the new deadline, without a second Node timer", () => {
    const d = new Deadline()
    const at: Array<number> = []
    const start = performance.now()
    d.arm(100, () => at.push(performance.now() - start))
    vi.advanceTimersByTime(60)
    d.arm(100, () => at.push(performance.now() - start))
    expect(vi.getTimerCount()).toBe(1)
    vi.advanceTimersByTime(99)
    expect(at).toEqual([])
    vi.advanceTimersByTime(1)
    expect(at).toEqual([160])
  })

  it("re-armed sooner fires at the sooner deadline", () => {
    const d = new Deadline()
    let which = ""
    d.arm(30_000, () => (which = "head"))
    vi.advanceTimersByTime(10)
    d.arm(50, () => (which = "keep-alive"))
    expect(vi.getTimerCount()).toBe(1)
    vi.advanceTimersByTime(49)
    expect(which).toBe("")
    vi.advanceTimersByTime(1)
    expect(which).toBe("keep-alive")
  })

  it("cancelled, never fires; re-armed after a cancel, fires at the new deadline", () => {
    const d = new Deadline()
    let fired = 0
    d.arm(100, () => fired++)
    d.cancel()
    vi.advanceTimersByTime(500)
    expect(fired).toBe(0)
    d.arm(100, () => fired++)
    d.cancel()
    vi.advanceTimersByTime(50)
    d.arm(100, () => fired++)
    vi.advanceTimersByTime(99)
    expect(fired).toBe(0)
    vi.advanceTimersByTime(1)
    expect(fired).toBe(1)
  })

  it("refresh pushes an armed deadline back by its duration and does nothing when not armed", () => {
    const d = new Deadline()
    let fired = 0
    d.refresh()
    expect(d.armed).toBe(false)
    d.arm(100, () => fired++)
    for (let i = 0; i < 10; i++) {
      vi.advanceTimersByTime(90)
      d.refresh()
    }
    expect(fired).toBe(0)
    vi.advanceTimersByTime(100)
    expect(fired).toBe(1)
  })

  it("a zero or negative duration only cancels", () => {
    const d = new Deadline()
    let fired = 0
    d.arm(100, () => fired++)
    d.arm(0, () => fired++)
    expect(d.armed).toBe(false)
    vi.advanceTimersByTime(1000)
    expect(fired).toBe(0)
  })

  it("dispose leaves no pending timer", () => {
    const d = new Deadline()
    d.arm(100, () => {})
    d.cancel()
    expect(vi.getTimerCount()).toBe(1)
    d.dispose()
    expect(vi.getTimerCount()).toBe(0)
    expect(d.armed).toBe(false)
  })

  it("a callback that re-arms is honoured", () => {
    const d = new Deadline()
    let fired = 0
    const again = () => {
      fired++
      if (fired < 3) d.arm(10, again)
    }
    d.arm(10, again)
    vi.advanceTimersByTime(100)
    expect(fired).toBe(3)
    expect(vi.getTimerCount()).toBe(0)
  })
})
