// Verify: compare a target's image with the source, directory by directory
// (metadata from listings, content by block digests so large files are not
// shipped), report each difference, and optionally repair exactly those.
// Each directory is first compared by summary (agent/verify/summary.ts): both
// sides digest everything compared in it, content included, and only when the
// digests differ is the target's listing fetched and compared entry by entry.
// Several directories are compared at once, and the entries of each several
// at a time, so the target's reading and hashing overlaps the source's.
// Bytes still in flight are not differences: every difference is checked
// again after the target has caught up with the journal, and paths that keep
// changing meanwhile are counted as in flight, not reported.
// Compared: type, content, link target, device numbers, mode, owner, mtime
// and extended attributes. With oneFileSystem, a directory on another file
// system (a mount point) is compared as an empty directory.
import * as grpc from "@grpc/grpc-js";
import { closeSync, constants as C, fstatSync, lstatSync, openSync, readlinkSync, type BigIntStats } from "node:fs";
import { lstat, open, readdir, readlink } from "node:fs/promises";
import path from "node:path";
import { DigestAlgo, hashBlocks, hashFileSync, READ_BYTES, SYNC_HASH_MAX } from "../source/blocks.ts";
import { parentOf } from "../source/file-index.ts";
import { attrOf, kindOf, rdevOf } from "../fs/stat.ts";
import { readXattrs, readXattrsSync, xattrDifference } from "../fs/xattr.ts";
import { dialOptions } from "../../common/tls.ts";
import { mapLimit, mtimeUs as us, summarize, type SummaryEntry } from "../verify/summary.ts";
import { MAX_MESSAGE_BYTES, ReplicationClient, type Attr, type Difference, type ManifestEntryMsg, type SummaryResponse, type VerifyReport } from "../wire.ts";

export type VerifyResult = VerifyReport;

export interface VerifyOptions {
  set: string;
  target: string;
  source: string;
  root: string;
  blockSize: number;
  wanted: (rel: string, isDir: boolean) => boolean;
  credentials: grpc.ChannelCredentials;
  /** Resolves once the target has applied everything journaled so far. */
  caughtUp: () => Promise<void>;
  /** Mirror these directories again (checksum). */
  repair?: (dirs: string[]) => Promise<void>;
  /** Do not cross into other file systems (the set's capture does not). */
  oneFileSystem?: boolean;
}

const RECHECKS = 3;
/** Entries of one directory read and compared at once. */
const COMPARE_PARALLEL = 8;
/** Directories compared at once (each with its summary asked of the target first). */
const DIR_PARALLEL = 3;

interface Side {
  type: string;
  attr: Attr;
  size: number;
  link: string;
  rdev: string;
  /** A directory on another file system than the set root (compared as empty). */
  mount: boolean;
  stamp: string; // changes when the source object changes
  /** files: block digests of the content read (undefined: could not be read) */
  digests?: Buffer;
}

type Manifest = { exists: boolean; entries: ManifestEntryMsg[] };

const TYPE_NAMES: Record<string, string> = { f: "file", d: "directory", l: "symlink", p: "fifo", c: "character device", b: "block device", s: "socket" };
const typeName = (t: string) => TYPE_NAMES[t] ?? "special file";


class Verifier {
  private readonly o: VerifyOptions;
  private readonly client: ReplicationClient;
  /** false once the target turned out not to know Summary (an older agent) */
  private summaries = true;
  filesCompared = 0;
  bytesCompared = 0;
  private rootDev?: bigint;

  constructor(o: VerifyOptions) {
    this.o = o;
    this.client = new ReplicationClient(o.target, o.credentials, { ...dialOptions(o.target), "grpc.max_receive_message_length": MAX_MESSAGE_BYTES });
  }

  close(): void {
    this.client.close();
  }

  private unary<R>(method: "manifest" | "digests" | "summary", req: object): Promise<R> {
    return new Promise((resolve, reject) =>
      (this.client[method] as unknown as (q: object, md: grpc.Metadata, o: object, cb: (e: grpc.ServiceError | null, r?: R) => void) => void).call(this.client, req, new grpc.Metadata(), { deadline: Date.now() + 120_000 }, (e, r) => (e ? reject(Object.assign(new Error(`target ${this.o.target}: ${e.details || e.message}`), { code: e.code })) : resolve(r!))),
    );
  }

  /** The target's summary of dir; undefined from a target that has none to give. */
  private async summary(dir: string): Promise<SummaryResponse | undefined> {
    if (!this.summaries) return undefined;
    try {
      return await this.unary<SummaryResponse>("summary", { source: this.o.source, set: this.o.set, dir, blockSize: this.o.blockSize });
    } catch (e) {
      if ((e as { code?: number }).code !== grpc.status.UNIMPLEMENTED) throw e;
      this.summaries = false;
      return undefined;
    }
  }

  private scratch?: Buffer;

  /**
   * sourceSide with synchronous calls (small files from the page cache: the
   * async machinery cost more than the reads); "large" for a file larger
   * than SYNC_HASH_MAX, which sourceSide reads.
   */
  private sourceSideSync(rel: string): Side | undefined | "large" {
    const abs = path.join(this.o.root, rel);
    let st: BigIntStats | undefined;
    try {
      st = lstatSync(abs, { bigint: true, throwIfNoEntry: false });
    } catch {
      return undefined;
    }
    if (!st) return undefined;
    const type = kindOf(st);
    if (type === "o" || !this.o.wanted(rel, type === "d")) return undefined;
    if (type === "f" && st.size > BigInt(SYNC_HASH_MAX)) return "large";
    const foreign = this.rootDev !== undefined && st.dev !== this.rootDev;
    if (foreign && type !== "d") return undefined;
    const xs = readXattrsSync(abs);
    let link = "";
    if (type === "l") {
      try {
        link = readlinkSync(abs);
      } catch {
        /* gone meanwhile */
      }
    }
    let digests: Buffer | undefined;
    if (type === "f") {
      let fd: number | undefined;
      try {
        fd = openSync(abs, C.O_RDONLY | C.O_NOFOLLOW | C.O_NONBLOCK);
      } catch {
        fd = undefined;
      }
      if (fd !== undefined) {
        try {
          const fst = fstatSync(fd);
          if (fst.isFile()) {
            if (fst.size > SYNC_HASH_MAX) return "large";
            this.scratch ??= Buffer.allocUnsafe(READ_BYTES);
            digests = hashFileSync(fd, fst.size, this.o.blockSize, DigestAlgo.DIGEST_ALGO_SHA256_128, this.scratch);
          }
        } finally {
          closeSync(fd);
        }
      }
    }
    return { type, attr: { ...attrOf(st), xattrs: xs ?? [], hasXattrs: xs !== undefined }, size: type === "f" ? Number(st.size) : 0, link, rdev: rdevOf(st), mount: foreign, stamp: `${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`, digests };
  }

  private async sourceSide(rel: string): Promise<Side | undefined> {
    if (this.o.oneFileSystem && this.rootDev === undefined) this.rootDev = (await lstat(this.o.root, { bigint: true })).dev;
    const abs = path.join(this.o.root, rel);
    const st = await lstat(abs, { bigint: true }).catch(() => undefined);
    if (!st) return undefined;
    const type = kindOf(st);
    if (type === "o" || !this.o.wanted(rel, type === "d")) return undefined;
    const foreign = this.rootDev !== undefined && st.dev !== this.rootDev;
    if (foreign && type !== "d") return undefined;
    const xs = await readXattrs(abs);
    return { type, attr: { ...attrOf(st), xattrs: xs ?? [], hasXattrs: xs !== undefined }, size: type === "f" ? Number(st.size) : 0, link: type === "l" ? await readlink(abs).catch(() => "") : "", rdev: rdevOf(st), mount: foreign, stamp: `${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`, digests: type === "f" ? await this.sourceDigests(abs) : undefined };
  }

  private async sourceDigests(abs: string): Promise<Buffer | undefined> {
    const fh = await open(abs, C.O_RDONLY | C.O_NOFOLLOW | C.O_NONBLOCK).catch(() => undefined);
    if (!fh) return undefined;
    try {
      const fst = await fh.stat();
      if (!fst.isFile()) return undefined;
      return await hashBlocks(fh, fst.size, this.o.blockSize, undefined, undefined, undefined, DigestAlgo.DIGEST_ALGO_SHA256_128, false);
    } finally {
      await fh.close();
    }
  }

  private async targetDigests(rel: string, t: ManifestEntryMsg): Promise<Buffer | undefined> {
    if (t.hasDigests) return Buffer.from(t.digests);
    const r = await this.unary<{ exists: boolean; digests: Uint8Array }>("digests", { source: this.o.source, set: this.o.set, path: rel, blockSize: this.o.blockSize, digestAlgo: DigestAlgo.DIGEST_ALGO_SHA256_128 });
    return r.exists ? Buffer.from(r.digests) : undefined;
  }

  /** Differences at one path, given both sides. */
  async compare(rel: string, s: Side | undefined, t: ManifestEntryMsg | undefined): Promise<Difference[]> {
    if (!s && !t) return [];
    if (!t) return [{ path: rel, kind: "missing", detail: `${typeName(s!.type)} is missing on the target` }];
    if (!s) return [{ path: rel, kind: "extra", detail: `the target has a ${typeName(t.type)} the source does not` }];
    if (s.type !== t.type) return [{ path: rel, kind: "type", detail: `source ${s.type}, target ${t.type}` }];
    const out: Difference[] = [];
    const ta = t.attr!;
    if (s.type === "f") {
      this.filesCompared++;
      if (s.size !== Number(t.size)) out.push({ path: rel, kind: "content", detail: `size ${s.size} on the source, ${t.size} on the target` });
      else {
        const a = s.digests;
        if (a) this.bytesCompared += s.size;
        const b = a ? await this.targetDigests(rel, t) : undefined;
        if (a && b && !a.equals(b)) {
          let blocks = 0;
          for (let i = 0; i < a.length; i += 16) if (!a.subarray(i, i + 16).equals(b.subarray(i, i + 16))) blocks++;
          out.push({ path: rel, kind: "content", detail: `${blocks} block(s) of ${this.o.blockSize} bytes differ` });
        }
      }
    }
    if (s.type === "l" && s.link !== t.link) out.push({ path: rel, kind: "link", detail: `source → ${s.link}, target → ${t.link}` });
    const trdev = t.type === "c" || t.type === "b" ? `${t.rdevMajor},${t.rdevMinor}` : "";
    if (s.rdev !== trdev) out.push({ path: rel, kind: "rdev", detail: `device ${s.rdev} on the source, ${trdev} on the target` });
    if (s.type !== "l" && s.attr.mode !== ta.mode) out.push({ path: rel, kind: "mode", detail: `${s.attr.mode.toString(8)} on the source, ${ta.mode.toString(8)} on the target` });
    if (s.attr.uid !== ta.uid || s.attr.gid !== ta.gid) out.push({ path: rel, kind: "owner", detail: `${s.attr.uid}:${s.attr.gid} on the source, ${ta.uid}:${ta.gid} on the target` });
    if (s.attr.hasXattrs && ta.hasXattrs) {
      const x = xattrDifference(s.attr.xattrs, ta.xattrs);
      if (x) out.push({ path: rel, kind: "xattr", detail: x });
    }
    if (us(s.attr) !== us(ta)) out.push({ path: rel, kind: "mtime", detail: `source ${new Date(s.attr.mtimeSec * 1000).toISOString()} (+${s.attr.mtimeNsec}ns), target ${new Date(ta.mtimeSec * 1000).toISOString()} (+${ta.mtimeNsec}ns)` });
    return out;
  }

  private manifest(dir: string): Promise<Manifest> {
    return this.unary("manifest", { source: this.o.source, set: this.o.set, dir, blockSize: this.o.blockSize, digestMaxBlocks: 64, digestAlgo: DigestAlgo.DIGEST_ALGO_SHA256_128 });
  }

  /** Compare one directory's entries; returns the differences and the subdirectories to walk next. */
  async walkDir(dir: string, mount: boolean, stamps: Map<string, string>): Promise<{ diffs: Difference[]; subdirs: { dir: string; mount: boolean }[] }> {
    // The target starts on its summary while the source reads its side.
    const theirSummary = this.summary(dir);
    theirSummary.catch(() => undefined);
    const names = mount ? [] : (await readdir(dir ? path.join(this.o.root, dir) : this.o.root).catch(() => [] as string[])).sort();
    const rels = names.map((name) => (dir ? `${dir}/${name}` : name));
    const mine = new Map<string, Side>();
    if (this.o.oneFileSystem && this.rootDev === undefined) this.rootDev = (await lstat(this.o.root, { bigint: true })).dev;
    const large: number[] = [];
    let yielded = performance.now();
    for (let i = 0; i < rels.length; i++) {
      const s = this.sourceSideSync(rels[i]!);
      if (s === "large") large.push(i);
      else if (s) {
        stamps.set(rels[i]!, s.stamp);
        mine.set(names[i]!, s);
      }
      if (performance.now() - yielded > 20) {
        // Let the target's answers (and other work) in now and then.
        await new Promise((r) => setImmediate(r));
        yielded = performance.now();
      }
    }
    await mapLimit(large, COMPARE_PARALLEL, async (i) => {
      const s = await this.sourceSide(rels[i]!);
      if (!s) return;
      stamps.set(rels[i]!, s.stamp);
      mine.set(names[i]!, s);
    });
    const sum = await theirSummary;
    if (sum?.exists) {
      const entries: SummaryEntry[] = [...mine].map(([name, s]) => ({ name, type: s.type, attr: s.attr, size: s.size, link: s.link, rdev: s.rdev, digests: s.digests }));
      if (Buffer.from(sum.summary).equals(summarize(entries, this.o.blockSize, "source"))) {
        // Everything compared is equal (a file's summary includes its digests, so it was read on both sides).
        for (const s of mine.values()) {
          if (s.type !== "f") continue;
          this.filesCompared++;
          this.bytesCompared += s.size;
        }
        return { diffs: [], subdirs: [...mine].filter(([, s]) => s.type === "d").map(([name, s]) => ({ dir: dir ? `${dir}/${name}` : name, mount: s.mount })) };
      }
    }
    // Different (or no summary): the target's listing, entry by entry.
    const have: Manifest = sum && !sum.exists ? { exists: false, entries: [] } : await this.manifest(dir);
    const theirs = new Map((have.exists ? have.entries : []).map((e) => [e.name, e]));
    const all = [...new Set([...names, ...theirs.keys()])].sort();
    const found = await mapLimit(all, COMPARE_PARALLEL, (name) => this.compare(dir ? `${dir}/${name}` : name, mine.get(name), theirs.get(name)));
    const subdirs: { dir: string; mount: boolean }[] = [];
    for (const name of all) {
      const s = mine.get(name);
      if (s?.type === "d" && theirs.get(name)?.type === "d") subdirs.push({ dir: dir ? `${dir}/${name}` : name, mount: s.mount });
    }
    return { diffs: found.flat(), subdirs };
  }

  /** Walk both trees (several directories at once); returns every difference (in walk order) and the source stamps seen. */
  async walk(out: Difference[], stamps: Map<string, string>): Promise<void> {
    const done = new Map<string, { diffs: Difference[]; subdirs: string[] }>();
    const queue: { dir: string; mount: boolean }[] = [{ dir: "", mount: false }];
    await new Promise<void>((resolve, reject) => {
      let active = 0;
      let failed = false;
      const pump = () => {
        while (!failed && active < DIR_PARALLEL && queue.length) {
          const job = queue.pop()!;
          active++;
          this.walkDir(job.dir, job.mount, stamps).then(
            (r) => {
              active--;
              done.set(job.dir, { diffs: r.diffs, subdirs: r.subdirs.map((d) => d.dir) });
              for (let i = r.subdirs.length - 1; i >= 0; i--) queue.push(r.subdirs[i]!); // depth first, in name order
              if (active === 0 && queue.length === 0) resolve();
              else pump();
            },
            (e: unknown) => {
              failed = true;
              reject(e as Error);
            },
          );
        }
      };
      pump();
    });
    const emit = (dir: string) => {
      const d = done.get(dir);
      if (!d) return;
      out.push(...d.diffs);
      for (const sub of d.subdirs) emit(sub);
    };
    emit("");
  }

  /** Compare one path again (after the target caught up); `listings` shares the target's listings between the paths of one round. */
  async recheck(rel: string, listings = new Map<string, Promise<Manifest>>()): Promise<{ diffs: Difference[]; stamp?: string }> {
    const s = await this.sourceSide(rel);
    const dir = parentOf(rel);
    let have = listings.get(dir);
    if (!have) listings.set(dir, (have = this.manifest(dir)));
    const l = await have;
    const t = l.exists ? l.entries.find((e) => e.name === rel.slice(rel.lastIndexOf("/") + 1)) : undefined;
    return { diffs: await this.compare(rel, s, t), stamp: s?.stamp };
  }
}

export async function verifySet(o: VerifyOptions): Promise<VerifyReport> {
  const report: VerifyReport = { set: o.set, target: o.target, startedAt: Date.now() / 1000, finishedAt: 0, ok: false, filesCompared: 0, bytesCompared: 0, differences: [], repaired: 0, error: "", inFlight: 0 };
  const v = new Verifier(o);
  try {
    let found: Difference[] = [];
    const stamps = new Map<string, string>();
    await v.walk(found, stamps);
    // Re-check each difference after the target caught up; drop what was in flight.
    for (let i = 0; i < RECHECKS && found.length; i++) {
      await o.caughtUp();
      const still: Difference[] = [];
      const listings = new Map<string, Promise<{ exists: boolean; entries: ManifestEntryMsg[] }>>();
      for (const p of [...new Set(found.map((d) => d.path))]) {
        const r = await v.recheck(p, listings);
        if (r.diffs.length === 0) continue;
        if (r.stamp !== stamps.get(p)) {
          stamps.set(p, r.stamp ?? "");
          if (i === RECHECKS - 1) {
            report.inFlight++;
            continue;
          }
        }
        still.push(...r.diffs);
      }
      found = still;
    }
    report.differences = found;
    if (found.length && o.repair) {
      const dirs = new Set<string>();
      for (const d of found) {
        dirs.add(parentOf(d.path));
        const st = await lstat(path.join(o.root, d.path)).catch(() => undefined);
        if (st?.isDirectory()) dirs.add(d.path);
      }
      await o.repair([...dirs]);
      const paths = [...new Set(found.map((d) => d.path))];
      let fixed = 0;
      const listings = new Map<string, Promise<{ exists: boolean; entries: ManifestEntryMsg[] }>>();
      for (const p of paths) if ((await v.recheck(p, listings)).diffs.length === 0) fixed++;
      report.repaired = fixed;
    }
    report.ok = found.length === 0 || (report.repaired === new Set(found.map((d) => d.path)).size);
  } catch (e) {
    report.error = (e as Error).message;
  } finally {
    report.filesCompared = v.filesCompared;
    report.bytesCompared = v.bytesCompared;
    report.finishedAt = Date.now() / 1000;
    v.close();
  }
  return report;
}
