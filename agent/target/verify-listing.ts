// Target side of verify: the summary of one directory of an image (see
// agent/verify/summary.ts), read the way listDir (manifest.ts) reads it —
// confined to the image, symlinks not followed — but with its entries read
// and hashed several at a time, and only the 32-byte summary sent back.
// Entries are read with synchronous calls (small files, from the page cache:
// the async machinery cost more than the reads); a large file is hashed with
// asynchronous reads, so the event loop is never held for long.
import { closeSync, constants, fstatSync, lstatSync, openSync, readlinkSync } from "node:fs";
import { lstat, open, readlink } from "node:fs/promises";
import path from "node:path";
import { attrOf, kindOf, rdevOf } from "../fs/stat.ts";
import { readXattrs, readXattrsSync } from "../fs/xattr.ts";
import { DigestAlgo, hashBlocks, hashFileSync, READ_BYTES, SYNC_HASH_MAX } from "../source/blocks.ts";
import { mapLimit, summarize, type SummaryEntry } from "../verify/summary.ts";
import type { SummaryResponse } from "../wire.ts";
import { readImageDir } from "./manifest.ts";

/** Entries read and hashed at once. */
const PARALLEL = 8;

async function entryOf(abs: string, name: string, blockSize: number): Promise<SummaryEntry | undefined> {
  const p = path.join(abs, name);
  const st = await lstat(p, { bigint: true }).catch(() => undefined);
  if (!st) return undefined;
  const type = kindOf(st);
  const xs = await readXattrs(p);
  const e: SummaryEntry = { name, type, attr: { ...attrOf(st), xattrs: xs ?? [], hasXattrs: xs !== undefined }, size: type === "f" ? Number(st.size) : 0, link: type === "l" ? await readlink(p).catch(() => "") : "", rdev: rdevOf(st) };
  if (type === "f") {
    const fh = await open(p, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK).catch(() => undefined);
    if (fh) {
      try {
        const fst = await fh.stat();
        if (fst.isFile()) {
          e.size = fst.size;
          e.digests = await hashBlocks(fh, fst.size, blockSize, undefined, undefined, undefined, SHA, false);
        }
      } finally {
        await fh.close();
      }
    }
  }
  return e;
}

const SHA = DigestAlgo.DIGEST_ALGO_SHA256_128;
let scratch: Buffer | undefined;

/**
 * entryOf with synchronous calls; "large" for a file larger than
 * SYNC_HASH_MAX (entryOf does those).
 */
function entryOfSync(abs: string, name: string, blockSize: number): SummaryEntry | undefined | "large" {
  const p = path.join(abs, name);
  let st;
  try {
    st = lstatSync(p, { bigint: true, throwIfNoEntry: false });
  } catch {
    return undefined;
  }
  if (!st) return undefined;
  const type = kindOf(st);
  if (type === "f" && st.size > BigInt(SYNC_HASH_MAX)) return "large";
  const xs = readXattrsSync(p);
  let link = "";
  if (type === "l") {
    try {
      link = readlinkSync(p);
    } catch {
      /* gone meanwhile */
    }
  }
  const e: SummaryEntry = { name, type, attr: { ...attrOf(st), xattrs: xs ?? [], hasXattrs: xs !== undefined }, size: type === "f" ? Number(st.size) : 0, link, rdev: rdevOf(st) };
  if (type === "f") {
    let fd: number | undefined;
    try {
      fd = openSync(p, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    } catch {
      return e;
    }
    try {
      const fst = fstatSync(fd);
      if (fst.isFile()) {
        if (fst.size > SYNC_HASH_MAX) return "large";
        e.size = fst.size;
        scratch ??= Buffer.allocUnsafe(READ_BYTES);
        e.digests = hashFileSync(fd, fst.size, blockSize, SHA, scratch);
      }
    } finally {
      closeSync(fd);
    }
  }
  return e;
}

export async function summarizeDir(root: string, dir: string, blockSize: number): Promise<SummaryResponse> {
  const d = await readImageDir(root, dir);
  if (!d) return { exists: false, summary: Buffer.alloc(0) };
  const { abs, names } = d;
  const entries: SummaryEntry[] = [];
  const large: string[] = [];
  let yielded = performance.now();
  for (const name of names) {
    const e = entryOfSync(abs, name, blockSize);
    if (e === "large") large.push(name);
    else if (e) entries.push(e);
    if (performance.now() - yielded > 20) {
      // Let the replication stream and other requests in now and then.
      await new Promise((r) => setImmediate(r));
      yielded = performance.now();
    }
  }
  for (const e of await mapLimit(large, PARALLEL, (name) => entryOf(abs, name, blockSize))) if (e) entries.push(e);
  return { exists: true, summary: summarize(entries, blockSize, "target") };
}
