// Wires the operator together, as controller-runtime's manager does: informer
// caches start at once (a standby is ready to take over); workers start only
// on the replica holding the Lease; /metrics, /healthz and /readyz serve all
// along. Losing the Lease ends the process, so a deposed leader never acts.
import { CoreV1Api, KubeConfig } from "@kubernetes/client-node";
import { readFile, stat } from "node:fs/promises";
import path from "node:path";
import { X509Certificate } from "node:crypto";
import { loadCaSigner, signLeaf } from "../common/tls.ts";
import { AGENT_VERSION } from "../agent/wire.ts";
import type { EndpointProvisioner } from "./controllers/endpoints.ts";
// Provisioning (AWS SDK, ssh2: ~100 MB of resident code) loads only when it is configured.
import type { EnrollmentServer } from "./enroll/server.ts";
import { randomBytes } from "node:crypto";
import { hostname } from "node:os";
import type { Server } from "node:http";
import type { TlsConfig } from "../common/config.ts";
import type { Logger } from "../common/log.ts";
import { AgentPool } from "./agents.ts";
import { FAILOVER_POLICIES, REPLICATION_PAIRS, getCondition, type FailoverPolicy, type ReplicationPair } from "./api/v1alpha1/index.ts";
import { selects } from "./controllers/known-good.ts";
import { ReplicationPairReconciler } from "./controllers/replicationpair.ts";
import { KubeEventRecorder, KubeIdentityMover, KubePairWriter, KubePolicyWriter, crInformer, reuseConnections } from "./kube.ts";
import { OperatorMetrics } from "./metrics.ts";
import { serveHttp } from "./runtime/http.ts";
import { LeaderElector, errText } from "./runtime/leader-election.ts";
import { WorkQueue } from "./runtime/workqueue.ts";
import { createNotifications } from "./controllers/notifications.ts";

export interface OperatorOptions {
  kubeconfig?: string;
  /** Watch only this namespace (default: all). */
  namespace?: string;
  leaderElect: boolean;
  leaderElectionNamespace: string;
  leaderElectionId: string;
  leaseDurationMs?: number;
  renewDeadlineMs?: number;
  retryPeriodMs?: number;
  metricsBind: string;
  healthBind: string;
  agentTls: TlsConfig;
  workers: number;
  statusIntervalMs: number;
  /**
   * Agents the operator puts in place: the CA that signs their certificates
   * (ca.crt, ca.key), the agent bundle they install, and the enrollment endpoint
   * (listen address, and the https URL instances reach it at). ec2 endpoints need
   * all of it; without it pairs with such endpoints say so in their status.
   */
  provisioning?: { caDir: string; bundlePath: string; enrollListen: string; enrollUrl?: string };
  /** Bound on one reconcile, Kubernetes calls included. */
  reconcileTimeoutMs?: number;
  /** Serve the dashboard (operator/dashboard/) at this host:port, with tls.crt/tls.key from tlsDir. */
  dashboard?: { address: string; tlsDir?: string };
  log: Logger;
  /** NotificationPolicies' SNMP agent (pair table): host:port, and the v2c communities it answers. */
  snmp?: { listen: string; communities: string[] };
}

const CONTROLLER = "replicationpair";

export class Operator {
  readonly metrics = new OperatorMetrics();
  readonly identity = `${hostname()}_${randomBytes(4).toString("hex")}`;
  private readonly o: OperatorOptions;
  private readonly kc = new KubeConfig();
  private readonly queue = new WorkQueue();
  private readonly pool: AgentPool;
  private elector?: LeaderElector;
  private servers: Server[] = [];
  private synced = false;
  private stopping = false;
  private workers: Promise<void>[] = [];
  private informer?: ReturnType<typeof crInformer<ReplicationPair>>;
  private policies?: ReturnType<typeof crInformer<FailoverPolicy>>;
  /** What last triggered a reconcile per key: status-only updates (our own writes) do not. */
  private readonly seen = new Map<string, string>();
  private readonly seenLabels = new Map<string, Record<string, string>>();
  private notifications?: ReturnType<typeof createNotifications>;
  private dashboard?: { stop: () => Promise<void> };

  constructor(o: OperatorOptions) {
    this.o = o;
    if (o.kubeconfig) this.kc.loadFromFile(o.kubeconfig);
    else {
      this.kc.loadFromDefault();
      // client-node falls back to http://localhost:8080 when it finds nothing: say so instead.
      if (!process.env.KUBECONFIG && !process.env.KUBERNETES_SERVICE_HOST && this.kc.getCurrentCluster()?.server === "http://localhost:8080") {
        throw new Error("no Kubernetes configuration found: give --kubeconfig, set KUBECONFIG, or run in a cluster");
      }
    }
    reuseConnections(this.kc);
    this.pool = new AgentPool({
      tls: o.agentTls,
      statusTtlMs: 1000,
      onCall: (method, ok, s) => {
        this.metrics.agentCalls.inc({ method, result: ok ? "ok" : "error" });
        this.metrics.agentCallSeconds.observe({ method }, s);
      },
    });
    this.queue.onDequeue = (ms) => this.metrics.queueWaitSeconds.observe({ controller: CONTROLLER }, ms / 1000);
  }

  /**
   * /readyz: ok only while this replica can do its job (caches synced and
   * watching, the Lease usable); otherwise every reason, e.g. a 403 on the Lease.
   */
  readiness(): { ok: boolean; why?: string } {
    // Every reconcile since the last good one was refused by the API server (RBAC): the leader cannot do its job.
    const refused = this.forbidden && this.forbidden.at > this.lastReconciled ? `reconciles are refused since ${new Date(this.forbidden.at).toISOString()}: ${this.forbidden.error}` : undefined;
    const problems = [this.synced ? undefined : "caches not synced", this.informer?.problem(), this.policies?.problem(), this.elector?.problem, refused].filter((p): p is string => !!p);
    return problems.length ? { ok: false, why: problems.join("; ") } : { ok: true };
  }

  /** The last reconcile the API server refused (403), and when a reconcile last succeeded: /readyz. */
  private forbidden?: { at: number; error: string };
  private lastReconciled = 0;

  get isLeader(): boolean {
    return !this.o.leaderElect || (this.elector?.isLeader ?? false);
  }

  async start(): Promise<void> {
    const log = this.o.log;
    this.servers = (await Promise.all([
      serveHttp(this.o.metricsBind, { registry: this.metrics.registry }),
      serveHttp(this.o.healthBind, {
        probes: {
          healthy: () => !this.stopping,
          ready: () => this.readiness(),
        },
      }),
    ])).filter((s): s is Server => !!s);

    const inf = (this.informer = crInformer<ReplicationPair>(this.kc, REPLICATION_PAIRS, this.o.namespace, log));
    const keyOf = (p: ReplicationPair) => `${p.metadata.namespace}/${p.metadata.name}`;
    const trigger = (p: ReplicationPair) => JSON.stringify([p.metadata.generation, p.metadata.labels ?? {}, p.metadata.annotations ?? {}, p.metadata.deletionTimestamp ?? "", p.metadata.finalizers ?? []]);
    const requeuePolicies = (ns: string | undefined) => {
      for (const pol of this.policies?.list(ns) ?? []) this.queue.add(`policy:${pol.metadata.namespace}/${pol.metadata.name}`);
    };
    const onChange = (p: ReplicationPair) => {
      const k = keyOf(p);
      const t = trigger(p);
      if (this.seen.get(k) === t) return;
      if (!this.seen.has(k) || JSON.stringify(this.seenLabels.get(k)) !== JSON.stringify(p.metadata.labels ?? {})) requeuePolicies(p.metadata.namespace);
      this.seen.set(k, t);
      this.seenLabels.set(k, p.metadata.labels ?? {});
      this.queue.add(k, true);
    };
    inf.on("add", onChange);
    inf.on("update", onChange);
    inf.on("delete", (p) => {
      this.seen.delete(keyOf(p));
      this.seenLabels.delete(keyOf(p));
      requeuePolicies(p.metadata.namespace);
      this.metrics.forgetPair(p.metadata.namespace!, p.metadata.name!);
      this.queue.add(keyOf(p), true);
    });
    const pols = (this.policies = crInformer<FailoverPolicy>(this.kc, FAILOVER_POLICIES, this.o.namespace, log));
    // A policy that changes affects every pair it selects (or selected).
    const requeuePolicyPairs = (p: FailoverPolicy) => {
      for (const pair of inf.list(p.metadata.namespace)) this.queue.add(keyOf(pair));
      this.queue.add(`policy:${p.metadata.namespace}/${p.metadata.name}`);
    };
    pols.on("add", requeuePolicyPairs);
    pols.on("update", requeuePolicyPairs);
    pols.on("delete", requeuePolicyPairs);
    this.notifications = createNotifications(this.kc, { namespace: this.o.namespace, log, registry: this.metrics.registry, pairs: inf, ...(this.o.snmp ? { snmp: this.o.snmp } : {}) });
    await Promise.all([inf.start(), pols.start()]);
    await Promise.all([inf.synced, pols.synced, this.notifications.start()]);
    this.synced = true;
    log.info({ pairs: inf.list().length, namespace: this.o.namespace ?? "(all)" }, "caches synced");
    // Every replica serves enrollments (the store is atomic in the API server); only the leader launches.
    const provisioners = this.o.provisioning ? await this.startProvisioning(this.o.provisioning) : [];
    // Every replica serves the dashboard from its caches (actions are patches any replica can make).
    if (this.o.dashboard) this.dashboard = await (await import("./dashboard/index.ts")).startKubeDashboard({ ...this.o.dashboard, kc: this.kc, pairs: inf, policyFor: (p) => this.policyFor(p), namespace: this.o.namespace, log });

    if (this.o.leaderElect) {
      this.elector = new LeaderElector(this.kc, {
        namespace: this.o.leaderElectionNamespace,
        name: this.o.leaderElectionId,
        identity: this.identity,
        leaseDurationMs: this.o.leaseDurationMs,
        renewDeadlineMs: this.o.renewDeadlineMs,
        retryPeriodMs: this.o.retryPeriodMs,
        log,
      });
      await this.elector.run((why) => {
        log.fatal({ why }, "leadership lost; exiting so a fresh replica takes over");
        process.exit(1);
      });
      if (this.stopping) return;
    }
    this.metrics.leader.set(1);
    this.notifications.lead();
    const reconciler = new ReplicationPairReconciler({
      get: (ns, name) => inf.get(name, ns),
      writer: new KubePairWriter(this.kc),
      agents: this.pool,
      events: new KubeEventRecorder(this.kc, { component: "understudy-operator", instance: this.identity, log }),
      log: log.child({ controller: CONTROLLER }),
      statusIntervalMs: this.o.statusIntervalMs,
      policyFor: (pair) => this.policyFor(pair),
      identity: new KubeIdentityMover(this.kc),
      provisioners,
    });
    this.policyWriter = new KubePolicyWriter(this.kc);
    for (const p of inf.list()) this.queue.add(keyOf(p));
    for (const p of pols.list()) this.queue.add(`policy:${p.metadata.namespace}/${p.metadata.name}`);
    for (let i = 0; i < this.o.workers; i++) this.workers.push(this.work(reconciler));
    log.info({ workers: this.o.workers, identity: this.identity }, "reconciling");
  }

  private policyWriter?: KubePolicyWriter;
  private enrollServer?: EnrollmentServer;

  /** The enrollment endpoint and the provisioners that use it. */
  private async startProvisioning(p: NonNullable<OperatorOptions["provisioning"]>): Promise<EndpointProvisioner[]> {
    const [{ Ec2Provisioner }, { SshProvisioner }, { KubeEnrollmentStore }, { EnrollProvisioner }, { EnrollmentServer }, { enrollmentKey, issueToken }] = await Promise.all([
      import("./ec2/provisioner.ts"), import("./ssh/provisioner.ts"), import("./enroll/kube-store.ts"), import("./enroll/provisioner.ts"), import("./enroll/server.ts"), import("./enroll/tokens.ts"),
    ]);
    const read = async (f: string) => readFile(path.join(p.caDir, f), "utf8").catch((e: NodeJS.ErrnoException) => {
      throw new Error(`--ca-dir ${p.caDir}: cannot read ${f}: ${e.code ?? e.message}`);
    });
    const [caPem, caKeyPem] = await Promise.all([read("ca.crt"), read("ca.key")]);
    const ca = await loadCaSigner(caPem, caKeyPem, { what: "--ca-dir", cert: path.join(p.caDir, "ca.crt"), key: path.join(p.caDir, "ca.key") });
    const tls = this.o.agentTls;
    // agents we put in place are changed by us: the CN of our own client certificate
    const admin = tls.insecure ? "understudy-operator" : (new X509Certificate(await readFile(tls.cert)).subject.match(/^CN=(.+)$/m)?.[1] ?? "understudy-operator");
    const core = this.kc.makeApiClient(CoreV1Api);
    const base = path.basename(p.bundlePath);
    if (!base.includes(`-${AGENT_VERSION}-`)) throw new Error(`--agent-bundle ${p.bundlePath} is not the bundle of this version (${AGENT_VERSION}); build it with \`npm run bundle\``);
    await stat(p.bundlePath).catch((e: NodeJS.ErrnoException) => {
      throw new Error(`--agent-bundle ${p.bundlePath}: ${e.code ?? e.message}`);
    });
    const readSecret = async (namespace: string, name: string) => {
      try {
        const sec = await core.readNamespacedSecret({ namespace, name });
        return Object.fromEntries(Object.entries(sec.data ?? {}).map(([k, v]) => [k, Buffer.from(v, "base64").toString("utf8")]));
      } catch (e) {
        if ((e as { code?: number }).code === 404) return undefined;
        throw e;
      }
    };
    const bundle = { path: p.bundlePath, version: AGENT_VERSION };
    const ssh = new SshProvisioner({ bundle, ca: { ...ca, certPem: caPem }, admins: [admin], readSecret, log: this.o.log.child({ component: "ssh" }) });
    if (!p.enrollUrl) return [ssh];

    const key = enrollmentKey(caKeyPem);
    const url = new URL(p.enrollUrl);
    const host = url.hostname.replace(/^\[|\]$/g, "");
    const isIp = /^[0-9.]+$/.test(host) || host.includes(":");
    const served = await signLeaf(ca, { commonName: "understudy-enrollment", usage: "server", sans: [{ type: isIp ? "ip" : "dns", value: host }], days: 365 });
    const inf = this.informer!;
    const store = new KubeEnrollmentStore({ core, getPair: (ns, name) => inf.get(name, ns), admins: [admin], log: this.o.log });
    const [lhost, lport] = [p.enrollListen.slice(0, p.enrollListen.lastIndexOf(":")).replace(/^\[|\]$/g, ""), Number(p.enrollListen.slice(p.enrollListen.lastIndexOf(":") + 1))];
    this.enrollServer = new EnrollmentServer({ ca, caPem, key, serverCertPem: served.certPem, serverKeyPem: served.keyPem, store, log: this.o.log.child({ component: "enrollment" }), host: lhost, port: lport });
    const at = await this.enrollServer.start();
    this.o.log.info({ listen: `${at.host}:${at.port}`, url: p.enrollUrl }, "enrollment endpoint serving");
    return [
      ssh,
      new EnrollProvisioner({ url: p.enrollUrl, caPem, issueToken: (claims) => issueToken(key, claims), ledger: store, secrets: store, log: this.o.log.child({ component: "enroll" }) }),
      new Ec2Provisioner({
        bundle,
        enrollment: { url: p.enrollUrl, caPem, issueToken: (claims) => issueToken(key, claims) },
        ledger: store,
        readSecret,
        log: this.o.log.child({ component: "ec2" }),
      }),
    ];
  }

  /** The policy selecting a pair: the first (by name) in its namespace whose selector matches. */
  private policyFor(pair: ReplicationPair): FailoverPolicy | undefined {
    return [...(this.policies?.list(pair.metadata.namespace) ?? [])].sort((a, b) => a.metadata.name!.localeCompare(b.metadata.name!)).find((p) => selects(p, pair.metadata.labels));
  }

  /** A policy's status: the pairs it selects (its own controller would be overkill: it has no outside state). */
  private async reconcilePolicy(key: string): Promise<void> {
    const [ns, name] = key.slice("policy:".length).split("/") as [string, string];
    const p = this.policies?.get(name, ns);
    if (!p) return;
    const pairs = (this.informer?.list(ns) ?? []).filter((x) => this.policyFor(x)?.metadata.name === name).map((x) => x.metadata.name!).sort();
    await this.policyWriter!.patchStatus(p, pairs);
  }

  private async work(r: ReplicationPairReconciler): Promise<void> {
    const timeoutMs = this.o.reconcileTimeoutMs ?? 60_000;
    for (;;) {
      this.metrics.queueDepth.set({ controller: CONTROLLER }, this.queue.length);
      const key = await this.queue.get();
      if (key === undefined) return;
      const end = this.metrics.reconcileSeconds.startTimer({ controller: CONTROLLER });
      let timer: NodeJS.Timeout | undefined;
      try {
        const res = await Promise.race([
          key.startsWith("policy:") ? this.reconcilePolicy(key).then(() => ({ requeueAfterMs: 30_000 })) : r.reconcile(key),
          new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`reconcile took longer than ${timeoutMs} ms`)), timeoutMs))),
        ]);
        this.queue.forget(key);
        // 0 means "again at once" (after a status write that must land first), undefined "only on a change"
        if (res.requeueAfterMs !== undefined) this.queue.addAfter(key, res.requeueAfterMs);
        this.metrics.reconciles.inc({ controller: CONTROLLER, result: "success" });
        this.lastReconciled = Date.now();
        if (!key.startsWith("policy:")) this.observePair(key);
      } catch (e) {
        const retryMs = this.queue.addRateLimited(key);
        if (errText(e).startsWith("403")) this.forbidden = { at: Date.now(), error: errText(e) };
        this.metrics.reconciles.inc({ controller: CONTROLLER, result: "error" });
        this.o.log.warn({ pair: key, err: errText(e), retryMs, failures: this.queue.numRequeues(key) }, "reconcile failed; will retry");
      } finally {
        clearTimeout(timer);
        end();
        this.queue.done(key);
      }
    }
  }

  private observePair(key: string): void {
    const [ns, name] = key.split("/") as [string, string];
    const p = this.informer?.get(name, ns);
    if (!p?.status) return;
    this.metrics.pairLag.set({ namespace: ns, name }, p.status.lagSeconds ?? 0);
    this.metrics.pairQueued.set({ namespace: ns, name }, p.status.queuedBytes ?? 0);
    this.metrics.pairReady.set({ namespace: ns, name }, getCondition(p.status.conditions, "Ready")?.status === "True" ? 1 : 0);
  }

  async stop(): Promise<void> {
    this.stopping = true;
    this.queue.shutDown();
    await Promise.race([Promise.all(this.workers), new Promise((r) => setTimeout(r, 10_000))]);
    await this.elector?.release();
    await this.informer?.stop().catch(() => undefined);
    await this.notifications?.stop();
    this.pool.close();
    await this.enrollServer?.stop().catch(() => undefined);
    await this.dashboard?.stop().catch(() => undefined);
    for (const s of this.servers) s.close();
    this.o.log.info("operator stopped");
  }
}
