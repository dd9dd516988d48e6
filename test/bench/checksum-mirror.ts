// Benchmark 6: checksum mirror of a large file of which 1 % of the 64 KiB
// blocks differ on the target. The pair replicates the file first (through
// the byte-counting proxy); then, with the target agent stopped, blocks of
// the replica are overwritten in place (size and mtime kept, so only content
// differs), the target is started again and `understudy mirror --mode
// checksum` is timed and its bytes on the wire counted. Baseline: rsync's
// delta transfer onto an identically corrupted copy.
import { copyFile, mkdir, open, stat, utimes } from "node:fs/promises";
import path from "node:path";
import type { MirrorProgress, StatusResponse } from "../../agent/wire.ts";
import { CLI } from "../e2e/harness.ts";
import { BenchPair, sourcePhases } from "./agents.ts";
import { CountingProxy, type WireBytes } from "./proxy.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { quiet } from "./proxy.ts";
import { parseRsyncStats, GiB, KiB, MiB, fileSize, fmtMs, fmtSize, freshDir, mustRun, nowMs, pollUntil, progress, randomBytes, ratio, removeDir, runCmd, seededRandom, sha256File, sleep, writeRandomFile, type BenchContext } from "./util.ts";

const BLOCK = 64 * KiB;
const CHANGED_FRACTION = 0.01;
const GOAL_FACTOR = 1.05;


/** `understudy status --json` of an (insecure) agent. */
export async function cliStatus(address: string): Promise<StatusResponse> {
  return JSON.parse((await mustRun(process.execPath, [CLI, "status", "--agent", address, "--json"])).stdout) as StatusResponse;
}

/** `count` distinct block indices out of `blocks`, deterministic. */
function pickBlocks(blocks: number, count: number, seed: number): number[] {
  const r = seededRandom(seed);
  const chosen = new Set<number>();
  while (chosen.size < count) chosen.add(Math.floor(r() * blocks));
  return [...chosen].sort((a, b) => a - b);
}

/** Overwrite the given 64 KiB blocks of `file` with `data` (one block each), keeping its size and times. */
async function corrupt(file: string, blocks: number[], data: Buffer[]): Promise<void> {
  const st = await stat(file);
  const fh = await open(file, "r+");
  try {
    for (const [i, b] of blocks.entries()) await fh.write(data[i]!, 0, BLOCK, b * BLOCK);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await utimes(file, st.atime, st.mtime);
}

interface MirrorRun {
  wire: WireBytes;
  /** wall time of `understudy mirror --mode checksum` (CLI start to exit) */
  ms: number;
  /** the source's own account of the mirror (finishedAt - startedAt) */
  agentMs?: number;
  /** CPU seconds the source and the target agent used during the mirror */
  cpu?: { source: number; target: number };
  progress?: MirrorProgress;
  equal: boolean;
}

interface RsyncRun {
  sent: number;
  received: number;
  literal?: number;
  matched?: number;
  ms: number;
  cpuS?: number;
}

async function measureUnderstudy(dir: string, size: number, blocks: number[], data: Buffer[], rsyncCopy: string, notes: string[]): Promise<MirrorRun> {
  let proxy: CountingProxy | undefined;
  const pair = await BenchPair.create({ dir, setOptions: { compression: "none" }, sendTo: async (targetPort) => (proxy = await CountingProxy.start(targetPort)).address });
  const file = path.join(pair.src, "big.bin");
  const replica = path.join(pair.image, "big.bin");
  try {
    if (!proxy) throw new Error("no proxy");
    const wire: CountingProxy = proxy;
    progress(`checksum-mirror: writing a ${fmtSize(size)} file and replicating it`);
    await writeRandomFile(file, size);
    const t0 = nowMs();
    await pair.start();
    await pollUntil("initial replication of the big file", async () => (await fileSize(replica)) === size && (await pair.caughtUp()), 600_000, 100).catch(async (e) => {
      throw new Error(`${(e as Error).message}; source status: ${await pair.describe()}`);
    });
    const srcHash = await sha256File(file);
    if ((await sha256File(replica)) !== srcHash) throw new Error("after the initial replication the replica differs from the source");
    progress(`checksum-mirror: replicated in ${fmtMs(nowMs() - t0)}; stopping the target and corrupting ${blocks.length} blocks of its copy`);

    await pair.target.stop();
    await corrupt(replica, blocks, data);
    await mkdir(path.dirname(rsyncCopy), { recursive: true });
    await copyFile(replica, rsyncCopy);
    const corruptHash = await sha256File(replica);
    if (corruptHash === srcHash) throw new Error("corrupting the replica did not change it");
    await pair.target.start();
    await pair.waitCaughtUp("the source to reconnect to the restarted target", 120_000, { giveUpAfterRetries: 20 });
    await quiet(wire, 1000, 60_000);
    if ((await sha256File(replica)) !== corruptHash) notes.push("The replica changed after the target restarted and before the mirror was started (something repaired it on its own); the mirror's numbers below are then not about the corruption.");

    const before = wire.snapshot();
    progress("checksum-mirror: understudy mirror --mode checksum");
    const cpu0 = await Promise.all([pair.source.cpuSeconds(), pair.target.cpuSeconds()]);
    const r = await runCmd(process.execPath, [CLI, "mirror", "--agent", pair.source.address, "--set", "data", "--mode", "checksum"]);
    const ms = r.ms;
    const cpu1 = await Promise.all([pair.source.cpuSeconds(), pair.target.cpuSeconds()]);
    const used = (i: number) => (cpu0[i] && cpu1[i] ? cpu1[i].user + cpu1[i].system - cpu0[i].user - cpu0[i].system : undefined);
    if (r.code !== 0) throw new Error(`understudy mirror exited with ${r.code}: ${(r.stderr.trim() || r.stdout.trim()).slice(0, 2000)}; source status: ${await pair.describe()}`);
    const atExit = wire.snapshot();
    await quiet(wire, 1000, 60_000);
    const after = wire.snapshot();
    if (after.up + after.down > atExit.up + atExit.down) notes.push(`After \`understudy mirror\` exited, ${after.up + after.down - atExit.up - atExit.down} more bytes crossed the wire before it went quiet for 1 s (counted).`);
    const st = await cliStatus(pair.source.address);
    const m = st.sets.find((s) => s.name === "data")?.targets[0]?.mirror;
    const equal = (await sha256File(replica)) === srcHash;
    for (const line of await sourcePhases(pair.source)) notes.push(`understudy source log: ${line}.`);
    const run: MirrorRun = { wire: { up: after.up - before.up, down: after.down - before.down }, ms, agentMs: m && m.finishedAt > 0 ? (m.finishedAt - m.startedAt) * 1000 : undefined, progress: m, equal, cpu: used(0) !== undefined && used(1) !== undefined ? { source: used(0)!, target: used(1)! } : undefined };
    progress(`checksum-mirror: understudy ${run.wire.up + run.wire.down} bytes in ${fmtMs(ms)} (agent: ${fmtMs(run.agentMs)}); replica ${equal ? "equals" : "DIFFERS FROM"} the source`);
    return run;
  } finally {
    await pair.stop();
    await proxy?.close();
  }
}

async function measureRsync(file: string, copy: string): Promise<RsyncRun> {
  progress("checksum-mirror: rsync --inplace --no-whole-file --ignore-times onto the corrupted copy");
  const r = await mustRun("rsync", ["--inplace", "--no-whole-file", "--ignore-times", "--stats", file, copy]);
  const st = parseRsyncStats(r.stdout);
  if ((await sha256File(copy)) !== (await sha256File(file))) throw new Error("rsync's copy differs from the source");
  progress(`checksum-mirror: rsync ${st.sent + st.received} bytes in ${fmtMs(r.ms)}`);
  return { sent: st.sent, received: st.received, literal: st.literal, matched: st.matched, ms: r.ms, cpuS: r.cpuS };
}

export async function benchChecksumMirror(ctx: BenchContext): Promise<BenchResult> {
  const size = ctx.quick ? 128 * MiB : GiB;
  const nBlocks = size / BLOCK;
  const nChanged = Math.round(nBlocks * CHANGED_FRACTION);
  const changed = nChanged * BLOCK;
  const res = emptyResult("6", `Checksum mirror of a ${fmtSize(size)} file with 1 % of its blocks changed`, `${fmtSize(size)} file; ${nChanged} of its ${nBlocks} 64 KiB blocks (${fmtSize(changed)}) overwritten on the target`);
  const dir = await freshDir(ctx.workDir, "checksum-mirror");
  const blocks = pickBlocks(nBlocks, nChanged, 6);
  const data = blocks.map(() => randomBytes(BLOCK));
  const rsyncCopy = path.join(dir, "rsync-dst", "big.bin");
  const errors: string[] = [];
  let us: MirrorRun | undefined;
  let rs: RsyncRun | undefined;
  try {
    us = await measureUnderstudy(dir, size, blocks, data, rsyncCopy, res.notes).catch((e: Error) => {
      errors.push(`understudy: ${e.message}`);
      progress(`checksum-mirror: understudy FAILED: ${e.message}`);
      return undefined;
    });
    if (await fileSize(rsyncCopy)) rs = await measureRsync(path.join(BenchPair.srcOf(dir), "big.bin"), rsyncCopy);
  } catch (e) {
    errors.push((e as Error).message);
    progress(`checksum-mirror: FAILED: ${(e as Error).message}`);
  } finally {
    await sleep(100);
    await removeDir(dir);
  }
  if (us && !us.equal) errors.push("understudy: after the mirror the replica still differs from the source (sha256)");
  if (errors.length) res.error = errors.join("\n");

  const uBytes = us ? us.wire.up + us.wire.down : undefined;
  const rBytes = rs ? rs.sent + rs.received : undefined;
  res.tables.push({
    title: `Repairing ${nChanged} changed 64 KiB blocks (${changed} B) in a ${fmtSize(size)} file`,
    headers: ["tool", "bytes source→target", "bytes target→source", "total bytes", "÷ changed bytes", "wall time", "result"],
    rows: [
      ["understudy mirror --mode checksum (TCP, via proxy)", us ? String(us.wire.up) : "n/a", us ? String(us.wire.down) : "n/a", uBytes === undefined ? "n/a" : String(uBytes), ratio(uBytes, changed), fmtMs(us?.ms), us ? (us.equal ? "sha256 equal" : "DIFFERS") : "FAILED"],
      ["rsync --inplace --no-whole-file --ignore-times (its --stats)", rs ? String(rs.sent) : "n/a", rs ? String(rs.received) : "n/a", rBytes === undefined ? "n/a" : String(rBytes), ratio(rBytes, changed), fmtMs(rs?.ms), rs ? "sha256 equal" : "n/a"],
    ],
  });
  const m = us?.progress;
  if (m) {
    res.tables.push({
      title: "understudy's own account of the mirror (`understudy status --json`, source's target entry)",
      headers: ["result", "mode", "files done", "bytesDone (compared)", "bytesTotal", "bytesSent", "bytesSent ÷ changed bytes", "duration (agent)"],
      rows: [[m.result || "?", m.mode, String(m.filesDone), String(m.bytesDone), String(m.bytesTotal), String(m.bytesSent), ratio(m.bytesSent, changed), fmtMs(us?.agentMs)]],
    });
  }
  res.summary.push({ metric: "checksum mirror: bytes on the wire", understudy: uBytes === undefined ? "n/a" : String(uBytes), rsync: rBytes === undefined ? "n/a" : String(rBytes), vsRsync: ratio(uBytes, rBytes) });
  res.summary.push({ metric: "checksum mirror: wall time", understudy: fmtMs(us?.ms), rsync: fmtMs(rs?.ms), vsRsync: ratio(us?.ms, rs?.ms) });
  res.goals.push({ text: `checksum mirror: wire bytes ≤ ${GOAL_FACTOR} × changed bytes`, met: uBytes === undefined || !us?.equal ? undefined : uBytes <= GOAL_FACTOR * changed, measured: uBytes === undefined ? "n/a" : `${uBytes} B = ${ratio(uBytes, changed)} of ${changed} B` });
  const f2 = (x?: number) => (x === undefined ? "n/a" : `${x.toFixed(2)} s`);
  const uCpu = us?.cpu ? us.cpu.source + us.cpu.target : undefined;
  res.tables.push({
    title: "CPU used during the repair (robust to a busy machine, unlike wall times)",
    headers: ["tool", "source side", "target side", "total"],
    rows: [
      ["understudy (source agent, target agent; the CLI not counted)", f2(us?.cpu?.source), f2(us?.cpu?.target), f2(uCpu)],
      ["rsync (sender + receiver processes)", "", "", f2(rs?.cpuS)],
    ],
  });
  const timeMet = us === undefined || rs === undefined || !us.equal ? undefined : us.ms <= rs.ms;
  res.goals.push({ text: "checksum mirror: wall time ≤ rsync's", met: timeMet, measured: us && rs ? `${fmtMs(us.ms)} vs ${fmtMs(rs.ms)} (${ratio(us.ms, rs.ms)}; agent's own account ${fmtMs(us.agentMs)})${timeMet === false ? `; bounded by: CLI start-up (Node) and its 100 ms status polling, and CPU: agents ${f2(uCpu)} (source ${f2(us.cpu?.source)}, target ${f2(us.cpu?.target)}: each hashes its whole copy, XXH3-128, side by side) vs rsync's ${f2(rs.cpuS)}` : ""}` : "n/a" });
  if (rs?.literal !== undefined) res.notes.push(`rsync's --stats: literal data ${rs.literal} B, matched data ${rs.matched ?? "?"} B.`);
  res.notes.push(
    `The changed blocks are ${nChanged} whole, 64 KiB-aligned blocks (1 % of ${nBlocks}) overwritten with random data in the target's replica while the target agent was stopped; the file's size and mtime were restored, so only content differs. rsync gets an identical copy of the corrupted replica.`,
    "understudy: `compression: none`, insecure loopback; bytes counted by a TCP proxy between the agents (gRPC/HTTP2 framing, acks and pings included), from just before `understudy mirror --agent <source> --set data --mode checksum` starts until the wire has been quiet for 1 s after it exits. Its wall time is the CLI's, from spawn to exit: Node start-up, and the CLI polls the source's status every 100 ms, so up to ~0.1 s of it is polling granularity; the agent's own duration is in the second table.",
    "rsync: `rsync --inplace --no-whole-file --ignore-times --stats <src file> <corrupted copy>`, a local transfer (sender and receiver over a pipe, no network, no fsync); its bytes are its --stats totals. Both read files that are in the page cache.",
  );
  return res;
}
