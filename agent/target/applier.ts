// Applies replicated operations to one image (<root>/<source>/<set>). Every
// path goes through ConfinedRoot; files are opened with O_NOFOLLOW and changed
// through their descriptor, so a replicated symlink is never followed.
// Every op is idempotent and "setting" (create truncates, writes carry absolute
// offsets, removes tolerate absence, also of a directory on the way, a rename
// whose source is gone is done), so replaying a packet that was partly applied
// before a crash converges (test/unit/applier-replay.test.ts).
// Special files are made by agent/fs/special.ts and never opened; their
// attributes are set through an O_PATH descriptor. Extended attributes are
// set after chown (which drops security.capability) and after the content
// (every write drops it too): the last attr op of a file carries them.
// All-zero writes at or beyond the end of a file are not written but become a
// length (a hole), so sparse files stay sparse whatever the source sends.
import { execFile } from "node:child_process";
import { constants as C } from "node:fs";
import { promisify } from "node:util";
import { chmod, chown, lstat, mkdir, open, rename, rm, symlink, link, unlink, lchown, lutimes, utimes, type FileHandle } from "node:fs/promises";
import path from "node:path";
import type { Attr, Op } from "../wire.ts";
import { ConfinedRoot, PathError, splitRelPath, type PlannedKind } from "../fs/confine.ts";
import { isSpecial } from "../fs/stat.ts";
import { makeSpecial, MAX_MAJOR, MAX_MINOR, O_PATH } from "../fs/special.ts";
import { applyXattrs } from "../fs/xattr.ts";
import { isZero } from "../source/blocks.ts";

export { PathError };

// O_NONBLOCK: a fifo that took a file's place is never waited on (no effect on regular files).
const WRITE_FLAGS = C.O_WRONLY | C.O_NOFOLLOW | C.O_CREAT | C.O_NONBLOCK;
/** Granularity of holes left by sparse writes (the page and usual file system block size). */
const PAGE = 4096;
/** More dirty files or directories than this are made durable with one syncfs. */
const SYNCFS_AFTER = 256;
let syncfsWorks: boolean | undefined;
const execFileP = promisify(execFile);
const MAX_OPEN = 128;
/**
 * Files evicted from the handle cache that wait (open) for a sync; beyond
 * this they are closed unsynced, and the next sync is then a syncfs (which
 * covers closed files too) instead of an fsync each. Syncing them there and
 * then (as before) stalled a long mirror every few hundred files, for data
 * that nothing acknowledges before the mirror's end.
 */
const MAX_UNSYNCED = 512;

/** Files whose ops a mirror batch applies at a time (applyConcurrently). */
const APPLY_CONCURRENCY = 8;
const FILE_OPS = new Set(["create", "write", "truncate", "attr"]);

function parentPath(rel: string): string {
  const i = rel.lastIndexOf("/");
  return i < 0 ? "" : rel.slice(0, i);
}

/**
 * ops cut into runs to apply one after the other; a run is groups of ops (one
 * group per path, in their order) that may be applied side by side: only
 * file ops, on paths none of which is below another.
 */
export function concurrentRuns(ops: Op[]): Op[][][] {
  const runs: Op[][][] = [];
  let groups = new Map<string, Op[]>();
  let above = new Set<string>(); // the directories above the run's paths
  const close = () => {
    if (groups.size) runs.push([...groups.values()]);
    groups = new Map();
    above = new Set();
  };
  for (const op of ops) {
    if (!FILE_OPS.has(op.kind?.$case ?? "")) {
      close();
      runs.push([[op]]);
      continue;
    }
    const p = op.path;
    const own = groups.get(p);
    if (own) {
      own.push(op);
      continue;
    }
    let related = above.has(p);
    for (let q = parentPath(p); !related && q !== ""; q = parentPath(q)) related = groups.has(q);
    if (related) close();
    groups.set(p, [op]);
    for (let q = parentPath(p); q !== "" && !above.has(q); q = parentPath(q)) above.add(q);
  }
  close();
  return runs;
}

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
  /** Written files closed before a sync: only a syncfs (or sync) makes them durable. */
  private closedUnsynced = 0;
  /** Extended attributes that could not be set (not fatal: verify reports them), and the last reason. */
  xattrProblems = 0;
  lastXattrProblem = "";
  /** Device nodes that could not be made (EPERM), and the last reason. */
  specialProblems = 0;
  lastSpecialProblem = "";

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
        case "mknod":
          if (!isSpecial(k.value.type)) throw new PathError(`mknod ${where}: unknown type ${JSON.stringify(k.value.type)}`);
          if (k.value.major > MAX_MAJOR || k.value.minor > MAX_MINOR) throw new PathError(`mknod ${where}: bad device number`);
          plan(op.path, "file");
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
    if (this.unsynced.length >= MAX_UNSYNCED) await this.closeUnsynced();
  }

  /**
   * A mirror batch: like apply, but the ops on one regular file (create,
   * write, truncate, attr) are applied for several files at a time, as long
   * as the files are unrelated: a run of such ops is cut where a path lies
   * below or above another of the run (a directory's attributes are set
   * after what is made in it), and every other kind of op is applied alone,
   * in its place. Each file's ops keep their order, and ops on unrelated
   * paths commute, so the result is what apply gives. (Journal packets keep
   * apply: a packet replayed after a crash relies on its exact order.)
   */
  async applyConcurrently(ops: Op[]): Promise<void> {
    await this.preflight(ops);
    for (const run of concurrentRuns(ops)) {
      if (run.length === 1) {
        for (const op of run[0]!) await this.applyOne(op);
        continue;
      }
      // Directories on the way checked (or made) one at a time first: two files
      // must not both find their missing directory and both make it.
      for (const group of run) await this.image.resolve(group[0]!.path, true);
      let next = 0;
      let failed: unknown;
      const worker = async () => {
        while (next < run.length && failed === undefined) {
          const group = run[next++]!;
          try {
            for (const op of group) await this.applyOne(op);
          } catch (e) {
            failed ??= e;
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(APPLY_CONCURRENCY, run.length) }, worker));
      if (failed !== undefined) throw failed;
    }
    if (this.unsynced.length >= MAX_UNSYNCED) await this.closeUnsynced();
  }

  /** Close the files waiting for a sync without syncing them; the next sync covers the whole file system. */
  private async closeUnsynced(): Promise<void> {
    if (syncfsWorks === false) return this.sync(); // no syncfs here: fsync them now, as each is closed
    const hs = this.unsynced;
    this.unsynced = [];
    this.closedUnsynced += hs.length;
    await Promise.all(hs.map((h) => h.close()));
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
        return this.write(await this.handle(op.path), k.value.offset, k.value.data);
      }
      case "truncate":
        return (await this.handle(op.path)).truncate(k.value.size);
      case "create": {
        const abs = await this.image.resolve(op.path, true);
        await this.forget(op.path, true);
        // A new inode, never a truncate of the old one: it may be hard-linked elsewhere.
        // (O_EXCL fails on anything there, a symlink too; then it is cleared first.)
        // Permission bits only: a mode beyond int32 (a hostile source's 0x80000000) made
        // open() fail a native assertion and abort the whole agent (test/fuzz/applier.fuzz.test.ts).
        const mode = (k.value.attr?.mode ?? 0o600) & 0o7777;
        let fh: FileHandle;
        try {
          fh = await open(abs, WRITE_FLAGS | C.O_EXCL, mode);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
          await this.clearUnlessType(abs, "none");
          fh = await open(abs, WRITE_FLAGS | C.O_EXCL, mode);
        }
        this.keep(op.path, fh);
        this.dirtyDirs.add(path.dirname(abs));
        if (k.value.attr) await this.setAttrFd(fh, k.value.attr, abs);
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
      case "mknod": {
        const abs = await this.image.resolve(op.path, true);
        await this.forget(op.path, true);
        await this.clearUnlessType(abs, "none");
        if (!isSpecial(k.value.type)) throw new PathError(`mknod ${JSON.stringify(op.path)}: unknown type`);
        try {
          await makeSpecial(abs, k.value.type, k.value.major, k.value.minor);
        } catch (e) {
          // A device node on a target that may not make one (not root, no
          // CAP_MKNOD): left out rather than stopping replication; verify reports it missing.
          if ((e as NodeJS.ErrnoException).code !== "EPERM") throw e;
          this.specialProblems++;
          this.lastSpecialProblem = (e as Error).message;
          return;
        }
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
        await this.forget(op.path, true);
        const abs = await this.resolvePresent(op.path);
        if (abs === undefined) return; // its directory is gone: so is it (a replayed `rm -r`, see resolvePresent)
        this.image.invalidate();
        const st = await lstat(abs).catch(() => undefined);
        if (!st) return;
        if (st.isDirectory()) await rm(abs, { recursive: true, force: true });
        else await unlink(abs);
        this.dirtyDirs.add(path.dirname(abs));
        return;
      }
      case "rename": {
        const from = await this.resolvePresent(op.path);
        if (from === undefined) return; // its directory is gone (replay): already renamed, or removed after
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
        if (open) return this.setAttrFd(open, k.value.attr!, abs);
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

  /**
   * Write data at offset, like rsync --sparse: all-zero pages (4 KiB, aligned
   * to the file) at or past the file's end are not written but left as holes,
   * and the length is set at the end. Zeros inside the file are written (they
   * may replace data). Pages are only looked at when the data has a zero one.
   */
  private async write(fh: FileHandle, offset: number, d: Uint8Array): Promise<void> {
    const put = async (from: number, to: number) => {
      while (from < to) from += (await fh.write(d, from, to - from, offset + from)).bytesWritten;
    };
    // Pages of d end where the file's offsets are multiples of PAGE.
    const first = (PAGE - (offset % PAGE)) % PAGE || PAGE;
    const pageEnd = (i: number) => Math.min(d.length, i < first ? first : i + PAGE);
    let anyZero = false;
    for (let i = 0; i < d.length && !anyZero; i = pageEnd(i)) anyZero = isZero(d.subarray(i, pageEnd(i)));
    if (!anyZero) return put(0, d.length);
    const size = (await fh.stat()).size;
    let run = -1; // start of the pending run of bytes to write
    for (let i = 0; i < d.length; i = pageEnd(i)) {
      const hole = offset + i >= size && isZero(d.subarray(i, pageEnd(i)));
      if (hole && run >= 0) {
        await put(run, i);
        run = -1;
      } else if (!hole && run < 0) run = i;
    }
    if (run >= 0) await put(run, d.length);
    if (offset + d.length > size) {
      const now = (await fh.stat()).size;
      if (offset + d.length > now) await fh.truncate(offset + d.length);
    }
  }

  /** Make durable everything applied since the last sync (files, then directories). */
  async sync(): Promise<void> {
    const hs = [...this.unsynced, ...this.handles.values()];
    this.unsynced = [];
    this.handles.clear();
    const closed = this.closedUnsynced;
    if (closed > 0 || (hs.length + this.dirtyDirs.size > SYNCFS_AFTER && syncfsWorks !== false)) {
      // Many files (or files closed unsynced): one syncfs(2) of the image's file system
      // costs far less than an fsync each (Node has no binding for it; coreutils' `sync -f` is it).
      await Promise.all(hs.map((h) => h.close()));
      if (syncfsWorks !== false) {
        try {
          await execFileP("sync", ["-f", this.image.root]);
          syncfsWorks = true;
          this.closedUnsynced = 0;
          this.dirtyDirs.clear();
          return;
        } catch {
          syncfsWorks = false; // no usable `sync -f`: fsync one by one from now on
        }
      }
      if (closed > 0) {
        // Files already closed: only sync(2) reaches them; if even that fails, nothing is acknowledged.
        await execFileP("sync");
        this.closedUnsynced = 0;
        this.dirtyDirs.clear();
        return;
      }
      return this.syncPaths();
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
    // A special file here (a replayed write to a path a later op made a fifo or
    // a device): never open it, which would run a device's driver; it becomes
    // a file again, and the later op is replayed after this one.
    const st = await lstat(abs).catch(() => undefined);
    if (st && !st.isFile() && !st.isDirectory() && !st.isSymbolicLink()) await unlink(abs);
    try {
      fh = await open(abs, WRITE_FLAGS, 0o600);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ELOOP") throw new PathError(`${JSON.stringify(rel)} is a symlink on the target; refusing to write through it`);
      throw e;
    }
    if (!(await fh.stat()).isFile()) {
      await fh.close();
      throw new PathError(`${JSON.stringify(rel)} is not a regular file on the target; refusing to write to it`);
    }
    this.keep(rel, fh);
    return fh;
  }

  /**
   * The absolute path of rel when every directory on the way to it exists;
   * undefined when one is missing, and then nothing is at rel. For the ops
   * that only take something away (remove, and the old name of a rename): a
   * target killed in the middle of a packet applies it again from its first
   * op (appliedSeq is recorded after the whole packet), and capture journals
   * an `rm -r` as one remove per path, deepest first, in one packet. On that
   * replay the directories of the first removes are already gone with the
   * later ones; ConfinedRoot.resolve then fails with ENOENT, the packet was
   * refused on every retry, and the image stood still until the source gave
   * up on the packet and resynchronised it with a checksum mirror (after
   * three refusals and their backoff: longer than the e2e crash test waits).
   * Symlinks and files on the way are still refused by resolve.
   */
  private async resolvePresent(rel: string): Promise<string | undefined> {
    try {
      return await this.image.resolve(rel);
    } catch (e) {
      if (!(e instanceof PathError) && (e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw e;
    }
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

  /** Set xattrs when the op carries them; what fails is counted, not thrown (see applyXattrs). */
  private async setXattrs(abs: string, a: Attr): Promise<void> {
    if (!a.hasXattrs) return;
    const problems = await applyXattrs(abs, a.xattrs);
    if (problems.length) {
      this.xattrProblems += problems.length;
      this.lastXattrProblem = `${abs}: ${problems.join("; ")}`;
    }
  }

  /**
   * Owner (only when it differs: chown drops setuid bits and
   * security.capability), then xattrs, then mode (after chown and after an
   * ACL, whose mask it sets), then mtime.
   */
  private async setAttrFd(fh: FileHandle, a: Attr, abs: string): Promise<void> {
    if (this.canChown) {
      const cur = await fh.stat();
      if (cur.uid !== a.uid || cur.gid !== a.gid) await fh.chown(a.uid, a.gid);
    }
    await this.setXattrs(abs, a);
    await fh.chmod(a.mode & 0o7777);
    const t = timeArg(a.mtimeSec, a.mtimeNsec);
    await fh.utimes(t, t);
  }

  private async setAttrPath(abs: string, a: Attr): Promise<void> {
    const st = await lstat(abs);
    if (st.isSymbolicLink()) {
      if (this.canChown && (st.uid !== a.uid || st.gid !== a.gid)) await lchown(abs, a.uid, a.gid);
      await this.setXattrs(abs, a);
      const t = timeArg(a.mtimeSec, a.mtimeNsec);
      await lutimes(abs, t, t);
      return;
    }
    if (!st.isFile() && !st.isDirectory()) return this.setAttrSpecial(abs, a);
    // O_NOFOLLOW + descriptor: a symlink swapped in after the lstat is not followed.
    const fh = await open(abs, C.O_RDONLY | C.O_NOFOLLOW | C.O_NONBLOCK | (st.isDirectory() ? C.O_DIRECTORY : 0));
    try {
      const now = await fh.stat();
      if (now.ino !== st.ino || now.dev !== st.dev) throw new PathError(`${abs} changed while its attributes were set`);
      await this.setAttrFd(fh, a, abs);
    } finally {
      await fh.close();
    }
  }

  /**
   * A fifo, device or socket: opened with O_PATH (which runs no driver and
   * does not block), changed through /proc/self/fd/<fd>, so the very inode
   * checked is the one changed.
   */
  private async setAttrSpecial(abs: string, a: Attr): Promise<void> {
    const fh = await open(abs, O_PATH | C.O_NOFOLLOW);
    try {
      const st = await fh.stat();
      if (st.isFile() || st.isDirectory() || st.isSymbolicLink()) throw new PathError(`${abs} changed while its attributes were set`);
      const self = `/proc/self/fd/${fh.fd}`;
      if (this.canChown && (st.uid !== a.uid || st.gid !== a.gid)) await chown(self, a.uid, a.gid);
      await this.setXattrs(abs, a);
      await chmod(self, a.mode & 0o7777);
      const t = timeArg(a.mtimeSec, a.mtimeNsec);
      await utimes(self, t, t);
    } finally {
      await fh.close();
    }
  }
}
