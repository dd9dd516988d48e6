// Replication on a starved machine: the agents run in a CPU-limited cgroup
// (see cpu-limit.ts) while a workload keeps changing the tree at full speed,
// so every step of capture and mirror takes long and the tree moves under
// it. Regression test for issue 16 (topology.test.ts failing on a busy CI
// machine: files of one renamed directory missing on the target for good).
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, rename, writeFile, readdir } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { AgentProc, compareTrees, freePort, snapshotTree, tmpDir, waitFor } from "./harness.ts";
import { rng } from "./workload.ts";
import { limitCpu } from "./cpu-limit.ts";
import { startMirror } from "../../agent/control-client.ts";
import { rm } from "node:fs/promises";

async function agent(dir: string, name: string, cfg: Record<string, unknown>): Promise<AgentProc> {
  const port = await freePort();
  const file = path.join(dir, `${name}.yaml`);
  await writeFile(file, YAML.stringify({ name, listen: `127.0.0.1:${port}`, dataDir: `state-${name}`, tls: { insecure: true }, ...cfg }));
  return new AgentProc(name, file, port, path.join(dir, `${name}.log`));
}

/** All directories under root (relative, "" excluded). */
async function dirsOf(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (rel: string) => {
    for (const e of await readdir(path.join(root, rel), { withFileTypes: true }).catch(() => [])) {
      if (!e.isDirectory()) continue;
      const r = rel ? `${rel}/${e.name}` : e.name;
      out.push(r);
      await walk(r);
    }
  };
  await walk("");
  return out;
}

test("a mirror starved of CPU while directories are renamed under it loses no file", async (t) => {
  const dir = await tmpDir();
  const procs: AgentProc[] = [];
  let release = async () => {};
  t.after(async () => {
    await release();
    await Promise.all(procs.map((p) => p.stop()));
    await rm(dir, { recursive: true, force: true });
  });
  // Enough content that the mirror takes a while at a few percent of a CPU.
  const src = path.join(dir, "src");
  const r = rng(16);
  for (let d = 0; d < 10; d++) {
    await mkdir(path.join(src, `d${d}`), { recursive: true });
    for (let f = 0; f < 12; f++) await writeFile(path.join(src, `d${d}`, `f${f}`), Buffer.alloc(2048 + Math.floor(r() * 30_000), d * 31 + f + 1));
  }
  const tg = await agent(dir, "t1", { target: { root: "r1" } });
  const s = await agent(dir, "s", { source: { sets: [{ name: "data", path: "src", targets: [tg.address] }] } });
  procs.push(tg, s);
  await tg.start();
  await s.start();
  const limit = await limitCpu([s.pid, tg.pid], 0.2);
  release = () => limit.release();
  t.diagnostic(`CPU limit: ${limit.how}`);
  // While a mirror runs (and a little after): rename directories (often,
  // with files the mirror has not sent yet), make files in them. Three
  // mirrors (the first, for the new image, and two asked for), each a chance
  // for a rename to land in its final round.
  let n = 0;
  const deadline = Date.now() + 300_000;
  const mirror = async () => (await s.status().catch(() => undefined))?.sets[0]?.targets[0]?.mirror;
  for (let round = 0; round < 3; round++) {
    if (round > 0) {
      const before = (await mirror())?.startedAt ?? 0;
      await startMirror(s.address, { insecure: true }, { set: "data", target: "", mode: "checksum", blockSize: 0 });
      await waitFor("the requested mirror to start", async () => ((await mirror())?.startedAt ?? 0) > before, 60_000);
    }
    let after = 0;
    // At most this many changes while a mirror runs: the churn must not grow with the mirror's own
    // length (at 20% of a CPU a longer mirror saw more renames, which made it longer still, and one
    // run on a busy machine never finished). Renames still land in its final round.
    let changes = 0;
    for (let done = false; after < 20; ) {
      if (Date.now() > deadline) assert.fail(`mirror ${round + 1} of 3 did not complete within 300 s at 20% of a CPU: ${JSON.stringify((await s.status().catch(() => undefined))?.sets[0]?.targets[0])}`);
      if (!done && changes >= 150) {
        const m = await mirror();
        done = !!m && !m.active && m.result === "ok";
        if (!done) await new Promise((res) => setTimeout(res, 100));
        continue;
      }
      changes++;
      const dirs = await dirsOf(src);
      const d = dirs[Math.floor(r() * dirs.length)]!;
      if (r() < 0.6) {
        const into = dirs.filter((q) => q !== d && !q.startsWith(d + "/"));
        const parent = r() < 0.5 ? "" : (into[Math.floor(r() * into.length)] ?? "");
        await rename(path.join(src, d), path.join(src, parent, `m${++n}`)).catch(() => undefined);
      } else await writeFile(path.join(src, d, `n${++n}`), Buffer.alloc(500 + Math.floor(r() * 2000), n & 0xff)).catch(() => undefined);
      await new Promise((res) => setTimeout(res, 20));
      if (!done) {
        const m = await mirror();
        done = !!m && !m.active && m.result === "ok";
      } else after++;
    }
  }
  // Nothing is lost for good: with the limit lifted, the target converges.
  await limit.release();
  let diff: string[] = [];
  await waitFor(`the target to equal the source`, async () => {
    diff = compareTrees(await snapshotTree(src), await snapshotTree(path.join(dir, "r1", "s", "data")));
    return diff.length === 0;
  }, 60_000, 250).catch((e) => {
    throw new Error(`${(e as Error).message}\n  ${diff.slice(0, 10).join("\n  ")}`);
  });
});
