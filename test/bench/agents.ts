// Real understudy agent processes for the benchmarks. Like the e2e harness's
// Pair, but with what the benchmarks need on top: mTLS (the harness always
// uses insecure TLS, also for its status calls), a source that sends to
// another address than the target's (a byte-counting proxy, or a port nobody
// listens on yet), and a target that can be started later. Agents run with
// the environment the README prescribes (harness AGENT_ENV).
import { spawn, type ChildProcess } from "node:child_process";
import { openSync, closeSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import type { TlsConfig } from "../../common/config.ts";
import { fetchStatus } from "../../agent/control-client.ts";
import type { SourceSetStatus, StatusResponse } from "../../agent/wire.ts";
import { AGENT_ENV, CLI, freePort } from "../e2e/harness.ts";
import { fmtMs, mustRun, nowMs, pollUntil, progress, sleep } from "./util.ts";

export class BenchAgent {
  readonly name: string;
  readonly configPath: string;
  readonly port: number;
  readonly logPath: string;
  readonly tls: TlsConfig;
  /** Extra node options (e.g. --trace-gc) and a CPU list to pin the process to with taskset ("0", "0,1"). */
  nodeArgs: string[] = [];
  cpus?: string;
  private proc?: ChildProcess;
  private exited?: Promise<void>;

  constructor(o: { name: string; configPath: string; port: number; logPath: string; tls: TlsConfig; cpus?: string }) {
    this.cpus = o.cpus;
    this.name = o.name;
    this.configPath = o.configPath;
    this.port = o.port;
    this.logPath = o.logPath;
    this.tls = o.tls;
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  get running(): boolean {
    return this.proc !== undefined && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** Spawn the agent and wait until its Control service answers. */
  async start(): Promise<void> {
    const fd = openSync(this.logPath, "a");
    // BENCH_CPU_PROF=<dir>: V8 CPU profiles of the agents (one .cpuprofile per process, written on exit), for finding where the time goes.
    const prof = process.env.BENCH_CPU_PROF ? ["--cpu-prof", `--cpu-prof-dir=${path.resolve(process.env.BENCH_CPU_PROF)}`, `--cpu-prof-name=${this.name}-${Date.now()}.cpuprofile`] : [];
    const argv = [process.execPath, ...this.nodeArgs, ...prof, CLI, "agent", "--config", this.configPath];
    // taskset execs node: the pid stays the agent's.
    if (this.cpus !== undefined) argv.unshift("taskset", "-c", this.cpus);
    const p = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", fd, fd], env: { ...AGENT_ENV, ...process.env, UNDERSTUDY_LOG_LEVEL: process.env.UNDERSTUDY_LOG_LEVEL ?? "info" } });
    closeSync(fd);
    this.proc = p;
    this.exited = new Promise((r) => p.once("exit", () => r()));
    await pollUntil(`agent ${this.name} to answer on ${this.address}`, async () => {
      if (!this.running) throw new Error(`agent ${this.name} exited (${p.exitCode ?? p.signalCode}); log:\n${await this.logTail()}`);
      return (await fetchStatus(this.address, this.tls, 1000).catch(() => undefined)) ?? false;
    }, 20_000, 50);
  }

  status(): Promise<StatusResponse> {
    return fetchStatus(this.address, this.tls);
  }

  /** The first (only) replication set of a source agent. */
  async set(): Promise<SourceSetStatus> {
    const s = (await this.status()).sets[0];
    if (!s) throw new Error(`agent ${this.name} has no replication set`);
    return s;
  }

  /** Resident and peak resident memory, from /proc. */
  async memory(): Promise<{ rss: number; hwm: number }> {
    const s = await readFile(`/proc/${this.pid}/status`, "utf8");
    const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(s)?.[1] ?? 0) * 1024;
    return { rss: kb("VmRSS"), hwm: kb("VmHWM") };
  }

  /** The agent's log records (JSON lines) whose msg is `msg`; best effort, for breakdowns in the report. */
  async logRecords(msg: string): Promise<Record<string, unknown>[]> {
    const out: Record<string, unknown>[] = [];
    for (const line of (await readFile(this.logPath, "utf8").catch(() => "")).split("\n")) {
      if (!line.includes(msg)) continue;
      try {
        const r = JSON.parse(line) as Record<string, unknown>;
        if (r.msg === msg) out.push(r);
      } catch {
        /* not a log record */
      }
    }
    return out;
  }

  /**
   * Garbage collection so far, from the --trace-gc lines in its log (start
   * the agent with nodeArgs ["--trace-gc"]): main-thread pause time (plus
   * incremental marking steps), and how many full mark-compacts and
   * scavenges. Take two and subtract for an interval.
   */
  async gcStats(): Promise<GcStats> {
    const out: GcStats = { ms: 0, markCompacts: 0, scavenges: 0 };
    for (const line of (await readFile(this.logPath, "utf8").catch(() => "")).split("\n")) {
      const m = GC_LINE.exec(line);
      if (!m) continue;
      out.ms += Number(m[2]) + Number(INCREMENTAL.exec(line)?.[1] ?? 0);
      if (m[1]!.startsWith("Mark-Compact")) out.markCompacts++;
      else out.scavenges++;
    }
    return out;
  }

  async logTail(lines = 20): Promise<string> {
    return (await readFile(this.logPath, "utf8").catch(() => "")).split("\n").slice(-lines).join("\n");
  }

  /** CPU seconds (user, system) the agent process has used so far, from /proc; undefined when it is not running. */
  async cpuSeconds(): Promise<{ user: number; system: number; minorFaults: number } | undefined> {
    const s = await readFile(`/proc/${this.pid}/stat`, "utf8").catch(() => undefined);
    if (!s) return undefined;
    const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
    return { user: Number(f[11]) / 100, system: Number(f[12]) / 100, minorFaults: Number(f[7]) }; // utime, stime in USER_HZ (100 on Linux)
  }

  async stop(): Promise<void> {
    if (!this.proc || !this.running) return;
    // BENCH_AGENT_CPU=1: say how much CPU the agent used (robust to a busy machine, unlike wall times).
    if (process.env.BENCH_AGENT_CPU === "1") {
      const c = await this.cpuSeconds();
      if (c) progress(`agent ${this.name}: ${c.user.toFixed(2)} s user + ${c.system.toFixed(2)} s system CPU`);
    }
    this.proc.kill("SIGTERM");
    const t = setTimeout(() => this.proc?.kill("SIGKILL"), 15_000);
    await this.exited;
    clearTimeout(t);
  }
}

export interface GcStats {
  ms: number;
  markCompacts: number;
  scavenges: number;
}

/** A --trace-gc line: "[pid:0x..]  1234 ms: Mark-Compact 10.0 (13.0) -> 8.0 (12.0) MB, pooled: 0 MB, 4.56 / 0.00 ms ..." */
const GC_LINE = /\d+ ms: (Scavenge|Minor Mark-Sweep|Mark-Compact(?: \(reduce\))?) .*? MB, (?:pooled: [\d.]+ MB, )?([\d.]+) \/ [\d.]+ ms/;
const INCREMENTAL = /\(\+ ([\d.]+) ms in \d+ steps/;

export function gcDelta(a: GcStats, b: GcStats): GcStats {
  return { ms: b.ms - a.ms, markCompacts: b.markCompacts - a.markCompacts, scavenges: b.scavenges - a.scavenges };
}

/**
 * What the source agent's log says it did (initial scan, mirrors), one line
 * each, for the report's breakdowns. Empty when the log has no such records.
 */
export async function sourcePhases(agent: BenchAgent): Promise<string[]> {
  const out: string[] = [];
  for (const r of await agent.logRecords("initial scan done; watching")) out.push(`initial scan: ${r.ms} ms, ${r.files} entries, ${r.dataBytes} data bytes journaled`);
  const starts = await agent.logRecords("mirror starting");
  for (const [i, r] of (await agent.logRecords("mirror complete")).entries()) {
    const s = starts[i];
    out.push(`mirror${s ? ` (mode ${s.mode}, reason: ${s.reason})` : ""}: ${Number(r.seconds).toFixed(2)} s, ${r.filesDone} files, ${r.bytesSent} bytes sent`);
  }
  return out;
}

/** Make a CA and certificates for both agents with the product's own CLI. */
export async function makeCerts(dir: string): Promise<{ source: TlsConfig; target: TlsConfig }> {
  await mkdir(dir, { recursive: true });
  await mustRun(process.execPath, [CLI, "certs", "init", "--dir", dir]);
  await mustRun(process.execPath, [CLI, "certs", "issue", "--dir", dir, "--name", "src-agent"]);
  await mustRun(process.execPath, [CLI, "certs", "issue", "--dir", dir, "--name", "dst-agent"]);
  const tls = (name: string): TlsConfig => ({ ca: path.join(dir, "ca.crt"), cert: path.join(dir, `${name}.crt`), key: path.join(dir, `${name}.key`) });
  return { source: tls("src-agent"), target: tls("dst-agent") };
}

export interface BenchPairOptions {
  /** working directory: src/, dst/, state and logs go here */
  dir: string;
  /** mutual TLS with certificates made by `understudy certs`; default insecure (loopback only) */
  mtls?: boolean;
  /** extra fields of the replication set (compression, queueMemory, ...) */
  setOptions?: Record<string, unknown>;
  /** where the source sends to, given the target's port (default: the target itself) */
  sendTo?: (targetPort: number) => string | Promise<string>;
  /** pin both agents to these CPUs (`taskset -c`), e.g. "0" for one core */
  cpus?: string;
}

function isCaughtUp(s: SourceSetStatus): boolean {
  const t = s.targets[0];
  return s.state === "replicating" && t !== undefined && t.state === "idle" && !t.mirror?.active && t.lastAckedSeq >= s.lastSeq;
}

/** A source agent replicating `<dir>/src` (set "data") to a target agent with root `<dir>/dst`. */
export class BenchPair {
  readonly dir: string;
  readonly src: string;
  readonly image: string;
  readonly source: BenchAgent;
  readonly target: BenchAgent;

  private constructor(dir: string, source: BenchAgent, target: BenchAgent) {
    this.dir = dir;
    this.src = BenchPair.srcOf(dir);
    this.image = BenchPair.imageOf(dir);
    this.source = source;
    this.target = target;
  }

  /** The source directory of a pair made in `dir`. */
  static srcOf(dir: string): string {
    return path.join(dir, "src");
  }

  /** Where the target puts the replica of a pair made in `dir`: <root>/<source agent>/<set>. */
  static imageOf(dir: string): string {
    return path.join(dir, "dst", "src-agent", "data");
  }

  static async create(o: BenchPairOptions): Promise<BenchPair> {
    const dir = o.dir;
    await mkdir(path.join(dir, "src"), { recursive: true });
    const [sp, tp] = [await freePort(), await freePort()];
    const insecure: TlsConfig = { insecure: true };
    const tls = o.mtls ? await makeCerts(path.join(dir, "certs")) : { source: insecure, target: insecure };
    const sendTo = (await o.sendTo?.(tp)) ?? `127.0.0.1:${tp}`;
    const tcfg = { name: "dst-agent", listen: `127.0.0.1:${tp}`, dataDir: "state-dst", tls: tls.target, target: { root: "dst" } };
    const scfg = { name: "src-agent", listen: `127.0.0.1:${sp}`, dataDir: "state-src", tls: tls.source, source: { sets: [{ name: "data", path: "src", targets: [sendTo], ...o.setOptions }] } };
    await writeFile(path.join(dir, "target.yaml"), YAML.stringify(tcfg));
    await writeFile(path.join(dir, "source.yaml"), YAML.stringify(scfg));
    const target = new BenchAgent({ name: "dst-agent", configPath: path.join(dir, "target.yaml"), port: tp, logPath: path.join(dir, "target.log"), tls: tls.target, cpus: o.cpus });
    const source = new BenchAgent({ name: "src-agent", configPath: path.join(dir, "source.yaml"), port: sp, logPath: path.join(dir, "source.log"), tls: tls.source, cpus: o.cpus });
    return new BenchPair(dir, source, target);
  }

  async start(): Promise<void> {
    await this.target.start();
    await this.source.start();
  }

  /**
   * True when the source has finished its initial scan, no mirror is running,
   * and its target has acknowledged (applied and fsynced) everything
   * journaled so far, so the sender has gone idle.
   */
  async caughtUp(): Promise<boolean> {
    return isCaughtUp(await this.source.set());
  }

  /** Wait until the source finished its initial scan and is connected to its target. */
  async waitConnected(timeoutMs = 30_000): Promise<void> {
    await pollUntil("the source to be connected to its target", async () => {
      const s = await this.source.set();
      const st = s.targets[0]?.state;
      return s.state === "replicating" && (st === "idle" || st === "replicating");
    }, timeoutMs, 50);
  }

  /**
   * Wait for caughtUp(). Gives up early when the sender has failed
   * `giveUpAfterRetries` times (a replication that keeps failing will not
   * finish by waiting); either error says where replication stood.
   */
  async waitCaughtUp(what: string, timeoutMs: number, o: { giveUpAfterRetries?: number } = {}): Promise<void> {
    const deadline = nowMs() + timeoutMs;
    for (;;) {
      const s = await this.source.set().catch(() => undefined);
      if (s && isCaughtUp(s)) return;
      const t = s?.targets[0];
      if (o.giveUpAfterRetries && t && t.retries >= o.giveUpAfterRetries && t.lastError) throw new Error(`gave up waiting for ${what} after the sender failed ${t.retries} times; source status: ${await this.describe()}`);
      if (nowMs() > deadline) throw new Error(`timed out after ${fmtMs(timeoutMs)} waiting for ${what}; source status: ${await this.describe()}`);
      await sleep(50);
    }
  }

  /** One line on the source's replication state, for error messages. */
  async describe(): Promise<string> {
    try {
      const s = await this.source.set();
      const t = s.targets[0];
      const m = t?.mirror;
      return `set ${s.state}, lastSeq ${s.lastSeq}, files ${s.files}${s.lastError ? `, error ${JSON.stringify(s.lastError)}` : ""}; target ${t?.state}, acked ${t?.lastAckedSeq}, retries ${t?.retries}${t?.lastError ? `, error ${JSON.stringify(t.lastError)}` : ""}${m?.active ? `; mirror ${m.filesDone}/${m.filesTotal} files, ${m.bytesDone}/${m.bytesTotal} bytes` : ""}`;
    } catch (e) {
      return `status unavailable: ${(e as Error).message}`;
    }
  }

  async stop(): Promise<void> {
    await Promise.all([this.source.stop(), this.target.stop()]);
  }
}
