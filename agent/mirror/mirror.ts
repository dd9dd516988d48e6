// Mirror: make one target's image equal to the source, sending only what
// differs (checksum mode: block digests compared; full mode: all content).
//
// Structure comes from the source's index (what the journal describes at a
// position), content from the files. The target applies nothing from the
// journal while it is mirrored; changes made meanwhile are journaled as usual,
// and the directories they touched are mirrored again. The last round runs
// with capture paused, so at its end the image equals the source as of
// journal position P, and the target jumps to P and resumes from P+1. The
// target records the last directory completed, so an interrupted mirror
// resumes there (with the journal since its start to re-check what changed).
// Special files are made with Mknod; extended attributes are read from the
// source's files and compared with the target's listing.
import { closeSync, constants as C, fstatSync, openSync, readSync, type BigIntStats } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
import path from "node:path";
import type { Attr, DigestsResponse, ManifestEntryMsg, ManifestResponse, MirrorProgress, Op, Xattr } from "../wire.ts";
import { type BlockVisit, blockDigest, CHANGE_DIGEST, DIGEST_BYTES, digestAt, digestsOf, hashBlocks, isZero, READ_BYTES } from "../source/blocks.ts";
import { parentOf, type FileIndex, type IndexEntry } from "../source/file-index.ts";
import { attrOf, isSpecial } from "../fs/stat.ts";
import { readXattrs, readXattrsSync, sameXattrs } from "../fs/xattr.ts";

export type MirrorMode = "full" | "checksum";

/** The source side as the mirror sees it (a SourceSet provides it). */
export interface MirrorSource {
  root: string;
  blockSize: number;
  index: FileIndex;
  /** Run fn with capture paused (index consistent with the journal). */
  serial<T>(fn: () => Promise<T>): Promise<T>;
  /** Inside serial: capture pending events now. */
  flushCapture(): Promise<void>;
  lastSeq(): number;
  /** Paths touched by journal entries after seq, and roots of moved subtrees. */
  touchedSince(seq: number): Promise<{ paths: Set<string>; moved: Set<string> }>;
  /**
   * The mirror read all of file q, unchanged while it read it (`st` before
   * and after): its block digests (CHANGE_DIGEST), for an index entry that
   * has none and describes that very file (an index-only scan reads no
   * content). The source ignores them otherwise.
   */
  adoptDigests?(q: string, st: BigIntStats, digests: Buffer): void;
  /**
   * Inside serial: the final round could not send these index entries (the
   * tree moved on since the index: renamed, removed or replaced): journal their
   * removal, so that the index again says what the target has and capture
   * sends them afresh where they are now.
   */
  forget(paths: string[]): Promise<void>;
}

/**
 * The target side as the mirror sees it (a Sender provides it over its stream).
 * Listings and digests show the target as it is when they are taken, which may
 * be before batches still in flight are applied: the mirror asks for them only
 * once every batch that could change what they show is applied (see
 * TouchTracker).
 */
export interface MirrorTarget {
  manifest(dir: string, digestMaxBlocks: number): Promise<ManifestResponse>;
  digests(path: string): Promise<DigestsResponse>;
  /** Send ops as the next batch (batches are numbered 1, 2, … in call order); resolves when more may be sent (flow control). */
  send(ops: Op[], doneThrough: string): Promise<void>;
  /** How many batches the target has applied (it applies them in order). */
  applied(): number;
  /** Resolves once the target has applied batch n (rejects if the stream fails). */
  waitApplied(n: number): Promise<void>;
  /** All ops applied; the image now stands at seq. */
  done(seq: number): Promise<void>;
}

export interface MirrorOptions {
  mode: MirrorMode;
  /** Journal position the mirror started from (its changes are re-checked). */
  pStart: number;
  /** Resume: directories up to this one (walk order) are done. */
  resumeAfter?: string;
  /** Repair: mirror only these directories. */
  onlyDirs?: string[];
  progress: MirrorProgress;
  signal: AbortSignal;
}

const MAX_BATCH_DATA = 4 * 1024 * 1024;
const MAX_WRITE = 1024 * 1024;
/** Files of at most this many blocks get their digests in the directory listing. */
const LISTING_DIGEST_BLOCKS = 64;
/** Changed directories below this count go straight to the final (paused) round. */
const FINAL_ROUND_DIRS = 200;
/** Files the target lacks of at most this size are read whole at once (readWhole). */
const READ_WHOLE_MAX = MAX_WRITE;

/** A small file read whole: its stat, xattrs and content (buf[0, got)), or what mirrorFile does instead. */
type ReadAhead = { st: BigIntStats; xs: Xattr[] | undefined; buf: Buffer; got: number; same: boolean } | "skip" | "normal";

/** Size, mtime and ctime equal: the file was not written between two stats. */
function unchanged(a: BigIntStats, b: BigIntStats): boolean {
  return a.ino === b.ino && a.size === b.size && a.mtimeNs === b.mtimeNs && a.ctimeNs === b.ctimeNs;
}

/** Read up to n bytes at off (fewer only at the end of the file). */
async function readAt(fh: FileHandle, off: number, n: number): Promise<{ buf: Buffer; got: number }> {
  const buf = Buffer.allocUnsafe(n);
  let got = 0;
  while (got < n) {
    const { bytesRead } = await fh.read(buf, got, n - got, off + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return { buf, got };
}

/** Directory listings asked for ahead of the directory being mirrored. */
const PREFETCH_DIRS = 16;

/**
 * Which batch last changed what a listing of a directory shows, so that
 * listings can be asked for while other batches are in flight without being
 * taken for the truth too early. An op on path p changes the listing of
 * p's parent (an entry), of p itself and of everything below p (p made,
 * removed or replaced); a Link also changes the listed link count of the
 * name it links to. A listing of d is current when it was taken after the
 * target applied batch `need(d)`, and stays current until an op touching d
 * is queued. (Ops on one name of a hard-linked file show in the listings of
 * its other names too: content and attributes are only ever sent through a
 * group's first name, the others are linked to it and not compared; and a
 * name removed or replaced elsewhere only lowers a listed link count, with
 * which the mirror at worst replaces a file instead of editing it.)
 */
export class TouchTracker {
  private readonly entries = new Map<string, number>();
  private readonly paths = new Map<string, number>();

  /** Record op (in batch `batch`). */
  touch(op: Op, batch: number): void {
    this.entries.set(parentOf(op.path), batch);
    this.paths.set(op.path, batch);
    if (op.kind?.$case === "link") this.entries.set(parentOf(op.kind.value.existing), batch);
  }

  /** The last batch whose ops change what a listing of dir d shows (0: none). */
  need(d: string): number {
    let n = Math.max(this.entries.get(d) ?? 0, this.paths.get(d) ?? 0);
    for (let q = d; q !== ""; ) {
      q = parentOf(q);
      n = Math.max(n, this.paths.get(q) ?? 0);
    }
    return n;
  }

  /**
   * When much is recorded, forget what batches up to `applied` did: their
   * effects show in any listing taken from now on, but not in one taken
   * before (returns true: such listings must be dropped).
   */
  prune(applied: number, over = 50_000): boolean {
    if (this.paths.size < over) return false;
    for (const m of [this.entries, this.paths]) for (const [k, b] of m) if (b <= applied) m.delete(k);
    return true;
  }
}

function attrOfEntry(e: IndexEntry, xs?: Xattr[]): Attr {
  return { mode: e.mode, uid: e.uid, gid: e.gid, mtimeSec: e.mtimeSec, mtimeNsec: e.mtimeNsec, xattrs: xs ?? [], hasXattrs: xs !== undefined };
}

/** a: the target's, b: the source's. Xattrs count when both sides could read them. */
function sameAttr(a: Attr | undefined, b: Attr, symlink = false): boolean {
  return !!a && (symlink || a.mode === b.mode) && a.uid === b.uid && a.gid === b.gid && a.mtimeSec === b.mtimeSec && Math.floor(a.mtimeNsec / 1000) === Math.floor(b.mtimeNsec / 1000) && (!a.hasXattrs || !b.hasXattrs || sameXattrs(a.xattrs, b.xattrs));
}

/** "major,minor" of a listed device node ("" for anything else). */
function rdevOfEntry(h: ManifestEntryMsg): string {
  return h.type === "c" || h.type === "b" ? `${h.rdevMajor},${h.rdevMinor}` : "";
}

/** A listing whose digests are another kind than ours (an older target's) is taken as one without digests. */
function ownDigestsOnly(l: ManifestResponse): ManifestResponse {
  if (l.digestAlgo === CHANGE_DIGEST) return l;
  for (const e of l.entries) e.hasDigests = false;
  return l;
}

/** Walk order: parents before children ("" first), lexicographic. */
export function walkOrder(dirs: Iterable<string>): string[] {
  return [...new Set(dirs)].sort((a, b) => (a === b ? 0 : a === "" ? -1 : b === "" ? 1 : a < b ? -1 : 1));
}

export class Mirror {
  private readonly src: MirrorSource;
  private readonly tgt: MirrorTarget;
  private readonly o: MirrorOptions;
  private ops: Op[] = [];
  private opBytes = 0;
  /** First names of hard-link groups whose content this run has sent. */
  private linkDone = new Set<string>();
  private scratch = Buffer.allocUnsafe(READ_BYTES);
  private readonly t0 = Date.now();
  /** True inside the final round, which already holds the capture's turn. */
  private inLock = false;
  /** Batches sent so far (the ops being gathered go into batch sent + 1). */
  private sent = 0;
  private readonly touched = new TouchTracker();
  /** Listings asked for ahead: taken once the target had applied `at` batches. */
  private prefetched = new Map<string, { at: number; listing: Promise<ManifestResponse> }>();
  /** Files the final round could not send as the index has them (see skipped). */
  private readonly lost = new Set<string>();

  constructor(src: MirrorSource, tgt: MirrorTarget, o: MirrorOptions) {
    this.src = src;
    this.tgt = tgt;
    this.o = o;
  }

  /** Runs the mirror; returns the journal position the image now stands at. */
  async run(): Promise<number> {
    const p = this.o.progress;
    const all = await this.src.serial(async () => {
      let files = 0;
      const dirs = [""];
      for (const q of this.src.index.paths()) {
        const e = this.src.index.get(q)!;
        if (e.t === "d") dirs.push(q);
        else if (e.t === "f") files++;
      }
      p.filesTotal = files;
      p.bytesTotal = this.src.index.totalBytes();
      return walkOrder(dirs);
    });
    let dirs = this.o.onlyDirs ? walkOrder(this.o.onlyDirs) : all;
    if (this.o.resumeAfter !== undefined && !this.o.onlyDirs) {
      const after = this.o.resumeAfter;
      dirs = dirs.filter((d) => d !== "" && d > after);
      p.resumed = true;
    }
    await this.mirrorDirs(dirs, true);
    // Rounds for what changed meanwhile, until little is left.
    let since = this.o.pStart;
    for (let round = 0; round < 3; round++) {
      const now = this.src.lastSeq();
      const redo = await this.changedDirs(since);
      if (redo.length < FINAL_ROUND_DIRS) break; // few enough: the final round takes them
      await this.mirrorDirs(redo, false);
      since = now;
    }
    // Final round with capture paused: the image then equals the index at `end`.
    return this.src.serial(async () => {
      this.inLock = true;
      await this.src.flushCapture();
      const end = this.src.lastSeq();
      await this.mirrorDirs(await this.changedDirs(since), false);
      await this.flush("");
      // Journaled after `end`: the target applies them once it stands at end.
      if (this.lost.size) await this.src.forget([...this.lost].sort());
      await this.tgt.done(end);
      p.finishedAt = Date.now() / 1000;
      p.filesDone = Math.max(p.filesDone, p.filesTotal);
      p.bytesDone = Math.max(p.bytesDone, p.bytesTotal);
      p.etaSeconds = 0;
      return end;
    });
  }

  /** Mirror dirs in order, with the listings of the next ones asked for ahead. */
  private async mirrorDirs(dirs: string[], firstPass: boolean): Promise<void> {
    try {
      for (let i = 0; i < dirs.length; i++) {
        this.prefetch(dirs, i + 1);
        await this.mirrorDir(dirs[i]!, firstPass);
      }
    } finally {
      for (const p of this.prefetched.values()) p.listing.catch(() => undefined);
      this.prefetched.clear();
    }
  }

  private digestBlocks(): number {
    return this.o.mode === "checksum" ? LISTING_DIGEST_BLOCKS : 0;
  }

  /** Ask for the listings of dirs[from..] (a few) that no batch still in flight can change. */
  private prefetch(dirs: string[], from: number): void {
    const applied = this.tgt.applied();
    for (let j = from; j < dirs.length && j < from + PREFETCH_DIRS; j++) {
      const d = dirs[j]!;
      if (this.prefetched.has(d) || this.touched.need(d) > applied) continue;
      const listing = this.tgt.manifest(d, this.digestBlocks());
      listing.catch(() => undefined); // (awaited when used; dropped ones must not count as unhandled)
      this.prefetched.set(d, { at: applied, listing });
    }
  }

  /** Wait until the target has applied batch n (sending the ops being gathered first if n is theirs). */
  private async settled(n: number): Promise<void> {
    if (n > this.sent) await this.flush("");
    await this.tgt.waitApplied(n);
  }

  /** The target's listing of d, taken after every op sent that changes it was applied. */
  private async listing(d: string, digestMaxBlocks: number, usePrefetched: boolean): Promise<ManifestResponse> {
    const need = this.touched.need(d);
    const pre = usePrefetched ? this.prefetched.get(d) : undefined;
    if (pre) {
      this.prefetched.delete(d);
      if (pre.at >= need) return ownDigestsOnly(await pre.listing);
    }
    await this.settled(need);
    return ownDigestsOnly(await this.tgt.manifest(d, digestMaxBlocks));
  }

  /**
   * File q is not what the index says any more (gone, renamed with its
   * directory, replaced), so it was not sent. In an earlier round the change
   * is journaled after that round began, and a later round looks again. In
   * the final round nothing looks again: the change is journaled after `end`
   * and describes the file as sent (a directory's Rename moved it on the
   * target, where it never was), so the file stayed missing for good (issue
   * 16: a renamed directory's files missing on the target of a mirror run on
   * a busy machine). Such files are forgotten at the end (MirrorSource.forget).
   */
  private skipped(q: string): void {
    if (this.inLock) this.lost.add(q);
  }

  private lock<T>(fn: () => Promise<T>): Promise<T> {
    return this.inLock ? fn() : this.src.serial(fn);
  }

  private async changedDirs(since: number): Promise<string[]> {
    const { paths, moved } = await this.src.touchedSince(since);
    const dirs = new Set<string>();
    for (const q of paths) {
      dirs.add(parentOf(q));
      if (this.src.index.get(q)?.t === "d") dirs.add(q);
    }
    for (const m of moved) {
      if (this.src.index.get(m)?.t !== "d") continue;
      dirs.add(m);
      for (const q of this.src.index.below(m)) if (this.src.index.get(q)?.t === "d") dirs.add(q);
    }
    return walkOrder(dirs);
  }

  private async push(op: Op): Promise<void> {
    this.ops.push(op);
    this.touched.touch(op, this.sent + 1);
    if (op.kind?.$case === "write") {
      this.opBytes += op.kind.value.data.length;
      this.o.progress.bytesSent += op.kind.value.data.length;
    }
    if (this.opBytes >= MAX_BATCH_DATA || this.ops.length >= 2048) await this.flush("");
  }

  private async flush(doneThrough: string): Promise<void> {
    if (this.o.signal.aborted) throw new Error("mirror cancelled");
    if (this.ops.length === 0 && !doneThrough) return;
    const ops = this.ops;
    this.ops = [];
    this.opBytes = 0;
    this.sent++;
    await this.tgt.send(ops, doneThrough);
    const applied = this.tgt.applied();
    if (this.touched.prune(applied)) {
      for (const [d, p] of this.prefetched) {
        if (p.at >= applied) continue;
        p.listing.catch(() => undefined);
        this.prefetched.delete(d);
      }
    }
    this.updateRate();
  }

  private updateRate(): void {
    const p = this.o.progress;
    const secs = (Date.now() - this.t0) / 1000;
    p.rateBytesPerSecond = secs > 0 ? p.bytesDone / secs : 0;
    p.etaSeconds = p.rateBytesPerSecond > 0 ? Math.max(0, (p.bytesTotal - p.bytesDone) / p.rateBytesPerSecond) : 0;
  }

  /** Make directory d (its entries, and its own attributes) equal to the index. */
  private async mirrorDir(d: string, firstPass: boolean): Promise<void> {
    const snap = await this.lock(async () => ({
      self: d === "" ? undefined : this.src.index.get(d),
      kids: this.src.index.children(d).map((q) => [q, { ...this.src.index.get(q)! }] as const),
    }));
    if (d !== "" && snap.self?.t !== "d") {
      // Gone from the source since: the parent's round removes it.
      return this.flush(firstPass ? d : "");
    }
    const have = await this.listing(d, this.digestBlocks(), true);
    if (!have.exists && d !== "") await this.push({ path: d, kind: { $case: "mkdir", value: { attr: attrOfEntry(snap.self!) } } });
    const byName = new Map<string, ManifestEntryMsg>();
    for (const e of have.exists ? have.entries : []) byName.set(e.name, e);
    // Small regular files the target lacks are read whole with synchronous
    // calls (from the page cache, a few microseconds each: cheaper than a
    // trip through libuv's thread pool per call).
    const kids = snap.kids;
    const readWhole = kids.map(([q, e]) => e.t === "f" && e.nlink <= 1 && e.size <= READ_WHOLE_MAX && !byName.has(q.slice(q.lastIndexOf("/") + 1)));
    for (let i = 0; i < kids.length; i++) {
      const [q, e] = kids[i]!;
      const name = q.slice(q.lastIndexOf("/") + 1);
      let h = byName.get(name);
      byName.delete(name);
      if (h && h.type !== e.t) {
        await this.push({ path: q, kind: { $case: "remove", value: { directory: h.type === "d" } } });
        h = undefined;
      }
      if (e.t === "d") {
        if (!h) await this.push({ path: q, kind: { $case: "mkdir", value: { attr: attrOfEntry(e) } } });
      } else if (e.t === "l") {
        const a = attrOfEntry(e, await readXattrs(path.join(this.src.root, q)));
        if (!h || h.link !== e.link) await this.push({ path: q, kind: { $case: "symlink", value: { target: e.link ?? "", attr: a } } });
        else if (!sameAttr(h.attr, a, true)) await this.push({ path: q, kind: { $case: "attr", value: { attr: a } } });
      } else if (isSpecial(e.t)) await this.mirrorSpecial(q, e, h);
      else await this.mirrorFile(q, e, h, readWhole[i] ? this.readWhole(q, e) : undefined);
    }
    // Entries the source does not have.
    for (const [name, h] of byName) await this.push({ path: d ? `${d}/${name}` : name, kind: { $case: "remove", value: { directory: h.type === "d" } } });
    if (d !== "") await this.push({ path: d, kind: { $case: "attr", value: { attr: attrOfEntry(snap.self!, await readXattrs(path.join(this.src.root, d))) } } });
    await this.flush(firstPass ? d : "");
  }

  /**
   * Hard links: the group's first name (in path order, whatever order names
   * are visited in) that can be sent carries the content (mirrored by
   * `mirrorOne`, which marks it in linkDone once sent); every other name is
   * linked to it. Returns true when q was linked.
   *
   * A name is only linked to a name this run has sent. The index may lag
   * behind the tree while the mirror runs (capture keeps going between
   * directories): the group's first name may be gone, or be another file now,
   * with its old inode number even reused by a new file. Linking to it anyway
   * made the target's Link fail (the whole batch refused, the mirror cut off
   * and retried) or, worse, joined an unrelated file into the group on the
   * target, which nothing repaired afterwards (e2e crash.test.ts: "link count
   * 2 vs 3"). Such a name is skipped and the next one carries the content.
   */
  private async linkedToFirst(q: string, e: IndexEntry, mirrorOne: (first: string, fe: IndexEntry, h: ManifestEntryMsg | undefined) => Promise<void>): Promise<boolean> {
    if (e.nlink <= 1) return false;
    const group = this.src.index.pathsWithIno(e.ino).filter((x) => this.src.index.get(x)?.t === e.t).sort();
    for (const first of group) {
      if (first === q) return false; // q carries the content
      if (!this.linkDone.has(first)) {
        const fe = this.src.index.get(first);
        if (!fe) continue;
        const listing = await this.listing(parentOf(first), 0, false);
        const name = first.slice(first.lastIndexOf("/") + 1);
        // (only names before `first` are tried in there: the recursion ends)
        await mirrorOne(first, { ...fe }, listing.exists ? listing.entries.find((x) => x.name === name) : undefined);
        if (!this.linkDone.has(first)) continue; // not sent: not what the index says any more
      }
      await this.push({ path: q, kind: { $case: "link", value: { existing: first } } });
      return true;
    }
    return false;
  }

  /** A fifo, device or socket: made again when missing or another device, else its attributes. */
  private async mirrorSpecial(q: string, e: IndexEntry, h: ManifestEntryMsg | undefined): Promise<void> {
    if (await this.linkedToFirst(q, e, (f, fe, fh) => this.mirrorSpecial(f, fe, fh))) return;
    const a = attrOfEntry(e, await readXattrs(path.join(this.src.root, q)));
    if (!h || rdevOfEntry(h) !== (e.rdev ?? "") || (h.nlink > 1 && e.nlink === 1)) {
      const [major, minor] = (e.rdev ?? "0,0").split(",").map(Number);
      await this.push({ path: q, kind: { $case: "mknod", value: { type: e.t, major: major ?? 0, minor: minor ?? 0, attr: a } } });
    } else if (!sameAttr(h.attr, a)) await this.push({ path: q, kind: { $case: "attr", value: { attr: a } } });
    if (e.nlink > 1) this.linkDone.add(q);
  }

  /**
   * All of a file the target does not have, read straight into the data of
   * the Write ops (no digests: there is nothing to compare them with).
   * Blocks of zeros are left out (holes); returns where the last Write ends.
   */
  private async sendFresh(q: string, fh: FileHandle, size: number, st: BigIntStats): Promise<number> {
    const bs = this.src.blockSize;
    const chunk = Math.max(MAX_WRITE, bs); // a whole number of blocks (both are powers of two)
    // Digests for the index (adoptDigests), as the content goes by.
    const digests = this.src.adoptDigests ? Buffer.allocUnsafe(Math.ceil(size / bs) * DIGEST_BYTES) : undefined;
    let end = 0;
    let whole = true;
    for (let off = 0; off < size; ) {
      if (this.o.signal.aborted) throw new Error("mirror cancelled");
      const want = Math.min(chunk, size - off);
      const { buf, got } = await readAt(fh, off, want);
      if (digests) for (let i = 0; i < got; i += bs) blockDigest(buf.subarray(i, Math.min(got, i + bs)), CHANGE_DIGEST).copy(digests, ((off + i) / bs) * DIGEST_BYTES);
      end = Math.max(end, await this.sendData(q, buf, got, off));
      off += got;
      if (got < want) {
        whole = false;
        break; // shorter than it was: capture journals the change
      }
    }
    if (digests && whole && unchanged(st, await fh.stat({ bigint: true }))) this.adopt(q, st, digests);
    return end;
  }

  /** Write ops for buf[0, got) at file offset off, all-zero blocks left out; returns where the last one ends (0: none). */
  private async sendData(q: string, buf: Buffer, got: number, off: number): Promise<number> {
    const bs = this.src.blockSize;
    let end = 0;
    let run = -1; // start of the pending run of non-zero blocks
    for (let i = 0; ; i = Math.min(got, i + bs)) {
      const zero = i === got || isZero(buf.subarray(i, Math.min(got, i + bs)));
      if (!zero && run < 0) run = i;
      else if (zero && run >= 0) {
        await this.push({ path: q, kind: { $case: "write", value: { offset: off + run, data: buf.subarray(run, i) } } });
        end = off + i;
        run = -1;
      }
      if (i === got) break;
    }
    this.o.progress.bytesDone += got;
    return end;
  }

  /**
   * Read a small file the target lacks, whole (synchronously): what
   * mirrorFile reads of it, "skip" when mirrorFile would skip it (gone, or
   * another file than the index says), "normal" when it is no longer small.
   */
  private readWhole(q: string, e: IndexEntry): ReadAhead {
    const abs = path.join(this.src.root, q);
    let fd: number;
    try {
      fd = openSync(abs, C.O_RDONLY | C.O_NOFOLLOW | C.O_NONBLOCK);
    } catch {
      return "skip";
    }
    try {
      const st = fstatSync(fd, { bigint: true });
      if (Number(st.ino) !== e.ino || !st.isFile()) return "skip";
      if (st.size > BigInt(READ_WHOLE_MAX)) return "normal";
      const xs = readXattrsSync(abs);
      const n = Number(st.size);
      const buf = Buffer.allocUnsafe(n);
      let got = 0;
      while (got < n) {
        const r = readSync(fd, buf, got, n - got, got);
        if (r === 0) break;
        got += r;
      }
      return { st, xs, buf, got, same: got === n && unchanged(st, fstatSync(fd, { bigint: true })) };
    } finally {
      closeSync(fd);
    }
  }

  /** Hand the digests of a file read whole and unchanged to the source's index. */
  private adopt(q: string, st: BigIntStats, digests: Buffer): void {
    this.src.adoptDigests?.(q, st, digests);
  }

  /** A file read whole, sent as new (mirrorFile's fresh case). */
  private async sendReadAhead(q: string, e: IndexEntry, r: Exclude<ReadAhead, string>): Promise<void> {
    const size = Number(r.st.size);
    if (r.same && this.src.adoptDigests) this.adopt(q, r.st, digestsOf(r.buf, r.got, this.src.blockSize));
    const attr: Attr = { ...attrOf(r.st), xattrs: r.xs ?? [], hasXattrs: r.xs !== undefined };
    await this.push({ path: q, kind: { $case: "create", value: { attr: undefined } } });
    const end = await this.sendData(q, r.buf, r.got, 0);
    if (end < size) await this.push({ path: q, kind: { $case: "truncate", value: { size } } });
    await this.push({ path: q, kind: { $case: "attr", value: { attr } } });
    if (e.nlink > 1) this.linkDone.add(q);
    this.o.progress.filesDone++;
    this.updateRate();
  }

  private async mirrorFile(q: string, e: IndexEntry, h: ManifestEntryMsg | undefined, r?: ReadAhead): Promise<void> {
    const p = this.o.progress;
    if (r) {
      if (r === "skip") return this.skipped(q);
      if (r !== "normal") return this.sendReadAhead(q, e, r);
    }
    if (await this.linkedToFirst(q, e, (f, fe, fh) => this.mirrorFile(f, fe, fh))) {
      p.filesDone++;
      return;
    }
    let fh;
    try {
      fh = await open(path.join(this.src.root, q), C.O_RDONLY | C.O_NOFOLLOW | C.O_NONBLOCK);
    } catch {
      return this.skipped(q); // changed since the index says so: capture journals it, and a later round sees it
    }
    try {
      const st = await fh.stat({ bigint: true });
      if (Number(st.ino) !== e.ino || !st.isFile()) return this.skipped(q);
      const size = Number(st.size);
      const xs = await readXattrs(path.join(this.src.root, q));
      const attr: Attr = { ...attrOf(st), xattrs: xs ?? [], hasXattrs: xs !== undefined };
      const fresh = !h || (h.nlink > 1 && e.nlink === 1); // a target file shared with other names is replaced, not edited
      let theirs: Buffer | undefined;
      let theirSize = 0;
      /** This side's digests, when taken before the comparison (hashed while the target hashed its copy). */
      let early: Buffer | undefined;
      if (fresh) {
        // Created bare: the attr op after the content sets owner, mode, xattrs and times once.
        await this.push({ path: q, kind: { $case: "create", value: { attr: undefined } } });
        const end = await this.sendFresh(q, fh, size, st);
        if (end < size) await this.push({ path: q, kind: { $case: "truncate", value: { size } } });
        await this.push({ path: q, kind: { $case: "attr", value: { attr } } });
        if (e.nlink > 1) this.linkDone.add(q);
        p.filesDone++;
        this.updateRate();
        return;
      }
      {
        theirSize = Number(h!.size);
        if (this.o.mode === "checksum") {
          if (h!.hasDigests) theirs = Buffer.from(h!.digests);
          else {
            await this.settled(this.touched.need(parentOf(q)));
            // Both sides hash their copy at the same time; then only the blocks
            // that differ are read again here (a large file, mostly equal).
            const asked = this.tgt.digests(q);
            asked.catch(() => undefined); // (awaited below; a hashing failure here must not leave it unhandled)
            early = await hashBlocks(fh, size, this.src.blockSize, undefined, this.o.signal, this.scratch, CHANGE_DIGEST, false);
            const r = await asked;
            // (another kind of digest, from an older target: nothing to compare with, all is sent)
            theirs = r.exists && r.digestAlgo === CHANGE_DIGEST ? Buffer.from(r.digests) : undefined;
            theirSize = r.exists ? Number(r.size) : 0;
          }
        }
      }
      const bs = this.src.blockSize;
      if (!fresh && size < theirSize) await this.push({ path: q, kind: { $case: "truncate", value: { size } } });
      let wrote = false;
      let pend: { offset: number; buf: Buffer; len: number } | undefined;
      const flushWrite = async () => {
        if (!pend) return;
        const { offset, buf, len } = pend;
        pend = undefined;
        wrote = true;
        await this.push({ path: q, kind: { $case: "write", value: { offset, data: buf.subarray(0, len) } } });
      };
      const lastTheirs = Math.floor(theirSize / bs);
      const sameAs = (index: number, len: number, digest: Buffer) => {
        const fullTheirs = index < lastTheirs || (index === lastTheirs && len === theirSize - index * bs);
        const t = digestAt(theirs, index);
        return t !== undefined && fullTheirs && t.equals(digest);
      };
      const visit = async (b: BlockVisit) => {
        if (sameAs(b.index, b.data.length, b.digest) || (b.offset >= theirSize && isZero(b.data))) {
          await flushWrite();
        } else {
          if (pend && (pend.offset + pend.len !== b.offset || pend.len + b.data.length > MAX_WRITE)) await flushWrite();
          pend ??= { offset: b.offset, buf: Buffer.allocUnsafe(Math.min(MAX_WRITE, Math.max(bs, size - b.offset))), len: 0 };
          b.data.copy(pend.buf, pend.len);
          pend.len += b.data.length;
        }
        p.bytesDone += b.data.length;
      };
      let mine: Buffer;
      if (early) {
        mine = early;
        for (let index = 0; index * bs < size; index++) {
          if (this.o.signal.aborted) throw new Error("mirror cancelled");
          const offset = index * bs;
          const len = Math.min(bs, size - offset);
          const digest = digestAt(early, index)!;
          if (sameAs(index, len, digest)) {
            await flushWrite();
            p.bytesDone += len;
            continue;
          }
          const { buf, got } = await readAt(fh, offset, len);
          if (got < len) buf.fill(0, got, len); // shrunk meanwhile: capture journals the change
          await visit({ index, offset, data: buf.subarray(0, len), digest });
        }
      } else mine = await hashBlocks(fh, size, bs, visit, this.o.signal, this.scratch, CHANGE_DIGEST, false);
      if (this.src.adoptDigests && unchanged(st, await fh.stat({ bigint: true }))) this.adopt(q, st, mine);
      await flushWrite();
      if (size !== theirSize || (fresh && size > 0)) await this.push({ path: q, kind: { $case: "truncate", value: { size } } });
      if (fresh || wrote || size !== theirSize || !sameAttr(h?.attr, attr)) await this.push({ path: q, kind: { $case: "attr", value: { attr } } });
      if (e.nlink > 1) this.linkDone.add(q); // the group's other names may be linked to it now
      p.filesDone++;
      this.updateRate();
    } finally {
      await fh.close();
    }
  }
}
