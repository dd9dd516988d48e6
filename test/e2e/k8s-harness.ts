// Helpers for operator tests on the real control plane (test/env/cluster.ts):
// agents with mTLS certificates from one CA, the operator as a process with a
// given kubeconfig, and reading ReplicationPairs back through kubectl.
import { copyFile, mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { createCA, issueCert } from "../../common/tls.ts";
import type { TlsConfig } from "../../common/config.ts";
import type { Cluster } from "../env/cluster.ts";
import type { ReplicationPair } from "../../operator/api/v1alpha1/index.ts";
import { AgentProc, ChildProc, CLI, REPO, freePort, waitFor } from "./harness.ts";
import { NetnsAgentProc, type Host } from "./netns.ts";

/** A CA and certificates for agents and the operator (CN understudy-operator). */
export class Pki {
  readonly dir: string;
  constructor(dir: string) {
    this.dir = dir;
  }
  static async create(dir: string): Promise<Pki> {
    await mkdir(dir, { recursive: true });
    await createCA(dir);
    return new Pki(dir);
  }
  async tlsFor(name: string, hosts: string[] = []): Promise<TlsConfig & { ca: string; cert: string; key: string }> {
    const r = await issueCert({ caDir: this.dir, name, hosts: ["127.0.0.1", "localhost", ...hosts], outDir: this.dir });
    return { ca: r.caPath, cert: r.certPath, key: r.keyPath };
  }
  /** The operator's --agent-tls-dir (the layout of a kubernetes.io/tls Secret plus ca.crt). */
  async operatorTlsDir(): Promise<string> {
    const t = await this.tlsFor("understudy-operator");
    const dir = path.join(this.dir, "operator-tls");
    await mkdir(dir, { recursive: true });
    await copyFile(t.ca, path.join(dir, "ca.crt"));
    await copyFile(t.cert, path.join(dir, "tls.crt"));
    await copyFile(t.key, path.join(dir, "tls.key"));
    return dir;
  }
}

/**
 * An agent with mTLS, a data dir under `dir`, and optionally a target root.
 * `host`: another loopback address (127.0.0.2 …) so sides have distinct addresses.
 */
export async function tlsAgent(pki: Pki, dir: string, name: string, o: { targetRoot?: string; host?: string; netHost?: Host; allowCommands?: boolean } = {}): Promise<{ agent: AgentProc; tls: TlsConfig }> {
  // In a network namespace every host has its own stack, so one well-known port does.
  const port = o.netHost ? 7702 : await freePort();
  const host = o.netHost?.ip ?? o.host ?? "127.0.0.1";
  const tls = await pki.tlsFor(name, [host]);
  const cfg: Record<string, unknown> = { name, listen: `${host}:${port}`, dataDir: path.join(dir, `state-${name}`), tls };
  if (o.targetRoot) cfg.target = { root: o.targetRoot };
  if (o.allowCommands) cfg.control = { allowCommands: true };
  const file = path.join(dir, `${name}.yaml`);
  await writeFile(file, YAML.stringify(cfg));
  const log = path.join(dir, `${name}.log`);
  return { agent: o.netHost ? new NetnsAgentProc(o.netHost, name, file, port, log, tls) : new AgentProc(name, file, port, log, host), tls };
}

/** The operator as a process, the way the chart's Deployment runs it. */
export class OperatorProc extends ChildProc {
  readonly healthPort: number;
  readonly metricsPort: number;
  private readonly args: string[];
  private readonly env: Record<string, string>;

  private constructor(args: string[], logPath: string, healthPort: number, metricsPort: number, env: Record<string, string>) {
    super(logPath, 15_000);
    this.args = args;
    this.healthPort = healthPort;
    this.metricsPort = metricsPort;
    this.env = env;
  }

  /** leaseNamespace undefined: no --leader-election-namespace (the operator finds it itself, e.g. from env.POD_NAMESPACE). */
  static async create(o: { kubeconfig: string; tlsDir: string; logPath: string; namespace?: string; leaseNamespace: string | undefined; extra?: string[]; env?: Record<string, string> }): Promise<OperatorProc> {
    const [hp, mp] = [await freePort(), await freePort()];
    const args = [CLI, "operator", "--kubeconfig", o.kubeconfig, "--agent-tls-dir", o.tlsDir, ...(o.leaseNamespace ? ["--leader-election-namespace", o.leaseNamespace] : []), "--health-probe-bind-address", `127.0.0.1:${hp}`, "--metrics-bind-address", `127.0.0.1:${mp}`,
      // short leases so a handover test takes seconds, not the default 15
      "--lease-duration", "6s", "--renew-deadline", "4s", "--retry-period", "1s", "--status-interval", "2s", ...(o.namespace ? ["--namespace", o.namespace] : []), ...(o.extra ?? [])];
    return new OperatorProc(args, o.logPath, hp, mp, o.env ?? {});
  }

  /** Start and wait until /readyz says ok (or, with `until`, until its answer satisfies that). */
  async start(until?: (r: { status: number; body: string }) => boolean): Promise<{ status: number; body: string }> {
    const env: NodeJS.ProcessEnv = { ...process.env, KUBECONFIG: "", ...this.env };
    if (!this.env.POD_NAMESPACE) delete env.POD_NAMESPACE;
    const p = this.spawnLogged(process.execPath, this.args, env);
    return waitFor("operator /readyz", async () => {
      if (p.exitCode !== null) throw new Error(`operator exited with ${p.exitCode}; log:\n${await this.log()}`);
      const r = await this.readyz().catch(() => undefined);
      return r && (until ? until(r) : r.status === 200) ? r : undefined;
      // generous: on a busy machine loading the operator and syncing its caches can take a while
    }, 90_000, 200).catch(async (e: Error) => {
      const last = await this.readyz().catch((x: Error) => ({ status: 0, body: x.message }));
      throw new Error(`${e.message}; last /readyz: ${last.status} ${last.body.trim()}`);
    });
  }

  async readyz(): Promise<{ status: number; body: string }> {
    const r = await fetch(`http://127.0.0.1:${this.healthPort}/readyz`);
    return { status: r.status, body: await r.text() };
  }

  async metrics(): Promise<string> {
    return (await fetch(`http://127.0.0.1:${this.metricsPort}/metrics`)).text();
  }
}

export async function kubectlOk(c: Cluster, args: string[], input?: string): Promise<string> {
  const r = await c.kubectl(args, { input });
  if (r.code !== 0) throw new Error(`kubectl ${args.join(" ")} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
}

export async function getPair(c: Cluster, ns: string, name: string): Promise<ReplicationPair | undefined> {
  const r = await c.kubectl(["get", "replicationpair", name, "-n", ns, "-o", "json"]);
  if (r.code !== 0) return undefined;
  return JSON.parse(r.stdout) as ReplicationPair;
}

export function condition(p: ReplicationPair | undefined, type: string): { status?: string; reason?: string; message?: string } {
  return p?.status?.conditions?.find((c) => c.type === type) ?? {};
}

/** Wait until a condition of the pair has this status (re-reading the pair from the API server each time). */
export async function waitCondition(c: Cluster, ns: string, name: string, type: string, status: string, timeoutMs = 60_000, reason?: RegExp): Promise<ReplicationPair> {
  let last: ReplicationPair | undefined;
  try {
    return await waitFor(`${ns}/${name} ${type}=${status}${reason ? ` (${reason})` : ""}`, async () => {
      last = await getPair(c, ns, name);
      const cond = condition(last, type);
      return cond.status === status && (!reason || reason.test(cond.reason ?? "")) && last!.status?.observedGeneration === last!.metadata.generation ? last : undefined;
    }, timeoutMs, 500);
  } catch (e) {
    throw new Error(`${(e as Error).message}\nlast conditions: ${JSON.stringify(last?.status?.conditions ?? [], null, 1)}`);
  }
}

export function pairYaml(o: { name: string; namespace: string; source: string; targets: { name: string; address: string }[]; path: string; extra?: Record<string, unknown> }): string {
  return YAML.stringify({
    apiVersion: "understudy.dev/v1alpha1",
    kind: "ReplicationPair",
    metadata: { name: o.name, namespace: o.namespace },
    spec: { source: { agent: { address: o.source } }, targets: o.targets.map((t) => ({ name: t.name, agent: { address: t.address } })), replicationSet: { path: o.path }, ...o.extra },
  });
}

/** Apply crds/ and wait until the API server serves them (kubectl wait fails if asked too early). */
export async function installCrds(c: Cluster): Promise<void> {
  await kubectlOk(c, ["apply", "-f", path.join(REPO, "crds")]);
  await waitFor("CRDs established", async () => {
    const out = await kubectlOk(c, ["get", "crd", "replicationpairs.understudy.dev", "failoverpolicies.understudy.dev", "-o", `jsonpath={range .items[*]}{.status.conditions[?(@.type=="Established")].status}{" "}{end}`]);
    return out.trim() === "True True";
  }, 30_000, 250);
}
