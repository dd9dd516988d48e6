// Source role for one replication set: watcher → capture → journal → one
// sender per target. Owns the index snapshot and decides what the journal may
// release (acknowledged by every target and covered by the snapshot).
import { randomUUID } from "node:crypto";
import { mkdir, readFile, writeFile, rename, unlink } from "node:fs/promises";
import type { BigIntStats } from "node:fs";
import path from "node:path";
import picomatch from "picomatch";
import type * as grpc from "@grpc/grpc-js";
import type { SetConfig } from "../../common/config.ts";
import type { Logger } from "../../common/log.ts";
import { Journal } from "../queue/journal.ts";
import { encodePacketPayload, type Op, type SourceSetStatus } from "../wire.ts";
import { Capture, packetDataLimit } from "./capture.ts";
import { FileIndex, type IndexDelta } from "./file-index.ts";
import { DIGEST_BYTES } from "./blocks.ts";
import { Sender, type MirrorHost, type MirrorState } from "./sender.ts";
import type { MirrorMode, MirrorSource } from "../mirror/mirror.ts";
import { verifySet, type VerifyResult } from "../mirror/verify.ts";
import { DirWatcher } from "./watcher.ts";

const CHECKPOINT_MS = 15_000;

/**
 * Whole-server preset (docs/whole-server.md), relative to the set root:
 * directories whose contents are the running system's, not the server's
 * (kernel views, runtime state, scratch, mounts of removable media), kept as
 * empty directories so a replica that boots has them...
 */
export const WHOLE_SERVER_EMPTY = ["proc", "sys", "dev", "run", "tmp", "var/tmp", "mnt", "media"];
/** ...and paths left out entirely: fsck's lost+found and the usual swap files (active ones are read from /proc/swaps). */
export const WHOLE_SERVER_EXCLUDE = ["lost+found", "swapfile", "swap.img", "swap"];

/** Swap files in use (from /proc/swaps), as absolute paths. */
async function activeSwapFiles(): Promise<string[]> {
  const text = await readFile("/proc/swaps", "utf8").catch(() => "");
  return text.split("\n").slice(1).map((l) => l.split(/\s+/)).filter((f) => f[1] === "file" && f[0]).map((f) => f[0]!.replace(/\\040/g, " "));
}

export interface SourceSetOptions {
  agentName: string;
  dataDir: string;
  credentials: grpc.ChannelCredentials;
  log: Logger;
  /** Whole-server sets also leave these out (the agent's target root, its install prefix). */
  ownPaths?: string[];
}

export class SourceSet {
  readonly cfg: SetConfig;
  state: "starting" | "scanning" | "replicating" | "failed" = "starting";
  lastError = "";
  private readonly o: SourceSetOptions;
  private readonly log: Logger;
  private readonly dir: string;
  private readonly index = new FileIndex();
  private journal!: Journal;
  private capture!: Capture;
  private watcher!: DirWatcher;
  private senders: Sender[] = [];
  private snapshotSeq = 0;
  private acks: Record<string, number> = {};
  private appendTimes = new Map<number, number>();
  private appendSizes = new Map<number, number>();
  private dirty = new Map<string, boolean>();
  private scheduled = false;
  private busy: Promise<void> = Promise.resolve();
  private timers: NodeJS.Timeout[] = [];
  private closed = false;
  private deferred = new Map<string, NodeJS.Timeout>();
  private journalId = "";
  private lastVerify = new Map<string, VerifyResult>();
  private verifying = new Map<string, Promise<VerifyResult>>();
  /** Digests a mirror gave the index (adoptDigests) since the last snapshot, and when the last came. */
  private adopted = 0;
  private lastAdoptAt = 0;
  /** Paths (relative to the set root) left out with everything below them; set by start() for whole-server sets. */
  private excluded: string[] = [];

  constructor(cfg: SetConfig, o: SourceSetOptions) {
    this.cfg = cfg;
    this.o = o;
    this.log = o.log.child({ set: cfg.name });
    this.dir = path.join(o.dataDir, "sets", cfg.name);
  }

  /** abs relative to the set root, when it is strictly inside it. */
  private inside(abs: string): string | undefined {
    const r = path.relative(this.cfg.path, abs);
    return r && !r.startsWith("..") && !path.isAbsolute(r) ? r : undefined;
  }

  private wanted(): (rel: string, isDir: boolean) => boolean {
    const inc = picomatch(this.cfg.include, { dot: true });
    const exc = picomatch(this.cfg.exclude, { dot: true });
    const stateInside = this.inside(this.o.dataDir);
    const out = [...(stateInside ? [stateInside] : []), ...this.excluded];
    const empty = this.cfg.wholeServer ? WHOLE_SERVER_EMPTY : [];
    return (rel, isDir) => {
      for (const x of out) if (rel === x || rel.startsWith(x + "/")) return false;
      for (const x of empty) if (rel.startsWith(x + "/")) return false;
      if (exc(rel) || (isDir && exc(rel + "/"))) return false;
      return isDir || inc(rel);
    };
  }

  async start(): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    if (this.cfg.wholeServer) {
      const own = [...(this.o.ownPaths ?? []), ...(await activeSwapFiles())].map((p) => this.inside(p)).filter((p) => p !== undefined);
      this.excluded = [...new Set([...WHOLE_SERVER_EXCLUDE, ...own])];
      this.log.info({ emptied: WHOLE_SERVER_EMPTY, excluded: this.excluded }, "whole-server set: one file system, these paths left out");
    }
    this.journal = await Journal.open({ dir: path.join(this.dir, "journal"), memoryBytes: this.cfg.queueMemory });
    this.snapshotSeq = await this.index.load(path.join(this.dir, "index.snap"));
    let replayed = 0;
    for await (const e of this.journal.entries(this.snapshotSeq + 1) as AsyncIterable<{ seq: number; payload: Buffer; meta: Buffer }>) {
      for (const d of FileIndex.decodeDeltas(e.meta)) this.index.apply(d);
      this.appendSizes.set(e.seq, e.payload.length);
      replayed++;
    }
    this.acks = await readFile(path.join(this.dir, "acks.json"), "utf8").then((t) => JSON.parse(t) as Record<string, number>, () => ({}));
    // The journal's identity: a lost and re-created journal gets a new one, and
    // its sequence numbers are then never mistaken for the old ones.
    const idFile = path.join(this.dir, "journal", "id");
    this.journalId = await readFile(idFile, "utf8").then((t) => t.trim(), () => "");
    // A journal just created (not one that merely holds no entries yet: a set
    // restarted before its first change must still send what changed while it
    // was down, or what a new filter now includes).
    const newJournal = !this.journalId;
    if (!this.journalId) {
      this.journalId = randomUUID();
      await writeFile(idFile, this.journalId + "\n");
      this.acks = {};
    }
    this.log.info({ files: this.index.size, snapshotSeq: this.snapshotSeq, replayed, journal: [this.journal.firstSeq, this.journal.lastSeq] }, "index loaded");
    this.watcher = new DirWatcher(this.cfg.path, (rel, deep) => this.markDirty(rel, deep), (rel, err) => this.log.warn({ rel, err: err.message }, "cannot watch directory"));
    this.capture = new Capture({
      root: this.cfg.path,
      blockSize: this.cfg.blockSize,
      index: this.index,
      watcher: this.watcher,
      wanted: this.wanted(),
      sink: (ops, deltas) => this.append(ops, deltas),
      maxPacketData: packetDataLimit(this.cfg.bandwidthLimit),
      log: this.log,
      redirty: (rel, deep) => this.markDirty(rel, deep ?? false),
      oneFileSystem: this.cfg.wholeServer,
    });
    for (const address of this.cfg.targets) {
      const s = new Sender({
        address,
        source: this.o.agentName,
        set: this.cfg.name,
        credentials: this.o.credentials,
        journal: this.journal,
        log: this.log,
        bandwidth: this.cfg.bandwidthLimit,
        intervalMs: this.cfg.mode === "scheduled" ? this.cfg.interval : undefined,
        initialAcked: this.acks[address] ?? 0,
        onAck: (seq) => this.onAck(address, seq),
        journalId: this.journalId,
        epoch: this.cfg.epoch,
        mirror: this.mirrorHost(address),
      });
      this.senders.push(s);
      await s.start();
    }
    this.state = "scanning";
    const t0 = Date.now();
    if (newJournal) {
      // A brand-new journal: every target is mirrored, which sends the content;
      // journaling it all as well would only send it twice.
      await this.serial(async () => {
        await this.capture.indexOnlyScan();
        await this.index.save(path.join(this.dir, "index.snap"), 0);
      });
    } else await this.serial(() => this.capture.fullScan());
    this.state = "replicating";
    this.log.info({ files: this.index.size, ms: Date.now() - t0, ops: this.capture.stats.ops, dataBytes: this.capture.stats.dataBytes }, "initial scan done; watching");
    this.timers.push(setInterval(() => void this.checkpoint().catch((e) => this.log.error({ err: e }, "checkpoint failed")), CHECKPOINT_MS));
    this.timers.push(setInterval(() => void this.journal.sync().catch((e) => this.log.error({ err: e }, "journal sync failed")), 1000));
    if (this.cfg.verifyInterval > 0) {
      this.timers.push(setInterval(() => {
        for (const t of this.cfg.targets) void this.verify(t, this.cfg.verifyRepair).then((r) => this.log.info({ target: t, ok: r.ok, differences: r.differences.length, repaired: r.repaired, error: r.error || undefined }, "scheduled verify done"));
      }, this.cfg.verifyInterval));
    }
    if (this.cfg.rescanInterval > 0) this.timers.push(setInterval(() => void this.serial(() => this.capture.fullScan()), this.cfg.rescanInterval));
  }

  /** The source side of mirrors, for the sender of `address`. */
  private mirrorHost(address: string): MirrorHost {
    const file = path.join(this.dir, `mirror-${address.replace(/[^A-Za-z0-9.-]/g, "_")}.json`);
    const source: MirrorSource = {
      root: this.cfg.path,
      blockSize: this.cfg.blockSize,
      index: this.index,
      serial: <T>(fn: () => Promise<T>) => this.serialValue(fn),
      flushCapture: () => this.flushNow(),
      lastSeq: () => this.journal.lastSeq,
      touchedSince: (seq) => this.touchedSince(seq),
      adoptDigests: (q, st, digests) => this.adoptDigests(q, st, digests),
      forget: (paths) => {
        this.log.info({ files: paths.length, first: paths[0] }, "mirror: files changed on disk during its last round; sending them again as new");
        return this.capture.forget(paths);
      },
    };
    return {
      source,
      blockSize: this.cfg.blockSize,
      load: () => readFile(file, "utf8").then((t) => JSON.parse(t) as MirrorState, () => undefined),
      save: async (st) => {
        if (!st) return unlink(file).catch(() => undefined);
        await writeFile(`${file}.tmp`, JSON.stringify(st));
        await rename(`${file}.tmp`, file);
      },
    };
  }

  /**
   * A mirror read all of q, unchanged (st before and after the read): its
   * digests become the index entry's when the entry has none (an index-only
   * scan reads no content) and describes the same file as st (inode, size,
   * mtime, ctime: capture's own test of "content unchanged"). Then the entry
   * describes what every target holds: a target mirrored earlier got the same
   * bytes (the file has not changed since the entry was made, or capture would
   * have replaced the entry with one with digests), and a target mirrored
   * later gets what its own mirror reads. Not journaled: a snapshot keeps
   * them (checkpoint), and without one the entry has no digests again, which
   * only means the file's next change is sent whole.
   */
  private adoptDigests(q: string, st: BigIntStats, digests: Buffer): void {
    const e = this.index.get(q);
    if (!e || e.t !== "f" || e.hashes || e.ino !== Number(st.ino) || e.size !== Number(st.size)) return;
    if (e.mtimeSec !== Number(st.mtimeNs / 1_000_000_000n) || e.mtimeNsec !== Number(st.mtimeNs % 1_000_000_000n) || e.ctimeMs !== Number(st.ctimeNs / 1000n) / 1000) return;
    if (digests.length !== Math.ceil(e.size / this.cfg.blockSize) * DIGEST_BYTES) return;
    this.index.apply({ set: q, e: { ...e, hashes: digests } });
    this.adopted++;
    this.lastAdoptAt = Date.now();
  }

  /** Paths the journal entries after seq touched (from their index deltas). */
  private async touchedSince(seq: number): Promise<{ paths: Set<string>; moved: Set<string> }> {
    const paths = new Set<string>();
    const moved = new Set<string>();
    const last = this.journal.lastSeq;
    if (seq >= last) return { paths, moved };
    for await (const e of this.journal.entries(Math.max(seq + 1, this.journal.firstSeq)) as AsyncIterable<{ seq: number; meta: Buffer }>) {
      if (e.seq > last) break;
      for (const d of FileIndex.decodeDeltas(e.meta)) {
        if ("set" in d) paths.add(d.set);
        else if ("del" in d) paths.add(d.del);
        else {
          paths.add(d.mv[0]);
          paths.add(d.mv[1]);
          moved.add(d.mv[1]);
        }
      }
    }
    return { paths, moved };
  }

  /** Start a mirror to one target (or all); resolves when it completes. */
  mirror(target: string | undefined, mode: MirrorMode): string[] {
    this.assertStarted();
    const chosen = this.senders.filter((s, i) => !target || this.cfg.targets[i] === target);
    if (target && chosen.length === 0) throw new Error(`set ${this.cfg.name} has no target ${target} (targets: ${this.cfg.targets.join(", ")})`);
    for (const s of chosen) void s.requestMirror(mode, "requested").catch((e) => this.log.warn({ err: (e as Error).message }, "mirror did not complete"));
    return chosen.map((s) => this.cfg.targets[this.senders.indexOf(s)]!);
  }

  /** Compare a target's image with the source; with repair, fix what differs. */
  async verify(target: string | undefined, repair: boolean): Promise<VerifyResult> {
    this.assertStarted();
    const i = target ? this.cfg.targets.indexOf(target) : 0;
    if (i < 0) throw new Error(`set ${this.cfg.name} has no target ${target} (targets: ${this.cfg.targets.join(", ")})`);
    const address = this.cfg.targets[i]!;
    const sender = this.senders[i]!;
    const running = this.verifying.get(address);
    if (running) return running;
    const run = verifySet({
      set: this.cfg.name,
      target: address,
      source: this.o.agentName,
      root: this.cfg.path,
      blockSize: this.cfg.blockSize,
      wanted: this.wanted(),
      credentials: this.o.credentials,
      caughtUp: async () => {
        const upTo = await this.serialValue(async () => (await this.flushNow(), this.journal.lastSeq));
        const deadline = Date.now() + 30_000;
        while (sender.lastAckedSeq < upTo && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      },
      repair: repair ? (dirs) => sender.requestMirror("checksum", "verify repair", dirs) : undefined,
      oneFileSystem: this.cfg.wholeServer,
    }).then((r) => {
      this.lastVerify.set(address, r);
      return r;
    }).finally(() => this.verifying.delete(address));
    this.verifying.set(address, run);
    return run;
  }

  /** Its senders exist once start() has opened the journal; before that there is nothing to mirror or compare. */
  assertStarted(): void {
    if (this.state === "starting" || this.senders.length < this.cfg.targets.length) throw Object.assign(new Error(`set ${this.cfg.name} is still starting (opening its journal and scanning ${this.cfg.path}); try again shortly`), { code: 9 /* FAILED_PRECONDITION */ });
    if (this.state === "failed") throw Object.assign(new Error(`set ${this.cfg.name} failed to start: ${this.lastError}`), { code: 9 });
  }

  /** Capture everything dirty now; the journal position that covers it. */
  drain(): Promise<number> {
    return this.serialValue(async () => (await this.flushNow(), this.journal.lastSeq));
  }

  /**
   * Capture what is dirty now, including large files whose next look is deferred
   * (a drain before a cutover must not leave a disk image's last writes behind).
   */
  private async flushNow(): Promise<void> {
    for (const [rel, t] of this.deferred) {
      clearTimeout(t);
      this.dirty.set(rel, this.dirty.get(rel) ?? false);
    }
    this.deferred.clear();
    const batch = this.dirty;
    this.dirty = new Map();
    if (batch.size) await this.capture.sync(batch);
  }

  private markDirty(rel: string, deep: boolean): void {
    if (this.closed) return;
    const wait = this.capture?.deferFor(rel) ?? 0;
    if (wait > 0) {
      if (!this.deferred.has(rel)) this.deferred.set(rel, setTimeout(() => {
        this.deferred.delete(rel);
        this.markDirtyNow(rel, false);
      }, wait));
      return;
    }
    this.markDirtyNow(rel, deep);
  }

  private markDirtyNow(rel: string, deep: boolean): void {
    if (this.closed) return;
    this.dirty.set(rel, deep || (this.dirty.get(rel) ?? false));
    if (this.scheduled) return;
    this.scheduled = true;
    // A millisecond lets a burst of events for one write collapse into one look.
    setTimeout(() => {
      this.scheduled = false;
      void this.serial(async () => {
        const batch = this.dirty;
        this.dirty = new Map();
        if (batch.size) await this.capture.sync(batch);
      });
    }, 1);
  }

  /** Capture runs one at a time (the index and the journal have one writer). */
  private serial(fn: () => Promise<void>): Promise<void> {
    return this.serialValue(fn).catch((e) => {
      this.lastError = (e as Error).message;
      this.log.error({ err: e }, "capture failed; rescanning");
      // Level-based capture recovers by looking at everything again.
      setTimeout(() => this.markDirty("", true), 1000);
    });
  }

  /** Run fn after everything queued on the capture's turn; its errors go to the caller. */
  private serialValue<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.busy.then(fn);
    this.busy = run.then(() => undefined, () => undefined);
    return run;
  }

  private async append(ops: Op[], deltas: IndexDelta[]): Promise<void> {
    const seq = this.journal.lastSeq + 1;
    const payload = encodePacketPayload(seq, ops, this.cfg.compression);
    const got = await this.journal.append(payload, FileIndex.encodeDeltas(deltas));
    if (got !== seq) throw new Error(`journal assigned seq ${got}, expected ${seq}`);
    this.appendTimes.set(seq, Date.now());
    this.appendSizes.set(seq, payload.length);
  }

  private onAck(address: string, seq: number): void {
    this.acks[address] = seq;
    const min = Math.min(...this.senders.map((s) => s.lastAckedSeq));
    for (const [k] of this.appendTimes) {
      if (k > min) break;
      this.appendTimes.delete(k);
    }
  }

  /** Snapshot the index, persist target cursors, and release what no one needs. */
  async checkpoint(): Promise<void> {
    await this.serial(async () => {
      await this.journal.sync();
      const seq = this.journal.lastSeq;
      // (digests adopted from a mirror: saved once the mirror has stopped adding them, or on close)
      const adoptedDone = this.adopted > 0 && (this.closed || Date.now() - this.lastAdoptAt > CHECKPOINT_MS);
      if (seq > this.snapshotSeq || adoptedDone) {
        this.adopted = 0;
        await this.index.save(path.join(this.dir, "index.snap"), seq);
        this.snapshotSeq = seq;
      }
      const tmp = path.join(this.dir, "acks.json.tmp");
      await writeFile(tmp, JSON.stringify(this.acks));
      await rename(tmp, path.join(this.dir, "acks.json"));
      const upto = Math.min(this.snapshotSeq, ...this.senders.map((s) => s.holdFrom() - 1));
      if (upto >= this.journal.firstSeq) {
        await this.journal.release(upto);
        for (const [k] of this.appendSizes) {
          if (k > upto) break;
          this.appendSizes.delete(k);
        }
      }
    });
  }

  status(): Omit<SourceSetStatus, "managed" | "specHash" | "pathError"> {
    const jb = this.journal ? this.journal.bytes() : { memory: 0, disk: 0 };
    const now = Date.now();
    return {
      name: this.cfg.name,
      path: this.cfg.path,
      // A set is degraded while any of its targets cannot take its changes.
      state: this.state === "replicating" && this.senders.some((s) => s.state === "degraded" || s.state === "refused") ? "degraded" : this.state,
      lastSeq: this.journal?.lastSeq ?? 0,
      journalFirstSeq: this.journal?.firstSeq ?? 0,
      queuedBytes: jb,
      files: this.index.size,
      bytes: this.index.totalBytes(),
      capturedDataBytes: this.capture?.stats.dataBytes ?? 0,
      lastError: this.lastError,
      targets: this.senders.map((s) => {
        let unacked = 0;
        for (const [k, n] of this.appendSizes) if (k > s.lastAckedSeq) unacked += n;
        const memory = Math.min(unacked, jb.memory);
        const firstUnacked = this.appendTimes.get(s.lastAckedSeq + 1);
        return {
          address: "",
          state: s.state,
          lastSentSeq: s.lastSentSeq,
          lastAckedSeq: s.lastAckedSeq,
          queuedBytes: { memory, disk: unacked - memory },
          lagSeconds: s.lastAckedSeq >= (this.journal?.lastSeq ?? 0) || firstUnacked === undefined ? 0 : (now - firstUnacked) / 1000,
          lastError: s.lastError,
          retries: s.retries,
          mirror: s.mirror,
          lastVerify: this.lastVerify.get(this.cfg.targets[this.senders.indexOf(s)]!),
          verifying: this.verifying.has(this.cfg.targets[this.senders.indexOf(s)]!),
        };
      }).map((t, i) => ({ ...t, address: this.cfg.targets[i]! })),
    };
  }

  /** Used by `--once`-style tools and tests: true when every target acknowledged everything journaled. */
  get inSync(): boolean {
    return this.dirty.size === 0 && this.senders.every((s) => s.lastAckedSeq >= this.journal.lastSeq);
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const t of this.timers) clearInterval(t);
    for (const t of this.deferred.values()) clearTimeout(t);
    this.watcher?.close();
    await this.busy;
    await Promise.all(this.senders.map((s) => s.stop()));
    if (this.journal) {
      await this.checkpoint().catch((e) => this.log.error({ err: e }, "final checkpoint failed"));
      await this.journal.close();
    }
  }
}
