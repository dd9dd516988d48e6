// Summarise V8 .cpuprofile files (from BENCH_CPU_PROF=<dir>): self time per
// function+url, and the share of idle/GC/program. Usage:
//   npx node test/bench/cpuprofile-top.ts <file.cpuprofile>... [--top N]
import { readFileSync } from "node:fs";

interface Node { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; children?: number[] }
interface Profile { nodes: Node[]; startTime: number; endTime: number; samples: number[]; timeDeltas: number[] }

const args = process.argv.slice(2);
const ti = args.indexOf("--top");
const top = ti >= 0 ? Number(args[ti + 1]) : 25;
const files = args.filter((a, i) => !(ti >= 0 && (i === ti || i === ti + 1)));
for (const f of files) {
  const p = JSON.parse(readFileSync(f, "utf8")) as Profile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>();
  let total = 0;
  for (let i = 0; i < p.samples.length; i++) {
    const n = byId.get(p.samples[i]!)!;
    const dt = p.timeDeltas[i] ?? 0;
    total += dt;
    const url = n.callFrame.url.replace(/^file:\/\/.*?\/(node_modules|agent|common|proto)\//, "$1/");
    const k = `${n.callFrame.functionName || "(anonymous)"}  ${url}${url ? ":" + (n.callFrame.lineNumber + 1) : ""}`;
    self.set(k, (self.get(k) ?? 0) + dt);
  }
  const idle = self.get("(idle)  ") ?? 0;
  console.log(`\n${f}: ${(total / 1e6).toFixed(1)} s sampled, busy ${((total - idle) / 1e6).toFixed(1)} s`);
  for (const [k, us] of [...self].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`${(us / 1e3).toFixed(0).padStart(8)} ms ${((100 * us) / total).toFixed(1).padStart(5)}%  ${k}`);
}
