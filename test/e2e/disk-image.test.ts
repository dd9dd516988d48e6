// Hypervisor-host mode: VM disk images are replicated live, and after the
// first copy only what a guest changes crosses the wire (counted by a TCP
// proxy between the agents).
// - raw: 1 % of the 64 KiB blocks are rewritten in place by a writer that
//   keeps the image open (as qemu does);
// - qcow2 (needs qemu-img/qemu-io, package qemu-utils): a guest-like burst
//   through qemu-io rewrites 1 % of the allocated clusters and allocates a few
//   new ones (the file grows; L2 tables and the refcount block change), and
//   the replica must stay a valid qcow2 image equal to the source.
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomFillSync } from "node:crypto";
import { mkdir, open, rm, stat, type FileHandle } from "node:fs/promises";
import path from "node:path";
import { BenchPair } from "../bench/agents.ts";
import { makeImage, rewriteBlocks } from "../bench/disk-image.ts";
import { CountingProxy, quiet } from "../bench/proxy.ts";
import { mustRun, runCmd, seededRandom, sha256File } from "../bench/util.ts";
import { tmpDir, waitFor } from "./harness.ts";

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
const SIZE = 256 * MiB;
/** gRPC/HTTP2 framing, packet headers, acks and keepalive pings for a few dozen packets. */
const OVERHEAD = 128 * 1024;

interface Rig {
  dir: string;
  pair: BenchPair;
  /** counts every byte between the source and the target agent */
  wire: CountingProxy;
}

/** A source and a target agent (set without compression) with a counting proxy between them; stopped and removed after the test. */
async function rig(t: TestContext, prefix: string): Promise<Rig> {
  const dir = await tmpDir(prefix);
  let proxy: CountingProxy | undefined;
  const pair = await BenchPair.create({ dir, setOptions: { compression: "none" }, sendTo: async (port) => (proxy = await CountingProxy.start(port)).address });
  t.after(async () => {
    await pair.stop();
    await proxy?.close();
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });
  return { dir, pair, wire: proxy! };
}

/** Start the agents and wait for the initial copy of `image` (already on disk) to equal it. */
async function initialCopy(r: Rig, image: string, replica: string): Promise<void> {
  const size = (await stat(image)).size;
  await r.pair.start();
  await waitFor("the image to be replicated", async () => (await stat(replica).catch(() => undefined))?.size === size && (await r.pair.caughtUp()), 180_000, 100);
  assert.equal(await sha256File(replica), await sha256File(image), "the initial replica equals the image");
}

/**
 * Bytes on the wire (both directions) for `change`: from a quiet wire, until
 * the source has journaled something new, its target acknowledged all of it,
 * the replica equals the image, and the wire is quiet again. Also how many
 * packets the source journaled meanwhile (about one per look at the image).
 */
async function wireBytesFor(r: Rig, image: string, replica: string, change: () => Promise<void>): Promise<{ bytes: number; packets: number }> {
  await quiet(r.wire, 1000, 30_000);
  const before = r.wire.snapshot();
  const seq0 = (await r.pair.source.set()).lastSeq;
  await change();
  const want = await sha256File(image);
  await waitFor("the replica to equal the image", async () => (await r.pair.caughtUp()) && (await r.pair.source.set()).lastSeq > seq0 && (await sha256File(replica)) === want, 120_000, 250);
  await quiet(r.wire, 2000, 60_000);
  const after = r.wire.snapshot();
  return { bytes: after.up - before.up + (after.down - before.down), packets: (await r.pair.source.set()).lastSeq - seq0 };
}

test("disk image: 1 % of the blocks rewritten in place while the image is open → replica identical, only those blocks on the wire", async (t) => {
  const r = await rig(t, "understudy-disk-image-");
  let fh: FileHandle | undefined;
  t.after(() => fh?.close());
  const image = path.join(r.pair.src, "images", "vm1.raw");
  const replica = path.join(r.pair.image, "images", "vm1.raw");
  await makeImage(image, SIZE);
  await initialCopy(r, image, replica);

  // The guest: the image stays open; 1 % of its blocks, at random, rewritten in place.
  fh = await open(image, "r+");
  const n = SIZE / BLOCK;
  const chosen = new Set<number>();
  while (chosen.size < n / 100) chosen.add(Math.floor(Math.random() * n));
  const blocks = [...chosen];
  const data = blocks.map(() => randomFillSync(Buffer.allocUnsafe(BLOCK)));
  const { bytes } = await wireBytesFor(r, image, replica, () => rewriteBlocks(fh!, blocks, data));
  const rewritten = blocks.length * BLOCK;
  t.diagnostic(`rewrote ${blocks.length} blocks (${rewritten} B) of a ${SIZE} B image; ${bytes} B crossed the wire (${(bytes / rewritten).toFixed(3)}×)`);
  assert.ok(bytes >= rewritten, `at least the rewritten bytes were sent (${bytes} < ${rewritten})`);
  assert.ok(bytes <= 1.2 * rewritten + OVERHEAD, `${bytes} B on the wire for ${rewritten} B rewritten (more than 1.2× + ${OVERHEAD} B): the change was not sent as changed blocks only`);
  // Still identical with the writer's descriptor open, and after it closes.
  assert.equal(await sha256File(replica), await sha256File(image));
  await fh.close();
  fh = undefined;
});

// qcow2 geometry (qemu-img create's defaults): 64 KiB clusters (= the set's
// block size, and clusters are cluster-aligned in the file, so one changed
// cluster is one changed block), 8-byte L2 entries (one L2 table maps
// 8192 clusters = 512 MiB of the guest disk), 16-bit refcounts (one refcount
// block counts 32768 clusters = 2 GiB of the file).
const CLUSTER = 64 * 1024;
const L2_SPAN = (CLUSTER / 8) * CLUSTER;
const REFBLOCK_SPAN = ((CLUSTER * 8) / 16) * CLUSTER;
const VIRTUAL = 1024 * MiB;
/** Guest data written before the first copy: EXTENTS runs of EXTENT bytes, one every STRIDE bytes of the guest disk. */
const EXTENTS = 48;
const EXTENT = 4 * MiB;
const STRIDE = 21 * MiB;
/** Writes into unallocated guest areas in the change: whole clusters, and one 4 KiB write (qemu fills the rest of its new cluster with zeros). */
const NEW_CLUSTERS = 3;
const NEW_SMALL = 4096;
/** The change comes as this many qemu-io runs (each opens, writes, flushes and closes the image). */
const BURSTS = 3;

/** qemu-img and qemu-io must be there (.ci/run installs qemu-utils): a missing tool fails the test, never skips it. */
function needQemu(): void {
  for (const tool of ["qemu-img", "qemu-io"]) {
    try {
      execFileSync(tool, ["--version"], { stdio: "ignore" });
    } catch {
      assert.fail(`${tool} is needed (package qemu-utils; .ci/run installs it)`);
    }
  }
}

function qemuIo(image: string, cmds: string[]) {
  return mustRun("qemu-io", ["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), image]);
}

/** qemu-img check (read-only): exit 0 means no errors, leaks or corruptions. */
async function assertCheckPasses(image: string, what: string): Promise<void> {
  const c = await runCmd("qemu-img", ["check", "-f", "qcow2", image]);
  assert.equal(c.code, 0, `qemu-img check of ${what} failed (exit ${c.code}): ${c.stdout}${c.stderr}`);
}

/**
 * qemu-img compare in strict mode (same guest contents, same allocation, same
 * size): exit 0 means identical. Strict holds here because no cluster is all
 * zeros (the replica keeps zeros past its old end as holes, which strict mode
 * would report as a block status mismatch; docs/hypervisor.md).
 */
async function assertSameDisk(a: string, b: string, what: string): Promise<void> {
  const c = await runCmd("qemu-img", ["compare", "-s", "-f", "qcow2", "-F", "qcow2", a, b]);
  assert.equal(c.code, 0, `qemu-img compare ${what} (exit ${c.code}): ${c.stdout}${c.stderr}`);
}

/** SHA-256 of each 64 KiB block of a file, to count the blocks a change touched. */
async function blockHashes(file: string): Promise<string[]> {
  const out: string[] = [];
  const fh = await open(file, "r");
  try {
    const buf = Buffer.allocUnsafe(64 * BLOCK);
    for (let off = 0; ; ) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, off);
      if (bytesRead === 0) return out;
      for (let o = 0; o < bytesRead; o += BLOCK) out.push(createHash("sha256").update(buf.subarray(o, Math.min(o + BLOCK, bytesRead))).digest("hex"));
      off += bytesRead;
    }
  } finally {
    await fh.close();
  }
}

test("disk image: qcow2 image, a guest's burst of writes (1 % of the clusters rewritten, a few allocated) → replica a valid identical qcow2, only the changed clusters on the wire", async (t) => {
  needQemu();
  const r = await rig(t, "understudy-disk-qcow2-");
  const image = path.join(r.pair.src, "images", "vm1.qcow2");
  const replica = path.join(r.pair.image, "images", "vm1.qcow2");
  const seed = (Date.now() % 1_000_000) + 1;
  const rnd = seededRandom(seed);
  const pattern = (not: number) => {
    for (;;) {
      const p = 1 + Math.floor(rnd() * 255); // never 0: a zero cluster would not be a change to a fresh one
      if (p !== not) return p;
    }
  };

  // The image as the guest left it: sparse, EXTENTS runs of data spread over the disk.
  await mkdir(path.dirname(image), { recursive: true });
  await mustRun("qemu-img", ["create", "-q", "-f", "qcow2", image, String(VIRTUAL)]);
  const fill = Array.from({ length: EXTENTS }, () => pattern(0));
  await qemuIo(image, fill.map((p, i) => `write -q -P ${p} ${i * STRIDE} ${EXTENT}`));
  await initialCopy(r, image, replica);
  await assertCheckPasses(replica, "the initial replica");
  await assertSameDisk(image, replica, "the image with its initial replica");

  // The change: 1 % of the allocated clusters rewritten with another pattern,
  // plus writes into unallocated areas, in random order over BURSTS qemu-io runs.
  const clustersPerExtent = EXTENT / CLUSTER;
  const allocated = EXTENTS * clustersPerExtent;
  const rewrites = new Set<number>();
  while (rewrites.size < allocated / 100) rewrites.add(Math.floor(rnd() * allocated));
  const writes: { off: number; len: number; p: number; fresh: boolean }[] = [...rewrites].map((c) => {
    const e = Math.floor(c / clustersPerExtent);
    return { off: e * STRIDE + (c % clustersPerExtent) * CLUSTER, len: CLUSTER, p: pattern(fill[e]!), fresh: false };
  });
  // One cluster in the gap after a random extent of each quarter of the disk (so both L2 tables change).
  const gaps = new Set<number>();
  for (let i = 0; i <= NEW_CLUSTERS; i++) {
    let off: number;
    do {
      const e = Math.floor(((i + rnd()) * (EXTENTS - 1)) / (NEW_CLUSTERS + 1));
      off = e * STRIDE + EXTENT + Math.floor(rnd() * ((STRIDE - EXTENT) / CLUSTER)) * CLUSTER;
    } while (gaps.has(off));
    gaps.add(off);
    writes.push(i < NEW_CLUSTERS ? { off, len: CLUSTER, p: pattern(0), fresh: true } : { off: off + NEW_SMALL, len: NEW_SMALL, p: pattern(0), fresh: true });
  }
  for (let i = writes.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [writes[i], writes[j]] = [writes[j]!, writes[i]!];
  }

  const sizeBefore = (await stat(image)).size;
  const hashesBefore = await blockHashes(image);
  const per = Math.ceil(writes.length / BURSTS);
  const t0 = Date.now();
  const { bytes, packets } = await wireBytesFor(r, image, replica, async () => {
    for (let b = 0; b < BURSTS; b++) await qemuIo(image, writes.slice(b * per, (b + 1) * per).map((w) => `write -q -P ${w.p} ${w.off} ${w.len}`));
  });
  const catchUpMs = Date.now() - t0;

  // What qcow2 changed in the file: the rewritten data clusters in place; per
  // new cluster one cluster at the end of the file, the L2 table mapping it
  // and the refcount block counting it (both already there: no L1 or
  // refcount table change). Counted from the geometry, then checked against
  // the blocks that really differ.
  const sizeAfter = (await stat(image)).size;
  const grown = sizeAfter - sizeBefore;
  const fresh = writes.filter((w) => w.fresh);
  const l2Tables = new Set(fresh.map((w) => Math.floor(w.off / L2_SPAN))).size;
  const refBlocks = new Set(Array.from({ length: grown / CLUSTER }, (_, i) => Math.floor((sizeBefore + i * CLUSTER) / REFBLOCK_SPAN))).size;
  const metadata = l2Tables + refBlocks;
  const expectedBlocks = rewrites.size + fresh.length + metadata;
  const hashesAfter = await blockHashes(image);
  const changedBlocks = hashesAfter.filter((h, i) => h !== hashesBefore[i]).length;
  const guestBytes = writes.reduce((s, w) => s + w.len, 0);
  // Each qemu-io run rewrites the metadata clusters again: a look between runs sends them again.
  const bound = 1.2 * (rewrites.size * CLUSTER + grown + metadata * BURSTS * CLUSTER) + OVERHEAD;
  t.diagnostic(`seed ${seed}: ${rewrites.size} of ${allocated} allocated clusters rewritten, ${fresh.length} allocated (${guestBytes} guest bytes written); the ${sizeBefore} B file grew by ${grown} B; ${changedBlocks} of its 64 KiB blocks changed (the layout explains ${expectedBlocks}: ${rewrites.size} rewritten, ${fresh.length} new, ${l2Tables} L2 tables, ${refBlocks} refcount blocks)`);
  t.diagnostic(`${bytes} B crossed the wire: ${(bytes / guestBytes).toFixed(3)}× the guest's writes, ${(bytes / (changedBlocks * BLOCK)).toFixed(3)}× the changed blocks, ${((100 * bytes) / sizeAfter).toFixed(2)} % of the image (bound ${Math.round(bound)} B); ${packets} packets; caught up ${catchUpMs} ms after the first write`);
  assert.equal(grown, fresh.length * CLUSTER, "each allocating write added one cluster at the end of the file");
  assert.ok(changedBlocks <= expectedBlocks, `${changedBlocks} blocks of the file changed, more than the ${expectedBlocks} the qcow2 layout explains (seed ${seed})`);

  assert.ok(bytes >= guestBytes, `at least the guest's bytes were sent (${bytes} < ${guestBytes})`);
  assert.ok(bytes <= bound, `${bytes} B on the wire, more than ${Math.round(bound)} B = 1.2 × (${rewrites.size} rewritten clusters + ${grown} B of growth + ${metadata} metadata clusters × ${BURSTS} runs) + ${OVERHEAD} B: the change was not sent as changed clusters only (seed ${seed})`);
  assert.equal(await sha256File(replica), await sha256File(image), "the replica's bytes equal the image's");
  await assertCheckPasses(replica, "the replica after the change");
  await assertSameDisk(image, replica, "the image with its replica after the change");
});
