// Benchmark 9: recovery time. Agents on hosts of their own (network
// namespaces), a real API server, the operator, and a FailoverPolicy with a
// 1 s health interval and 3 missed beats. Measured from the fault (source
// agent kill -9, or its link cut) to the Service's EndpointSlice pointing at
// the target (the target serving), over several rounds; each round fails back
// before the next. There is no rsync/lsyncd equivalent (they have no failover).
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { FailoverWorld } from "../e2e/failover-fixture.ts";
import { condition } from "../e2e/k8s-harness.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { fmtMs, nowMs, percentiles, pollUntil, progress, type BenchContext } from "./util.ts";

export async function benchFailoverRecovery(ctx: BenchContext): Promise<BenchResult> {
  const rounds = ctx.quick ? 2 : 4;
  const r = emptyResult("9", "Failover: source down → target serving", `${rounds} rounds each of kill -9 and link cut; health interval 1 s, 3 missed beats`);
  const t0 = nowMs();
  let w: FailoverWorld | undefined;
  try {
    progress("failover: starting API server, operator and agents in network namespaces");
    w = await FailoverWorld.create("bench", [{ name: "src" }, { name: "dr", target: true }]);
    const world = w;
    const src = await world.sourceTree("data", 200);
    await world.apply({ apiVersion: "v1", kind: "Service", metadata: { name: "app", namespace: "bench" }, spec: { ports: [{ port: 80 }] } });
    await world.policy("ha", { selector: { matchLabels: { app: "x" } }, approval: "automatic", knownGood: { requireVerify: false, maxLag: "30s" }, serviceIdentity: { service: { name: "app", port: 80 } } });
    await world.pair("p", { source: "src", targets: ["dr"], path: src, labels: { app: "x" } });
    const ready = () => world.waitPair("p", "Ready on the source", (p) => p.status?.activeSide !== "dr" && condition(p, "Ready").status === "True" && !!p.status?.knownGood?.[0]?.ok, 120_000);
    await ready();
    const served = async (host: string) => (await world.endpointSlice("app").catch(() => undefined))?.endpoints[0]?.addresses[0] === host;
    const results: Record<string, { observed: number[]; operator: number[] }> = { "kill -9": { observed: [], operator: [] }, "link cut": { observed: [], operator: [] } };
    for (const fault of ["kill -9", "link cut"] as const) {
      for (let i = 0; i < rounds; i++) {
        await writeFile(path.join(src, `round-${fault.replace(/\W/g, "")}-${i}.dat`), `round ${i}\n`);
        await world.waitTreesEqual(src, world.image("dr", "src", "p"), "caught up before the fault");
        progress(`failover: ${fault}, round ${i + 1}/${rounds}`);
        const at = nowMs();
        if (fault === "kill -9") await world.agents.src!.kill9();
        else await world.hosts.src!.cutLink();
        await pollUntil("target serving", async () => served(world.hosts.dr!.ip), 60_000, 50);
        results[fault]!.observed.push(nowMs() - at);
        results[fault]!.operator.push(((await world.get("p"))?.status?.failover?.recoverySeconds ?? NaN) * 1000);
        // Back to the start: the source returns, is brought up to date, and takes over again.
        if (fault === "kill -9") await world.agents.src!.start(world.tls);
        else await world.hosts.src!.restoreLink();
        await world.waitPair("p", "source brought up to date", (p) => p.status?.reverse?.mirrored === true, 120_000);
        const back = await world.plugin(["failback", "p", "--timeout", "120"]);
        if (back.code !== 0) throw new Error(`failback failed: ${back.out}`);
        await ready();
      }
    }
    const rows: string[][] = [];
    const goalMet: boolean[] = [];
    for (const [fault, v] of Object.entries(results)) {
      const o = percentiles(v.observed)!;
      const op = percentiles(v.operator)!;
      rows.push([fault, String(o.count), `${fmtMs(o.p50)} / ${fmtMs(o.max)}`, `${fmtMs(op.p50)} / ${fmtMs(op.max)}`]);
      r.summary.push({ metric: `recovery after ${fault} (median / worst)`, understudy: `${fmtMs(o.p50)} / ${fmtMs(o.max)}` });
      goalMet.push(o.max < 10_000);
      r.goals.push({ text: `recovery after ${fault} under 10 s (1 s interval, 3 missed beats)`, met: o.max < 10_000, measured: `worst ${fmtMs(o.max)}` });
    }
    r.tables.push({ title: "Source down → target serving", headers: ["fault", "rounds", "observed: fault → EndpointSlice moved (median / worst)", "operator's record: first missed check → promoted (median / worst)"], rows });
    r.notes.push(
      "kill -9: the target sees the stream end at once and the operator's checks fail at once (connection refused); link cut: nothing answers, so the target notices by gRPC keepalive (1 s ping, 2 s timeout) and the operator's checks wait out their 1 s deadline.",
      "The source counts as down only when the operator missed 3 checks in a row AND no target hears from it; the target must also pass the known-good gate (no gap, everything acknowledged applied, mirror complete, lag within bound) — verify was not required here.",
    );
  } catch (e) {
    r.error = (e as Error).message;
  } finally {
    await w?.dispose();
  }
  r.ms = nowMs() - t0;
  return r;
}
