// `npm run bench`: runs the benchmarks one after another (each against
// rsync and/or lsyncd on the same data), prints the tables on stdout and
// progress on stderr, and rewrites BENCHMARKS.md at the repo root.
//   BENCH_QUICK=1      smaller sizes (see the "Sizes used" section of the output)
//   BENCH_ONLY=1,3     run only these benchmarks (BENCHMARKS.md is then not rewritten)
//   BENCH_UPDATE=1     with BENCH_ONLY: replace just those benchmarks' rows and sections in BENCHMARKS.md
//   KEEP_BENCH_DIRS=1  keep the work directories (agent logs, configs) for a look
import { execFileSync } from "node:child_process";
import { mkdtemp, readFile, writeFile } from "node:fs/promises";
import { rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { REPO } from "../e2e/harness.ts";
import { benchChecksumMirror } from "./checksum-mirror.ts";
import { benchInitialCopy } from "./initial-copy.ts";
import { benchLatency } from "./latency.ts";
import { LSYNCD } from "./lsyncd.ts";
import { benchMemory } from "./memory.ts";
import { goalsTable, machineInfo, machineLines, mergeMarkdownReport, metText, outsideText, renderMarkdownReport, renderText, summaryTable, type BenchResult } from "./report.ts";
import { benchThroughput } from "./throughput.ts";
import { benchVerify } from "./verify.ts";
import { benchWireBytes } from "./wire-bytes.ts";
import { benchOperatorScale } from "./operator-scale.ts";
import { benchFailoverRecovery } from "./failover-recovery.ts";
import { benchDiskImage } from "./disk-image.ts";
import { cpuSnapshot, nowMs, outsideCores, progress, type BenchContext } from "./util.ts";

const BENCHMARKS: [string, (ctx: BenchContext) => Promise<BenchResult>][] = [
  ["1", benchLatency],
  ["2", benchWireBytes],
  ["3", benchThroughput],
  ["4", benchMemory],
  ["5", benchInitialCopy],
  ["6", benchChecksumMirror],
  ["7", benchVerify],
  ["8", benchOperatorScale],
  ["9", benchFailoverRecovery],
  ["10", benchDiskImage],
];

const METHODOLOGY = [
  "Everything runs on this one machine: understudy agents are real processes (`bin/understudy.mjs agent --config ...`, Node 24) talking gRPC over 127.0.0.1; rsync and lsyncd are the Debian packages. Data lives in a temporary directory under the OS temp dir, which is removed afterwards.",
  "Benchmarks run one at a time; within one, understudy and its baselines run one after the other on the same data, never at the same time. The data is random (incompressible) unless stated, and the source data is in the page cache for every tool.",
  "understudy's target fsyncs what it applied before acknowledging; rsync and lsyncd do not fsync. Times for understudy that end \"when acknowledged\" therefore include durability the baselines do not provide.",
  "The machine may be shared (other test runs): each benchmark reports how much CPU other processes used while it ran, measured from /proc/stat minus the CPU of the benchmark process and all its children.",
  "Nothing here is asserted: goals are reported as met or MISSED. Run-to-run noise on a shared 2-core machine is easily ±20% for times and more for tail latencies.",
];

function toolVersion(cmd: string, args: string[]): string {
  try {
    return execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).split("\n")[0]!.trim();
  } catch (e) {
    return `not available (${(e as Error).message.split("\n")[0]})`;
  }
}

function tmpFilesystem(): string {
  try {
    return execFileSync("stat", ["-f", "-c", "%T", os.tmpdir()], { encoding: "utf8" }).trim();
  } catch {
    return "unknown";
  }
}

async function main(): Promise<void> {
  const quick = process.env.BENCH_QUICK === "1";
  const only = process.env.BENCH_ONLY?.split(",").map((s) => s.trim()).filter(Boolean);
  const workDir = await mkdtemp(path.join(os.tmpdir(), "understudy-bench-"));
  const cleanup = () => {
    if (!process.env.KEEP_BENCH_DIRS) rmSync(workDir, { recursive: true, force: true });
  };
  process.once("SIGINT", () => {
    cleanup();
    process.exit(130);
  });
  const machine = machineInfo({ rsync: toolVersion("rsync", ["--version"]), lsyncd: toolVersion(LSYNCD, ["--version"]) });
  progress(`understudy benchmarks (${quick ? "BENCH_QUICK=1: small sizes" : "full sizes"}); work dir ${workDir} (${tmpFilesystem()})`);
  progress(`${machine.cpu}, ${machine.cores} cores, ${machine.kernel}, Node ${machine.node}`);
  const t0 = nowMs();
  const results: BenchResult[] = [];
  const ctx: BenchContext = { workDir, quick };
  try {
    for (const [id, bench] of BENCHMARKS) {
      if (only && !only.includes(id)) continue;
      const tb = nowMs();
      const cpu0 = cpuSnapshot();
      let r: BenchResult;
      try {
        r = await bench(ctx);
      } catch (e) {
        r = { id, title: `benchmark ${id}`, sizes: "n/a", summary: [], goals: [], tables: [], notes: [], error: (e as Error).stack ?? String(e), ms: 0 };
      }
      r.ms = nowMs() - tb;
      r.outsideCores = outsideCores(cpu0, cpuSnapshot());
      results.push(r);
      progress(`benchmark ${id} done in ${(r.ms / 1000).toFixed(1)} s${r.error ? ` (error: ${r.error.split("\n")[0]})` : ""}. ${outsideText(r)}`);
    }
  } finally {
    cleanup();
  }
  const totalMs = nowMs() - t0;

  const out: string[] = [];
  out.push("", `understudy benchmarks — ${quick ? "BENCH_QUICK=1 (small sizes)" : "full sizes"}`, ...machineLines(machine).map((l) => l.replace(/^- /, "  ")), "");
  out.push("Sizes used:", ...results.map((r) => `  ${r.id}. ${r.sizes}`), "");
  out.push(renderText(summaryTable(results)), "", renderText(goalsTable(results)), "");
  for (const r of results) {
    out.push(`== ${r.id}. ${r.title} (${(r.ms / 1000).toFixed(1)} s) ${outsideText(r)}`);
    if (r.error) out.push(`did not finish: ${r.error}`);
    for (const t of r.tables) out.push(renderText(t), "");
    for (const n of r.notes) out.push(`  * ${n}`);
    out.push("");
  }
  out.push(`total ${(totalMs / 1000).toFixed(0)} s`);
  process.stdout.write(out.join("\n") + "\n");

  if (only && process.env.BENCH_UPDATE === "1") {
    const file = path.join(REPO, "BENCHMARKS.md");
    const merged = mergeMarkdownReport(await readFile(file, "utf8"), { machine, results, sizes: results.map((r) => `Benchmark ${r.id}: ${r.sizes}${quick ? " (BENCH_QUICK=1)" : ""}`) });
    await writeFile(file, merged);
    progress(`BENCH_UPDATE=1: replaced benchmark ${results.map((r) => r.id).join(", ")} in BENCHMARKS.md`);
    return;
  }
  if (only) {
    progress("BENCH_ONLY set: BENCHMARKS.md left as it was");
    return;
  }
  const md = renderMarkdownReport({
    machine,
    results,
    sizes: results.map((r) => `Benchmark ${r.id}: ${r.sizes}${quick ? " (BENCH_QUICK=1)" : ""}`),
    workDir: `\`${os.tmpdir()}\` (file system type reported by statfs: ${tmpFilesystem()})`,
    totalMs,
    methodology: METHODOLOGY,
  });
  await writeFile(path.join(REPO, "BENCHMARKS.md"), md);
  progress(`wrote BENCHMARKS.md (${results.flatMap((r) => r.goals).map(metText).join(", ")})`);
}

await main().catch((e) => {
  process.stderr.write(`bench failed: ${(e as Error).stack ?? String(e)}\n`);
  process.exitCode = 1;
});
