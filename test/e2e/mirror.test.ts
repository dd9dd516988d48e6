// Mirror, verify and resync with real agent processes: verify finds exactly
// the corruption on a target and --repair fixes exactly that; a checksum
// mirror sends only differing blocks; a new target is mirrored while writes
// go on; a mirror cut by kill -9 resumes instead of starting over; a source
// whose journal was lost resynchronises with a checksum mirror by itself.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { chmod, mkdir, open, rm, stat, symlink, truncate, unlink, utimes, writeFile } from "node:fs/promises";
import path from "node:path";
import { cli, Pair, waitFor } from "./harness.ts";
import { Workload } from "./workload.ts";
import type { StatusResponse } from "../../agent/wire.ts";
import { timeArg } from "../../agent/target/applier.ts";


const mirrorOf = (s: StatusResponse) => s.sets[0]!.targets[0]!.mirror!;

/** The target's mirror once it reports done (equality can be reached just before the final acknowledgement). */
async function mirrorDone(pair: Pair) {
  return waitFor("the mirror to report done", async () => {
    const m = mirrorOf(await pair.source.status());
    return m.result === "ok" && !m.active ? m : undefined;
  });
}

async function fillTree(root: string, dirs: number, filesPerDir: number, size: () => number): Promise<number> {
  let total = 0;
  for (let d = 0; d < dirs; d++) {
    await mkdir(path.join(root, `dir${d}`), { recursive: true });
    for (let f = 0; f < filesPerDir; f++) {
      const n = size();
      total += n;
      await writeFile(path.join(root, `dir${d}`, `file${f}.bin`), randomBytes(n));
    }
  }
  return total;
}

test("verify reports exactly the corruption; --repair and a checksum mirror fix it", async (t) => {
  const pair = await Pair.create();
  t.after(() => pair.cleanup());
  await mkdir(path.join(pair.src, "dir"));
  await writeFile(path.join(pair.src, "big.bin"), randomBytes(3 * 1024 * 1024));
  await writeFile(path.join(pair.src, "small.txt"), "small file\n".repeat(100));
  await writeFile(path.join(pair.src, "gone.txt"), "to be deleted on the target\n");
  await writeFile(path.join(pair.src, "dir", "f.txt"), "mode changes\n");
  await symlink("dir/f.txt", path.join(pair.src, "lnk"));
  await pair.start();
  await pair.waitEqual();
  // The initial mirror done too: a target stopped before its last acknowledgement
  // resumes the mirror when it comes back, which would repair the corruption below.
  await mirrorDone(pair);
  await pair.target.stop();
  const img = pair.image();
  // Corrupt the image behind the agents' back.
  const big = path.join(img, "big.bin");
  const before = await stat(big, { bigint: true });
  const fh = await open(big, "r+");
  await fh.write(Buffer.from([0xff ^ 0x5a]), 0, 1, 1_500_000);
  await fh.close();
  const t0 = timeArg(Number(before.mtimeNs / 1_000_000_000n), Number(before.mtimeNs % 1_000_000_000n));
  await utimes(big, t0, t0); // same size and mtime: only content tells
  await truncate(path.join(img, "small.txt"), 10);
  await unlink(path.join(img, "gone.txt"));
  await writeFile(path.join(img, "extra.txt"), "not on the source\n");
  await chmod(path.join(img, "dir", "f.txt"), 0o600);
  await unlink(path.join(img, "lnk"));
  await symlink("elsewhere", path.join(img, "lnk"));
  await pair.target.start();

  const v = await cli(["verify", "--agent", pair.source.address, "--set", "data", "--json"]);
  assert.equal(v.code, 1, `verify exits 1 when it finds differences: ${v.stderr}`);
  const report = JSON.parse(v.stdout);
  const found = new Set(report.differences.map((d: { path: string; kind: string }) => `${d.path}:${d.kind}`));
  const expected = ["big.bin:content", "small.txt:content", "small.txt:mtime", "gone.txt:missing", "extra.txt:extra", "dir/f.txt:mode", "lnk:link", "lnk:mtime"];
  assert.deepEqual([...found].sort(), expected.sort(), "exactly the corruption, nothing else");
  assert.match(report.differences.find((d: { path: string }) => d.path === "big.bin").detail, /1 block\(s\)/);

  const r = await cli(["verify", "--agent", pair.source.address, "--set", "data", "--repair"]);
  assert.equal(r.code, 0, `repair succeeds: ${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /repaired 6 path\(s\)/);
  await pair.waitEqual();
  const again = await cli(["verify", "--agent", pair.source.address, "--set", "data"]);
  assert.equal(again.code, 0);
  assert.match(again.stdout, /identical/);

  // A checksum mirror sends only the block that differs.
  await pair.target.stop();
  const fh2 = await open(big, "r+");
  await fh2.write(Buffer.from("corrupt"), 0, 7, 2_000_000);
  await fh2.close();
  await pair.target.start();
  const m = await cli(["mirror", "--agent", pair.source.address, "--set", "data", "--mode", "checksum"]);
  assert.equal(m.code, 0, `mirror succeeds: ${m.stdout}${m.stderr}`);
  await pair.waitEqual();
  const st = mirrorOf(await pair.source.status());
  assert.equal(st.result, "ok");
  assert.ok(st.bytesSent <= 64 * 1024, `checksum mirror sent one block, not the file (${st.bytesSent} bytes)`);
  assert.ok(st.bytesDone >= 3 * 1024 * 1024, "and compared everything");
});

test("a new target is mirrored while writes go on, and ends identical", async (t) => {
  const pair = await Pair.create();
  t.after(() => pair.cleanup());
  await fillTree(pair.src, 30, 50, () => 1024 + Math.floor(Math.random() * 40_000));
  await pair.start();
  const w = new Workload(pair.src, 31337);
  await w.run(250);
  await pair.waitEqual("data", 120_000);
  const s = await waitFor("the mirror to report done", async () => {
    const st = await pair.source.status();
    return mirrorOf(st).result === "ok" ? st : undefined;
  });
  assert.ok(mirrorOf(s).filesTotal >= 1000, `the initial mirror covered the pre-existing tree: ${JSON.stringify(mirrorOf(s))}`);
  const v = await cli(["verify", "--agent", pair.source.address, "--set", "data"]);
  assert.equal(v.code, 0, v.stdout);
});

test("kill -9 in the middle of a mirror: it resumes and does not start over", async (t) => {
  const pair = await Pair.create({ setOptions: { compression: "none" } });
  t.after(() => pair.cleanup());
  const total = await fillTree(pair.src, 40, 10, () => 512 * 1024);
  await pair.start();
  const mid = await waitFor("the mirror to be under way", async () => {
    const m = mirrorOf(await pair.source.status());
    return m.active && m.bytesDone > total * 0.2 ? m : undefined;
  }, 60_000, 10);
  await pair.source.kill9();
  assert.ok(mid.bytesDone < total, "killed before the end");
  await pair.source.start();
  await pair.waitEqual("data", 120_000);
  const m = await mirrorDone(pair);
  assert.equal(m.resumed, true, "the mirror resumed from where the target got to");
  assert.ok(m.bytesSent < total * 0.9, `after the restart it sent ${m.bytesSent} of ${total} bytes`);
});

test("a source whose journal was lost resynchronises with a checksum mirror by itself", async (t) => {
  const pair = await Pair.create();
  t.after(() => pair.cleanup());
  const total = await fillTree(pair.src, 5, 20, () => 100_000);
  await pair.start();
  await pair.waitEqual();
  await pair.source.stop();
  await rm(path.join(pair.dir, "state-src", "sets", "data", "journal"), { recursive: true });
  await writeFile(path.join(pair.src, "dir0", "new.txt"), "written while the agent was down\n");
  await pair.source.start();
  await pair.waitEqual();
  const m = await mirrorDone(pair);
  assert.ok(m.bytesSent < total / 10, `only what differed was sent (${m.bytesSent} of ${total} bytes)`);
});

test("sparse files stay sparse on the target", async (t) => {
  const pair = await Pair.create();
  t.after(() => pair.cleanup());
  const f = path.join(pair.src, "sparse.img");
  await writeFile(f, "");
  await truncate(f, 256 * 1024 * 1024);
  const fh = await open(f, "r+");
  await fh.write(Buffer.from("header"), 0, 6, 0);
  await fh.write(Buffer.from("trailer"), 0, 7, 200 * 1024 * 1024);
  await fh.close();
  await pair.start(); // the new image is mirrored
  await pair.waitEqual();
  await writeFile(path.join(pair.src, "later.img"), "");
  await truncate(path.join(pair.src, "later.img"), 64 * 1024 * 1024); // replicated by capture
  await pair.waitEqual();
  for (const name of ["sparse.img", "later.img"]) {
    const st = await stat(path.join(pair.image(), name));
    assert.ok(st.blocks * 512 < 1024 * 1024, `${name}: ${st.size} bytes long, ${st.blocks * 512} allocated`);
  }
});

test("a target that refuses packets again and again is resynchronised by a checksum mirror", async (t) => {
  const pair = await Pair.create();
  t.after(() => pair.cleanup());
  await mkdir(path.join(pair.src, "d"));
  await writeFile(path.join(pair.src, "d", "a.txt"), "a\n");
  await pair.start();
  await pair.waitEqual();
  // Someone replaced a directory on the target by a symlink: every packet for a
  // path below it is refused (never followed), so replication cannot go on.
  await pair.target.stop();
  await rm(path.join(pair.image(), "d"), { recursive: true });
  await mkdir(path.join(pair.image(), "elsewhere"));
  await symlink("elsewhere", path.join(pair.image(), "d"));
  await pair.target.start();
  await writeFile(path.join(pair.src, "d", "b.txt"), "b\n");
  await pair.waitEqual();
  await mirrorDone(pair);
  const s = await pair.source.status();
  assert.ok(s.sets[0]!.targets[0]!.retries >= 3, "it was refused a few times first");
});

test("scheduled verify finds a difference and repairs it when asked to", async (t) => {
  const pair = await Pair.create({ setOptions: { verifyInterval: "1s", verifyRepair: true } });
  t.after(() => pair.cleanup());
  await writeFile(path.join(pair.src, "f.txt"), "original\n");
  await pair.start();
  await pair.waitEqual();
  await writeFile(path.join(pair.image(), "f.txt"), "tampered\n");
  const v = await waitFor("a scheduled verify to find and repair the tampering", async () => {
    const lv = (await pair.source.status()).sets[0]!.targets[0]!.lastVerify;
    return lv && lv.differences.length > 0 && lv.repaired > 0 ? lv : undefined;
  }, 30_000, 200);
  assert.equal(v.differences[0]!.path, "f.txt");
  await pair.waitEqual();
});

test("verify during a live workload reports no false differences", async (t) => {
  const pair = await Pair.create();
  t.after(() => pair.cleanup());
  await fillTree(pair.src, 10, 30, () => 20_000);
  await pair.start();
  await pair.waitEqual();
  const w = new Workload(pair.src, 4711);
  let writing = true;
  const writer = (async () => {
    while (writing) await w.step();
  })();
  try {
    for (let i = 0; i < 3; i++) {
      const v = await cli(["verify", "--agent", pair.source.address, "--set", "data", "--json"]);
      const r = JSON.parse(v.stdout);
      assert.deepEqual(r.differences, [], "no differences while the workload runs");
      assert.equal(v.code, 0);
    }
  } finally {
    writing = false;
    await writer;
  }
  await pair.waitEqual();
});
