// Failover and failback end to end: real agents on distinct loopback addresses,
// a real API server, the chart's RBAC, and a FailoverPolicy. The source is
// killed (kill -9); the operator must fail over only to a target whose copy is
// known good, move the Service's EndpointSlice, fence the old source when it
// returns, bring it up to date from the target, and fail back on request.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { startCluster, type Cluster } from "../env/cluster.ts";
import { CLI, REPO, compareTrees, snapshotTree, tmpDir, waitFor, type AgentProc } from "./harness.ts";
import { OperatorProc, Pki, condition, getPair, kubectlOk, pairYaml, tlsAgent } from "./k8s-harness.ts";
import { createLab, type Host, type Lab } from "./netns.ts";
import { fetchStatus } from "../../agent/control-client.ts";
import type { TlsConfig } from "../../common/config.ts";
import type { ReplicationPair } from "../../operator/api/v1alpha1/index.ts";
import { execFile } from "node:child_process";

const NS = "shop";
const SYS = "understudy-system";

describe("failover and failback", { timeout: 900_000 }, () => {
  let cluster: Cluster;
  let dir: string;
  let pki: Pki;
  let tlsDir: string;
  let kubeconfig: string;
  let source: AgentProc;
  let a: AgentProc;
  let b: AgentProc;
  let tls: TlsConfig;
  let op: OperatorProc;
  let srcDir: string;
  let lab: Lab;
  let hosts: Record<"src" | "a" | "b", Host>;
  const imageOn = (t: "a" | "b") => path.join(dir, `dst-${t}`, "src-agent", `${NS}.db`);
  const pair = () => getPair(cluster, NS, "db");

  async function treesEqual(x: string, y: string, ignore: string[] = []): Promise<string[]> {
    const sx = await snapshotTree(x);
    const sy = await snapshotTree(y);
    for (const p of ignore) {
      sx.delete(p);
      sy.delete(p);
    }
    return compareTrees(sx, sy);
  }
  async function waitTreesEqual(x: string, y: string, what: string, ignore: string[] = []): Promise<void> {
    let diff: string[] = [];
    try {
      await waitFor(what, async () => (diff = await treesEqual(x, y, ignore)).length === 0, 60_000, 250);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n  ${diff.slice(0, 20).join("\n  ")}`);
    }
  }
  async function waitPair(what: string, pred: (p: ReplicationPair) => boolean, timeoutMs = 60_000): Promise<ReplicationPair> {
    let last: ReplicationPair | undefined;
    try {
      return await waitFor(what, async () => ((last = await pair()) && pred(last) ? last : undefined), timeoutMs, 250);
    } catch (e) {
      throw new Error(`${(e as Error).message}\nstatus: ${JSON.stringify(last?.status, null, 1)?.slice(0, 4000)}\noperator log tail:\n${(await op.log()).split("\n").slice(-20).join("\n")}`);
    }
  }
  const slice = async () => JSON.parse(await kubectlOk(cluster, ["get", "endpointslice", "db-understudy", "-n", NS, "-o", "json"])) as { endpoints: { addresses: string[] }[]; ports: { port: number }[] };
  const plugin = (args: string[]) => new Promise<{ code: number; out: string }>((resolve) => execFile(process.execPath, [CLI, "kubectl", ...args, "-n", NS, "--kubeconfig", kubeconfig], (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, out: stdout + stderr })));

  before(async () => {
    dir = await tmpDir("understudy-fo-");
    cluster = await startCluster({ dir: path.join(dir, "k8s") });
    pki = await Pki.create(path.join(dir, "pki"));
    tlsDir = await pki.operatorTlsDir();
    srcDir = path.join(dir, "src");
    await mkdir(srcDir, { recursive: true });
    for (let i = 0; i < 30; i++) await writeFile(path.join(srcDir, `row-${i}.dat`), `row ${i}\n`.repeat(200 + i));
    // Each agent on a host of its own (network namespaces on a bridge): the operator reaches them over the lab network.
    lab = await createLab();
    hosts = { src: await lab.addHost("src"), a: await lab.addHost("a"), b: await lab.addHost("b") };
    ({ agent: source, tls } = await tlsAgent(pki, dir, "src-agent", { netHost: hosts.src, allowCommands: true }));
    ({ agent: a } = await tlsAgent(pki, dir, "dst-a", { netHost: hosts.a, targetRoot: path.join(dir, "dst-a"), allowCommands: true }));
    ({ agent: b } = await tlsAgent(pki, dir, "dst-b", { netHost: hosts.b, targetRoot: path.join(dir, "dst-b"), allowCommands: true }));
    for (const x of [a, b, source]) await x.start(tls);
    // The chart, and the operator with only the chart's RBAC.
    await kubectlOk(cluster, ["create", "namespace", NS]);
    const h = await cluster.helm(["install", "understudy", path.join(REPO, "charts/understudy"), "-n", SYS, "--create-namespace", "--set", "agentTLS.secretName=agent-tls"]);
    assert.equal(h.code, 0, h.stderr);
    const sa = (await kubectlOk(cluster, ["get", "serviceaccount", "-n", SYS, "-l", "app.kubernetes.io/instance=understudy", "-o", "jsonpath={.items[0].metadata.name}"])).trim();
    kubeconfig = await cluster.writeKubeconfigForToken(await cluster.createToken(SYS, sa), path.join(dir, "operator.kubeconfig"));
    const args = JSON.parse(await kubectlOk(cluster, ["get", "deployment", "-n", SYS, "-o", "jsonpath={.items[0].spec.template.spec.containers[0].args}"])) as string[];
    const lease = args[args.indexOf("--leader-election-id") + 1]!;
    op = await OperatorProc.create({ kubeconfig, tlsDir, logPath: path.join(dir, "operator.log"), leaseNamespace: SYS, extra: ["--leader-election-id", lease] });
    await op.start();
  });

  after(async () => {
    await op?.stop().catch(() => undefined);
    for (const x of [source, a, b]) await x?.stop().catch(() => undefined);
    await lab?.dispose();
    await cluster?.stop();
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });

  test("a pair under an automatic FailoverPolicy shows its known-good gate at all times", async () => {
    await kubectlOk(cluster, ["apply", "-f", "-"], YAML.stringify({ apiVersion: "v1", kind: "Service", metadata: { name: "db", namespace: NS }, spec: { ports: [{ port: 5432 }] } }));
    await kubectlOk(cluster, ["apply", "-f", "-"], YAML.stringify({
      apiVersion: "understudy.dev/v1alpha1",
      kind: "FailoverPolicy",
      metadata: { name: "db-ha", namespace: NS },
      spec: {
        selector: { matchLabels: { tier: "db" } },
        approval: "automatic",
        healthCheck: { interval: "1s", missedBeats: 3 },
        knownGood: { requireVerify: true, maxVerifyAge: "1h", maxLag: "30s" },
        actions: [{ name: "start-db", command: ["sh", "-c", `echo started > ${path.join(dir, "action-ran")}`] }],
        serviceIdentity: { service: { name: "db", port: 5432 } },
      },
    }));
    const doc = YAML.parse(pairYaml({ name: "db", namespace: NS, source: source.address, targets: [{ name: "a", address: a.address }, { name: "b", address: b.address }], path: srcDir })) as { metadata: { labels?: Record<string, string> } };
    doc.metadata.labels = { tier: "db" };
    await kubectlOk(cluster, ["apply", "-f", "-"], YAML.stringify(doc));
    await waitPair("Ready", (p) => condition(p, "Ready").status === "True");
    let p = await waitPair("gate status", (x) => (x.status?.knownGood?.length ?? 0) === 2);
    assert.equal(p.status?.health?.policy, "db-ha");
    assert.ok(p.status?.knownGood?.every((k) => !k.ok && k.failed?.some((f) => /never verified/.test(f))), "not known good before a verify");
    const v = await plugin(["verify", "db"]);
    assert.equal(v.code, 0, v.out);
    p = await waitPair("both targets known good", (x) => !!x.status?.knownGood?.every((k) => k.ok));
    const fp = JSON.parse(await kubectlOk(cluster, ["get", "fop", "db-ha", "-n", NS, "-o", "json"])) as { status?: { matchedPairs?: number } };
    assert.equal(fp.status?.matchedPairs, 1);
    const st = await plugin(["status", "db"]);
    assert.match(st.out, /known good: a yes/);
  });

  test("source killed (kill -9): automatic failover to the known-good target only; identity moves; every acknowledged write is there", async () => {
    // b's copy goes bad and its verify says so: b is no longer known good.
    await writeFile(path.join(imageOn("b"), "row-3.dat"), "tampered on b\n");
    await kubectlOk(cluster, ["annotate", "rp", "db", "-n", NS, "understudy.dev/verify=b-check", "--overwrite"]);
    await waitPair("b refused by the gate", (x) => x.status?.knownGood?.find((k) => k.target === "b")?.ok === false && x.status.knownGood.find((k) => k.target === "a")?.ok === true);
    const gate = (await pair())!.status!.knownGood!.find((k) => k.target === "b")!;
    assert.match(gate.failed!.join(" "), /last verify failed/);
    // Writes the source acknowledged, then the source dies.
    for (let i = 0; i < 20; i++) await writeFile(path.join(srcDir, `order-${i}.dat`), `order ${i}\n`);
    await waitFor("source acknowledged by a", async () => {
      const s = (await fetchStatus(source.address, tls)).sets.find((x) => x.name === `${NS}.db`);
      const t = s?.targets.find((x) => x.address === a.address);
      return !!s && !!t && s.lastSeq > 0 && t.lastAckedSeq === s.lastSeq && (await treesEqual(srcDir, imageOn("a"))).length === 0;
    }, 30_000, 100);
    const killedAt = Date.now();
    await source.kill9();
    const p = await waitPair("failed over to a", (x) => x.status?.activeSide === "a" && x.status.phase === "FailedOver", 60_000);
    const tookMs = Date.now() - killedAt;
    assert.equal(p.spec.activeSide, "a", "the decision is declared in spec.activeSide");
    assert.equal(p.status?.epoch, 1);
    assert.ok((p.status?.failover?.recoverySeconds ?? 99) < 10, `recovery ${p.status?.failover?.recoverySeconds}s (observed ${tookMs} ms)`);
    assert.equal(condition(p, "FailedOver").status, "True");
    // Every acknowledged write is on a (the source directory is exactly what was acknowledged).
    assert.deepEqual(await treesEqual(srcDir, imageOn("a")), []);
    const es = await slice();
    assert.deepEqual(es.endpoints[0]?.addresses, [hosts.a.ip]);
    assert.equal(es.ports[0]?.port, 5432);
    assert.equal((await readFile(path.join(dir, "action-ran"), "utf8")).trim(), "started");
    const aStatus = await fetchStatus(a.address, tls);
    const img = aStatus.images.find((i) => i.set === `${NS}.db`);
    assert.equal(img?.promoted, true);
    assert.equal(img?.epoch, 1);
    const ev = await kubectlOk(cluster, ["get", "events", "-n", NS, "--field-selector", "involvedObject.name=db", "-o", "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}"]);
    assert.match(ev, /SourceDown/);
    assert.match(ev, /IdentityMoved/);
    process.stderr.write(`# recovery: ${p.status?.failover?.recoverySeconds}s by the operator's clock, ${tookMs} ms observed by the test\n`);
  });

  test("the old source returns: it is fenced, and is brought up to date from the new primary", async () => {
    // The application now writes on a.
    await writeFile(path.join(imageOn("a"), "order-during-outage.dat"), "written on a while the source was down\n");
    await writeFile(path.join(imageOn("a"), "row-5.dat"), "changed on a\n");
    await source.start(tls);
    const p = await waitPair("source brought up to date", (x) => x.status?.reverse?.mirrored === true, 60_000);
    assert.equal(p.status?.activeSide, "a");
    const st = await fetchStatus(source.address, tls);
    assert.equal(st.sets.find((s) => s.name === `${NS}.db`), undefined, "the old source no longer replicates forward");
    await waitTreesEqual(imageOn("a"), srcDir, "source equal to a");
    // Its old journal could not have overwritten a: a refused it (fenced) or it was removed first.
    assert.equal(await readFile(path.join(imageOn("a"), "order-during-outage.dat"), "utf8"), "written on a while the source was down\n");
    // Live changes on a keep flowing back.
    await writeFile(path.join(imageOn("a"), "more.dat"), "more\n");
    await waitTreesEqual(imageOn("a"), srcDir, "live reverse replication");
  });

  test("failback: the source serves again, the identity moves back, and both targets are replicas again", async () => {
    const r = await plugin(["failback", "db", "--timeout", "90"]);
    assert.equal(r.code, 0, r.out);
    const p = await waitPair("source active and Ready", (x) => x.status?.activeSide === "source" && condition(x, "Ready").status === "True", 90_000);
    assert.equal(p.status?.epoch, 2);
    assert.deepEqual((await slice()).endpoints[0]?.addresses, [hosts.src.ip]);
    await writeFile(path.join(srcDir, "after-failback.dat"), "back home\n");
    await waitTreesEqual(srcDir, imageOn("a"), "a is a replica again");
    await waitTreesEqual(srcDir, imageOn("b"), "b (whose copy was bad) is repaired by its mirror");
    const img = (await fetchStatus(a.address, tls)).images.find((i) => i.set === `${NS}.db`);
    assert.equal(img?.promoted, false);
    assert.equal(img?.epoch, 2);
    await stat(path.join(srcDir, "order-during-outage.dat"));
  });
});
