/**
 * A timeout that is armed, pushed back and cancelled many times a second while it rarely fires: the
 * head, keep-alive, response and idle timeouts of a busy keep-alive connection. Arming costs a clock
 * read. A Node timer is set only when none is pending or the pending one would fire after the new
 * deadline; a timer that fires before the deadline (it was pushed back) is set again for what remains;
 * cancelling forgets the callback and leaves the pending timer to find nothing. `dispose` clears the
 * pending timer, and must be called when the owner is done, so that nothing keeps the event loop alive.
 */
import { performance } from "node:perf_hooks"
export class Deadline {
  private timer: NodeJS.Timeout | undefined = undefined
  /** When the pending Node timer fires (`performance.now()` ms). */
  private due = 0
  /** When `fire` is due (`performance.now()` ms). */
  private at = 0
  private ms = 0
  private fire: (() => void) | undefined = undefined

  /** Calls `fire` once, `ms` from now, unless cancelled or re-armed first; `ms <= 0` only cancels. */
  arm(ms: number, fire: () => void): void {
    if (ms <= 0) {
      this.fire = undefined
      return
    }
    this.ms = ms
    this.fire = fire
    const at = performance.now() + ms
    this.at = at
    if (this.timer === undefined || this.due > at) this.schedule(ms)
  }

  /** Pushes an armed deadline back to its duration from now (nothing when not armed). */
  refresh(): void {
    if (this.fire !== undefined) this.at = performance.now() + this.ms
  }

  get armed(): boolean {
    return this.fire !== undefined
  }

  cancel(): void {
    this.fire = undefined
  }

  /** Cancels and clears the pending Node timer. */
  dispose(): void {
    this.fire = undefined
    if (this.timer !== undefined) {
      clearTimeout(this.timer)
      this.timer = undefined
    }
  }

  private schedule(ms: number): void {
    if (this.timer !== undefined) clearTimeout(this.timer)
    this.due = performance.now() + ms
    this.timer = setTimeout(this.onTimer, ms)
  }

  private readonly onTimer = (): void => {
    this.timer = undefined
    const fire = this.fire
    if (fire === undefined) return
    // Node times from the start of the event loop's turn, so a timer may come up to a turn's length early.
    const left = this.at - performance.now()
    if (left > 0) {
      this.schedule(Math.ceil(left))
      return
    }
    this.fire = undefined
    fire()
  }
}
