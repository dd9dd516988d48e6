// moto's server (https://github.com/getmoto/moto) as a stand-in for AWS: EC2,
// S3 and the rest spoken over HTTP on a port of this machine, so the operator's
// AWS code is tested through the real AWS SDK with no mocks in the process.
//
// The server runs from a Python venv with moto[server] pinned to MOTO_VERSION,
// built once per machine under ${UNDERSTUDY_CACHE:-~/.cache/understudy}/moto-<version>
// (like the control-plane binaries of build-k8s.sh), so only the first run
// pays for the pip install. Needs python3 (3.10+, for moto 5.2) and, when that python has no
// ensurepip (Debian's without python3-venv), its pip.
//
//   npx node test/env/moto.ts --ensure        build the venv now (CI), print its dir
//   npx node test/env/moto.ts [--host ADDR]   run a server until Ctrl-C
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { closeSync, existsSync, openSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rename, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import os from "node:os";
import path from "node:path";
import { SETPRIV, installExitHook, live, removeOnExit } from "./exit-cleanup.ts";

export const MOTO_VERSION = "5.2.5";
/** marker written last into a complete venv */
const MARKER = ".understudy-moto-ok";
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 5_000;
const INSTALL_TIMEOUT_MS = 20 * 60_000;

export interface MotoOptions {
  /** address the server binds and the endpoint names (default 127.0.0.1; IPv6 literals without brackets) */
  host?: string;
  /** the server's stdout+stderr (default moto.log in a fresh temp dir, removed by stop() or at exit unless keep) */
  logFile?: string;
  /** keep the default log dir after stop() (also: UNDERSTUDY_KEEP_MOTO=1) */
  keep?: boolean;
  /** deadline for the server to answer (default 60 s; the venv build, if any, comes before and is not counted) */
  startTimeoutMs?: number;
  /** progress messages (venv build); default silent */
  log?: (s: string) => void;
  /**
   * extra environment for the server; by default moto checks, as AWS does, that an
   * AMI, key pair and instance type named in RunInstances exist (MOTO_VALIDATION);
   * set one to "false" here to turn that check off
   */
  env?: Record<string, string>;
}

/** moto's opt-in checks that make RunInstances fail on what AWS would refuse */
export const MOTO_VALIDATION: Record<string, string> = {
  MOTO_ENABLE_AMI_VALIDATION: "true",
  MOTO_ENABLE_KEYPAIR_VALIDATION: "true",
  MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION: "true",
};

export interface Moto {
  /** http://<host>:<port>, for the SDK clients' endpoint */
  endpoint: string;
  host: string;
  port: number;
  logFile: string;
  pid: number;
  /** forget every resource (moto's /moto-api/reset) */
  reset(): Promise<void>;
  /** SIGTERM (SIGKILL after 5 s); idempotent */
  stop(): Promise<void>;
}

// ---------------------------------------------------------------------------
// the venv

export function cacheRoot(): string {
  const env = process.env;
  return env.UNDERSTUDY_CACHE || path.join(env.XDG_CACHE_HOME || path.join(os.homedir(), ".cache"), "understudy");
}

export function venvDir(): string {
  return path.join(cacheRoot(), `moto-${MOTO_VERSION}`);
}

function venvPython(dir: string): string {
  return path.join(dir, "bin", "python");
}

function ready(dir: string): boolean {
  // existsSync follows the bin/python symlink: a venv whose base python is gone is not ready
  return existsSync(path.join(dir, MARKER)) && existsSync(venvPython(dir));
}

let ensuring: Promise<string> | undefined;

/**
 * The python of a venv with moto[server]==MOTO_VERSION, building it the first time
 * (a minute or two, mostly pip). The venv is built beside its final place and
 * renamed into it, so a crash or a concurrent build never leaves a half venv
 * there; servers are run as `python -m moto.server`, which does not depend on
 * the venv's path (its console scripts' shebangs do).
 */
export function ensureMotoVenv(log: (s: string) => void = () => {}): Promise<string> {
  ensuring ??= build(log).finally(() => (ensuring = undefined));
  return ensuring;
}

async function build(log: (s: string) => void): Promise<string> {
  const dir = venvDir();
  if (ready(dir)) return venvPython(dir);
  await mkdir(path.dirname(dir), { recursive: true });
  const tmp = `${dir}.build-${process.pid}-${randomBytes(3).toString("hex")}`;
  const python = process.env.UNDERSTUDY_PYTHON || "python3";
  const t0 = Date.now();
  log(`[moto] building ${dir} (moto[server]==${MOTO_VERSION}, first time only)`);
  try {
    const pipArgs = ["install", "--disable-pip-version-check", "--no-input", "--quiet", `moto[server]==${MOTO_VERSION}`];
    const withPip = await run(python, ["-m", "venv", tmp]);
    if (withPip.code === 0) {
      await must(venvPython(tmp), ["-m", "pip", ...pipArgs]);
    } else {
      // no ensurepip (Debian without python3-venv): an empty venv, filled by the system's pip (>= 22.3 for --python)
      log(`[moto] ${python} -m venv failed (${lastLine(withPip.stderr)}); trying --without-pip and the system pip`);
      await rm(tmp, { recursive: true, force: true });
      await must(python, ["-m", "venv", "--without-pip", tmp]);
      await must(python, ["-m", "pip", "--python", venvPython(tmp), ...pipArgs]);
    }
    const check = await must(venvPython(tmp), ["-c", "import moto, moto.server; print(moto.__version__)"]);
    if (check.stdout.trim() !== MOTO_VERSION) throw new Error(`venv has moto ${check.stdout.trim()}, wanted ${MOTO_VERSION}`);
    await writeFile(path.join(tmp, MARKER), `moto ${MOTO_VERSION}\n`);
    try {
      await rename(tmp, dir);
    } catch (e) {
      // another process finished first (its dir is complete: it was renamed whole); ours is spare
      if (!ready(dir)) throw e;
    }
    log(`[moto] venv ready in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    return venvPython(dir);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

function run(bin: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, PIP_NO_INPUT: "1" } });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), INSTALL_TIMEOUT_MS);
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ code: 127, stdout, stderr: `${stderr}${e.message}\n` });
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? 128 + (signal ? (os.constants.signals[signal] ?? 0) : 0), stdout, stderr });
    });
  });
}

async function must(bin: string, args: string[]): Promise<RunResult> {
  const r = await run(bin, args);
  if (r.code !== 0) throw new Error(`${bin} ${args.join(" ")} failed (exit ${r.code}):\n${tail(r.stderr || r.stdout, 30)}`);
  return r;
}

function tail(s: string, lines: number): string {
  return s.trimEnd().split("\n").slice(-lines).join("\n");
}

function lastLine(s: string): string {
  return tail(s, 1) || "no output";
}

// ---------------------------------------------------------------------------
// the server


/** A port free on `host` right now (moto binds it a moment later; a lost race shows as an early exit and is retried). */
async function freePort(host: string): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve, reject) => s.once("error", reject).listen(0, host, resolve));
  const a = s.address();
  await new Promise((r) => s.close(r));
  if (typeof a !== "object" || !a) throw new Error(`freePort: no address on ${host}`);
  return a.port;
}

function hostInUrl(host: string): string {
  return host.includes(":") ? `[${host}]` : host;
}

/**
 * Start a moto server on a free port of `host` (building the venv first if needed)
 * and wait until it answers. It dies with this process, however that dies.
 */
export async function startMoto(opts: MotoOptions = {}): Promise<Moto> {
  const host = opts.host ?? "127.0.0.1";
  const python = await ensureMotoVenv(opts.log);
  const ownDir = opts.logFile ? undefined : await mkdtemp(path.join(os.tmpdir(), "understudy-moto-"));
  const logFile = opts.logFile ?? path.join(ownDir as string, "moto.log");
  const keep = opts.keep || process.env.UNDERSTUDY_KEEP_MOTO === "1";
  if (ownDir && !keep) removeOnExit.add(ownDir);
  const deadline = Date.now() + (opts.startTimeoutMs ?? START_TIMEOUT_MS);
  installExitHook();

  for (let attempt = 1; ; attempt++) {
    const port = await freePort(host);
    const endpoint = `http://${hostInUrl(host)}:${port}`;
    const fd = openSync(logFile, "a");
    const args = ["-m", "moto.server", "-H", host, "-p", String(port)];
    const [cmd, argv] = SETPRIV ? [SETPRIV, ["--pdeathsig", "KILL", "--", python, ...args]] : [python, args];
    let child: ChildProcess;
    try {
      // own process group: a Ctrl-C in the terminal reaches only us; stop() ends it
      child = spawn(cmd, argv, { stdio: ["ignore", fd, fd], detached: true, env: { ...process.env, ...MOTO_VALIDATION, ...opts.env, PYTHONUNBUFFERED: "1" } });
    } finally {
      closeSync(fd);
    }
    child.unref(); // a test that forgets stop() must still let the process exit (the exit hook kills)
    live.add(child);
    const exited = new Promise<void>((resolve) => {
      child.once("exit", () => resolve());
      child.once("error", () => resolve());
    });
    void exited.then(() => live.delete(child));
    const alive = () => child.exitCode === null && child.signalCode === null && live.has(child);

    let last = "";
    for (;;) {
      if (!alive()) break;
      try {
        const res = await fetch(`${endpoint}/moto-api/data.json`, { signal: AbortSignal.timeout(2000) });
        await res.arrayBuffer();
        if (res.ok) {
          let stopped = false;
          return {
            endpoint,
            host,
            port,
            logFile,
            pid: child.pid ?? 0,
            async reset() {
              const r = await fetch(`${endpoint}/moto-api/reset`, { method: "POST" });
              await r.arrayBuffer();
              if (!r.ok) throw new Error(`moto reset: HTTP ${r.status}`);
            },
            async stop() {
              if (stopped) return;
              stopped = true;
              if (alive()) {
                child.kill("SIGTERM");
                const t = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
                await exited;
                clearTimeout(t);
              }
              if (ownDir && !keep) {
                removeOnExit.delete(ownDir);
                await rm(ownDir, { recursive: true, force: true });
              }
            },
          };
        }
        last = `HTTP ${res.status}`;
      } catch (e) {
        last = (e as Error).message;
      }
      if (Date.now() > deadline) {
        child.kill("SIGKILL");
        await exited;
        throw new Error(`moto did not answer at ${endpoint} in time (last: ${last}); ${logFile} ends with:\n${await logTail(logFile)}`);
      }
      await new Promise((r) => setTimeout(r, 150));
    }
    const logText = await logTail(logFile);
    if (attempt < 3 && /address already in use/i.test(logText) && Date.now() < deadline) continue;
    throw new Error(`moto exited (code ${child.exitCode ?? child.signalCode}) before answering; ${logFile} ends with:\n${logText}`);
  }
}

async function logTail(file: string): Promise<string> {
  return tail(await readFile(file, "utf8").catch(() => ""), 30);
}

// ---------------------------------------------------------------------------
// command line

if (import.meta.main) {
  const argv = process.argv.slice(2);
  const log = (s: string) => process.stderr.write(`${s}\n`);
  if (argv.includes("--ensure")) {
    const t0 = Date.now();
    await ensureMotoVenv(log);
    log(`[moto] ${venvDir()} ok (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    process.stdout.write(`${venvDir()}\n`);
  } else {
    const i = argv.indexOf("--host");
    const moto = await startMoto({ host: i >= 0 ? argv[i + 1] : undefined, log, keep: true });
    log(`moto ${MOTO_VERSION} at ${moto.endpoint} (log ${moto.logFile}); Ctrl-C stops it`);
    process.stdout.write(`${moto.endpoint}\n`);
    const stop = () => void moto.stop().then(() => process.exit(0));
    process.once("SIGINT", stop);
    process.once("SIGTERM", stop);
    setInterval(() => {}, 1 << 30);
  }
}
