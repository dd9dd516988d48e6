// Topologies: one source to several targets (independent cursors: one target
// down does not hold back the other), many sources into one target (one image
// each), and options that change how packets travel (compression, bandwidth
// limit, scheduled mode).
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { AgentProc, compareTrees, freePort, snapshotTree, tmpDir, waitFor } from "./harness.ts";
import { Workload } from "./workload.ts";
import { rm } from "node:fs/promises";

async function agent(dir: string, name: string, cfg: Record<string, unknown>): Promise<AgentProc> {
  const port = await freePort();
  const file = path.join(dir, `${name}.yaml`);
  await writeFile(file, YAML.stringify({ name, listen: `127.0.0.1:${port}`, dataDir: `state-${name}`, tls: { insecure: true }, ...cfg }));
  return new AgentProc(name, file, port, path.join(dir, `${name}.log`));
}

async function waitSame(a: string, b: string, timeoutMs = 60_000): Promise<void> {
  let diff: string[] = [];
  await waitFor(`${b} to equal ${a}`, async () => {
    diff = compareTrees(await snapshotTree(a), await snapshotTree(b));
    return diff.length === 0;
  }, timeoutMs, 250).catch((e) => {
    throw new Error(`${(e as Error).message}\n  ${diff.slice(0, 10).join("\n  ")}`);
  });
}

test("one source, two targets: each keeps its own cursor; a down target catches up later", async (t) => {
  const dir = await tmpDir();
  const procs: AgentProc[] = [];
  t.after(async () => {
    await Promise.all(procs.map((p) => p.stop()));
    await rm(dir, { recursive: true, force: true });
  });
  const t1 = await agent(dir, "t1", { target: { root: "r1" } });
  const t2 = await agent(dir, "t2", { target: { root: "r2" } });
  await mkdir(path.join(dir, "src"));
  const s = await agent(dir, "s", { source: { sets: [{ name: "data", path: "src", targets: [t1.address, t2.address], compression: "balanced" }] } });
  procs.push(t1, t2, s);
  await t1.start();
  await s.start(); // t2 is not up yet
  const w = new Workload(path.join(dir, "src"), 5);
  await w.run(150);
  await waitSame(path.join(dir, "src"), path.join(dir, "r1", "s", "data"));
  const st = await s.status();
  const [a, b] = st.sets[0]!.targets;
  assert.ok(a!.lastAckedSeq > 0 && b!.lastAckedSeq === 0, "t1 is acknowledged while t2 is down");
  assert.notEqual(b!.state, "idle");
  assert.ok(b!.queuedBytes!.memory + b!.queuedBytes!.disk > 0, "t2's backlog is shown as queued");
  await t2.start();
  await waitSame(path.join(dir, "src"), path.join(dir, "r2", "s", "data"));
});

test("two sources into one target: one image each; scheduled mode ships on its interval; bandwidth limit holds", async (t) => {
  const dir = await tmpDir();
  const procs: AgentProc[] = [];
  t.after(async () => {
    await Promise.all(procs.map((p) => p.stop()));
    await rm(dir, { recursive: true, force: true });
  });
  const tg = await agent(dir, "dr", { target: { root: "replicas" } });
  await mkdir(path.join(dir, "a"));
  await mkdir(path.join(dir, "b"));
  const a = await agent(dir, "web-a", { source: { sets: [{ name: "www", path: "a", targets: [tg.address], bandwidthLimit: "1MiB", compression: "none" }] } });
  const b = await agent(dir, "web-b", { source: { sets: [{ name: "www", path: "b", targets: [tg.address], mode: "scheduled", interval: "12s" }] } });
  procs.push(tg, a, b);
  await tg.start();
  await Promise.all([a.start(), b.start()]);
  // Scheduled: a change is journaled at once but not shipped before the interval.
  // (A long interval: on a busy machine the change must still be seen journaled
  // well before the next tick, which comes about 8 s after it is written.)
  await new Promise((r) => setTimeout(r, 3500)); // let start-up (and its mirror) pass
  await writeFile(path.join(dir, "b", "note.txt"), "scheduled\n");
  const shipped = await waitFor("the scheduled change to be journaled", async () => {
    const st = await b.status();
    return st.sets[0]!.lastSeq > st.sets[0]!.targets[0]!.lastSentSeq ? st : undefined;
  }, 8000, 20);
  assert.ok(shipped, "journaled but not yet sent");
  await waitSame(path.join(dir, "b"), path.join(dir, "replicas", "web-b", "www"));
  // Bandwidth: 3 MiB of incompressible data at 1 MiB/s takes at least ~2 s.
  const { randomBytes } = await import("node:crypto");
  const t0 = Date.now();
  await writeFile(path.join(dir, "a", "big.bin"), randomBytes(3 * 1024 * 1024));
  await waitSame(path.join(dir, "a"), path.join(dir, "replicas", "web-a", "www"));
  assert.ok(Date.now() - t0 >= 1500, `3 MiB at 1 MiB/s took ${Date.now() - t0} ms`);
  const st = await tg.status();
  assert.deepEqual(st.images.map((i) => `${i.source}/${i.set}`).sort(), ["web-a/www", "web-b/www"]);
});
