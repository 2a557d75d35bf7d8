import { describe, expect, it } from "@effect/vitest"
import { Schema } from "effect"
import { ConnectionTable } from "../../src/domain/ConnectionTable.ts"

describe("ConnectionTable", () => {
  it("admits up to the limits, then makes room by evicting the oldest silent connection", () => {
    const table = new ConnectionTable<number>({ maxConnections: 3, maxPerAddress: 2, silentTimeoutMs: 1000 })
    const silent = new Set<number>([1, 2, 3])
    const isSilent = (k: number) => silent.has(k)
    expect(table.admit("a", isSilent)).toEqual({ _tag: "Admit", evict: undefined })
    table.add(1, "a", 0)
    table.add(2, "a", 1)
    // address "a" is full: its oldest silent connection (1) makes room
    expect(table.admit("a", isSilent)).toEqual({ _tag: "Admit", evict: 1 })
    silent.delete(1)
    silent.delete(2)
    // nothing silent from "a": refused, while another address still gets in
    expect(table.admit("a", isSilent)).toEqual({ _tag: "Refuse", reason: "AddressFull" })
    expect(table.admit("b", isSilent)).toEqual({ _tag: "Admit", evict: undefined })
    table.add(3, "b", 2)
    // the listener is full: the oldest silent one anywhere (3) makes room
    expect(table.admit("c", isSilent)).toEqual({ _tag: "Admit", evict: 3 })
    silent.delete(3)
    expect(table.admit("c", isSilent)).toEqual({ _tag: "Refuse", reason: "ListenerFull" })
    table.remove(2)
    expect(table.countOf("a")).toBe(1)
    expect(table.admit("c", isSilent)).toEqual({ _tag: "Admit", evict: undefined })
  })

  it("reports connections silent past the limit, oldest first, and only those", () => {
    const table = new ConnectionTable<string>({ maxConnections: 10, maxPerAddress: 10, silentTimeoutMs: 100 })
    table.add("old-silent", "a", 0)
    table.add("old-talking", "a", 10)
    table.add("young-silent", "a", 500)
    const isSilent = (k: string) => k.endsWith("silent")
    expect(table.expired(99, isSilent)).toEqual([])
    expect(table.expired(150, isSilent)).toEqual(["old-silent"])
    expect(table.expired(600, isSilent)).toEqual(["old-silent", "young-silent"])
    const none = new ConnectionTable<string>({ maxConnections: 10, maxPerAddress: 10, silentTimeoutMs: 0 })
    none.add("x", "a", 0)
    expect(none.expired(1e9, () => true)).toEqual([])
  })

  it.prop(
    "whatever happens, no address holds more than its limit and the listener no more than its own",
    [
      Schema.Array(
        Schema.Struct({
          op: Schema.Literals(["open", "close", "talk"]),
          address: Schema.Literals(["a", "b", "c", "d"]),
          pick: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 50 }))
        })
      ).check(Schema.isMaxLength(200))
    ],
    ([ops]) => {
      const table = new ConnectionTable<number>({ maxConnections: 6, maxPerAddress: 3, silentTimeoutMs: 0 })
      const open = new Map<number, string>()
      const talking = new Set<number>()
      let next = 0
      for (const { op, address, pick } of ops) {
        const keys = [...open.keys()]
        if (op === "open") {
          const decision = table.admit(address, (k) => !talking.has(k))
          if (decision._tag === "Admit") {
            if (decision.evict !== undefined) {
              expect(talking.has(decision.evict)).toBe(false)
              table.remove(decision.evict)
              open.delete(decision.evict)
            }
            table.add(next, address, 0)
            open.set(next++, address)
          }
        } else if (keys.length > 0) {
          const key = keys[pick % keys.length]!
          if (op === "close") {
            table.remove(key)
            open.delete(key)
          } else talking.add(key)
        }
        expect(table.size).toBe(open.size)
        expect(table.size).toBeLessThanOrEqual(6)
        for (const a of ["a", "b", "c", "d"]) {
          const n = [...open.values()].filter((x) => x === a).length
          expect(table.countOf(a)).toBe(n)
          expect(n).toBeLessThanOrEqual(3)
        }
      }
    }
  )
})
