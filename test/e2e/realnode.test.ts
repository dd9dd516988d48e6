// The chart as a Kubernetes user runs it: the image this repository builds
// (npm run image), imported into a real node's containerd (nothing pulled),
// `helm install --wait` with the chart's defaults and only the values a user
// sets (the agent TLS Secret), the operator's two pods Ready on a kubelet with
// one leader, a ReplicationPair between agents on hosts of their own, the
// leader killed, `helm upgrade` to a new image and `helm uninstall`; and then
// the host as it was before (test/env/realnode.ts undoes what the node did).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { buildImage, defaultImageFile, IMAGE_REPOSITORY, sourceKey } from "../../image/build.ts";
import { ociArchiveDigests, relabelOciArchive } from "../../image/oci.ts";
import { startRealNode, type RealNode } from "../env/realnode.ts";
import { REPO, compareTrees, snapshotTree, tmpDir, waitFor, type AgentProc } from "./harness.ts";
import { Pki, getPair, kubectlOk, pairYaml, tlsAgent, waitCondition } from "./k8s-harness.ts";
import { createLab, type Lab } from "./netns.ts";

const NS = "apps";
const SYSTEM_NS = "understudy-system";
const RELEASE = "understudy";
const CHART = path.join(REPO, "charts/understudy");
const CACHE = path.join(process.env.UNDERSTUDY_CACHE ?? path.join(process.env.XDG_CACHE_HOME ?? path.join(os.homedir(), ".cache"), "understudy"), "images");
/** the operator's defaults, which the chart keeps: a Lease held 15 s, retried every 2 s */
const LEASE_DURATION_MS = 15_000;
const RETRY_PERIOD_MS = 2_000;

const log = (s: string) => process.stderr.write(`[realnode] ${s}\n`);

interface Image {
  file: string;
  name: string;
  tag: string;
  /** the manifest's digest */
  digest: string;
  /** the config's digest: the image ID the kubelet reports with containerd */
  id: string;
}

/**
 * The image of this tree: the one `npm run image` left in dist/ if it was
 * built from the sources as they are now (its .source key), else one built
 * here once per source key (cached). The upgrade's image: the same layer
 * under another tag with another config, so another digest.
 */
async function testImages(dir: string): Promise<{ release: Image; upgrade: Image }> {
  const version = (JSON.parse(await readFile(path.join(REPO, "package.json"), "utf8")) as { version: string }).version;
  const key = await sourceKey();
  let file = defaultImageFile(version);
  if ((await readFile(`${file}.source`, "utf8").catch(() => "")).trim() === key) log(`using ${file} (npm run image of these sources)`);
  else {
    file = path.join(CACHE, key.slice(0, 32), "understudy.oci.tar");
    if (!existsSync(`${file}.digest`)) {
      // one image per source key: older keys' images go (100 MiB each)
      for (const old of await readdir(CACHE).catch(() => [] as string[])) if (old !== key.slice(0, 32)) await rm(path.join(CACHE, old), { recursive: true, force: true });
      await mkdir(path.dirname(file), { recursive: true });
      const r = await buildImage({ out: file });
      log(`built ${r.name} (${(r.size / 2 ** 20).toFixed(1)} MiB, ${r.digest}) in ${(r.ms / 1000).toFixed(1)} s`);
    } else log(`using ${file} (cached for these sources)`);
  }
  const d = await ociArchiveDigests(file);
  assert.equal(d.manifest, (await readFile(`${file}.digest`, "utf8")).trim(), `${file}.digest names its manifest`);
  const release: Image = { file, name: IMAGE_REPOSITORY, tag: version, digest: d.manifest, id: d.config };
  const upTag = `${version}-upgrade`;
  const up = await relabelOciArchive(file, path.join(dir, "upgrade.oci.tar"), `${IMAGE_REPOSITORY}:${upTag}`, { "dev.understudy.test": "upgrade" });
  const u = await ociArchiveDigests(up.file);
  return { release, upgrade: { file: up.file, name: IMAGE_REPOSITORY, tag: upTag, digest: u.manifest, id: u.config } };
}

interface PodInfo {
  name: string;
  ready: boolean;
  image: string;
  imageID: string;
  containerID: string;
  restarts: number;
}

async function operatorPods(node: RealNode): Promise<PodInfo[]> {
  const out = await kubectlOk(node, ["get", "pods", "-n", SYSTEM_NS, "-l", `app.kubernetes.io/instance=${RELEASE}`, "-o", "json"]);
  const items = (JSON.parse(out) as { items: { metadata: { name: string; deletionTimestamp?: string }; status: { conditions?: { type: string; status: string }[]; containerStatuses?: { image: string; imageID: string; containerID?: string; restartCount: number }[] } }[] }).items;
  return items
    .filter((p) => !p.metadata.deletionTimestamp)
    .map((p) => ({
      name: p.metadata.name,
      ready: p.status.conditions?.some((c) => c.type === "Ready" && c.status === "True") ?? false,
      image: p.status.containerStatuses?.[0]?.image ?? "",
      imageID: p.status.containerStatuses?.[0]?.imageID ?? "",
      containerID: (p.status.containerStatuses?.[0]?.containerID ?? "").replace(/^containerd:\/\//, ""),
      restarts: p.status.containerStatuses?.[0]?.restartCount ?? 0,
    }));
}

describe("the chart on a real node, with the image this repository builds", { timeout: 1_800_000 }, () => {
  let dir: string;
  let lab: Lab;
  let node: RealNode;
  let images: { release: Image; upgrade: Image };
  let pki: Pki;
  let source: AgentProc;
  let target: AgentProc;
  let srcDir: string;
  let dstRoot: string;
  let leaseName = "";
  const hostBefore: Record<string, string> = {};

  const replica = () => path.join(dstRoot, "src-agent", `${NS}.web`);
  const lease = async () => JSON.parse(await kubectlOk(node, ["get", "lease", leaseName, "-n", SYSTEM_NS, "-o", "json"])) as { spec: { holderIdentity?: string; leaseDurationSeconds?: number } };
  const leaderPod = async () => (await lease()).spec.holderIdentity?.split("_")[0] ?? "";
  async function waitEqual(timeoutMs = 90_000): Promise<void> {
    let diff: string[] = [];
    try {
      await waitFor("the replica to equal the source", async () => {
        diff = compareTrees(await snapshotTree(srcDir), await snapshotTree(replica()).catch(() => new Map()));
        return diff.length === 0;
      }, timeoutMs, 250);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n  ${diff.slice(0, 20).join("\n  ")}`);
    }
  }
  async function waitPods(what: string, ok: (pods: PodInfo[]) => boolean, timeoutMs = 180_000): Promise<PodInfo[]> {
    let last: PodInfo[] = [];
    try {
      return await waitFor(what, async () => {
        last = await operatorPods(node);
        return ok(last) ? last : undefined;
      }, timeoutMs, 500);
    } catch (e) {
      const ev = await node.kubectl(["get", "events", "-n", SYSTEM_NS, "--sort-by=.lastTimestamp"]);
      throw new Error(`${(e as Error).message}\npods: ${JSON.stringify(last)}\nevents:\n${ev.stdout.split("\n").slice(-15).join("\n")}`);
    }
  }

  before(async () => {
    const t0 = Date.now();
    dir = await tmpDir("understudy-rn-");
    for (const k of ["vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"]) hostBefore[k] = (await readFile(`/proc/sys/${k}`, "utf8")).trim();
    images = await testImages(dir);
    log(`images ready after ${Date.now() - t0} ms: ${images.release.digest}, ${images.upgrade.digest}`);
    lab = await createLab({ prefix: "rn" });
    const nodeHost = await lab.addHost("node");
    const srcHost = await lab.addHost("src");
    const dstHost = await lab.addHost("dst");
    node = await startRealNode({ netns: nodeHost.ns, nodeIp: nodeHost.ip, dir: path.join(dir, "node"), log });
    await node.importImage(images.release.file);
    await node.importImage(images.upgrade.file);
    log(`node up and images imported after ${Date.now() - t0} ms`);

    pki = await Pki.create(path.join(dir, "pki"));
    srcDir = path.join(dir, "src");
    dstRoot = path.join(dir, "dst");
    await mkdir(srcDir, { recursive: true });
    for (let i = 0; i < 30; i++) {
      await mkdir(path.join(srcDir, `d${i % 3}`), { recursive: true });
      await writeFile(path.join(srcDir, `d${i % 3}`, `f${i}.txt`), `file ${i}\n`.repeat(i * 40 + 1));
    }
    ({ agent: target } = await tlsAgent(pki, dir, "dst-agent", { targetRoot: dstRoot, netHost: dstHost }));
    ({ agent: source } = await tlsAgent(pki, dir, "src-agent", { netHost: srcHost }));
    await target.start();
    await source.start();
  });

  after(async () => {
    await source?.stop().catch(() => undefined);
    await target?.stop().catch(() => undefined);
    await node?.stop();
    await lab?.dispose();
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });

  test("helm install --wait with the chart's defaults: two operator pods Ready, one leader", async () => {
    await kubectlOk(node, ["create", "namespace", SYSTEM_NS]);
    const tls = await pki.operatorTlsDir();
    await kubectlOk(node, ["create", "secret", "generic", "understudy-agent-tls", "-n", SYSTEM_NS, "--type=kubernetes.io/tls", `--from-file=tls.crt=${tls}/tls.crt`, `--from-file=tls.key=${tls}/tls.key`, `--from-file=ca.crt=${tls}/ca.crt`]);
    const t = Date.now();
    const r = await node.helm(["install", RELEASE, CHART, "-n", SYSTEM_NS, "--set", "agentTLS.secretName=understudy-agent-tls", "--wait", "--timeout", "5m"], { timeoutMs: 330_000 });
    assert.equal(r.code, 0, `helm install: ${r.stderr}\n${(await node.kubectl(["get", "events", "-n", SYSTEM_NS])).stdout}`);
    log(`helm install --wait took ${Date.now() - t} ms`);
    const pods = await waitPods("two operator pods Ready", (p) => p.length === 2 && p.every((x) => x.ready));
    const dep = JSON.parse(await kubectlOk(node, ["get", "deployment", "-n", SYSTEM_NS, "-l", `app.kubernetes.io/instance=${RELEASE}`, "-o", "jsonpath={.items[0].spec.template.spec}"])) as {
      containers: { args: string[]; securityContext: Record<string, unknown> }[];
      securityContext: Record<string, unknown>;
    };
    const args = dep.containers[0]!.args;
    leaseName = args[args.indexOf("--leader-election-id") + 1] ?? "";
    assert.ok(leaseName, `the Deployment names its Lease: ${args.join(" ")}`);
    for (const p of pods) {
      assert.equal(p.image, `${images.release.name}:${images.release.tag}`, "the chart's default image is the one the repository builds");
      assert.equal(p.imageID.replace(/^.*@/, ""), images.release.id, "running the image npm run image made");
    }
    const listed = await new Promise<string>((resolve) => resolve(execFileSync("ctr", ["--address", node.containerdSocket, "-n", "k8s.io", "images", "ls", "-q", `name==${images.release.name}:${images.release.tag}`], { encoding: "utf8" })));
    assert.match(listed, /localhost\/understudy/, "containerd has it under the chart's default name");
    // the defaults a restricted cluster asks for, and they run
    assert.equal(dep.securityContext.runAsNonRoot, true);
    assert.equal(dep.securityContext.runAsUser, 65532);
    assert.deepEqual(dep.securityContext.seccompProfile, { type: "RuntimeDefault" });
    assert.equal(dep.containers[0]!.securityContext.readOnlyRootFilesystem, true);
    assert.deepEqual(dep.containers[0]!.securityContext.capabilities, { drop: ["ALL"] });
    // one leader, in the release namespace, and it is one of the two pods
    const leader = await waitFor("a leader in the Lease", async () => (await leaderPod()) || undefined, 60_000, 500);
    assert.ok(pods.some((p) => p.name === leader), `the Lease's holder ${leader} is one of ${pods.map((p) => p.name).join(", ")}`);
    const logs = await Promise.all(pods.map((p) => kubectlOk(node, ["logs", "-n", SYSTEM_NS, p.name])));
    assert.equal(logs.filter((l) => l.includes("became leader")).length, 1, `exactly one pod leads:\n${logs.join("\n---\n").slice(-3000)}`);
  });

  test("a ReplicationPair between agents on hosts of their own becomes Ready and the replica equals the source", async () => {
    await kubectlOk(node, ["create", "namespace", NS]);
    await kubectlOk(node, ["apply", "-f", "-"], pairYaml({ name: "web", namespace: NS, source: source.address, targets: [{ name: "standby", address: target.address }], path: srcDir }));
    await waitCondition(node, NS, "web", "Ready", "True", 120_000);
    await waitEqual();
    await writeFile(path.join(srcDir, "d1", "live.txt"), "written after Ready\n");
    await waitEqual();
  });

  test("the leader killed: the other pod takes over within the Lease's bounds and replication goes on", async () => {
    const before = await operatorPods(node);
    const leader = await leaderPod();
    const victim = before.find((p) => p.name === leader);
    assert.ok(victim, `leader ${leader} among ${before.map((p) => p.name).join(", ")}`);
    const other = before.find((p) => p.name !== leader)!;
    // SIGKILL to the operator process in the leader's container: no chance to hand the Lease back
    const t = Date.now();
    const k = await new Promise<string>((resolve) => {
      try {
        resolve(execFileSync("ctr", ["--address", node.containerdSocket, "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", victim.containerID], { encoding: "utf8" }));
      } catch (e) {
        resolve(`failed: ${(e as Error).message}`);
      }
    });
    assert.doesNotMatch(k, /^failed/, k);
    const newLeader = await waitFor("another pod to hold the Lease", async () => {
      const l = await leaderPod();
      return l && l !== leader ? l : undefined;
    }, 60_000, 200);
    const took = Date.now() - t;
    log(`leader ${leader} killed; ${newLeader} leads after ${took} ms`);
    assert.equal(newLeader, other.name, "the standby takes over");
    // the standby counts the Lease's duration from when it saw the last renewal (up to a retry period
    // after it), then tries every retry period; plus our polling and the kill's latency on a busy machine
    assert.ok(took <= LEASE_DURATION_MS + 2 * RETRY_PERIOD_MS + 3_000, `takeover took ${took} ms; the Lease allows ${LEASE_DURATION_MS} + 2 × ${RETRY_PERIOD_MS} ms`);
    assert.ok(took >= LEASE_DURATION_MS - RETRY_PERIOD_MS, `takeover took only ${took} ms: the killed leader could not hand the Lease back, so the standby must wait it out`);
    // the killed container is restarted by the kubelet and becomes a Ready standby
    await waitPods("both pods Ready again, the killed one restarted", (p) => p.length === 2 && p.every((x) => x.ready) && (p.find((x) => x.name === victim.name)?.restarts ?? 0) >= 1);
    await writeFile(path.join(srcDir, "d2", "after-takeover.txt"), "written under the new leader\n");
    await waitEqual();
    await waitCondition(node, NS, "web", "Ready", "True", 60_000);
  });

  test("helm upgrade to a new image rolls both pods onto it and the pair stays Ready", async () => {
    const r = await node.helm(["upgrade", RELEASE, CHART, "-n", SYSTEM_NS, "--reuse-values", "--set", `image.tag=${images.upgrade.tag}`, "--wait", "--timeout", "5m"], { timeoutMs: 330_000 });
    assert.equal(r.code, 0, `helm upgrade: ${r.stderr}`);
    const pods = await waitPods("two Ready pods on the new image", (p) => p.length === 2 && p.every((x) => x.ready && x.image === `${images.upgrade.name}:${images.upgrade.tag}`));
    for (const p of pods) assert.equal(p.imageID.replace(/^.*@/, ""), images.upgrade.id, "running the new image");
    assert.notEqual(images.upgrade.id, images.release.id);
    const names = pods.map((p) => p.name);
    await waitFor(`one of the new pods (${names.join(", ")}) to lead`, async () => names.includes(await leaderPod()) || undefined, 60_000, 500);
    await writeFile(path.join(srcDir, "d0", "after-upgrade.txt"), "written after the upgrade\n");
    await waitEqual();
    await waitCondition(node, NS, "web", "Ready", "True", 60_000);
  });

  test("helm uninstall (after the pair is deleted) leaves nothing of the release but the CRDs", async () => {
    await kubectlOk(node, ["delete", "rp", "web", "-n", NS, "--timeout=90s"]);
    assert.equal(await getPair(node, NS, "web"), undefined);
    const r = await node.helm(["uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout", "3m"], { timeoutMs: 200_000 });
    assert.equal(r.code, 0, `helm uninstall: ${r.stderr}`);
    // gone, not just terminating (a terminating operator must not leave or remake anything either)
    await waitFor("every pod of the release gone", async () => (await kubectlOk(node, ["get", "pods", "-n", SYSTEM_NS, "-o", "name"])).trim() === "" || undefined, 120_000, 500);
    const kinds = "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,configmaps,secrets,leases.coordination.k8s.io,endpointslices";
    const left = await kubectlOk(node, ["get", kinds, "-n", SYSTEM_NS, "-o", "name"]);
    const ours = left.split("\n").filter(Boolean).filter((n) => !["configmap/kube-root-ca.crt", "serviceaccount/default", "secret/understudy-agent-tls"].includes(n));
    assert.deepEqual(ours, [], "only what the user made (the TLS Secret) and what every namespace has stay");
    const cluster = await kubectlOk(node, ["get", "clusterroles,clusterrolebindings", "-l", `app.kubernetes.io/instance=${RELEASE}`, "-o", "name"]);
    assert.equal(cluster.trim(), "", "no cluster-wide RBAC left");
    // Helm keeps crds/ on uninstall, as the chart's README says
    const crds = await kubectlOk(node, ["get", "crd", "-o", "name"]);
    assert.match(crds, /replicationpairs\.understudy\.dev/);
  });

  test("stopping the node undoes everything it changed on the host", async () => {
    await source.stop();
    await target.stop();
    await node.stop();
    const report = node.cleanupReport;
    assert.ok(report, "stop() reports what it undid");
    assert.deepEqual(report.leftovers, [], `left on the host:\n${report.leftovers.join("\n")}`);
    for (const [k, v] of Object.entries(hostBefore)) assert.equal((await readFile(`/proc/sys/${k}`, "utf8")).trim(), v, `sysctl ${k} restored`);
    const mounts = await readFile("/proc/self/mountinfo", "utf8");
    assert.doesNotMatch(mounts, new RegExp(node.dir.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")), "no mount under the node's directory");
    assert.ok(!existsSync(path.join("/sys/fs/cgroup/memory", `understudy-${node.nodeName.split("-").pop()}`)), "the kubelet's cgroups are gone");
    log(`undone: ${report.undone.join("; ")}`);
  });
});
