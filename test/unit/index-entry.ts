// The source index's entry for a path as it is on disk, for tests that build a
// FileIndex by hand (the mirror tests) instead of running a capture.
import { lstat, readlink } from "node:fs/promises";
import type { IndexEntry } from "../../agent/source/file-index.ts";

export async function indexEntryOf(abs: string): Promise<IndexEntry> {
  const st = await lstat(abs, { bigint: true });
  return {
    t: st.isDirectory() ? "d" : st.isSymbolicLink() ? "l" : "f",
    mode: Number(st.mode & 0o7777n),
    uid: Number(st.uid),
    gid: Number(st.gid),
    size: st.isFile() ? Number(st.size) : 0,
    mtimeSec: Number(st.mtimeNs / 1_000_000_000n),
    mtimeNsec: Number(st.mtimeNs % 1_000_000_000n),
    ctimeMs: Number(st.ctimeNs / 1000n) / 1000,
    ino: Number(st.ino),
    nlink: Number(st.nlink),
    ...(st.isSymbolicLink() ? { link: await readlink(abs) } : {}),
  };
}
