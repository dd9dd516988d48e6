// How the operator reaches agents: one long-lived mTLS connection per address,
// and a short-lived status cache shared by every pair on that agent (500 pairs
// on one agent cost one Status call per interval, not 500). Every call has a
// deadline, so a reconcile never waits on an agent without a bound.
import type { TlsConfig } from "../common/config.ts";
import { AgentConnection } from "../agent/control-client.ts";
import type { SetSpec, StatusResponse, VerifyReport } from "../agent/wire.ts";

/** What reconcilers need from agents (a fake implements it in unit tests). */
export interface AgentDirectory {
  /** timeoutMs: a shorter deadline for health checks (a black-holed agent must count as missed quickly). */
  status(address: string, timeoutMs?: number): Promise<StatusResponse>;
  configureSet(address: string, spec: SetSpec): Promise<{ result: string; specHash: string }>;
  removeSet(address: string, name: string, purge: boolean): Promise<{ existed: boolean }>;
  mirror(address: string, req: { set: string; target: string; mode: string }): Promise<{ started: string[] }>;
  startVerify(address: string, req: { set: string; target: string; repair: boolean }): Promise<VerifyReport>;
  promote(address: string, req: { source: string; set: string; epoch: number }): Promise<{ appliedSeq: number; durableSeq: number; path: string; epoch: number }>;
  mapImage(address: string, req: { source: string; set: string; path: string; remove: boolean }): Promise<{ path: string }>;
  runCommand(address: string, command: string[], timeoutMs: number): Promise<{ exitCode: number; output: string }>;
  drain(address: string, set: string): Promise<{ lastSeq: number }>;
  /** Forget the cached status (after a change, so the next read is fresh). */
  invalidate(address: string): void;
}

/** A Status answer up to this many TTLs old serves a refresh while a new one is fetched. */
const STALE_FACTOR = 3;

export interface AgentPoolOptions {
  tls: TlsConfig;
  /** How long one Status answer serves every pair on that agent. */
  statusTtlMs?: number;
  timeoutMs?: number;
  /** Observe each call (metrics). */
  onCall?: (method: string, ok: boolean, seconds: number) => void;
}

export class AgentPool implements AgentDirectory {
  private readonly conns = new Map<string, AgentConnection>();
  private readonly cache = new Map<string, { at: number; value: Promise<StatusResponse> }>();
  private readonly o: Required<Omit<AgentPoolOptions, "onCall">> & Pick<AgentPoolOptions, "onCall">;

  constructor(o: AgentPoolOptions) {
    this.o = { statusTtlMs: 1000, timeoutMs: 5000, ...o };
  }

  private conn(address: string): AgentConnection {
    let c = this.conns.get(address);
    if (!c) this.conns.set(address, (c = new AgentConnection(address, this.o.tls)));
    return c;
  }

  private async timed<T>(method: string, fn: () => Promise<T>): Promise<T> {
    const t0 = performance.now();
    try {
      const r = await fn();
      this.o.onCall?.(method, true, (performance.now() - t0) / 1000);
      return r;
    } catch (e) {
      this.o.onCall?.(method, false, (performance.now() - t0) / 1000);
      throw e;
    }
  }

  status(address: string, timeoutMs?: number): Promise<StatusResponse> {
    const hit = this.cache.get(address);
    if (hit && Date.now() - hit.at < this.o.statusTtlMs) return hit.value;
    // A status refresh (no health-check deadline) need not wait for the agent: the last answer,
    // if only a little older, serves while a new one is fetched. With hundreds of pairs on one
    // agent, every reconcile used to wait for the same slow Status call, and the workers with them.
    const last = this.answered.get(address);
    if (timeoutMs === undefined && last && Date.now() - last.at < this.o.statusTtlMs * STALE_FACTOR && hit?.value !== undefined) {
      if (!this.refreshing.has(address)) {
        this.refreshing.add(address);
        // Not put into the cache while in flight (readers would wait for it); its answer is, once there.
        void this.fetchStatus(address, undefined, false).catch(() => undefined).finally(() => this.refreshing.delete(address));
      }
      return Promise.resolve(last.value);
    }
    return this.fetchStatus(address, timeoutMs);
  }

  /** The last Status answer per agent, and when it came (served while a fresher one is on its way). */
  private readonly answered = new Map<string, { at: number; value: StatusResponse }>();
  private readonly refreshing = new Set<string>();

  private fetchStatus(address: string, timeoutMs?: number, cacheInFlight = true): Promise<StatusResponse> {
    // Single flight: concurrent readers share one call; a failure is not cached.
    const value = this.timed("status", () => this.conn(address).status(Math.min(timeoutMs ?? this.o.timeoutMs, this.o.timeoutMs)));
    if (cacheInFlight) this.cache.set(address, { at: Date.now(), value });
    value.then(
      (v) => {
        this.answered.set(address, { at: Date.now(), value: v });
        if (!cacheInFlight) this.cache.set(address, { at: Date.now(), value });
      },
      () => {
        if (this.cache.get(address)?.value === value) this.cache.delete(address);
        this.answered.delete(address);
      },
    );
    return value;
  }

  /**
   * Leaves the cached status alone: a new set is "configuring" anyway, and with
   * thousands of pairs created at once, refetching the agent's whole status
   * (every set) after each ConfigureSet decoded gigabytes (quadratic in pairs).
   * Callers that need the set's new state ask with invalidate() first.
   */
  configureSet(address: string, spec: SetSpec): Promise<{ result: string; specHash: string }> {
    return this.timed("configureSet", () => this.conn(address).configureSet(spec, this.o.timeoutMs * 3));
  }

  removeSet(address: string, name: string, purge: boolean): Promise<{ existed: boolean }> {
    return this.timed("removeSet", () => this.conn(address).removeSet(name, purge, this.o.timeoutMs * 6)).finally(() => this.invalidate(address));
  }

  mirror(address: string, req: { set: string; target: string; mode: string }): Promise<{ started: string[] }> {
    return this.timed("mirror", () => this.conn(address).mirror(req, this.o.timeoutMs)).finally(() => this.invalidate(address));
  }

  startVerify(address: string, req: { set: string; target: string; repair: boolean }): Promise<VerifyReport> {
    return this.timed("verify", () => this.conn(address).startVerify(req, this.o.timeoutMs)).finally(() => this.invalidate(address));
  }

  promote(address: string, req: { source: string; set: string; epoch: number }): Promise<{ appliedSeq: number; durableSeq: number; path: string; epoch: number }> {
    return this.timed("promote", () => this.conn(address).promote(req, this.o.timeoutMs * 3)).finally(() => this.invalidate(address));
  }

  mapImage(address: string, req: { source: string; set: string; path: string; remove: boolean }): Promise<{ path: string }> {
    return this.timed("mapImage", () => this.conn(address).mapImage(req, this.o.timeoutMs * 2)).finally(() => this.invalidate(address));
  }

  runCommand(address: string, command: string[], timeoutMs: number): Promise<{ exitCode: number; output: string }> {
    return this.timed("runCommand", () => this.conn(address).runCommand(command, timeoutMs));
  }

  drain(address: string, set: string): Promise<{ lastSeq: number }> {
    return this.timed("drain", () => this.conn(address).drain(set, this.o.timeoutMs * 3)).finally(() => this.invalidate(address));
  }

  invalidate(address: string): void {
    this.cache.delete(address);
    this.answered.delete(address);
  }

  close(): void {
    for (const c of this.conns.values()) c.close();
    this.conns.clear();
  }
}
