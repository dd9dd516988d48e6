// Mirror of a hard-link group whose first name (in path order) the source's
// index still lists but the tree no longer has, or has as another file
// (capture has not caught up): the other names must not be linked to a name
// the mirror did not send. A Link to a name the target lacks fails the whole
// batch; a Link to the target's stale copy joins an unrelated file into the
// group, and nothing repairs that afterwards.
import { test } from "node:test";
import assert from "node:assert/strict";
import { link, lstat, mkdir, mkdtemp, readFile, rm, unlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { Mirror } from "../../agent/mirror/mirror.ts";
import { FileIndex } from "../../agent/source/file-index.ts";
import { emptyProgress } from "../../agent/source/sender.ts";
import { Applier } from "../../agent/target/applier.ts";
import { digestsOf, listDir } from "../../agent/target/manifest.ts";
import { CHANGE_DIGEST } from "../../agent/source/blocks.ts";
import { indexEntryOf } from "./index-entry.ts";

for (const what of ["gone", "replaced by another file"] as const) {
  test(`mirror: a hard-link group whose first name is ${what} on the source is linked to the next name, not to it`, async (t) => {
    const base = await mkdtemp(path.join(os.tmpdir(), "mirror-links-"));
    t.after(() => rm(base, { recursive: true, force: true }));
    const src = path.join(base, "src");
    const img = path.join(base, "img");
    for (const d of ["a", "b", "c"]) await mkdir(path.join(src, d), { recursive: true });
    await mkdir(img);
    await writeFile(path.join(src, "a/first"), "shared content");
    await link(path.join(src, "a/first"), path.join(src, "b/second"));
    await link(path.join(src, "a/first"), path.join(src, "c/third"));
    const index = new FileIndex();
    for (const p of ["a", "b", "c", "a/first", "b/second", "c/third"]) index.apply({ set: p, e: await indexEntryOf(path.join(src, p)) });
    // The first name changes; the index has not heard of it yet.
    await unlink(path.join(src, "a/first"));
    if (what !== "gone") {
      await writeFile(path.join(src, "a/first"), "another file");
      // The target has a copy of it from before.
      await mkdir(path.join(img, "a"));
      await writeFile(path.join(img, "a/first"), "an older copy");
    }

    const applier = new Applier(img);
    let applied = 0;
    const m = new Mirror(
      { root: src, blockSize: 65536, index, serial: (fn) => fn(), flushCapture: async () => undefined, lastSeq: () => 0, touchedSince: async () => ({ paths: new Set(), moved: new Set() }), forget: async () => undefined },
      {
        manifest: (dir, digestMaxBlocks) => listDir(img, dir, 65536, digestMaxBlocks, CHANGE_DIGEST),
        digests: (p) => digestsOf(img, p, 65536, CHANGE_DIGEST),
        send: async (ops) => {
          await applier.apply(ops);
          applied++;
        },
        applied: () => applied,
        waitApplied: async () => undefined,
        done: async () => undefined,
      },
      { mode: "checksum", pStart: 0, progress: emptyProgress(), signal: new AbortController().signal },
    );
    assert.equal(await m.run(), 0);
    await applier.close();
    const second = await lstat(path.join(img, "b/second"));
    const third = await lstat(path.join(img, "c/third"));
    assert.equal(await readFile(path.join(img, "b/second"), "utf8"), "shared content");
    assert.equal(second.ino, third.ino, "the names still on the source are one file on the target");
    assert.equal(second.nlink, 2, "and no other name shares it");
  });
}
