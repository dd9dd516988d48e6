// Capture (watch mode): turns "these paths may have changed" into operations.
// Level-based, like syncthing's scanner: the file system is compared with the
// index of what the targets were told, so merged, duplicated or reordered
// events cannot produce a wrong copy. Renames are found by inode, hard links
// by inode and link count, and file content by block digests: only changed
// blocks become Write ops, all-zero blocks of new files stay holes.
// Special files (fifos, devices, sockets) become Mknod ops; extended
// attributes travel in Attr (read when an object is new or its ctime moved).
// With oneFileSystem, directories on another file system (mount points) are
// replicated as empty directories and nothing on other file systems is.
import { lstat, open, readdir, readlink } from "node:fs/promises";
import { constants as C, lstatSync, type BigIntStats } from "node:fs";
import path from "node:path";
import type { Logger } from "../../common/log.ts";
import type { Attr, Op, Xattr } from "../wire.ts";
import { hashBlocks, digestAt, isZero, READ_BYTES } from "./blocks.ts";
import type { EntryType, FileIndex, IndexDelta, IndexEntry } from "./file-index.ts";
import type { DirWatcher } from "./watcher.ts";
import { attrOf, devMajor, devMinor, isSpecial, kindOf, rdevOf } from "../fs/stat.ts";
import { readXattrs, xattrDigest, readXattrsSync } from "../fs/xattr.ts";

/** Largest data carried by one Write op, and by one packet. */
export const MAX_WRITE = 1024 * 1024;
export const MAX_PACKET_DATA = 4 * 1024 * 1024;

/** Packet data limit for a bandwidth limit: a quarter second's worth, so pacing stays smooth. */
export function packetDataLimit(bandwidth: number): number {
  return bandwidth > 0 ? Math.max(64 * 1024, Math.min(MAX_PACKET_DATA, Math.floor(bandwidth / 4))) : MAX_PACKET_DATA;
}
/** Files at least this large are looked at less often while they change (see deferFor). */
const LARGE_FILE = 16 * 1024 * 1024;
const MAX_PACKET_OPS = 4096;

/**
 * Takes a packet's ops and index deltas. The data of Write ops may live in
 * buffers capture reuses once the sink has resolved: a sink that keeps ops
 * beyond that must copy their data (the agent's sink encodes them at once).
 */
export type PacketSink = (ops: Op[], deltas: IndexDelta[]) => Promise<void>;

/** Write data buffers at least this large are taken from (and given back to) capture's pool. */
const POOLED_WRITE = 64 * 1024;

/**
 * Groups ops into packets so that replaying a packet stays idempotent. A
 * target killed while it applies a packet applies it again from its first op
 * (appliedSeq is recorded per packet), so every op must still mean the same
 * when the packet's later ops already happened. Renames therefore travel
 * alone, and a packet is also cut before an op that would take away or
 * replace a path an earlier op of the packet depends on: the first name of a
 * Link (replayed after the name was removed, the link would have nothing to
 * link to; after it was re-created, it would link to the new file) and the
 * path of a Write or Truncate (replayed after the path became a symlink, the
 * write would be refused).
 */
export class Packetizer {
  private ops: Op[] = [];
  private deltas: IndexDelta[] = [];
  private bytes = 0;
  /** Paths earlier ops of this packet depend on, with every directory above them. */
  private needed = new Set<string>();
  /** Buffers the ops of this packet borrowed (returned through onDone once the sink is done with them). */
  private lent: Buffer[] = [];
  private readonly sink: PacketSink;
  private readonly maxData: number;
  private readonly onDone?: (lent: Buffer[]) => void;
  constructor(sink: PacketSink, maxData = MAX_PACKET_DATA, onDone?: (lent: Buffer[]) => void) {
    this.sink = sink;
    this.maxData = maxData;
    this.onDone = onDone;
  }
  /** `lent`: a buffer op's data lives in, handed back (onDone) when the packet has gone to the sink. */
  async push(op: Op | undefined, delta?: IndexDelta, lent?: Buffer): Promise<void> {
    if (op) {
      if (this.needed.size > 0 && replaces(op) && this.needed.has(op.path)) await this.flush();
      this.ops.push(op);
      if (lent) this.lent.push(lent);
      const k = op.kind;
      if (k?.$case === "write") this.bytes += k.value.data.length;
      if (k?.$case === "link") this.need(k.value.existing);
      else if (k?.$case === "write" || k?.$case === "truncate") this.need(op.path);
    }
    if (delta) this.deltas.push(delta);
    if (this.bytes >= this.maxData || this.ops.length >= MAX_PACKET_OPS) await this.flush();
  }
  async alone(op: Op, delta: IndexDelta): Promise<void> {
    await this.flush();
    await this.push(op, delta);
    await this.flush();
  }
  async flush(): Promise<void> {
    if (this.ops.length === 0 && this.deltas.length === 0) return;
    const ops = this.ops;
    const deltas = this.deltas;
    const lent = this.lent;
    this.ops = [];
    this.deltas = [];
    this.lent = [];
    this.bytes = 0;
    this.needed.clear();
    try {
      await this.sink(ops, deltas);
    } finally {
      if (lent.length) this.onDone?.(lent);
    }
  }
  private need(rel: string): void {
    for (let p = rel; p !== "." && p !== "" && !this.needed.has(p); p = path.posix.dirname(p)) this.needed.add(p);
  }
}

/** Ops that remove whatever is at their path or put another object there (rename's old name travels alone anyway). */
function replaces(op: Op): boolean {
  switch (op.kind?.$case) {
    case "remove":
    case "create":
    case "mkdir":
    case "symlink":
    case "mknod":
    case "link":
    case "rename":
      return true;
    default:
      return false;
  }
}

export interface CaptureOptions {
  root: string;
  blockSize: number;
  index: FileIndex;
  watcher?: DirWatcher;
  /** false for paths outside the replication set */
  wanted: (rel: string, isDir: boolean) => boolean;
  sink: PacketSink;
  /** data per packet (smaller under a bandwidth limit) */
  maxPacketData?: number;
  log: Logger;
  /** asks for another look at a path that changed while it was being read */
  redirty: (rel: string, deep?: boolean) => void;
  /** do not cross into other file systems (mount points stay empty directories) */
  oneFileSystem?: boolean;
}

type St = BigIntStats | undefined;

function parentOf(rel: string): string {
  const i = rel.lastIndexOf("/");
  return i < 0 ? "" : rel.slice(0, i);
}

function depth(rel: string): number {
  let n = 0;
  for (let i = 0; i < rel.length; i++) if (rel.charCodeAt(i) === 47) n++;
  return n;
}

function typeOf(st: BigIntStats): EntryType | undefined {
  const k = kindOf(st);
  return k === "o" ? undefined : k;
}

function entryOf(st: BigIntStats, extra: Partial<IndexEntry> = {}): IndexEntry {
  const a = attrOf(st);
  const t = typeOf(st)!;
  const e: IndexEntry = { t, mode: a.mode, uid: a.uid, gid: a.gid, size: t === "f" || t === "l" ? Number(st.size) : 0, mtimeSec: a.mtimeSec, mtimeNsec: a.mtimeNsec, ctimeMs: ctimeOf(st), ino: Number(st.ino), nlink: Number(st.nlink), ...extra };
  const rdev = rdevOf(st);
  if (rdev) e.rdev = rdev;
  if (e.xa === undefined) delete e.xa;
  return e;
}

function ctimeOf(st: BigIntStats): number {
  return Number(st.ctimeNs / 1000n) / 1000;
}

/** Attributes with the xattrs read (undefined: not known, the target leaves its own alone). */
function withXattrs(a: Attr, xs: Xattr[] | undefined): Attr {
  return xs ? { ...a, xattrs: xs, hasXattrs: true } : a;
}

function attrDiffers(e: IndexEntry, st: BigIntStats): boolean {
  const a = attrOf(st);
  return e.mode !== a.mode || e.uid !== a.uid || e.gid !== a.gid || e.mtimeSec !== a.mtimeSec || e.mtimeNsec !== a.mtimeNsec;
}

function contentMayDiffer(e: IndexEntry, st: BigIntStats): boolean {
  return e.size !== Number(st.size) || e.mtimeSec !== Number(st.mtimeNs / 1_000_000_000n) || e.mtimeNsec !== Number(st.mtimeNs % 1_000_000_000n) || e.ctimeMs !== ctimeOf(st);
}

async function lst(abs: string): Promise<St> {
  try {
    return await lstat(abs, { bigint: true });
  } catch (e) {
    const c = (e as NodeJS.ErrnoException).code;
    if (c === "ENOENT" || c === "ENOTDIR") return undefined;
    throw e;
  }
}

/**
 * lst without the thread pool: one lstat of a cached inode costs a few
 * microseconds, a round trip through libuv's pool far more, and a burst of
 * events (a thousand new files) was lstat-ed one await at a time before any
 * of it was captured.
 */
function lstNow(abs: string): St {
  try {
    return lstatSync(abs, { bigint: true, throwIfNoEntry: false }) ?? undefined;
  } catch (e) {
    const c = (e as NodeJS.ErrnoException).code;
    if (c === "ENOENT" || c === "ENOTDIR") return undefined;
    throw e;
  }
}

export interface CaptureStats {
  ops: number;
  dataBytes: number;
  filesHashed: number;
  bytesHashed: number;
}

export class Capture {
  private readonly o: CaptureOptions;
  private readonly out: Packetizer;
  readonly stats: CaptureStats = { ops: 0, dataBytes: 0, filesHashed: 0, bytesHashed: 0 };
  /** Directories whose attributes to send after this pass; true = the target's copy changed (children added/removed), send even if the source's did not. */
  private attrCheck = new Map<string, boolean>();
  /** Directories whose times the target must get again, found after they were renamed away. */
  private forceIno = new Set<number>();
  private silent = false;
  private readonly maxWrite: number;
  /** Recent cost of reading large files, for deferFor. */
  private readonly cost = new Map<string, { at: number; ms: number }>();
  /** Read buffers reused for every file hashed (capture runs one file at a time). */
  private scratch?: Buffer;
  private scratch2?: Buffer;
  /**
   * Buffers of maxWrite bytes for the data of Write ops, reused once their
   * packet is encoded: a fresh megabyte per Write cost page faults and, as
   * external memory, full garbage collections (a large write made hundreds).
   */
  private readonly pool: Buffer[] = [];
  private readonly poolKeep: number;
  /** The set root's device (oneFileSystem). */
  private rootDev?: bigint;

  constructor(o: CaptureOptions) {
    this.o = o;
    this.maxWrite = Math.min(MAX_WRITE, o.maxPacketData ?? MAX_WRITE);
    // A packet holds at most maxPacketData / maxWrite full Writes (plus partial ones): that many buffers, and a few more, are kept.
    this.poolKeep = Math.ceil((o.maxPacketData ?? MAX_PACKET_DATA) / this.maxWrite) + 2;
    this.out = new Packetizer(o.sink, o.maxPacketData, (lent) => this.giveBack(lent));
  }

  private giveBack(lent: Buffer[]): void {
    for (const b of lent) if (this.pool.length < this.poolKeep && b.length === this.maxWrite) this.pool.push(b);
  }

  private abs(rel: string): string {
    return rel ? path.join(this.o.root, rel) : this.o.root;
  }

  /** On another file system than the set root (oneFileSystem only). */
  private foreign(st: BigIntStats): boolean {
    return !!this.o.oneFileSystem && this.rootDev !== undefined && st.dev !== this.rootDev;
  }

  private async learnRootDev(): Promise<void> {
    if (this.o.oneFileSystem && this.rootDev === undefined) this.rootDev = (await lst(this.o.root))?.dev;
  }

  /** Read rel's xattrs when its ctime moved since the index entry (or always, without one). */
  private async xattrsIfChanged(rel: string, e: IndexEntry | undefined, st: BigIntStats): Promise<{ xs?: Xattr[]; changed: boolean }> {
    if (e && e.ctimeMs === ctimeOf(st)) return { changed: false };
    const xs = await readXattrs(this.abs(rel));
    return { xs, changed: xs !== undefined && xattrDigest(xs) !== e?.xa };
  }

  private async emit(op: Op | undefined, delta?: IndexDelta, lent?: Buffer): Promise<void> {
    if (delta) this.o.index.apply(delta);
    if (this.silent) {
      if (lent) this.giveBack([lent]);
      return;
    }
    if (op) {
      this.stats.ops++;
      if (op.kind?.$case === "write") this.stats.dataBytes += op.kind.value.data.length;
    }
    if (op?.kind?.$case === "rename" && delta) await this.out.alone(op, delta);
    else await this.out.push(op, delta, lent);
  }

  /** Compare the whole tree with the index (start-up, periodic safety net). */
  async fullScan(): Promise<void> {
    await this.learnRootDev();
    this.o.watcher?.add("");
    await this.reconcileDir("");
    await this.finish();
  }

  /**
   * A mirror's final round could not send these entries (see Mirror.skipped):
   * journal their removal (the target lacks them, or holds an older copy),
   * then look at the paths again; what moved is found through its rename.
   */
  async forget(paths: Iterable<string>): Promise<void> {
    for (const rel of paths) {
      const e = this.o.index.get(rel);
      if (!e || e.t === "d") continue;
      await this.remove(rel, e);
      this.o.redirty(rel);
    }
    await this.finish();
  }

  /**
   * Build the index from the tree without journaling anything: for a brand-new
   * journal, whose targets all get a mirror (which sends the content) anyway.
   * The caller snapshots the index afterwards.
   */
  async indexOnlyScan(): Promise<void> {
    this.silent = true;
    try {
      await this.fullScan();
    } finally {
      this.silent = false;
    }
  }

  /**
   * How long to wait before looking at rel again: a large file being written
   * is re-read whole to find what changed, so it is looked at no more often
   * than every few times what that read costs (bounding the overhead to a
   * fraction of the disk's bandwidth, at the cost of latency for big files).
   */
  deferFor(rel: string, now = Date.now()): number {
    const c = this.cost.get(rel);
    if (!c) return 0;
    return Math.max(0, c.at + c.ms * 4 - now);
  }

  /**
   * Bring the given paths up to date. `deep` entries are directories whose
   * children must be listed again (an event without a file name).
   */
  async sync(paths: Iterable<[string, boolean]>): Promise<void> {
    await this.learnRootDev();
    const items: { rel: string; deep: boolean; st: St }[] = [];
    for (const [rel, deep] of paths) items.push({ rel, deep, st: rel === "" ? undefined : lstNow(this.abs(rel)) });
    // Paths that exist first, parents before children (a rename's new name must be
    // seen before its old name is taken for a deletion); then the missing ones.
    const present = items.filter((i) => i.st || i.rel === "").sort((a, b) => depth(a.rel) - depth(b.rel));
    const missing = items.filter((i) => !i.st && i.rel !== "").sort((a, b) => depth(b.rel) - depth(a.rel));
    for (const i of present) {
      if (i.rel === "") {
        if (i.deep) await this.reconcileDir("");
        continue;
      }
      await this.syncPath(i.rel, i.deep);
    }
    for (const i of missing) await this.syncPath(i.rel, false);
    await this.finish();
  }

  private async finish(): Promise<void> {
    // Directory times last, deepest first: creating children changes them on the target.
    const dirs = [...this.attrCheck].sort((a, b) => depth(b[0]) - depth(a[0]));
    this.attrCheck.clear();
    for (const [d, force] of dirs) {
      const e = this.o.index.get(d);
      if (!e || e.t !== "d") continue;
      const st = await lst(this.abs(d));
      if (!st || !st.isDirectory() || Number(st.ino) !== e.ino) {
        // Renamed away meanwhile: its times are sent when the rename is seen.
        if (force) this.forceIno.add(e.ino);
        continue;
      }
      if (!force && !attrDiffers(e, st) && e.ctimeMs === ctimeOf(st)) continue;
      const x = await this.xattrsIfChanged(d, e, st);
      if (force || attrDiffers(e, st) || x.changed) await this.emit({ path: d, kind: { $case: "attr", value: { attr: withXattrs(attrOf(st), x.xs) } } }, { set: d, e: entryOf(st, { xa: x.xs ? xattrDigest(x.xs) : e.xa }) });
    }
    await this.out.flush();
  }

  /** The target's copy of directory rel changes (an entry added, removed or renamed). */
  private touch(rel: string): void {
    this.attrCheck.set(rel, true);
  }

  private async syncPath(rel: string, deep: boolean): Promise<void> {
    const parent = parentOf(rel);
    if (parent !== "" && !this.o.index.has(parent)) {
      // The parent is new too: syncing it (deeply) covers this path.
      const pst = await lst(this.abs(parent));
      if (pst?.isDirectory() && this.o.wanted(parent, true)) return this.syncPath(parent, true);
      // The parent is gone or was renamed under us: re-list the nearest directory we know.
      let up = parentOf(parent);
      while (up !== "" && !this.o.index.has(up)) up = parentOf(up);
      this.o.redirty(up, true);
      return;
    }
    const st = await lst(this.abs(rel));
    const e = this.o.index.get(rel);
    const t = st ? typeOf(st) : undefined;
    if (!st || !t || !this.o.wanted(rel, t === "d") || (t !== "d" && this.foreign(st))) {
      if (e) await this.remove(rel, e);
      return;
    }
    if (e && e.t === t && e.ino === Number(st.ino)) return this.update(rel, e, st, deep);
    // Something new at rel: a renamed path, another name of a file, or a new object.
    if (await this.tryRenameOrLink(rel, st, t)) return;
    if (e && e.t === "f" && t === "f" && Number(st.nlink) === 1 && this.o.index.pathsWithIno(e.ino).length === 1) {
      // Replaced by another single-link file (an editor's save-by-rename), and the
      // target's copy has no other names: diff in place.
      return this.update(rel, e, st, deep, true);
    }
    if (e) await this.remove(rel, e);
    await this.create(rel, st, t);
  }

  private async tryRenameOrLink(rel: string, st: BigIntStats, t: EntryType): Promise<boolean> {
    const ino = Number(st.ino);
    for (const p of this.o.index.pathsWithIno(ino)) {
      if (p === rel) continue;
      const pe = this.o.index.get(p)!;
      if (pe.t !== t) continue;
      const now = await lst(this.abs(p));
      if (!now || Number(now.ino) !== ino) {
        // Renamed (the old name is gone, or is another object now).
        if (rel.startsWith(p + "/")) continue; // cannot move into itself
        await this.emit({ path: p, kind: { $case: "rename", value: { to: rel } } }, { mv: [p, rel] });
        // Directory times still owed under the old name are owed under the new one.
        for (const [k, force] of [...this.attrCheck]) {
          if (k !== p && !k.startsWith(p + "/")) continue;
          this.attrCheck.delete(k);
          const moved = rel + k.slice(p.length);
          this.attrCheck.set(moved, force || (this.attrCheck.get(moved) ?? false));
        }
        this.touch(parentOf(p));
        this.touch(parentOf(rel));
        // (update, deep for a directory, watches rel again and lists it: see DirWatcher.rename)
        if (t === "d") this.o.watcher?.rename(p, rel);
        const e = this.o.index.get(rel)!;
        await this.update(rel, e, st, t === "d");
        if (now) this.o.redirty(p);
        return true;
      }
      if ((t === "f" || isSpecial(t)) && Number(st.nlink) > 1) {
        await this.emit({ path: rel, kind: { $case: "link", value: { existing: p } } }, { set: rel, e: { ...pe, nlink: Number(st.nlink) } });
        for (const q of this.o.index.pathsWithIno(ino)) if (q !== rel) await this.emit(undefined, { set: q, e: { ...this.o.index.get(q)!, nlink: Number(st.nlink) } });
        this.touch(parentOf(rel));
        const e = this.o.index.get(rel)!;
        if (contentMayDiffer(e, st) || attrDiffers(e, st)) await this.update(rel, e, st, false);
        return true;
      }
    }
    return false;
  }

  private async remove(rel: string, e: IndexEntry): Promise<void> {
    if (e.t === "d") this.o.watcher?.remove(rel);
    await this.emit({ path: rel, kind: { $case: "remove", value: { directory: e.t === "d" } } }, { del: rel });
    this.touch(parentOf(rel));
  }

  private async create(rel: string, st: BigIntStats, t: EntryType): Promise<void> {
    this.touch(parentOf(rel));
    if (t === "d") {
      const mount = this.foreign(st);
      if (!mount) this.o.watcher?.add(rel, Number(st.ino)); // watch before listing, so nothing created meanwhile is missed
      const xs = await readXattrs(this.abs(rel));
      await this.emit({ path: rel, kind: { $case: "mkdir", value: { attr: withXattrs(attrOf(st), xs) } } }, { set: rel, e: entryOf(st, { xa: xattrDigest(xs) }) });
      if (!mount) await this.reconcileDir(rel);
      this.touch(rel);
      return;
    }
    if (isSpecial(t)) {
      const xs = await readXattrs(this.abs(rel));
      await this.emit({ path: rel, kind: { $case: "mknod", value: { type: t, major: devMajor(st.rdev), minor: devMinor(st.rdev), attr: withXattrs(attrOf(st), xs) } } }, { set: rel, e: entryOf(st, { xa: xattrDigest(xs) }) });
      return;
    }
    if (t === "l") {
      let target: string;
      try {
        target = await readlink(this.abs(rel));
      } catch {
        return this.o.redirty(rel);
      }
      const xs = await readXattrs(this.abs(rel));
      await this.emit({ path: rel, kind: { $case: "symlink", value: { target, attr: withXattrs(attrOf(st), xs) } } }, { set: rel, e: entryOf(st, { link: target, xa: xattrDigest(xs) }) });
      return;
    }
    await this.sendContent(rel, st, undefined, 0, true);
  }

  /** Same object as indexed: ship what differs. */
  private async update(rel: string, e: IndexEntry, st: BigIntStats, deep: boolean, inPlace = false): Promise<void> {
    if (e.t === "d") {
      if (this.foreign(st)) {
        // A mount point: replicated as an empty directory (something mounted over a replicated one: its old children go).
        for (const c of this.o.index.children(rel)) await this.remove(c, this.o.index.get(c)!);
      } else {
        this.o.watcher?.add(rel, e.ino); // after a restart, known directories need their watch again
        if (deep) await this.reconcileDir(rel);
      }
      if (this.forceIno.delete(e.ino)) this.touch(rel);
      else if (!this.attrCheck.has(rel)) this.attrCheck.set(rel, false);
      return;
    }
    if (e.t === "l") {
      const target = await readlink(this.abs(rel)).catch(() => undefined);
      if (target === undefined) return this.o.redirty(rel);
      const x = await this.xattrsIfChanged(rel, e, st);
      const xa = x.xs ? xattrDigest(x.xs) : e.xa;
      if (target !== e.link) {
        const xs = x.xs ?? (await readXattrs(this.abs(rel)));
        await this.emit({ path: rel, kind: { $case: "symlink", value: { target, attr: withXattrs(attrOf(st), xs) } } }, { set: rel, e: entryOf(st, { link: target, xa: xattrDigest(xs) }) });
        this.touch(parentOf(rel));
      } else if (attrDiffers(e, st) || x.changed) {
        await this.emit({ path: rel, kind: { $case: "attr", value: { attr: withXattrs(attrOf(st), x.xs) } } }, { set: rel, e: entryOf(st, { link: target, xa }) });
      }
      return;
    }
    if (isSpecial(e.t)) {
      if (rdevOf(st) !== (e.rdev ?? "")) {
        // Another device number (a node re-made in place): make it again.
        const xs = await readXattrs(this.abs(rel));
        await this.emit({ path: rel, kind: { $case: "mknod", value: { type: e.t, major: devMajor(st.rdev), minor: devMinor(st.rdev), attr: withXattrs(attrOf(st), xs) } } }, { set: rel, e: entryOf(st, { xa: xattrDigest(xs) }) });
        this.touch(parentOf(rel)); // re-made on the target: its directory's times change there
        return;
      }
      const x = await this.xattrsIfChanged(rel, e, st);
      // setEntry: the other names of a hard-linked node share the new attributes.
      if (attrDiffers(e, st) || x.changed || e.nlink !== Number(st.nlink)) await this.setEntry(rel, entryOf(st, { xa: x.xs ? xattrDigest(x.xs) : e.xa }), attrDiffers(e, st) || x.changed, x.xs);
      return;
    }
    if (inPlace || contentMayDiffer(e, st)) return this.sendContent(rel, st, e.hashes, e.size, false);
    if (attrDiffers(e, st) || e.nlink !== Number(st.nlink)) {
      await this.setEntry(rel, entryOf(st, { hashes: e.hashes, xa: e.xa }), attrDiffers(e, st));
    }
  }

  /** Record the new entry for rel (and the other names of the same inode) with an attr op (carrying xs when known). */
  private async setEntry(rel: string, ne: IndexEntry, withAttr: boolean, xs?: Xattr[]): Promise<void> {
    const a: Attr = withXattrs({ mode: ne.mode, uid: ne.uid, gid: ne.gid, mtimeSec: ne.mtimeSec, mtimeNsec: ne.mtimeNsec, xattrs: [], hasXattrs: false }, xs);
    await this.emit(withAttr ? { path: rel, kind: { $case: "attr", value: { attr: a } } } : undefined, { set: rel, e: ne });
    for (const p of this.o.index.pathsWithIno(ne.ino)) if (p !== rel) await this.emit(undefined, { set: p, e: { ...ne } });
  }

  /**
   * Read the file, compare block digests with `old`, and emit Writes for the
   * blocks that differ (contiguous ones merged), a Truncate when the size
   * changed, and the final attributes.
   */
  private async sendContent(rel: string, st: BigIntStats, old: Buffer | undefined, oldSize: number, fresh: boolean): Promise<void> {
    if (this.silent) {
      // Index-only scan of a new journal: the content is not read here. Every
      // target is mirrored, and the mirror's read of each file gives the
      // index its digests (MirrorSource.adoptDigests); a file changed before
      // that has none, and its first change is sent whole. (Synchronous: one
      // small call per file, cheaper than a trip through the thread pool.)
      const xs = readXattrsSync(this.abs(rel));
      return this.setEntry(rel, entryOf(st, { xa: xattrDigest(xs) }), true, xs);
    }
    const bs = this.o.blockSize;
    let fh;
    try {
      // O_NONBLOCK: should the path have become a fifo since the lstat, the open must not hang.
      fh = await open(this.abs(rel), C.O_RDONLY | C.O_NOFOLLOW | C.O_NONBLOCK);
    } catch {
      return this.o.redirty(rel); // gone (or replaced) since the lstat: look again, nothing emitted yet
    }
    if (!(await fh.stat()).isFile()) {
      await fh.close();
      return this.o.redirty(rel);
    }
    // A new file is created on the target only once it could be opened here.
    if (fresh) await this.emit({ path: rel, kind: { $case: "create", value: { attr: attrOf(st) } } });
    const size = Number(st.size);
    // Changed blocks are copied once, straight into the data of the Write op they join.
    let pend: { offset: number; buf: Buffer; len: number; pooled: boolean } | undefined;
    // Time spent handing writes on (journal, queue back-pressure) is not the read's cost: deferFor bounds re-reads only.
    let emitMs = 0;
    const flushWrite = async () => {
      if (!pend) return;
      const p = pend;
      pend = undefined;
      const e0 = Date.now();
      await this.emit({ path: rel, kind: { $case: "write", value: { offset: p.offset, data: p.buf.subarray(0, p.len) } } }, undefined, p.pooled ? p.buf : undefined);
      emitMs += Date.now() - e0;
    };
    try {
      if (size < oldSize) await this.emit({ path: rel, kind: { $case: "truncate", value: { size } } });
      this.scratch ??= Buffer.allocUnsafe(Math.max(READ_BYTES, bs));
      // The read-ahead buffer of files larger than one read, kept too (a growing file is read again and again).
      if (size > this.scratch.length) this.scratch2 ??= Buffer.allocUnsafe(this.scratch.length);
      const t0 = Date.now();
      const hashes = await hashBlocks(fh, size, bs, this.silent ? undefined : async (b) => {
        const was = digestAt(old, b.index);
        const wasFull = b.index < Math.floor(oldSize / bs) || (b.index === Math.floor(oldSize / bs) && b.data.length === oldSize - b.offset);
        if (was && wasFull && was.equals(b.digest)) return flushWrite();
        // Beyond the target's old end, zero blocks stay holes; the final truncate sets the size.
        if (b.offset >= oldSize && isZero(b.data)) return flushWrite();
        if (pend && (pend.offset + pend.len !== b.offset || pend.len + b.data.length > this.maxWrite)) await flushWrite();
        if (!pend) {
          const want = Math.max(bs, Math.min(this.maxWrite, size - b.offset));
          const pooled = want >= POOLED_WRITE && want <= this.maxWrite;
          pend = { offset: b.offset, buf: pooled ? (this.pool.pop() ?? Buffer.allocUnsafeSlow(this.maxWrite)) : Buffer.allocUnsafe(want), len: 0, pooled };
        }
        b.data.copy(pend.buf, pend.len);
        pend.len += b.data.length;
      }, undefined, this.scratch, undefined, undefined, this.scratch2);
      await flushWrite();
      if (size >= LARGE_FILE) {
        if (this.cost.size > 1000) this.cost.clear();
        this.cost.set(rel, { at: Date.now(), ms: Math.max(0, Date.now() - t0 - emitMs) });
      }
      this.stats.filesHashed++;
      this.stats.bytesHashed += size;
      if (size > oldSize || (fresh && size > 0)) await this.emit({ path: rel, kind: { $case: "truncate", value: { size } } });
      const after = await fh.stat({ bigint: true });
      if (after.size !== st.size || after.mtimeNs !== st.mtimeNs) this.o.redirty(rel); // written while we read
      // The xattrs travel with the last attr op: on the target, writes drop security.capability.
      const xs = await readXattrs(this.abs(rel));
      await this.setEntry(rel, entryOf(st, { hashes, xa: xattrDigest(xs) }), true, xs);
    } finally {
      await fh.close();
    }
  }

  /** List dir and bring every child up to date; children gone from disk are removed. */
  private async reconcileDir(rel: string): Promise<void> {
    let names: string[];
    try {
      names = await readdir(this.abs(rel));
    } catch (e) {
      const c = (e as NodeJS.ErrnoException).code;
      if (c === "ENOENT" || c === "ENOTDIR") return;
      throw e;
    }
    const seen = new Set<string>();
    for (const n of names) {
      const child = rel ? `${rel}/${n}` : n;
      seen.add(child);
      await this.syncPath(child, true);
    }
    for (const p of this.o.index.children(rel)) if (!seen.has(p)) await this.syncPath(p, false);
  }
}
