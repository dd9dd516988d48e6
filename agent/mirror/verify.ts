// Verify: compare a target's image with the source, directory by directory
// (metadata from listings, content by block digests so large files are not
// shipped), report each difference, and optionally repair exactly those.
// Bytes still in flight are not differences: every difference is checked
// again after the target has caught up with the journal, and paths that keep
// changing meanwhile are counted as in flight, not reported.
// Compared: type, content, link target, device numbers, mode, owner, mtime
// and extended attributes. With oneFileSystem, a directory on another file
// system (a mount point) is compared as an empty directory.
import * as grpc from "@grpc/grpc-js";
import { constants as C } from "node:fs";
import { lstat, open, readdir, readlink } from "node:fs/promises";
import path from "node:path";
import { hashBlocks } from "../source/blocks.ts";
import { parentOf } from "../source/file-index.ts";
import { attrOf, kindOf, rdevOf } from "../fs/stat.ts";
import { readXattrs, xattrDifference } from "../fs/xattr.ts";
import { dialOptions } from "../../common/tls.ts";
import { MAX_MESSAGE_BYTES, PacketStreamClient, type Attr, type Difference, type ManifestEntryMsg, type ReplicationStreamClient, type VerifyReport } from "../wire.ts";

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
const COMPARE_PARALLEL = 8;

interface Side {
  type: string;
  attr: Attr;
  size: number;
  link: string;
  rdev: string;
  /** A directory on another file system than the set root (compared as empty). */
  mount: boolean;
  stamp: string; // changes when the source object changes
}

const TYPE_NAMES: Record<string, string> = { f: "file", d: "directory", l: "symlink", p: "fifo", c: "character device", b: "block device", s: "socket" };
const typeName = (t: string) => TYPE_NAMES[t] ?? "special file";


const us = (a: Attr) => BigInt(a.mtimeSec) * 1_000_000n + BigInt(Math.floor(a.mtimeNsec / 1000));

class Verifier {
  private readonly o: VerifyOptions;
  private readonly client: ReplicationStreamClient;
  filesCompared = 0;
  bytesCompared = 0;
  private rootDev?: bigint;

  constructor(o: VerifyOptions) {
    this.o = o;
    this.client = new PacketStreamClient(o.target, o.credentials, { ...dialOptions(o.target), "grpc.max_receive_message_length": MAX_MESSAGE_BYTES });
  }

  close(): void {
    this.client.close();
  }

  private unary<R>(method: "manifest" | "digests", req: object): Promise<R> {
    return new Promise((resolve, reject) =>
      (this.client[method] as unknown as (q: object, md: grpc.Metadata, o: object, cb: (e: grpc.ServiceError | null, r?: R) => void) => void)(req, new grpc.Metadata(), { deadline: Date.now() + 120_000 }, (e, r) => (e ? reject(new Error(`target ${this.o.target}: ${e.details || e.message}`)) : resolve(r!))),
    );
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
    return { type, attr: { ...attrOf(st), xattrs: xs ?? [], hasXattrs: xs !== undefined }, size: type === "f" ? Number(st.size) : 0, link: type === "l" ? await readlink(abs).catch(() => "") : "", rdev: rdevOf(st), mount: foreign, stamp: `${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}` };
  }

  private async sourceDigests(rel: string): Promise<Buffer | undefined> {
    const fh = await open(path.join(this.o.root, rel), C.O_RDONLY | C.O_NOFOLLOW | C.O_NONBLOCK).catch(() => undefined);
    if (!fh) return undefined;
    try {
      const fst = await fh.stat();
      if (!fst.isFile()) return undefined;
      const size = fst.size;
      this.bytesCompared += size;
      return await hashBlocks(fh, size, this.o.blockSize);
    } finally {
      await fh.close();
    }
  }

  private async targetDigests(rel: string, t: ManifestEntryMsg): Promise<Buffer | undefined> {
    if (t.hasDigests) return Buffer.from(t.digests);
    const r = await this.unary<{ exists: boolean; digests: Uint8Array }>("digests", { source: this.o.source, set: this.o.set, path: rel, blockSize: this.o.blockSize });
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
        const [a, b] = await Promise.all([this.sourceDigests(rel), this.targetDigests(rel, t)]);
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

  private manifest(dir: string): Promise<{ exists: boolean; entries: ManifestEntryMsg[] }> {
    return this.unary("manifest", { source: this.o.source, set: this.o.set, dir, blockSize: this.o.blockSize, digestMaxBlocks: 64 });
  }

  /** Walk both trees; returns every difference and the source stamps seen. */
  async walk(dir: string, out: Difference[], stamps: Map<string, string>, mount = false): Promise<void> {
    const [names, have] = await Promise.all([mount ? ([] as string[]) : readdir(dir ? path.join(this.o.root, dir) : this.o.root).catch(() => [] as string[]), this.manifest(dir)]);
    const theirs = new Map((have.exists ? have.entries : []).map((e) => [e.name, e]));
    const all = [...new Set([...names, ...theirs.keys()])].sort();
    // Entries of a directory are compared a few at a time (reads, hashing and
    // the target's digests overlap); subdirectories are walked after.
    const subdirs: string[] = [];
    const mounts = new Set<string>();
    for (let i = 0; i < all.length; i += COMPARE_PARALLEL) {
      const found = await Promise.all(all.slice(i, i + COMPARE_PARALLEL).map(async (name) => {
        const rel = dir ? `${dir}/${name}` : name;
        const s = await this.sourceSide(rel);
        const t = theirs.get(name);
        if (s) stamps.set(rel, s.stamp);
        if (s?.type === "d" && t?.type === "d") subdirs.push(rel);
        if (s?.mount) mounts.add(rel);
        return this.compare(rel, s, t);
      }));
      for (const f of found) out.push(...f);
    }
    for (const d of subdirs.sort()) await this.walk(d, out, stamps, mounts.has(d));
  }

  /** Compare one path again (after the target caught up). */
  async recheck(rel: string): Promise<{ diffs: Difference[]; stamp?: string }> {
    const s = await this.sourceSide(rel);
    const dir = parentOf(rel);
    const have = await this.manifest(dir);
    const t = have.exists ? have.entries.find((e) => e.name === rel.slice(rel.lastIndexOf("/") + 1)) : undefined;
    return { diffs: await this.compare(rel, s, t), stamp: s?.stamp };
  }
}

export async function verifySet(o: VerifyOptions): Promise<VerifyReport> {
  const report: VerifyReport = { set: o.set, target: o.target, startedAt: Date.now() / 1000, finishedAt: 0, ok: false, filesCompared: 0, bytesCompared: 0, differences: [], repaired: 0, error: "", inFlight: 0 };
  const v = new Verifier(o);
  try {
    let found: Difference[] = [];
    const stamps = new Map<string, string>();
    await v.walk("", found, stamps);
    // Re-check each difference after the target caught up; drop what was in flight.
    for (let i = 0; i < RECHECKS && found.length; i++) {
      await o.caughtUp();
      const still: Difference[] = [];
      for (const p of [...new Set(found.map((d) => d.path))]) {
        const r = await v.recheck(p);
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
      for (const p of paths) if ((await v.recheck(p)).diffs.length === 0) fixed++;
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
