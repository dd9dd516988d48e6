// Path confinement for the target applier: nothing a packet says may reach
// outside its image root. Paths are checked syntactically (no absolute paths,
// '..', '.', empty components, NUL) and, on disk, every directory on the way
// must be a real directory: a replicated symlink is never followed.
import { lstatSync, mkdirSync } from "node:fs";
import path from "node:path";

export class PathError extends Error {
  readonly code = "PATH_REFUSED";
}

const MAX_PATH = 4096;

/** What the earlier ops of a batch make of a path. */
export type PlannedKind = "dir" | "file" | "symlink" | "gone";

function goneAbove(planned: Map<string, PlannedKind>, dir: string): boolean {
  for (let i = dir.lastIndexOf("/"); i > 0; i = dir.lastIndexOf("/", i - 1)) {
    const p = planned.get(dir.slice(0, i));
    if (p === "gone") return true;
    if (p) return false;
  }
  return false;
}
const MAX_COMPONENT = 255;

/** Validate a relative replication path; returns its components or throws PathError. */
export function splitRelPath(p: string): string[] {
  if (typeof p !== "string" || p.length === 0) throw new PathError("empty path");
  if (p.includes("\0")) throw new PathError(`path ${JSON.stringify(p)} contains a NUL byte`);
  if (Buffer.byteLength(p) > MAX_PATH) throw new PathError(`path is longer than ${MAX_PATH} bytes`);
  if (p.startsWith("/")) throw new PathError(`path ${JSON.stringify(p)} is absolute`);
  const parts = p.split("/");
  for (const c of parts) {
    if (c === "") throw new PathError(`path ${JSON.stringify(p)} has an empty component`);
    if (c === "." || c === "..") throw new PathError(`path ${JSON.stringify(p)} contains '${c}'`);
    if (Buffer.byteLength(c) > MAX_COMPONENT) throw new PathError(`path ${JSON.stringify(p)} has a component longer than ${MAX_COMPONENT} bytes`);
  }
  return parts;
}

/**
 * Resolves relative paths inside one image root, checking on disk that no
 * directory on the way is a symlink (or anything but a directory). Directory
 * checks are cached until `invalidate()` (called after ops that can replace a
 * directory: rename, remove, symlink).
 */
export class ConfinedRoot {
  readonly root: string;
  private verified = new Set<string>();

  constructor(root: string) {
    this.root = path.resolve(root);
  }

  invalidate(): void {
    this.verified.clear();
  }

  /** Absolute path of `rel`; parents must be real directories (created if `createParents`). */
  async resolve(rel: string, createParents = false): Promise<string> {
    return this.resolveSync(rel, createParents);
  }

  /** resolve, with synchronous system calls (a few lstats, cached: cheaper than a trip through the thread pool each). */
  resolveSync(rel: string, createParents = false): string {
    const parts = splitRelPath(rel);
    let dir = "";
    for (let i = 0; i < parts.length - 1; i++) {
      dir = dir ? `${dir}/${parts[i]}` : parts[i]!;
      if (this.verified.has(dir)) continue;
      const abs = path.join(this.root, dir);
      let st;
      try {
        st = lstatSync(abs);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "ENOENT" || !createParents) throw e;
        mkdirSync(abs, { mode: 0o755 });
        st = lstatSync(abs);
      }
      if (st.isSymbolicLink()) throw new PathError(`path ${JSON.stringify(rel)} goes through symlink ${JSON.stringify(dir)}; refusing to follow it out of the image`);
      if (!st.isDirectory()) throw new PathError(`path ${JSON.stringify(rel)}: ${JSON.stringify(dir)} is not a directory`);
      this.verified.add(dir);
    }
    return path.join(this.root, ...parts);
  }

  /**
   * The pre-flight check of a batch: like resolve, but never creates, and sees
   * the tree as the batch's earlier ops will have left it (`planned`: what
   * those ops make of a path; "gone" for removed ones and all below them).
   */
  async check(rel: string, planned?: Map<string, PlannedKind>): Promise<void> {
    this.checkSync(rel, planned);
  }

  /** check, with synchronous system calls. */
  checkSync(rel: string, planned?: Map<string, PlannedKind>): void {
    const parts = splitRelPath(rel);
    let dir = "";
    let missing = false;
    for (let i = 0; i < parts.length - 1; i++) {
      dir = dir ? `${dir}/${parts[i]}` : parts[i]!;
      const plan = planned?.get(dir) ?? (planned && goneAbove(planned, dir) ? "gone" : undefined);
      if (plan === "dir" || plan === "gone") {
        missing = plan === "gone";
        continue;
      }
      if (plan === "symlink") throw new PathError(`path ${JSON.stringify(rel)} goes through symlink ${JSON.stringify(dir)}; refusing to follow it out of the image`);
      if (plan === "file") throw new PathError(`path ${JSON.stringify(rel)}: ${JSON.stringify(dir)} is not a directory`);
      if (missing || this.verified.has(dir)) continue;
      let st;
      try {
        st = lstatSync(path.join(this.root, dir));
      } catch {
        missing = true; // created on the way (resolve with createParents)
        continue;
      }
      if (st.isSymbolicLink()) throw new PathError(`path ${JSON.stringify(rel)} goes through symlink ${JSON.stringify(dir)}; refusing to follow it out of the image`);
      if (!st.isDirectory()) throw new PathError(`path ${JSON.stringify(rel)}: ${JSON.stringify(dir)} is not a directory`);
    }
  }
}
