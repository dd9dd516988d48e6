// Leader election on a coordination.k8s.io Lease, as client-go's
// tools/leaderelection does it: acquire when the lease is free or has not been
// renewed for leaseDuration (measured on our own clock from when we last saw it
// change, so clock skew between replicas does not matter), renew every
// retryPeriod, and give up leadership (the caller exits) when renewals fail
// for renewDeadline. Writes use the lease's resourceVersion, so two
// candidates can never both win the same round.
import { ApiException, CoordinationV1Api, V1MicroTime, type KubeConfig, type V1Lease } from "@kubernetes/client-node";
import type { Logger } from "../../common/log.ts";
import { sleep } from "../../common/retry.ts";

export interface LeaderElectionOptions {
  namespace: string;
  name: string;
  identity: string;
  leaseDurationMs?: number;
  renewDeadlineMs?: number;
  retryPeriodMs?: number;
  log: Logger;
}

export class LeaderElector {
  private readonly api: CoordinationV1Api;
  private readonly o: Required<Omit<LeaderElectionOptions, "log">> & { log: Logger };
  private observed?: { holder: string; renewTime: string; at: number };
  private leading = false;
  private readonly abort = new AbortController();
  /** The last Lease call that failed (cleared by one that succeeds): /readyz reports it. */
  private failing?: { error: string; since: number; attempts: number };

  constructor(kc: KubeConfig, o: LeaderElectionOptions) {
    this.api = kc.makeApiClient(CoordinationV1Api);
    this.o = { leaseDurationMs: 15_000, renewDeadlineMs: 10_000, retryPeriodMs: 2_000, ...o };
    if (this.o.renewDeadlineMs >= this.o.leaseDurationMs) throw new Error("leader election: renewDeadline must be shorter than leaseDuration");
  }

  get isLeader(): boolean {
    return this.leading;
  }

  /**
   * Why this replica cannot take part in leader election now (a 403 on the
   * Lease, an API server it cannot reach), or undefined when its last attempt
   * got an answer (held by another replica counts as an answer).
   */
  get problem(): string | undefined {
    const f = this.failing;
    if (!f) return undefined;
    return `cannot use Lease ${this.o.namespace}/${this.o.name}: ${f.error} (${f.attempts} attempt(s) failed since ${new Date(f.since).toISOString()})`;
  }

  /** Run one Lease attempt and remember whether the API server answered it. */
  private async attempt(): Promise<boolean> {
    try {
      const ok = await this.tryAcquireOrRenew();
      this.failing = undefined;
      return ok;
    } catch (e) {
      const error = errText(e);
      this.failing = { error, since: this.failing?.since ?? Date.now(), attempts: (this.failing?.attempts ?? 0) + 1 };
      throw e;
    }
  }

  /**
   * Resolves once this process leads, then keeps renewing; calls onLost if
   * leadership is lost (the process should exit: its caches and queues may
   * act on stale beliefs).
   */
  async run(onLost: (why: string) => void): Promise<void> {
    const { log } = this.o;
    log.info({ lease: `${this.o.namespace}/${this.o.name}`, identity: this.o.identity }, "waiting to become leader");
    while (!this.abort.signal.aborted) {
      if (await this.attempt().catch((e) => (log.warn({ lease: `${this.o.namespace}/${this.o.name}`, err: errText(e) }, "lease acquire failed"), false))) break;
      await sleep(jitter(this.o.retryPeriodMs), this.abort.signal);
    }
    if (this.abort.signal.aborted) return;
    this.leading = true;
    log.info({ identity: this.o.identity }, "became leader");
    void this.renewLoop(onLost);
  }

  private async renewLoop(onLost: (why: string) => void): Promise<void> {
    let lastRenew = Date.now();
    while (!this.abort.signal.aborted) {
      await sleep(this.o.retryPeriodMs, this.abort.signal);
      if (this.abort.signal.aborted) return;
      let ok = false;
      let why = "";
      try {
        ok = await this.attempt();
        if (!ok) why = `lease is held by ${this.observed?.holder}`;
      } catch (e) {
        why = errText(e);
      }
      if (ok) lastRenew = Date.now();
      else if (!ok && (Date.now() - lastRenew > this.o.renewDeadlineMs || this.observed?.holder !== this.o.identity)) {
        this.leading = false;
        this.o.log.error({ why }, "lost leadership");
        onLost(why);
        return;
      }
    }
  }

  private async tryAcquireOrRenew(): Promise<boolean> {
    const now = new Date();
    let lease: V1Lease | undefined;
    try {
      lease = await this.api.readNamespacedLease({ name: this.o.name, namespace: this.o.namespace });
    } catch (e) {
      if (!(e instanceof ApiException && e.code === 404)) throw e;
    }
    const durationSeconds = Math.ceil(this.o.leaseDurationMs / 1000);
    if (!lease) {
      await this.api.createNamespacedLease({
        namespace: this.o.namespace,
        body: {
          metadata: { name: this.o.name, namespace: this.o.namespace },
          spec: { holderIdentity: this.o.identity, leaseDurationSeconds: durationSeconds, acquireTime: new V1MicroTime(now), renewTime: new V1MicroTime(now), leaseTransitions: 0 },
        },
      });
      this.observe(this.o.identity, now.toISOString());
      return true;
    }
    const spec = lease.spec ?? {};
    const holder = spec.holderIdentity ?? "";
    const renewTime = spec.renewTime ? new Date(spec.renewTime).toISOString() : "";
    this.observe(holder, renewTime);
    const expired = this.observed!.at + (spec.leaseDurationSeconds ?? durationSeconds) * 1000 < Date.now();
    if (holder && holder !== this.o.identity && !expired) return false;
    const taking = holder !== this.o.identity;
    lease.spec = {
      ...spec,
      holderIdentity: this.o.identity,
      leaseDurationSeconds: durationSeconds,
      renewTime: new V1MicroTime(now),
      acquireTime: taking ? new V1MicroTime(now) : spec.acquireTime,
      leaseTransitions: (spec.leaseTransitions ?? 0) + (taking ? 1 : 0),
    };
    try {
      await this.api.replaceNamespacedLease({ name: this.o.name, namespace: this.o.namespace, body: lease });
    } catch (e) {
      // Someone else wrote first: they won this round.
      if (e instanceof ApiException && e.code === 409) return false;
      throw e;
    }
    this.observe(this.o.identity, now.toISOString());
    if (taking) this.o.log.info({ previous: holder || "(none)" }, "took over the lease");
    return true;
  }

  private observe(holder: string, renewTime: string): void {
    if (!this.observed || this.observed.holder !== holder || this.observed.renewTime !== renewTime) this.observed = { holder, renewTime, at: Date.now() };
  }

  /** Stop, and hand the lease over at once (so a standby need not wait for it to expire). */
  async release(): Promise<void> {
    this.abort.abort();
    if (!this.leading) return;
    this.leading = false;
    try {
      const lease = await this.api.readNamespacedLease({ name: this.o.name, namespace: this.o.namespace });
      if (lease.spec?.holderIdentity !== this.o.identity) return;
      lease.spec = { ...lease.spec, holderIdentity: "", leaseDurationSeconds: 1, renewTime: new V1MicroTime(new Date()) };
      await this.api.replaceNamespacedLease({ name: this.o.name, namespace: this.o.namespace, body: lease });
      this.o.log.info("released the lease");
    } catch (e) {
      this.o.log.warn({ err: errText(e) }, "could not release the lease");
    }
  }
}

function jitter(ms: number): number {
  return Math.round(ms * (1 + Math.random() * 0.2));
}

export function errText(e: unknown): string {
  if (e instanceof ApiException) {
    const body = typeof e.body === "string" ? e.body : JSON.stringify(e.body);
    try {
      return `${e.code}: ${(JSON.parse(body) as { message?: string }).message ?? body}`;
    } catch {
      return `${e.code}: ${body}`;
    }
  }
  return (e as Error)?.message ?? String(e);
}
