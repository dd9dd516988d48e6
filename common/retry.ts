// The one retry/backoff helper: exponential backoff with full jitter, capped.
// Callers keep their own loop (so they can report each failure) and ask this
// for the next delay.

export interface BackoffOptions {
  initialMs?: number;
  maxMs?: number;
  factor?: number;
}

export class Backoff {
  private attempt = 0;
  private readonly initialMs: number;
  private readonly maxMs: number;
  private readonly factor: number;

  constructor(opts: BackoffOptions = {}) {
    this.initialMs = opts.initialMs ?? 200;
    this.maxMs = opts.maxMs ?? 10_000;
    this.factor = opts.factor ?? 2;
  }

  /** Failures since the last reset. */
  get failures(): number {
    return this.attempt;
  }

  /** Delay before the next try: random in [cap/2, cap], cap growing per failure. */
  next(): number {
    const cap = Math.min(this.maxMs, this.initialMs * this.factor ** this.attempt);
    this.attempt++;
    return Math.round(cap / 2 + (Math.random() * cap) / 2);
  }

  reset(): void {
    this.attempt = 0;
  }
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}
