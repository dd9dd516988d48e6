// Path confinement on the target: replication paths are validated
// syntactically (splitRelPath), resolved without ever passing through a
// symlink (ConfinedRoot), and the applier never writes through a symlink.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { lstat, mkdir, mkdtemp, readFile, readdir, readlink, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import fc from "fast-check";
import { ConfinedRoot, PathError, splitRelPath } from "../../agent/fs/confine.ts";
import { Applier } from "../../agent/target/applier.ts";
import type { Op } from "../../agent/wire.ts";

let base: string;
before(async () => {
  base = await mkdtemp(path.join(os.tmpdir(), "understudy-confine-"));
});
after(async () => {
  if (!process.env.KEEP_TEST_DIRS) await rm(base, { recursive: true, force: true });
});

let n = 0;
/** A fresh directory holding `image/` and an `outside/` canary next to it. */
async function layout(): Promise<{ image: string; outside: string }> {
  const dir = path.join(base, String(++n));
  const image = path.join(dir, "image");
  const outside = path.join(dir, "outside");
  await mkdir(image, { recursive: true });
  await mkdir(outside);
  await writeFile(path.join(outside, "secret"), "the secret\n", { mode: 0o640 });
  return { image, outside };
}

const bytes255 = "é".repeat(127) + "a"; // 255 bytes in 128 characters
const path4096 = Array.from({ length: 16 }, (_, i) => String.fromCharCode(97 + i).repeat(255)).join("/"); // 16*255 + 15 = 4095 bytes
const sized = (total: number) => {
  // a path of `total` bytes made of short components
  const parts: string[] = [];
  let len = -1;
  while (len + 11 <= total) {
    parts.push("abcdefghij");
    len += 11;
  }
  const rest = total - len - 1;
  if (rest > 0) parts.push("x".repeat(rest));
  const p = parts.join("/");
  assert.equal(Buffer.byteLength(p), total);
  return p;
};

test("splitRelPath accepts ordinary relative names", () => {
  const ok: [string, string[]][] = [
    ["a", ["a"]],
    ["a/b/c.txt", ["a", "b", "c.txt"]],
    [".bashrc", [".bashrc"]],
    ["home/.config/app", ["home", ".config", "app"]],
    ["..hidden", ["..hidden"]],
    ["...", ["..."]],
    ["a..b/c.", ["a..b", "c."]],
    ["with space/ and trailing ", ["with space", " and trailing "]],
    ["ünïcødé/日本語/emoji 🎉", ["ünïcødé", "日本語", "emoji 🎉"]],
    ["-leading-dash", ["-leading-dash"]],
    ["back\\slash", ["back\\slash"]], // just a character on POSIX
    ["..\\x", ["..\\x"]],
    ["~", ["~"]],
    ["x".repeat(255), ["x".repeat(255)]],
    [bytes255, [bytes255]],
    [path4096, path4096.split("/")],
    [sized(4096), sized(4096).split("/")],
  ];
  for (const [p, parts] of ok) assert.deepEqual(splitRelPath(p), parts, JSON.stringify(p).slice(0, 60));
});

test("splitRelPath refuses what could leave the root or is malformed", () => {
  const bad: [string, RegExp][] = [
    ["", /empty path/],
    ["/", /absolute/],
    ["/etc/passwd", /absolute/],
    ["//server/share", /absolute/],
    [".", /contains '\.'/],
    ["..", /contains '\.\.'/],
    ["../x", /contains '\.\.'/],
    ["a/..", /contains '\.\.'/],
    ["a/../../b", /contains '\.\.'/],
    ["a/./b", /contains '\.'/],
    ["./a", /contains '\.'/],
    ["a//b", /empty component/],
    ["a/", /empty component/],
    ["a/b/", /empty component/],
    ["a\u0000b", /NUL/],
    ["\u0000", /NUL/],
    ["a/\u0000/b", /NUL/],
    ["x".repeat(256), /longer than 255/],
    ["é".repeat(128), /longer than 255/], // 128 characters, 256 bytes: the limit is in bytes
    [`ok/${"y".repeat(256)}/z`, /longer than 255/],
    [sized(4097), /longer than 4096/],
    ["日".repeat(1366), /longer than 4096/], // 1366 characters, 4098 bytes
  ];
  for (const [p, why] of bad) {
    assert.throws(() => splitRelPath(p), (e: unknown) => e instanceof PathError && why.test((e as Error).message), `${JSON.stringify(p).slice(0, 60)} is refused with ${why}`);
  }
  // Not a string at all (a decoder bug or a hand-made message).
  assert.throws(() => splitRelPath(undefined as unknown as string), PathError);
});

test("ConfinedRoot.resolve never returns a path outside the root or below a symlink", async () => {
  const { image: root, outside } = await layout();
  await mkdir(path.join(root, "d"));
  await symlink("/", path.join(root, "s"));
  await symlink("..", path.join(root, "d", "up"));
  await symlink(outside, path.join(root, "out"));
  await writeFile(path.join(root, "f"), "file");
  const segment = fc.oneof(
    { weight: 6, arbitrary: fc.constantFrom("a", "b", "d", "s", "f", "up", "out", "etc", "..", ".", "", "/", "/", "/", "\u0000", "...", ".a", "\\") },
    { weight: 1, arbitrary: fc.string({ unit: "binary", maxLength: 4 }) },
  );
  const relPath = fc.oneof(fc.array(segment, { maxLength: 12 }).map((a) => a.join("")), fc.array(segment, { minLength: 1, maxLength: 6 }).map((a) => a.join("/")));
  await fc.assert(
    fc.asyncProperty(relPath, fc.boolean(), async (rel, createParents) => {
      const cr = new ConfinedRoot(root);
      let abs: string;
      try {
        abs = await cr.resolve(rel, createParents);
      } catch (e) {
        // refused, or an fs error on the way (ENOENT without createParents, ENAMETOOLONG, ...)
        assert.ok(e instanceof PathError || typeof (e as NodeJS.ErrnoException).code === "string", `unexpected error for ${JSON.stringify(rel)}: ${String(e)}`);
        return;
      }
      const r = path.relative(root, abs);
      assert.ok(r !== "" && r !== ".." && !r.startsWith(`..${path.sep}`) && !path.isAbsolute(r), `${JSON.stringify(rel)} resolved to ${abs}, outside ${root}`);
      assert.equal(path.join(root, r), abs);
      const parts = r.split(path.sep);
      for (let i = 1; i < parts.length; i++) {
        const dir = path.join(root, ...parts.slice(0, i));
        const st = await lstat(dir);
        assert.ok(st.isDirectory() && !st.isSymbolicLink(), `${JSON.stringify(rel)}: parent ${dir} of ${abs} is not a real directory`);
      }
    }),
    { numRuns: 400 },
  );
  // The symlinks were never followed to create anything.
  assert.deepEqual(await readdir(outside), ["secret"]);
});

test("ConfinedRoot refuses paths through symlinks and files, with a clear message", async () => {
  const { image: root, outside } = await layout();
  await symlink(outside, path.join(root, "link"));
  await writeFile(path.join(root, "file"), "x");
  const cr = new ConfinedRoot(root);
  await assert.rejects(cr.resolve("link/secret"), (e: unknown) => e instanceof PathError && /goes through symlink "link"/.test((e as Error).message));
  await assert.rejects(cr.resolve("link/new/deeper", true), PathError);
  await assert.rejects(cr.resolve("file/x", true), (e: unknown) => e instanceof PathError && /"file" is not a directory/.test((e as Error).message));
  await assert.rejects(cr.check("link/secret"), PathError);
  // The link itself is a name in the image: resolvable (ops on it must not follow it).
  assert.equal(await cr.resolve("link"), path.join(root, "link"));
  // Missing parents: refused without createParents, created as real directories with it.
  await assert.rejects(cr.resolve("new/x"), { code: "ENOENT" });
  assert.equal(await cr.resolve("new/x", true), path.join(root, "new", "x"));
  assert.ok((await lstat(path.join(root, "new"))).isDirectory());
  assert.deepEqual(await readdir(outside), ["secret"]);
});

const op = {
  mkdir: (p: string): Op => ({ path: p, kind: { $case: "mkdir", value: { attr: undefined } } }),
  create: (p: string): Op => ({ path: p, kind: { $case: "create", value: { attr: undefined } } }),
  write: (p: string, data: string, offset = 0): Op => ({ path: p, kind: { $case: "write", value: { offset, data: Buffer.from(data) } } }),
  truncate: (p: string, size: number): Op => ({ path: p, kind: { $case: "truncate", value: { size } } }),
  symlink: (p: string, target: string): Op => ({ path: p, kind: { $case: "symlink", value: { target, attr: undefined } } }),
  link: (p: string, existing: string): Op => ({ path: p, kind: { $case: "link", value: { existing } } }),
  remove: (p: string): Op => ({ path: p, kind: { $case: "remove", value: { directory: false } } }),
  rename: (p: string, to: string): Op => ({ path: p, kind: { $case: "rename", value: { to } } }),
  attr: (p: string, mode: number): Op => ({ path: p, kind: { $case: "attr", value: { attr: { mode, uid: 0, gid: 0, mtimeSec: 1_000_000_000, mtimeNsec: 0, xattrs: [], hasXattrs: false } } } }),
};

/** Content, mode and inode of everything in the canary. */
async function canary(outside: string): Promise<string> {
  const names = (await readdir(outside)).sort();
  const out: string[] = [];
  for (const name of names) {
    const st = await lstat(path.join(outside, name));
    out.push(`${name} ${st.mode.toString(8)} ${st.ino} ${st.nlink} ${st.mtimeMs} ${st.isFile() ? await readFile(path.join(outside, name), "utf8") : ""}`);
  }
  return out.join("\n");
}

test("Applier refuses to write through a symlinked directory", async () => {
  const { image, outside } = await layout();
  const before = await canary(outside);
  const a = new Applier(image, { canChown: false });
  // A symlink replicated into the image (accepted: symlinks are data).
  await a.apply([op.symlink("dir", outside), op.mkdir("real")]);
  assert.equal(await readlink(path.join(image, "dir")), outside);
  for (const ops of [
    [op.create("dir/new"), op.write("dir/new", "pwned")],
    [op.write("dir/secret", "pwned")],
    [op.truncate("dir/secret", 0)],
    [op.mkdir("dir/sub")],
    [op.symlink("dir/lnk", "/etc/passwd")],
    [op.remove("dir/secret")],
    [op.rename("dir/secret", "stolen")],
    [op.rename("real", "dir/real")],
    [op.link("dir/hard", "real")],
    [op.link("stolen", "dir/secret")],
    [op.attr("dir/secret", 0o777)],
  ]) {
    await assert.rejects(a.apply(ops), (e: unknown) => e instanceof PathError && /goes through symlink "dir"/.test((e as Error).message), JSON.stringify(ops.map((o) => [o.kind?.$case, o.path])));
  }
  await a.sync();
  assert.equal(await canary(outside), before, "the outside directory is untouched");
  assert.deepEqual((await readdir(image)).sort(), ["dir", "real"], "nothing of the refused batches in the image");
});

test("Applier: create over a symlink to an outside file replaces the link, never the file", async () => {
  const { image, outside } = await layout();
  const before = await canary(outside);
  const a = new Applier(image, { canChown: false });
  await a.apply([op.symlink("f", path.join(outside, "secret"))]);
  // Writing, truncating and chmod-ing the link itself never reach its target.
  await assert.rejects(a.apply([op.write("f", "pwned")]), (e: unknown) => e instanceof PathError && /symlink on the target/.test((e as Error).message));
  await assert.rejects(a.apply([op.truncate("f", 0)]), PathError);
  await a.apply([op.attr("f", 0o777)]);
  assert.ok((await lstat(path.join(image, "f"))).isSymbolicLink());
  assert.equal(await canary(outside), before);
  // create makes a new regular file in the image in place of the link.
  await a.apply([op.create("f"), op.write("f", "inside")]);
  await a.sync();
  const st = await lstat(path.join(image, "f"));
  assert.ok(st.isFile() && !st.isSymbolicLink(), "f is now a regular file");
  assert.equal(await readFile(path.join(image, "f"), "utf8"), "inside");
  assert.equal(await canary(outside), before, "the outside file is untouched");
  // And a hard link onto the (replaced) name still stays inside.
  await a.apply([op.symlink("g", path.join(outside, "secret")), op.link("h", "g")]);
  await a.apply([op.create("h"), op.write("h", "x")]);
  await a.sync();
  assert.equal(await canary(outside), before);
});

test("Applier: a hard link cannot turn an already-checked directory into a symlink out of the image", async () => {
  // BUG (found by this test): `link` replaces whatever is at its path without
  // invalidating ConfinedRoot's cache of checked directories. Replacing the
  // checked directory `d` by a hard link to the symlink `s` (link(2) does not
  // follow symlinks) leaves `d` cached as a real directory: d/pwned is then
  // opened through the symlink, outside the image.
  const { image, outside } = await layout();
  const before = await canary(outside);
  const a = new Applier(image, { canChown: false });
  await a.apply([op.symlink("s", outside), op.mkdir("d"), op.create("d/x")]);
  await a.apply([op.link("d", "s")]);
  await a.apply([op.create("d/pwned"), op.write("d/pwned", "pwned")]).catch((e: unknown) => assert.ok(e instanceof PathError, String(e)));
  await a.sync();
  assert.equal(await canary(outside), before, "nothing was created or changed outside the image");
});

test("Applier: a batch refused half-way leaves nothing of itself behind", async () => {
  // The preflight cannot see that `s` becomes a symlink within the batch; the
  // apply-time check refuses s/x, after the earlier ops were applied.
  const { image, outside } = await layout();
  const a = new Applier(image, { canChown: false });
  await assert.rejects(a.apply([op.create("fine"), op.symlink("s", outside), op.create("s/x")]), PathError);
  await a.sync();
  assert.deepEqual(await readdir(outside), ["secret"]);
  assert.deepEqual(await readdir(image), [], "a refused batch is refused whole");
});

test("Applier: a batch that replaces a symlink by a directory and fills it is applied", async () => {
  // A legitimate source sequence (rm link; mkdir link; create link/file) in one
  // batch: the preflight checks link/file against the tree *before* the batch,
  // where `link` is still a symlink.
  const { image, outside } = await layout();
  const a = new Applier(image, { canChown: false });
  await a.apply([op.symlink("link", outside)]);
  await a.apply([op.remove("link"), op.mkdir("link"), op.create("link/file"), op.write("link/file", "inside")]);
  await a.sync();
  assert.equal(await readFile(path.join(image, "link", "file"), "utf8"), "inside");
  assert.deepEqual(await readdir(outside), ["secret"]);
});
