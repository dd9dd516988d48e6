// The one place a file system stat becomes the wire's view of an object: its
// kind and the attributes replication carries (permission bits, owner, mtime
// to the nanosecond).
import type { BigIntStats } from "node:fs";
import type { Attr } from "../wire.ts";

/** f(ile), d(irectory), l(symlink) or o(ther: fifo, socket, device). */
export type Kind = "f" | "d" | "l" | "o";

export function kindOf(st: BigIntStats): Kind {
  return st.isFile() ? "f" : st.isDirectory() ? "d" : st.isSymbolicLink() ? "l" : "o";
}

export function attrOf(st: BigIntStats): Attr {
  return { mode: Number(st.mode & 0o7777n), uid: Number(st.uid), gid: Number(st.gid), mtimeSec: Number(st.mtimeNs / 1_000_000_000n), mtimeNsec: Number(st.mtimeNs % 1_000_000_000n) };
}
