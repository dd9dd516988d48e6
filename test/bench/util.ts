// Small helpers shared by the benchmarks: progress lines on stderr, a
// monotonic clock that agrees across threads, percentiles, unit formatting,
// random test data, child processes with captured output, and file hashing.
import { spawn } from "node:child_process";
import { createHash, randomFillSync } from "node:crypto";
import { createReadStream, readFileSync } from "node:fs";
import { mkdir, open, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";

const STARTED = process.hrtime.bigint();

/** Milliseconds on CLOCK_MONOTONIC; the same clock in every thread and process of this machine. */
export function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** One progress line on stderr, prefixed with the time since the run started. */
export function progress(msg: string): void {
  const s = Number(process.hrtime.bigint() - STARTED) / 1e9;
  process.stderr.write(`[bench ${s.toFixed(1).padStart(6)}s] ${msg}\n`);
}

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** 1 GiB, 128 MiB, 64 KiB, 900 B */
export function fmtSize(n: number): string {
  if (n >= GiB && n % GiB === 0) return `${n / GiB} GiB`;
  if (n >= MiB && n % MiB === 0) return `${n / MiB} MiB`;
  if (n >= MiB) return `${(n / MiB).toFixed(2)} MiB`;
  if (n >= KiB) return `${(n / KiB).toFixed(1)} KiB`;
  return `${n} B`;
}

/** Bytes as MB (10^6), for memory and rates. */
export function fmtMB(n: number, digits = 1): string {
  return `${(n / 1e6).toFixed(digits)} MB`;
}

export function fmtMs(ms: number | undefined): string {
  if (ms === Infinity) return "never";
  if (ms === undefined || !Number.isFinite(ms)) return "n/a";
  if (ms >= 10_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms >= 10) return `${ms.toFixed(1)} ms`;
  return `${ms.toFixed(2)} ms`;
}

/** a / b as "0.43×", or n/a. */
export function ratio(a: number | undefined, b: number | undefined): string {
  if (a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || b === 0) return "n/a";
  const r = a / b;
  return `${r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r >= 0.01 ? r.toFixed(2) : r.toPrecision(2)}×`;
}

export interface Percentiles {
  count: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
}

/** Nearest-rank percentiles of a list of samples (undefined when empty). */
export function percentiles(samples: number[]): Percentiles | undefined {
  if (samples.length === 0) return undefined;
  const s = [...samples].sort((a, b) => a - b);
  const at = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
  return { count: s.length, p50: at(50), p90: at(90), p99: at(99), max: s[s.length - 1]!, mean: s.reduce((a, b) => a + b, 0) / s.length };
}

/** Incompressible bytes (fresh from the CSPRNG, so no tool can find them elsewhere in a file). */
export function randomBytes(n: number): Buffer {
  return randomFillSync(Buffer.allocUnsafe(n));
}

/** Write `size` random bytes to file in 1 MiB sequential writes. */
export async function writeRandomFile(file: string, size: number): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  const fh = await open(file, "w");
  try {
    const buf = Buffer.allocUnsafe(MiB);
    for (let off = 0; off < size; off += MiB) {
      const n = Math.min(MiB, size - off);
      randomFillSync(buf, 0, n);
      await fh.write(buf, 0, n, off);
    }
  } finally {
    await fh.close();
  }
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash("sha256");
  for await (const c of createReadStream(file, { highWaterMark: MiB })) h.update(c as Buffer);
  return h.digest("hex");
}

export async function fileSize(file: string): Promise<number | undefined> {
  return stat(file).then((s) => s.size, () => undefined);
}

export interface CmdResult {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
  /** CPU seconds (user + system) of the command and the children it reaped (when no other child of ours ended meanwhile) */
  cpuS?: number;
}

/** CPU seconds of this process's reaped children so far (cutime + cstime), from /proc. */
export function reapedChildrenCpuS(): number | undefined {
  try {
    const f = readFileSync("/proc/self/stat", "utf8").split(") ")[1]!.split(" ");
    return (Number(f[13]) + Number(f[14])) / 100;
  } catch {
    return undefined;
  }
}

/** Run a command to completion, capturing its output and wall time. Throws if it cannot start. */
export function runCmd(cmd: string, args: string[], opts: { cwd?: string } = {}): Promise<CmdResult> {
  return new Promise((resolve, reject) => {
    const t0 = nowMs();
    const c0 = reapedChildrenCpuS();
    const p = spawn(cmd, args, { cwd: opts.cwd, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    p.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    p.on("error", reject);
    p.on("close", (code) => {
      const c1 = reapedChildrenCpuS();
      resolve({ code, stdout, stderr, ms: nowMs() - t0, cpuS: c0 !== undefined && c1 !== undefined ? c1 - c0 : undefined });
    });
  });
}

/** runCmd that throws with the command's stderr when it exits non-zero. */
export async function mustRun(cmd: string, args: string[], opts: { cwd?: string } = {}): Promise<CmdResult> {
  const r = await runCmd(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} exited with ${r.code}: ${r.stderr.trim() || r.stdout.trim()}`);
  return r;
}

/** A directory for one benchmark inside the run's work dir, emptied first. */
export async function freshDir(root: string, name: string): Promise<string> {
  const d = path.join(root, name);
  await rm(d, { recursive: true, force: true });
  await mkdir(d, { recursive: true });
  return d;
}

export async function removeDir(d: string): Promise<void> {
  if (!process.env.KEEP_BENCH_DIRS) await rm(d, { recursive: true, force: true });
}

export async function writeText(file: string, text: string): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, text);
}

/** Deterministic PRNG in [0, 1), so generated trees are the same each run (the e2e workload's). */
export { rng as seededRandom } from "../e2e/workload.ts";

/** Poll `probe` until it returns something other than undefined/false, or the deadline passes. */
export async function pollUntil<T>(what: string, probe: () => Promise<T | undefined | false>, timeoutMs: number, everyMs = 50): Promise<T> {
  const deadline = nowMs() + timeoutMs;
  let lastErr: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined && v !== false) return v;
    } catch (e) {
      lastErr = e;
    }
    if (nowMs() > deadline) throw new Error(`timed out after ${fmtMs(timeoutMs)} waiting for ${what}${lastErr ? ` (last error: ${(lastErr as Error).message})` : ""}`);
    await sleep(everyMs);
  }
}

/** What every benchmark gets from run.ts. */
export interface BenchContext {
  /** the run's temp directory (under os.tmpdir()); each benchmark makes its own subdirectory */
  workDir: string;
  /** BENCH_QUICK=1: smaller sizes */
  quick: boolean;
}

/** CPU time of the whole machine and of this process with its reaped children, in clock ticks. */
export interface CpuSnapshot {
  atMs: number;
  machineBusy: number;
  own: number;
}

export function cpuSnapshot(): CpuSnapshot | undefined {
  try {
    const cpu = readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal ...
    const busy = cpu[0]! + cpu[1]! + cpu[2]! + cpu[5]! + cpu[6]! + (cpu[7] ?? 0);
    // /proc/self/stat: utime stime cutime cstime are fields 14-17 (after the ") " that ends the command name)
    const f = readFileSync("/proc/self/stat", "utf8").split(") ")[1]!.split(" ");
    const own = Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]);
    return { atMs: nowMs(), machineBusy: busy, own };
  } catch {
    return undefined;
  }
}

/**
 * Cores' worth of CPU that processes outside this benchmark used between two
 * snapshots (taken when no child of ours is running, so all of ours are counted).
 */
export function outsideCores(a: CpuSnapshot | undefined, b: CpuSnapshot | undefined): number | undefined {
  if (!a || !b || b.atMs <= a.atMs) return undefined;
  const ticksPerSecond = 100; // USER_HZ on Linux
  return Math.max(0, (b.machineBusy - a.machineBusy - (b.own - a.own)) / ticksPerSecond / ((b.atMs - a.atMs) / 1000));
}

/** rsync's --stats totals. */
export function parseRsyncStats(out: string): { sent: number; received: number; literal?: number; matched?: number; transferred?: number } {
  const num = (label: string) => {
    const m = new RegExp(`${label}:\\s*([\\d,.]+)`).exec(out);
    return m ? Number(m[1]!.replace(/[,.]/g, "")) : undefined;
  };
  const sent = num("Total bytes sent");
  const received = num("Total bytes received");
  if (sent === undefined || received === undefined) throw new Error(`rsync --stats output not understood:\n${out}`);
  return { sent, received, literal: num("Literal data"), matched: num("Matched data"), transferred: num("Number of regular files transferred") };
}
