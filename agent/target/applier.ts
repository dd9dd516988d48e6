// Applies replicated operations to one image (<root>/<source>/<set>). Every
// path goes through ConfinedRoot; files are opened with O_NOFOLLOW and changed
// through their descriptor, so a replicated symlink is never followed.
// Every op is idempotent and "setting" (create truncates, writes carry absolute
// offsets, removes tolerate absence, a rename whose source is gone is done), so
// replaying a packet that was partly applied before a crash converges.
import { execFile } from "node:child_process";
import { constants as C } from "node:fs";
import { promisify } from "node:util";
import { lstat, mkdir, open, rename, rm, symlink, link, unlink, lchown, lutimes, type FileHandle } from "node:fs/promises";
import path from "node:path";
import type { Attr, Op } from "../wire.ts";
import { ConfinedRoot, PathError, splitRelPath, type PlannedKind } from "../fs/confine.ts";

export { PathError };

const WRITE_FLAGS = C.O_WRONLY | C.O_NOFOLLOW | C.O_CREAT;
/** More dirty files or directories than this are made durable with one syncfs. */
const SYNCFS_AFTER = 256;
let syncfsWorks: boolean | undefined;
const execFileP = promisify(execFile);
const MAX_OPEN = 128;
/** Files evicted from the handle cache that wait (open) for a sync; beyond this they are synced at once. */
const MAX_UNSYNCED = 512;

/** Seconds as a double that lands inside the right microsecond (utimes takes doubles). */
export function timeArg(sec: number, nsec: number): number {
  return sec + (Math.floor(nsec / 1000) * 1000 + 500) / 1e9;
}

export class Applier {
  readonly image: ConfinedRoot;
  private readonly canChown: boolean;
  private handles = new Map<string, FileHandle>();
  private unsynced: FileHandle[] = [];
  private dirtyDirs = new Set<string>();

  constructor(imageRoot: string, opts: { canChown?: boolean } = {}) {
    this.image = new ConfinedRoot(imageRoot);
    this.canChown = opts.canChown ?? process.getuid?.() === 0;
  }

  /**
   * Check a whole batch before touching anything: every op well-formed, every
   * path well-formed, and no directory on the way a symlink, either now or as
   * the batch's earlier ops leave it. Throws PathError.
   */
  async preflight(ops: Op[]): Promise<void> {
    const planned = new Map<string, PlannedKind>();
    const plan = (p: string, k: PlannedKind) => {
      if (k === "gone") for (const q of [...planned.keys()]) if (q.startsWith(p + "/")) planned.delete(q);
      planned.set(p, k);
    };
    for (const op of ops) {
      splitRelPath(op.path);
      await this.image.check(op.path, planned);
      const k = op.kind;
      const where = JSON.stringify(op.path);
      switch (k?.$case) {
        case undefined:
          throw new PathError(`op on ${where} has no kind`);
        case "rename": {
          splitRelPath(k.value.to);
          await this.image.check(k.value.to, planned);
          if (k.value.to === op.path || k.value.to.startsWith(op.path + "/")) throw new PathError(`cannot rename ${where} into itself`);
          const from = planned.get(op.path);
          plan(op.path, "gone");
          // The renamed object keeps its type; when unknown, treat it as a symlink (the strictest).
          if (from !== "gone") plan(k.value.to, from ?? (await this.kindOnDisk(op.path)));
          break;
        }
        case "link":
          splitRelPath(k.value.existing);
          await this.image.check(k.value.existing, planned);
          plan(op.path, "file");
          break;
        case "symlink":
          if (k.value.target.length === 0 || k.value.target.includes("\0")) throw new PathError(`symlink ${where} has an invalid target`);
          plan(op.path, "symlink");
          break;
        case "attr":
          if (!k.value.attr) throw new PathError(`attr op on ${where} carries no attributes`);
          break;
        case "mkdir":
          plan(op.path, "dir");
          break;
        case "create":
          plan(op.path, "file");
          break;
        case "remove":
          plan(op.path, "gone");
          break;
        case "write":
        case "truncate":
          if (!planned.has(op.path)) plan(op.path, "file");
          break;
      }
    }
  }

  private async kindOnDisk(rel: string): Promise<PlannedKind> {
    const st = await lstat(path.join(this.image.root, rel)).catch(() => undefined);
    if (!st) return "gone";
    return st.isDirectory() ? "dir" : st.isSymbolicLink() ? "symlink" : "file";
  }

  async apply(ops: Op[]): Promise<void> {
    await this.preflight(ops);
    for (const op of ops) await this.applyOne(op);
    // Written files wait open for the next sync; a long mirror (which syncs only
    // at its end) must not run out of descriptors meanwhile.
    if (this.unsynced.length >= MAX_UNSYNCED) await this.sync();
  }

  /** Cache an open handle for rel, moving the oldest one to the unsynced list beyond MAX_OPEN. */
  private keep(rel: string, fh: FileHandle): void {
    if (this.handles.size >= MAX_OPEN) {
      const [oldest] = this.handles;
      if (oldest) {
        this.handles.delete(oldest[0]);
        this.unsynced.push(oldest[1]);
      }
    }
    this.handles.set(rel, fh);
  }

  private async applyOne(op: Op): Promise<void> {
    const k = op.kind;
    if (!k) throw new PathError(`op on ${JSON.stringify(op.path)} has no kind`);
    switch (k.$case) {
      case "write": {
        const fh = await this.handle(op.path);
        const d = k.value.data;
        let off = 0;
        while (off < d.length) off += (await fh.write(d, off, d.length - off, k.value.offset + off)).bytesWritten;
        return;
      }
      case "truncate":
        return (await this.handle(op.path)).truncate(k.value.size);
      case "create": {
        const abs = await this.image.resolve(op.path, true);
        await this.forget(op.path, true);
        // A new inode, never a truncate of the old one: it may be hard-linked elsewhere.
        await this.clearUnlessType(abs, "none");
        const fh = await open(abs, WRITE_FLAGS | C.O_EXCL, k.value.attr?.mode ?? 0o600);
        this.keep(op.path, fh);
        this.dirtyDirs.add(path.dirname(abs));
        if (k.value.attr) await this.setAttrFd(fh, k.value.attr);
        return;
      }
      case "mkdir": {
        const abs = await this.image.resolve(op.path, true);
        await this.clearUnlessType(abs, "dir");
        try {
          await mkdir(abs, { mode: 0o700 });
          this.dirtyDirs.add(path.dirname(abs));
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
        }
        if (k.value.attr) await this.setAttrPath(abs, k.value.attr);
        return;
      }
      case "symlink": {
        const abs = await this.image.resolve(op.path, true);
        await this.forget(op.path, true);
        await this.clearUnlessType(abs, "none");
        this.image.invalidate();
        await symlink(k.value.target, abs);
        this.dirtyDirs.add(path.dirname(abs));
        if (k.value.attr) await this.setAttrPath(abs, k.value.attr);
        return;
      }
      case "link": {
        const abs = await this.image.resolve(op.path, true);
        const existing = await this.image.resolve(k.value.existing);
        const [a, b] = await Promise.all([lstat(existing), lstat(abs).catch(() => undefined)]);
        if (b && b.ino === a.ino && b.dev === a.dev) return;
        await this.forget(op.path, true);
        this.image.invalidate(); // what was a directory here may now be a link to a symlink
        if (b) await rm(abs, { recursive: true, force: true });
        await link(existing, abs);
        this.dirtyDirs.add(path.dirname(abs));
        return;
      }
      case "remove": {
        const abs = await this.image.resolve(op.path);
        await this.forget(op.path, true);
        this.image.invalidate();
        const st = await lstat(abs).catch(() => undefined);
        if (!st) return;
        if (st.isDirectory()) await rm(abs, { recursive: true, force: true });
        else await unlink(abs);
        this.dirtyDirs.add(path.dirname(abs));
        return;
      }
      case "rename": {
        const from = await this.image.resolve(op.path);
        const to = await this.image.resolve(k.value.to, true);
        await this.forget(op.path, true);
        await this.forget(k.value.to, true);
        this.image.invalidate();
        const st = await lstat(from).catch(() => undefined);
        if (!st) return; // already renamed (replay) or never existed
        try {
          await rename(from, to);
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          if (code !== "ENOTEMPTY" && code !== "EEXIST" && code !== "EISDIR" && code !== "ENOTDIR") throw e;
          await rm(to, { recursive: true, force: true });
          await rename(from, to);
        }
        this.dirtyDirs.add(path.dirname(from));
        this.dirtyDirs.add(path.dirname(to));
        return;
      }
      case "attr": {
        const abs = await this.image.resolve(op.path, true);
        const open = this.handles.get(op.path);
        if (open) return this.setAttrFd(open, k.value.attr!);
        try {
          return await this.setAttrPath(abs, k.value.attr!);
        } catch (e) {
          // Nothing there (a later op of the journal removed it before a crash
          // replayed this one): there is nothing to set.
          if ((e as NodeJS.ErrnoException).code === "ENOENT") return;
          throw e;
        }
      }
    }
  }

  /** Make durable everything applied since the last sync (files, then directories). */
  async sync(): Promise<void> {
    const hs = [...this.unsynced, ...this.handles.values()];
    this.unsynced = [];
    this.handles.clear();
    if (hs.length + this.dirtyDirs.size > SYNCFS_AFTER && syncfsWorks !== false) {
      // Many files: one syncfs(2) of the image's file system costs far less than
      // an fsync each (Node has no binding for it; coreutils' `sync -f` is it).
      await Promise.all(hs.map((h) => h.close()));
      try {
        await execFileP("sync", ["-f", this.image.root]);
        syncfsWorks = true;
        this.dirtyDirs.clear();
        return;
      } catch {
        syncfsWorks = false; // no usable `sync -f`: fsync one by one from now on
        return this.syncPaths();
      }
    }
    await Promise.all(hs.map(async (h) => {
      try {
        await h.datasync();
      } finally {
        await h.close();
      }
    }));
    const dirs = [...this.dirtyDirs];
    this.dirtyDirs.clear();
    await Promise.all(dirs.map(async (d) => {
      const fh = await open(d, C.O_RDONLY | C.O_DIRECTORY).catch(() => undefined);
      if (!fh) return; // removed since
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
    }));
  }

  /** Fallback when `sync -f` is unavailable after handles were closed: sync(2) everything. */
  private async syncPaths(): Promise<void> {
    await execFileP("sync").catch(() => undefined);
    this.dirtyDirs.clear();
  }

  async close(): Promise<void> {
    await this.sync().catch(() => undefined);
  }

  private async handle(rel: string): Promise<FileHandle> {
    let fh = this.handles.get(rel);
    if (fh) return fh;
    const abs = await this.image.resolve(rel, true);
    try {
      fh = await open(abs, WRITE_FLAGS, 0o600);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ELOOP") throw new PathError(`${JSON.stringify(rel)} is a symlink on the target; refusing to write through it`);
      throw e;
    }
    this.keep(rel, fh);
    return fh;
  }

  /** Stop using cached handles for rel (and below it): they may name another file after this op. */
  private async forget(rel: string, subtree = false): Promise<void> {
    for (const [p, h] of this.handles) {
      if (p === rel || (subtree && p.startsWith(rel + "/"))) {
        this.handles.delete(p);
        this.unsynced.push(h);
      }
    }
  }

  /** Remove whatever is at abs unless it already is of the wanted type. */
  private async clearUnlessType(abs: string, want: "file" | "dir" | "none"): Promise<void> {
    const st = await lstat(abs).catch(() => undefined);
    if (!st) return;
    if (want === "file" && st.isFile()) return;
    if (want === "dir" && st.isDirectory()) return;
    this.image.invalidate();
    if (st.isDirectory()) await rm(abs, { recursive: true, force: true });
    else await unlink(abs);
  }

  private async setAttrFd(fh: FileHandle, a: Attr): Promise<void> {
    if (this.canChown) await fh.chown(a.uid, a.gid);
    await fh.chmod(a.mode & 0o7777); // after chown: chown clears setuid bits
    const t = timeArg(a.mtimeSec, a.mtimeNsec);
    await fh.utimes(t, t);
  }

  private async setAttrPath(abs: string, a: Attr): Promise<void> {
    const st = await lstat(abs);
    if (st.isSymbolicLink()) {
      if (this.canChown) await lchown(abs, a.uid, a.gid);
      const t = timeArg(a.mtimeSec, a.mtimeNsec);
      await lutimes(abs, t, t);
      return;
    }
    // O_NOFOLLOW + descriptor: a symlink swapped in after the lstat is not followed.
    const fh = await open(abs, C.O_RDONLY | C.O_NOFOLLOW | (st.isDirectory() ? C.O_DIRECTORY : 0));
    try {
      await this.setAttrFd(fh, a);
    } finally {
      await fh.close();
    }
  }
}
