// The applier in its worker thread applies what the in-process one does, in
// order, hands back a refused path as a PathError (the receiver refuses the
// packet for good on it) and other failures as errors with their code.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, stat, symlink } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { ApplierThread } from "../../agent/target/apply-thread.ts";
import { PathError } from "../../agent/fs/confine.ts";
import type { Op } from "../../agent/wire.ts";

test("ApplierThread: batches applied in order with their data; a refused path is a PathError; sync and close", async (t) => {
  const img = await mkdtemp(path.join(os.tmpdir(), "apply-thread-"));
  t.after(() => rm(img, { recursive: true, force: true }));
  const a = new ApplierThread(img);
  try {
    // Write data as views into one larger buffer (as decoded ops are): only the views' bytes count.
    const under = Buffer.from("xxxxhello, worldyyyy second");
    const ops: Op[] = [
      { path: "d", kind: { $case: "mkdir", value: { attr: undefined } } },
      { path: "d/f", kind: { $case: "create", value: { attr: undefined } } },
      { path: "d/f", kind: { $case: "write", value: { offset: 0, data: under.subarray(4, 16) } } },
      { path: "d/f", kind: { $case: "write", value: { offset: 12, data: under.subarray(20) } } },
    ];
    const attr = { mode: 0o750, uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, mtimeSec: 1_700_000_000, mtimeNsec: 0, xattrs: [], hasXattrs: false };
    const pending = [a.applyConcurrently(ops), a.apply([{ path: "d/f", kind: { $case: "truncate", value: { size: 5 } } }, { path: "d", kind: { $case: "attr", value: { attr } } }])];
    await Promise.all(pending);
    assert.equal(await readFile(path.join(img, "d/f"), "utf8"), "hello", "the truncate came after the writes");
    const st = await stat(path.join(img, "d"));
    assert.equal(Math.round(st.mtimeMs), 1_700_000_000_000);
    assert.equal(st.mode & 0o7777, 0o750);
    await symlink("/etc", path.join(img, "out"));
    await assert.rejects(a.apply([{ path: "out/passwd", kind: { $case: "create", value: { attr: undefined } } }]), (e: unknown) => e instanceof PathError && /symlink/.test((e as Error).message));
    await assert.rejects(a.apply([{ path: "d/f/under-a-file", kind: { $case: "create", value: { attr: undefined } } }]), (e: unknown) => e instanceof PathError);
    await a.apply([{ path: "d/g", kind: { $case: "write", value: { offset: 0, data: Buffer.from("after a refusal, still applying") } } }]);
    // Xattrs (views into a larger buffer too) arrive with their values.
    const xv = Buffer.from("..value..");
    await a.apply([{ path: "d/g", kind: { $case: "attr", value: { attr: { ...attr, mode: 0o640, xattrs: [{ name: "user.test", value: xv.subarray(2, 7) }], hasXattrs: true } } } }]);
    await a.sync();
    assert.equal(await readFile(path.join(img, "d/g"), "utf8"), "after a refusal, still applying");
    assert.equal((await stat(path.join(img, "d/g"))).mode & 0o7777, 0o640);
    const { getAttributeSync } = (await import("@napi-rs/xattr")) as unknown as { getAttributeSync(p: string, n: string): Buffer | null };
    assert.equal(getAttributeSync(path.join(img, "d/g"), "user.test")?.toString(), "value");
  } finally {
    await a.close();
  }
  await assert.rejects(a.apply([]), /closed/);
});
