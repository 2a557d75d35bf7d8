/**
 * Preloaded (`node --expose-gc --import`) into a switchyard process whose memory a bench reads: SIGUSR2
 * runs a full collection and prints `bench: gc done`, so the figure is live data rather than garbage.
 * Nothing else changes in the process.
 */
process.on("SIGUSR2", () => {
  ;(globalThis as { gc?: () => void }).gc?.()
  process.stdout.write("bench: gc done\n")
})
