// Benchmark 10: hypervisor host. A raw VM disk image (created sparse, then
// filled with random data) is replicated; then 1 % of its 64 KiB blocks, at
// random positions, are rewritten in place by a writer that keeps the image
// open (as qemu does), in a few bursts followed by a flush. Measured: bytes
// on the wire for the change (counting TCP proxy between the agents), time
// until the replica holds every rewritten block, and what finding them cost
// the source agent (CPU, bytes read). Baseline: rsync's delta transfer of the
// changed image onto a copy of its previous version.
import { copyFile, mkdir, open, type FileHandle } from "node:fs/promises";
import { randomFillSync } from "node:crypto";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { BenchPair, sourcePhases } from "./agents.ts";
import { CountingProxy, quiet, type WireBytes } from "./proxy.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { parseRsyncStats, GiB, KiB, MiB, fileSize, fmtMB, fmtMs, fmtSize, freshDir, mustRun, nowMs, pollUntil, progress, ratio, removeDir, seededRandom, sha256File, sleep, type BenchContext } from "./util.ts";

const BLOCK = 64 * KiB;
const CHANGED_FRACTION = 0.01;
/** The rewrite comes in this many bursts, BURST_GAP_MS apart, then an fdatasync (a guest's flush). */
const BURSTS = 10;
const BURST_GAP_MS = 50;
const GOAL_FACTOR = 1.1;

/** CPU seconds (user + system) and bytes read of a process, from /proc. `self` counts waited-for children (rsync). */
export interface ProcCost {
  cpuSec: number;
  /** bytes read through read(2)-like calls, page cache hits included (rchar) */
  rchar: number;
  /** bytes the process caused to be fetched from storage (read_bytes) */
  readBytes: number;
}

const TICKS = 100; // USER_HZ on Linux

export async function procCost(pid: number | "self", children = false): Promise<ProcCost> {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // fields after "(comm)": state is index 0, so utime (14) is 11, stime 12, cutime 13, cstime 14
  const ticks = children ? Number(f[13]) + Number(f[14]) : Number(f[11]) + Number(f[12]);
  const io = await readFile(`/proc/${pid}/io`, "utf8").catch(() => "");
  const num = (k: string) => Number(new RegExp(`^${k}: (\\d+)$`, "m").exec(io)?.[1] ?? NaN);
  return { cpuSec: ticks / TICKS, rchar: num("rchar"), readBytes: num("read_bytes") };
}

function costDelta(a: ProcCost, b: ProcCost): ProcCost {
  return { cpuSec: b.cpuSec - a.cpuSec, rchar: b.rchar - a.rchar, readBytes: b.readBytes - a.readBytes };
}

/** `count` distinct block indices out of `blocks`, deterministic, in random order (a guest's writes are not sorted). */
function pickBlocks(blocks: number, count: number, seed: number): number[] {
  const r = seededRandom(seed);
  const chosen = new Set<number>();
  while (chosen.size < count) chosen.add(Math.floor(r() * blocks));
  return [...chosen];
}

/** A raw image as a hypervisor makes one: created sparse at its full size, then written (here: filled with random data). */
export async function makeImage(file: string, size: number): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  const fh = await open(file, "w");
  try {
    await fh.truncate(size);
    const buf = Buffer.allocUnsafe(4 * MiB);
    for (let off = 0; off < size; off += buf.length) {
      const n = Math.min(buf.length, size - off);
      randomFillSync(buf, 0, n);
      await fh.write(buf, 0, n, off);
    }
  } finally {
    await fh.close();
  }
}

/** Rewrite `blocks` of an open image with `data` in BURSTS bursts, then fdatasync, as a guest would. */
export async function rewriteBlocks(fh: FileHandle, blocks: number[], data: Buffer[]): Promise<void> {
  const per = Math.ceil(blocks.length / BURSTS);
  for (let i = 0; i < blocks.length; i += per) {
    if (i > 0) await sleep(BURST_GAP_MS);
    for (let j = i; j < Math.min(blocks.length, i + per); j++) await fh.write(data[j]!, 0, BLOCK, blocks[j]! * BLOCK);
  }
  await fh.datasync();
}

/** Indices into `blocks` whose data the file at `file` does not hold (yet). */
async function missingBlocks(file: string, blocks: number[], data: Buffer[], among: Set<number>): Promise<Set<number>> {
  const fh = await open(file, "r");
  const buf = Buffer.allocUnsafe(BLOCK);
  const left = new Set<number>();
  try {
    for (const i of among) {
      const { bytesRead } = await fh.read(buf, 0, BLOCK, blocks[i]! * BLOCK);
      if (bytesRead !== BLOCK || !buf.equals(data[i]!)) left.add(i);
    }
  } finally {
    await fh.close();
  }
  return left;
}

interface UnderstudyRun {
  initial?: { bytes: WireBytes; ms: number };
  change?: {
    wire: WireBytes;
    /** first write → every rewritten block on the replica */
    visibleMs: number;
    /** first write → acknowledged (durable on the target) */
    ackedMs: number;
    /** the writer's own time (bursts + fdatasync) */
    writeMs: number;
    source: ProcCost;
    /** data bytes the source's capture journaled for the change (status capturedDataBytes) */
    captured: number;
    /** journal packets for the change */
    packets: number;
    equal: boolean;
  };
}

async function measureUnderstudy(dir: string, size: number, blocks: number[], data: Buffer[], oldCopy: string, out: UnderstudyRun, notes: string[]): Promise<void> {
  let proxy: CountingProxy | undefined;
  const pair = await BenchPair.create({ dir, setOptions: { compression: "none" }, sendTo: async (targetPort) => (proxy = await CountingProxy.start(targetPort)).address });
  const image = path.join(pair.src, "images", "vm1.raw");
  const replica = path.join(pair.image, "images", "vm1.raw");
  let fh: FileHandle | undefined;
  try {
    if (!proxy) throw new Error("no proxy");
    const wire: CountingProxy = proxy;
    progress(`disk-image: creating a ${fmtSize(size)} raw image (sparse, then filled) and a copy for rsync`);
    await makeImage(image, size);
    await mkdir(path.dirname(oldCopy), { recursive: true });
    await copyFile(image, oldCopy);
    progress("disk-image: understudy initial replication");
    const t0 = nowMs();
    await pair.start();
    await pollUntil("initial replication of the image", async () => (await fileSize(replica)) === size && (await pair.caughtUp()), 900_000, 100).catch(async (e) => {
      throw new Error(`${(e as Error).message}; source status: ${await pair.describe()}`);
    });
    out.initial = { bytes: wire.snapshot(), ms: nowMs() - t0 };
    if ((await sha256File(replica)) !== (await sha256File(image))) throw new Error("after the initial replication the replica differs from the source");
    progress(`disk-image: initial copy ${fmtMs(out.initial.ms)}, ${fmtMB(out.initial.bytes.up + out.initial.bytes.down)} on the wire`);

    // The "VM": opens its image and keeps it open.
    fh = await open(image, "r+");
    await quiet(wire, 1000, 60_000);
    const before = wire.snapshot();
    const set0 = await pair.source.set();
    const pid = pair.source.pid!;
    const cost0 = await procCost(pid);
    progress(`disk-image: rewriting ${blocks.length} blocks of 64 KiB in place (${BURSTS} bursts, then fdatasync), image held open`);
    const tChange = nowMs();
    await rewriteBlocks(fh, blocks, data);
    const writeMs = nowMs() - tChange;
    let left = new Set(blocks.keys());
    await pollUntil("every rewritten block to show on the replica", async () => (left = await missingBlocks(replica, blocks, data, left)).size === 0, 300_000, 100).catch(async (e) => {
      throw new Error(`${(e as Error).message} (${left.size} of ${blocks.length} blocks still missing); source status: ${await pair.describe()}`);
    });
    const visibleMs = nowMs() - tChange;
    await pollUntil("the change to be acknowledged", async () => (await pair.source.set()).lastSeq > set0.lastSeq && (await pair.caughtUp()), 300_000, 20);
    const ackedMs = nowMs() - tChange;
    // Let the source finish any look it is still taking (one more pass over the image may follow a change seen mid-read).
    await quiet(wire, 3000, 300_000);
    const after = wire.snapshot();
    const cost1 = await procCost(pid);
    const set1 = await pair.source.set();
    const equal = (await sha256File(replica)) === (await sha256File(image));
    out.change = { wire: { up: after.up - before.up, down: after.down - before.down }, visibleMs, ackedMs, writeMs, source: costDelta(cost0, cost1), captured: set1.capturedDataBytes - set0.capturedDataBytes, packets: set1.lastSeq - set0.lastSeq, equal };
    for (const line of await sourcePhases(pair.source)) notes.push(`understudy source log: ${line}.`);
    progress(`disk-image: understudy ${out.change.wire.up + out.change.wire.down} bytes, visible after ${fmtMs(visibleMs)}, acknowledged after ${fmtMs(ackedMs)}; source ${out.change.source.cpuSec.toFixed(2)} CPU s, read ${fmtMB(out.change.source.rchar)}; replica ${equal ? "equals" : "DIFFERS FROM"} the image`);
  } finally {
    await fh?.close();
    await pair.stop();
    await proxy?.close();
  }
}

interface RsyncRun {
  sent: number;
  received: number;
  literal?: number;
  matched?: number;
  ms: number;
  cpuSec: number;
}

async function measureRsync(image: string, oldCopy: string): Promise<RsyncRun> {
  progress("disk-image: rsync --inplace --no-whole-file onto the previous version");
  const c0 = await procCost("self", true);
  const r = await mustRun("rsync", ["--inplace", "--no-whole-file", "--ignore-times", "--stats", image, oldCopy]);
  const c1 = await procCost("self", true);
  const st = parseRsyncStats(r.stdout);
  if ((await sha256File(oldCopy)) !== (await sha256File(image))) throw new Error("rsync's copy differs from the source");
  progress(`disk-image: rsync ${st.sent + st.received} bytes in ${fmtMs(r.ms)}`);
  return { sent: st.sent, received: st.received, literal: st.literal, matched: st.matched, ms: r.ms, cpuSec: c1.cpuSec - c0.cpuSec };
}

export async function benchDiskImage(ctx: BenchContext): Promise<BenchResult> {
  const size = ctx.quick ? 256 * MiB : 4 * GiB;
  const nBlocks = size / BLOCK;
  const nChanged = Math.round(nBlocks * CHANGED_FRACTION);
  const changed = nChanged * BLOCK;
  const res = emptyResult("10", `Hypervisor host: ${fmtSize(size)} VM disk image, 1 % of its blocks rewritten in place`, `${fmtSize(size)} raw image; ${nChanged} of its ${nBlocks} 64 KiB blocks (${fmtSize(changed)}) rewritten at random positions while the image is open`);
  const dir = await freshDir(ctx.workDir, "disk-image");
  const blocks = pickBlocks(nBlocks, nChanged, 10);
  const data = blocks.map(() => randomFillSync(Buffer.allocUnsafe(BLOCK)));
  const oldCopy = path.join(dir, "rsync-dst", "vm1.raw");
  const us: UnderstudyRun = {};
  let rs: RsyncRun | undefined;
  const errors: string[] = [];
  try {
    await measureUnderstudy(dir, size, blocks, data, oldCopy, us, res.notes).catch((e: Error) => {
      errors.push(`understudy: ${e.message}`);
      progress(`disk-image: understudy FAILED: ${e.message}`);
    });
    // rsync needs the change made on the source and the old version beside it.
    if (us.change && (await fileSize(oldCopy)) === size) rs = await measureRsync(path.join(BenchPair.srcOf(dir), "images", "vm1.raw"), oldCopy);
  } catch (e) {
    errors.push((e as Error).message);
    progress(`disk-image: FAILED: ${(e as Error).message}`);
  } finally {
    await sleep(100);
    await removeDir(dir);
  }
  const c = us.change;
  if (c && !c.equal) errors.push("understudy: after the change the replica differs from the image (sha256)");
  if (errors.length) res.error = errors.join("\n");

  const uBytes = c ? c.wire.up + c.wire.down : undefined;
  const rBytes = rs ? rs.sent + rs.received : undefined;
  res.tables.push({
    title: `Rewriting ${nChanged} random 64 KiB blocks (${changed} B) of a ${fmtSize(size)} image`,
    headers: ["tool", "bytes source→target", "bytes target→source", "total bytes", "÷ changed bytes", "time", "CPU (source side)", "bytes read (source side)", "result"],
    rows: [
      ["understudy, live (TCP, via proxy)", c ? String(c.wire.up) : "n/a", c ? String(c.wire.down) : "n/a", uBytes === undefined ? "n/a" : String(uBytes), ratio(uBytes, changed), c ? `${fmtMs(c.visibleMs)} to visible, ${fmtMs(c.ackedMs)} to acknowledged` : "n/a", c ? `${c.source.cpuSec.toFixed(2)} s` : "n/a", c ? `${fmtMB(c.source.rchar)} (${ratio(c.source.rchar, size)} the image)` : "n/a", c ? (c.equal ? "sha256 equal" : "DIFFERS") : "FAILED"],
      ["rsync --inplace --no-whole-file (its --stats)", rs ? String(rs.sent) : "n/a", rs ? String(rs.received) : "n/a", rBytes === undefined ? "n/a" : String(rBytes), ratio(rBytes, changed), fmtMs(rs?.ms), rs ? `${rs.cpuSec.toFixed(2)} s (both ends)` : "n/a", rs ? `${fmtMB(2 * size)} (both copies, 2×)` : "n/a", rs ? "sha256 equal" : "n/a"],
    ],
  });
  if (c) {
    res.tables.push({
      title: "understudy: what the change cost",
      headers: ["writer: bursts + fdatasync", "journal packets", "data journaled", "÷ changed bytes", "source CPU", "source rchar", "source read_bytes (from storage)"],
      rows: [[fmtMs(c.writeMs), String(c.packets), String(c.captured), ratio(c.captured, changed), `${c.source.cpuSec.toFixed(2)} s`, String(c.source.rchar), String(c.source.readBytes)]],
    });
  }
  if (us.initial) {
    const b = us.initial.bytes.up + us.initial.bytes.down;
    res.tables.push({
      title: `For reference: understudy's initial replication of the ${fmtSize(size)} image (insecure loopback, compression none)`,
      headers: ["bytes on the wire", "÷ image size", "time", "rate"],
      rows: [[String(b), ratio(b, size), fmtMs(us.initial.ms), `${fmtMB(size / (us.initial.ms / 1000))}/s`]],
    });
  }
  res.summary.push({ metric: `disk image ${fmtSize(size)}, 1 % rewritten: bytes on the wire`, understudy: uBytes === undefined ? "n/a" : String(uBytes), rsync: rBytes === undefined ? "n/a" : String(rBytes), vsRsync: ratio(uBytes, rBytes) });
  res.summary.push({ metric: "disk image: time (understudy: to acknowledged)", understudy: fmtMs(c?.ackedMs), rsync: fmtMs(rs?.ms), vsRsync: ratio(c?.ackedMs, rs?.ms) });
  res.summary.push({ metric: "disk image: source-side CPU", understudy: c ? `${c.source.cpuSec.toFixed(2)} s` : "n/a", rsync: rs ? `${rs.cpuSec.toFixed(2)} s` : "n/a", vsRsync: ratio(c?.source.cpuSec, rs?.cpuSec) });
  res.goals.push({ text: `disk image: wire bytes ≤ ${GOAL_FACTOR} × rewritten bytes`, met: uBytes === undefined || !c?.equal ? undefined : uBytes <= GOAL_FACTOR * changed, measured: uBytes === undefined ? "n/a" : `${uBytes} B = ${ratio(uBytes, changed)} of ${changed} B` });
  if (rs?.literal !== undefined) res.notes.push(`rsync's --stats: literal data ${rs.literal} B, matched data ${rs.matched ?? "?"} B; the rest of its bytes are block checksums (target→source) and protocol.`);
  res.notes.push(
    `The image is created sparse (ftruncate to ${fmtSize(size)}) and then filled with random data in 4 MiB writes, so it has no holes and nothing compresses. The rewrite: ${nChanged} distinct 64 KiB-aligned blocks (1 % of ${nBlocks}) chosen at random, written in random order with pwrite through one file descriptor that stays open the whole time, in ${BURSTS} bursts ${BURST_GAP_MS} ms apart and then fdatasync — the write pattern of a guest, minus O_DIRECT.`,
    "understudy: `compression: none`, insecure loopback, default 64 KiB blocks. Bytes are counted by a TCP proxy between the agents (gRPC/HTTP2 framing, acks and keepalive pings included), from before the first write until the wire has been quiet for 3 s after the change was acknowledged (so a further look at the image, if any, is included). \"Visible\": every rewritten block reads back from the replica; \"acknowledged\": the target has fsynced it.",
    "understudy has no view of which blocks a guest wrote (no intercept driver): on each change it re-reads the image and compares 64 KiB block digests with the ones it recorded, so its read and CPU cost is per look at the whole image, not per changed byte. Source CPU and bytes read are the source agent's own (/proc/<pid>/stat and /proc/<pid>/io, rchar = bytes returned by read calls, page cache included; read_bytes = fetched from storage) over the same window.",
    "rsync: `rsync --inplace --no-whole-file --ignore-times --stats <image> <copy of the previous version>`, a local transfer (sender and receiver over a pipe, no network, no fsync); its bytes are its --stats totals and its CPU is that of both rsync processes (sender and receiver each read their whole copy). lsyncd is not run here: for a changed file it runs this same rsync (plus its batching delay, see benchmark 1).",
    "Bytes read ÷ image size is the number of looks the source took at the image for the change: a look that starts with the first burst notices the image changed while it read, and one more look follows after a pause of 4× the last look's duration.",
    "On a real hypervisor host the image is usually not in the source's page cache (qemu opens it with cache=none, i.e. O_DIRECT), so each look reads it from storage; here it is in the page cache, so the reads are the cheap case.",
    "Before/after numbers for the fingerprint cache and read-ahead in agent/source/blocks.ts, and what the numbers mean for a hypervisor host: docs/hypervisor.md.",
  );
  return res;
}
