// CPU pressure for tests: put processes in a CPU-limited cgroup, the way a
// busy shared CI machine starves them. cgroup v1 (cpu controller at
// /sys/fs/cgroup/cpu) or v2 (cpu.max); where neither can be written (not
// root, no cpu controller), the same duty cycle is imposed with SIGSTOP and
// SIGCONT, which is what CFS bandwidth throttling does to a process anyway.
import { existsSync } from "node:fs";
import { mkdir, rmdir, writeFile, readFile } from "node:fs/promises";
import path from "node:path";

export interface CpuLimit {
  /** How the limit is imposed: "cgroup-v1", "cgroup-v2" or "signals". */
  readonly how: string;
  /** Put another process under the same limit. */
  add(pid: number): Promise<void>;
  /** Lift the limit (processes keep running, unthrottled). */
  release(): Promise<void>;
}

const PERIOD_US = 100_000;

/** Limit pids together to `fraction` of one CPU (e.g. 0.05). */
export async function limitCpu(pids: number[], fraction: number): Promise<CpuLimit> {
  const quota = Math.max(1000, Math.round(PERIOD_US * fraction));
  const name = `understudy-test-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
  const v1 = "/sys/fs/cgroup/cpu";
  const v2 = "/sys/fs/cgroup";
  try {
    if (existsSync(path.join(v1, "cpu.cfs_quota_us"))) {
      const dir = path.join(v1, name);
      await mkdir(dir);
      await writeFile(path.join(dir, "cpu.cfs_period_us"), String(PERIOD_US));
      await writeFile(path.join(dir, "cpu.cfs_quota_us"), String(quota));
      return await cgroupLimit("cgroup-v1", dir, path.join(v1, "cgroup.procs"), pids);
    }
    if ((await readFile(path.join(v2, "cgroup.controllers"), "utf8").catch(() => "")).split(/\s+/).includes("cpu")) {
      const dir = path.join(v2, name);
      await mkdir(dir);
      await writeFile(path.join(dir, "cpu.max"), `${quota} ${PERIOD_US}`);
      return await cgroupLimit("cgroup-v2", dir, path.join(v2, "cgroup.procs"), pids);
    }
  } catch {
    // not allowed here: fall back to signals
  }
  return signalLimit(pids, fraction);
}

async function cgroupLimit(how: string, dir: string, parentProcs: string, pids: number[]): Promise<CpuLimit> {
  const moved = new Set<number>();
  const add = async (pid: number) => {
    await writeFile(path.join(dir, "cgroup.procs"), String(pid));
    moved.add(pid);
  };
  for (const p of pids) await add(p);
  return {
    how,
    add,
    release: async () => {
      for (const p of moved) await writeFile(parentProcs, String(p)).catch(() => undefined); // (gone already: fine)
      await rmdir(dir).catch(() => undefined);
    },
  };
}

function signalLimit(pids: number[], fraction: number): CpuLimit {
  const set = new Set(pids);
  const runMs = Math.max(1, Math.round(100 * fraction));
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  const signal = (s: NodeJS.Signals) => {
    for (const p of set) {
      try {
        process.kill(p, s);
      } catch {
        set.delete(p);
      }
    }
  };
  const tick = () => {
    signal("SIGSTOP");
    stopped = true;
    timer = setTimeout(() => {
      signal("SIGCONT");
      stopped = false;
      timer = setTimeout(tick, runMs);
    }, 100 - runMs);
  };
  timer = setTimeout(tick, runMs);
  return {
    how: "signals",
    add: async (pid) => void set.add(pid),
    release: async () => {
      clearTimeout(timer);
      if (stopped) signal("SIGCONT");
    },
  };
}
