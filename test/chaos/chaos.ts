// Seeded chaos for a real source → target pair (agent processes, the link
// through FaultProxy): each round runs a random workload and injects one
// fault at a random step, lifted when the workload ends — kill -9 of the source
// or of the target agent (restarted then), or a
// network fault (latency with jitter, a bandwidth cap, tiny segments, a black
// hole, connection resets). Then, with the workload stopped:
//  - recovery: the source drains (its journal covers every write made) and
//    the target acknowledges that position within a bound (else "stuck");
//  - acknowledged means durable: with the source frozen (SIGSTOP), the target
//    is killed with kill -9 and restarted, and its image must equal the
//    source tree (content, modes, owners, times, links) — nothing acked lost.
// The same seed gives the same faults at the same steps of the same workload.
import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { AgentConnection } from "../../agent/control-client.ts";
import { AgentProc, compareTrees, freePort, snapshotTree, waitFor } from "../e2e/harness.ts";
import { Workload, rng } from "../e2e/workload.ts";
import { FaultProxy, type Fault } from "./fault-proxy.ts";

export const FAULT_CLASSES = ["kill-source", "kill-target", "latency", "bandwidth", "tiny-segments", "blackhole", "reset"] as const;
export type FaultClass = (typeof FAULT_CLASSES)[number];

export interface RoundResult {
  round: number;
  fault: FaultClass;
  atStep: number;
  recoveryMs: number;
  violations: string[];
}

export interface ChaosOptions {
  dir: string;
  seed: number;
  rounds: number;
  /** how long the target may take to acknowledge everything after a fault */
  recoverWithinMs?: number;
  log?: (line: string) => void;
}

const SET = "data";

async function agentProc(dir: string, name: string, cfg: Record<string, unknown>): Promise<AgentProc> {
  const port = await freePort();
  const file = path.join(dir, `${name}.yaml`);
  await writeFile(file, YAML.stringify({ name, listen: `127.0.0.1:${port}`, dataDir: `state-${name}`, tls: { insecure: true }, ...cfg }));
  return new AgentProc(name, file, port, path.join(dir, `${name}.log`));
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function runChaos(o: ChaosOptions): Promise<RoundResult[]> {
  const log = o.log ?? (() => {});
  const r = rng(o.seed);
  const int = (n: number) => Math.floor(r() * n);
  const src = path.join(o.dir, "src");
  await mkdir(src, { recursive: true });
  const target = await agentProc(o.dir, "t", { target: { root: "images" } });
  await target.start();
  const proxy = await FaultProxy.start(target.port, r);
  const source = await agentProc(o.dir, "s", { source: { sets: [{ name: SET, path: "src", targets: [proxy.address], compression: "fast" }] } });
  await source.start();
  const image = path.join(o.dir, "images", "s", SET);
  const conn = () => new AgentConnection(source.address, { insecure: true });
  const w = new Workload(src, o.seed);
  const results: RoundResult[] = [];
  try {
    for (let round = 0; round < o.rounds; round++) {
      // Every class once first (a short run covers them all), then at random.
      const fault: FaultClass = round < FAULT_CLASSES.length ? FAULT_CLASSES[round]! : FAULT_CLASSES[int(FAULT_CLASSES.length)]!;
      const steps = 12 + int(12);
      const atStep = 1 + int(steps - 2);
      const net: Fault | undefined =
        fault === "latency" ? { kind: "latency", ms: 20 + int(200), jitterMs: int(200) }
        : fault === "bandwidth" ? { kind: "bandwidth", bytesPerSecond: 64 * 1024 + int(512 * 1024) }
        : fault === "tiny-segments" ? { kind: "tiny-segments", bytes: 1 + int(16) }
        : fault === "blackhole" ? { kind: "blackhole" }
        : fault === "reset" ? { kind: "reset" }
        : undefined;
      const violations: string[] = [];
      for (let step = 0; step < steps; step++) {
        if (step === atStep) {
          if (fault === "kill-source") await source.kill9();
          else if (fault === "kill-target") await target.kill9();
          else proxy.set(net!);
        }
        await w.step();
        await sleep(int(40));
      }
      // The fault lasts until the workload's end, then is lifted; recovery is timed from there.
      // (A black hole leaves connections that look open: the agents' keepalive must notice.)
      const t0 = Date.now();
      proxy.set({ kind: "none" });
      if (!source.alive) await source.start();
      if (!target.alive) await target.start();
      let recoveryMs = -1;
      const c = conn();
      try {
        const { lastSeq } = await waitFor("the source to drain", () => c.drain(SET, 30_000), 60_000, 500);
        await waitFor(`the target to acknowledge seq ${lastSeq}`, async () => ((await c.status().catch(() => undefined))?.sets[0]?.targets[0]?.lastAckedSeq ?? 0) >= lastSeq, o.recoverWithinMs ?? 120_000, 100);
        recoveryMs = Date.now() - t0;
      } catch (e) {
        violations.push(`stuck: ${(e as Error).message}`);
      } finally {
        c.close();
      }
      if (recoveryMs >= 0) {
        // Acknowledged = durable: the target killed right after, with the source frozen.
        process.kill(source.pid, "SIGSTOP");
        try {
          await target.kill9();
          await target.start();
          const diff = compareTrees(await snapshotTree(src), await snapshotTree(image));
          if (diff.length) violations.push(`acknowledged but not on the target after kill -9: ${diff.slice(0, 5).join("; ")}`);
        } finally {
          process.kill(source.pid, "SIGCONT");
        }
      }
      const res = { round, fault, atStep, recoveryMs, violations };
      results.push(res);
      log(`round ${round + 1}/${o.rounds}: ${fault} at step ${atStep}/${steps}: ${recoveryMs >= 0 ? `recovered in ${recoveryMs} ms` : "did not recover"}${violations.length ? `; VIOLATIONS: ${violations.join(" | ")}` : ""}`);
    }
  } finally {
    proxy.set({ kind: "none" });
    await Promise.all([source.stop(), target.stop()]);
    await proxy.close();
  }
  return results;
}

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor(q * s.length))]! : NaN;
}

/** RELIABILITY.md: per fault class, how often injected, violations, recovery median/worst; the seed. */
export function reliabilityReport(results: RoundResult[], seed: number, command: string): string {
  const lines = [
    "# Reliability (generated)",
    "",
    `Generated by \`${command}\` with seed **${seed}** (replay: \`CHAOS_SEED=${seed} CHAOS_ROUNDS=${results.length} ${command}\`), ${results.length} rounds, ${new Date().toISOString().slice(0, 10)}.`,
    "Each round: a random workload on a real source → target pair (agent processes; the link through a fault-injecting TCP proxy), one fault from a random step to the end of the workload;",
    "then the fault is lifted (a killed agent restarted), the source drains and the target must acknowledge everything: recovery is the time from lifting the fault to that acknowledgement (bound 120 s), and, with the source frozen, the target is killed with kill -9 and restarted:",
    "its image must equal the source tree (nothing acknowledged lost; content, modes, owners, times, links).",
    `So every round also kills the target with kill -9 once more (${results.length} kill points beyond the table's).`,
    "",
    "| fault | injected | violations | recovery median | recovery worst |",
    "|---|---:|---:|---:|---:|",
  ];
  for (const f of FAULT_CLASSES) {
    const rs = results.filter((r) => r.fault === f);
    if (!rs.length) continue;
    const rec = rs.filter((r) => r.recoveryMs >= 0).map((r) => r.recoveryMs);
    const fmt = (ms: number) => (Number.isFinite(ms) ? `${(ms / 1000).toFixed(2)} s` : "–");
    lines.push(`| ${f} | ${rs.length} | ${rs.reduce((n, r) => n + r.violations.length, 0)} | ${fmt(quantile(rec, 0.5))} | ${rec.length < rs.length ? "did not recover" : fmt(Math.max(...rec))} |`);
  }
  const bad = results.filter((r) => r.violations.length);
  lines.push("", `Total: ${results.length} faults injected, ${bad.reduce((n, r) => n + r.violations.length, 0)} invariant violations.`);
  if (bad.length) {
    lines.push("", "## Violations", "");
    for (const r of bad) lines.push(`- round ${r.round + 1} (${r.fault} at step ${r.atStep}): ${r.violations.join(" | ")}`);
  }
  lines.push("", "Not covered yet: kill -9 during mirror/verify --repair/failover/cutover, the operator and the API server, disk full / read-only, slow close and link flapping (see issue 16).", "");
  return lines.join("\n");
}
