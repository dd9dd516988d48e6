// For benchmark 8: a person with the dashboard open, as the operator sees it —
// a ServiceAccount token (bound to cluster-admin, so every namespace is
// readable and each read costs the operator its SubjectAccessReviews) reading
// the live stream (/api/live) until closed.
import { readFile } from "node:fs/promises";
import type { Cluster } from "../env/cluster.ts";
import { kubectlOk } from "../e2e/k8s-harness.ts";

export async function openDashboardViewer(c: Cluster, url: string): Promise<{ snapshotMs: number; snapshotBytes: number; bytes: () => number; close: () => void }> {
  await kubectlOk(c, ["create", "serviceaccount", "bench-viewer", "-n", "default"]);
  await kubectlOk(c, ["create", "clusterrolebinding", "bench-viewer", "--clusterrole=cluster-admin", "--serviceaccount=default:bench-viewer"]);
  const token = await c.createToken("default", "bench-viewer");
  const ac = new AbortController();
  const t0 = performance.now();
  const res = await fetch(new URL("/api/live", url), { headers: { Authorization: `Bearer ${token}` }, signal: ac.signal });
  if (!res.ok || !res.body) throw new Error(`dashboard /api/live: ${res.status} ${await res.text()}`);
  const reader = res.body.getReader();
  let total = 0;
  let snapshotBytes = 0;
  let snapshotMs = 0;
  let gotSnapshot!: () => void;
  const snapshot = new Promise<void>((r) => (gotSnapshot = r));
  const dec = new TextDecoder();
  let head = "";
  void (async () => {
    for (;;) {
      const { value, done } = await reader.read().catch(() => ({ value: undefined, done: true }));
      if (done || !value) return;
      total += value.length;
      if (!snapshotMs) {
        head += dec.decode(value, { stream: true });
        if (head.includes("\n\n")) {
          snapshotMs = performance.now() - t0;
          snapshotBytes = head.indexOf("\n\n");
          head = "";
          gotSnapshot();
        }
      }
    }
  })();
  await snapshot;
  return { snapshotMs, snapshotBytes, bytes: () => total, close: () => ac.abort() };
}

/**
 * Sleep `ms` while sampling the operator's memory every 5 s: medians of RSS and
 * of the JS heap in use (from its /metrics). A single RSS reading swings by
 * tens of MB with V8's garbage collections; medians over a minute compare.
 */
export async function sampleMemory(pid: number, metrics: () => Promise<string>, ms: number): Promise<{ rss: number; heap: number }> {
  const rss: number[] = [];
  const heap: number[] = [];
  const end = Date.now() + ms;
  while (Date.now() < end) {
    await new Promise((r) => setTimeout(r, Math.min(5000, Math.max(0, end - Date.now()))));
    const s = await readFile(`/proc/${pid}/status`, "utf8");
    rss.push(Number(/VmRSS:\s+(\d+) kB/.exec(s)?.[1] ?? 0) * 1024);
    heap.push(Number(/^understudy_operator_nodejs_heap_size_used_bytes (\S+)/m.exec(await metrics())?.[1] ?? 0));
  }
  const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)] ?? 0;
  return { rss: median(rss), heap: median(heap) };
}
