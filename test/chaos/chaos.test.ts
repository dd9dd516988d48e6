// The short chaos run of `npm test`: every fault class once (see chaos.ts),
// seeded (the seed is printed; CHAOS_SEED replays it). `npm run chaos` is the full run.
import { test } from "node:test";
import assert from "node:assert/strict";
import { rm } from "node:fs/promises";
import { tmpDir } from "../e2e/harness.ts";
import { FAULT_CLASSES, runChaos } from "./chaos.ts";

test("chaos (short): every fault class once; nothing acknowledged lost, every fault recovered from", { timeout: 900_000 }, async (t) => {
  const seed = process.env.CHAOS_SEED ? Number(process.env.CHAOS_SEED) : Math.floor(Math.random() * 2 ** 31);
  t.diagnostic(`chaos seed ${seed} (replay with CHAOS_SEED=${seed})`);
  const dir = await tmpDir("understudy-chaos-");
  let ok = false;
  t.after(() => (ok ? rm(dir, { recursive: true, force: true }) : t.diagnostic(`logs kept in ${dir}`)));
  const results = await runChaos({ dir, seed, rounds: FAULT_CLASSES.length, log: (l) => t.diagnostic(l) });
  const bad = results.filter((r) => r.violations.length);
  assert.deepEqual(bad.map((r) => `${r.fault}: ${r.violations.join(" | ")}`), [], `seed ${seed}`);
  ok = true;
});
