// npm run chaos: the full seeded chaos run; prints the seed, writes RELIABILITY.md.
// CHAOS_SEED replays a run; CHAOS_ROUNDS sets its length (default 100).
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { REPO } from "../e2e/harness.ts";
import { reliabilityReport, runChaos } from "./chaos.ts";

const seed = process.env.CHAOS_SEED ? Number(process.env.CHAOS_SEED) : Math.floor(Math.random() * 2 ** 31);
const rounds = Number(process.env.CHAOS_ROUNDS ?? 100);
console.log(`chaos: seed ${seed}, ${rounds} rounds (replay with CHAOS_SEED=${seed})`);
const dir = await mkdtemp(path.join(os.tmpdir(), "understudy-chaos-"));
const results = await runChaos({ dir, seed, rounds, log: (l) => console.log(l) });
const md = reliabilityReport(results, seed, "npm run chaos");
await writeFile(path.join(REPO, "RELIABILITY.md"), md);
console.log(md);
const violations = results.reduce((n, r) => n + r.violations.length, 0);
if (violations === 0) await rm(dir, { recursive: true, force: true });
else console.log(`logs kept in ${dir}`);
process.exit(violations ? 1 : 0);
