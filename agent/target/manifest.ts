// What an image holds, for mirror and verify: one directory's entries with
// attributes (and block digests for small files), or one file's digests.
// Paths are confined like the applier's: nothing outside the image is listed.
import { constants } from "node:fs";
import { lstat, open, readdir, readlink } from "node:fs/promises";
import path from "node:path";
import { ConfinedRoot, splitRelPath } from "../fs/confine.ts";
import { attrOf, devMajor, devMinor, kindOf } from "../fs/stat.ts";
import { readXattrs } from "../fs/xattr.ts";
import { DigestAlgo, hashBlocks } from "../source/blocks.ts";
import type { ManifestEntryMsg, DigestsResponse, ManifestResponse } from "../wire.ts";

/** The digest asked for, when this agent knows it; SHA-256 otherwise (the response says which it is). */
export function digestAlgoOf(asked: number | undefined): DigestAlgo {
  return asked === DigestAlgo.DIGEST_ALGO_XXH3_128 ? DigestAlgo.DIGEST_ALGO_XXH3_128 : DigestAlgo.DIGEST_ALGO_SHA256_128;
}

/** A missing directory on the way (not a refused path) means "not there". */
function isMissing(e: unknown): boolean {
  const c = (e as NodeJS.ErrnoException).code;
  return c === "ENOENT" || c === "ENOTDIR";
}

/**
 * A directory of the image and its entries' names, or undefined when it is not
 * there (missing, or not a directory). A refused path (a symlink on the way) throws.
 */
export async function readImageDir(root: string, dir: string): Promise<{ abs: string; names: string[] } | undefined> {
  const img = new ConfinedRoot(root);
  let abs = img.root;
  if (dir !== "") {
    try {
      abs = await img.resolve(dir);
    } catch (e) {
      if (isMissing(e)) return undefined;
      throw e;
    }
    const st = await lstat(abs).catch(() => undefined);
    if (!st?.isDirectory()) return undefined;
  }
  try {
    return { abs, names: await readdir(abs) };
  } catch {
    return undefined;
  }
}

export async function listDir(root: string, dir: string, blockSize: number, digestMaxBlocks: number, asked?: number): Promise<ManifestResponse> {
  const algo = digestAlgoOf(asked);
  const d = await readImageDir(root, dir);
  if (!d) return { exists: false, entries: [], digestAlgo: algo };
  const { abs, names } = d;
  const entries: ManifestEntryMsg[] = [];
  for (const name of names.sort()) {
    const p = path.join(abs, name);
    const st = await lstat(p, { bigint: true }).catch(() => undefined);
    if (!st) continue;
    const type = kindOf(st);
    const xs = await readXattrs(p);
    const dev = type === "c" || type === "b";
    const e: ManifestEntryMsg = {
      name,
      type,
      attr: { ...attrOf(st), xattrs: xs ?? [], hasXattrs: xs !== undefined },
      size: type === "f" ? Number(st.size) : 0,
      link: type === "l" ? await readlink(p).catch(() => "") : "",
      digests: Buffer.alloc(0),
      hasDigests: false,
      ino: Number(st.ino),
      nlink: Number(st.nlink),
      rdevMajor: dev ? devMajor(st.rdev) : 0,
      rdevMinor: dev ? devMinor(st.rdev) : 0,
    };
    if (type === "f" && digestMaxBlocks > 0 && Math.ceil(e.size / blockSize) <= digestMaxBlocks) {
      const d = await fileDigests(p, blockSize, algo);
      if (d) {
        e.digests = d.digests;
        e.size = d.size;
        e.hasDigests = true;
      }
    }
    entries.push(e);
  }
  return { exists: true, entries, digestAlgo: algo };
}

async function fileDigests(abs: string, blockSize: number, algo: DigestAlgo): Promise<{ size: number; digests: Buffer } | undefined> {
  let fh;
  try {
    fh = await open(abs, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch {
    return undefined;
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) return undefined;
    return { size: st.size, digests: await hashBlocks(fh, st.size, blockSize, undefined, undefined, undefined, algo, false) };
  } finally {
    await fh.close();
  }
}

export async function digestsOf(root: string, rel: string, blockSize: number, asked?: number): Promise<DigestsResponse> {
  splitRelPath(rel);
  const digestAlgo = digestAlgoOf(asked);
  let abs: string;
  try {
    abs = await new ConfinedRoot(root).resolve(rel);
  } catch (e) {
    if (isMissing(e)) return { exists: false, size: 0, digests: Buffer.alloc(0), digestAlgo };
    throw e;
  }
  const st = await lstat(abs).catch(() => undefined);
  if (!st?.isFile()) return { exists: false, size: 0, digests: Buffer.alloc(0), digestAlgo };
  const d = await fileDigests(abs, blockSize, digestAlgo);
  return d ? { exists: true, size: d.size, digests: d.digests, digestAlgo } : { exists: false, size: 0, digests: Buffer.alloc(0), digestAlgo };
}
