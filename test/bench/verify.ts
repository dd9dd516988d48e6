// Benchmark 7: verify of an unchanged set. A tree of many files (random
// content, sizes spread so the total is exact, ~100 directories) is
// replicated; once the replica equals the source, `understudy verify --json`
// is timed and its bytes on the wire counted by the proxy between the
// agents. Baseline: `rsync -a --checksum --dry-run --stats`, rsync's way of
// comparing content.
import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import type { VerifyReport } from "../../agent/wire.ts";
import { CLI, compareTrees, snapshotTree } from "../e2e/harness.ts";
import { BenchPair, sourcePhases } from "./agents.ts";
import { quiet } from "./proxy.ts";
import { parseRsyncStats } from "./util.ts";
import { CountingProxy, type WireBytes } from "./proxy.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { GiB, MiB, fmtMB, fmtMs, fmtSize, freshDir, mustRun, nowMs, progress, randomBytes, ratio, removeDir, runCmd, seededRandom, sleep, type BenchContext } from "./util.ts";

const DIRS = 100;

/** `count` files in DIRS directories, random content; sizes random around the mean, summing to exactly `total`. */
async function makeTree(root: string, count: number, total: number): Promise<void> {
  const r = seededRandom(7_000);
  const weights = Array.from({ length: count }, () => 0.05 + r() * 1.95);
  const sum = weights.reduce((a, b) => a + b, 0);
  const sizes = weights.map((w) => Math.floor((total * w) / sum));
  sizes[count - 1]! += total - sizes.reduce((a, b) => a + b, 0);
  const perDir = Math.ceil(count / DIRS);
  for (let i = 0; i < count; i++) {
    const dir = path.join(root, `dir${String(Math.floor(i / perDir)).padStart(3, "0")}`);
    if (i % perDir === 0) await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, `file${String(i).padStart(6, "0")}.dat`), randomBytes(sizes[i]!));
  }
}

interface VerifyRun {
  report?: VerifyReport;
  exitCode: number | null;
  ms: number;
  wire: WireBytes;
  /** CPU seconds the source and the target agent used during the verify */
  cpu?: { source: number; target: number };
}

interface RsyncRun {
  sent: number;
  received: number;
  transferred?: number;
  ms: number;
  cpuS?: number;
}

const GOAL_TIME = 2;
const GOAL_BYTES = 0.05;

async function measureUnderstudy(dir: string, count: number, total: number, notes: string[]): Promise<VerifyRun> {
  let proxy: CountingProxy | undefined;
  const pair = await BenchPair.create({ dir, setOptions: { compression: "none" }, sendTo: async (targetPort) => (proxy = await CountingProxy.start(targetPort)).address });
  try {
    if (!proxy) throw new Error("no proxy");
    const wire: CountingProxy = proxy;
    progress(`verify: creating ${count} files, ${fmtSize(total)}`);
    await makeTree(pair.src, count, total);
    progress("verify: replicating them");
    const t0 = nowMs();
    await pair.start();
    await pair.waitCaughtUp("the initial copy to be acknowledged", 900_000, { giveUpAfterRetries: 5 });
    const diffs = compareTrees(await snapshotTree(pair.src), await snapshotTree(pair.image));
    if (diffs.length > 0) throw new Error(`after the initial copy the replica differs from the source (${diffs.length} differences, e.g. ${diffs.slice(0, 3).join("; ")})`);
    progress(`verify: replicated and equal after ${fmtMs(nowMs() - t0)}`);
    await quiet(wire, 1000, 60_000);

    const before = wire.snapshot();
    const cpu0 = await Promise.all([pair.source.cpuSeconds(), pair.target.cpuSeconds()]);
    progress("verify: understudy verify --json");
    const r = await runCmd(process.execPath, [CLI, "verify", "--agent", pair.source.address, "--set", "data", "--json"]);
    const cpu1 = await Promise.all([pair.source.cpuSeconds(), pair.target.cpuSeconds()]);
    const used = (i: number) => (cpu0[i] && cpu1[i] ? cpu1[i].user + cpu1[i].system - cpu0[i].user - cpu0[i].system : undefined);
    const cpu = (i: number) => (used(i) === undefined ? "n/a" : `${used(i)!.toFixed(2)} s`);
    progress(`verify: agent CPU during verify: source ${cpu(0)}, target ${cpu(1)}`);
    await quiet(wire, 1000, 60_000);
    const after = wire.snapshot();
    let report: VerifyReport | undefined;
    try {
      report = JSON.parse(r.stdout) as VerifyReport;
    } catch {
      throw new Error(`understudy verify exited with ${r.code} without a JSON report: ${(r.stderr.trim() || r.stdout.trim()).slice(0, 2000)}`);
    }
    for (const line of await sourcePhases(pair.source)) notes.push(`understudy source log: ${line}.`);
    const run: VerifyRun = { report, exitCode: r.code, ms: r.ms, wire: { up: after.up - before.up, down: after.down - before.down }, cpu: used(0) !== undefined && used(1) !== undefined ? { source: used(0)!, target: used(1)! } : undefined };
    progress(`verify: understudy exit ${r.code}, ${report.filesCompared} files, ${report.bytesCompared} bytes compared, ${report.differences.length} differences, ${run.wire.up + run.wire.down} bytes on the wire, ${fmtMs(r.ms)}`);
    return run;
  } finally {
    await pair.stop();
    await proxy?.close();
  }
}

async function measureRsync(src: string, image: string): Promise<RsyncRun> {
  progress("verify: rsync -a --checksum --dry-run --stats src/ image/");
  const r = await mustRun("rsync", ["-a", "--checksum", "--dry-run", "--stats", src + "/", image + "/"]);
  const st = parseRsyncStats(r.stdout);
  progress(`verify: rsync ${st.sent + st.received} bytes, ${st.transferred ?? "?"} files it would transfer, ${fmtMs(r.ms)}`);
  return { sent: st.sent, received: st.received, transferred: st.transferred, ms: r.ms, cpuS: r.cpuS };
}

export async function benchVerify(ctx: BenchContext): Promise<BenchResult> {
  const count = ctx.quick ? 5_000 : 20_000;
  const total = ctx.quick ? 128 * MiB : GiB;
  const res = emptyResult("7", `Verify of an unchanged set: ${fmtSize(total)} in ${count.toLocaleString("en-US")} files`, `${count} files, ${fmtSize(total)} in total (sizes ${fmtSize(Math.round((0.05 / 1) * (total / count)))}–${fmtSize(Math.round(1.95 * (total / count)))}), in ${DIRS} directories`);
  const dir = await freshDir(ctx.workDir, "verify");
  const errors: string[] = [];
  let us: VerifyRun | undefined;
  let rs: RsyncRun | undefined;
  try {
    us = await measureUnderstudy(dir, count, total, res.notes).catch((e: Error) => {
      errors.push(`understudy: ${e.message}`);
      progress(`verify: understudy FAILED: ${e.message}`);
      return undefined;
    });
    rs = await measureRsync(BenchPair.srcOf(dir), BenchPair.imageOf(dir));
  } catch (e) {
    errors.push((e as Error).message);
    progress(`verify: FAILED: ${(e as Error).message}`);
  } finally {
    await sleep(100);
    await removeDir(dir);
  }
  const rep = us?.report;
  if (us && us.exitCode !== 0) errors.push(`understudy verify exited with ${us.exitCode}${rep?.error ? `: ${rep.error}` : ""}${rep?.differences.length ? `; ${rep.differences.length} difference(s), e.g. ${rep.differences.slice(0, 3).map((d) => `${d.kind} ${d.path} ${d.detail}`).join("; ")}` : ""}`);
  if (rep && (rep.filesCompared !== count || rep.bytesCompared !== total)) res.notes.push(`understudy verify reported ${rep.filesCompared} files and ${rep.bytesCompared} bytes compared; the set has ${count} files and ${total} bytes.`);
  if (rs?.transferred) errors.push(`rsync --checksum --dry-run found ${rs.transferred} file(s) to transfer in a replica understudy had made`);
  if (errors.length) res.error = errors.join("\n");

  const uBytes = us ? us.wire.up + us.wire.down : undefined;
  const rBytes = rs ? rs.sent + rs.received : undefined;
  res.tables.push({
    headers: ["tool", "result", "files compared", "bytes compared", "bytes source→target", "bytes target→source", "total bytes on the wire", "wall time", "rate"],
    rows: [
      ["understudy verify --json (TCP, via proxy)", us ? (us.exitCode === 0 ? "identical (exit 0)" : `exit ${us.exitCode}, ${rep?.differences.length ?? "?"} differences`) : "FAILED", rep ? String(rep.filesCompared) : "n/a", rep ? String(rep.bytesCompared) : "n/a", us ? String(us.wire.up) : "n/a", us ? String(us.wire.down) : "n/a", uBytes === undefined ? "n/a" : String(uBytes), fmtMs(us?.ms), us ? `${fmtMB(total / (us.ms / 1000))}/s` : "n/a"],
      ["rsync -a --checksum --dry-run --stats (its --stats)", rs ? (rs.transferred === 0 ? "identical (0 files to transfer)" : `${rs.transferred ?? "?"} files to transfer`) : "n/a", String(count), String(total), rs ? String(rs.sent) : "n/a", rs ? String(rs.received) : "n/a", rBytes === undefined ? "n/a" : String(rBytes), fmtMs(rs?.ms), rs ? `${fmtMB(total / (rs.ms / 1000))}/s` : "n/a"],
    ],
  });
  res.summary.push({ metric: "verify of an unchanged set: wall time", understudy: fmtMs(us?.ms), rsync: fmtMs(rs?.ms), vsRsync: ratio(us?.ms, rs?.ms) });
  const f2 = (x?: number) => (x === undefined ? "n/a" : `${x.toFixed(2)} s`);
  const uCpu = us?.cpu ? us.cpu.source + us.cpu.target : undefined;
  res.tables.push({
    title: "CPU used during the comparison (robust to a busy machine, unlike wall times)",
    headers: ["tool", "source side", "target side", "total"],
    rows: [
      ["understudy (source agent, target agent; the CLI not counted)", f2(us?.cpu?.source), f2(us?.cpu?.target), f2(uCpu)],
      ["rsync --checksum (sender + receiver processes)", "", "", f2(rs?.cpuS)],
    ],
  });
  const timeMet = us === undefined || rs === undefined || us.exitCode !== 0 ? undefined : us.ms <= GOAL_TIME * rs.ms;
  res.goals.push({ text: `verify of an unchanged set ≤ ${GOAL_TIME} × rsync --checksum's time`, met: timeMet, measured: `${fmtMs(us?.ms)} vs ${fmtMs(rs?.ms)} (${ratio(us?.ms, rs?.ms)})${timeMet === false ? `; CPU: agents ${f2(uCpu)} (source ${f2(us?.cpu?.source)}, target ${f2(us?.cpu?.target)}: SHA-256 of every block on both sides, ~0.8 CPU-s per GiB each, kept because a verify is taken as proof) vs rsync's ${f2(rs?.cpuS)} (xxh128)` : ""}` });
  res.goals.push({ text: `verify of an unchanged set: bytes on the wire ≤ ${GOAL_BYTES} × rsync's`, met: uBytes === undefined || rBytes === undefined ? undefined : uBytes <= GOAL_BYTES * rBytes, measured: `${uBytes ?? "n/a"} B vs ${rBytes ?? "n/a"} B (${ratio(uBytes, rBytes)})` });
  res.summary.push({ metric: "verify of an unchanged set: bytes on the wire", understudy: uBytes === undefined ? "n/a" : String(uBytes), rsync: rBytes === undefined ? "n/a" : String(rBytes), vsRsync: ratio(uBytes, rBytes) });
  if (rep) res.notes.push(`understudy's report: filesCompared ${rep.filesCompared}, bytesCompared ${rep.bytesCompared}, ${rep.differences.length} differences, inFlight ${rep.inFlight}, agent-side duration ${fmtMs((rep.finishedAt - rep.startedAt) * 1000)}.`);
  res.notes.push(
    "understudy: `understudy verify --agent <source> --set data --json` against a replica it had just made and that compared equal (content, modes, mtimes); `compression: none`, insecure loopback. Wall time from spawning the CLI to its exit (includes Node start-up); bytes counted by a TCP proxy between the agents from just before the CLI starts until the wire has been quiet for 1 s after it exits (the CLI's own control connection to the source is not counted).",
    "rsync: `rsync -a --checksum --dry-run --stats src/ <replica>/`, a local run (sender and receiver over a pipe): with --checksum both sides read and hash every file; its bytes are its --stats totals. Every file is in the page cache for both tools.",
  );
  return res;
}
