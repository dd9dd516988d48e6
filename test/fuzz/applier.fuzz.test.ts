// Fuzzing the target's applier (agent/target/applier.ts) with generated op
// batches full of hostile paths, symlink and hard-link games, huge offsets and
// sizes, odd modes, owners, xattrs and device numbers. Each case starts from
// a small image holding symlinks out of it (relative and absolute), next to a
// canary directory. A case may be applied or refused (PathError, or an errno
// error from the file system); it must never throw anything else, and
// nothing outside the image may change.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readdir, rm, symlink, writeFile, link } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import fc from "fast-check";
import { Applier, PathError } from "../../agent/target/applier.ts";
import type { Op } from "../../agent/wire.ts";
import { compareTrees, snapshotTree } from "../e2e/harness.ts";
import { params } from "./fuzz.ts";

const base = await mkdtemp(path.join(os.tmpdir(), "fuzz-applier-"));
const outside = path.join(base, "outside");
await mkdir(path.join(outside, "sub"), { recursive: true });
await writeFile(path.join(outside, "secret"), "the secret\n", { mode: 0o640 });
await link(path.join(outside, "secret"), path.join(outside, "secret-link"));
const outsideBefore = await snapshotTree(outside);
let n = 0;

/** Names the generated ops use: what the image holds, and the ways out of it. */
const comp = fc.oneof(
  { weight: 8, arbitrary: fc.constantFrom("a", "b", "f", "g", "rel", "abs", "hl", "d", "new") },
  { weight: 2, arbitrary: fc.constantFrom("..", ".", "", "a\u0000", "x".repeat(256)) },
);
const relPath = fc.oneof(
  { weight: 10, arbitrary: fc.array(comp, { minLength: 1, maxLength: 3 }).map((c) => c.join("/")) },
  { weight: 1, arbitrary: fc.constantFrom(outside, path.join(outside, "secret"), "/", "", "../outside/secret", "../../outside", "rel/secret", "abs/secret", "abs/sub/x") },
);
const linkTarget = fc.oneof(relPath, fc.constantFrom(outside, "../outside", "../../outside/secret", "/etc/passwd", "rel", "a\u0000"));
const u32 = fc.nat({ max: 0xffffffff });
const attr = fc.record({
  mode: fc.oneof(fc.constantFrom(0o644, 0o755, 0o4755, 0o1777, 0o000, 0o7777), u32),
  uid: fc.oneof(fc.constant(0), fc.nat({ max: 70_000 }), u32),
  gid: fc.oneof(fc.constant(0), fc.nat({ max: 70_000 }), u32),
  mtimeSec: fc.oneof(fc.integer({ min: 0, max: 2 ** 33 }), fc.integer({ min: -(2 ** 40), max: 2 ** 40 })),
  mtimeNsec: fc.oneof(fc.nat({ max: 999_999_999 }), u32),
  xattrs: fc.array(fc.record({ name: fc.constantFrom("user.k", "trusted.k", "security.capability", "system.posix_acl_access", "", "user.", "bogus"), value: fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)) }), { maxLength: 2 }),
  hasXattrs: fc.boolean(),
});
const offset = fc.oneof({ weight: 6, arbitrary: fc.nat({ max: 70_000 }) }, { weight: 1, arbitrary: fc.constantFrom(2 ** 31, 2 ** 40, 2 ** 53 - 1) });
const op: fc.Arbitrary<Op> = fc.record({
  path: relPath,
  kind: fc.oneof(
    fc.record({ $case: fc.constant("mkdir" as const), value: fc.record({ attr: fc.option(attr, { nil: undefined }) }) }),
    fc.record({ $case: fc.constant("create" as const), value: fc.record({ attr: fc.option(attr, { nil: undefined }) }) }),
    fc.record({ $case: fc.constant("write" as const), value: fc.record({ offset, data: fc.uint8Array({ minLength: 1, maxLength: 100 }).map((b) => Buffer.from(b)) }) }),
    fc.record({ $case: fc.constant("truncate" as const), value: fc.record({ size: offset }) }),
    fc.record({ $case: fc.constant("symlink" as const), value: fc.record({ target: linkTarget, attr: fc.option(attr, { nil: undefined }) }) }),
    fc.record({ $case: fc.constant("link" as const), value: fc.record({ existing: relPath }) }),
    fc.record({ $case: fc.constant("remove" as const), value: fc.record({ directory: fc.boolean() }) }),
    fc.record({ $case: fc.constant("rename" as const), value: fc.record({ to: relPath }) }),
    fc.record({ $case: fc.constant("attr" as const), value: fc.record({ attr: fc.option(attr, { nil: undefined }) }) }),
    // fifos and sockets, and devices with small numbers (1,3 is /dev/null): made inside the image only
    fc.record({ $case: fc.constant("mknod" as const), value: fc.record({ type: fc.constantFrom("p", "s", "c", "x", ""), major: fc.constantFrom(1, 0, 2 ** 31), minor: fc.constantFrom(3, 5, 2 ** 31), attr: fc.option(attr, { nil: undefined }) }) }),
  ),
}) as fc.Arbitrary<Op>;

/** A fresh image: files, a directory, symlinks out of it (relative and absolute), a hard link. */
async function freshImage(): Promise<string> {
  const root = path.join(base, `img${++n}`);
  await mkdir(path.join(root, "d"), { recursive: true });
  await writeFile(path.join(root, "f"), "f");
  await link(path.join(root, "f"), path.join(root, "hl"));
  await symlink(`../outside`, path.join(root, "rel"));
  await symlink(outside, path.join(root, "abs"));
  await symlink(path.join(outside, "secret"), path.join(root, "g"));
  return root;
}

/** Refusals and file system errors are fine; anything else is a crash. */
function acceptable(e: unknown): boolean {
  if (e instanceof PathError) return true;
  const code = (e as NodeJS.ErrnoException)?.code;
  return typeof code === "string" && /^E[A-Z0-9]+$/.test(code);
}

test("fuzz: hostile op batches never escape the image nor crash the applier", { timeout: 1_800_000 }, async (t) => {
  t.after(() => rm(base, { recursive: true, force: true }));
  // (the images themselves are not walked: a write at offset 2^40 makes a terabyte, sparse, to hash)
  const siblings = async () => (await readdir(base)).filter((x) => !/^img\d+$/.test(x)).sort();
  const around = await siblings();
  await fc.assert(
    fc.asyncProperty(fc.array(fc.array(op, { minLength: 1, maxLength: 5 }), { minLength: 1, maxLength: 3 }), fc.boolean(), async (packets, concurrently) => {
      const root = await freshImage();
      const a = new Applier(root);
      try {
        for (const ops of packets) {
          try {
            if (concurrently) await a.applyConcurrently(ops);
            else await a.apply(ops);
          } catch (e) {
            assert.ok(acceptable(e), `the applier crashed: ${(e as Error)?.stack ?? String(e)}`);
          }
        }
        await a.sync().catch((e: unknown) => assert.ok(acceptable(e), `sync crashed: ${String(e)}`));
      } finally {
        await a.close().catch(() => undefined);
      }
      assert.deepEqual(compareTrees(outsideBefore, await snapshotTree(outside)), [], "something outside the image changed");
      assert.deepEqual(compareTrees(await snapshotTree(outside), outsideBefore), [], "something was made outside the image");
      assert.deepEqual(await siblings(), around, "something was made next to the image");
      await rm(root, { recursive: true, force: true });
    }),
    params(150),
  );
});
