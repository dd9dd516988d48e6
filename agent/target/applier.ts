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
import { chmodSync, chownSync, closeSync, constants as C, fchmodSync, fchownSync, fdatasync, fstatSync, ftruncateSync, futimesSync, lchownSync, linkSync, lstatSync, lutimesSync, mkdirSync, openSync, renameSync, rmSync, symlinkSync, unlinkSync, utimesSync, writeSync, type Stats } from "node:fs";
import { promisify } from "node:util";
import { open } from "node:fs/promises";
import path from "node:path";
import type { Attr, Op } from "../wire.ts";
import { ConfinedRoot, PathError, splitRelPath, type PlannedKind } from "../fs/confine.ts";
import { isSpecial } from "../fs/stat.ts";
import { makeSpecial, makeSpecialSync, MAX_MAJOR, MAX_MINOR, O_PATH } from "../fs/special.ts";
import { applyXattrsSync } from "../fs/xattr.ts";
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

/** Seconds as a double that lands inside the right microsecond (utimes takes doubles). */
export function timeArg(sec: number, nsec: number): number {
  return sec + (Math.floor(nsec / 1000) * 1000 + 500) / 1e9;
}

const fdatasyncP = promisify(fdatasync);

/** lstat that gives undefined for a missing path. */
function lstatOrNone(abs: string): Stats | undefined {
  return lstatSync(abs, { throwIfNoEntry: false });
}

/**
 * Ops are applied with synchronous system calls: an image's ops are applied
 * one at a time anyway (Image.exclusive), and a small file's create, write,
 * attributes and close are a dozen calls of a few microseconds each, for
 * which handing each to libuv's thread pool (a wake-up, a futex, an epoll
 * round each) cost several times the call itself. Only the syncs that make
 * applied data durable stay asynchronous (they wait on the disk): fdatasync
 * of the files written, or one syncfs of the image's file system.
 */
export class Applier {
  readonly image: ConfinedRoot;
  private readonly canChown: boolean;
  /** Open descriptors of files being written, by path. */
  private handles = new Map<string, number>();
  /** Descriptors (of written files) no longer used for writing, waiting for the next sync. */
  private unsynced: number[] = [];
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
    this.preflightSync(ops);
  }

  private preflightSync(ops: Op[]): void {
    const planned = new Map<string, PlannedKind>();
    const plan = (p: string, k: PlannedKind) => {
      if (k === "gone") for (const q of [...planned.keys()]) if (q.startsWith(p + "/")) planned.delete(q);
      planned.set(p, k);
    };
    for (const op of ops) {
      splitRelPath(op.path);
      this.image.checkSync(op.path, planned);
      const k = op.kind;
      const where = JSON.stringify(op.path);
      switch (k?.$case) {
        case undefined:
          throw new PathError(`op on ${where} has no kind`);
        case "rename": {
          splitRelPath(k.value.to);
          this.image.checkSync(k.value.to, planned);
          if (k.value.to === op.path || k.value.to.startsWith(op.path + "/")) throw new PathError(`cannot rename ${where} into itself`);
          const from = planned.get(op.path);
          plan(op.path, "gone");
          // The renamed object keeps its type; when unknown, treat it as a symlink (the strictest).
          if (from !== "gone") plan(k.value.to, from ?? this.kindOnDisk(op.path));
          break;
        }
        case "link":
          splitRelPath(k.value.existing);
          this.image.checkSync(k.value.existing, planned);
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

  private kindOnDisk(rel: string): PlannedKind {
    let st: Stats | undefined;
    try {
      st = lstatOrNone(path.join(this.image.root, rel));
    } catch {
      st = undefined;
    }
    if (!st) return "gone";
    return st.isDirectory() ? "dir" : st.isSymbolicLink() ? "symlink" : "file";
  }

  async apply(ops: Op[]): Promise<void> {
    this.preflightSync(ops);
    for (const op of ops) {
      if (op.kind?.$case === "mknod" && op.kind.value.type === "s") await this.applySocket(op);
      else this.applyOne(op);
    }
    // Written files wait open for the next sync; a long mirror (which syncs only
    // at its end) must not run out of descriptors meanwhile.
    if (this.unsynced.length >= MAX_UNSYNCED) await this.closeUnsynced();
  }

  /**
   * A mirror batch. (It once applied the ops of unrelated files side by side,
   * through the thread pool; with synchronous calls in order it is faster,
   * and the result is what apply gives by construction.)
   */
  async applyConcurrently(ops: Op[]): Promise<void> {
    return this.apply(ops);
  }

  /** Close the files waiting for a sync without syncing them; the next sync covers the whole file system. */
  private async closeUnsynced(): Promise<void> {
    if (syncfsWorks === false) return this.sync(); // no syncfs here: fsync them now, as each is closed
    const fds = this.unsynced;
    this.unsynced = [];
    this.closedUnsynced += fds.length;
    for (const fd of fds) closeSync(fd);
  }

  /** Cache an open descriptor for rel, moving the oldest one to the unsynced list beyond MAX_OPEN. */
  private keep(rel: string, fd: number): void {
    if (this.handles.size >= MAX_OPEN) {
      const [oldest] = this.handles;
      if (oldest) {
        this.handles.delete(oldest[0]);
        this.unsynced.push(oldest[1]);
      }
    }
    this.handles.set(rel, fd);
  }

  /** A socket is bound by a listening server (an event-loop round trip): the one op applied asynchronously. */
  private async applySocket(op: Op): Promise<void> {
    const k = op.kind;
    if (k?.$case !== "mknod") return;
    const abs = this.image.resolveSync(op.path, true);
    this.forget(op.path, true);
    this.clearUnlessType(abs, "none");
    await makeSpecial(abs, "s", 0, 0);
    this.dirtyDirs.add(path.dirname(abs));
    if (k.value.attr) this.setAttrPath(abs, k.value.attr);
  }

  private applyOne(op: Op): void {
    const k = op.kind;
    if (!k) throw new PathError(`op on ${JSON.stringify(op.path)} has no kind`);
    switch (k.$case) {
      case "write":
        return this.write(this.handle(op.path), k.value.offset, k.value.data);
      case "truncate":
        return ftruncateSync(this.handle(op.path), k.value.size);
      case "create": {
        const abs = this.image.resolveSync(op.path, true);
        this.forget(op.path, true);
        // A new inode, never a truncate of the old one: it may be hard-linked elsewhere.
        // (O_EXCL fails on anything there, a symlink too; then it is cleared first.)
        // Permission bits only: a mode beyond int32 (a hostile source's 0x80000000) made
        // open() fail a native assertion and abort the whole agent (test/fuzz/applier.fuzz.test.ts).
        const mode = (k.value.attr?.mode ?? 0o600) & 0o7777;
        let fd: number;
        try {
          fd = openSync(abs, WRITE_FLAGS | C.O_EXCL, mode);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
          this.clearUnlessType(abs, "none");
          fd = openSync(abs, WRITE_FLAGS | C.O_EXCL, mode);
        }
        this.keep(op.path, fd);
        this.dirtyDirs.add(path.dirname(abs));
        if (k.value.attr) this.setAttrFd(fd, k.value.attr, abs);
        return;
      }
      case "mkdir": {
        const abs = this.image.resolveSync(op.path, true);
        this.clearUnlessType(abs, "dir");
        try {
          mkdirSync(abs, { mode: 0o700 });
          this.dirtyDirs.add(path.dirname(abs));
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
        }
        if (k.value.attr) this.setAttrPath(abs, k.value.attr);
        return;
      }
      case "symlink": {
        const abs = this.image.resolveSync(op.path, true);
        this.forget(op.path, true);
        this.clearUnlessType(abs, "none");
        this.image.invalidate();
        symlinkSync(k.value.target, abs);
        this.dirtyDirs.add(path.dirname(abs));
        if (k.value.attr) this.setAttrPath(abs, k.value.attr);
        return;
      }
      case "mknod": {
        const abs = this.image.resolveSync(op.path, true);
        this.forget(op.path, true);
        this.clearUnlessType(abs, "none");
        const type = k.value.type;
        if (!isSpecial(type) || type === "s") throw new PathError(`mknod ${JSON.stringify(op.path)}: unknown type`); // (sockets: applySocket)
        try {
          makeSpecialSync(abs, type, k.value.major, k.value.minor);
        } catch (e) {
          // A device node on a target that may not make one (not root, no
          // CAP_MKNOD): left out rather than stopping replication; verify reports it missing.
          if ((e as NodeJS.ErrnoException).code !== "EPERM") throw e;
          this.specialProblems++;
          this.lastSpecialProblem = (e as Error).message;
          return;
        }
        this.dirtyDirs.add(path.dirname(abs));
        if (k.value.attr) this.setAttrPath(abs, k.value.attr);
        return;
      }
      case "link": {
        const abs = this.image.resolveSync(op.path, true);
        const existing = this.image.resolveSync(k.value.existing);
        const a = lstatSync(existing);
        const b = lstatOrNone(abs);
        if (b && b.ino === a.ino && b.dev === a.dev) return;
        this.forget(op.path, true);
        this.image.invalidate(); // what was a directory here may now be a link to a symlink
        if (b) rmSync(abs, { recursive: true, force: true });
        linkSync(existing, abs);
        this.dirtyDirs.add(path.dirname(abs));
        return;
      }
      case "remove": {
        this.forget(op.path, true);
        const abs = this.resolvePresent(op.path);
        if (abs === undefined) return; // its directory is gone: so is it (a replayed `rm -r`, see resolvePresent)
        this.image.invalidate();
        const st = lstatOrNone(abs);
        if (!st) return;
        if (st.isDirectory()) rmSync(abs, { recursive: true, force: true });
        else unlinkSync(abs);
        this.dirtyDirs.add(path.dirname(abs));
        return;
      }
      case "rename": {
        const from = this.resolvePresent(op.path);
        if (from === undefined) return; // its directory is gone (replay): already renamed, or removed after
        const to = this.image.resolveSync(k.value.to, true);
        this.forget(op.path, true);
        this.forget(k.value.to, true);
        this.image.invalidate();
        const st = lstatOrNone(from);
        if (!st) return; // already renamed (replay) or never existed
        try {
          renameSync(from, to);
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          if (code !== "ENOTEMPTY" && code !== "EEXIST" && code !== "EISDIR" && code !== "ENOTDIR") throw e;
          rmSync(to, { recursive: true, force: true });
          renameSync(from, to);
        }
        this.dirtyDirs.add(path.dirname(from));
        this.dirtyDirs.add(path.dirname(to));
        return;
      }
      case "attr": {
        const abs = this.image.resolveSync(op.path, true);
        const open = this.handles.get(op.path);
        if (open !== undefined) return this.setAttrFd(open, k.value.attr!, abs);
        try {
          return this.setAttrPath(abs, k.value.attr!);
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
  private write(fd: number, offset: number, d: Uint8Array): void {
    const put = (from: number, to: number) => {
      while (from < to) from += writeSync(fd, d, from, to - from, offset + from);
    };
    // Pages of d end where the file's offsets are multiples of PAGE.
    const first = (PAGE - (offset % PAGE)) % PAGE || PAGE;
    const pageEnd = (i: number) => Math.min(d.length, i < first ? first : i + PAGE);
    let anyZero = false;
    for (let i = 0; i < d.length && !anyZero; i = pageEnd(i)) anyZero = isZero(d.subarray(i, pageEnd(i)));
    if (!anyZero) return put(0, d.length);
    const size = fstatSync(fd).size;
    let run = -1; // start of the pending run of bytes to write
    for (let i = 0; i < d.length; i = pageEnd(i)) {
      const hole = offset + i >= size && isZero(d.subarray(i, pageEnd(i)));
      if (hole && run >= 0) {
        put(run, i);
        run = -1;
      } else if (!hole && run < 0) run = i;
    }
    if (run >= 0) put(run, d.length);
    if (offset + d.length > size) {
      const now = fstatSync(fd).size;
      if (offset + d.length > now) ftruncateSync(fd, offset + d.length);
    }
  }

  /** Make durable everything applied since the last sync (files, then directories). */
  async sync(): Promise<void> {
    const fds = [...this.unsynced, ...this.handles.values()];
    this.unsynced = [];
    this.handles.clear();
    const closed = this.closedUnsynced;
    if (closed > 0 || (fds.length + this.dirtyDirs.size > SYNCFS_AFTER && syncfsWorks !== false)) {
      // Many files (or files closed unsynced): one syncfs(2) of the image's file system
      // costs far less than an fsync each (Node has no binding for it; coreutils' `sync -f` is it).
      for (const fd of fds) closeSync(fd);
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
    // A few files: fdatasync each (side by side in the thread pool: they wait on the disk).
    const results = await Promise.allSettled(fds.map((fd) => fdatasyncP(fd)));
    for (const fd of fds) closeSync(fd);
    for (const r of results) if (r.status === "rejected") throw r.reason;
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

  private handle(rel: string): number {
    let fd = this.handles.get(rel);
    if (fd !== undefined) return fd;
    const abs = this.image.resolveSync(rel, true);
    // A special file here (a replayed write to a path a later op made a fifo or
    // a device): never open it, which would run a device's driver; it becomes
    // a file again, and the later op is replayed after this one.
    const st = lstatOrNone(abs);
    if (st && !st.isFile() && !st.isDirectory() && !st.isSymbolicLink()) unlinkSync(abs);
    try {
      fd = openSync(abs, WRITE_FLAGS, 0o600);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ELOOP") throw new PathError(`${JSON.stringify(rel)} is a symlink on the target; refusing to write through it`);
      throw e;
    }
    if (!fstatSync(fd).isFile()) {
      closeSync(fd);
      throw new PathError(`${JSON.stringify(rel)} is not a regular file on the target; refusing to write to it`);
    }
    this.keep(rel, fd);
    return fd;
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
  private resolvePresent(rel: string): string | undefined {
    try {
      return this.image.resolveSync(rel);
    } catch (e) {
      if (!(e instanceof PathError) && (e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw e;
    }
  }

  /** Stop using cached descriptors for rel (and below it): they may name another file after this op. */
  private forget(rel: string, subtree = false): void {
    if (this.handles.size === 0) return;
    for (const [p, fd] of this.handles) {
      if (p === rel || (subtree && p.startsWith(rel + "/"))) {
        this.handles.delete(p);
        this.unsynced.push(fd);
      }
    }
  }

  /** Remove whatever is at abs unless it already is of the wanted type. */
  private clearUnlessType(abs: string, want: "file" | "dir" | "none"): void {
    const st = lstatOrNone(abs);
    if (!st) return;
    if (want === "file" && st.isFile()) return;
    if (want === "dir" && st.isDirectory()) return;
    this.image.invalidate();
    if (st.isDirectory()) rmSync(abs, { recursive: true, force: true });
    else unlinkSync(abs);
  }

  /** Set xattrs when the op carries them; what fails is counted, not thrown (see applyXattrs). */
  private setXattrs(abs: string, a: Attr): void {
    if (!a.hasXattrs) return;
    const problems = applyXattrsSync(abs, a.xattrs);
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
  private setAttrFd(fd: number, a: Attr, abs: string): void {
    if (this.canChown) {
      const cur = fstatSync(fd);
      if (cur.uid !== a.uid || cur.gid !== a.gid) fchownSync(fd, a.uid, a.gid);
    }
    this.setXattrs(abs, a);
    fchmodSync(fd, a.mode & 0o7777);
    const t = timeArg(a.mtimeSec, a.mtimeNsec);
    futimesSync(fd, t, t);
  }

  private setAttrPath(abs: string, a: Attr): void {
    const st = lstatSync(abs);
    if (st.isSymbolicLink()) {
      if (this.canChown && (st.uid !== a.uid || st.gid !== a.gid)) lchownSync(abs, a.uid, a.gid);
      this.setXattrs(abs, a);
      const t = timeArg(a.mtimeSec, a.mtimeNsec);
      lutimesSync(abs, t, t);
      return;
    }
    if (!st.isFile() && !st.isDirectory()) return this.setAttrSpecial(abs, a);
    // O_NOFOLLOW + descriptor: a symlink swapped in after the lstat is not followed.
    const fd = openSync(abs, C.O_RDONLY | C.O_NOFOLLOW | C.O_NONBLOCK | (st.isDirectory() ? C.O_DIRECTORY : 0));
    try {
      const now = fstatSync(fd);
      if (now.ino !== st.ino || now.dev !== st.dev) throw new PathError(`${abs} changed while its attributes were set`);
      this.setAttrFd(fd, a, abs);
    } finally {
      closeSync(fd);
    }
  }

  /**
   * A fifo, device or socket: opened with O_PATH (which runs no driver and
   * does not block), changed through /proc/self/fd/<fd>, so the very inode
   * checked is the one changed.
   */
  private setAttrSpecial(abs: string, a: Attr): void {
    const fd = openSync(abs, O_PATH | C.O_NOFOLLOW);
    try {
      const st = fstatSync(fd);
      if (st.isFile() || st.isDirectory() || st.isSymbolicLink()) throw new PathError(`${abs} changed while its attributes were set`);
      const self = `/proc/self/fd/${fd}`;
      if (this.canChown && (st.uid !== a.uid || st.gid !== a.gid)) chownSync(self, a.uid, a.gid);
      this.setXattrs(abs, a);
      chmodSync(self, a.mode & 0o7777);
      const t = timeArg(a.mtimeSec, a.mtimeNsec);
      utimesSync(self, t, t);
    } finally {
      closeSync(fd);
    }
  }
}
