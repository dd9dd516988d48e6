// A keyed, de-duplicating, rate-limited work queue with client-go's semantics
// (k8s.io/client-go/util/workqueue): a key is queued at most once; a key being
// processed is not handed to a second worker, and if it was added meanwhile it
// comes back once the first worker is done; failures back off per key.
// Written here because no maintained npm package offers these semantics
// (@kubernetes/client-node has informers but no work queue).

export interface RateLimiterOptions {
  baseDelayMs?: number;
  maxDelayMs?: number;
}

export class WorkQueue {
  private readonly queue: string[] = [];
  /**
   * Keys a person is waiting for (a spec change, a request, a deletion): served
   * before the periodic refreshes in `queue`, so thousands of healthy pairs
   * due for a status refresh never delay the one whose spec just changed.
   */
  private readonly urgent: string[] = [];
  private readonly dirty = new Set<string>();
  private readonly processing = new Set<string>();
  private readonly failures = new Map<string, number>();
  private readonly timers = new Map<string, { at: number; t: NodeJS.Timeout }>();
  private readonly waiters: ((key: string | undefined) => void)[] = [];
  private readonly addedAt = new Map<string, number>();
  private shuttingDown = false;
  private readonly baseDelayMs: number;
  private readonly maxDelayMs: number;
  /** Called with how long each key waited in the queue (for metrics). */
  onDequeue?: (waitedMs: number) => void;

  constructor(o: RateLimiterOptions = {}) {
    this.baseDelayMs = o.baseDelayMs ?? 500;
    this.maxDelayMs = o.maxDelayMs ?? 300_000;
  }

  get length(): number {
    return this.queue.length + this.urgent.length;
  }

  /** Queue a key (once); `urgent`: ahead of the periodic work (a change someone made). */
  add(key: string, urgent = false): void {
    if (this.shuttingDown) return;
    if (this.dirty.has(key)) {
      // Queued already as periodic work: move it ahead.
      if (urgent && !this.processing.has(key)) {
        const i = this.queue.indexOf(key);
        if (i >= 0) {
          this.queue.splice(i, 1);
          this.urgent.push(key);
        }
      } else if (urgent) this.urgentAfter.add(key);
      return;
    }
    this.dirty.add(key);
    this.addedAt.set(key, Date.now());
    if (this.processing.has(key)) {
      if (urgent) this.urgentAfter.add(key);
      return;
    }
    const w = this.waiters.shift();
    if (w) {
      this.dirty.delete(key);
      this.processing.add(key);
      this.reportWait(key);
      w(key);
    } else (urgent ? this.urgent : this.queue).push(key);
  }

  /** Keys added urgently while they were processed: they come back urgent. */
  private readonly urgentAfter = new Set<string>();

  /** Add after a delay; an earlier pending delay for the key wins. */
  addAfter(key: string, ms: number): void {
    if (this.shuttingDown) return;
    if (ms <= 0) return this.add(key);
    const at = Date.now() + ms;
    const cur = this.timers.get(key);
    if (cur && cur.at <= at) return;
    if (cur) clearTimeout(cur.t);
    const t = setTimeout(() => {
      this.timers.delete(key);
      this.add(key);
    }, ms);
    t.unref?.();
    this.timers.set(key, { at, t });
  }

  /** Requeue after a failure, with exponential per-key backoff. */
  addRateLimited(key: string): number {
    const n = this.failures.get(key) ?? 0;
    this.failures.set(key, n + 1);
    const ms = Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** n);
    this.addAfter(key, ms);
    return ms;
  }

  /** Stop tracking failures of a key (it succeeded). */
  forget(key: string): void {
    this.failures.delete(key);
  }

  numRequeues(key: string): number {
    return this.failures.get(key) ?? 0;
  }

  /** Next key, or undefined once shut down. Call done(key) when finished. */
  get(): Promise<string | undefined> {
    if (this.shuttingDown) return Promise.resolve(undefined);
    const key = this.urgent.shift() ?? this.queue.shift();
    if (key !== undefined) {
      this.dirty.delete(key);
      this.processing.add(key);
      this.reportWait(key);
      return Promise.resolve(key);
    }
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  done(key: string): void {
    this.processing.delete(key);
    const urgent = this.urgentAfter.delete(key);
    if (this.dirty.has(key)) {
      // Added while it was processed: it runs again, by another get().
      this.dirty.delete(key);
      this.add(key, urgent);
    }
  }

  shutDown(): void {
    this.shuttingDown = true;
    for (const { t } of this.timers.values()) clearTimeout(t);
    this.timers.clear();
    for (const w of this.waiters.splice(0)) w(undefined);
  }

  private reportWait(key: string): void {
    const at = this.addedAt.get(key);
    this.addedAt.delete(key);
    if (at !== undefined) this.onDequeue?.(Date.now() - at);
  }
}
