// Verify's directory summary: one SHA-256 over everything verify compares in
// a directory's entries (name, type, size, content as block digests, link
// target, device number, mode except a symlink's, owner, mtime to the
// microsecond, xattrs), in name order. The target computes it over its image
// (agent/target/verify-listing.ts), the source over its tree
// (agent/mirror/verify.ts). Equal summaries mean the per-entry comparison
// would find nothing, so only a directory whose summaries differ is listed in
// full and compared entry by entry (which reports each difference). The
// encoding is injective (every variable-length field is length-prefixed, each
// entry is tagged), so different entries cannot encode alike.
import { createHash } from "node:crypto";
import type { Attr } from "../wire.ts";

export interface SummaryEntry {
  name: string;
  type: string;
  attr: Attr;
  /** files: bytes (0 otherwise) */
  size: number;
  /** symlinks: target ("" otherwise) */
  link: string;
  /** c and b: "major,minor" ("" otherwise) */
  rdev: string;
  /** files: block digests; undefined when the file could not be read */
  digests?: Buffer;
}

const VERSION = "understudy verify summary 1\n";

/** The microseconds verify compares mtimes at. */
export const mtimeUs = (a: Attr): bigint => BigInt(a.mtimeSec) * 1_000_000n + BigInt(Math.floor(a.mtimeNsec / 1000));

/**
 * Summary of one directory's entries (sorted by name here). `side` tells the
 * sides apart where the comparison would not decide (a file one side could not
 * read): such a summary never equals the other side's, so the directory is
 * compared entry by entry.
 */
export function summarize(entries: SummaryEntry[], blockSize: number, side: "source" | "target"): Buffer {
  const h = createHash("sha256");
  const head = Buffer.alloc(8);
  head.writeUInt32BE(blockSize, 0);
  head.writeUInt32BE(entries.length, 4);
  h.update(VERSION).update(head);
  const str = (s: string | Uint8Array) => {
    const b = typeof s === "string" ? Buffer.from(s, "utf8") : s;
    const l = Buffer.allocUnsafe(4);
    l.writeUInt32BE(b.length);
    h.update(l).update(b);
  };
  for (const e of [...entries].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))) {
    str(e.name);
    str(e.type);
    const a = e.attr;
    const fixed = Buffer.alloc(8 + 4 + 4 + 4 + 8 + 1);
    fixed.writeBigUInt64BE(BigInt(e.type === "f" ? e.size : 0), 0);
    fixed.writeUInt32BE(e.type === "l" ? 0 : a.mode >>> 0, 8); // a symlink's mode is not compared
    fixed.writeUInt32BE(a.uid >>> 0, 12);
    fixed.writeUInt32BE(a.gid >>> 0, 16);
    fixed.writeBigInt64BE(mtimeUs(a), 20);
    fixed.writeUInt8(a.hasXattrs ? 1 : 0, 28);
    h.update(fixed);
    str(e.type === "l" ? e.link : "");
    str(e.type === "c" || e.type === "b" ? e.rdev : "");
    if (a.hasXattrs) {
      const xs = [...a.xattrs].sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0));
      str(String(xs.length));
      for (const x of xs) {
        str(x.name);
        str(x.value);
      }
    }
    if (e.type === "f") {
      if (e.digests) {
        h.update("D");
        str(e.digests);
      } else h.update(side === "source" ? "S" : "T"); // unreadable on this side
    }
  }
  return h.digest();
}

/** Run fn over items, at most `limit` at a time; results in item order. */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}
