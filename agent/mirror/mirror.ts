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
import { constants as C } from "node:fs";
import { open } from "node:fs/promises";
import path from "node:path";
import type { Attr, DigestsResponse, ManifestEntryMsg, ManifestResponse, MirrorProgress, Op, Xattr } from "../wire.ts";
import { digestAt, hashBlocks, isZero, READ_BYTES } from "../source/blocks.ts";
import { parentOf, type FileIndex, type IndexEntry } from "../source/file-index.ts";
import { attrOf, isSpecial } from "../fs/stat.ts";
import { readXattrs, sameXattrs } from "../fs/xattr.ts";

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
}

/** The target side as the mirror sees it (a Sender provides it over its stream). */
export interface MirrorTarget {
  manifest(dir: string, digestMaxBlocks: number): Promise<ManifestResponse>;
  digests(path: string): Promise<DigestsResponse>;
  /** Send ops; resolves when more may be sent (flow control). */
  send(ops: Op[], doneThrough: string): Promise<void>;
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
    for (const d of dirs) await this.mirrorDir(d, true);
    // Rounds for what changed meanwhile, until little is left.
    let since = this.o.pStart;
    for (let round = 0; round < 3; round++) {
      const now = this.src.lastSeq();
      const redo = await this.changedDirs(since);
      if (redo.length < FINAL_ROUND_DIRS) break; // few enough: the final round takes them
      for (const d of redo) await this.mirrorDir(d, false);
      since = now;
    }
    // Final round with capture paused: the image then equals the index at `end`.
    return this.src.serial(async () => {
      this.inLock = true;
      await this.src.flushCapture();
      const end = this.src.lastSeq();
      for (const d of await this.changedDirs(since)) await this.mirrorDir(d, false);
      await this.flush("");
      await this.tgt.done(end);
      p.finishedAt = Date.now() / 1000;
      p.filesDone = Math.max(p.filesDone, p.filesTotal);
      p.bytesDone = Math.max(p.bytesDone, p.bytesTotal);
      p.etaSeconds = 0;
      return end;
    });
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
    await this.tgt.send(ops, doneThrough);
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
    const have = await this.tgt.manifest(d, this.o.mode === "checksum" ? LISTING_DIGEST_BLOCKS : 0);
    if (!have.exists && d !== "") await this.push({ path: d, kind: { $case: "mkdir", value: { attr: attrOfEntry(snap.self!) } } });
    const byName = new Map<string, ManifestEntryMsg>();
    for (const e of have.exists ? have.entries : []) byName.set(e.name, e);
    for (const [q, e] of snap.kids) {
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
      else await this.mirrorFile(q, e, h);
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
        const listing = await this.tgt.manifest(parentOf(first), 0);
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

  private async mirrorFile(q: string, e: IndexEntry, h: ManifestEntryMsg | undefined): Promise<void> {
    const p = this.o.progress;
    if (await this.linkedToFirst(q, e, (f, fe, fh) => this.mirrorFile(f, fe, fh))) {
      p.filesDone++;
      return;
    }
    let fh;
    try {
      fh = await open(path.join(this.src.root, q), C.O_RDONLY | C.O_NOFOLLOW | C.O_NONBLOCK);
    } catch {
      return; // changed since the index says so: capture journals it, and a later round sees it
    }
    try {
      const st = await fh.stat({ bigint: true });
      if (Number(st.ino) !== e.ino || !st.isFile()) return;
      const size = Number(st.size);
      const xs = await readXattrs(path.join(this.src.root, q));
      const attr: Attr = { ...attrOf(st), xattrs: xs ?? [], hasXattrs: xs !== undefined };
      const fresh = !h || (h.nlink > 1 && e.nlink === 1); // a target file shared with other names is replaced, not edited
      let theirs: Buffer | undefined;
      let theirSize = 0;
      if (fresh) await this.push({ path: q, kind: { $case: "create", value: { attr: attrOf(st) } } });
      else {
        theirSize = Number(h!.size);
        if (this.o.mode === "checksum") {
          if (h!.hasDigests) theirs = Buffer.from(h!.digests);
          else {
            const r = await this.tgt.digests(q);
            theirs = r.exists ? Buffer.from(r.digests) : undefined;
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
      await hashBlocks(fh, size, bs, async (b) => {
        const lastTheirs = Math.floor(theirSize / bs);
        const fullTheirs = b.index < lastTheirs || (b.index === lastTheirs && b.data.length === theirSize - b.offset);
        const t = digestAt(theirs, b.index);
        const same = t !== undefined && fullTheirs && t.equals(b.digest);
        if (same || (b.offset >= theirSize && isZero(b.data))) {
          await flushWrite();
        } else {
          if (pend && (pend.offset + pend.len !== b.offset || pend.len + b.data.length > MAX_WRITE)) await flushWrite();
          pend ??= { offset: b.offset, buf: Buffer.allocUnsafe(Math.min(MAX_WRITE, Math.max(bs, size - b.offset))), len: 0 };
          b.data.copy(pend.buf, pend.len);
          pend.len += b.data.length;
        }
        p.bytesDone += b.data.length;
      }, this.o.signal, this.scratch);
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
