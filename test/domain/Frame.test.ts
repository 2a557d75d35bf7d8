import { describe, expect, it } from "vitest"
import * as F from "../../src/domain/Frame.ts"

describe("yamux wire numbers", () => {
  it("pins every constant to the hashicorp/yamux spec and defaults", () => {
    expect([F.PROTOCOL_VERSION, F.HEADER_SIZE]).toEqual([0, 12])
    expect([F.TYPE_DATA, F.TYPE_WINDOW_UPDATE, F.TYPE_PING, F.TYPE_GO_AWAY]).toEqual([0, 1, 2, 3])
    expect([F.FLAG_SYN, F.FLAG_ACK, F.FLAG_FIN, F.FLAG_RST]).toEqual([1, 2, 4, 8])
    expect([F.GO_AWAY_NORMAL, F.GO_AWAY_PROTOCOL_ERROR, F.GO_AWAY_INTERNAL_ERROR]).toEqual([0, 1, 2])
    expect(F.SESSION_STREAM_ID).toBe(0)
    expect(F.INITIAL_STREAM_WINDOW).toBe(262_144)
    expect(F.MAX_STREAM_WINDOW_LIMIT).toBe(16 * 1024 * 1024)
    expect(F.DEFAULT_ACCEPT_BACKLOG).toBe(256)
    expect(F.DEFAULT_KEEPALIVE_INTERVAL_MS).toBe(30_000)
    expect(F.DEFAULT_CONNECTION_WRITE_TIMEOUT_MS).toBe(10_000)
    expect(F.DEFAULT_STREAM_OPEN_TIMEOUT_MS).toBe(75_000)
    expect(F.DEFAULT_MAX_STREAM_WINDOW).toBe(262_144)
  })

  it("names frame types", () => {
    expect([0, 1, 2, 3, 9].map(F.typeName)).toEqual(["Data", "WindowUpdate", "Ping", "GoAway", "Unknown(9)"])
  })
})
