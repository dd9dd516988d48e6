// The dashboard without Kubernetes, for `understudy demo`: the demo's two
// agents are read directly (in process) once a second, and their status is
// turned into a ReplicationPair status by the operator's own pure
// computeStatus, so the page is the same page a cluster user sees. Condition
// changes become the event log. Verify and mirror act on the source agent;
// failover, cutover and failback need the operator and say so.
import type { Agent } from "../../agent/agent.ts";
import { computeStatus } from "../controllers/pair-status.ts";
import type { ResolvedPair } from "../api/v1alpha1/index.ts";
import type { Action, ActionReply, ActionRequest, EventView, PairView } from "./model.ts";
import type { Authorizer, Caller, Change, DashboardSource, Decision } from "./source.ts";

export const DEMO_NAMESPACE = "demo";

export class DemoSource implements DashboardSource {
  readonly kind = "demo" as const;
  private readonly o: { source: Agent; target: Agent; set: string; path: string };
  private readonly listeners: ((c: Change) => void)[] = [];
  private pairObj: ResolvedPair;
  private view: PairView;
  private readonly evs: EventView[] = [];
  private readonly timer: NodeJS.Timeout;
  private seq = 0;

  constructor(o: { source: Agent; target: Agent; set: string; path: string; intervalMs?: number }) {
    this.o = o;
    const src = `127.0.0.1:${o.source.port}`;
    const dst = `127.0.0.1:${o.target.port}`;
    this.pairObj = {
      apiVersion: "understudy.dev/v1alpha1",
      kind: "ReplicationPair",
      metadata: { namespace: DEMO_NAMESPACE, name: o.set, generation: 1, uid: "demo" },
      spec: { source: { agent: { address: src } }, targets: [{ name: "standby", agent: { address: dst } }], replicationSet: { path: o.path } },
      status: {},
    };
    this.view = this.refresh(true)!;
    this.timer = setInterval(() => {
      const v = this.refresh(false);
      if (v) for (const l of this.listeners) l({ pair: v });
    }, o.intervalMs ?? 1000);
    this.timer.unref();
  }

  /** A new view when the status changed, else undefined. */
  private refresh(first: boolean): PairView | undefined {
    const now = new Date();
    const { status, transitions } = computeStatus(this.pairObj, {
      now,
      setName: this.o.set,
      source: { status: this.o.source.status() },
      targets: new Map([[this.pairObj.spec.targets[0]!.agent.address, { status: this.o.target.status() }]]),
    });
    status.activeSide = "source";
    status.observedGeneration = 1;
    if (!first && JSON.stringify(status) === JSON.stringify(this.pairObj.status)) return undefined;
    this.pairObj = { ...this.pairObj, status };
    for (const t of transitions) this.event(t.status === "True" && t.type === "Degraded" ? "Warning" : "Normal", t.reason, `${t.type}=${t.status}: ${t.message}`, now);
    const p = this.pairObj;
    this.view = { namespace: DEMO_NAMESPACE, name: this.o.set, labels: {}, generation: 1, spec: { source: p.spec.source, targets: p.spec.targets, replicationSet: p.spec.replicationSet, activeSide: "source" }, status, failovers: [] };
    return this.view;
  }

  private event(type: string, reason: string, message: string, at: Date): void {
    const e: EventView = { uid: `demo-${++this.seq}`, namespace: DEMO_NAMESPACE, kind: "ReplicationPair", name: this.o.set, type, reason, message, count: 1, last: at.toISOString() };
    this.evs.unshift(e);
    this.evs.length = Math.min(this.evs.length, 500);
    for (const l of this.listeners) l({ event: e });
  }

  pairs(): PairView[] {
    return [this.view];
  }

  pair(namespace: string, name: string): PairView | undefined {
    return namespace === DEMO_NAMESPACE && name === this.o.set ? this.view : undefined;
  }

  events(): EventView[] {
    return this.evs;
  }

  onChange(fn: (c: Change) => void): void {
    this.listeners.push(fn);
  }

  async act(_caller: Caller, _ns: string, _name: string, action: Action, req: ActionRequest): Promise<ActionReply> {
    const set = this.o.source.sets.find((s) => s.cfg.name === this.o.set);
    if (!set) throw new Error(`the demo's source agent has no set ${this.o.set}`);
    const request = String(Date.now());
    if (action === "verify") {
      this.event("Normal", "VerifyRequested", `verify${req.repair ? " with repair" : ""} requested from the dashboard`, new Date());
      void set.verify(undefined, !!req.repair).then(
        (r) => this.event(r.ok ? "Normal" : "Warning", r.ok ? "VerifyPassed" : "DifferencesFound", `verify of standby: ${r.filesCompared} files compared, ${r.differences.length} difference(s)${r.repaired ? `, ${r.repaired} repaired` : ""}`, new Date()),
        (e: Error) => this.event("Warning", "VerifyError", e.message, new Date()),
      );
      // The operator records the request it handled; here it is handled at once.
      this.pairObj = { ...this.pairObj, status: { ...this.pairObj.status, lastHandledVerifyRequest: request } };
      return { ok: true, message: `verify of ${DEMO_NAMESPACE}/${this.o.set} started`, request };
    }
    if (action === "mirror") {
      const started = set.mirror(undefined, req.mode ?? "checksum");
      this.pairObj = { ...this.pairObj, status: { ...this.pairObj.status, lastHandledMirrorRequest: request } };
      this.event("Normal", "MirrorRequested", `${req.mode ?? "checksum"} mirror requested from the dashboard (${started.length ? started.join(", ") : "already running"})`, new Date());
      return { ok: true, message: `${req.mode ?? "checksum"} mirror of ${DEMO_NAMESPACE}/${this.o.set} started`, request };
    }
    throw Object.assign(new Error(`${action} needs the operator`), { code: 409 });
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
  }
}

/** The demo's page is on loopback only and acts as the person at this machine; failover needs the operator. */
export class DemoAuthorizer implements Authorizer {
  async authenticate(): Promise<Caller> {
    return { user: "demo", groups: [] };
  }
  async canRead(): Promise<{ pairs: boolean; events: boolean }> {
    return { pairs: true, events: true };
  }
  async can(_c: Caller, _ns: string, _name: string, action: Action): Promise<Decision> {
    if (action === "verify" || action === "mirror") return { allowed: true };
    return { allowed: false, why: `${action} needs the operator on Kubernetes (the demo has two agents and no control plane): see "Running it from Kubernetes" in the README` };
  }
}
