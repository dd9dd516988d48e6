// The one place a file system stat becomes the wire's view of an object: its
// kind and the attributes replication carries (permission bits, owner, mtime
// to the nanosecond; device numbers of device nodes).
import type { BigIntStats } from "node:fs";
import type { Attr } from "../wire.ts";

/**
 * f(ile), d(irectory), l(symlink), p (fifo), c(har device), b(lock device),
 * s(ocket); o(ther) for anything else.
 */
export type Kind = "f" | "d" | "l" | "p" | "c" | "b" | "s" | "o";
/** The special files: made by mknod (or a socket bind) on the target, never opened. */
export type SpecialKind = "p" | "c" | "b" | "s";

export function kindOf(st: BigIntStats): Kind {
  return st.isFile() ? "f" : st.isDirectory() ? "d" : st.isSymbolicLink() ? "l" : st.isFIFO() ? "p" : st.isCharacterDevice() ? "c" : st.isBlockDevice() ? "b" : st.isSocket() ? "s" : "o";
}

export function isSpecial(k: string): k is SpecialKind {
  return k === "p" || k === "c" || k === "b" || k === "s";
}

export function attrOf(st: BigIntStats): Attr {
  return { mode: Number(st.mode & 0o7777n), uid: Number(st.uid), gid: Number(st.gid), mtimeSec: Number(st.mtimeNs / 1_000_000_000n), mtimeNsec: Number(st.mtimeNs % 1_000_000_000n), xattrs: [], hasXattrs: false };
}

/** Linux dev_t → major/minor (glibc's gnu_dev_major/minor). */
export function devMajor(rdev: bigint): number {
  return Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn));
}
export function devMinor(rdev: bigint): number {
  return Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn));
}

/** "major,minor" of a device node, "" for anything else (compared by capture, mirror and verify). */
export function rdevOf(st: BigIntStats): string {
  return st.isCharacterDevice() || st.isBlockDevice() ? `${devMajor(st.rdev)},${devMinor(st.rdev)}` : "";
}
