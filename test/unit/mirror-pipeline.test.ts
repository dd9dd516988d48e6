// The mirror asks for directory listings ahead, while batches are still in
// flight: a listing must never be taken while a batch that changes what it
// shows is unapplied (TouchTracker), and the result must still equal the
// source. The target here applies batches late, one at a time, and checks
// every listing asked for against the batches not yet applied.
import { test } from "node:test";
import assert from "node:assert/strict";
import { lstat, mkdir, mkdtemp, readFile, readdir, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Mirror, TouchTracker } from "../../agent/mirror/mirror.ts";
import { FileIndex, parentOf } from "../../agent/source/file-index.ts";
import { emptyProgress } from "../../agent/source/sender.ts";
import { Applier } from "../../agent/target/applier.ts";
import { digestsOf, listDir } from "../../agent/target/manifest.ts";
import { CHANGE_DIGEST } from "../../agent/source/blocks.ts";
import type { Op } from "../../agent/wire.ts";
import { indexEntryOf } from "./index-entry.ts";

test("TouchTracker: a listing depends on ops on its entries, on itself and on its ancestors, and on links to its names", () => {
  const t = new TouchTracker();
  const op = (p: string, kind: Op["kind"]): Op => ({ path: p, kind });
  t.touch(op("a/b/f", { $case: "truncate", value: { size: 1 } }), 1);
  assert.equal(t.need("a/b"), 1);
  assert.equal(t.need("a"), 0);
  assert.equal(t.need("a/b/c"), 0, "a file's op does not concern a sibling directory");
  t.touch(op("a", { $case: "attr", value: { attr: undefined } }), 2);
  assert.equal(t.need("a/b/c"), 2, "an op on an ancestor (it may be removed or replaced)");
  assert.equal(t.need(""), 2, "and on an entry of the root");
  t.touch(op("x/y", { $case: "link", value: { existing: "q/first" } }), 3);
  assert.equal(t.need("q"), 3, "a link changes the listed link count of the name linked to");
  assert.equal(t.need("x"), 3);
  assert.equal(t.prune(2, 0), true);
  assert.equal(t.need("a/b"), 0);
  assert.equal(t.need("q"), 3);
});

/** Whether op changes what a listing of d shows (the rule TouchTracker implements, spelled out). */
function affects(op: Op, d: string): boolean {
  if (parentOf(op.path) === d || op.path === d || d === "" || d.startsWith(op.path + "/")) return true;
  return op.kind?.$case === "link" && parentOf(op.kind.value.existing) === d;
}

async function tree(root: string, rel = ""): Promise<string[]> {
  const out: string[] = [];
  for (const n of (await readdir(path.join(root, rel))).sort()) {
    const q = rel ? `${rel}/${n}` : n;
    const st = await lstat(path.join(root, q), { bigint: true });
    const what = st.isDirectory() ? "d" : st.isSymbolicLink() ? "l" : `f:${(await readFile(path.join(root, q))).toString("hex")}`;
    out.push(`${q} ${what} ${st.mode.toString(8)} ${st.isSymbolicLink() ? "" : st.mtimeNs / 1000n}`);
    if (st.isDirectory()) out.push(...(await tree(root, q)));
  }
  return out;
}

for (const mode of ["full", "checksum"] as const) {
  test(`mirror (${mode}) with listings asked for ahead and a target that applies late equals the source`, async (t) => {
    const base = await mkdtemp(path.join(os.tmpdir(), "mirror-pipeline-"));
    t.after(() => rm(base, { recursive: true, force: true }));
    const src = path.join(base, "src");
    const img = path.join(base, "img");
    await mkdir(src);
    await mkdir(img);
    const paths: string[] = [];
    const add = async (rel: string, what: "d" | "f" | "l", content = "") => {
      const abs = path.join(src, rel);
      if (what === "d") await mkdir(abs);
      else if (what === "l") await symlink(content, abs);
      else await writeFile(abs, content);
      paths.push(rel);
    };
    for (let i = 0; i < 30; i++) {
      const d = `d${String(i).padStart(2, "0")}`;
      await add(d, "d");
      for (let j = 0; j < 5; j++) await add(`${d}/f${j}`, "f", `${d}/${j} `.repeat(i * 50 + j));
      if (i % 3 === 0) {
        await add(`${d}/sub`, "d");
        await add(`${d}/sub/deeper`, "d");
        await add(`${d}/sub/deeper/g`, "f", "deep");
        await add(`${d}/sub/link`, "l", "../f0");
      }
    }
    await add("zero", "f", "\0".repeat(200_000) + "tail");
    // The target holds something else: files where directories go and the reverse, extra entries, old content.
    await writeFile(path.join(img, "d00"), "a file where a directory goes");
    await mkdir(path.join(img, "d03/f1/inner"), { recursive: true });
    await writeFile(path.join(img, "d03/extra"), "not on the source");
    await mkdir(path.join(img, "d06/sub/deeper/g"), { recursive: true });
    await mkdir(path.join(img, "gone/deep"), { recursive: true });
    await mkdir(path.join(img, "d09"), { recursive: true });
    await writeFile(path.join(img, "d09/f2"), "old content of f2 that is longer than the new one ".repeat(40));
    // Files too large for digests in a listing (over 64 blocks), mostly equal on the target:
    // in checksum mode both sides hash, then only differing blocks are read again and sent.
    const big = Buffer.alloc(300 * 4096 + 123);
    for (let i = 0; i < big.length; i += 7) big[i] = (i * 31) & 0xff;
    await writeFile(path.join(src, "big"), big);
    await writeFile(path.join(src, "big-short"), big);
    paths.push("big", "big-short");
    const theirs = Buffer.concat([big, Buffer.from("extra bytes the source does not have")]);
    for (const b of [3, 100, 299]) theirs.fill(0x5a, b * 4096, b * 4096 + 17);
    await writeFile(path.join(img, "big"), theirs);
    await writeFile(path.join(img, "big-short"), big.subarray(0, 100 * 4096 + 5));
    const index = new FileIndex();
    for (const p of paths) index.apply({ set: p, e: await indexEntryOf(path.join(src, p)) });

    const applier = new Applier(img);
    const queue: Op[][] = [];
    let applied = 0;
    let listing = 0; // listings being taken: batches wait (a listing is a snapshot of the moment it is asked for)
    let pump: Promise<void> | undefined;
    let failed: Error | undefined;
    const alive = () => {
      if (failed) throw failed;
    };
    const run = async () => {
      try {
        while (queue.length) {
          await sleep(1);
          while (listing > 0) await sleep(1);
          await applier.applyConcurrently(queue[0]!);
          queue.shift();
          applied++;
        }
      } catch (e) {
        failed = e as Error;
      }
      pump = undefined;
    };
    let asked = 0;
    const m = new Mirror(
      { root: src, blockSize: 4096, index, serial: (fn) => fn(), flushCapture: async () => undefined, lastSeq: () => 0, touchedSince: async () => ({ paths: new Set(), moved: new Set() }), forget: async () => undefined },
      {
        manifest: async (dir, digestMaxBlocks) => {
          for (const b of queue) for (const op of b) assert.ok(!affects(op, dir), `listing of ${JSON.stringify(dir)} asked for while ${op.kind?.$case} ${op.path} is not applied`);
          asked++;
          listing++;
          try {
            return await listDir(img, dir, 4096, digestMaxBlocks, CHANGE_DIGEST);
          } finally {
            listing--;
          }
        },
        digests: async (p) => {
          for (const b of queue) for (const op of b) assert.ok(!affects(op, parentOf(p)), `digests of ${p} asked for while ${op.path} is not applied`);
          return digestsOf(img, p, 4096, CHANGE_DIGEST);
        },
        send: async (ops) => {
          queue.push(ops);
          pump ??= run();
          while (queue.length >= 4) {
            alive();
            await sleep(1);
          }
        },
        applied: () => applied,
        waitApplied: async (n) => {
          while (applied < n) {
            alive();
            await sleep(1);
          }
        },
        done: async () => {
          while (queue.length) {
            alive();
            await sleep(1);
          }
        },
      },
      { mode, pStart: 0, progress: emptyProgress(), signal: new AbortController().signal },
    );
    assert.equal(await m.run(), 0);
    await pump;
    await applier.close();
    assert.ok(asked >= 31);
    assert.deepEqual(await tree(img), await tree(src));
  });
}

test("applier: files beyond the unsynced limit are closed without a sync each, and the next sync (a syncfs) covers them", async (t) => {
  const img = await mkdtemp(path.join(os.tmpdir(), "applier-unsynced-"));
  t.after(() => rm(img, { recursive: true, force: true }));
  const applier = new Applier(img);
  const state = applier as unknown as { closedUnsynced: number; unsynced: unknown[]; handles: Map<string, unknown> };
  const ops: Op[] = [{ path: "d", kind: { $case: "mkdir", value: { attr: undefined } } }];
  for (let i = 0; i < 700; i++) {
    ops.push({ path: `d/f${i}`, kind: { $case: "create", value: { attr: undefined } } });
    ops.push({ path: `d/f${i}`, kind: { $case: "write", value: { offset: 0, data: Buffer.from(`file ${i}`) } } });
  }
  await applier.applyConcurrently(ops);
  assert.ok(state.closedUnsynced >= 512, `closed unsynced: ${state.closedUnsynced}`);
  assert.ok(state.unsynced.length + state.handles.size <= 128 + 512);
  await applier.sync();
  assert.equal(state.closedUnsynced, 0);
  assert.equal(await readFile(path.join(img, "d/f699"), "utf8"), "file 699");
  assert.equal(await readFile(path.join(img, "d/f0"), "utf8"), "file 0");
});
