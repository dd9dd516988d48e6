// Target side of verify: the summary of one directory of an image (see
// agent/verify/summary.ts), read the way listDir (manifest.ts) reads it —
// confined to the image, symlinks not followed — but with its entries read
// and hashed several at a time, and only the 32-byte summary sent back.
import { constants } from "node:fs";
import { lstat, open, readlink } from "node:fs/promises";
import path from "node:path";
import { attrOf, kindOf, rdevOf } from "../fs/stat.ts";
import { readXattrs } from "../fs/xattr.ts";
import { DigestAlgo, hashBlocks } from "../source/blocks.ts";
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
          e.digests = await hashBlocks(fh, fst.size, blockSize, undefined, undefined, undefined, DigestAlgo.DIGEST_ALGO_SHA256_128);
        }
      } finally {
        await fh.close();
      }
    }
  }
  return e;
}

export async function summarizeDir(root: string, dir: string, blockSize: number): Promise<SummaryResponse> {
  const d = await readImageDir(root, dir);
  if (!d) return { exists: false, summary: Buffer.alloc(0) };
  const { abs, names } = d;
  const entries = (await mapLimit(names, PARALLEL, (name) => entryOf(abs, name, blockSize))).filter((e) => e !== undefined);
  return { exists: true, summary: summarize(entries, blockSize, "target") };
}
