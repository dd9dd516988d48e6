// Benchmark 5: initial copy of many small files. The same pre-filled tree
// (1–64 KiB random files, 100 per directory) is copied by understudy (agents
// started on it; done when everything is acknowledged and the replica equals
// the source) and by a local `rsync -a src/ dst/`. If understudy cannot copy
// the full-size tree, the benchmark says why and also measures the small
// (BENCH_QUICK) tree, so there is still a comparison.
import { mkdir, writeFile } from "node:fs/promises";
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

interface CopyRun {
  count: number;
  bytes: number;
  understudyMs?: number;
  rsyncMs?: number;
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

/** One tree of `count` files: understudy, then rsync and rsync --fsync on the same tree. */
async function runInitialCopy(ctx: BenchContext, count: number): Promise<CopyRun> {
  const run: CopyRun = { count, bytes: 0, errors: [], notes: [] };
  const dir = await freshDir(ctx.workDir, `initial-copy-${count}`);
  try {
    const pair = await BenchPair.create({ dir });
    progress(`initial-copy: creating ${count} files`);
    run.bytes = await makeTree(pair.src, count);
    progress(`initial-copy: ${fmtMB(run.bytes)} in ${count} files; starting understudy`);
    try {
      run.understudyMs = await timeUnderstudy(pair, count > QUICK_COUNT ? 300_000 : 120_000, run.notes);
    } catch (e) {
      run.errors.push(`understudy, ${count} files: ${(e as Error).message}`);
      progress(`initial-copy: understudy FAILED: ${(e as Error).message}`);
    } finally {
      await pair.stop();
      for (const line of await sourcePhases(pair.source)) run.notes.push(`${count} files, understudy source log: ${line}.`);
    }
    progress(`initial-copy: rsync -a src/ dst/ (${count} files)`);
    run.rsyncMs = (await mustRun("rsync", ["-a", pair.src + "/", path.join(dir, "rsync-dst") + "/"])).ms;
    progress(`initial-copy: rsync ${fmtMs(run.rsyncMs)}; now with --fsync`);
    run.rsyncFsyncMs = (await mustRun("rsync", ["-a", "--fsync", pair.src + "/", path.join(dir, "rsync-fsync-dst") + "/"])).ms;
    progress(`initial-copy: rsync --fsync ${fmtMs(run.rsyncFsyncMs)}`);
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
    ]),
  });
  for (const r of runs) {
    res.summary.push({ metric: `initial copy of ${r.count} files (${fmtMB(r.bytes, 0)})`, understudy: r.understudyMs === undefined ? "FAILED" : fmtMs(r.understudyMs), rsync: fmtMs(r.rsyncMs), vsRsync: ratio(r.understudyMs, r.rsyncMs) });
    res.notes.push(...r.notes);
  }
  const errors = runs.flatMap((r) => r.errors);
  if (errors.length) res.error = errors.join("\n");
  res.notes.push(
    "understudy's time runs from spawning both agents until the source reports everything acknowledged (the target fsyncs before it acknowledges); the tree comparison that follows (content, modes, owners, mtimes) is not timed. Default set options, insecure loopback.",
    "rsync runs locally (no network, no encryption; without --fsync nothing is made durable). Every tool reads a source tree that was just written and is in the page cache.",
  );
  return res;
}
