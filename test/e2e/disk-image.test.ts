// Hypervisor-host mode: a raw VM disk image is replicated, then 1 % of its
// 64 KiB blocks are rewritten in place by a writer that keeps the image open
// (as qemu does). The replica must end byte-identical, and what crosses the
// wire for the change (counted by a TCP proxy between the agents) must be
// about the rewritten bytes, not the image.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomFillSync } from "node:crypto";
import { open, rm, stat, type FileHandle } from "node:fs/promises";
import path from "node:path";
import { BenchPair } from "../bench/agents.ts";
import { makeImage, rewriteBlocks } from "../bench/disk-image.ts";
import { CountingProxy, quiet } from "../bench/proxy.ts";
import { sha256File } from "../bench/util.ts";
import { tmpDir, waitFor } from "./harness.ts";

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
const SIZE = 256 * MiB;
/** gRPC/HTTP2 framing, packet headers, acks and keepalive pings for a few dozen packets. */
const OVERHEAD = 128 * 1024;

test("disk image: 1 % of the blocks rewritten in place while the image is open → replica identical, only those blocks on the wire", async (t) => {
  const dir = await tmpDir("understudy-disk-image-");
  let proxy: CountingProxy | undefined;
  const pair = await BenchPair.create({ dir, setOptions: { compression: "none" }, sendTo: async (port) => (proxy = await CountingProxy.start(port)).address });
  let fh: FileHandle | undefined;
  t.after(async () => {
    await fh?.close();
    await pair.stop();
    await proxy?.close();
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });
  const image = path.join(pair.src, "images", "vm1.raw");
  const replica = path.join(pair.image, "images", "vm1.raw");
  await makeImage(image, SIZE);
  await pair.start();
  await waitFor("the image to be replicated", async () => (await stat(replica).catch(() => undefined))?.size === SIZE && (await pair.caughtUp()), 180_000, 100);
  assert.equal(await sha256File(replica), await sha256File(image), "the initial replica equals the image");

  // The guest: the image stays open; 1 % of its blocks, at random, rewritten in place.
  fh = await open(image, "r+");
  const n = SIZE / BLOCK;
  const chosen = new Set<number>();
  while (chosen.size < n / 100) chosen.add(Math.floor(Math.random() * n));
  const blocks = [...chosen];
  const data = blocks.map(() => randomFillSync(Buffer.allocUnsafe(BLOCK)));
  const wire = proxy!;
  await quiet(wire, 1000, 30_000);
  const before = wire.snapshot();
  const seq0 = (await pair.source.set()).lastSeq;
  await rewriteBlocks(fh, blocks, data);
  const want = await sha256File(image);
  await waitFor("the replica to equal the image", async () => (await pair.caughtUp()) && (await pair.source.set()).lastSeq > seq0 && (await sha256File(replica)) === want, 120_000, 250);
  await quiet(wire, 2000, 60_000);
  const after = wire.snapshot();
  const bytes = after.up - before.up + (after.down - before.down);
  const rewritten = blocks.length * BLOCK;
  t.diagnostic(`rewrote ${blocks.length} blocks (${rewritten} B) of a ${SIZE} B image; ${bytes} B crossed the wire (${(bytes / rewritten).toFixed(3)}×)`);
  assert.ok(bytes >= rewritten, `at least the rewritten bytes were sent (${bytes} < ${rewritten})`);
  assert.ok(bytes <= 1.2 * rewritten + OVERHEAD, `${bytes} B on the wire for ${rewritten} B rewritten (more than 1.2× + ${OVERHEAD} B): the change was not sent as changed blocks only`);
  // Still identical with the writer's descriptor open, and after it closes.
  assert.equal(await sha256File(replica), await sha256File(image));
  await fh.close();
  fh = undefined;
});
