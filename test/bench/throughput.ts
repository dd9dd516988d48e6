// Benchmark 3: sustained throughput of one large sequential write, over
// loopback with mutual TLS. The clock starts before the first write on the
// source and stops when the replica has the whole file and the source has it
// acknowledged; the content is verified (sha256) afterwards. Baselines: a
// local `rsync -a --whole-file` of the same file (no network, no TLS, no
// fsync) and the same with --fsync (durable, like understudy's acknowledged
// data). Both agents' CPU time and garbage collection are measured over the
// run (from /proc and --trace-gc), per GiB replicated; then the run is
// repeated smaller with both agents pinned (taskset) to one core and to two
// cores, to show how it scales with cores (BENCH_NO_SCALING=1 skips those).
import { randomFillSync } from "node:crypto";
import { mkdir, open } from "node:fs/promises";
import path from "node:path";
import { BenchPair, gcDelta, type BenchAgent, type GcStats } from "./agents.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { GiB, MiB, fileSize, fmtMB, fmtMs, fmtSize, freshDir, mustRun, nowMs, pollUntil, progress, ratio, removeDir, sha256File, type BenchContext } from "./util.ts";

const WRITE_SIZE = MiB;
const GOAL_VS_RSYNC_FSYNC = 1.0;
const GOAL_VS_RSYNC = 0.4;
const GOAL_CPU_SOURCE = 4;
const GOAL_CPU_TARGET = 3;

/** Write `size` fresh random bytes sequentially in 1 MiB writes; returns how long the writer took. */
async function writeSequential(file: string, size: number): Promise<number> {
  const chunk = Buffer.allocUnsafe(WRITE_SIZE);
  const t0 = nowMs();
  const fh = await open(file, "w");
  try {
    for (let off = 0; off < size; off += WRITE_SIZE) {
      const n = Math.min(WRITE_SIZE, size - off);
      randomFillSync(chunk, 0, n); // ~5 GB/s: not what limits the writer
      await fh.write(chunk, 0, n, off);
    }
  } finally {
    await fh.close();
  }
  return nowMs() - t0;
}

const rate = (bytes: number, ms: number | undefined) => (ms ? bytes / 1e6 / (ms / 1000) : undefined);

/** What one agent used over a run. */
interface AgentUse {
  cpu: number;
  user: number;
  system: number;
  minorFaults: number;
  gc: GcStats;
}
type Usage = { user: number; system: number; minorFaults: number; gc: GcStats };

interface Run {
  ms: number;
  writerMs: number;
  size: number;
  source: AgentUse;
  target: AgentUse;
}

async function usage(a: BenchAgent): Promise<Usage> {
  const c = (await a.cpuSeconds()) ?? { user: NaN, system: NaN, minorFaults: NaN };
  return { ...c, gc: await a.gcStats() };
}

function used(a: Usage, b: Usage): AgentUse {
  const user = b.user - a.user;
  const system = b.system - a.system;
  return { cpu: user + system, user, system, minorFaults: b.minorFaults - a.minorFaults, gc: gcDelta(a.gc, b.gc) };
}

/** One replicated write of `size` bytes: agents started (pinned to `cpus` when given), file written, waited for until acknowledged and equal. */
async function replicate(dir: string, size: number, cpus: string | undefined, notes: string[]): Promise<Run> {
  const pair = await BenchPair.create({ dir, mtls: true });
  for (const a of [pair.source, pair.target]) {
    a.nodeArgs = ["--trace-gc"];
    a.cpus = cpus;
  }
  const file = path.join(pair.src, "stream.bin");
  try {
    await pair.start();
    await pair.waitConnected();
    const replica = path.join(pair.image, "stream.bin");
    const [s0, t0u] = [await usage(pair.source), await usage(pair.target)];
    const t0 = nowMs();
    const writerMs = await writeSequential(file, size);
    progress(`throughput${cpus ? ` (cpus ${cpus})` : ""}: writer done after ${fmtMs(writerMs)}; waiting for the replica`);
    await pollUntil("the replica to have the whole file", async () => (await fileSize(replica)) === size && (await pair.caughtUp()), 300_000, 20).catch(async (e) => {
      throw new Error(`${(e as Error).message}; source status: ${await pair.describe()}`);
    });
    let ms = nowMs() - t0;
    const [s1, t1u] = [await usage(pair.source), await usage(pair.target)];
    const sha = await sha256File(file);
    if ((await sha256File(replica)) !== sha) {
      // Full size and acknowledged but different: wait for the rest, and count that time too.
      await pollUntil("the replica's content to match", async () => (await pair.caughtUp()) && (await sha256File(replica)) === sha, 120_000, 200);
      ms = nowMs() - t0;
      notes.push("The replica had the full size and an acknowledgement before its content matched; the time includes waiting for the match.");
    }
    return { ms, writerMs, size, source: used(s0, s1), target: used(t0u, t1u) };
  } finally {
    await pair.stop();
    await removeDir(pair.src).catch(() => undefined);
    await removeDir(path.join(dir, "dst")).catch(() => undefined);
  }
}

export async function benchThroughput(ctx: BenchContext): Promise<BenchResult> {
  const size = ctx.quick ? 256 * MiB : GiB;
  const scaleSize = ctx.quick ? 128 * MiB : 512 * MiB;
  const res = emptyResult("3", "Sustained throughput of a large sequential write (loopback, mTLS)", `one ${fmtSize(size)} file written in ${fmtSize(WRITE_SIZE)} writes; scaling: ${fmtSize(scaleSize)} with the agents pinned to 1 and to 2 cores`);
  const dir = await freshDir(ctx.workDir, "throughput");
  let main: Run | undefined;
  const pinned: Record<string, Run | undefined> = {};
  let rsyncMs: number | undefined;
  let rsyncFsyncMs: number | undefined;
  const errors: string[] = [];
  const file = path.join(dir, "rsync-src", "stream.bin");
  try {
    progress(`throughput: writing ${fmtSize(size)} on the source (understudy, mTLS)`);
    main = await replicate(path.join(dir, "main"), size, undefined, res.notes);
    progress(`throughput: understudy ${fmtMB(size / (main.ms / 1000))}/s (${fmtMs(main.ms)}); CPU source ${main.source.cpu.toFixed(2)} s, target ${main.target.cpu.toFixed(2)} s`);
  } catch (e) {
    errors.push(`understudy: ${(e as Error).message}`);
    progress(`throughput: understudy FAILED: ${(e as Error).message}`);
  }
  for (const cpus of ["0", "0,1"]) {
    if (process.env.BENCH_NO_SCALING === "1") break;
    try {
      progress(`throughput: ${fmtSize(scaleSize)} with both agents pinned to cpus ${cpus}`);
      const r = await replicate(path.join(dir, `cpus-${cpus.replace(",", "-")}`), scaleSize, cpus, res.notes);
      pinned[cpus] = r;
      progress(`throughput (cpus ${cpus}): ${fmtMB(scaleSize / (r.ms / 1000))}/s`);
    } catch (e) {
      errors.push(`understudy pinned to cpus ${cpus}: ${(e as Error).message}`);
      progress(`throughput: pinned to cpus ${cpus} FAILED: ${(e as Error).message}`);
    }
  }
  try {
    await mkdir(path.dirname(file), { recursive: true });
    await writeSequential(file, size);
    const sha = await sha256File(file);
    progress("throughput: rsync -a --whole-file (and --fsync) of the same file to a local directory");
    for (const [sub, extra] of [["rsync-dst", []], ["rsync-fsync-dst", ["--fsync"]]] as const) {
      const dst = path.join(dir, sub);
      await mkdir(dst, { recursive: true });
      const ms = (await mustRun("rsync", ["-a", "--whole-file", ...extra, file, dst + "/"])).ms;
      if ((await sha256File(path.join(dst, "stream.bin"))) !== sha) throw new Error(`rsync's copy in ${sub} differs from the source`);
      if (extra.length) rsyncFsyncMs = ms;
      else rsyncMs = ms;
      progress(`throughput: ${["rsync", ...extra].join(" ")} ${fmtMB(size / (ms / 1000))}/s (${fmtMs(ms)})`);
      await removeDir(dst);
    }
  } catch (e) {
    errors.push(`rsync: ${(e as Error).message}`);
    progress(`throughput: rsync FAILED: ${(e as Error).message}`);
  } finally {
    await removeDir(dir);
  }
  if (errors.length) res.error = errors.join("\n");
  const u = rate(size, main?.ms);
  const r = rate(size, rsyncMs);
  const rf = rate(size, rsyncFsyncMs);
  const mbps = (x?: number) => (x === undefined ? "n/a" : `${x.toFixed(1)} MB/s`);
  const perGiB = (x: number | undefined, run: Run | undefined, digits = 2) => (x === undefined || !run ? "n/a" : (x / (run.size / GiB)).toFixed(digits));
  res.tables.push({
    headers: ["tool", "time", "throughput (10^6 B/s)"],
    rows: [
      ["understudy, mTLS over loopback (first write → replica complete and acknowledged)", fmtMs(main?.ms), mbps(u)],
      ["↳ of which: the writer on the source", fmtMs(main?.writerMs), mbps(rate(size, main?.writerMs))],
      ["rsync -a --whole-file, local copy (no network, no TLS, no fsync)", fmtMs(rsyncMs), mbps(r)],
      ["rsync -a --whole-file --fsync (durable like understudy's acknowledged data)", fmtMs(rsyncFsyncMs), mbps(rf)],
    ],
  });
  const agentRow = (who: string, a: AgentUse | undefined, run: Run | undefined) => [
    who,
    perGiB(a?.cpu, run),
    perGiB(a?.user, run),
    perGiB(a?.system, run),
    perGiB(a ? a.gc.ms / 1000 : undefined, run),
    perGiB(a?.gc.markCompacts, run, 0),
    perGiB(a?.gc.scavenges, run, 0),
    perGiB(a?.minorFaults, run, 0),
  ];
  res.tables.push({
    title: `CPU and garbage collection per GiB replicated (the ${fmtSize(size)} run, unpinned)`,
    headers: ["agent", "CPU-s / GiB", "user", "system", "GC pause s / GiB", "full GCs (mark-compact) / GiB", "scavenges / GiB", "page faults / GiB"],
    rows: [agentRow("source", main?.source, main), agentRow("target", main?.target, main)],
  });
  const one = pinned["0"];
  const two = pinned["0,1"];
  const r1 = rate(scaleSize, one?.ms);
  const r2 = rate(scaleSize, two?.ms);
  res.tables.push({
    title: `Scaling: ${fmtSize(scaleSize)} with both agents pinned (taskset) to the same CPUs`,
    headers: ["CPUs", "time", "throughput", "source CPU-s / GiB", "target CPU-s / GiB"],
    rows: [
      ["1 core (cpu 0)", fmtMs(one?.ms), mbps(r1), perGiB(one?.source.cpu, one), perGiB(one?.target.cpu, one)],
      ["2 cores (cpus 0,1)", fmtMs(two?.ms), mbps(r2), perGiB(two?.source.cpu, two), perGiB(two?.target.cpu, two)],
      ["ratio 2 cores ÷ 1 core", "", ratio(r2, r1), "", ""],
    ],
  });
  res.summary.push({ metric: "throughput, large sequential write", understudy: mbps(u), rsync: mbps(r), vsRsync: ratio(u, r) });
  res.summary.push({ metric: "throughput vs rsync --fsync", understudy: mbps(u), rsync: mbps(rf), vsRsync: ratio(u, rf) });
  res.summary.push({ metric: "CPU-s per GiB, source / target agent", understudy: `${perGiB(main?.source.cpu, main)} / ${perGiB(main?.target.cpu, main)}` });
  res.summary.push({ metric: "GC pause s per GiB, source / target agent", understudy: `${perGiB(main ? main.source.gc.ms / 1000 : undefined, main)} / ${perGiB(main ? main.target.gc.ms / 1000 : undefined, main)}` });
  res.summary.push({ metric: "throughput pinned to 2 cores ÷ 1 core", understudy: ratio(r2, r1) });
  const ge = (a: number | undefined, b: number | undefined, k: number) => (a === undefined || b === undefined ? undefined : a >= k * b);
  res.goals.push({ text: `throughput ≥ ${GOAL_VS_RSYNC_FSYNC.toFixed(1)}× rsync --fsync's`, met: ge(u, rf, GOAL_VS_RSYNC_FSYNC), measured: `${mbps(u)} vs ${mbps(rf)} (${ratio(u, rf)})` });
  res.goals.push({ text: `throughput ≥ ${GOAL_VS_RSYNC.toFixed(1)}× local rsync's (rsync -a --whole-file)`, met: ge(u, r, GOAL_VS_RSYNC), measured: `${mbps(u)} vs ${mbps(r)} (${ratio(u, r)})` });
  const cpuS = main ? main.source.cpu / (size / GiB) : undefined;
  const cpuT = main ? main.target.cpu / (size / GiB) : undefined;
  res.goals.push({ text: `CPU per GiB replicated ≤ ${GOAL_CPU_SOURCE} s on the source`, met: cpuS === undefined || Number.isNaN(cpuS) ? undefined : cpuS <= GOAL_CPU_SOURCE, measured: `${perGiB(main?.source.cpu, main)} CPU-s/GiB (GC ${perGiB(main ? main.source.gc.ms / 1000 : undefined, main)} s)` });
  res.goals.push({ text: `CPU per GiB replicated ≤ ${GOAL_CPU_TARGET} s on the target`, met: cpuT === undefined || Number.isNaN(cpuT) ? undefined : cpuT <= GOAL_CPU_TARGET, measured: `${perGiB(main?.target.cpu, main)} CPU-s/GiB (GC ${perGiB(main ? main.target.gc.ms / 1000 : undefined, main)} s)` });
  res.notes.push(
    "understudy: certificates from `understudy certs init/issue`, agents configured with `tls: {ca, cert, key}` (mutual TLS), default set options (64 KiB blocks, zstd fast; the data is random, so packets go uncompressed after a sample shows it does not compress). The target fsyncs what it applied before acknowledging (syncInterval 50 ms).",
    "rsync copies a file that was just written and is in the page cache, locally (no ssh, no daemon: neither is available here), with no network and no encryption; without --fsync it does not make the copy durable. It is the upper bound a local copy can reach, not a like-for-like network transfer.",
    "The understudy clock includes writing the file: replication runs while the file is being written (that is the point of continuous replication). The writer's own time is shown for reference.",
    "CPU-s are the agent processes' user + system time (all threads, from /proc/<pid>/stat) from just before the first write until the acknowledgement; GC pause is the main-thread time the agents' --trace-gc lines report (pauses plus incremental marking steps) over the same interval. Per GiB = divided by the data size in GiB.",
    "Scaling: both agents are started under `taskset -c 0` (one core shared by both) and then `taskset -c 0,1`; the benchmark process (the writer) is not pinned. On a shared 2-core machine the ratio is bounded by 2 and by what else runs.",
  );
  return res;
}
