// Test harness for real agent processes: temp dirs, agent configs, spawning
// and kill -9, polling assertions that re-read the truth with a deadline, and
// byte-for-byte tree comparison (type, content, modes, owners, mtimes, link
// targets, device numbers, extended attributes, hard-link groups, and on
// request allocated blocks).
import { spawn, type ChildProcess, type SpawnOptions } from "node:child_process";
import { createHash } from "node:crypto";
import { closeSync, createReadStream, openSync } from "node:fs";
import { lstat, mkdtemp, readdir, readlink, rm, writeFile, mkdir, readFile } from "node:fs/promises";
import { createServer } from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import YAML from "yaml";
import { getAttribute, listAttributes } from "@napi-rs/xattr";
import { fetchStatus } from "../../agent/control-client.ts";
import type { StatusResponse } from "../../agent/wire.ts";
import type { TlsConfig } from "../../common/config.ts";

export const REPO = fileURLToPath(new URL("../..", import.meta.url));
export const CLI = path.join(REPO, "bin", "understudy.mjs");

/**
 * The environment an agent is meant to run with (README, "Running agents"):
 * glibc's malloc otherwise raises its mmap threshold after the first large
 * free, and the megabyte packet buffers then fragment the heap instead of
 * going back to the system.
 */
export const AGENT_ENV = { MALLOC_MMAP_THRESHOLD_: "131072" };

/** Run the `understudy` command; its exit code and output, whatever the code. */
export async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const { execFile } = await import("node:child_process");
  return new Promise((resolve) =>
    execFile(process.execPath, [CLI, ...args], { maxBuffer: 16 << 20 }, (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr })),
  );
}

export async function tmpDir(prefix = "understudy-"): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), prefix));
}

/** Ports freePort handed out in this process: the kernel may offer a just-closed port again. */
const handedOut = new Set<number>();

/**
 * A loopback port nothing listens on, never one this process was given before: a test that asks for
 * several at once (an operator's health, metrics and dashboard ports) must not get the same one twice
 * (seen in CI: the dashboard's port was one the operator had just bound, EADDRINUSE).
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((resolve, reject) => {
      const s = createServer();
      s.listen(0, "127.0.0.1", () => {
        const a = s.address();
        s.close(() => (typeof a === "object" && a ? resolve(a.port) : reject(new Error("no port"))));
      });
    });
    if (!handedOut.has(port)) {
      handedOut.add(port);
      return port;
    }
  }
}

export async function waitFor<T>(what: string, probe: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 30_000, everyMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined && v !== false) return v as T;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${(last as Error).message}` : ""}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** How ChildProc starts a process: child_process.spawn, or e.g. a netns host's exec. */
export type Spawner = (cmd: string, args: readonly string[], opts: SpawnOptions) => ChildProcess;

/**
 * A child process with stdout and stderr appended to a log file, and the
 * lifecycle agents and the operator share: log(), pid, kill9(), and stop()
 * (SIGTERM, then SIGKILL if it is still running after a grace period).
 */
export class ChildProc {
  readonly logPath: string;
  proc?: ChildProcess;
  private exited?: Promise<number | null>;
  private readonly stopGraceMs: number;

  constructor(logPath: string, stopGraceMs: number) {
    this.logPath = logPath;
    this.stopGraceMs = stopGraceMs;
  }

  /** Spawn (with `via`, child_process.spawn by default), output appended to the log; becomes `proc`. */
  protected spawnLogged(cmd: string, args: readonly string[], env: NodeJS.ProcessEnv, via: Spawner = spawn): ChildProcess {
    const fd = openSync(this.logPath, "a");
    let p: ChildProcess;
    try {
      p = via(cmd, args, { stdio: ["ignore", fd, fd], env });
    } finally {
      closeSync(fd); // the child has its own copy
    }
    this.proc = p;
    this.exited = new Promise((r) => p.once("exit", (code) => r(code)));
    return p;
  }

  async log(): Promise<string> {
    return readFile(this.logPath, "utf8").catch(() => "");
  }

  get pid(): number {
    return this.proc!.pid!;
  }

  /** Started, and neither exited nor killed by a signal. */
  get alive(): boolean {
    return !!this.proc && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  async kill9(): Promise<void> {
    if (!this.alive) return;
    this.proc!.kill("SIGKILL");
    await this.exited;
  }

  async stop(): Promise<void> {
    if (!this.alive) return;
    this.proc!.kill("SIGTERM");
    const t = setTimeout(() => this.proc?.kill("SIGKILL"), this.stopGraceMs);
    await this.exited;
    clearTimeout(t);
  }
}

export class AgentProc extends ChildProc {
  readonly name: string;
  readonly configPath: string;
  readonly port: number;

  readonly listenHost: string;

  constructor(name: string, configPath: string, port: number, logPath: string, host = "127.0.0.1") {
    super(logPath, 10_000);
    this.name = name;
    this.configPath = configPath;
    this.port = port;
    this.listenHost = host;
  }

  get address(): string {
    return `${this.listenHost}:${this.port}`;
  }

  /** Start the agent and wait until its Control service answers (over mTLS when `tls` is given). */
  async start(tls: TlsConfig = { insecure: true }): Promise<void> {
    const p = this.spawnLogged(process.execPath, [CLI, "agent", "--config", this.configPath], { ...AGENT_ENV, ...process.env, UNDERSTUDY_LOG_LEVEL: process.env.UNDERSTUDY_LOG_LEVEL ?? "info" });
    await waitFor(`agent ${this.name} to answer on ${this.address}`, async () => {
      if (p.exitCode !== null) throw new Error(`agent ${this.name} exited with ${p.exitCode}; log:\n${await this.log()}`);
      return (await fetchStatus(this.address, tls, 1000).catch(() => undefined)) ?? false;
    }, 60_000); // generous: start-up on a loaded CI machine takes a while
  }

  status(): Promise<StatusResponse> {
    return fetchStatus(this.address, { insecure: true });
  }

  /** Resident memory of the agent process, from /proc. */
  async rssBytes(): Promise<number> {
    const s = await readFile(`/proc/${this.pid}/status`, "utf8");
    const m = /VmRSS:\s+(\d+) kB/.exec(s);
    return m ? Number(m[1]) * 1024 : 0;
  }
}

export interface PairOptions {
  sets?: Record<string, unknown>[];
  /** Top-level fields of the source agent's config (e.g. another dataDir). */
  sourceConfig?: Record<string, unknown>;
  setOptions?: Record<string, unknown>;
  targetOptions?: Record<string, unknown>;
}

/** A source agent replicating `<dir>/src` to a target agent with root `<dir>/dst`. */
export class Pair {
  readonly dir: string;
  readonly src: string;
  readonly dstRoot: string;
  source!: AgentProc;
  target!: AgentProc;

  constructor(dir: string) {
    this.dir = dir;
    this.src = path.join(dir, "src");
    this.dstRoot = path.join(dir, "dst");
  }

  /** The image of set `set` on the target. */
  image(set = "data"): string {
    return path.join(this.dstRoot, "src-agent", set);
  }

  static async create(o: PairOptions = {}): Promise<Pair> {
    const p = new Pair(await tmpDir());
    await mkdir(p.src, { recursive: true });
    // two free ports, not the same one twice (the kernel may hand a just-closed port out again)
    const sp = await freePort();
    let tp = await freePort();
    while (tp === sp) tp = await freePort();
    const tcfg = { name: "dst-agent", listen: `127.0.0.1:${tp}`, dataDir: "state-dst", tls: { insecure: true }, target: { root: "dst", ...o.targetOptions } };
    const scfg = { name: "src-agent", listen: `127.0.0.1:${sp}`, dataDir: "state-src", tls: { insecure: true }, source: { sets: o.sets ?? [{ name: "data", path: "src", targets: [`127.0.0.1:${tp}`], ...o.setOptions }] }, ...o.sourceConfig };
    await writeFile(path.join(p.dir, "target.yaml"), YAML.stringify(tcfg));
    await writeFile(path.join(p.dir, "source.yaml"), YAML.stringify(scfg));
    p.target = new AgentProc("dst-agent", path.join(p.dir, "target.yaml"), tp, path.join(p.dir, "target.log"));
    p.source = new AgentProc("src-agent", path.join(p.dir, "source.yaml"), sp, path.join(p.dir, "source.log"));
    return p;
  }

  async start(): Promise<void> {
    await this.target.start();
    await this.source.start();
  }

  /** Wait until the image equals the source tree; fails with the differences. */
  async waitEqual(set = "data", timeoutMs = 60_000, ignore: string[] = []): Promise<void> {
    let diff: string[] = [];
    try {
      await waitFor("target tree to equal source tree", async () => {
        const a = await snapshotTree(this.src);
        for (const p of ignore) a.delete(p);
        diff = compareTrees(a, await snapshotTree(this.image(set)));
        return diff.length === 0;
      }, timeoutMs, 250);
    } catch (e) {
      throw new Error(`${(e as Error).message}\ndifferences (first 20):\n  ${diff.slice(0, 20).join("\n  ")}\nsource log tail:\n${(await this.source.log()).split("\n").slice(-15).join("\n")}\ntarget log tail:\n${(await this.target.log()).split("\n").slice(-15).join("\n")}`);
    }
  }

  /** waitEqual, with source paths that are excluded from the set left out. */
  waitEqualExcept(ignore: string[], timeoutMs = 60_000): Promise<void> {
    return this.waitEqual("data", timeoutMs, ignore);
  }

  async stop(): Promise<void> {
    await Promise.all([this.source?.stop(), this.target?.stop()]);
  }

  async cleanup(): Promise<void> {
    await this.stop();
    if (!process.env.KEEP_TEST_DIRS) await rm(this.dir, { recursive: true, force: true });
  }
}

export interface NodeInfo {
  /** f, d, l, p (fifo), c, b (devices), s (socket), o (other) */
  type: "f" | "d" | "l" | "p" | "c" | "b" | "s" | "o";
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtimeUs: bigint;
  sha?: string;
  link?: string;
  ino: bigint;
  nlink: number;
  /** device number (c, b) */
  rdev: bigint;
  /** every extended attribute, name=hex(value), sorted (read here with the syscalls, not the agent's filter) */
  xattrs: string[];
  /** bytes allocated on disk (st_blocks × 512) */
  allocated: number;
}

async function sha256(file: string): Promise<string> {
  const h = createHash("sha256");
  for await (const c of createReadStream(file)) h.update(c as Buffer);
  return h.digest("hex");
}

/** Everything below root (root itself excluded), keyed by relative path. */
export async function snapshotTree(root: string): Promise<Map<string, NodeInfo>> {
  const out = new Map<string, NodeInfo>();
  const walk = async (rel: string) => {
    const abs = rel ? path.join(root, rel) : root;
    let names: string[];
    try {
      names = await readdir(abs);
    } catch (e) {
      if (rel === "" && (e as NodeJS.ErrnoException).code === "ENOENT") return;
      throw e;
    }
    for (const n of names.sort()) {
      const r = rel ? `${rel}/${n}` : n;
      const p = path.join(root, r);
      const st = await lstat(p, { bigint: true });
      const type = st.isFile() ? "f" : st.isDirectory() ? "d" : st.isSymbolicLink() ? "l" : st.isFIFO() ? "p" : st.isCharacterDevice() ? "c" : st.isBlockDevice() ? "b" : st.isSocket() ? "s" : "o";
      const xattrs: string[] = [];
      for (const name of (await listAttributes(p).catch(() => [] as string[])).sort()) xattrs.push(`${name}=${(await getAttribute(p, name))?.toString("hex") ?? "?"}`);
      const info: NodeInfo = { type, mode: Number(st.mode & 0o7777n), uid: Number(st.uid), gid: Number(st.gid), size: type === "f" ? Number(st.size) : 0, mtimeUs: st.mtimeNs / 1000n, ino: st.ino, nlink: Number(st.nlink), rdev: type === "c" || type === "b" ? st.rdev : 0n, xattrs, allocated: Number(st.blocks) * 512 };
      if (type === "f") info.sha = await sha256(p);
      if (type === "l") info.link = await readlink(p);
      out.set(r, info);
      if (type === "d") await walk(r);
    }
  };
  await walk("");
  return out;
}

export interface CompareOptions {
  /** Also compare allocated bytes of files: b's may differ from a's by at most this much (sparse files must stay sparse). */
  allocSlack?: number;
}

/** Differences between two trees, one line each (empty = identical). */
export function compareTrees(a: Map<string, NodeInfo>, b: Map<string, NodeInfo>, o: CompareOptions = {}): string[] {
  const diff: string[] = [];
  for (const [p, x] of a) {
    const y = b.get(p);
    if (!y) {
      diff.push(`missing on target: ${p} (${x.type})`);
      continue;
    }
    if (x.type !== y.type) diff.push(`${p}: type ${x.type} vs ${y.type}`);
    else {
      if (x.type === "f" && (x.size !== y.size || x.sha !== y.sha)) diff.push(`${p}: content differs (size ${x.size} vs ${y.size})`);
      if (x.type === "l" && x.link !== y.link) diff.push(`${p}: link target ${x.link} vs ${y.link}`);
      if (x.type !== "l" && x.mode !== y.mode) diff.push(`${p}: mode ${x.mode.toString(8)} vs ${y.mode.toString(8)}`);
      if (x.uid !== y.uid || x.gid !== y.gid) diff.push(`${p}: owner ${x.uid}:${x.gid} vs ${y.uid}:${y.gid}`);
      if (x.mtimeUs !== y.mtimeUs) diff.push(`${p}: mtime ${x.mtimeUs} vs ${y.mtimeUs} (µs)`);
      if (x.type !== "d" && x.type !== "l" && x.nlink !== y.nlink) diff.push(`${p}: link count ${x.nlink} vs ${y.nlink}`);
      if (x.rdev !== y.rdev) diff.push(`${p}: device number ${x.rdev} vs ${y.rdev}`);
      if (x.xattrs.join("\n") !== y.xattrs.join("\n")) diff.push(`${p}: xattrs [${x.xattrs.join(", ")}] vs [${y.xattrs.join(", ")}]`);
      if (o.allocSlack !== undefined && x.type === "f" && Math.abs(x.allocated - y.allocated) > o.allocSlack) diff.push(`${p}: ${x.allocated} bytes allocated vs ${y.allocated}`);
    }
  }
  for (const p of b.keys()) if (!a.has(p)) diff.push(`extra on target: ${p}`);
  // Hard-link groups must match: paths sharing an inode on one side share one on the other.
  const groups = (m: Map<string, NodeInfo>) => {
    const g = new Map<bigint, string[]>();
    for (const [p, x] of m) if (x.type !== "d" && x.type !== "l" && x.nlink > 1) g.set(x.ino, [...(g.get(x.ino) ?? []), p]);
    return new Set([...g.values()].map((v) => v.sort().join("|")));
  };
  const ga = groups(a);
  const gb = groups(b);
  for (const g of ga) if (!gb.has(g)) diff.push(`hard-link group not on target: ${g}`);
  return diff;
}
