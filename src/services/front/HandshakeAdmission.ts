/**
 * Admission of connections that have not authenticated yet: at most so many handshakes in progress in
 * total and per peer address, each holding a ticket until it authenticated or ended; and a sampler
 * that keeps refusal logs readable when an attacker opens thousands of connections. Plain state, no
 * I/O and no clock of its own: the front doors read bytes, time out and log.
 */

/** What a connection holds while its handshake is in progress; `release` is idempotent. */
export interface HandshakeTicket {
  readonly release: () => void
}

/** Why a handshake was not admitted. */
export type AdmissionRefusal = "TooManyHandshakes" | "TooManyHandshakesFromAddress"

export interface HandshakeAdmissionLimits {
  /** Most handshakes in progress in total. */
  readonly maxHandshakes: number
  /** Most handshakes in progress from one peer address. */
  readonly maxHandshakesPerAddress: number
}

export interface HandshakeAdmission {
  /** A ticket for a handshake from `address` (a host, or a key for peers without one), or why not. */
  readonly admit: (address: string) => HandshakeTicket | AdmissionRefusal
  /** Handshakes in progress. */
  readonly inProgress: () => number
  /** Addresses with handshakes in progress (each one's count is at most `maxHandshakesPerAddress`). */
  readonly addresses: () => number
}

export const makeHandshakeAdmission = (limits: HandshakeAdmissionLimits): HandshakeAdmission => {
  const perAddress = new Map<string, number>()
  let total = 0
  const admit = (address: string): HandshakeTicket | AdmissionRefusal => {
    if (total >= limits.maxHandshakes) return "TooManyHandshakes"
    const count = perAddress.get(address) ?? 0
    if (count >= limits.maxHandshakesPerAddress) return "TooManyHandshakesFromAddress"
    total++
    perAddress.set(address, count + 1)
    let held = true
    return {
      release: () => {
        if (!held) return
        held = false
        total--
        const n = (perAddress.get(address) ?? 1) - 1
        if (n === 0) perAddress.delete(address)
        else perAddress.set(address, n)
      }
    }
  }
  return { admit, inProgress: () => total, addresses: () => perAddress.size }
}

/** Suffix for a sampled log line: how many similar events were not logged since the previous line. */
export const skippedNote = (skipped: number): string => skipped === 0 ? "" : ` (${skipped} more since the last such line)`

