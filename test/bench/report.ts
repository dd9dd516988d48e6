// What a benchmark hands back (summary rows, goals, detail tables, notes) and
// how the run prints it: aligned text tables on stdout, and BENCHMARKS.md.
import os from "node:os";
import { readFileSync } from "node:fs";

export interface Table {
  title?: string;
  headers: string[];
  rows: string[][];
}

/** One line of the run's summary table. */
export interface SummaryRow {
  metric: string;
  understudy: string;
  rsync?: string;
  lsyncd?: string;
  vsRsync?: string;
  vsLsyncd?: string;
}

export interface Goal {
  text: string;
  /** undefined when it could not be measured */
  met: boolean | undefined;
  measured: string;
}

export interface BenchResult {
  id: string;
  title: string;
  /** the sizes this run used */
  sizes: string;
  summary: SummaryRow[];
  goals: Goal[];
  tables: Table[];
  notes: string[];
  /** set when the benchmark could not finish; what was measured before stays */
  error?: string;
  ms: number;
  /** cores' worth of CPU used by processes outside the benchmark while it ran */
  outsideCores?: number;
}

export function emptyResult(id: string, title: string, sizes: string): BenchResult {
  return { id, title, sizes, summary: [], goals: [], tables: [], notes: [], ms: 0 };
}

/** How busy the machine was with other work while a benchmark ran. */
export function outsideText(r: BenchResult): string {
  if (r.outsideCores === undefined) return "";
  return `Other processes on the machine used ${r.outsideCores.toFixed(2)} cores on average meanwhile${r.outsideCores >= 0.25 ? " (the numbers are affected by that)" : ""}.`;
}

export function metText(g: Goal): string {
  return g.met === undefined ? "NOT MEASURED" : g.met ? "met" : "MISSED";
}

export function renderText(t: Table): string {
  const widths = t.headers.map((h, i) => Math.max(h.length, ...t.rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ").trimEnd();
  const out = [];
  if (t.title) out.push(t.title);
  out.push(line(t.headers), widths.map((w) => "-".repeat(w)).join("  "));
  for (const r of t.rows) out.push(line(r));
  return out.join("\n");
}

export function renderMarkdown(t: Table): string {
  const esc = (s: string) => s.replace(/\|/g, "\\|");
  const out = [];
  if (t.title) out.push(`**${t.title}**`, "");
  // Right-align the columns that hold numbers (or their stand-ins), left-align text.
  const numeric = t.headers.map((_, i) => i > 0 && t.rows.every((r) => /^([\d.]|n\/a|FAILED|never|—|$)/.test(r[i] ?? "")));
  out.push(`| ${t.headers.map(esc).join(" | ")} |`, `|${numeric.map((n) => (n ? " ---: " : " --- ")).join("|")}|`);
  for (const r of t.rows) out.push(`| ${r.map(esc).join(" | ")} |`);
  return out.join("\n");
}

export function summaryTable(results: BenchResult[]): Table {
  const rows: string[][] = [];
  for (const r of results) {
    for (const s of r.summary) rows.push([`${r.id}. ${s.metric}`, s.understudy, s.rsync ?? "—", s.lsyncd ?? "—", s.vsRsync ?? "—", s.vsLsyncd ?? "—"]);
    if (r.summary.length === 0) rows.push([`${r.id}. ${r.title}`, r.error ? "error" : "n/a", "—", "—", "—", "—"]);
  }
  return { headers: ["benchmark / metric", "understudy", "rsync", "lsyncd", "understudy ÷ rsync", "understudy ÷ lsyncd"], rows };
}

export function goalsTable(results: BenchResult[]): Table {
  const rows: string[][] = [];
  for (const r of results) for (const g of r.goals) rows.push([`${r.id}. ${g.text}`, g.measured, metText(g)]);
  return { headers: ["goal", "measured", "result"], rows };
}

export interface MachineInfo {
  cpu: string;
  cores: number;
  memory: string;
  kernel: string;
  node: string;
  rsync: string;
  lsyncd: string;
  date: string;
  command: string;
}

export function machineInfo(tools: { rsync: string; lsyncd: string }): MachineInfo {
  const cpuinfo = (() => {
    try {
      return readFileSync("/proc/cpuinfo", "utf8");
    } catch {
      return "";
    }
  })();
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ?? os.cpus()[0]?.model ?? "unknown";
  const quick = process.env.BENCH_QUICK === "1";
  return {
    cpu: model.trim(),
    cores: os.availableParallelism(),
    memory: `${(os.totalmem() / 2 ** 30).toFixed(1)} GiB`,
    kernel: `${os.type()} ${os.release()} (${os.arch()})`,
    node: process.version,
    rsync: tools.rsync,
    lsyncd: tools.lsyncd,
    date: new Date().toISOString(),
    command: quick ? "BENCH_QUICK=1 npm run bench" : "npm run bench",
  };
}

export function machineLines(m: MachineInfo): string[] {
  return [
    `- Date: ${m.date}`,
    `- Command: \`${m.command}\` (= \`node test/bench/run.ts\`, Node from the project's pinned \`node\` dev dependency)`,
    `- CPU: ${m.cpu}, ${m.cores} cores available; memory ${m.memory}`,
    `- Kernel: ${m.kernel}`,
    `- Node: ${m.node}`,
    `- rsync: ${m.rsync}`,
    `- lsyncd: ${m.lsyncd}`,
  ];
}

export function renderMarkdownReport(o: { machine: MachineInfo; results: BenchResult[]; sizes: string[]; workDir: string; totalMs: number; methodology: string[] }): string {
  const out: string[] = [];
  out.push("# Benchmarks", "");
  out.push("Generated by `npm run bench` (test/bench/run.ts); rewritten on every run, do not edit by hand.", "");
  out.push("Each benchmark runs understudy (real agent processes on loopback) side by side with rsync and/or lsyncd on the same data in the same run. These are measurements, not tests: nothing fails when a number is bad, and missed goals are reported as MISSED.", "");
  out.push("## Machine", "", ...machineLines(o.machine), `- Total run time: ${(o.totalMs / 1000).toFixed(0)} s; work directory under ${o.workDir} (removed afterwards)`, "");
  out.push("## Sizes used", "", ...o.sizes.map((s) => `- ${s}`), "");
  out.push("## Summary", "", renderMarkdown(summaryTable(o.results)), "");
  out.push("Ratios are understudy's number divided by the baseline's (for times and latencies lower is better for understudy; for throughput higher is better).", "");
  out.push("## Goals", "", renderMarkdown(goalsTable(o.results)), "");
  for (const r of o.results) {
    out.push(`## ${r.id}. ${r.title}`, "", `Sizes: ${r.sizes}. Took ${(r.ms / 1000).toFixed(1)} s. ${outsideText(r)}`, "");
    if (r.error) out.push("**Did not finish:**", "", ...r.error.split("\n").map((l) => `> ${l}`), "");
    for (const t of r.tables) out.push(renderMarkdown(t), "");
    if (r.notes.length) out.push(...r.notes.map((n) => `- ${n}`), "");
  }
  out.push("## Method and caveats", "", ...o.methodology.map((m) => `- ${m}`), "");
  return out.join("\n");
}

/**
 * BENCH_ONLY=… BENCH_UPDATE=1: put the given benchmarks into an existing
 * BENCHMARKS.md without re-running the others — their summary and goal rows,
 * their "Sizes used" line and their section are replaced (or added); the
 * section says when and on what it was run, since the Machine block at the
 * top describes the full run.
 */
export function mergeMarkdownReport(existing: string, o: { machine: MachineInfo; results: BenchResult[]; sizes: string[] }): string {
  let lines = existing.split("\n");
  const ids = new Set(o.results.map((r) => r.id));
  const ownRow = (l: string) => [...ids].some((id) => l.startsWith(`| ${id}. `));
  /** Replace this run's rows in the table that follows `heading`, keeping the other rows in place and appending new ones. */
  const mergeTable = (heading: string, table: Table) => {
    const h = lines.indexOf(heading);
    if (h < 0) return;
    let start = h + 1;
    while (start < lines.length && !lines[start]!.startsWith("|")) start++;
    let end = start;
    while (end < lines.length && lines[end]!.startsWith("|")) end++;
    const kept = lines.slice(start, end).filter((l) => !ownRow(l));
    const fresh = renderMarkdown(table).split("\n").slice(2);
    lines = [...lines.slice(0, start), ...kept, ...fresh, ...lines.slice(end)];
  };
  mergeTable("## Summary", summaryTable(o.results));
  mergeTable("## Goals", goalsTable(o.results));
  // Sizes used
  const sh = lines.indexOf("## Sizes used");
  if (sh >= 0) {
    let end = sh + 2;
    while (end < lines.length && lines[end]!.startsWith("- ")) end++;
    const kept = lines.slice(sh + 2, end).filter((l) => ![...ids].some((id) => l.startsWith(`- Benchmark ${id}:`)));
    lines = [...lines.slice(0, sh + 2), ...kept, ...o.sizes.map((s) => `- ${s}`), ...lines.slice(end)];
  }
  // Sections: drop the old ones, insert the new ones before "## Method and caveats".
  for (const id of ids) {
    const s = lines.findIndex((l) => l.startsWith(`## ${id}. `));
    if (s < 0) continue;
    let e = s + 1;
    while (e < lines.length && !lines[e]!.startsWith("## ")) e++;
    lines.splice(s, e - s);
  }
  const sections: string[] = [];
  for (const r of o.results) {
    sections.push(`## ${r.id}. ${r.title}`, "", `Sizes: ${r.sizes}. Took ${(r.ms / 1000).toFixed(1)} s. ${outsideText(r)}`, "");
    sections.push(`Run on its own (\`BENCH_ONLY=${r.id} BENCH_UPDATE=1 ${o.machine.command}\`) at ${o.machine.date}; ${o.machine.cpu}, ${o.machine.cores} cores, Node ${o.machine.node}, ${o.machine.rsync}.`, "");
    if (r.error) sections.push("**Did not finish:**", "", ...r.error.split("\n").map((l) => `> ${l}`), "");
    for (const t of r.tables) sections.push(renderMarkdown(t), "");
    if (r.notes.length) sections.push(...r.notes.map((n) => `- ${n}`), "");
  }
  let at = lines.indexOf("## Method and caveats");
  if (at < 0) at = lines.length;
  lines.splice(at, 0, ...sections);
  return lines.join("\n");
}
