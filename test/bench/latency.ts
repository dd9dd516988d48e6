// Benchmark 1: replication latency at ~1,000 small writes/s. The same
// workload (latency-workload.ts) runs against understudy, lsyncd with its
// default delay, and lsyncd with delay = 0; the observer thread
// (latency-observer.ts) times when each write shows on the replica.
import { mkdir, readFile } from "node:fs/promises";
import path from "node:path";
import { BenchPair } from "./agents.ts";
import { Observer } from "./latency-observer.ts";
import { FILES, NEW_DIR, NEW_FILE_BYTES, expectedFinalState, fileName, latencies, prepareFiles, runNewFileWriter, runWriter } from "./latency-workload.ts";
import { Lsyncd } from "./lsyncd.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { fmtMs, freshDir, nowMs, percentiles, pollUntil, progress, ratio, removeDir, type BenchContext, type Percentiles } from "./util.ts";

const RATE = 1000;
const GOAL_P50_MS = 20;
const GOAL_P99_MS = 50;
const GOAL_NEW_P50_MS = 10;
/** New files: understudy's p99 at most this times lsyncd's (delay = 0). */
const GOAL_NEW_P99_VS_LSYNCD = 0.5;

interface LatencyRun {
  label: string;
  writes: number;
  /** writes per second the writer achieved */
  rate: number;
  /** latency percentiles; writes never seen count as infinitely late */
  stats?: Percentiles;
  notSeen: number;
  /** writes that showed on the replica before the writer stopped */
  seenWhileWriting: number;
  /** from the last write until the replica showed everything (or the wait gave up) */
  drainMs: number;
  error?: string;
}

/** A replicator under test: start it on src → replica, get back its stop function. */
type StartReplicator = () => Promise<() => Promise<void>>;

async function sameFiles(a: string, b: string): Promise<boolean> {
  for (let f = 0; f < FILES; f++) {
    const [x, y] = await Promise.all([readFile(path.join(a, fileName(f))), readFile(path.join(b, fileName(f))).catch(() => undefined)]);
    if (!y || !x.equals(y)) return false;
  }
  return true;
}

/** New files at RATE/s for durationMs in src/NEW_DIR (the replicator is running and has copied the directory). */
async function measureNewFiles(label: string, src: string, replica: string, durationMs: number, drainTimeoutMs: number): Promise<LatencyRun> {
  const observer = await Observer.start(path.join(replica, NEW_DIR), "new-files");
  try {
    progress(`latency/${label}: creating ${RATE} new files/s for ${durationMs / 1000} s`);
    const log = await runNewFileWriter(path.join(src, NEW_DIR), RATE, durationMs);
    const writerDone = nowMs();
    const complete = await pollUntil(`${label}: every new file to show whole on the replica`, async () => (await observer.progress()).newFiles >= log.count, drainTimeoutMs, 25).then(() => true, () => false);
    const drainMs = nowMs() - writerDone;
    const seen = new Map((await observer.finish()).newFileSeen);
    const ms: number[] = [];
    let notSeen = 0;
    let seenWhileWriting = 0;
    for (let seq = 1; seq <= log.count; seq++) {
      const at = seen.get(seq);
      if (at === undefined) {
        notSeen++;
        ms.push(Infinity);
        continue;
      }
      ms.push(at - log.at[seq]!);
      if (at <= writerDone) seenWhileWriting++;
    }
    const run: LatencyRun = { label, writes: log.count, rate: (log.count / log.elapsedMs) * 1000, stats: percentiles(ms), notSeen, seenWhileWriting, drainMs };
    if (!complete) run.error = `${notSeen} of ${log.count} new files never showed whole on the replica within ${fmtMs(drainTimeoutMs)} after the writer stopped`;
    progress(`latency/${label} new files: p50 ${fmtMs(run.stats?.p50)}  p99 ${fmtMs(run.stats?.p99)}  max ${fmtMs(run.stats?.max)}  not seen ${notSeen}`);
    return run;
  } finally {
    await observer.kill();
  }
}

async function measure(label: string, src: string, replica: string, start: StartReplicator, durationMs: number, drainTimeoutMs: number, newFiles: LatencyRun[] | undefined): Promise<LatencyRun> {
  await mkdir(src, { recursive: true });
  prepareFiles(src);
  await mkdir(path.join(src, NEW_DIR), { recursive: true });
  const stop = await start();
  let observer: Observer | undefined;
  try {
    progress(`latency/${label}: waiting for the initial copy`);
    await pollUntil(`${label}: initial copy of the ${FILES} files`, () => sameFiles(src, replica), 60_000, 50);
    observer = await Observer.start(replica);
    progress(`latency/${label}: writing ${RATE} writes/s for ${durationMs / 1000} s`);
    const log = await runWriter(src, RATE, durationMs);
    const writerDone = nowMs();
    const want = expectedFinalState(log);
    const obs = observer;
    const complete = await pollUntil(`${label}: every write to show on the replica`, async () => {
      const p = await obs.progress();
      return p.appends >= want.appends && want.lastHeader.every((s, f) => p.headers[f]! >= s);
    }, drainTimeoutMs, 25).then(() => true, () => false);
    const drainMs = nowMs() - writerDone;
    const { ms, missing: notSeen, seenWhileWriting } = latencies(log, await observer.finish(), writerDone);
    observer = undefined;
    for (let i = 0; i < notSeen; i++) ms.push(Infinity);
    const run: LatencyRun = { label, writes: log.count, rate: (log.count / log.elapsedMs) * 1000, stats: percentiles(ms), notSeen, seenWhileWriting, drainMs };
    if (!complete) run.error = `${notSeen} of ${log.count} writes never showed on the replica within ${fmtMs(drainTimeoutMs)} after the writer stopped`;
    progress(`latency/${label}: p50 ${fmtMs(run.stats?.p50)}  p99 ${fmtMs(run.stats?.p99)}  max ${fmtMs(run.stats?.max)}  not seen ${notSeen}`);
    if (newFiles) {
      try {
        newFiles.push(await measureNewFiles(label, src, replica, durationMs, drainTimeoutMs));
      } catch (e) {
        newFiles.push({ label, writes: 0, rate: 0, notSeen: 0, seenWhileWriting: 0, drainMs: NaN, error: (e as Error).message });
        progress(`latency/${label} new files: FAILED: ${(e as Error).message}`);
      }
    }
    return run;
  } finally {
    await observer?.kill();
    await stop();
  }
}

function understudy(dir: string): { src: string; replica: string; start: StartReplicator } {
  return {
    src: BenchPair.srcOf(dir),
    replica: BenchPair.imageOf(dir),
    start: async () => {
      const pair = await BenchPair.create({ dir });
      await pair.start();
      return () => pair.stop();
    },
  };
}

function lsyncd(dir: string, delay?: number): { src: string; replica: string; start: StartReplicator } {
  const src = path.join(dir, "src");
  const replica = path.join(dir, "dst");
  return {
    src,
    replica,
    start: async () => {
      await mkdir(src, { recursive: true });
      await mkdir(replica, { recursive: true });
      const l = await Lsyncd.start(dir, src, replica, delay);
      return () => l.stop();
    },
  };
}

export async function benchLatency(ctx: BenchContext): Promise<BenchResult> {
  const durationMs = ctx.quick ? 5_000 : 10_000;
  const res = emptyResult("1", "Replication latency at 1,000 small writes/s and 1,000 new files/s", `${RATE} writes/s for ${durationMs / 1000} s (${(RATE * durationMs) / 1000} writes of 64 B) over ${FILES} files; then ${RATE} new files/s of ${NEW_FILE_BYTES} B for ${durationMs / 1000} s`);
  const runs: LatencyRun[] = [];
  const newRuns: LatencyRun[] = [];
  // lsyncd with its default delay (15 s) is left out of the new-files run: its latency is the delay.
  const variants: [string, (d: string) => { src: string; replica: string; start: StartReplicator }, number, boolean][] = [
    ["understudy", understudy, 30_000, true],
    ["lsyncd (default delay)", (d) => lsyncd(d), 60_000, false],
    ["lsyncd (delay = 0)", (d) => lsyncd(d, 0), 30_000, true],
  ];
  for (const [label, make, drainTimeoutMs, withNew] of variants) {
    const dir = await freshDir(ctx.workDir, `latency-${label.replace(/[^a-z0-9]+/g, "-").replace(/-$/, "")}`);
    const r = make(dir);
    try {
      runs.push(await measure(label, r.src, r.replica, r.start, durationMs, drainTimeoutMs, withNew ? newRuns : undefined));
    } catch (e) {
      runs.push({ label, writes: 0, rate: 0, notSeen: 0, seenWhileWriting: 0, drainMs: NaN, error: (e as Error).message });
      progress(`latency/${label}: FAILED: ${(e as Error).message}`);
    }
    await removeDir(dir);
  }

  const row = (r: LatencyRun) => [r.label, String(r.writes), r.rate ? `${r.rate.toFixed(0)}/s` : "n/a", fmtMs(r.stats?.p50), fmtMs(r.stats?.p90), fmtMs(r.stats?.p99), fmtMs(r.stats?.max), fmtMs(r.stats?.mean), String(r.notSeen), r.writes ? `${((r.seenWhileWriting / r.writes) * 100).toFixed(1)}%` : "n/a", fmtMs(r.drainMs)];
  res.tables.push({
    title: "Per-write latency, write on the source → bytes visible in the replica",
    headers: ["replicator", "writes", "achieved rate", "p50", "p90", "p99", "max", "mean", "never seen", "shown while writing", "drain after last write"],
    rows: runs.map(row),
  });
  res.tables.push({
    title: `New files (${NEW_FILE_BYTES} B each, created, written and closed) at ${RATE}/s: create on the source → whole file in the replica`,
    headers: ["replicator", "files", "achieved rate", "p50", "p90", "p99", "max", "mean", "never seen", "shown while writing", "drain after last file"],
    rows: newRuns.map(row),
  });
  const [u, ld, l0] = runs;
  for (const [name, pick] of [["p50", (p?: Percentiles) => p?.p50], ["p99", (p?: Percentiles) => p?.p99], ["max", (p?: Percentiles) => p?.max]] as const) {
    res.summary.push({ metric: `latency ${name} (lsyncd default delay)`, understudy: fmtMs(pick(u?.stats)), lsyncd: fmtMs(pick(ld?.stats)), vsLsyncd: ratio(pick(u?.stats), pick(ld?.stats)) });
    res.summary.push({ metric: `latency ${name} (lsyncd delay = 0)`, understudy: fmtMs(pick(u?.stats)), lsyncd: fmtMs(pick(l0?.stats)), vsLsyncd: ratio(pick(u?.stats), pick(l0?.stats)) });
  }
  const us = u?.stats;
  res.goals.push({
    text: `appends: latency p50 < ${GOAL_P50_MS} ms and p99 ≤ ${GOAL_P99_MS} ms at ${RATE} writes/s`,
    met: us ? us.p50 < GOAL_P50_MS && us.p99 <= GOAL_P99_MS : undefined,
    measured: us ? `p50 ${fmtMs(us.p50)}, p99 ${fmtMs(us.p99)}` : "n/a",
  });
  const nu = newRuns.find((r) => r.label === "understudy")?.stats;
  const nl = newRuns.find((r) => r.label === "lsyncd (delay = 0)")?.stats;
  res.summary.push({ metric: "new files: latency p50 (lsyncd delay = 0)", understudy: fmtMs(nu?.p50), lsyncd: fmtMs(nl?.p50), vsLsyncd: ratio(nu?.p50, nl?.p50) });
  res.summary.push({ metric: "new files: latency p99 (lsyncd delay = 0)", understudy: fmtMs(nu?.p99), lsyncd: fmtMs(nl?.p99), vsLsyncd: ratio(nu?.p99, nl?.p99) });
  res.goals.push({ text: `new files at ${RATE}/s: latency p50 ≤ ${GOAL_NEW_P50_MS} ms`, met: nu ? nu.p50 <= GOAL_NEW_P50_MS : undefined, measured: nu ? `p50 ${fmtMs(nu.p50)}` : "n/a" });
  res.goals.push({
    text: `new files at ${RATE}/s: latency p99 ≤ ${GOAL_NEW_P99_VS_LSYNCD}× lsyncd's (delay = 0)`,
    met: nu && nl ? nu.p99 <= GOAL_NEW_P99_VS_LSYNCD * nl.p99 : undefined,
    measured: nu && nl ? `p99 ${fmtMs(nu.p99)} vs ${fmtMs(nl.p99)} (${ratio(nu.p99, nl.p99)})` : "n/a",
  });
  for (const r of newRuns) if (r.error) res.notes.push(`${r.label}, new files: ${r.error}`);
  for (const r of runs) {
    if (r.error) res.notes.push(`${r.label}: ${r.error}`);
    const shown = r.writes ? r.seenWhileWriting / r.writes : 1;
    if (r.stats && shown < 0.5) res.notes.push(`${r.label}: only ${(shown * 100).toFixed(1)}% of the writes showed on the replica while the writer was running; all of them had appeared ${fmtMs(r.drainMs)} after it stopped. Its latencies are dominated by that wait.`);
  }
  res.notes.push(
    "Workload: one synchronous 64-byte pwrite per write, paced by the elapsed time (bursts of 1–2 writes per 1 ms timer tick); 3 of 4 writes to a file append a record, every 4th overwrites the file's header record in place.",
    "A write counts as replicated when its record shows in the replica's file (for a header overwrite: when the replica's header shows that seq or a newer one). The observer runs in a worker thread of the benchmark process, reacts to inotify events on the replica directory (polls every 20 ms as a safety net) and uses the same monotonic clock as the writer.",
    `New files: after the appends (same replicator, still running), one synchronous open(O_EXCL)/write/close of ${NEW_FILE_BYTES} B per file in one directory, paced like the appends; a file counts when the replica has all of it (the observer reacts to inotify events on the replica directory and lists it every 100 ms as a safety net). lsyncd with its default delay is not run for new files (its latency is the delay).`,
    "understudy: default set options (64 KiB blocks, zstd fast), insecure loopback gRPC. lsyncd: `sync { default.rsync, source, target }` (+ `delay = 0` in the second run), i.e. one rsync process per batch of events; its default delay for default.rsync is 15 s.",
  );
  return res;
}
