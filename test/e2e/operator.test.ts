// The operator end to end on a real kube-apiserver: the chart installs, the
// operator runs with the chart's ServiceAccount token (so the chart's RBAC is
// all it has), and ReplicationPairs drive real agents over mTLS.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { startCluster, type Cluster } from "../env/cluster.ts";
import { REPO, cli, compareTrees, snapshotTree, tmpDir, waitFor, type AgentProc } from "./harness.ts";
import { OperatorProc, Pki, condition, getPair, kubectlOk, pairYaml, tlsAgent, waitCondition } from "./k8s-harness.ts";
import { fetchStatus } from "../../agent/control-client.ts";
import type { TlsConfig } from "../../common/config.ts";

const NS = "apps";
const SYSTEM_NS = "understudy-system";

describe("operator on a real API server", { timeout: 900_000 }, () => {
  let cluster: Cluster;
  let dir: string;
  let pki: Pki;
  let source: AgentProc;
  let target: AgentProc;
  let sourceTls: TlsConfig;
  let tlsDir: string;
  let saKubeconfig: string;
  const operators: OperatorProc[] = [];
  let srcDir: string;
  let dstRoot: string;

  const image = () => path.join(dstRoot, "src-agent", `${NS}.web`);
  async function waitEqual(ignore: string[] = [], timeoutMs = 60_000): Promise<void> {
    let diff: string[] = [];
    try {
      await waitFor("target to equal source", async () => {
        const a = await snapshotTree(srcDir);
        for (const p of ignore) a.delete(p);
        diff = compareTrees(a, await snapshotTree(image()));
        return diff.length === 0;
      }, timeoutMs, 250);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n  ${diff.slice(0, 20).join("\n  ")}`);
    }
  }
  let leaseName = "";
  async function startOperator(name: string): Promise<OperatorProc> {
    const op = await OperatorProc.create({ kubeconfig: saKubeconfig, tlsDir, logPath: path.join(dir, `${name}.log`), leaseNamespace: SYSTEM_NS, extra: ["--leader-election-id", leaseName] });
    operators.push(op);
    await op.start();
    return op;
  }
  const leaseHolder = async () => JSON.parse(await kubectlOk(cluster, ["get", "lease", leaseName, "-n", SYSTEM_NS, "-o", "json"])).spec.holderIdentity as string;
  /** Mirrors the source agent has started, from its log (the agent's own record, not the operator's). */
  const mirrorsStarted = async () => (await source.log()).split("\n").filter((l) => l.includes('"msg":"mirror starting"')).length;

  before(async () => {
    dir = await tmpDir("understudy-op-");
    cluster = await startCluster({ dir: path.join(dir, "k8s") });
    pki = await Pki.create(path.join(dir, "pki"));
    tlsDir = await pki.operatorTlsDir();
    srcDir = path.join(dir, "src");
    dstRoot = path.join(dir, "dst");
    await mkdir(srcDir, { recursive: true });
    for (let i = 0; i < 40; i++) {
      await mkdir(path.join(srcDir, `d${i % 4}`), { recursive: true });
      await writeFile(path.join(srcDir, `d${i % 4}`, `f${i}.txt`), `file ${i}\n`.repeat(i * 50 + 1));
    }
    ({ agent: target } = await tlsAgent(pki, dir, "dst-agent", { targetRoot: dstRoot }));
    ({ agent: source, tls: sourceTls } = await tlsAgent(pki, dir, "src-agent"));
    await target.start(sourceTls);
    await source.start(sourceTls);
  });

  after(async () => {
    for (const op of operators) await op.stop().catch(() => undefined);
    await source?.stop();
    await target?.stop();
    await cluster?.stop();
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });

  test("helm install of the chart succeeds, and the operator runs with only its ServiceAccount's RBAC", async () => {
    await kubectlOk(cluster, ["create", "namespace", NS]);
    const r = await cluster.helm(["install", "understudy", path.join(REPO, "charts/understudy"), "-n", SYSTEM_NS, "--create-namespace", "--set", "agentTLS.secretName=understudy-agent-tls"]);
    assert.equal(r.code, 0, r.stderr);
    await kubectlOk(cluster, ["wait", "--for=condition=established", "crd/replicationpairs.understudy.dev", "crd/failoverpolicies.understudy.dev", "--timeout=30s"]);
    const sa = (await kubectlOk(cluster, ["get", "serviceaccount", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/instance=understudy", "-o", "jsonpath={.items[0].metadata.name}"])).trim();
    assert.ok(sa, "the chart creates a ServiceAccount");
    const token = await cluster.createToken(SYSTEM_NS, sa);
    saKubeconfig = await cluster.writeKubeconfigForToken(token, path.join(dir, "operator.kubeconfig"));
    // Run the operator with the Lease name the chart's Deployment gives it (its RBAC names that Lease).
    const args = JSON.parse(await kubectlOk(cluster, ["get", "deployment", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/instance=understudy", "-o", "jsonpath={.items[0].spec.template.spec.containers[0].args}"])) as string[];
    leaseName = args.find((a) => a.startsWith("--leader-election-id="))?.split("=")[1] ?? args[args.indexOf("--leader-election-id") + 1] ?? "";
    assert.ok(leaseName, `the Deployment names its Lease: ${args.join(" ")}`);
    // Least privilege: what the operator must never be able to do.
    const as = `system:serviceaccount:${SYSTEM_NS}:${sa}`;
    for (const [verb, res, ns] of [["get", "secrets", NS], ["list", "pods", NS], ["delete", "replicationpairs.understudy.dev", NS], ["create", "leases.coordination.k8s.io", NS]] as const) {
      const can = await cluster.kubectl(["auth", "can-i", verb, res, "-n", ns, "--as", as]);
      assert.equal(can.stdout.trim(), "no", `${as} must not ${verb} ${res} in ${ns}`);
    }
    await startOperator("operator-1");
  });

  test("the Lease is in the release namespace by default; a Lease the ServiceAccount may not use makes /readyz fail, saying why", async () => {
    // As in the chart's pod: no --leader-election-namespace, POD_NAMESPACE from the downward API.
    const podNs = await OperatorProc.create({ kubeconfig: saKubeconfig, tlsDir, logPath: path.join(dir, "operator-podns-le.log"), leaseNamespace: undefined, extra: ["--leader-election-id", `${leaseName}`], env: { POD_NAMESPACE: SYSTEM_NS } });
    operators.push(podNs);
    const ok = await podNs.start();
    assert.equal(ok.body.trim(), "ok");
    // Ready means it could read the Lease: in the release namespace, the only one its RBAC allows.
    assert.match(await podNs.log(), new RegExp(`"lease":"${SYSTEM_NS}/${leaseName}"`));
    await podNs.stop();
    // Another namespace's Lease (what the operator used to pick by default: "default") is forbidden to the chart's
    // ServiceAccount: the operator keeps trying, and /readyz says it is not ready and why, instead of "ok".
    const wrong = await OperatorProc.create({ kubeconfig: saKubeconfig, tlsDir, logPath: path.join(dir, "operator-403.log"), leaseNamespace: "default", extra: ["--leader-election-id", leaseName] });
    operators.push(wrong);
    const r = await wrong.start((x) => x.status === 503 && /403/.test(x.body));
    assert.match(r.body, /^not ready: cannot use Lease default\/\S+: 403: leases\.coordination\.k8s\.io "\S+" is forbidden: User "system:serviceaccount:understudy-system:\S+" cannot get resource "leases"/m);
    // ... and stays so (it is not a transient answer before the first try).
    await new Promise((res) => setTimeout(res, 3000));
    assert.equal((await wrong.readyz()).status, 503);
    await wrong.stop();
    // Without a namespace from anywhere, the operator refuses to start and says what to give.
    const none = await cli(["operator", "--kubeconfig", saKubeconfig, "--agent-tls-dir", tlsDir]);
    assert.equal(none.code, 2, none.stderr);
    assert.match(none.stderr, /leader election needs the namespace of its Lease: give --leader-election-namespace/);
  });

  test("--agent-tls-dir names the files it needs; what certs issue writes is accepted", async () => {
    const empty = path.join(dir, "empty-tls");
    await mkdir(empty, { recursive: true });
    const r = await cli(["operator", "--kubeconfig", saKubeconfig, "--agent-tls-dir", empty, "--no-leader-elect"]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /ca\.crt, tls\.crt and tls\.key .* or ca\.crt, understudy-operator\.crt and understudy-operator\.key/);
    const r2 = await cli(["operator", "--kubeconfig", saKubeconfig]);
    assert.match(r2.stderr, /give --agent-tls-dir DIR: .*ca\.crt, tls\.crt and tls\.key/);
    // The CA dir itself, as `certs issue --name understudy-operator` left it:
    const op = await OperatorProc.create({ kubeconfig: saKubeconfig, tlsDir: pki.dir, logPath: path.join(dir, "operator-pkidir.log"), leaseNamespace: SYSTEM_NS, extra: ["--leader-election-id", leaseName, "--no-leader-elect"] });
    operators.push(op);
    await op.start();
    await op.stop();
  });

  test("an invalid ReplicationPair is refused with messages a user understands", async () => {
    const bad = pairYaml({ name: "bad", namespace: NS, source: source.address, targets: [{ name: "standby", address: source.address }, { name: "Bad_Name", address: "10.0.0.6:70000" }], path: "data/relative", extra: { mode: "scheduled", bandwidthLimit: "lots" } });
    const r = await cluster.kubectl(["apply", "-f", "-"], { input: bad });
    assert.notEqual(r.code, 0);
    for (const want of ["must be an absolute path", "must be a size like", "mode scheduled needs spec.interval", "must be host:port with a port from 1 to 65535", "must be lowercase letters"]) assert.match(r.stderr, new RegExp(want), r.stderr);
    const r2 = await cluster.kubectl(["apply", "-f", "-"], { input: pairYaml({ name: "bad2", namespace: NS, source: source.address, targets: [{ name: "standby", address: source.address }], path: "/srv" }) });
    assert.match(r2.stderr, /a target must be another agent than the source/);
  });

  test("kubectl apply of a pair makes the target equal the source, and get/describe show it", async () => {
    await kubectlOk(cluster, ["apply", "-f", "-"], pairYaml({ name: "web", namespace: NS, source: source.address, targets: [{ name: "standby", address: target.address }], path: srcDir }));
    await waitCondition(cluster, NS, "web", "Ready", "True", 60_000);
    await waitEqual();
    const p = await getPair(cluster, NS, "web");
    assert.deepEqual(p?.metadata.finalizers, ["understudy.dev/replication"]);
    assert.equal(condition(p, "Mirrored").status, "True");
    assert.equal(condition(p, "Replicating").status, "True");
    assert.equal(condition(p, "Degraded").status, "False");
    assert.equal(condition(p, "Verified").status, "Unknown");
    assert.equal(p?.status?.files, 44, "40 files + 4 dirs");
    assert.equal(p?.status?.targets?.[0]?.mirror?.result, "ok");
    assert.equal(p?.status?.sourceAgent?.name, "src-agent");
    const get = await kubectlOk(cluster, ["get", "rp", "-n", NS]);
    assert.match(get, /^NAME\s+PHASE\s+ACTIVE\s+LAG\s+QUEUED\s+VERIFIED\s+LAST VERIFY\s+AGE/m);
    assert.match(get, /^web\s+Replicating\s+source\s+0s\s+0B\s/m);
    const describe = await kubectlOk(cluster, ["describe", "rp", "web", "-n", NS]);
    assert.match(describe, /SetCreated .*replication set apps\.web created on source agent/);
    // Live changes keep flowing.
    await writeFile(path.join(srcDir, "d1", "live.txt"), "written after Ready\n");
    await waitEqual();
  });

  test("target agent stopped → Degraded with a reason; started again → Ready and caught up", async () => {
    await target.stop();
    await writeFile(path.join(srcDir, "d2", "while-down.txt"), "written while the target was down\n".repeat(100));
    const p = await waitCondition(cluster, NS, "web", "Degraded", "True", 60_000, /TargetDegraded|TargetUnreachable/);
    assert.match(condition(p, "Degraded").message ?? "", /standby/);
    assert.equal(condition(p, "Ready").status, "False");
    assert.match(await kubectlOk(cluster, ["get", "rp", "web", "-n", NS]), /\bDegraded\b/);
    const ev = await kubectlOk(cluster, ["get", "events", "-n", NS, "--field-selector", "involvedObject.name=web,type=Warning", "-o", "jsonpath={.items[*].reason}"]);
    assert.match(ev, /TargetDegraded|TargetUnreachable/);
    await target.start(sourceTls);
    await waitCondition(cluster, NS, "web", "Ready", "True", 90_000);
    assert.equal(condition(await getPair(cluster, NS, "web"), "Degraded").status, "False");
    await waitEqual();
    const ev2 = await kubectlOk(cluster, ["get", "events", "-n", NS, "--field-selector", "involvedObject.name=web,reason=Recovered", "-o", "name"]);
    assert.ok(ev2.trim(), "a Recovered event is recorded");
  });

  test("a spec change (exclude, compression, bandwidth) applies live without a new mirror", async () => {
    const mirrors = await mirrorsStarted();
    assert.equal(mirrors, 1, "one mirror so far: the first");
    await kubectlOk(cluster, ["patch", "rp", "web", "-n", NS, "--type", "merge", "-p", JSON.stringify({ spec: { compression: "max", bandwidthLimit: "50MiB", replicationSet: { path: srcDir, exclude: ["**/*.log"] } } })]);
    await waitCondition(cluster, NS, "web", "Ready", "True", 60_000);
    const st = await fetchStatus(source.address, sourceTls);
    const set = st.sets.find((s) => s.name === `${NS}.web`);
    assert.ok(set?.managed);
    await writeFile(path.join(srcDir, "d0", "kept.txt"), "replicated\n");
    await writeFile(path.join(srcDir, "d0", "noise.log"), "excluded\n");
    await waitEqual(["d0/noise.log"]);
    await assert.rejects(stat(path.join(image(), "d0", "noise.log")), "an excluded file is not replicated");
    assert.equal(await mirrorsStarted(), mirrors, "no new mirror");
  });

  test("a verify requested by annotation runs and its result shows in status", async () => {
    await kubectlOk(cluster, ["annotate", "rp", "web", "-n", NS, "understudy.dev/verify=first", "--overwrite"]);
    const p = await waitFor("verify result", async () => {
      const x = await getPair(cluster, NS, "web");
      return x?.status?.lastHandledVerifyRequest === "first" && x.status.lastVerify?.result === "Passed" ? x : undefined;
    }, 60_000, 500);
    assert.equal(condition(p, "Verified").status, "True");
    assert.ok((p.status?.lastVerify?.filesCompared ?? 0) >= 40);
    // A corrupted replica is found by the next request.
    await writeFile(path.join(image(), "d3", "f3.txt"), "corrupted on the target\n");
    await kubectlOk(cluster, ["annotate", "rp", "web", "-n", NS, "understudy.dev/verify=second", "--overwrite"]);
    const p2 = await waitCondition(cluster, NS, "web", "Verified", "False", 60_000, /DifferencesFound/);
    assert.match(condition(p2, "Verified").message ?? "", /d3\/f3\.txt/);
    assert.match(await kubectlOk(cluster, ["get", "rp", "web", "-n", NS]), /\bFailed\b/);
    // ... and repaired on request.
    await kubectlOk(cluster, ["annotate", "rp", "web", "-n", NS, "understudy.dev/verify-repair=true", "understudy.dev/verify=third", "--overwrite"]);
    await waitFor("repair", async () => (await getPair(cluster, NS, "web"))?.status?.lastHandledVerifyRequest === "third", 30_000, 500);
    await waitEqual(["d0/noise.log"]);
  });

  test("operator kill -9 and leader handover lose nothing and do not re-mirror", async () => {
    const first = operators[0]!;
    const mirrors = await mirrorsStarted();
    const standby = await startOperator("operator-2");
    assert.notEqual(await leaseHolder(), "", "the first operator holds the lease");
    await first.kill9();
    // Writes while no operator leads: replication does not depend on the operator.
    for (let i = 0; i < 20; i++) await writeFile(path.join(srcDir, "d1", `handover-${i}.txt`), `during handover ${i}\n`);
    await waitFor("standby to take the lease", async () => (await leaseHolder()).length > 0 && (await standby.log()).includes("became leader"), 30_000, 500);
    await waitEqual(["d0/noise.log"]);
    // The new leader writes status (observes the new files) and does not mirror again.
    await waitFor("status from the new leader", async () => ((await getPair(cluster, NS, "web"))?.status?.files ?? 0) >= 66, 30_000, 500);
    await waitCondition(cluster, NS, "web", "Ready", "True", 30_000);
    assert.equal(await mirrorsStarted(), mirrors, "no new mirror after handover");
    // A plain restart of the only operator, too.
    await standby.stop();
    const again = await startOperator("operator-3");
    await writeFile(path.join(srcDir, "after-restart.txt"), "x\n");
    await waitEqual(["d0/noise.log"]);
    await waitFor("operator-3 leads", async () => (await again.log()).includes("became leader"), 30_000, 500);
    assert.equal(await mirrorsStarted(), mirrors, "no new mirror after restart");
    // "became leader" is logged before the first reconcile finishes; its metrics follow it.
    let m = "";
    await waitFor("operator-3 to count a successful reconcile", async () => {
      m = await again.metrics();
      return /understudy_operator_reconcile_total\{controller="replicationpair",result="success"\} [1-9]/.test(m) && /understudy_pair_ready\{namespace="apps",name="web"\} 1/.test(m);
    }, 30_000, 250).catch((e: Error) => assert.fail(`${e.message}\n${m.split("\n").filter((l) => l.startsWith("understudy_operator_reconcile_total") || l.startsWith("understudy_pair")).join("\n")}`));
  });

  test("deleting the pair stops replication on the source and the finalizer completes", async () => {
    const setDir = path.join(dir, "state-src-agent", "sets", `${NS}.web`);
    await stat(setDir);
    await kubectlOk(cluster, ["delete", "rp", "web", "-n", NS, "--timeout=60s"]);
    assert.equal(await getPair(cluster, NS, "web"), undefined);
    const st = await fetchStatus(source.address, sourceTls);
    assert.equal(st.sets.find((s) => s.name === `${NS}.web`), undefined, "the source agent no longer runs the set");
    await assert.rejects(stat(setDir), "the set's journal and index are purged");
    await writeFile(path.join(srcDir, "after-delete.txt"), "not replicated\n");
    await new Promise((r) => setTimeout(r, 2000));
    await assert.rejects(readFile(path.join(image(), "after-delete.txt")));
    await stat(path.join(image(), "d0", "kept.txt")); // the replica itself is kept
    const ev = await kubectlOk(cluster, ["get", "events", "-n", NS, "--field-selector", "involvedObject.name=web,reason=Deleted", "-o", "name"]);
    assert.ok(ev.trim());
  });
});
