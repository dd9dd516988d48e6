// A random workload of every operation kind the engine must capture: writes at
// any offset, appends, truncates (shrink and grow), creates, deletes, renames
// of files and whole directories, mkdir/rmdir, chmod, chown, utimes, symlinks
// (create and retarget), and hard links. Deterministic for a given seed.
import { appendFile, chmod, chown, link, lstat, mkdir, open, readdir, rename, rm, rmdir, symlink, truncate, unlink, utimes, writeFile } from "node:fs/promises";
import path from "node:path";

export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 0x100000000;
  };
}

export interface WorkloadStats {
  [op: string]: number;
}

export class Workload {
  readonly root: string;
  private readonly r: () => number;
  readonly stats: WorkloadStats = {};
  private n = 0;

  constructor(root: string, seed: number) {
    this.root = root;
    this.r = rng(seed);
  }

  private pick<T>(xs: T[]): T | undefined {
    return xs.length ? xs[Math.floor(this.r() * xs.length)] : undefined;
  }

  private int(max: number): number {
    return Math.floor(this.r() * max);
  }

  private bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n + 4);
    for (let i = 0; i < n; i += 4) b.writeUInt32LE((this.r() * 0x100000000) >>> 0, i);
    // Some runs of zeros, so sparse handling is exercised too.
    if (n > 8192 && this.int(3) === 0) b.fill(0, this.int(n / 2), Math.floor(n / 2) + this.int(n / 2));
    return b.subarray(0, n);
  }

  /** Everything under root: [files, dirs (incl. ""), symlinks]. */
  async list(): Promise<{ files: string[]; dirs: string[]; links: string[] }> {
    const files: string[] = [];
    const dirs: string[] = [""];
    const links: string[] = [];
    const walk = async (rel: string) => {
      for (const e of await readdir(path.join(this.root, rel), { withFileTypes: true })) {
        const r = rel ? `${rel}/${e.name}` : e.name;
        if (e.isSymbolicLink()) links.push(r);
        else if (e.isDirectory()) {
          dirs.push(r);
          await walk(r);
        } else if (e.isFile()) files.push(r);
      }
    };
    await walk("");
    return { files, dirs, links };
  }

  private abs(rel: string): string {
    return path.join(this.root, rel);
  }

  private fresh(dir: string, prefix: string): string {
    this.n++;
    return dir ? `${dir}/${prefix}${this.n}` : `${prefix}${this.n}`;
  }

  /** One random operation; returns its name. */
  async step(): Promise<string> {
    const { files, dirs, links } = await this.list();
    const x = this.r();
    const dir = this.pick(dirs) ?? "";
    const file = this.pick(files);
    let op = "noop";
    try {
      if (x < 0.14 || !file) {
        op = "create";
        const f = this.fresh(dir, "f");
        await writeFile(this.abs(f), this.bytes(this.int(3) === 0 ? this.int(300_000) : this.int(5000)));
      } else if (x < 0.3) {
        op = "write";
        const st = await lstat(this.abs(file));
        const fh = await open(this.abs(file), "r+");
        await fh.write(this.bytes(1 + this.int(20_000)), 0, undefined, this.int(Number(st.size) + 1000));
        await fh.close();
      } else if (x < 0.38) {
        op = "append";
        await appendFile(this.abs(file), this.bytes(1 + this.int(3000)));
      } else if (x < 0.44) {
        op = "truncate";
        const st = await lstat(this.abs(file));
        await truncate(this.abs(file), this.int(Number(st.size) * 2 + 10));
      } else if (x < 0.5) {
        op = "delete";
        await unlink(this.abs(file));
      } else if (x < 0.56) {
        op = "rename-file";
        await rename(this.abs(file), this.abs(this.fresh(this.pick(dirs) ?? "", "r")));
      } else if (x < 0.62) {
        op = "mkdir";
        await mkdir(this.abs(this.fresh(dir, "d")));
      } else if (x < 0.66) {
        op = "rename-dir";
        const d = this.pick(dirs.filter((d) => d !== ""));
        if (d) {
          const to = this.fresh(this.pick(dirs.filter((t) => t !== d && !t.startsWith(d + "/"))) ?? "", "m");
          await rename(this.abs(d), this.abs(to));
        }
      } else if (x < 0.69) {
        op = "rmdir";
        const d = this.pick(dirs.filter((d) => d !== ""));
        if (d) {
          if (this.int(2) === 0) await rmdir(this.abs(d)).catch(() => undefined);
          else await rm(this.abs(d), { recursive: true });
        }
      } else if (x < 0.75) {
        op = "chmod";
        await chmod(this.abs(this.pick([...files, ...dirs.filter((d) => d)]) ?? file), this.pick([0o600, 0o644, 0o640, 0o755, 0o700, 0o4755, 0o1777, 0o444])!);
      } else if (x < 0.79 && process.getuid?.() === 0) {
        op = "chown";
        await chown(this.abs(file), 1000 + this.int(3), 1000 + this.int(3));
      } else if (x < 0.84) {
        op = "utimes";
        const t = 1_600_000_000 + this.int(100_000_000) + this.int(1_000_000) / 1_000_000;
        await utimes(this.abs(this.pick([...files, ...dirs.filter((d) => d)]) ?? file), t, t);
      } else if (x < 0.9) {
        op = "symlink";
        const l = this.pick(links);
        if (l && this.int(2) === 0) {
          await unlink(this.abs(l));
          await symlink(this.pick(["../elsewhere", "/etc/passwd", file, "nonexistent"])!, this.abs(l));
          op = "symlink-retarget";
        } else await symlink(this.pick([file, "../x", "/tmp", "dangling"])!, this.abs(this.fresh(dir, "l")));
      } else if (x < 0.94) {
        op = "hardlink";
        await link(this.abs(file), this.abs(this.fresh(dir, "h")));
      } else {
        op = "rewrite";
        // Save-by-rename, the way editors write files.
        const tmp = this.fresh(path.posix.dirname(file) === "." ? "" : path.posix.dirname(file), ".tmp");
        await writeFile(this.abs(tmp), this.bytes(this.int(10_000)));
        await rename(this.abs(tmp), this.abs(file));
      }
    } catch (e) {
      const c = (e as NodeJS.ErrnoException).code;
      // Races within our own random choices (e.g. the dir was just removed) are fine.
      if (c !== "ENOENT" && c !== "ENOTEMPTY" && c !== "EEXIST" && c !== "ENOTDIR" && c !== "EISDIR" && c !== "EINVAL") throw e;
      op += "-skipped";
    }
    this.stats[op] = (this.stats[op] ?? 0) + 1;
    return op;
  }

  async run(steps: number, pauseMs = 0): Promise<void> {
    for (let i = 0; i < steps; i++) {
      await this.step();
      if (pauseMs) await new Promise((r) => setTimeout(r, this.int(pauseMs)));
    }
  }
}
