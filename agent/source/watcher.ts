// Watch mode: one inotify watch per directory (Node's fs.watch, not recursive:
// its recursive mode has had rename bugs, and @parcel/watcher batches events
// for 50-500 ms, too slow for our latency goal). Events only mark paths dirty;
// capture decides what changed by comparing with the index, so a lost or
// merged event costs a later rescan, never a wrong copy.
import { lstatSync, watch, type FSWatcher } from "node:fs";
import path from "node:path";

export class DirWatcher {
  private readonly root: string;
  private readonly watchers = new Map<string, FSWatcher>(); // rel dir ("" = root) -> watcher
  private readonly rel = new Map<FSWatcher, string>();
  private readonly onDirty: (rel: string, childrenChanged: boolean) => void;
  private readonly onError: (rel: string, err: Error) => void;

  constructor(root: string, onDirty: (rel: string, childrenChanged: boolean) => void, onError: (rel: string, err: Error) => void) {
    this.root = root;
    this.onDirty = onDirty;
    this.onError = onError;
  }

  get count(): number {
    return this.watchers.size;
  }

  /**
   * Start watching directory rel, which capture knows as inode `ino`
   * (idempotent). The watch is checked to be on that inode: with renames going
   * on, a path can name another directory by the time it is watched, and a
   * watch on the wrong one would report the right one's events nowhere.
   */
  add(rel: string, ino?: number): void {
    if (this.watchers.has(rel)) return;
    let w: FSWatcher;
    const abs = rel ? path.join(this.root, rel) : this.root;
    try {
      w = watch(abs, { persistent: true });
      if (ino !== undefined && lstatSync(abs, { throwIfNoEntry: false })?.ino !== ino) {
        w.close();
        this.onDirty(rel, true);
        return;
      }
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      // Gone or renamed meanwhile: have capture look again (a rename re-adds the watch).
      if (code !== "ENOENT" && code !== "ENOTDIR") this.onError(rel, e as Error);
      this.onDirty(rel, true);
      return;
    }
    this.watchers.set(rel, w);
    this.rel.set(w, rel);
    w.on("change", (_type, filename) => {
      const dir = this.rel.get(w);
      if (dir === undefined) return;
      if (filename == null) {
        this.onDirty(dir, true);
        return;
      }
      const name = filename.toString();
      this.onDirty(dir ? `${dir}/${name}` : name, false);
      if (dir) this.onDirty(dir, false);
    });
    w.on("error", () => {
      // The directory went away (or was replaced): drop the watch and have capture
      // look at the path again, so a directory that still exists gets a new watch.
      const at = this.rel.get(w) ?? rel;
      if (this.watchers.get(at) === w) this.watchers.delete(at);
      this.rel.delete(w);
      w.close();
      this.onDirty(at, true);
    });
  }

  /** Stop watching rel and everything below it. */
  remove(rel: string): void {
    for (const [p, w] of this.watchers) {
      if (p === rel || p.startsWith(rel + "/")) {
        this.watchers.delete(p);
        this.rel.delete(w);
        w.close();
      }
    }
  }

  /**
   * A directory was renamed: its inotify watches follow the inode, so keep them
   * and only re-map the paths their events are reported under. The watch of
   * the renamed directory itself is dropped, for the caller to add again (on
   * the inode now at `to`): capture takes a new directory for a renamed one
   * when it has the inode number of one the index still lists, and that is
   * also what a directory deleted and another made (which got the freed
   * number) looks like before the deletion is seen. The moved watch was then
   * on the deleted inode, which reports nothing any more, and add() took the
   * path for watched: nothing made in the new directory was ever captured
   * (e2e crash.test.ts: a directory's later files missing on the target, for
   * good, with the source idle).
   */
  rename(from: string, to: string): void {
    this.remove(to);
    const moved: [string, FSWatcher][] = [];
    for (const [p, w] of this.watchers) if (p === from || p.startsWith(from + "/")) moved.push([p, w]);
    for (const [p, w] of moved) {
      const q = to + p.slice(from.length);
      this.watchers.delete(p);
      this.watchers.set(q, w);
      this.rel.set(w, q);
    }
    const self = this.watchers.get(to);
    if (self) {
      this.watchers.delete(to);
      this.rel.delete(self);
      self.close();
    }
  }

  close(): void {
    for (const w of this.watchers.values()) w.close();
    this.watchers.clear();
    this.rel.clear();
  }
}
