// The dashboard's data from Kubernetes: the operator's own informer caches of
// ReplicationPairs and FailoverPolicies (no extra reads of pairs), plus a
// list+watch of the Events about understudy.dev objects (pairs and policies),
// the newest 1000 kept. Actions are patches made with the caller's own token,
// so the API server checks them again and its audit log names the person.
import { CoreV1Api, CustomObjectsApi, KubeConfig, ListWatch, PatchStrategy, Watch, setHeaderOptions, type CoreV1Event, type Informer, type KubernetesListObject, type ObjectCache } from "@kubernetes/client-node";
import type { Logger } from "../../common/log.ts";
import { GROUP, REPLICATION_PAIRS, VERSION, type FailoverPolicy, type ReplicationPair } from "../api/v1alpha1/index.ts";
import { errText } from "../runtime/leader-election.ts";
import { actionPatch } from "./actions.ts";
import type { Action, ActionReply, ActionRequest, EventView, PairView } from "./model.ts";
import type { Caller, Change, DashboardSource } from "./source.ts";

const MAX_EVENTS = 1000;

export interface KubeSourceOptions {
  kc: KubeConfig;
  pairs: Informer<ReplicationPair> & ObjectCache<ReplicationPair>;
  /** The FailoverPolicy that selects a pair (the operator's own choice). */
  policyFor: (p: ReplicationPair) => FailoverPolicy | undefined;
  namespace?: string;
  log: Logger;
}

export function toView(p: ReplicationPair, policy?: string): PairView {
  const s = p.spec;
  return {
    namespace: p.metadata.namespace ?? "",
    name: p.metadata.name ?? "",
    labels: p.metadata.labels ?? {},
    generation: p.metadata.generation,
    spec: { source: s.source, targets: s.targets, replicationSet: s.replicationSet, activeSide: s.activeSide, mode: s.mode, compression: s.compression, bandwidthLimit: s.bandwidthLimit },
    status: p.status ?? {},
    ...(policy ? { policy } : {}),
    failovers: [],
  };
}

export function eventView(e: CoreV1Event): EventView {
  const last = e.lastTimestamp ?? e.eventTime ?? e.firstTimestamp ?? e.metadata.creationTimestamp;
  return {
    uid: e.metadata.uid ?? `${e.metadata.namespace}/${e.metadata.name}`,
    namespace: e.involvedObject.namespace ?? e.metadata.namespace ?? "",
    kind: e.involvedObject.kind ?? "",
    name: e.involvedObject.name ?? "",
    type: e.type ?? "Normal",
    reason: e.reason ?? "",
    message: e.message ?? "",
    count: e.count ?? 1,
    last: last ? new Date(last as unknown as string).toISOString() : "",
  };
}

export class KubeSource implements DashboardSource {
  readonly kind = "kubernetes" as const;
  private readonly o: KubeSourceOptions;
  private readonly listeners: ((c: Change) => void)[] = [];
  private readonly views = new WeakMap<ReplicationPair, PairView>();
  private readonly evs = new Map<string, EventView>();
  private events$?: ListWatch<CoreV1Event>;
  private stopped = false;

  constructor(o: KubeSourceOptions) {
    this.o = o;
    const emit = (c: Change) => {
      for (const l of this.listeners) l(c);
    };
    o.pairs.on("add", (p) => emit({ pair: this.view(p) }));
    o.pairs.on("update", (p) => emit({ pair: this.view(p) }));
    o.pairs.on("delete", (p) => emit({ gone: { namespace: p.metadata.namespace!, name: p.metadata.name! } }));
    this.watchEvents(emit);
  }

  private view(p: ReplicationPair): PairView {
    let v = this.views.get(p);
    if (!v) this.views.set(p, (v = toView(p, this.o.policyFor(p)?.metadata.name)));
    return v;
  }

  private watchEvents(emit: (c: Change) => void): void {
    const { kc, namespace, log } = this.o;
    const core = kc.makeApiClient(CoreV1Api);
    // Events of understudy.dev objects only: pairs, FailoverPolicies, and whatever else the group grows.
    const fieldSelector = `involvedObject.apiVersion=${GROUP}/${VERSION}`;
    const path = namespace ? `/api/v1/namespaces/${namespace}/events` : "/api/v1/events";
    const list = async () => (namespace ? core.listNamespacedEvent({ namespace, fieldSelector }) : core.listEventForAllNamespaces({ fieldSelector })) as Promise<KubernetesListObject<CoreV1Event>>;
    const lw = (this.events$ = new ListWatch<CoreV1Event>(path, new Watch(kc), list, false, undefined, fieldSelector));
    const put = (e: CoreV1Event) => {
      const v = eventView(e);
      this.evs.delete(v.uid);
      this.evs.set(v.uid, v);
      if (this.evs.size > MAX_EVENTS) this.evs.delete(this.evs.keys().next().value!);
      emit({ event: v });
    };
    lw.on("add", put);
    lw.on("update", put);
    let delay = 1000;
    lw.on("connect", () => (delay = 1000));
    lw.on("error", (err) => {
      if (this.stopped) return;
      log.warn({ resource: "events", err: errText(err), retryMs: delay }, "dashboard: events watch failed; restarting");
      setTimeout(() => void lw.start().catch(() => undefined), delay).unref();
      delay = Math.min(delay * 2, 30_000);
    });
    void lw.start().catch((e: unknown) => log.warn({ err: errText(e) }, "dashboard: events list failed"));
  }

  pairs(): PairView[] {
    return this.o.pairs.list().map((p) => this.view(p));
  }

  pair(namespace: string, name: string): PairView | undefined {
    const p = this.o.pairs.get(name, namespace);
    return p && this.view(p);
  }

  events(): EventView[] {
    // Insertion order is "last seen" order; sort by time for events replayed by a relist.
    return [...this.evs.values()].sort((a, b) => b.last.localeCompare(a.last));
  }

  onChange(fn: (c: Change) => void): void {
    this.listeners.push(fn);
  }

  async act(caller: Caller, namespace: string, name: string, action: Action, req: ActionRequest): Promise<ActionReply> {
    const pair = this.o.pairs.get(name, namespace);
    if (!pair) throw Object.assign(new Error(`no pair ${namespace}/${name}`), { code: 404 });
    const { body, message, request } = actionPatch(pair, action, req, new Date());
    // The caller's own credentials: the API server authorises the patch again and audits it as them.
    const kc = new KubeConfig();
    const cluster = this.o.kc.getCurrentCluster();
    if (!cluster) throw new Error("the operator's kubeconfig names no cluster");
    kc.loadFromClusterAndUser(cluster, { name: caller.user, token: caller.token });
    const api = kc.makeApiClient(CustomObjectsApi);
    try {
      await api.patchNamespacedCustomObject({ group: GROUP, version: VERSION, namespace, plural: REPLICATION_PAIRS, name, body }, setHeaderOptions("Content-Type", PatchStrategy.MergePatch));
    } catch (e) {
      const code = (e as { code?: number }).code;
      throw Object.assign(new Error(`the API server refused the change: ${errText(e)}`), { code });
    }
    return { ok: true, message, ...(request ? { request } : {}) };
  }

  async close(): Promise<void> {
    this.stopped = true;
    await this.events$?.stop();
  }
}
