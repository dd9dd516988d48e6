// Benchmark 4: resident memory of a source agent holding a large queue. Only
// the source runs (its target address has no listener yet) while many 4 MiB
// files are written; once its status shows the journal holding all of it we
// read the agent's RSS. Then the target starts and we time the catch-up and
// check the replica against the source. No baseline: rsync and lsyncd keep
// no queue (the goal is absolute).
import path from "node:path";
import { BenchPair, gcDelta, sourcePhases, type GcStats } from "./agents.ts";
import { compareTrees, snapshotTree } from "../e2e/harness.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { GiB, MiB, fmtMB, fmtMs, fmtSize, freshDir, nowMs, pollUntil, progress, removeDir, sleep, writeRandomFile, type BenchContext } from "./util.ts";

const FILE_SIZE = 4 * MiB;
const GOAL_RSS = 150e6;

/** Samples an agent's RSS in the background; keeps the largest value. */
class RssSampler {
  max = 0;
  private stopped = false;
  private readonly done: Promise<void>;
  constructor(read: () => Promise<number>, everyMs = 200) {
    this.done = (async () => {
      while (!this.stopped) {
        this.max = Math.max(this.max, await read().catch(() => 0));
        await sleep(everyMs);
      }
    })();
  }
  async stop(): Promise<number> {
    this.stopped = true;
    await this.done;
    return this.max;
  }
}

export async function benchMemory(ctx: BenchContext): Promise<BenchResult> {
  const total = ctx.quick ? 256 * MiB : 2 * GiB;
  const files = total / FILE_SIZE;
  const res = emptyResult("4", `Source agent memory with ${fmtSize(total)} queued, then catch-up`, `${files} files of ${fmtSize(FILE_SIZE)} (${fmtSize(total)}) written while the target is down`);
  const dir = await freshDir(ctx.workDir, "memory");
  let pair: BenchPair | undefined;
  const m: { gcCapture?: GcStats; gcCatchUp?: GcStats; cpuCapture?: number; cpuCatchUp?: number; rssIdle?: number; rssQueued?: number; hwmQueued?: number; sampledMax?: number; queued?: number; queueMemory?: number; captureMs?: number; connectMs?: number; catchUpMs?: number; catchUpRssMax?: number; equal?: boolean; diffs?: string[] } = {};
  try {
    pair = await BenchPair.create({ dir });
    pair.source.nodeArgs = ["--trace-gc"];
    await pair.source.start();
    await sleep(500);
    m.rssIdle = (await pair.source.memory()).rss;
    const p = pair;
    const sampler = new RssSampler(async () => (await p.source.memory()).rss);
    const cpu = async () => {
      const c = await p.source.cpuSeconds();
      return c ? c.user + c.system : NaN;
    };
    const [gc0, cpu0] = [await pair.source.gcStats(), await cpu()];
    progress(`memory: target down; writing ${files} × ${fmtSize(FILE_SIZE)} on the source`);
    const t0 = nowMs();
    for (let i = 0; i < files; i++) await writeRandomFile(path.join(pair.src, `d${String(Math.floor(i / 64)).padStart(3, "0")}`, `f${String(i).padStart(5, "0")}.bin`), FILE_SIZE);
    progress(`memory: written after ${fmtMs(nowMs() - t0)}; waiting for the journal to hold it`);
    const queued = await pollUntil("the journal to hold everything written", async () => {
      const s = await p.source.set();
      const q = (s.queuedBytes?.memory ?? 0) + (s.queuedBytes?.disk ?? 0);
      return s.capturedDataBytes >= total && q >= total ? s : false;
    }, 600_000, 200);
    m.captureMs = nowMs() - t0;
    const [gc1, cpu1] = [await pair.source.gcStats(), await cpu()];
    m.gcCapture = gcDelta(gc0, gc1);
    m.cpuCapture = cpu1 - cpu0;
    await sleep(1000);
    const mem = await pair.source.memory();
    m.rssQueued = mem.rss;
    m.hwmQueued = mem.hwm;
    m.sampledMax = await sampler.stop();
    m.queued = (queued.queuedBytes?.memory ?? 0) + (queued.queuedBytes?.disk ?? 0);
    m.queueMemory = queued.queuedBytes?.memory ?? 0;
    progress(`memory: ${fmtMB(m.queued)} queued (${fmtMB(m.queueMemory)} of it in memory); source RSS ${fmtMB(m.rssQueued)}, peak ${fmtMB(m.hwmQueued)}`);

    progress("memory: starting the target; timing the catch-up");
    const catchUpSampler = new RssSampler(async () => (await p.source.memory()).rss);
    const tStart = nowMs();
    await pair.target.start();
    await pollUntil("the sender to connect", async () => {
      const t = (await p.source.set()).targets[0];
      return t !== undefined && (t.state === "replicating" || t.state === "idle" || t.state === "mirroring" || t.lastAckedSeq > 0);
    }, 120_000, 50);
    m.connectMs = nowMs() - tStart;
    await pair.waitCaughtUp("the target to catch up", ctx.quick ? 120_000 : 300_000);
    m.catchUpMs = nowMs() - tStart;
    m.catchUpRssMax = await catchUpSampler.stop();
    const [gc2, cpu2] = [await pair.source.gcStats(), await cpu()];
    m.gcCatchUp = gcDelta(gc1, gc2);
    m.cpuCatchUp = cpu2 - cpu1;
    for (const line of await sourcePhases(pair.source)) res.notes.push(`understudy source log: ${line}.`);
    progress(`memory: caught up after ${fmtMs(m.catchUpMs)} (sender connected after ${fmtMs(m.connectMs)}); comparing trees`);
    const diffs = compareTrees(await snapshotTree(pair.src), await snapshotTree(pair.image));
    m.equal = diffs.length === 0;
    m.diffs = diffs.slice(0, 5);
    if (!m.equal) res.notes.push(`The replica differs from the source after catch-up (first differences: ${m.diffs.join("; ")}).`);
  } catch (e) {
    res.error = (e as Error).message;
    progress(`memory: FAILED: ${res.error}`);
  } finally {
    await pair?.stop();
    await removeDir(dir);
  }
  const mb = (n?: number) => (n === undefined ? "n/a" : fmtMB(n));
  const perGiB = (x: number | undefined, digits = 2) => (x === undefined || Number.isNaN(x) ? "n/a" : (x / (total / GiB)).toFixed(digits));
  const catchUpRate = m.catchUpMs ? `${fmtMB(total / (m.catchUpMs / 1000))}/s` : "n/a";
  res.tables.push({
    headers: ["measurement", "value"],
    rows: [
      ["queued in the journal (status: queuedBytes memory + disk)", `${mb(m.queued)} (${mb(m.queueMemory)} in memory)`],
      ["time from the first write until the journal held it all", fmtMs(m.captureMs)],
      ["source agent RSS after start-up, empty set", mb(m.rssIdle)],
      ["source agent RSS with the queue full (VmRSS)", mb(m.rssQueued)],
      ["source agent peak RSS so far (VmHWM)", mb(m.hwmQueued)],
      ["largest RSS sampled while writing (every 200 ms)", mb(m.sampledMax)],
      ["catch-up: target start → all acknowledged", `${fmtMs(m.catchUpMs)} (${catchUpRate})`],
      ["↳ of which: target start → sender connected (reconnect backoff)", fmtMs(m.connectMs)],
      ["largest source RSS sampled during catch-up", mb(m.catchUpRssMax)],
      ["source CPU-s per GiB: capture (writing) / catch-up (sending)", `${perGiB(m.cpuCapture)} / ${perGiB(m.cpuCatchUp)}`],
      ["source GC pause s per GiB: capture / catch-up", `${perGiB(m.gcCapture && m.gcCapture.ms / 1000)} / ${perGiB(m.gcCatchUp && m.gcCatchUp.ms / 1000)}`],
      ["source full GCs (mark-compact) per GiB: capture / catch-up", `${perGiB(m.gcCapture?.markCompacts, 0)} / ${perGiB(m.gcCatchUp?.markCompacts, 0)}`],
      ["replica equals source afterwards (content, modes, owners, mtimes)", m.equal === undefined ? "n/a" : m.equal ? "yes" : "NO"],
    ],
  });
  res.summary.push({ metric: `source RSS with ${fmtSize(total)} queued`, understudy: mb(m.rssQueued) });
  res.summary.push({ metric: `catch-up of ${fmtSize(total)} after the target starts`, understudy: fmtMs(m.catchUpMs) });
  res.summary.push({ metric: "source GC pause s per GiB, capture / catch-up", understudy: `${perGiB(m.gcCapture && m.gcCapture.ms / 1000)} / ${perGiB(m.gcCatchUp && m.gcCatchUp.ms / 1000)}` });
  res.goals.push({ text: `source RSS < ${fmtMB(GOAL_RSS, 0)} with ${fmtSize(total)} queued`, met: m.rssQueued === undefined ? undefined : m.rssQueued < GOAL_RSS, measured: `${mb(m.rssQueued)} (peak ${mb(m.hwmQueued)})` });
  res.notes.push(
    "The source is started alone, its target's port has no listener; files are random (incompressible) so the journal holds about as many bytes as were written. Default set options: the newest packets stay in memory up to the set's queueMemory, the rest only in the journal's segment files.",
    `Agents run with the malloc settings the README prescribes (test/e2e/harness.ts AGENT_ENV). MB = 10^6 bytes. GC pause: main-thread time from the source's --trace-gc lines (pauses plus incremental marking steps).`,
    "Catch-up time starts when the target process is spawned, so it includes the target's start-up and the sender's reconnect backoff (up to 15 s after failing to connect for a while).",
  );
  return res;
}
