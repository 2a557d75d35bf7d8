/**
 * Preloaded (`node --expose-gc --import`) into a switchyard process whose memory a bench reads: SIGUSR2
 * runs a full collection and prints `bench: gc done`, so the figure is live data rather than garbage.
 * Nothing else changes in the process. Plain JavaScript: a `.ts` preload would load Node's type
 * stripping into the measured process (about 20 MB of resident memory).
 */
process.on("SIGUSR2", () => {
  globalThis.gc?.()
  process.stdout.write("bench: gc done\n")
})
