// Faults on the target: a full disk makes applying fail; the source keeps the
// changes, marks the target and the set degraded with the error, retries with
// backoff, and recovers by itself once there is room again.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, writeFile } from "node:fs/promises";
import { Pair, waitFor } from "./harness.ts";
import path from "node:path";

// Needs root (mounts a tmpfs), as CI runs.
test("target disk full: degraded with the error, then recovers by itself when space is freed", async (t) => {
  const pair = await Pair.create({ setOptions: { compression: "none" } });
  await mkdir(pair.dstRoot, { recursive: true });
  execFileSync("mount", ["-t", "tmpfs", "-o", "size=2m", "understudy-test", pair.dstRoot]);
  t.after(async () => {
    await pair.stop();
    execFileSync("umount", ["-l", pair.dstRoot]);
    await pair.cleanup();
  });
  await pair.start();
  await writeFile(path.join(pair.src, "small.txt"), "fits\n");
  await pair.waitEqual();
  await writeFile(path.join(pair.src, "big.bin"), randomBytes(4 * 1024 * 1024));
  const st = await waitFor("the set to go degraded", async () => {
    const s = await pair.source.status();
    return s.sets[0]!.state === "degraded" ? s : undefined;
  }, 30_000);
  const tgt = st.sets[0]!.targets[0]!;
  assert.equal(tgt.state, "degraded");
  assert.match(tgt.lastError, /ENOSPC|no space/i, "the error says the disk is full");
  assert.ok(tgt.lastAckedSeq < st.sets[0]!.lastSeq, "the failed change is still queued");
  execFileSync("mount", ["-o", "remount,size=16m", pair.dstRoot]);
  await pair.waitEqual();
  await waitFor("the target to be healthy again", async () => {
    const s = await pair.source.status();
    return s.sets[0]!.state === "replicating" && s.sets[0]!.targets[0]!.state === "idle";
  }, 30_000);
});
