// The world failover tests run in: a real API server with the chart installed,
// the operator with only the chart's RBAC, and agents on hosts of their own
// (network namespaces), so links can be cut and the service identity points at
// real (non-loopback) addresses.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdir, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { startCluster, type Cluster } from "../env/cluster.ts";
import { CLI, REPO, compareTrees, snapshotTree, tmpDir, waitFor, type AgentProc } from "./harness.ts";
import { OperatorProc, Pki, getPair, kubectlOk, pairYaml, tlsAgent } from "./k8s-harness.ts";
import { createLab, type Host, type Lab } from "./netns.ts";
import type { TlsConfig } from "../../common/config.ts";
import type { ReplicationPair } from "../../operator/api/v1alpha1/index.ts";

export const SYS = "understudy-system";

export class FailoverWorld {
  cluster!: Cluster;
  dir!: string;
  lab!: Lab;
  op!: OperatorProc;
  kubeconfig!: string;
  tls!: TlsConfig;
  readonly agents: Record<string, AgentProc> = {};
  readonly hosts: Record<string, Host> = {};
  pki!: Pki;
  private tlsDir!: string;
  private lease = "";
  readonly ns: string;

  constructor(ns: string) {
    this.ns = ns;
  }

  /**
   * `o.helmSet`: extra `--set`s for the chart; `o.beforeOperator` runs once the lab and
   * the chart are there and returns extra operator flags (e.g. provisioning on the lab's gateway).
   */
  static async create(ns: string, agents: { name: string; target?: boolean }[], o: { helmSet?: string[]; beforeOperator?: (w: FailoverWorld) => Promise<string[]> } = {}): Promise<FailoverWorld> {
    const w = new FailoverWorld(ns);
    w.dir = await tmpDir("understudy-fo-");
    w.cluster = await startCluster({ dir: path.join(w.dir, "k8s") });
    w.pki = await Pki.create(path.join(w.dir, "pki"));
    w.tlsDir = await w.pki.operatorTlsDir();
    w.lab = await createLab();
    for (const a of agents) {
      w.hosts[a.name] = await w.lab.addHost(a.name);
      const r = await tlsAgent(w.pki, w.dir, a.name, { netHost: w.hosts[a.name], targetRoot: a.target ? path.join(w.dir, `root-${a.name}`) : undefined, allowCommands: true });
      w.agents[a.name] = r.agent;
      w.tls = r.tls;
    }
    for (const a of Object.values(w.agents)) await a.start(w.tls);
    await kubectlOk(w.cluster, ["create", "namespace", ns]);
    const h = await w.cluster.helm(["install", "understudy", path.join(REPO, "charts/understudy"), "-n", SYS, "--create-namespace", "--set", "agentTLS.secretName=agent-tls", ...(o.helmSet ?? []).flatMap((x) => ["--set", x])]);
    assert.equal(h.code, 0, h.stderr);
    const sa = (await kubectlOk(w.cluster, ["get", "serviceaccount", "-n", SYS, "-l", "app.kubernetes.io/instance=understudy", "-o", "jsonpath={.items[0].metadata.name}"])).trim();
    w.kubeconfig = await w.cluster.writeKubeconfigForToken(await w.cluster.createToken(SYS, sa), path.join(w.dir, "operator.kubeconfig"));
    const args = JSON.parse(await kubectlOk(w.cluster, ["get", "deployment", "-n", SYS, "-o", "jsonpath={.items[0].spec.template.spec.containers[0].args}"])) as string[];
    w.lease = args[args.indexOf("--leader-election-id") + 1]!;
    const extra = o.beforeOperator ? await o.beforeOperator(w) : [];
    w.op = await OperatorProc.create({ kubeconfig: w.kubeconfig, tlsDir: w.tlsDir, logPath: path.join(w.dir, "operator.log"), leaseNamespace: SYS, extra: ["--leader-election-id", w.lease, ...extra] });
    await w.op.start();
    return w;
  }

  async dispose(): Promise<void> {
    await this.op?.stop().catch(() => undefined);
    for (const a of Object.values(this.agents)) await a.stop().catch(() => undefined);
    await this.lab?.dispose();
    await this.cluster?.stop();
    if (!process.env.KEEP_TEST_DIRS && this.dir) await rm(this.dir, { recursive: true, force: true });
  }

  /** A directory of `n` files to protect. */
  async sourceTree(name: string, n: number): Promise<string> {
    const d = path.join(this.dir, name);
    await mkdir(d, { recursive: true });
    for (let i = 0; i < n; i++) await writeFile(path.join(d, `row-${i}.dat`), `row ${i}\n`.repeat(200 + i));
    return d;
  }

  /** The replica of pair `pair` (source agent `source`) on target agent `target`. */
  image(target: string, source: string, pair: string): string {
    return path.join(this.dir, `root-${target}`, source, `${this.ns}.${pair}`);
  }

  async apply(obj: unknown): Promise<void> {
    await kubectlOk(this.cluster, ["apply", "-f", "-"], YAML.stringify(obj));
  }

  async policy(name: string, spec: Record<string, unknown>): Promise<void> {
    await this.apply({ apiVersion: "understudy.dev/v1alpha1", kind: "FailoverPolicy", metadata: { name, namespace: this.ns }, spec: { healthCheck: { interval: "1s", missedBeats: 3 }, ...spec } });
  }

  async pair(name: string, o: { source: string; targets: string[]; path: string; labels?: Record<string, string> }): Promise<void> {
    const doc = YAML.parse(pairYaml({ name, namespace: this.ns, source: this.agents[o.source]!.address, targets: o.targets.map((t) => ({ name: t, address: this.agents[t]!.address })), path: o.path })) as { metadata: { labels?: Record<string, string> } };
    doc.metadata.labels = o.labels;
    await kubectlOk(this.cluster, ["apply", "-f", "-"], YAML.stringify(doc));
  }

  get(name: string): Promise<ReplicationPair | undefined> {
    return getPair(this.cluster, this.ns, name);
  }

  /** Wait for the pair (re-read from the API server each time) to satisfy pred; on timeout, show its status and the operator's log. */
  async waitPair(name: string, what: string, pred: (p: ReplicationPair) => boolean, timeoutMs = 60_000): Promise<ReplicationPair> {
    let last: ReplicationPair | undefined;
    try {
      return await waitFor(what, async () => ((last = await this.get(name)) && pred(last) ? last : undefined), timeoutMs, 250);
    } catch (e) {
      throw new Error(`${(e as Error).message}\nstatus: ${JSON.stringify(last?.status, null, 1)?.slice(0, 4000)}\noperator log tail:\n${(await this.op.log()).split("\n").slice(-20).join("\n")}`);
    }
  }

  async treesDiffer(x: string, y: string): Promise<string[]> {
    return compareTrees(await snapshotTree(x), await snapshotTree(y));
  }

  async waitTreesEqual(x: string, y: string, what: string, timeoutMs = 60_000): Promise<void> {
    let diff: string[] = [];
    try {
      await waitFor(what, async () => (diff = await this.treesDiffer(x, y)).length === 0, timeoutMs, 250);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n  ${diff.slice(0, 20).join("\n  ")}`);
    }
  }

  async endpointSlice(service: string): Promise<{ endpoints: { addresses: string[] }[]; ports: { port: number }[] }> {
    return JSON.parse(await kubectlOk(this.cluster, ["get", "endpointslice", `${service}-understudy`, "-n", this.ns, "-o", "json"]));
  }

  /** `kubectl understudy …` (the plugin), as a person would run it (with their own rights, not the operator's). */
  plugin(args: string[]): Promise<{ code: number; out: string }> {
    return new Promise((resolve) => execFile(process.execPath, [CLI, "kubectl", ...args, "-n", this.ns, "--kubeconfig", this.cluster.kubeconfig], (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, out: stdout + stderr })));
  }

  async events(pair: string): Promise<string> {
    return kubectlOk(this.cluster, ["get", "events", "-n", this.ns, "--field-selector", `involvedObject.name=${pair}`, "-o", "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}"]);
  }
}
