// The target is down while 1 GiB of changes pile up: the send queue spills to
// disk, the source agent's memory stays bounded, and when the target is back
// everything arrives.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomFillSync } from "node:crypto";
import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import { Pair, waitFor } from "./harness.ts";

const TOTAL = Number(process.env.SPILL_TEST_BYTES ?? 1024 * 1024 * 1024);
const FILE = 8 * 1024 * 1024;

test("target down while 1 GiB piles up: queue spills to disk, memory bounded, catch-up exact", { timeout: 600_000 }, async (t) => {
  const pair = await Pair.create({ setOptions: { queueMemory: "16MiB", compression: "none" } });
  t.after(() => pair.cleanup());
  await pair.start();
  await pair.target.stop();
  await mkdir(path.join(pair.src, "bulk"));
  const buf = Buffer.alloc(FILE);
  for (let i = 0; i < TOTAL / FILE; i++) {
    randomFillSync(buf);
    await writeFile(path.join(pair.src, "bulk", `f${i}.bin`), buf);
  }
  let peakRss = 0;
  const s = await waitFor("the whole workload to be journaled", async () => {
    peakRss = Math.max(peakRss, await pair.source.rssBytes());
    const st = await pair.source.status();
    const q = st.sets[0]!.targets[0]!.queuedBytes!;
    return q.memory + q.disk >= TOTAL ? st : undefined;
  }, 300_000, 500);
  const q = s.sets[0]!.targets[0]!.queuedBytes!;
  assert.ok(q.disk >= TOTAL - 32 * 1024 * 1024, `queue spilled to disk (memory ${q.memory}, disk ${q.disk})`);
  assert.ok(q.memory <= 16 * 1024 * 1024 + FILE, `in-memory queue stays within its budget (${q.memory})`);
  peakRss = Math.max(peakRss, await pair.source.rssBytes());
  // Bounded: far below what is queued (the 200 MB goal for 2 GiB queued is
  // measured by `npm run bench`, not asserted here: these machines are noisy).
  assert.ok(peakRss < 300 * 1024 * 1024, `source agent RSS stayed bounded with ${TOTAL >> 20} MiB queued (peak ${(peakRss / 1048576).toFixed(0)} MB)`);
  assert.notEqual(s.sets[0]!.targets[0]!.state, "idle");
  await pair.target.start();
  await pair.waitEqual("data", 300_000);
  await waitFor("queue drained", async () => {
    const st = await pair.source.status();
    const t0 = st.sets[0]!.targets[0]!;
    return t0.lastAckedSeq === st.sets[0]!.lastSeq;
  }, 60_000);
});
