// Benchmark 8: the operator reconciling many ReplicationPairs on a real
// kube-apiserver (test/env). One source agent and one target agent (mTLS)
// carry every pair, each replicating its own small directory. Measured: time
// from `kubectl apply` of all pairs to every pair Ready; the operator's memory
// (resident now and at its peak); reconcile durations (from its own metrics);
// and the user-visible latency of a spec change (kubectl patch → status
// observedGeneration caught up). There is no rsync/lsyncd equivalent.
import { mkdir, readFile, writeFile } from "node:fs/promises";
import YAML from "yaml";
import { REPO } from "../e2e/harness.ts";
import path from "node:path";
import { startCluster, type Cluster } from "../env/cluster.ts";
import { OperatorProc, Pki, installCrds, kubectlOk, pairYaml, tlsAgent } from "../e2e/k8s-harness.ts";
import type { ReplicationPair } from "../../operator/api/v1alpha1/index.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { openDashboardViewer, sampleMemory } from "./dashboard-viewer.ts";
import { freePort } from "../e2e/harness.ts";
import { fmtMs, nowMs, percentiles, pollUntil, progress, type BenchContext } from "./util.ts";

const NS = "scale";

/** A Kubernetes memory quantity (512Mi, 1Gi, 300M) in bytes. */
function quantity(q: string): number {
  const m = /^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$/.exec(q.trim());
  if (!m) throw new Error(`not a memory quantity: ${q}`);
  const mult: Record<string, number> = { "": 1, Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, Ti: 1024 ** 4, k: 1e3, M: 1e6, G: 1e9, T: 1e12 };
  return Number(m[1]) * mult[m[2] ?? ""]!;
}

async function rss(pid: number): Promise<{ now: number; peak: number }> {
  const s = await readFile(`/proc/${pid}/status`, "utf8");
  const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(s)?.[1] ?? 0) * 1024;
  return { now: kb("VmRSS"), peak: kb("VmHWM") };
}

async function listPairs(c: Cluster): Promise<ReplicationPair[]> {
  const r = await c.kubectl(["get", "replicationpairs", "-n", NS, "-o", "json"], { timeoutMs: 300_000 });
  if (r.code !== 0) throw new Error(`kubectl get replicationpairs failed (${r.code}): ${r.stderr}`);
  return (JSON.parse(r.stdout) as { items: ReplicationPair[] }).items;
}

const ready = (p: ReplicationPair) => p.status?.conditions?.some((c) => c.type === "Ready" && c.status === "True") && p.status.observedGeneration === p.metadata.generation;

/** Quantile upper bounds from a Prometheus histogram's cumulative buckets. */
function histogramQuantiles(metrics: string, name: string, qs: number[]): { count: number; sum: number; q: (number | undefined)[] } {
  const buckets = [...metrics.matchAll(new RegExp(`^${name}_bucket\\{[^}]*le="([^"]+)"[^}]*\\} (\\d+)`, "gm"))].map((m) => [m[1] === "+Inf" ? Infinity : Number(m[1]), Number(m[2])] as const);
  const count = Number(new RegExp(`^${name}_count\\{[^}]*\\} (\\d+)`, "m").exec(metrics)?.[1] ?? 0);
  const sum = Number(new RegExp(`^${name}_sum\\{[^}]*\\} ([\\d.e+-]+)`, "m").exec(metrics)?.[1] ?? 0);
  return { count, sum, q: qs.map((q) => buckets.find(([, c]) => c >= q * count)?.[0]) };
}

export async function benchOperatorScale(ctx: BenchContext): Promise<BenchResult> {
  // BENCH_OPERATOR_PAIRS=N: another pair count (the chart's memory limit is sized for the default).
  const pairs = Number(process.env.BENCH_OPERATOR_PAIRS) || (ctx.quick ? 100 : 2000);
  const r = emptyResult("8", `Operator: reconciling ${pairs} ReplicationPairs on a real API server`, `${pairs} pairs, each a directory of 3 small files; one source and one target agent`);
  const t0 = nowMs();
  const dir = path.join(ctx.workDir, "operator-scale");
  await mkdir(dir, { recursive: true });
  progress("operator: starting kube-apiserver + etcd");
  const cluster = await startCluster({ dir: path.join(dir, "k8s") });
  const pki = await Pki.create(path.join(dir, "pki"));
  const { agent: target, tls } = await tlsAgent(pki, dir, "dst-agent", { targetRoot: path.join(dir, "dst") });
  const { agent: source, tls: stls } = await tlsAgent(pki, dir, "src-agent");
  let op: OperatorProc | undefined;
  let chartLimit: string | undefined;
  let workers = 4;
  try {
    await target.start(tls);
    await source.start(stls);
    await installCrds(cluster);
    await kubectlOk(cluster, ["create", "namespace", NS]);
    await kubectlOk(cluster, ["create", "namespace", "understudy-system"]);
    // The chart's defaults (workers, status interval, memory limit) are what is measured.
    const dashUrl = `http://127.0.0.1:${await freePort()}/`;
    const values = YAML.parse(await readFile(path.join(REPO, "charts/understudy/values.yaml"), "utf8")) as { workers?: number; statusInterval?: string; resources?: { limits?: { memory?: string } } };
    chartLimit = values.resources?.limits?.memory;
    workers = values.workers ?? 4;
    op = await OperatorProc.create({ kubeconfig: cluster.kubeconfig, tlsDir: await pki.operatorTlsDir(), logPath: path.join(dir, "operator.log"), leaseNamespace: "understudy-system", extra: ["--status-interval", values.statusInterval ?? "10s", "--workers", String(workers), "--log-level", "warn", "--dashboard-address", new URL(dashUrl).host],
      // BENCH_OPERATOR_NODE_OPTIONS: V8 flags for the operator, e.g. --max-semi-space-size=4 (what a chart could set)
      ...(process.env.BENCH_OPERATOR_NODE_OPTIONS ? { env: { NODE_OPTIONS: process.env.BENCH_OPERATOR_NODE_OPTIONS } } : {}) });
    await op.start();
    const idle = await rss(op.pid);
    progress(`operator: creating ${pairs} source directories and pairs`);
    const docs: string[] = [];
    for (let i = 0; i < pairs; i++) {
      const d = path.join(dir, "src", `p${i}`);
      await mkdir(d, { recursive: true });
      for (let f = 0; f < 3; f++) await writeFile(path.join(d, `f${f}.txt`), `pair ${i} file ${f}\n`);
      docs.push(pairYaml({ name: `p${i}`, namespace: NS, source: source.address, targets: [{ name: "standby", address: target.address }], path: d }));
    }
    const tApply = nowMs();
    // In slices: one apply of thousands of objects outlasts kubectl's deadline on a busy machine.
    for (let i = 0; i < docs.length; i += 250) {
      const r = await cluster.kubectl(["apply", "-f", "-"], { input: docs.slice(i, i + 250).join("---\n"), timeoutMs: 600_000 });
      if (r.code !== 0) throw new Error(`kubectl apply of pairs ${i}-${i + 249} failed (${r.code}): ${r.stderr}`);
    }
    const applyMs = nowMs() - tApply;
    let lastReady = 0;
    await pollUntil(`all ${pairs} pairs Ready`, async () => {
      const items = await listPairs(cluster);
      lastReady = items.filter(ready).length;
      const m = await rss(op!.pid).catch(() => ({ now: 0, peak: 0 }));
      progress(`operator: ${lastReady}/${pairs} Ready after ${fmtMs(nowMs() - tApply)}; operator RSS ${(m.now / 1e6).toFixed(0)} MB (peak ${(m.peak / 1e6).toFixed(0)} MB)`);
      return lastReady === pairs;
    }, 1_800_000, 2000);
    const allReadyMs = nowMs() - tApply;
    const afterReady = await rss(op.pid);

    // Steady state: every pair refreshed on its status interval.
    progress("operator: steady state for 60 s");
    const m0 = await op.metrics();
    const cpu0 = await readFile(`/proc/${op.pid}/stat`, "utf8");
    const memNoViewer = await sampleMemory(op.pid, () => op!.metrics(), 60_000);
    const cpu1 = await readFile(`/proc/${op.pid}/stat`, "utf8");
    const m1 = await op.metrics();
    const ticks = (s: string) => { const f = s.slice(s.lastIndexOf(")") + 2).split(" "); return Number(f[11]) + Number(f[12]); };
    const cpuCores = (ticks(cpu1) - ticks(cpu0)) / 100 / 60;
    const calls = (m: string) => [...m.matchAll(/^understudy_operator_agent_calls_total\{[^}]*\} (\d+)/gm)].reduce((a, x) => a + Number(x[1]), 0);
    const reconciles = (m: string) => [...m.matchAll(/^understudy_operator_reconcile_total\{[^}]*\} (\d+)/gm)].reduce((a, x) => a + Number(x[1]), 0);
    const steady = await rss(op.pid);

    // The dashboard open: one viewer on the live stream for 60 s, against the 60 s just measured without one.
    progress("operator: dashboard open for 60 s");
    const viewer = await openDashboardViewer(cluster, dashUrl);
    const cpuD0 = await readFile(`/proc/${op.pid}/stat`, "utf8");
    const memViewer = await sampleMemory(op.pid, () => op!.metrics(), 60_000);
    const dashCores = (ticks(await readFile(`/proc/${op.pid}/stat`, "utf8")) - ticks(cpuD0)) / 100 / 60;
    viewer.close();

    // A spec change on 50 pairs: how long until each shows the new generation observed.
    progress("operator: changing the spec of 50 pairs");
    const changed = Array.from({ length: 50 }, (_, k) => `p${Math.floor((k * pairs) / 50)}`);
    const start = new Map<string, number>();
    for (const n of changed) {
      start.set(n, nowMs());
      await kubectlOk(cluster, ["patch", "rp", n, "-n", NS, "--type", "merge", "-p", '{"spec":{"compression":"balanced"}}']);
    }
    const latency = new Map<string, number>();
    await pollUntil("spec changes observed", async () => {
      const now = nowMs();
      for (const p of await listPairs(cluster)) {
        const n = p.metadata.name!;
        if (start.has(n) && !latency.has(n) && p.metadata.generation === 2 && p.status?.observedGeneration === 2) latency.set(n, now - start.get(n)!);
      }
      return latency.size === changed.length;
    }, 300_000, 250);
    const lat = percentiles([...latency.values()])!;
    const m2 = await op.metrics();
    const rec = histogramQuantiles(m2, "understudy_operator_reconcile_duration_seconds", [0.5, 0.99]);
    const wait = histogramQuantiles(m2, "understudy_operator_workqueue_queue_duration_seconds", [0.5, 0.99]);
    const final = await rss(op.pid);
    const heapUsed = Number(/^understudy_operator_nodejs_heap_size_used_bytes (\S+)/m.exec(m2)?.[1] ?? 0);
    const mb = (n: number) => `${(n / 1e6).toFixed(0)} MB`;

    r.summary.push(
      { metric: `${pairs} pairs applied → all Ready`, understudy: fmtMs(allReadyMs) },
      { metric: "operator RSS with all pairs (peak)", understudy: `${mb(steady.now)} (${mb(final.peak)})` },
      { metric: "spec change → observed (p50 / p99)", understudy: `${fmtMs(lat.p50)} / ${fmtMs(lat.p99)}` },
    );
    r.tables.push({
      title: "Operator at scale",
      headers: ["measure", "value"],
      rows: [
        ["pairs", String(pairs)],
        ["kubectl apply of all pairs", fmtMs(applyMs)],
        ["apply → every pair Ready (configured on the source, mirrored, replicating)", fmtMs(allReadyMs)],
        ["operator RSS idle (no pairs)", mb(idle.now)],
        ["operator RSS once all Ready / after 60 s steady / peak", `${mb(afterReady.now)} / ${mb(steady.now)} / ${mb(final.peak)}`],
        ["the chart's memory limit (resources.limits.memory)", chartLimit ? `${chartLimit}: peak ${final.peak <= quantity(chartLimit) ? "within it" : "ABOVE it"} (${((final.peak / quantity(chartLimit)) * 100).toFixed(0)}%)` : "none"],
        ["workers (the chart's default)", String(workers)],
        ["operator JS heap in use at the end (the rest of RSS is V8's reserve, code and buffers)", mb(heapUsed)],
        ["operator CPU in steady state", `${cpuCores.toFixed(2)} cores`],
        ["dashboard open (one viewer, 60 s) vs the 60 s before without one: operator RSS / JS heap in use (medians of 5 s samples) / CPU more (goal < 30 MB, < 0.05 cores)", `${mb(memViewer.rss - memNoViewer.rss)} / ${mb(memViewer.heap - memNoViewer.heap)} / ${(dashCores - cpuCores).toFixed(3)} cores`],
        ["dashboard: first snapshot of every pair (size) / bytes streamed in 60 s", `${fmtMs(viewer.snapshotMs)} (${(viewer.snapshotBytes / 1e3).toFixed(0)} kB) / ${(viewer.bytes() / 1e3).toFixed(0)} kB`],
        ["reconciles per second in steady state", ((reconciles(m1) - reconciles(m0)) / 60).toFixed(1)],
        ["agent control calls per second in steady state (status cached 1 s per agent)", ((calls(m1) - calls(m0)) / 60).toFixed(1)],
        ["reconcile duration p50 / p99 (histogram bucket bounds)", `≤ ${rec.q[0]} s / ≤ ${rec.q[1]} s over ${rec.count} reconciles (mean ${(rec.sum / Math.max(1, rec.count) * 1000).toFixed(1)} ms)`],
        ["work-queue wait p50 / p99 (bucket bounds)", `≤ ${wait.q[0]} s / ≤ ${wait.q[1]} s`],
        ["spec change (kubectl patch) → status.observedGeneration, 50 pairs: p50 / p90 / p99 / max", `${fmtMs(lat.p50)} / ${fmtMs(lat.p90)} / ${fmtMs(lat.p99)} / ${fmtMs(lat.max)}`],
      ],
    });
    r.notes.push(`The operator runs as a process with an admin kubeconfig, the chart's ${workers} workers and status interval, leader election on, and the dashboard served (its history and event caches are in every figure)${process.env.BENCH_OPERATOR_NODE_OPTIONS ? `, NODE_OPTIONS=${process.env.BENCH_OPERATOR_NODE_OPTIONS}` : ""}; its Kubernetes client is @kubernetes/client-node.`, "A spec change restarts that pair's set on the source agent (journal kept, no mirror); the latency includes that and the next status write.");
  } catch (e) {
    r.error = (e as Error).message;
  } finally {
    await op?.stop().catch(() => undefined);
    await source.stop().catch(() => undefined);
    await target.stop().catch(() => undefined);
    await cluster.stop();
  }
  r.ms = nowMs() - t0;
  return r;
}
