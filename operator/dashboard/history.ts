// The last hour of every pair's lag and queued bytes, kept in the operator's
// memory for the dashboard's charts. Bounded: a fixed ring of buckets per pair
// (180 × 20 s by default, two numbers each: 2.9 KB per pair as Float64Arrays),
// pairs dropped when deleted. Pure apart from the clock it is given.
import type { FailoverRecord, HistoryPoint } from "./model.ts";

class Ring {
  readonly lag: Float64Array;
  readonly queued: Float64Array;
  /** bucket number (t / bucketMs) of the newest point; -1 when empty */
  head = -1;
  count = 0;
  constructor(n: number) {
    this.lag = new Float64Array(n);
    this.queued = new Float64Array(n);
  }
}

export class PairHistory {
  readonly bucketMs: number;
  readonly points: number;
  private readonly rings = new Map<string, Ring>();
  private readonly failovers = new Map<string, FailoverRecord[]>();
  private readonly maxFailovers: number;

  constructor(o: { bucketMs?: number; points?: number; maxFailovers?: number } = {}) {
    this.bucketMs = o.bucketMs ?? 20_000;
    this.points = o.points ?? 180;
    this.maxFailovers = o.maxFailovers ?? 10;
  }

  /**
   * Record the pair's current values at time t: the bucket keeps the worst
   * (highest) of what it saw; buckets skipped since the last record repeat the
   * last value (nothing changed meanwhile, or we would have been told).
   */
  record(key: string, t: number, lagSeconds: number, queuedBytes: number): void {
    let r = this.rings.get(key);
    if (!r) this.rings.set(key, (r = new Ring(this.points)));
    const b = Math.floor(t / this.bucketMs);
    const n = this.points;
    if (r.head >= 0 && b < r.head) return; // a late value for a bucket already closed
    if (r.head >= 0 && b === r.head) {
      const i = b % n;
      r.lag[i] = Math.max(r.lag[i]!, lagSeconds);
      r.queued[i] = Math.max(r.queued[i]!, queuedBytes);
      return;
    }
    if (r.head >= 0) {
      const last = r.head % n;
      const [l, q] = [r.lag[last]!, r.queued[last]!];
      for (let x = r.head + 1; x < b && x <= r.head + n; x++) {
        r.lag[x % n] = l;
        r.queued[x % n] = q;
      }
      r.count = Math.min(n, r.count + (b - r.head));
    } else r.count = 1;
    r.head = b;
    r.lag[b % n] = lagSeconds;
    r.queued[b % n] = queuedBytes;
  }

  /** Oldest first; only points within the last `points` buckets before now. */
  get(key: string, now: number): HistoryPoint[] {
    const r = this.rings.get(key);
    if (!r || r.head < 0) return [];
    const n = this.points;
    const newest = Math.floor(now / this.bucketMs);
    const out: HistoryPoint[] = [];
    for (let b = r.head - r.count + 1; b <= r.head; b++) {
      if (b <= newest - n) continue;
      out.push({ t: b * this.bucketMs, lagSeconds: r.lag[b % n]!, queuedBytes: r.queued[b % n]! });
    }
    return out;
  }

  /** Remember a finished failover (deduplicated by start time), newest first, at most maxFailovers. */
  noteFailover(key: string, f: FailoverRecord | undefined): void {
    if (!f?.finishedAt) return;
    const list = this.failovers.get(key) ?? [];
    if (list.some((x) => x.startedAt === f.startedAt && x.target === f.target)) return;
    list.unshift({ target: f.target, reason: f.reason, startedAt: f.startedAt, finishedAt: f.finishedAt, recoverySeconds: f.recoverySeconds });
    list.length = Math.min(list.length, this.maxFailovers);
    this.failovers.set(key, list);
  }

  failoversOf(key: string): FailoverRecord[] {
    return this.failovers.get(key) ?? [];
  }

  forget(key: string): void {
    this.rings.delete(key);
    this.failovers.delete(key);
  }

  get size(): number {
    return this.rings.size;
  }
}
