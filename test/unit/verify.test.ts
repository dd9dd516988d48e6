// Verify against an in-process target: an unchanged tree compares equal by
// directory summaries alone (no listings fetched), and a difference of any
// kind anywhere (content in one block, mode, mtime, owner, xattr, symlink
// target, device number, type, extra or missing entry) is still reported,
// also by a target that predates summaries (Manifest only).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import { chmod, chown, mkdir, mkdtemp, open, rm, symlink, unlink, utimes, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import * as grpc from "@grpc/grpc-js";
import { createLogger } from "../../common/log.ts";
import { verifySet } from "../../agent/mirror/verify.ts";
import { Receiver } from "../../agent/target/receiver.ts";
import { ReplicationService, type ReplicationServer } from "../../agent/wire.ts";
import { summarize } from "../../agent/verify/summary.ts";

const BS = 4096;

async function serve(t: test.TestContext, root: string, withSummary: boolean): Promise<{ address: string; calls: Record<string, number> }> {
  const rx = new Receiver({ name: "t", root, stateDir: path.join(root, ".state"), syncIntervalMs: 1000, requireClientCert: false, log: createLogger("test", "error") });
  await rx.load();
  const calls: Record<string, number> = { manifest: 0, digests: 0, summary: 0 };
  const svc = rx.service;
  const counted = Object.fromEntries(
    Object.entries(svc)
      .filter(([k]) => withSummary || k !== "summary")
      .map(([k, fn]) => [k, (call: unknown, cb: unknown) => {
        calls[k] = (calls[k] ?? 0) + 1;
        (fn as (a: unknown, b: unknown) => void)(call, cb);
      }]),
  ) as unknown as ReplicationServer;
  const server = new grpc.Server();
  server.addService(ReplicationService, counted);
  const port = await new Promise<number>((res, rej) => server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
  t.after(() => server.forceShutdown());
  return { address: `127.0.0.1:${port}`, calls };
}

/** A source tree with a bit of everything, nested. */
async function makeSource(src: string): Promise<void> {
  await mkdir(path.join(src, "a/b/c"), { recursive: true });
  await mkdir(path.join(src, "e"), { recursive: true });
  const big = Buffer.alloc(100 * BS + 123);
  for (let i = 0; i < big.length; i++) big[i] = (i * 7919) & 0xff;
  await writeFile(path.join(src, "a/b/c/big.bin"), big);
  await writeFile(path.join(src, "a/b/small.txt"), "hello\n".repeat(1000));
  await writeFile(path.join(src, "a/empty"), "");
  await writeFile(path.join(src, "top.txt"), "top");
  for (let i = 0; i < 30; i++) await writeFile(path.join(src, "e", `f${i}`), `file ${i}\n`.repeat(i * 50));
  await symlink("../top.txt", path.join(src, "a/link"));
  execFileSync("mkfifo", [path.join(src, "a/fifo")]);
}

const xattrs = (() => {
  try {
    return createRequire(import.meta.url)("@napi-rs/xattr") as { setAttribute(p: string, n: string, v: Buffer): Promise<void> };
  } catch {
    return undefined;
  }
})();

async function setup(t: test.TestContext, withSummary = true) {
  const base = await mkdtemp(path.join(os.tmpdir(), "verify-"));
  t.after(() => rm(base, { recursive: true, force: true }));
  const src = path.join(base, "src");
  const root = path.join(base, "images");
  const img = path.join(root, "s", "data");
  await mkdir(src);
  await makeSource(src);
  await mkdir(path.dirname(img), { recursive: true });
  execFileSync("cp", ["-a", src, img]);
  const target = await serve(t, root, withSummary);
  const run = () => verifySet({ set: "data", target: target.address, source: "s", root: src, blockSize: BS, wanted: () => true, credentials: grpc.credentials.createInsecure(), caughtUp: async () => {} });
  return { src, img, run, calls: target.calls };
}

/** Give img's `rels` the source's times again (to the nanosecond), so only the intended difference remains. */
function sameTimes(src: string, img: string, rels: string[]): void {
  for (const rel of rels) execFileSync("touch", ["-h", "-r", path.join(src, rel), path.join(img, rel)]);
}

test("verify: an unchanged tree compares equal by summaries alone", async (t) => {
  const { run, calls } = await setup(t);
  const r = await run();
  assert.equal(r.error, "");
  assert.deepEqual(r.differences, []);
  assert.equal(r.ok, true);
  assert.equal(r.filesCompared, 34);
  assert.equal(calls.manifest, 0, "no listing is fetched when the summaries agree");
  assert.equal(calls.digests, 0);
  assert.ok(calls.summary! >= 5);
});

test("verify: an unchanged tree compares equal against a target without summaries", async (t) => {
  const { run, calls } = await setup(t, false);
  const r = await run();
  assert.equal(r.error, "");
  assert.deepEqual(r.differences, []);
  assert.equal(r.filesCompared, 34);
  assert.ok(calls.manifest! >= 5);
});

type Case = [name: string, kind: string, rel: string, change: (img: string) => Promise<void>, detail?: RegExp, touch?: string[]];
const cases: Case[] = [
  ["content in one block of a large file", "content", "a/b/c/big.bin", async (img) => {
    const p = path.join(img, "a/b/c/big.bin");
    const fh = await open(p, "r+");
    await fh.write(Buffer.from([1]), 0, 1, 57 * BS + 11);
    await fh.close();
  }, /^1 block\(s\) of 4096 bytes differ$/, ["a/b/c/big.bin"]],
  ["content of a small file", "content", "a/b/small.txt", async (img) => {
    const p = path.join(img, "a/b/small.txt");
    const fh = await open(p, "r+");
    await fh.write(Buffer.from("J"), 0, 1, 0);
    await fh.close();
  }, /1 block/, ["a/b/small.txt"]],
  ["size", "content", "e/f3", (img) => writeFile(path.join(img, "e/f3"), "other"), /size/, ["e/f3"]],
  ["mode", "mode", "e/f7", (img) => chmod(path.join(img, "e/f7"), 0o600)],
  ["mtime", "mtime", "a/b/c", (img) => utimes(path.join(img, "a/b/c"), 1000, 1000)],
  ["owner", "owner", "e/f9", (img) => chown(path.join(img, "e/f9"), 4242, 4243)],
  ["symlink target", "link", "a/link", async (img) => {
    const p = path.join(img, "a/link");
    await unlink(p);
    await symlink("../elsewhere", p);
  }, undefined, ["a", "a/link"]],
  ["special file type", "type", "a/fifo", async (img) => {
    const p = path.join(img, "a/fifo");
    await unlink(p);
    await writeFile(p, "");
  }, undefined, ["a"]],
  ["extra file deep down", "extra", "a/b/c/extra", (img) => writeFile(path.join(img, "a/b/c/extra"), "x"), undefined, ["a/b/c"]],
  ["missing file", "missing", "e/f20", (img) => unlink(path.join(img, "e/f20")), undefined, ["e"]],
];
if (xattrs) cases.push(["xattr", "xattr", "top.txt", (img) => xattrs.setAttribute(path.join(img, "top.txt"), "user.understudy-test", Buffer.from("v"))]);

for (const withSummary of [true, false]) {
  for (const [name, kind, rel, change, detail, touch] of cases) {
    test(`verify${withSummary ? "" : " (target without summaries)"} reports a difference: ${name}`, async (t) => {
      const { src, img, run } = await setup(t, withSummary);
      try {
        await change(img);
        sameTimes(src, img, touch ?? []);
      } catch (e) {
        if (name === "xattr") return t.skip(`xattrs not supported here: ${(e as Error).message}`);
        throw e;
      }
      const r = await run();
      assert.equal(r.error, "");
      assert.equal(r.ok, false);
      assert.deepEqual(r.differences.map((d) => `${d.kind} ${d.path}`), [`${kind} ${rel}`], JSON.stringify(r.differences));
      if (detail) assert.match(r.differences[0]!.detail, detail);
    });
  }
}

test("verify: a device node's number is compared", async (t) => {
  const { src, img, run } = await setup(t);
  try {
    execFileSync("mknod", [path.join(src, "e/dev"), "c", "1", "3"], { stdio: "ignore" });
    execFileSync("mknod", [path.join(img, "e/dev"), "c", "1", "5"], { stdio: "ignore" });
  } catch {
    return t.skip("mknod not permitted here");
  }
  sameTimes(src, img, ["e", "e/dev"]);
  const r = await run();
  assert.deepEqual(r.differences.map((d) => `${d.kind} ${d.path}`), ["rdev e/dev"]);
});

test("summary: equal entries give equal summaries regardless of order, and every compared field changes it", () => {
  const attr = { mode: 0o644, uid: 1, gid: 2, mtimeSec: 100, mtimeNsec: 5000, xattrs: [{ name: "user.a", value: Buffer.from("1") }], hasXattrs: true };
  const e = { name: "f", type: "f", attr, size: 3, link: "", rdev: "", digests: Buffer.alloc(16, 1) };
  const l = { name: "l", type: "l", attr: { ...attr, mode: 0o777 }, size: 0, link: "x", rdev: "", digests: undefined };
  const base = summarize([e, l], BS, "source");
  assert.ok(base.equals(summarize([l, e], BS, "target")));
  assert.ok(base.equals(summarize([e, { ...l, attr: { ...l.attr, mode: 0o755 } }], BS, "target")), "a symlink's mode is not compared");
  assert.ok(base.equals(summarize([{ ...e, attr: { ...attr, mtimeNsec: 5999 } }, l], BS, "target")), "mtimes are compared to the microsecond");
  const variants = [
    { ...e, name: "g" },
    { ...e, size: 4 },
    { ...e, digests: Buffer.alloc(16, 2) },
    { ...e, digests: undefined },
    { ...e, attr: { ...attr, mode: 0o600 } },
    { ...e, attr: { ...attr, uid: 9 } },
    { ...e, attr: { ...attr, gid: 9 } },
    { ...e, attr: { ...attr, mtimeNsec: 6000 } },
    { ...e, attr: { ...attr, xattrs: [] } },
    { ...e, attr: { ...attr, xattrs: [{ name: "user.a", value: Buffer.from("2") }] } },
    { ...e, attr: { ...attr, hasXattrs: false } },
    { ...e, type: "p" },
  ];
  for (const v of variants) assert.ok(!base.equals(summarize([v, l], BS, "target")), JSON.stringify(v));
  assert.ok(!base.equals(summarize([e, { ...l, link: "y" }], BS, "target")));
  assert.ok(!base.equals(summarize([e], BS, "target")));
  assert.ok(!summarize([{ ...e, digests: undefined }], BS, "source").equals(summarize([{ ...e, digests: undefined }], BS, "target")), "a file one side could not read never compares equal");
  const dev = { name: "d", type: "c", attr, size: 0, link: "", rdev: "1,3" };
  assert.ok(!summarize([dev], BS, "source").equals(summarize([{ ...dev, rdev: "1,5" }], BS, "target")));
});
