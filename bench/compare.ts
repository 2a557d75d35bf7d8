/**
 * The comparison every HTTP suite makes, in one run: wrk against the destination directly and through
 * each switchyard path (rounds interleaved, so load from elsewhere on the machine hits every path
 * alike), then 100 MiB downloads with curl; and what each switchyard process spent on it. It only drives
 * load and prints: the processes are started by the suite (roles.ts), each party in its own.
 */
import { curlDownload, meterPath, note, type Party, quantile, report, wrk, type WrkOptions, type WrkResult } from "./support.ts"

/** One request a path is measured with: URL and `Name: value` headers. */
export interface Target {
  readonly url: string
  readonly headers?: ReadonlyArray<string>
}

/** A way to reach the destination: `direct` (the baseline, no parties) or through switchyard. */
export interface HttpPath {
  /** Names the path's figures: `<suite>.<name>.…`. */
  readonly name: string
  /** The small request wrk repeats. */
  readonly small: Target
  /** The download curl makes, when the path has one. */
  readonly download?: Target
  /** The processes whose CPU and memory are reported for this path. */
  readonly parties: ReadonlyArray<Party>
}

export interface CompareSettings {
  readonly wrk: Omit<WrkOptions, "headers">
  /** wrk rounds per path, interleaved; the median req/s is reported. */
  readonly rounds: number
  /** An unreported wrk run per path first, so JIT warm-up is not counted against anyone. */
  readonly warmupSeconds: number
  /** Rounds of one connection at a time (latency without queueing); none when 0. */
  readonly oneAtATimeRounds: number
  readonly downloadBytes: number
  /** Download rounds per path after one unreported warm-up download; the best speed is reported. */
  readonly downloadRounds: number
}

/** The settings of the reference table: wrk -t2 -c50 on a 2-core machine, bounded in time. */
export const defaultSettings: CompareSettings = {
  wrk: { threads: 2, connections: 50, seconds: 3 },
  rounds: 3,
  warmupSeconds: 1,
  oneAtATimeRounds: 0,
  downloadBytes: 100 * 1024 * 1024,
  downloadRounds: 3
}

/**
 * Measures every path (the first is the baseline the ratios are against) and prints, per path:
 * `req_per_s`, `ratio`, `p50_ms`, `p99_ms`, `download_MB_per_s`, `download_ratio`, and per party
 * `cpu_us_per_request`, `cpu_s_per_100MiB`, `rss_idle_mb`, `rss_peak_mb`.
 */
export const comparePaths = async (suite: string, paths: ReadonlyArray<HttpPath>, settings: CompareSettings = defaultSettings): Promise<void> => {
  const baseline = paths[0]!
  const meters = new Map(paths.map((p) => [p.name, meterPath(suite, p.name, p.parties)]))
  const load = (p: HttpPath, options: Omit<WrkOptions, "headers">) =>
    wrk(p.small.url, { ...options, ...(p.small.headers === undefined ? {} : { headers: p.small.headers }) })
  const results = new Map<string, Array<WrkResult>>(paths.map((p) => [p.name, []]))
  const single = new Map<string, Array<WrkResult>>(paths.map((p) => [p.name, []]))
  for (const p of paths) await meters.get(p.name)!.unmetered(() => load(p, { ...settings.wrk, seconds: settings.warmupSeconds }))
  for (let round = 0; round < settings.rounds; round++) {
    for (const p of paths) results.get(p.name)!.push(await meters.get(p.name)!.requests(() => load(p, settings.wrk), (r) => r.requests))
  }
  for (let round = 0; round < settings.oneAtATimeRounds; round++) {
    for (const p of paths) {
      single.get(p.name)!.push(await meters.get(p.name)!.unmetered(() => load(p, { threads: 1, connections: 1, seconds: settings.wrk.seconds })))
    }
  }
  const best = new Map<string, number>()
  const downloading = paths.filter((p) => p.download !== undefined)
  const fetch = (p: HttpPath) => curlDownload(p.download!.url, settings.downloadBytes, p.download!.headers)
  // a failed download is noted and leaves that round out of the figures
  const failed = (p: HttpPath) => (e: Error) => {
    note(suite, `${p.name}: a download failed: ${e.message.split("\n")[0]}`)
    return undefined
  }
  for (const p of downloading) await meters.get(p.name)!.unmetered(() => fetch(p).catch(failed(p)))
  for (let round = 0; round < settings.downloadRounds; round++) {
    for (const p of downloading) {
      const speed = await meters.get(p.name)!.transfer(() => fetch(p).catch(failed(p)), (s) => s === undefined ? 0 : settings.downloadBytes)
      if (speed !== undefined) best.set(p.name, Math.max(best.get(p.name) ?? 0, speed))
    }
  }

  const median = (rs: ReadonlyArray<WrkResult>, f: (r: WrkResult) => number) => quantile(rs.map(f), 0.5)
  const baseRps = median(results.get(baseline.name)!, (r) => r.rps)
  for (const p of paths) {
    const rs = results.get(p.name)!
    const rps = median(rs, (r) => r.rps)
    report(suite, `${p.name}.req_per_s`, Math.round(rps), "req/s")
    if (p !== baseline) report(suite, `${p.name}.ratio`, rps / baseRps, `x ${baseline.name}`)
    report(suite, `${p.name}.p50_ms`, median(rs, (r) => r.p50Ms), "ms")
    report(suite, `${p.name}.p99_ms`, median(rs, (r) => r.p99Ms), "ms")
    const timeouts = rs.reduce((n, r) => n + r.timeouts, 0)
    if (timeouts > 0) note(suite, `${p.name}: ${timeouts} requests timed out in wrk (2 s)`)
    if (settings.oneAtATimeRounds > 0) {
      report(suite, `${p.name}.one_at_a_time_p50_ms`, median(single.get(p.name)!, (r) => r.p50Ms), "ms")
      report(suite, `${p.name}.one_at_a_time_p99_ms`, median(single.get(p.name)!, (r) => r.p99Ms), "ms")
    }
    const speed = best.get(p.name)
    if (speed !== undefined) {
      report(suite, `${p.name}.download_MB_per_s`, Math.round(speed), "MB/s")
      const baseSpeed = best.get(baseline.name)
      if (p !== baseline && baseSpeed !== undefined) report(suite, `${p.name}.download_ratio`, speed / baseSpeed, `x ${baseline.name}`)
    }
    meters.get(p.name)!.report()
  }
  if (downloading.length < paths.length) note(suite, `no download on ${paths.filter((p) => p.download === undefined).map((p) => p.name).join(", ")}`)
}
