// kill -9 of either agent at random moments during a workload: after
// restarts the target must equal the source, and a source restarted with its
// journal intact must not re-send the whole tree.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Pair, waitFor } from "./harness.ts";
import { Workload, rng } from "./workload.ts";

test("kill -9 of source and target during a workload loses nothing", async (t) => {
  const pair = await Pair.create();
  t.after(() => pair.cleanup());
  await pair.start();
  const w = new Workload(pair.src, 777);
  await w.run(50);
  const r = rng(4242);
  let writing = true;
  const writer = (async () => {
    while (writing) await w.step();
  })();
  try {
    for (let round = 0; round < 6; round++) {
      await new Promise((res) => setTimeout(res, 200 + r() * 800));
      const victim = round % 2 === 0 ? pair.source : pair.target;
      await victim.kill9();
      await new Promise((res) => setTimeout(res, r() * 500));
      await victim.start();
    }
  } finally {
    writing = false;
    await writer;
  }
  await pair.waitEqual();
  assert.ok(Object.keys(w.stats).length > 8, "the workload mixed many kinds of operations");
});

test("a source restarted with its journal intact sends only what changed, not everything", async (t) => {
  const pair = await Pair.create();
  t.after(() => pair.cleanup());
  await pair.start();
  const w = new Workload(pair.src, 99);
  await w.run(300);
  await pair.waitEqual();
  const before = await pair.source.status();
  const treeBytes = before.sets[0]!.bytes;
  assert.ok(treeBytes > 1_000_000, `tree is big enough to tell (${treeBytes} bytes)`);
  await pair.source.kill9();
  await w.run(5);
  await pair.source.start();
  await pair.waitEqual();
  const after = await waitFor("source to finish its start-up scan", async () => {
    const s = await pair.source.status();
    return s.sets[0]!.state === "replicating" ? s : undefined;
  });
  const resent = after.sets[0]!.capturedDataBytes;
  assert.ok(resent < treeBytes / 4, `after restart only changes were captured: ${resent} of ${treeBytes} bytes`);
});
