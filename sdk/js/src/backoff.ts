/**
 * Full-jitter exponential backoff ("Exponential Backoff And Jitter", AWS
 * architecture blog): the n-th retry waits a uniformly random time in
 * `[0, min(maxMs, baseMs * 2^n))`. No clock, no I/O: the caller supplies the
 * random source.
 */

/** Reconnect backoff settings. */
export interface BackoffOptions {
  /** Upper bound of the first retry's delay, ms. Default 500. */
  baseMs?: number;
  /** Largest upper bound, ms. Default 30 000. */
  maxMs?: number;
}

export const DEFAULT_BACKOFF = { baseMs: 500, maxMs: 30_000 } as const;

/**
 * The delay before retry number `attempt` (0 for the first), in ms.
 * `random` returns a number in [0, 1).
 */
export function backoffDelay(
  attempt: number,
  options: BackoffOptions = {},
  random: () => number = Math.random,
): number {
  const base = options.baseMs ?? DEFAULT_BACKOFF.baseMs;
  const max = options.maxMs ?? DEFAULT_BACKOFF.maxMs;
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}
