import { describe, expect, it } from "@effect/vitest"
import { INITIAL_STREAM_WINDOW, MAX_STREAM_WINDOW_LIMIT } from "../../../src/domain/Frame.ts"
import { resolveYamuxConfig, TUNNEL_MAX_AUTO_TUNE_WINDOW, tunnelYamuxConfig } from "../../../src/services/yamux/YamuxConfig.ts"

describe("tunnelYamuxConfig", () => {
  it("turns window auto-tuning on for tunnels, starting from the 256 KiB window", () => {
    const config = resolveYamuxConfig(tunnelYamuxConfig(undefined))
    expect(config.maxStreamWindow).toBe(INITIAL_STREAM_WINDOW)
    expect(config.maxAutoTuneWindow).toBe(TUNNEL_MAX_AUTO_TUNE_WINDOW)
    expect(config.maxFrameSize).toBeGreaterThanOrEqual(TUNNEL_MAX_AUTO_TUNE_WINDOW)
  })

  it("keeps a limit the operator chose, even one that turns auto-tuning off", () => {
    const config = resolveYamuxConfig(tunnelYamuxConfig({ maxAutoTuneWindow: INITIAL_STREAM_WINDOW }))
    expect(config.maxAutoTuneWindow).toBe(INITIAL_STREAM_WINDOW)
  })

  it("never sets the limit below a larger starting window", () => {
    const config = resolveYamuxConfig(tunnelYamuxConfig({ maxStreamWindow: MAX_STREAM_WINDOW_LIMIT }))
    expect(config.maxAutoTuneWindow).toBe(MAX_STREAM_WINDOW_LIMIT)
  })
})

describe("resolveYamuxConfig peer limits", () => {
  it("has no peer rate limits by default and refuses impossible ones", () => {
    const config = resolveYamuxConfig(undefined)
    expect(config.peerStreamOpenRate).toBeUndefined()
    expect(config.peerFrameRate).toBeUndefined()
    expect(() => resolveYamuxConfig({ peerFrameRate: { perSecond: 0, burst: 10 } })).toThrow(/peerFrameRate/)
    expect(() => resolveYamuxConfig({ peerStreamOpenRate: { perSecond: 10, burst: 0 } })).toThrow(/peerStreamOpenRate/)
    expect(() => resolveYamuxConfig({ maxPeerStreams: 0 })).toThrow(/maxPeerStreams/)
  })
})
