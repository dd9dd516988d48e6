// DirWatcher after a rename capture detected by inode number. A directory
// deleted while another is made (which may get the freed inode number) looks
// to capture like a rename, before the deletion is seen: the watch moved to
// the new path is then on a deleted inode. Capture adds the watch of the new
// path again right after the rename; that must give a live watch, or nothing
// made in the directory is ever captured.
import { test } from "node:test";
import assert from "node:assert/strict";
import { lstat, mkdir, mkdtemp, rename, rm, rmdir, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { DirWatcher } from "../../agent/source/watcher.ts";

async function until(what: string, ok: () => boolean, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test("a directory taken for the rename of a deleted one is watched, not left with the dead watch", async (t) => {
  const root = await mkdtemp(path.join(os.tmpdir(), "watcher-"));
  const dirty: string[] = [];
  const w = new DirWatcher(root, (rel) => dirty.push(rel), () => undefined);
  t.after(async () => {
    w.close();
    await rm(root, { recursive: true, force: true });
  });
  await mkdir(path.join(root, "old"));
  w.add("old", (await lstat(path.join(root, "old"))).ino);
  await rmdir(path.join(root, "old"));
  await mkdir(path.join(root, "new"));
  // What capture does when "new" has the inode number the index has for "old".
  w.rename("old", "new");
  w.add("new", (await lstat(path.join(root, "new"))).ino);
  await writeFile(path.join(root, "new/file"), "x");
  await until("the new directory's file to be reported", () => dirty.includes("new/file"));
});

test("a renamed directory keeps reporting its events under its new name, and so do its subdirectories", async (t) => {
  const root = await mkdtemp(path.join(os.tmpdir(), "watcher-"));
  const dirty: string[] = [];
  const w = new DirWatcher(root, (rel) => dirty.push(rel), () => undefined);
  t.after(async () => {
    w.close();
    await rm(root, { recursive: true, force: true });
  });
  await mkdir(path.join(root, "a/sub"), { recursive: true });
  w.add("a", (await lstat(path.join(root, "a"))).ino);
  w.add("a/sub", (await lstat(path.join(root, "a/sub"))).ino);
  await rename(path.join(root, "a"), path.join(root, "b"));
  w.rename("a", "b");
  w.add("b", (await lstat(path.join(root, "b"))).ino);
  await writeFile(path.join(root, "b/f"), "x");
  await writeFile(path.join(root, "b/sub/g"), "x");
  await until("events under the new name", () => dirty.includes("b/f") && dirty.includes("b/sub/g"));
  assert.equal(w.count, 2);
});
