// Benchmark 2: bytes on the wire for a 1 MiB change inside a large file.
// understudy is measured at the TCP level by a counting proxy between the
// agents; rsync by its own --stats, delta algorithm forced with
// --no-whole-file, into a copy of the file's previous version.
import { copyFile, mkdir, open } from "node:fs/promises";
import path from "node:path";
import { BenchPair, sourcePhases } from "./agents.ts";
import { CountingProxy, quiet, type WireBytes } from "./proxy.ts";
import { emptyResult, type BenchResult } from "./report.ts";
import { parseRsyncStats, GiB, MiB, fileSize, fmtMB, fmtMs, fmtSize, freshDir, mustRun, nowMs, pollUntil, progress, randomBytes, ratio, removeDir, seededRandom, sha256File, sleep, writeRandomFile, type BenchContext } from "./util.ts";

const CHANGE = MiB;
const GOAL_FACTOR = 1.1;

interface ToolBytes {
  up: number;
  down: number;
  ms: number;
}

/** A random offset that is not a multiple of 4 KiB (so no block size lines up with it). */
function unalignedOffset(size: number, seed: number): number {
  const r = seededRandom(seed);
  for (;;) {
    const off = 1 + Math.floor(r() * (size - CHANGE - 2));
    if (off % 4096 !== 0) return off;
  }
}

async function readRegion(file: string, offset: number, length: number): Promise<Buffer | undefined> {
  const fh = await open(file, "r").catch(() => undefined);
  if (!fh) return undefined;
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, offset);
    return bytesRead === length ? buf : undefined;
  } finally {
    await fh.close();
  }
}

async function overwrite(file: string, offset: number, data: Buffer): Promise<void> {
  const fh = await open(file, "r+");
  try {
    await fh.write(data, 0, data.length, offset);
  } finally {
    await fh.close();
  }
}

interface UnderstudyWire {
  initial?: { bytes: WireBytes; ms: number };
  change?: ToolBytes & { visibleMs: number };
}

/**
 * Replicate `file` (already written) through a counting proxy, then make the
 * change and count what crossed the wire for it. Always leaves the change
 * made on the source, even when replication fails, so rsync can still run.
 */
async function measureUnderstudy(dir: string, size: number, offset: number, change: Buffer, out: UnderstudyWire, notes: string[]): Promise<void> {
  let proxy: CountingProxy | undefined;
  const pair = await BenchPair.create({ dir, setOptions: { compression: "none" }, sendTo: async (targetPort) => (proxy = await CountingProxy.start(targetPort)).address });
  const file = path.join(pair.src, "big.bin");
  const replica = path.join(pair.image, "big.bin");
  let changed = false;
  try {
    if (!proxy) throw new Error("no proxy");
    const wire: CountingProxy = proxy;
    progress("wire-bytes: understudy initial replication");
    const t0 = nowMs();
    await pair.start();
    await pollUntil("initial replication of the big file", async () => (await fileSize(replica)) === size && (await pair.caughtUp()), 300_000, 50).catch(async (e) => {
      throw new Error(`${(e as Error).message}; source status: ${await pair.describe()}`);
    });
    out.initial = { bytes: wire.snapshot(), ms: nowMs() - t0 };
    if ((await sha256File(replica)) !== (await sha256File(file))) throw new Error("after the initial replication the replica differs from the source");
    for (const line of await sourcePhases(pair.source)) notes.push(`Initial replication, understudy source log: ${line}.`);
    progress(`wire-bytes: initial copy ${fmtMs(out.initial.ms)}, ${fmtMB(out.initial.bytes.up + out.initial.bytes.down)} on the wire`);

    await quiet(wire, 1000, 30_000);
    const before = wire.snapshot();
    const seqBefore = (await pair.source.set()).lastSeq;
    progress(`wire-bytes: overwriting ${fmtSize(CHANGE)} at offset ${offset}`);
    const tChange = nowMs();
    await overwrite(file, offset, change);
    changed = true;
    await pollUntil("the change to show on the replica", async () => (await readRegion(replica, offset, CHANGE))?.equals(change) ?? false, 120_000, 10);
    const visibleMs = nowMs() - tChange;
    await pollUntil("the change to be acknowledged", async () => (await pair.source.set()).lastSeq > seqBefore && (await pair.caughtUp()), 120_000, 20);
    const ackedMs = nowMs() - tChange;
    await quiet(wire, 1000, 30_000);
    const after = wire.snapshot();
    out.change = { up: after.up - before.up, down: after.down - before.down, ms: ackedMs, visibleMs };
    if ((await sha256File(replica)) !== (await sha256File(file))) throw new Error("after the change the replica differs from the source");
    progress(`wire-bytes: understudy ${out.change.up + out.change.down} bytes, visible after ${fmtMs(visibleMs)}, acknowledged after ${fmtMs(ackedMs)}`);
  } finally {
    await pair.stop();
    await proxy?.close();
    if (!changed) await overwrite(file, offset, change);
  }
}

/** rsync's delta transfer of the changed file onto a copy of its previous version. */
async function measureRsync(file: string, oldCopy: string): Promise<ToolBytes & { literal?: number; matched?: number }> {
  progress("wire-bytes: rsync --inplace --no-whole-file against the old version");
  const r = await mustRun("rsync", ["--inplace", "--no-whole-file", "--ignore-times", "--stats", file, oldCopy]);
  const st = parseRsyncStats(r.stdout);
  if ((await sha256File(oldCopy)) !== (await sha256File(file))) throw new Error("rsync's copy differs from the source");
  progress(`wire-bytes: rsync ${st.sent + st.received} bytes in ${fmtMs(r.ms)}`);
  return { up: st.sent, down: st.received, ms: r.ms, literal: st.literal, matched: st.matched };
}

export async function benchWireBytes(ctx: BenchContext): Promise<BenchResult> {
  const size = ctx.quick ? 128 * MiB : GiB;
  const res = emptyResult("2", `Bytes on the wire for a ${fmtSize(CHANGE)} change inside a ${fmtSize(size)} file`, `${fmtSize(size)} file, ${fmtSize(CHANGE)} overwritten at a random unaligned offset`);
  const dir = await freshDir(ctx.workDir, "wire-bytes");
  const file = path.join(dir, "src", "big.bin");
  const oldCopy = path.join(dir, "rsync-dst", "big.bin");
  const offset = unalignedOffset(size, 7);
  const change = randomBytes(CHANGE);
  const us: UnderstudyWire = {};
  let rsync: (ToolBytes & { literal?: number; matched?: number }) | undefined;
  const errors: string[] = [];
  try {
    progress(`wire-bytes: writing a ${fmtSize(size)} file and a copy of it for rsync`);
    await writeRandomFile(file, size);
    await mkdir(path.dirname(oldCopy), { recursive: true });
    await copyFile(file, oldCopy);
    await measureUnderstudy(dir, size, offset, change, us, res.notes).catch((e) => {
      errors.push(`understudy: ${(e as Error).message}`);
      progress(`wire-bytes: understudy FAILED: ${(e as Error).message}`);
    });
    rsync = await measureRsync(file, oldCopy);
  } catch (e) {
    errors.push((e as Error).message);
    progress(`wire-bytes: FAILED: ${(e as Error).message}`);
  } finally {
    await sleep(100);
    await removeDir(dir);
  }
  if (errors.length) res.error = errors.join("\n");
  const understudy = us.change;
  const visibleMs = understudy?.visibleMs;
  const initial = us.initial;

  const total = (t?: ToolBytes) => (t ? t.up + t.down : undefined);
  const row = (name: string, t?: ToolBytes, time?: string) => [name, t ? String(t.up) : "n/a", t ? String(t.down) : "n/a", t ? String(t.up + t.down) : "n/a", ratio(total(t), CHANGE), time ?? fmtMs(t?.ms)];
  res.tables.push({
    title: `Bytes for the ${fmtSize(CHANGE)} (${CHANGE} B) change`,
    headers: ["tool", "bytes source→target", "bytes target→source", "total bytes", "÷ changed bytes", "time"],
    rows: [
      row("understudy (TCP, via proxy)", understudy, understudy ? `${fmtMs(visibleMs)} to visible, ${fmtMs(understudy.ms)} to acknowledged` : undefined),
      row("rsync --inplace --no-whole-file (its --stats)", rsync),
    ],
  });
  if (initial) {
    res.tables.push({
      title: `For reference: understudy's initial replication of the ${fmtSize(size)} file (insecure loopback, compression none)`,
      headers: ["bytes on the wire", "÷ file size", "time", "rate"],
      rows: [[String(initial.bytes.up + initial.bytes.down), ratio(initial.bytes.up + initial.bytes.down, size), fmtMs(initial.ms), `${fmtMB(size / (initial.ms / 1000))}/s`]],
    });
  }
  res.summary.push({ metric: "bytes on the wire for the change", understudy: understudy ? String(total(understudy)) : "n/a", rsync: rsync ? String(total(rsync)) : "n/a", vsRsync: ratio(total(understudy), total(rsync)) });
  res.summary.push({ metric: "time for the change (understudy: until acknowledged)", understudy: fmtMs(understudy?.ms), rsync: fmtMs(rsync?.ms), vsRsync: ratio(understudy?.ms, rsync?.ms) });
  const u = total(understudy);
  res.goals.push({ text: `wire bytes ≤ ${GOAL_FACTOR} × changed bytes`, met: u === undefined ? undefined : u <= GOAL_FACTOR * CHANGE, measured: u === undefined ? "n/a" : `${u} B = ${ratio(u, CHANGE)} of ${CHANGE} B` });
  if (rsync?.literal !== undefined) res.notes.push(`rsync's --stats: literal data ${rsync.literal} B, matched data ${rsync.matched ?? "?"} B; the rest of its bytes are block checksums (target→source) and protocol.`);
  res.notes.push(
    "understudy runs with `compression: none` here (the changed data is random, so zstd would not shrink it anyway); its bytes are counted by a TCP proxy between the agents and include gRPC/HTTP2 framing, the target's acks and any keepalive pings in the window. Counting starts after the initial copy has gone quiet and stops once the change is acknowledged and the wire has been quiet for 1 s.",
    "understudy diffs in fixed 64 KiB blocks: an unaligned 1 MiB change touches 17 blocks (1.0625 MiB), which it sends whole. To find them it re-reads and hashes the whole file on the source.",
    "rsync: `rsync --inplace --no-whole-file --ignore-times --stats <src file> <copy of the previous version>` (a local transfer, sender and receiver talking over a pipe; --ignore-times only guarantees the file is not skipped). Its time includes checksumming both copies; no network.",
  );
  return res;
}
