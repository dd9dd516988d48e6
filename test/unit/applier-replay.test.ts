// A target killed (kill -9) while it applies a packet restarts at the last
// packet it recorded as applied and applies the interrupted one again from its
// first op. Every prefix of a packet may therefore already be on disk when the
// packet is applied in full: the result must be the same as applying it once,
// and the packet must not be refused (a refused replay stops the image until
// a resync mirror, e2e crash.test.ts).
import { test } from "node:test";
import assert from "node:assert/strict";
import { lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { Applier } from "../../agent/target/applier.ts";
import { Packetizer } from "../../agent/source/capture.ts";
import type { Attr, Op } from "../../agent/wire.ts";

const attr = (mode: number): Attr => ({ mode, uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, mtimeSec: 1_600_000_000, mtimeNsec: 250_000, xattrs: [], hasXattrs: true });
const op = {
  mkdir: (p: string): Op => ({ path: p, kind: { $case: "mkdir", value: { attr: attr(0o755) } } }),
  create: (p: string): Op => ({ path: p, kind: { $case: "create", value: { attr: attr(0o644) } } }),
  write: (p: string, s: string, offset = 0): Op => ({ path: p, kind: { $case: "write", value: { offset, data: Buffer.from(s) } } }),
  truncate: (p: string, size: number): Op => ({ path: p, kind: { $case: "truncate", value: { size } } }),
  attr: (p: string, mode = 0o640): Op => ({ path: p, kind: { $case: "attr", value: { attr: attr(mode) } } }),
  remove: (p: string, directory = false): Op => ({ path: p, kind: { $case: "remove", value: { directory } } }),
  rename: (p: string, to: string): Op => ({ path: p, kind: { $case: "rename", value: { to } } }),
  link: (p: string, existing: string): Op => ({ path: p, kind: { $case: "link", value: { existing } } }),
  symlink: (p: string, target: string): Op => ({ path: p, kind: { $case: "symlink", value: { target, attr: attr(0o777) } } }),
};

/** What a tree holds: type, content or link target, mode (not times: directory mtimes move with every entry made). */
async function describe(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (rel: string) => {
    for (const n of (await readdir(path.join(root, rel))).sort()) {
      const r = rel ? `${rel}/${n}` : n;
      const p = path.join(root, r);
      const st = await lstat(p);
      if (st.isDirectory()) {
        out.push(`${r}/ ${(st.mode & 0o7777).toString(8)}`);
        await walk(r);
      } else if (st.isSymbolicLink()) out.push(`${r} -> ${await readlink(p)}`);
      else out.push(`${r} ${(st.mode & 0o7777).toString(8)} n${st.nlink} ${JSON.stringify(await readFile(p, "utf8"))}`);
    }
  };
  await walk("");
  return out;
}

/** The tree a packet starts from. */
async function before(root: string): Promise<void> {
  await mkdir(path.join(root, "a/b/c"), { recursive: true });
  await mkdir(path.join(root, "x"), { recursive: true });
  await writeFile(path.join(root, "a/f"), "f");
  await writeFile(path.join(root, "a/b/g"), "g");
  await writeFile(path.join(root, "a/b/c/h"), "h");
  await writeFile(path.join(root, "x/keep"), "keep");
  await symlink("../x/keep", path.join(root, "a/b/l"));
}

// Packets of the shapes capture makes (see agent/source/capture.ts): a
// directory removed with everything in it (`rm -r`: one remove per path,
// deepest first), new files with content and attributes, hard links, a
// file replaced by a directory and the other way round, and renames (which
// travel alone in their packet).
const packets: Record<string, Op[]> = {
  "rm -r of a directory tree": [op.remove("a/b/c/h"), op.remove("a/b/l"), op.remove("a/b/g"), op.remove("a/b/c", true), op.remove("a/b", true), op.remove("a/f"), op.remove("a", true), op.attr("x", 0o750)],
  "new files in a new directory": [op.mkdir("n"), op.create("n/f"), op.write("n/f", "hello"), op.truncate("n/f", 5), op.attr("n/f"), op.create("n/z"), op.write("n/z", "\0".repeat(8192) + "tail"), op.truncate("n/z", 8196), op.attr("n/z"), op.attr("n", 0o700)],
  "files edited, then their directory removed": [op.write("a/b/g", "G", 0), op.attr("a/b/g"), op.create("a/b/c/new"), op.write("a/b/c/new", "new"), op.attr("a/b/c/new"), op.remove("a/b/c/new"), op.remove("a/b/c/h"), op.remove("a/b/c", true), op.attr("a/b", 0o711)],
  "a file replaced by a directory, a directory by a file": [op.remove("a/f"), op.mkdir("a/f"), op.create("a/f/in"), op.write("a/f/in", "in"), op.attr("a/f/in"), op.remove("a/b/c", true), op.create("a/b/c"), op.write("a/b/c", "was a dir"), op.attr("a/b/c")],
  "symlink retargeted and removed": [op.symlink("x/s", "a/f"), op.remove("a/b/l"), op.symlink("a/b/l", "nowhere"), op.remove("x/s")],
  "rename of a directory": [op.rename("a/b", "x/moved")],
  "rename of a file into a new directory": [op.rename("a/f", "n/m/f")],
};

for (const [name, ops] of Object.entries(packets)) {
  test(`a packet replayed after a crash at any op gives the same tree: ${name}`, async (t) => {
    const base = await mkdtemp(path.join(os.tmpdir(), "replay-"));
    t.after(() => rm(base, { recursive: true, force: true }));
    const once = path.join(base, "once");
    await before(once);
    const a = new Applier(once);
    await a.apply(ops);
    await a.close();
    const want = await describe(once);
    for (let k = 0; k <= ops.length; k++) {
      const img = path.join(base, `cut${k}`);
      await before(img);
      // The first k ops reached the disk, then the process died.
      const dead = new Applier(img);
      for (const o of ops.slice(0, k)) await dead.apply([o]);
      await dead.close();
      const restarted = new Applier(img);
      await assert.doesNotReject(restarted.apply(ops), `replay after ${k} of ${ops.length} ops (${ops[k - 1]?.kind?.$case ?? "none"} ${ops[k - 1]?.path ?? ""})`);
      await restarted.close();
      assert.deepEqual(await describe(img), want, `tree after a replay cut at op ${k}`);
    }
  });
}

// Sequences that no single packet may hold: an op that a later op of the same
// packet makes impossible or wrong to repeat (a Link whose first name is then
// removed or re-created, a Write to a path then made a symlink or removed with
// its directory). The Packetizer cuts the packet before the later op, so the
// interrupted packet never holds both; each packet is replayed after a crash at
// every op, with the packets before it applied.
const hazards: Record<string, Op[]> = {
  "a hard link, then its first name removed": [op.link("x/m", "x/keep"), op.remove("x/keep"), op.attr("x", 0o750)],
  "a hard link, then its first name re-created": [op.link("x/m", "x/keep"), op.create("x/keep"), op.write("x/keep", "new"), op.attr("x/keep")],
  "a hard link, then the first name's directory removed": [op.link("x/h", "a/b/c/h"), op.remove("a/b/c/h"), op.remove("a/b/c", true)],
  "a write, then the path made a symlink": [op.write("a/f", "F", 0), op.attr("a/f"), op.remove("a/f"), op.symlink("a/f", "../x/keep"), op.attr("x")],
  "a truncate, then the directory removed": [op.truncate("a/b/g", 0), op.remove("a/b/g"), op.remove("a/b/l"), op.remove("a/b/c/h"), op.remove("a/b/c", true), op.remove("a/b", true)],
};

for (const [name, ops] of Object.entries(hazards)) {
  test(`packets cut by the Packetizer replay after a crash at any op: ${name}`, async (t) => {
    const packets: Op[][] = [];
    const p = new Packetizer(async (o) => void packets.push(o));
    for (const o of ops) await p.push(o);
    await p.flush();
    assert.ok(packets.length >= 2, "the packet is cut");
    assert.deepEqual(packets.flat(), ops, "nothing lost or reordered");
    const base = await mkdtemp(path.join(os.tmpdir(), "replay-cut-"));
    t.after(() => rm(base, { recursive: true, force: true }));
    const once = path.join(base, "once");
    await before(once);
    const a = new Applier(once);
    for (const pk of packets) await a.apply(pk);
    await a.close();
    const want = await describe(once);
    for (let i = 0; i < packets.length; i++) {
      const pk = packets[i]!;
      for (let k = 0; k <= pk.length; k++) {
        const img = path.join(base, `p${i}cut${k}`);
        await before(img);
        const dead = new Applier(img);
        for (const earlier of packets.slice(0, i)) await dead.apply(earlier);
        for (const o of pk.slice(0, k)) await dead.apply([o]);
        await dead.close();
        const restarted = new Applier(img);
        await assert.doesNotReject(async () => {
          for (const rest of packets.slice(i)) await restarted.apply(rest);
        }, `replay of packet ${i} after ${k} of its ${pk.length} ops`);
        await restarted.close();
        assert.deepEqual(await describe(img), want, `tree after a replay of packet ${i} cut at op ${k}`);
      }
    }
  });
}
