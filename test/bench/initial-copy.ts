// Benchmark 5: initial copy of many small files. The same pre-filled tree
// (1–64 KiB random files, 100 per directory) is copied by understudy (agents
// started on it; done when everything is acknowledged and the replica equals
// the source) and by a local `rsync -a src/ dst/` (and with --fsync). Then
// understudy copies it again with both agents pinned to one core (`taskset
// -c 0`), for how the per-file work scales with cores. If understudy cannot
// copy the full-size tree, the benchmark says why and also measures the small
// (BENCH_QUICK) tree, so there is still a comparison.
import { mkdir, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { BenchPair, sourcePhases } from "./agents.ts";
import { compareTrees, snapshotTree } from "../e2e/harness.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { KiB, fmtMB, fmtMs, freshDir, mustRun, nowMs, pollUntil, progress, randomBytes, ratio, removeDir, seededRandom, type BenchContext } from "./util.ts";

const PER_DIR = 100;
const FULL_COUNT = 20_000;
const QUICK_COUNT = 5_000;
/** A sender that failed this many times is not going to finish by waiting. */
const GIVE_UP_AFTER_RETRIES = 5;

/** Goal: the initial copy takes at most this many times local rsync's time. */
const GOAL_VS_RSYNC = 1.5;

interface CopyRun {
  count: number;
  bytes: number;
  understudyMs?: number;
  /** CPU seconds of the source and the target agent over the copy */
  understudyCpu?: { source: number; target: number };
  /** the same copy with both agents pinned to one core */
  oneCoreMs?: number;
  rsyncMs?: number;
  rsyncCpuS?: number;
  rsyncFsyncMs?: number;
  errors: string[];
  notes: string[];
}

/** Files of 1..64 KiB (uniform), random content; returns the total bytes. */
async function makeTree(root: string, count: number): Promise<number> {
  const r = seededRandom(20_000);
  const pool = randomBytes(16 * 1024 * KiB);
  let total = 0;
  for (let i = 0; i < count; i++) {
    const dir = path.join(root, `dir${String(Math.floor(i / PER_DIR)).padStart(4, "0")}`);
    if (i % PER_DIR === 0) await mkdir(dir, { recursive: true });
    const size = KiB + Math.floor(r() * 63 * KiB);
    const at = Math.floor(r() * (pool.length - size));
    const data = Buffer.from(pool.subarray(at, at + size));
    data.writeUInt32LE(i, 0); // every file distinct
    await writeFile(path.join(dir, `file${String(i).padStart(6, "0")}.dat`), data);
    total += size;
  }
  return total;
}

/**
 * Start the agents on the filled tree; done when everything is acknowledged
 * and the replica equals the source (if the comparison finds differences,
 * keep looking, and count until it matches).
 */
async function timeUnderstudy(pair: BenchPair, timeoutMs: number, notes: string[]): Promise<number> {
  const t0 = nowMs();
  await pair.start();
  await pair.waitCaughtUp("the initial copy to be acknowledged", timeoutMs, { giveUpAfterRetries: GIVE_UP_AFTER_RETRIES });
  let ms = nowMs() - t0;
  progress(`initial-copy: understudy acknowledged everything after ${fmtMs(ms)}; comparing trees`);
  let diffs = compareTrees(await snapshotTree(pair.src), await snapshotTree(pair.image));
  if (diffs.length > 0) {
    const first = diffs.length;
    await pollUntil("the replica to equal the source", async () => {
      const at = nowMs();
      diffs = compareTrees(await snapshotTree(pair.src), await snapshotTree(pair.image));
      if (diffs.length === 0) ms = at - t0;
      return diffs.length === 0;
    }, 60_000, 1000).catch(() => undefined);
    if (diffs.length > 0) throw new Error(`the replica still differed from the source 60 s after everything was acknowledged (${diffs.length} differences, e.g. ${diffs.slice(0, 3).join("; ")})`);
    notes.push(`When the source reported everything acknowledged the replica still differed (${first} differences); the time is until it matched.`);
  }
  return ms;
}

/** CPU seconds an agent used so far (0 when it is not running). */
async function cpuOf(a: BenchPair["source"]): Promise<number> {
  const c = await a.cpuSeconds();
  return c ? c.user + c.system : 0;
}

/** One tree of `count` files: understudy, then rsync and rsync --fsync on the same tree, then understudy on one core. */
async function runInitialCopy(ctx: BenchContext, count: number): Promise<CopyRun> {
  const run: CopyRun = { count, bytes: 0, errors: [], notes: [] };
  const dir = await freshDir(ctx.workDir, `initial-copy-${count}`);
  const timeout = count > QUICK_COUNT ? 300_000 : 120_000;
  try {
    const pair = await BenchPair.create({ dir });
    progress(`initial-copy: creating ${count} files`);
    run.bytes = await makeTree(pair.src, count);
    progress(`initial-copy: ${fmtMB(run.bytes)} in ${count} files; starting understudy`);
    try {
      run.understudyMs = await timeUnderstudy(pair, timeout, run.notes);
      run.understudyCpu = { source: await cpuOf(pair.source), target: await cpuOf(pair.target) };
    } catch (e) {
      run.errors.push(`understudy, ${count} files: ${(e as Error).message}`);
      progress(`initial-copy: understudy FAILED: ${(e as Error).message}`);
    } finally {
      await pair.stop();
      for (const line of await sourcePhases(pair.source)) run.notes.push(`${count} files, understudy source log: ${line}.`);
    }
    progress(`initial-copy: rsync -a src/ dst/ (${count} files)`);
    const rs = await mustRun("rsync", ["-a", pair.src + "/", path.join(dir, "rsync-dst") + "/"]);
    run.rsyncMs = rs.ms;
    run.rsyncCpuS = rs.cpuS;
    progress(`initial-copy: rsync ${fmtMs(run.rsyncMs)}; now with --fsync`);
    run.rsyncFsyncMs = (await mustRun("rsync", ["-a", "--fsync", pair.src + "/", path.join(dir, "rsync-fsync-dst") + "/"])).ms;
    progress(`initial-copy: rsync --fsync ${fmtMs(run.rsyncFsyncMs)}`);
    await rm(path.join(dir, "rsync-dst"), { recursive: true, force: true });
    await rm(path.join(dir, "rsync-fsync-dst"), { recursive: true, force: true });
    if (run.understudyMs !== undefined) {
      // The same copy again from scratch (new journal, empty target), both agents on one core.
      for (const d of ["dst", "state-src", "state-dst"]) await rm(path.join(dir, d), { recursive: true, force: true });
      const one = await BenchPair.create({ dir, cpus: "0" });
      progress(`initial-copy: understudy again with both agents pinned to one core (taskset -c 0)`);
      try {
        run.oneCoreMs = await timeUnderstudy(one, timeout * 2, run.notes);
      } catch (e) {
        run.errors.push(`understudy on one core, ${count} files: ${(e as Error).message}`);
      } finally {
        await one.stop();
      }
      progress(`initial-copy: one core ${fmtMs(run.oneCoreMs)} vs two ${fmtMs(run.understudyMs)}`);
    }
  } catch (e) {
    run.errors.push(`${count} files: ${(e as Error).message}`);
  } finally {
    await removeDir(dir);
  }
  return run;
}

export async function benchInitialCopy(ctx: BenchContext): Promise<BenchResult> {
  const count = ctx.quick ? QUICK_COUNT : FULL_COUNT;
  const res = emptyResult("5", `Initial copy of ${count.toLocaleString("en-US")} small files (1–64 KiB)`, `${count} files of 1–64 KiB in ${count / PER_DIR} directories`);
  const runs = [await runInitialCopy(ctx, count)];
  if (runs[0]!.understudyMs === undefined && count > QUICK_COUNT) {
    progress(`initial-copy: understudy could not copy ${count} files; measuring ${QUICK_COUNT} files as well`);
    res.sizes += `; understudy failed on that, so also ${QUICK_COUNT} files`;
    runs.push(await runInitialCopy(ctx, QUICK_COUNT));
  }

  const rate = (r: CopyRun, ms?: number) => (ms ? `${fmtMB(r.bytes / (ms / 1000))}/s, ${Math.round(r.count / (ms / 1000))} files/s` : "n/a");
  res.tables.push({
    headers: ["files", "tool", "time", "rate"],
    rows: runs.flatMap((r) => [
      [String(r.count), "understudy (agents started on the filled tree → everything acknowledged, replica verified)", r.understudyMs === undefined ? "FAILED" : fmtMs(r.understudyMs), rate(r, r.understudyMs)],
      [String(r.count), "rsync -a src/ dst/ (local)", fmtMs(r.rsyncMs), rate(r, r.rsyncMs)],
      [String(r.count), "for reference: rsync -a --fsync src/ dst/ (durable, like understudy's acknowledged data)", fmtMs(r.rsyncFsyncMs), rate(r, r.rsyncFsyncMs)],
      [String(r.count), "understudy, both agents pinned to one core (taskset -c 0)", r.oneCoreMs === undefined ? "n/a" : fmtMs(r.oneCoreMs), rate(r, r.oneCoreMs)],
    ]),
  });
  res.tables.push({
    title: "CPU used (robust to a busy machine, unlike wall times)",
    headers: ["files", "understudy source agent", "understudy target agent", "understudy total", "rsync -a (sender + receiver)", "÷ rsync"],
    rows: runs.map((r) => {
      const total = r.understudyCpu ? r.understudyCpu.source + r.understudyCpu.target : undefined;
      const f = (x?: number) => (x === undefined ? "n/a" : `${x.toFixed(2)} s`);
      return [String(r.count), f(r.understudyCpu?.source), f(r.understudyCpu?.target), f(total), f(r.rsyncCpuS), ratio(total, r.rsyncCpuS)];
    }),
  });
  for (const r of runs) {
    res.summary.push({ metric: `initial copy of ${r.count} files (${fmtMB(r.bytes, 0)})`, understudy: r.understudyMs === undefined ? "FAILED" : fmtMs(r.understudyMs), rsync: fmtMs(r.rsyncMs), vsRsync: ratio(r.understudyMs, r.rsyncMs) });
    res.summary.push({ metric: `initial copy of ${r.count} files vs rsync --fsync (durable)`, understudy: r.understudyMs === undefined ? "FAILED" : fmtMs(r.understudyMs), rsync: fmtMs(r.rsyncFsyncMs), vsRsync: ratio(r.understudyMs, r.rsyncFsyncMs) });
    if (r.oneCoreMs !== undefined && r.understudyMs !== undefined) res.summary.push({ metric: `initial copy of ${r.count} files: agents on 1 core ÷ on 2 cores`, understudy: `${fmtMs(r.oneCoreMs)} ÷ ${fmtMs(r.understudyMs)} = ${(r.oneCoreMs / r.understudyMs).toFixed(2)}` });
    res.notes.push(...r.notes);
  }
  const main = runs[runs.length - 1]!;
  const met = main.understudyMs === undefined || main.rsyncMs === undefined ? undefined : main.understudyMs <= GOAL_VS_RSYNC * main.rsyncMs;
  res.goals.push({
    text: `initial copy of ${main.count} files ≤ ${GOAL_VS_RSYNC} × local rsync's time`,
    met,
    measured: `${fmtMs(main.understudyMs)} vs ${fmtMs(main.rsyncMs)} (${ratio(main.understudyMs, main.rsyncMs)}; ${ratio(main.understudyMs, main.rsyncFsyncMs)} rsync --fsync's ${fmtMs(main.rsyncFsyncMs)})${met === false && main.understudyCpu ? `; bound by CPU: agents used ${(main.understudyCpu.source + main.understudyCpu.target).toFixed(1)} CPU-s (source ${main.understudyCpu.source.toFixed(1)}, target ${main.understudyCpu.target.toFixed(1)}) against rsync's ${main.rsyncCpuS?.toFixed(1) ?? "?"}` : ""}`,
  });
  const errors = runs.flatMap((r) => r.errors);
  if (errors.length) res.error = errors.join("\n");
  res.notes.push(
    "understudy's time runs from spawning both agents until the source reports everything acknowledged (the target fsyncs before it acknowledges); the tree comparison that follows (content, modes, owners, mtimes) is not timed. Default set options, insecure loopback.",
    "rsync runs locally (no network, no encryption; without --fsync nothing is made durable). Every tool reads a source tree that was just written and is in the page cache.",
  );
  return res;
}
