// Source role for one replication set: watcher → capture → journal → one
// sender per target. Owns the index snapshot and decides what the journal may
// release (acknowledged by every target and covered by the snapshot).
import { mkdir, readFile, writeFile, rename } from "node:fs/promises";
import path from "node:path";
import picomatch from "picomatch";
import type * as grpc from "@grpc/grpc-js";
import type { SetConfig } from "../../common/config.ts";
import type { Logger } from "../../common/log.ts";
import { Journal } from "../queue/journal.ts";
import { encodePacket, encodePacketBytes, type SourceSetStatus } from "../wire.ts";
import { Capture } from "./capture.ts";
import { FileIndex, type IndexDelta } from "./file-index.ts";
import { Sender } from "./sender.ts";
import { DirWatcher } from "./watcher.ts";

const CHECKPOINT_MS = 15_000;

export interface SourceSetOptions {
  agentName: string;
  dataDir: string;
  credentials: grpc.ChannelCredentials;
  log: Logger;
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

  constructor(cfg: SetConfig, o: SourceSetOptions) {
    this.cfg = cfg;
    this.o = o;
    this.log = o.log.child({ set: cfg.name });
    this.dir = path.join(o.dataDir, "sets", cfg.name);
  }

  private wanted(): (rel: string, isDir: boolean) => boolean {
    const inc = picomatch(this.cfg.include, { dot: true });
    const exc = picomatch(this.cfg.exclude, { dot: true });
    const ownState = path.relative(this.cfg.path, this.o.dataDir);
    const stateInside = ownState && !ownState.startsWith("..") && !path.isAbsolute(ownState) ? ownState : undefined;
    return (rel, isDir) => {
      if (stateInside && (rel === stateInside || rel.startsWith(stateInside + "/"))) return false;
      if (exc(rel) || (isDir && exc(rel + "/"))) return false;
      return isDir || inc(rel);
    };
  }

  async start(): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    this.journal = await Journal.open({ dir: path.join(this.dir, "journal"), memoryBytes: this.cfg.queueMemory });
    this.snapshotSeq = await this.index.load(path.join(this.dir, "index.snap"));
    let replayed = 0;
    for await (const e of this.journal.entries(this.snapshotSeq + 1) as AsyncIterable<{ seq: number; payload: Buffer; meta: Buffer }>) {
      for (const d of FileIndex.decodeDeltas(e.meta)) this.index.apply(d);
      this.appendSizes.set(e.seq, e.payload.length);
      replayed++;
    }
    this.acks = await readFile(path.join(this.dir, "acks.json"), "utf8").then((t) => JSON.parse(t) as Record<string, number>, () => ({}));
    this.log.info({ files: this.index.size, snapshotSeq: this.snapshotSeq, replayed, journal: [this.journal.firstSeq, this.journal.lastSeq] }, "index loaded");
    this.watcher = new DirWatcher(this.cfg.path, (rel, deep) => this.markDirty(rel, deep), (rel, err) => this.log.warn({ rel, err: err.message }, "cannot watch directory"));
    this.capture = new Capture({
      root: this.cfg.path,
      blockSize: this.cfg.blockSize,
      index: this.index,
      watcher: this.watcher,
      wanted: this.wanted(),
      sink: (ops, deltas) => this.append(ops, deltas),
      log: this.log,
      redirty: (rel, deep) => this.markDirty(rel, deep ?? false),
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
      });
      this.senders.push(s);
      s.start();
    }
    this.state = "scanning";
    const t0 = Date.now();
    await this.serial(() => this.capture.fullScan());
    this.state = "replicating";
    this.log.info({ files: this.index.size, ms: Date.now() - t0, ops: this.capture.stats.ops, dataBytes: this.capture.stats.dataBytes }, "initial scan done; watching");
    this.timers.push(setInterval(() => void this.checkpoint().catch((e) => this.log.error({ err: e }, "checkpoint failed")), CHECKPOINT_MS));
    this.timers.push(setInterval(() => void this.journal.sync().catch((e) => this.log.error({ err: e }, "journal sync failed")), 1000));
    if (this.cfg.rescanInterval > 0) this.timers.push(setInterval(() => void this.serial(() => this.capture.fullScan()), this.cfg.rescanInterval));
  }

  private markDirty(rel: string, deep: boolean): void {
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
    const run = this.busy.then(fn).catch((e) => {
      this.lastError = (e as Error).message;
      this.log.error({ err: e }, "capture failed; rescanning");
      // Level-based capture recovers by looking at everything again.
      setTimeout(() => this.markDirty("", true), 1000);
    });
    this.busy = run;
    return run;
  }

  private async append(ops: Parameters<typeof encodePacket>[1], deltas: IndexDelta[]): Promise<void> {
    const seq = this.journal.lastSeq + 1;
    const payload = encodePacketBytes(encodePacket(seq, ops, this.cfg.compression));
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
      if (seq > this.snapshotSeq) {
        await this.index.save(path.join(this.dir, "index.snap"), seq);
        this.snapshotSeq = seq;
      }
      const tmp = path.join(this.dir, "acks.json.tmp");
      await writeFile(tmp, JSON.stringify(this.acks));
      await rename(tmp, path.join(this.dir, "acks.json"));
      const upto = Math.min(this.snapshotSeq, ...this.senders.map((s) => s.lastAckedSeq));
      if (upto >= this.journal.firstSeq) {
        await this.journal.release(upto);
        for (const [k] of this.appendSizes) {
          if (k > upto) break;
          this.appendSizes.delete(k);
        }
      }
    });
  }

  status(): SourceSetStatus {
    const jb = this.journal ? this.journal.bytes() : { memory: 0, disk: 0 };
    const now = Date.now();
    return {
      name: this.cfg.name,
      path: this.cfg.path,
      // A set is degraded while any of its targets cannot take its changes.
      state: this.state === "replicating" && this.senders.some((s) => s.state === "degraded" || s.state === "refused" || s.state === "needs-mirror") ? "degraded" : this.state,
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
    this.watcher?.close();
    await this.busy;
    await Promise.all(this.senders.map((s) => s.stop()));
    if (this.journal) {
      await this.checkpoint().catch((e) => this.log.error({ err: e }, "final checkpoint failed"));
      await this.journal.close();
    }
  }
}
