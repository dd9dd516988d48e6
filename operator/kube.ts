// The operator's side of the Kubernetes API: informer caches for the CRs, the
// writes reconcilers make (finalizers and status, both guarded by
// resourceVersion so a stale cache cannot overwrite newer state), and Events.
import { ApiException, CoreV1Api, CustomObjectsApi, DiscoveryV1Api, PatchStrategy, makeInformer, setHeaderOptions, type Informer, type KubeConfig, type KubernetesListObject, type KubernetesObject, type ObjectCache } from "@kubernetes/client-node";
import { randomBytes } from "node:crypto";
import { isIP } from "node:net";
import type { Logger } from "../common/log.ts";
import { FAILOVER_POLICIES, GROUP, PAIR_FINALIZER, REPLICATION_PAIRS, VERSION, timestamp, type FailoverPolicy, type ReplicationPair, type ReplicationPairStatus } from "./api/v1alpha1/index.ts";
import type { EventRecorder, IdentityMover, PairWriter } from "./controllers/replicationpair.ts";
import { errText } from "./runtime/leader-election.ts";

const merge = setHeaderOptions("Content-Type", PatchStrategy.MergePatch);

/**
 * @kubernetes/client-node 2.0 builds a new undici Agent, so a new TLS
 * connection, for every API call (KubeConfig.applySecurityAuthentication →
 * createDispatcher). With hundreds of pairs that is a handshake per status
 * write and memory that only a GC gives back (the operator's RSS grew by
 * ~3 MB/s with 500 pairs). One dispatcher per cluster and user keeps a pool of
 * kept-alive connections instead. createDispatcher is private in its types,
 * hence the cast; the options it is given depend only on the kubeconfig.
 */
export function reuseConnections(kc: KubeConfig): KubeConfig {
  const k = kc as unknown as { createDispatcher: (cluster: { server?: string; name?: string } | null, opts: unknown) => unknown };
  const create = k.createDispatcher.bind(kc);
  const pool = new Map<string, unknown>();
  k.createDispatcher = (cluster, opts) => {
    const key = `${cluster?.name}|${cluster?.server}|${kc.getCurrentUser()?.name}`;
    if (!pool.has(key)) pool.set(key, create(cluster, opts));
    return pool.get(key);
  };
  return kc;
}

const LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration";

/**
 * Drop what the operator never reads from an object its informer keeps, in
 * place (the cache holds this very object): managedFields (server-side apply
 * bookkeeping, often larger than the spec and status together) and kubectl's
 * last-applied copy of the spec. With thousands of pairs they were most of
 * the cache.
 */
export function slim(obj: KubernetesObject): void {
  const m = obj.metadata;
  if (!m) return;
  delete m.managedFields;
  if (m.annotations && LAST_APPLIED in m.annotations) {
    delete m.annotations[LAST_APPLIED];
    if (Object.keys(m.annotations).length === 0) delete m.annotations;
  }
}

/**
 * A list+watch cache of one resource, restarted with backoff when its watch
 * fails (client-node leaves that to the caller). `synced` resolves after the
 * first successful list (client-node's start() resolves even when it failed).
 */
export function crInformer<T extends KubernetesObject>(kc: KubeConfig, plural: string, namespace: string | undefined, log: Logger): Informer<T> & ObjectCache<T> & { synced: Promise<void>; problem(): string | undefined } {
  const api = kc.makeApiClient(CustomObjectsApi);
  const path = namespace ? `/apis/${GROUP}/${VERSION}/namespaces/${namespace}/${plural}` : `/apis/${GROUP}/${VERSION}/${plural}`;
  let markSynced!: () => void;
  const synced = new Promise<void>((r) => (markSynced = r));
  // The last failure of the list or the watch, until they work again: /readyz reports it (a 403 on the list is not "ready").
  let failing: { error: string; since: number; list: boolean } | undefined;
  const problem = () => (failing ? `cannot ${failing.list ? "list" : "watch"} ${plural}${namespace ? ` in ${namespace}` : ""}: ${failing.error} (since ${new Date(failing.since).toISOString()})` : undefined);
  const list = async (): Promise<KubernetesListObject<T>> => {
    let l: KubernetesListObject<T>;
    try {
      l = (namespace ? await api.listNamespacedCustomObject({ group: GROUP, version: VERSION, namespace, plural }) : await api.listClusterCustomObject({ group: GROUP, version: VERSION, plural })) as KubernetesListObject<T>;
    } catch (e) {
      failing = { error: errText(e), since: failing?.since ?? Date.now(), list: true };
      throw e;
    }
    failing = undefined;
    // Resolved once the informer has stored these items (it does so right after this returns).
    queueMicrotask(markSynced);
    return l;
  };
  const inf = Object.assign(makeInformer<T>(kc, path, list), { synced, problem });
  // Registered first, so every other handler and the cache itself see the slim object.
  inf.on("add", slim);
  inf.on("update", slim);
  let delay = 1000;
  inf.on("connect", () => {
    delay = 1000;
    // connect comes before the list: only a watch failure is over (a failing list says so again)
    if (failing && !failing.list) failing = undefined;
  });
  inf.on("error", (err) => {
    if (!failing?.list) failing = { error: errText(err), since: failing?.since ?? Date.now(), list: false };
    log.warn({ resource: plural, err: errText(err), retryMs: delay }, "watch failed; restarting");
    setTimeout(() => void inf.start().catch(() => undefined), delay).unref();
    delay = Math.min(delay * 2, 30_000);
  });
  return inf;
}

/**
 * A JSON merge patch (RFC 7386) from `from` to `to`: what `to` leaves out is
 * sent as null, so the API server deletes it. Without that, a field the new
 * status no longer has (lag after a failover, sourceDownSince once the source
 * is back) kept its old value on the server for ever.
 */
export function mergePatch(from: object, to: object): Record<string, unknown> {
  const a = from as Record<string, unknown>;
  const out: Record<string, unknown> = { ...(to as Record<string, unknown>) };
  const plain = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
  for (const k of Object.keys(a)) {
    if (!(k in out) || out[k] === undefined) out[k] = null;
    else if (plain(a[k]) && plain(out[k])) out[k] = mergePatch(a[k], out[k]);
  }
  return out;
}

export class KubePairWriter implements PairWriter {
  private readonly api: CustomObjectsApi;
  constructor(kc: KubeConfig) {
    this.api = kc.makeApiClient(CustomObjectsApi);
  }

  private patch(pair: ReplicationPair, body: object, status = false): Promise<unknown> {
    const req = { group: GROUP, version: VERSION, namespace: pair.metadata.namespace!, plural: REPLICATION_PAIRS, name: pair.metadata.name!, body };
    return status ? this.api.patchNamespacedCustomObjectStatus(req, merge) : this.api.patchNamespacedCustomObject(req, merge);
  }

  async addFinalizer(pair: ReplicationPair): Promise<string | undefined> {
    const updated = (await this.patch(pair, { metadata: { resourceVersion: pair.metadata.resourceVersion, finalizers: [...(pair.metadata.finalizers ?? []), PAIR_FINALIZER] } })) as ReplicationPair;
    return updated.metadata?.resourceVersion;
  }

  async removeFinalizer(pair: ReplicationPair): Promise<void> {
    try {
      await this.patch(pair, { metadata: { resourceVersion: pair.metadata.resourceVersion, finalizers: (pair.metadata.finalizers ?? []).filter((f) => f !== PAIR_FINALIZER) } });
    } catch (e) {
      if (e instanceof ApiException && e.code === 404) return;
      throw e;
    }
  }

  async setActiveSide(pair: ReplicationPair, side: string): Promise<void> {
    await this.patch(pair, { metadata: { resourceVersion: pair.metadata.resourceVersion }, spec: { activeSide: side } });
  }

  async patchStatus(pair: ReplicationPair, status: ReplicationPairStatus): Promise<string | undefined> {
    const updated = (await this.patch(pair, { metadata: { resourceVersion: pair.metadata.resourceVersion }, status: mergePatch(pair.status ?? {}, status) }, true)) as ReplicationPair;
    return updated.metadata?.resourceVersion;
  }
}

/**
 * core/v1 Events as `kubectl describe` shows them. Repeats of one event within
 * ten minutes raise its count instead of adding objects (as client-go's
 * recorder does); sending never blocks or fails a reconcile.
 */
export class KubeEventRecorder implements EventRecorder {
  private readonly api: CoreV1Api;
  private readonly seen = new Map<string, { name: string; count: number; first: string; at: number }>();
  private readonly component: string;
  private readonly instance: string;
  private readonly log: Logger;
  constructor(kc: KubeConfig, o: { component: string; instance: string; log: Logger }) {
    this.api = kc.makeApiClient(CoreV1Api);
    this.component = o.component;
    this.instance = o.instance;
    this.log = o.log;
  }

  event(obj: ReplicationPair, type: "Normal" | "Warning", reason: string, message: string): void {
    void this.send(obj, type, reason, message.slice(0, 1024)).catch((e) => this.log.warn({ reason, err: errText(e) }, "could not record event"));
  }

  private async send(obj: ReplicationPair, type: string, reason: string, message: string): Promise<void> {
    const ns = obj.metadata.namespace!;
    const key = `${obj.metadata.uid}|${type}|${reason}|${message}`;
    const now = new Date();
    const prev = this.seen.get(key);
    if (prev && now.getTime() - prev.at < 600_000) {
      prev.count++;
      prev.at = now.getTime();
      try {
        await this.api.patchNamespacedEvent({ name: prev.name, namespace: ns, body: { count: prev.count, lastTimestamp: now } }, merge);
        return;
      } catch (e) {
        if (!(e instanceof ApiException && e.code === 404)) throw e;
      }
    }
    if (this.seen.size > 10_000) this.seen.clear();
    const name = `${obj.metadata.name}.${randomBytes(8).toString("hex")}`;
    this.seen.set(key, { name, count: 1, first: now.toISOString(), at: now.getTime() });
    await this.api.createNamespacedEvent({
      namespace: ns,
      body: {
        metadata: { name, namespace: ns },
        involvedObject: { apiVersion: obj.apiVersion ?? `${GROUP}/${VERSION}`, kind: obj.kind ?? "ReplicationPair", name: obj.metadata.name, namespace: ns, uid: obj.metadata.uid, resourceVersion: obj.metadata.resourceVersion },
        reason,
        message,
        type,
        count: 1,
        firstTimestamp: now,
        lastTimestamp: now,
        source: { component: this.component },
        reportingComponent: this.component,
        reportingInstance: this.instance,
      },
    });
  }
}

/**
 * Moves a service's identity: the EndpointSlice `<service>-understudy` of a
 * selector-less Service points at the active side's address, so clients of
 * the Service follow a failover.
 */
export class KubeIdentityMover implements IdentityMover {
  private readonly api: DiscoveryV1Api;
  constructor(kc: KubeConfig) {
    this.api = kc.makeApiClient(DiscoveryV1Api);
  }

  async pointService(namespace: string, service: string, port: number | undefined, address: string): Promise<void> {
    const name = `${service}-understudy`;
    const fam = isIP(address);
    const body = {
      apiVersion: "discovery.k8s.io/v1",
      kind: "EndpointSlice",
      metadata: { name, namespace, labels: { "kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "understudy.dev" } },
      addressType: fam === 6 ? "IPv6" : fam === 4 ? "IPv4" : "FQDN",
      endpoints: [{ addresses: [address], conditions: { ready: true } }],
      ports: port ? [{ name: "", port, protocol: "TCP" }] : [],
    };
    try {
      const cur = await this.api.readNamespacedEndpointSlice({ name, namespace });
      await this.api.replaceNamespacedEndpointSlice({ name, namespace, body: { ...body, metadata: { ...body.metadata, resourceVersion: cur.metadata?.resourceVersion } } });
    } catch (e) {
      if (!(e instanceof ApiException && e.code === 404)) throw e;
      await this.api.createNamespacedEndpointSlice({ namespace, body });
    }
  }
}

export class KubePolicyWriter {
  private readonly api: CustomObjectsApi;
  constructor(kc: KubeConfig) {
    this.api = kc.makeApiClient(CustomObjectsApi);
  }

  async patchStatus(p: FailoverPolicy, pairs: string[]): Promise<void> {
    const now = timestamp(new Date());
    const prev = p.status?.conditions?.find((c) => c.type === "Ready");
    const status = {
      observedGeneration: p.metadata.generation,
      matchedPairs: pairs.length,
      pairs,
      conditions: [{ type: "Ready", status: "True", reason: "Selecting", message: `selects ${pairs.length} pair(s)`, observedGeneration: p.metadata.generation, lastTransitionTime: prev?.status === "True" ? prev.lastTransitionTime : now }],
    };
    if (JSON.stringify({ ...p.status, conditions: undefined }) === JSON.stringify({ ...status, conditions: undefined }) && prev?.status === "True") return;
    await this.api.patchNamespacedCustomObjectStatus({ group: GROUP, version: VERSION, namespace: p.metadata.namespace!, plural: FAILOVER_POLICIES, name: p.metadata.name!, body: { status } }, merge);
  }
}
