// Extended attributes: read on the source, applied on the target, compared by
// verify. Replicated: user.*, trusted.* (readable by root only), security.*
// (security.capability, SELinux/SMACK labels, IMA) and POSIX ACLs
// (system.posix_acl_access / system.posix_acl_default, in the kernel's binary
// form, with numeric uids/gids like the owners). Other system.* names are
// file-system specific views and are left alone on both sides.
//
// Node has no xattr API. The choice, for a fresh `npm ci` and for the agent
// bundle (bundle/build.ts: `npm ci --omit=dev --ignore-scripts`, node_modules
// shipped as is):
// - @napi-rs/xattr (used): Rust's `xattr` crate behind N-API. Its compiled
//   addon comes *inside registry packages* (@napi-rs/xattr-linux-x64-gnu,
//   -linux-arm64-gnu, -musl, ... as optionalDependencies picked by os/cpu/libc),
//   so `npm ci` needs no compiler, Python or node-gyp and runs no install
//   script, and the bundle ships the matching .node file in node_modules. N-API
//   is ABI-stable: the same binary loads in every Node >= 10, including the
//   bundled Node 24. Its calls do not follow symlinks (lgetxattr & co.).
// - fs-xattr: N-API too, but no prebuilt binaries: `npm ci` must compile it
//   (node-gyp, python3, make, g++ on every CI machine and developer box, and
//   install scripts, which the bundle build turns off).
// - getfattr/setfattr (Debian's `attr`): a package to install on every source
//   and target host, a process per file, and text encoding of binary values.
// If the addon cannot be loaded (a platform without a prebuilt binary),
// xattrs are not replicated and the agent says so once; nothing else changes.
import { createRequire } from "node:module";
import { createHash } from "node:crypto";
import type { Xattr } from "../wire.ts";

interface XattrLib {
  listAttributes(path: string): Promise<string[]>;
  listAttributesSync(path: string): string[];
  getAttributeSync(path: string, name: string): Buffer | null;
  setAttributeSync(path: string, name: string, value: Uint8Array): void;
  removeAttributeSync(path: string, name: string): void;
  getAttribute(path: string, name: string): Promise<Buffer | null>;
  setAttribute(path: string, name: string, value: Buffer): Promise<void>;
  removeAttribute(path: string, name: string): Promise<void>;
}

let lib: XattrLib | undefined;
let loadError = "";
try {
  lib = createRequire(import.meta.url)("@napi-rs/xattr") as XattrLib;
} catch (e) {
  loadError = (e as Error).message;
}

/** Why xattrs are not replicated on this host ("" when they are). */
export function xattrUnavailable(): string {
  return lib ? "" : `extended attributes are not replicated: @napi-rs/xattr does not load here (${loadError.split("\n")[0]})`;
}

/** Names replication carries (see the top of this file). */
export function isManagedXattr(name: string): boolean {
  return name.startsWith("user.") || name.startsWith("trusted.") || name.startsWith("security.") || name === "system.posix_acl_access" || name === "system.posix_acl_default";
}

/** errno of an @napi-rs/xattr error ("... (os error 61)"). */
function errnoOf(e: unknown): number {
  const m = /os error (\d+)/.exec((e as Error)?.message ?? "");
  return m ? Number(m[1]) : 0;
}
const ENOENT = 2;
const ENOTDIR = 20;

/**
 * The replicated xattrs of abs (not following a symlink), sorted by name; []
 * when the file system has none; undefined when abs is gone or xattrs cannot
 * be read on this host.
 */
export async function readXattrs(abs: string): Promise<Xattr[] | undefined> {
  if (!lib) return undefined;
  let names: string[];
  try {
    names = await lib.listAttributes(abs);
  } catch (e) {
    const n = errnoOf(e);
    return n === ENOENT || n === ENOTDIR ? undefined : []; // ENOTSUP & co: a file system without xattrs
  }
  const out: Xattr[] = [];
  for (const name of names.filter(isManagedXattr).sort()) {
    const value = await lib.getAttribute(abs, name);
    if (value) out.push({ name, value });
  }
  return out;
}

/** readXattrs with synchronous calls (for callers that do many small files in a row, or run in a worker). */
export function readXattrsSync(abs: string): Xattr[] | undefined {
  if (!lib) return undefined;
  let names: string[];
  try {
    names = lib.listAttributesSync(abs);
  } catch (e) {
    const n = errnoOf(e);
    return n === ENOENT || n === ENOTDIR ? undefined : [];
  }
  if (names.length === 0) return [];
  const out: Xattr[] = [];
  for (const name of names.filter(isManagedXattr).sort()) {
    let value: Buffer | null = null;
    try {
      value = lib.getAttributeSync(abs, name);
    } catch {
      /* removed meanwhile */
    }
    if (value) out.push({ name, value });
  }
  return out;
}

/** A short digest of a sorted xattr list (undefined for none), kept in the source's index. */
export function xattrDigest(xs: Xattr[] | undefined): string | undefined {
  if (!xs || xs.length === 0) return undefined;
  const h = createHash("sha256");
  for (const x of xs) {
    const n = Buffer.from(x.name);
    h.update(Buffer.from([n.length >> 8, n.length & 0xff])).update(n);
    const l = Buffer.alloc(4);
    l.writeUInt32BE(x.value.length);
    h.update(l).update(x.value);
  }
  return h.digest("base64").slice(0, 22);
}

export function sameXattrs(a: Xattr[], b: Xattr[]): boolean {
  return a.length === b.length && a.every((x, i) => x.name === b[i]!.name && Buffer.from(x.value).equals(Buffer.from(b[i]!.value)));
}

/** What differs between two xattr lists, for a verify report ("" when equal). */
export function xattrDifference(src: Xattr[], tgt: Xattr[]): string {
  const t = new Map(tgt.map((x) => [x.name, Buffer.from(x.value)]));
  const parts: string[] = [];
  for (const x of src) {
    const v = t.get(x.name);
    t.delete(x.name);
    if (!v) parts.push(`${x.name} missing on the target`);
    else if (!v.equals(Buffer.from(x.value))) parts.push(`${x.name} differs`);
  }
  for (const n of t.keys()) parts.push(`${n} only on the target`);
  return parts.join(", ");
}

/**
 * Make abs's replicated xattrs exactly `want` (a symlink itself, not what it
 * points to). Returns what could not be done (not thrown: a target file system
 * without user xattrs, or an agent not running as root and so unable to set
 * trusted.* or security.capability, must not stop replication; verify reports
 * the difference).
 */
export async function applyXattrs(abs: string, want: Xattr[]): Promise<string[]> {
  if (!lib) return want.length ? [xattrUnavailable()] : [];
  const problems: string[] = [];
  let have: string[] = [];
  try {
    have = (await lib.listAttributes(abs)).filter(isManagedXattr);
  } catch (e) {
    if (errnoOf(e) === ENOENT) throw Object.assign(new Error(`ENOENT: ${abs}`), { code: "ENOENT" });
  }
  const keep = new Set(want.map((x) => x.name));
  for (const n of have) {
    if (keep.has(n)) continue;
    await lib.removeAttribute(abs, n).catch((e: Error) => problems.push(`remove ${n}: ${e.message}`));
  }
  for (const x of want) {
    await lib.setAttribute(abs, x.name, Buffer.from(x.value)).catch((e: Error) => problems.push(`set ${x.name}: ${e.message}`));
  }
  return problems;
}

/** applyXattrs with synchronous calls (the applier's). */
export function applyXattrsSync(abs: string, want: Xattr[]): string[] {
  if (!lib) return want.length ? [xattrUnavailable()] : [];
  const problems: string[] = [];
  let have: string[] = [];
  try {
    have = lib.listAttributesSync(abs).filter(isManagedXattr);
  } catch (e) {
    if (errnoOf(e) === ENOENT) throw Object.assign(new Error(`ENOENT: ${abs}`), { code: "ENOENT" });
  }
  const keep = new Set(want.map((x) => x.name));
  for (const n of have) {
    if (keep.has(n)) continue;
    try {
      lib.removeAttributeSync(abs, n);
    } catch (e) {
      problems.push(`remove ${n}: ${(e as Error).message}`);
    }
  }
  for (const x of want) {
    try {
      lib.setAttributeSync(abs, x.name, Buffer.from(x.value));
    } catch (e) {
      problems.push(`set ${x.name}: ${(e as Error).message}`);
    }
  }
  return problems;
}
