// Benchmark 3: sustained throughput of one large sequential write, over
// loopback with mutual TLS. The clock starts before the first write on the
// source and stops when the replica has the whole file and the source has it
// acknowledged; the content is verified (sha256) afterwards. The baseline is
// a local `rsync -a --whole-file` of the same file, which has no network and
// no TLS at all.
import { randomFillSync } from "node:crypto";
import { mkdir, open } from "node:fs/promises";
import path from "node:path";
import { BenchPair } from "./agents.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { GiB, MiB, fileSize, fmtMB, fmtMs, fmtSize, freshDir, mustRun, nowMs, pollUntil, progress, ratio, removeDir, sha256File, type BenchContext } from "./util.ts";

const WRITE_SIZE = MiB;

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

export async function benchThroughput(ctx: BenchContext): Promise<BenchResult> {
  const size = ctx.quick ? 256 * MiB : GiB;
  const res = emptyResult("3", "Sustained throughput of a large sequential write (loopback, mTLS)", `one ${fmtSize(size)} file written in ${fmtSize(WRITE_SIZE)} writes`);
  const dir = await freshDir(ctx.workDir, "throughput");
  let understudyMs: number | undefined;
  let writerMs: number | undefined;
  let rsyncMs: number | undefined;
  let rsyncFsyncMs: number | undefined;
  const errors: string[] = [];
  const file = path.join(BenchPair.srcOf(dir), "stream.bin");
  const pair = await BenchPair.create({ dir, mtls: true });
  try {
    await pair.start();
    await pair.waitConnected();
    const replica = path.join(pair.image, "stream.bin");
    progress(`throughput: writing ${fmtSize(size)} on the source (understudy, mTLS)`);
    const t0 = nowMs();
    writerMs = await writeSequential(file, size);
    progress(`throughput: writer done after ${fmtMs(writerMs)}; waiting for the replica`);
    await pollUntil("the replica to have the whole file", async () => (await fileSize(replica)) === size && (await pair.caughtUp()), 300_000, 50).catch(async (e) => {
      throw new Error(`${(e as Error).message}; source status: ${await pair.describe()}`);
    });
    understudyMs = nowMs() - t0;
    const sha = await sha256File(file);
    if ((await sha256File(replica)) !== sha) {
      // Full size and acknowledged but different: wait for the rest, and count that time too.
      await pollUntil("the replica's content to match", async () => (await pair.caughtUp()) && (await sha256File(replica)) === sha, 120_000, 200);
      understudyMs = nowMs() - t0;
      res.notes.push("The replica had the full size and an acknowledgement before its content matched; the time includes waiting for the match.");
    }
    progress(`throughput: understudy ${fmtMB(size / (understudyMs / 1000))}/s (${fmtMs(understudyMs)})`);
  } catch (e) {
    errors.push(`understudy: ${(e as Error).message}`);
    progress(`throughput: understudy FAILED: ${(e as Error).message}`);
  } finally {
    await pair.stop();
  }
  try {
    if ((await fileSize(file)) !== size) writerMs = await writeSequential(file, size);
    const sha = await sha256File(file);
    progress("throughput: rsync -a --whole-file of the same file to a local directory");
    for (const [sub, extra] of [["rsync-dst", []], ["rsync-fsync-dst", ["--fsync"]]] as const) {
      const dst = path.join(dir, sub);
      await mkdir(dst, { recursive: true });
      const ms = (await mustRun("rsync", ["-a", "--whole-file", ...extra, file, dst + "/"])).ms;
      if ((await sha256File(path.join(dst, "stream.bin"))) !== sha) throw new Error(`rsync's copy in ${sub} differs from the source`);
      if (extra.length) rsyncFsyncMs = ms;
      else rsyncMs = ms;
      progress(`throughput: ${["rsync", ...extra].join(" ")} ${fmtMB(size / (ms / 1000))}/s (${fmtMs(ms)})`);
    }
  } catch (e) {
    errors.push(`rsync: ${(e as Error).message}`);
    progress(`throughput: rsync FAILED: ${(e as Error).message}`);
  } finally {
    await removeDir(dir);
  }
  if (errors.length) res.error = errors.join("\n");
  const u = rate(size, understudyMs);
  const r = rate(size, rsyncMs);
  const mbps = (x?: number) => (x === undefined ? "n/a" : `${x.toFixed(1)} MB/s`);
  res.tables.push({
    headers: ["tool", "time", "throughput (10^6 B/s)"],
    rows: [
      ["understudy, mTLS over loopback (first write → replica complete and acknowledged)", fmtMs(understudyMs), mbps(u)],
      ["↳ of which: the writer on the source", fmtMs(writerMs), mbps(rate(size, writerMs))],
      ["rsync -a --whole-file, local copy (no network, no TLS)", fmtMs(rsyncMs), mbps(r)],
      ["for reference: the same with --fsync (durable like understudy's acknowledged data)", fmtMs(rsyncFsyncMs), mbps(rate(size, rsyncFsyncMs))],
    ],
  });
  res.summary.push({ metric: "throughput, large sequential write", understudy: mbps(u), rsync: mbps(r), vsRsync: ratio(u, r) });
  res.goals.push({ text: "throughput ≥ rsync's (local rsync -a --whole-file)", met: u === undefined || r === undefined ? undefined : u >= r, measured: `${mbps(u)} vs ${mbps(r)}` });
  res.notes.push(
    "understudy: certificates from `understudy certs init/issue`, agents configured with `tls: {ca, cert, key}` (mutual TLS), default set options (64 KiB blocks, zstd fast; the data is random, so packets go uncompressed after the attempt). The target fsyncs what it applied before acknowledging (syncInterval 50 ms).",
    "rsync copies a file that was just written and is in the page cache, locally (no ssh, no daemon: neither is available here), with no network and no encryption, and does not fsync. It is the upper bound a local copy can reach, not a like-for-like network transfer.",
    "The understudy clock includes writing the file: replication runs while the file is being written (that is the point of continuous replication). The writer's own time is shown for reference.",
  );
  return res;
}
