// The applier on its own: special files (fifo, devices, socket) with their
// attributes and xattrs, without ever opening them; writes of zeros past the
// end of a file leave holes (sparse), zeros inside it are written.
import { test } from "node:test";
import assert from "node:assert/strict";
import { lstat, mkdtemp, readdir, readFile, rm, stat } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { getAttribute, listAttributes } from "@napi-rs/xattr";
import { Applier } from "../../agent/target/applier.ts";
import type { Attr, Op } from "../../agent/wire.ts";

const root = process.getuid?.() === 0;
const attr = (mode: number, x: Record<string, string> | undefined = undefined, uid = 0): Attr => ({ mode, uid, gid: uid, mtimeSec: 1_600_000_000, mtimeNsec: 123_456_000, xattrs: Object.entries(x ?? {}).map(([name, v]) => ({ name, value: Buffer.from(v) })), hasXattrs: x !== undefined });
const mknod = (p: string, type: string, major: number, minor: number, a: Attr): Op => ({ path: p, kind: { $case: "mknod", value: { type, major, minor, attr: a } } });

async function image(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "applier-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

test("special files are made with their attributes and xattrs, and replaced in place", { skip: !root && "devices need root" }, async (t) => {
  const dir = await image(t);
  const a = new Applier(dir, { canChown: true });
  await a.apply([
    mknod("d/fifo", "p", 0, 0, attr(0o640, { "trusted.k": "fifo" }, 7)),
    mknod("d/null", "c", 1, 3, attr(0o666)),
    mknod("d/loop", "b", 7, 9, attr(0o660)),
    mknod("d/" + "s".repeat(200), "s", 0, 0, attr(0o770, { "trusted.k": "sock" })),
  ]);
  const fifo = await lstat(path.join(dir, "d/fifo"));
  assert.ok(fifo.isFIFO());
  assert.equal(fifo.mode & 0o7777, 0o640);
  assert.equal(fifo.uid, 7);
  assert.equal((await lstat(path.join(dir, "d/fifo"), { bigint: true })).mtimeNs / 1000n, 1_600_000_000_123_456n, "mtime to the microsecond");
  assert.equal((await getAttribute(path.join(dir, "d/fifo"), "trusted.k"))?.toString(), "fifo");
  const nul = await lstat(path.join(dir, "d/null"), { bigint: true });
  assert.ok(nul.isCharacterDevice());
  assert.equal(nul.rdev, (1n << 8n) | 3n);
  const loop = await lstat(path.join(dir, "d/loop"), { bigint: true });
  assert.ok(loop.isBlockDevice());
  assert.equal(loop.rdev, (7n << 8n) | 9n);
  const sock = await lstat(path.join(dir, "d/" + "s".repeat(200)));
  assert.ok(sock.isSocket(), "a socket, even with a path longer than sun_path");
  assert.equal(sock.mode & 0o7777, 0o770);
  // Replayed, and another device number: made again; a write to it makes it a file (never opened).
  await a.apply([mknod("d/loop", "b", 7, 10, attr(0o600)), mknod("d/fifo", "p", 0, 0, attr(0o600, {}))]);
  assert.equal((await lstat(path.join(dir, "d/loop"), { bigint: true })).rdev, (7n << 8n) | 10n);
  assert.deepEqual(await listAttributes(path.join(dir, "d/fifo")), [], "xattrs not in the op are removed");
  await a.apply([{ path: "d/null", kind: { $case: "write", value: { offset: 0, data: Buffer.from("data") } } }]);
  await a.sync();
  assert.ok((await lstat(path.join(dir, "d/null"))).isFile());
  assert.equal(await readFile(path.join(dir, "d/null"), "utf8"), "data");
  await a.close();
});

test("zeros past the end of a file become holes; zeros inside it are written", async (t) => {
  const dir = await image(t);
  const a = new Applier(dir, { canChown: false });
  const MiB = 1024 * 1024;
  const data = Buffer.alloc(MiB);
  data.write("island", 300_000); // one non-zero page in a megabyte of zeros
  await a.apply([
    { path: "s.img", kind: { $case: "create", value: { attr: attr(0o644) } } },
    { path: "s.img", kind: { $case: "write", value: { offset: 0, data: Buffer.from("head") } } },
    { path: "s.img", kind: { $case: "write", value: { offset: 8 * MiB + 100, data } } },
    { path: "s.img", kind: { $case: "write", value: { offset: 20 * MiB, data: Buffer.alloc(MiB) } } },
  ]);
  await a.sync();
  const f = path.join(dir, "s.img");
  let st = await stat(f);
  assert.equal(st.size, 21 * MiB, "the length is set");
  assert.ok(st.blocks * 512 <= 32 * 1024, `only the pages with data are allocated (${st.blocks * 512} bytes)`);
  const b = await readFile(f);
  assert.equal(b.subarray(0, 4).toString(), "head");
  assert.equal(b.subarray(8 * MiB + 100 + 300_000, 8 * MiB + 100 + 300_006).toString(), "island");
  assert.equal(b.subarray(4, 8 * MiB + 100 + 300_000).every((x) => x === 0), true);
  // Zeros over existing data are data.
  await a.apply([{ path: "s.img", kind: { $case: "write", value: { offset: 0, data: Buffer.alloc(4) } } }]);
  await a.sync();
  assert.equal((await readFile(f)).subarray(0, 4).every((x) => x === 0), true);
  st = await stat(f);
  assert.equal(st.size, 21 * MiB);
  await a.close();
});

test("hostile mknod ops are refused before anything is made", async (t) => {
  const dir = await image(t);
  const a = new Applier(path.join(dir, "img"), { canChown: false });
  for (const op of [mknod("../escape", "p", 0, 0, attr(0o600)), mknod("/abs", "p", 0, 0, attr(0o600)), mknod("ok", "x", 0, 0, attr(0o600)), mknod("ok", "c", 2 ** 33, 0, attr(0o600))]) {
    await assert.rejects(a.apply([mknod("first", "p", 0, 0, attr(0o600)), op]), { code: "PATH_REFUSED" }, JSON.stringify(op));
  }
  assert.deepEqual(await readdir(dir), [], "nothing was made, not even the batch's first op");
});
