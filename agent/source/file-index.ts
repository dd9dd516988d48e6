// What the source has told its targets: one entry per replicated path (type,
// attributes, inode, and for files the block digests). Capture diffs the file
// system against it. It is persisted as a snapshot plus the journal: every
// journal entry carries the index changes it made (IndexDelta), replayed on
// start-up over the last snapshot.
import { open, rename, readFile, mkdir } from "node:fs/promises";
import path from "node:path";

/** f(ile), d(irectory), l(symlink), p (fifo), c(har device), b(lock device), s(ocket). */
export type EntryType = "f" | "d" | "l" | "p" | "c" | "b" | "s";

export interface IndexEntry {
  t: EntryType;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtimeSec: number;
  mtimeNsec: number;
  ctimeMs: number;
  ino: number;
  nlink: number;
  link?: string; // symlink target
  hashes?: Buffer; // file block digests
  rdev?: string; // device node: "major,minor"
  xa?: string; // digest of the replicated xattrs (see fs/xattr.ts); absent: none
}

export type IndexDelta = { set: string; e: IndexEntry } | { del: string } | { mv: [string, string] };

export class FileIndex {
  private readonly entries = new Map<string, IndexEntry>();
  private readonly byIno = new Map<number, Set<string>>();
  private readonly kids = new Map<string, Set<string>>(); // dir ("" = root) -> child paths
  /** Sum of the sizes of the file entries, kept up to date by set and delete (entries are never changed in place). */
  private fileBytes = 0;

  get size(): number {
    return this.entries.size;
  }

  get(p: string): IndexEntry | undefined {
    return this.entries.get(p);
  }

  has(p: string): boolean {
    return this.entries.has(p);
  }

  paths(): IterableIterator<string> {
    return this.entries.keys();
  }

  /** Paths of the direct children of dir ("" = root), sorted. */
  children(dir: string): string[] {
    return [...(this.kids.get(dir) ?? [])].sort();
  }

  pathsWithIno(ino: number): string[] {
    return [...(this.byIno.get(ino) ?? [])];
  }

  totalBytes(): number {
    return this.fileBytes;
  }

  /** Paths strictly below dir. */
  below(dir: string): string[] {
    const out: string[] = [];
    const walk = (d: string) => {
      for (const c of this.kids.get(d) ?? []) {
        out.push(c);
        walk(c);
      }
    };
    walk(dir);
    return out;
  }

  apply(d: IndexDelta): void {
    if ("set" in d) return this.set(d.set, d.e);
    if ("del" in d) return this.delete(d.del);
    this.move(d.mv[0], d.mv[1]);
  }

  private set(p: string, e: IndexEntry): void {
    const old = this.entries.get(p);
    if (old) this.unlinkIno(old.ino, p);
    if (old?.t === "f") this.fileBytes -= old.size;
    if (e.t === "f") this.fileBytes += e.size;
    this.entries.set(p, e);
    const parent = parentOf(p);
    let k = this.kids.get(parent);
    if (!k) this.kids.set(parent, (k = new Set()));
    k.add(p);
    let s = this.byIno.get(e.ino);
    if (!s) this.byIno.set(e.ino, (s = new Set()));
    s.add(p);
  }

  /** Delete p and everything below it. */
  private delete(p: string): void {
    for (const q of [p, ...this.below(p)]) {
      const e = this.entries.get(q);
      if (!e) continue;
      this.unlinkIno(e.ino, q);
      if (e.t === "f") this.fileBytes -= e.size;
      this.entries.delete(q);
      const k = this.kids.get(parentOf(q));
      k?.delete(q);
      if (k?.size === 0) this.kids.delete(parentOf(q));
      this.kids.delete(q);
    }
  }

  /** Rename p (and its subtree) to q, replacing whatever q was. */
  private move(p: string, q: string): void {
    const moved: [string, IndexEntry][] = [];
    for (const x of [p, ...this.below(p)]) {
      const e = this.entries.get(x);
      if (e) moved.push([q + x.slice(p.length), e]);
    }
    this.delete(p);
    this.delete(q);
    for (const [x, e] of moved) this.set(x, e);
  }

  private unlinkIno(ino: number, p: string): void {
    const s = this.byIno.get(ino);
    if (!s) return;
    s.delete(p);
    if (s.size === 0) this.byIno.delete(ino);
  }

  // ---- persistence -------------------------------------------------------

  static encodeDeltas(ds: IndexDelta[]): Buffer {
    return Buffer.from(JSON.stringify(ds.map((d) => ("set" in d ? { set: d.set, e: encodeEntry(d.e) } : d))));
  }

  static decodeDeltas(b: Buffer): IndexDelta[] {
    if (b.length === 0) return [];
    return (JSON.parse(b.toString("utf8")) as Array<Record<string, unknown>>).map((d) => ("set" in d ? { set: d.set as string, e: decodeEntry(d.e as Record<string, unknown>) } : (d as IndexDelta)));
  }

  /** Write a snapshot atomically: a header line with the journal seq it covers, then one entry per line. */
  async save(file: string, seq: number): Promise<void> {
    await mkdir(path.dirname(file), { recursive: true });
    const tmp = `${file}.tmp`;
    const fh = await open(tmp, "w", 0o600);
    try {
      let chunk: string[] = [JSON.stringify({ v: 1, seq })];
      let size = 0;
      for (const [p, e] of this.entries) {
        const line = JSON.stringify([p, encodeEntry(e)]);
        chunk.push(line);
        size += line.length;
        if (size > 1 << 20) {
          await fh.write(chunk.join("\n") + "\n");
          chunk = [];
          size = 0;
        }
      }
      if (chunk.length) await fh.write(chunk.join("\n") + "\n");
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
  }

  /** Load a snapshot; returns the journal seq it covers (0 when there is none). */
  async load(file: string): Promise<number> {
    let text: string;
    try {
      text = await readFile(file, "utf8");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return 0;
      throw e;
    }
    const lines = text.split("\n");
    const head = JSON.parse(lines[0] ?? "{}") as { v?: number; seq?: number };
    if (head.v !== 1) throw new Error(`index snapshot ${file}: unknown format`);
    for (let i = 1; i < lines.length; i++) {
      if (!lines[i]) continue;
      const [p, e] = JSON.parse(lines[i]!) as [string, Record<string, unknown>];
      this.set(p, decodeEntry(e));
    }
    return head.seq ?? 0;
  }
}

export function parentOf(rel: string): string {
  const i = rel.lastIndexOf("/");
  return i < 0 ? "" : rel.slice(0, i);
}

function encodeEntry(e: IndexEntry): Record<string, unknown> {
  return { ...e, hashes: e.hashes ? e.hashes.toString("base64") : undefined };
}

function decodeEntry(o: Record<string, unknown>): IndexEntry {
  const e = { ...o } as unknown as IndexEntry & { hashes?: unknown };
  if (typeof o.hashes === "string") e.hashes = Buffer.from(o.hashes, "base64");
  else delete e.hashes;
  return e;
}
