// Source-side transaction journal / send queue. Every change packet is appended
// here before it is sent, so a crashed or restarted agent (kill -9 included)
// can resend whatever its targets have not acknowledged; sync() adds
// durability against power loss. The newest entries also stay in memory (up to
// memoryBytes) so senders normally never touch the disk; older ones "spill" and
// are read back from the segment files. Entries stay until release(seq).
//
// On disk, in `dir`:
//   <20-digit seq of the first record>.seg   segment files, append-only, rolled
//       after segmentBytes. A record is a 24-byte header followed by payload
//       then meta. Header, all integers little-endian:
//         0  magic   u32  the ASCII bytes "UJR1"
//         4  plen    u32  payload length
//         8  mlen    u32  meta length
//        12  seq     u64  (low u32, then high u32)
//        20  crc     u32  CRC-32 (zlib's) over header bytes 4..20 (lengths and seq),
//                         then payload, then meta
//   state.json   {"firstSeq","lastSeq"}: written atomically (tmp, fsync, rename,
//       fsync dir) on release. firstSeq hides released records whose segment
//       still exists; lastSeq (the highest seq known to be on disk or released)
//       keeps numbering going when every segment has been deleted.
// A torn or corrupt record at the tail of the last segment (a write cut short
// by kill -9 or power loss) is truncated away on open; damage anywhere else
// fails open() with an error naming the file and offset.
import { EventEmitter } from "node:events";
import { mkdir, open as openFile, readdir, readFile, rename, unlink, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { crc32 as crc32Simd } from "@node-rs/crc32";

export interface JournalEntry {
  seq: number;
  payload: Buffer;
  meta: Buffer;
  /**
   * Bytes right before payload (in payload.buffer) that belong to this entry
   * alone and that the caller may overwrite (read() from disk: the record
   * header, already checked); 0 or absent: none.
   */
  headroom?: number;
}

export interface JournalOptions {
  /** Directory of the journal; created if missing. One journal (one process) per directory. */
  dir: string;
  /** In-memory cache budget in payload+meta bytes. */
  memoryBytes: number;
  /** Roll to a new segment file after this many bytes (default 64 MiB). */
  segmentBytes?: number;
}

const MAGIC = 0x31524a55; // "UJR1" as a little-endian u32
const MAGIC_BYTES = Buffer.from("UJR1", "latin1");
const HEADER = 24;
/** Largest payload+meta of one record (the index keeps record lengths as u32). */
const MAX_BODY = 0xffffffff - HEADER;
const DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024;
/**
 * Charged per cached entry against memoryBytes (roughly what V8 spends on the
 * objects of one entry), so that tiny or empty entries cannot pile up unbounded.
 */
const CACHE_ENTRY_COST = 256;
const READ_CHUNK = 1024 * 1024;
const MAX_BATCH_RECORDS = 256; // 3 iovecs each: stays below IOV_MAX (1024)
const MAX_BATCH_BYTES = 16 * 1024 * 1024;
const READ_HANDLES = 8;
const SEGMENT_RE = /^(\d{20})\.seg$/;
const STATE_FILE = "state.json";
const STATE_TMP = "state.json.tmp";
const EMPTY = Buffer.alloc(0);

interface Segment {
  first: number; // seq of its first record (from the file name)
  path: string;
  size: number; // bytes of valid records
  fh: FileHandle | null; // write handle; only the active (last) segment has one
}

interface Pending {
  payload: Buffer;
  meta: Buffer;
  resolve: (seq: number) => void;
  reject: (err: unknown) => void;
}

interface ReadHandle {
  fh: Promise<FileHandle>;
  refs: number;
  doomed: boolean;
  used: number;
}

export interface JournalRecovery {
  file: string;
  offset: number;
  droppedBytes: number;
  reason: string;
}

export class Journal {
  readonly events = new EventEmitter();
  /** Set by open() when it cut a torn/corrupt tail off the last segment (for logging). */
  recovered: JournalRecovery | null = null;

  private readonly dir: string;
  private readonly memoryBytes: number;
  private readonly segmentBytes: number;

  private first = 1;
  private last = 0;
  /** Highest seq covered by a completed sync() (or found on disk at open). */
  private durable = 0;
  private retainedBytes = 0;

  private readonly index = new SeqIndex();
  private segments: Segment[] = [];
  private active: Segment | null = null;

  // In-memory cache: entries cacheFirst..last, contiguous, cache[cHead] is cacheFirst.
  private cache: (JournalEntry | undefined)[] = [];
  private cHead = 0;
  private cacheFirst = 1;
  private cacheCost = 0;
  private cacheBytes = 0;

  // Append queue, written by one drain loop in batches (one writev per batch).
  private pending: (Pending | undefined)[] = [];
  private pHead = 0;
  private draining = false;
  private drainDone: Promise<void> = Promise.resolve();
  private lockTail: Promise<void> = Promise.resolve();
  private broken: Error | null = null;

  private readonly readHandles = new Map<number, ReadHandle>();
  private useTick = 0;
  /** fdatasync+close of rolled-over segments, running in the background. */
  private readonly closing = new Set<Promise<void>>();
  private bgError: Error | null = null;
  private dirDirty = false;
  private stateChain: Promise<void> = Promise.resolve();
  private stateWritten = { firstSeq: -1, lastSeq: -1 };
  private closeRequested = false;
  private closePromise: Promise<void> | null = null;
  private closed = false;

  private constructor(opts: JournalOptions) {
    this.dir = opts.dir;
    this.memoryBytes = opts.memoryBytes;
    this.segmentBytes = opts.segmentBytes ?? DEFAULT_SEGMENT_BYTES;
  }

  static async open(opts: JournalOptions): Promise<Journal> {
    if (typeof opts.dir !== "string" || opts.dir === "") throw new Error("journal: dir is required");
    if (!(opts.memoryBytes >= 0)) throw new Error(`journal: memoryBytes must be >= 0, got ${opts.memoryBytes}`);
    if (opts.segmentBytes !== undefined && !(opts.segmentBytes >= 1)) throw new Error(`journal: segmentBytes must be >= 1, got ${opts.segmentBytes}`);
    const j = new Journal(opts);
    try {
      await j.load();
    } catch (err) {
      for (const seg of j.segments) await seg.fh?.close().catch(() => {});
      throw err;
    }
    return j;
  }

  get firstSeq(): number {
    return this.first;
  }

  get lastSeq(): number {
    return this.last;
  }

  /**
   * Append one entry; resolves with its seq once it has been written (not
   * fsynced). The journal keeps references to payload and meta: do not modify
   * them afterwards. Concurrent calls are written in call order.
   */
  append(payload: Buffer, meta: Buffer = EMPTY): Promise<number> {
    if (this.closeRequested) return Promise.reject(new Error("journal: closed"));
    if (this.broken) return Promise.reject(this.broken);
    if (!(payload instanceof Uint8Array) || !(meta instanceof Uint8Array)) return Promise.reject(new TypeError("journal: payload and meta must be Buffers"));
    if (payload.length + meta.length > MAX_BODY) return Promise.reject(new RangeError(`journal: entry of ${payload.length + meta.length} bytes is too large`));
    return new Promise<number>((resolve, reject) => {
      this.pending.push({ payload: asBuffer(payload), meta: asBuffer(meta), resolve, reject });
      if (!this.draining) {
        this.draining = true;
        this.drainDone = this.drain();
      }
    });
  }

  /** The entry with this seq, from memory when cached, else from disk; undefined when released or not yet written. */
  async read(seq: number): Promise<JournalEntry | undefined> {
    this.checkOpen();
    if (!Number.isInteger(seq) || seq < this.first || seq > this.last) return undefined;
    if (seq >= this.cacheFirst) return this.cached(seq);
    const seg = this.segmentFor(seq);
    const offset = this.index.offsetOf(seq);
    const length = this.index.lengthOf(seq);
    let buf: Buffer;
    try {
      const h = await this.acquire(seg);
      try {
        buf = Buffer.allocUnsafeSlow(length);
        await readFully(await h.fh, buf, 0, length, offset);
      } finally {
        this.unref(h);
      }
    } catch (err) {
      if (seq < this.first) return undefined; // released (and maybe deleted) meanwhile
      throw err;
    }
    const rec = decodeRecord(buf);
    if (typeof rec === "string" || rec.seq !== seq) {
      throw new Error(`journal: segment ${seg.path} is corrupt at offset ${offset}: ${typeof rec === "string" ? rec : `seq ${rec.seq}, expected ${seq}`}`);
    }
    return { seq, payload: rec.payload, meta: rec.meta, headroom: HEADER };
  }

  /**
   * Entries from fromSeq (or firstSeq, if later) up to lastSeq, in order,
   * including entries appended while iterating. Spilled entries are read with
   * buffered 1 MiB reads; small payloads may share one read buffer, so copy
   * them if they are to be kept for long.
   */
  async *entries(fromSeq: number): AsyncIterable<JournalEntry> {
    this.checkOpen();
    let seq = Math.max(Math.ceil(fromSeq), this.first);
    while (!this.closed && seq <= this.last) {
      if (seq < this.first) seq = this.first;
      if (seq > this.last) break;
      if (seq >= this.cacheFirst) {
        yield this.cached(seq);
        seq++;
        continue;
      }
      const segIdx = this.segmentIndexFor(seq);
      const seg = this.segments[segIdx]!;
      const next = this.segments[segIdx + 1];
      const stop = Math.min(this.cacheFirst - 1, next ? next.first - 1 : this.last);
      const start = this.index.offsetOf(seq);
      const end = this.index.offsetOf(stop) + this.index.lengthOf(stop);
      let h: ReadHandle | undefined;
      try {
        h = await this.acquire(seg);
        const reader = new ChunkReader(await h.fh, start, end);
        while (seq <= stop) {
          const rec = await readRecord(reader);
          if (rec === null || typeof rec === "string" || rec.seq !== seq) {
            const what = rec === null ? "unexpected end of file" : typeof rec === "string" ? rec : `seq ${rec.seq}, expected ${seq}`;
            throw new Error(`journal: segment ${seg.path} is corrupt at offset ${reader.lastRecordAt}: ${what}`);
          }
          yield { seq, payload: rec.payload, meta: rec.meta };
          seq++;
          if (seq < this.first) break; // released while the consumer held the entry
        }
      } catch (err) {
        if (seq < this.first) continue;
        throw err;
      } finally {
        if (h) this.unref(h);
      }
    }
  }

  /** Entries <= uptoSeq are no longer needed by any consumer. */
  async release(uptoSeq: number): Promise<void> {
    this.checkNotClosing();
    if (Number.isNaN(uptoSeq)) throw new TypeError("journal: release(NaN)");
    const upto = Math.min(Math.floor(uptoSeq), this.last);
    if (upto < this.first) return;
    for (let s = this.first; s <= upto; s++) this.retainedBytes -= this.index.lengthOf(s) - HEADER;
    while (this.cHead < this.cache.length && this.cacheFirst <= upto) this.evictOldest();
    this.index.dropTo(upto + 1);
    this.first = upto + 1;
    await this.persistState();
    await this.deleteReleasedSegments();
  }

  /** Bytes (payload+meta) of retained entries: in the memory cache, and only on disk. */
  bytes(): { memory: number; disk: number } {
    return { memory: this.cacheBytes, disk: this.retainedBytes - this.cacheBytes };
  }

  /** Make every entry whose append() has resolved durable against power loss. */
  async sync(): Promise<void> {
    this.checkNotClosing();
    const upto = this.last;
    const waits: Promise<unknown>[] = [...this.closing];
    const fh = this.active?.fh;
    if (fh) waits.push(fh.datasync());
    const dir = this.dirDirty;
    this.dirDirty = false;
    try {
      await Promise.all(waits);
      if (dir) await this.syncDir();
    } catch (err) {
      if (dir) this.dirDirty = true;
      throw err;
    }
    if (this.bgError) throw this.bgError;
    if (upto > this.durable) this.durable = upto;
  }

  /** Finish queued appends, fsync, and close all files. */
  close(): Promise<void> {
    this.closePromise ??= this.doClose();
    return this.closePromise;
  }

  private async doClose(): Promise<void> {
    this.closeRequested = true;
    await this.drainDone;
    await this.stateChain;
    let firstErr: unknown = null;
    await this.withLock(async () => {
      const fh = this.active?.fh;
      if (!fh) return;
      this.active!.fh = null;
      try {
        await fh.datasync();
        if (this.dirDirty) await this.syncDir();
      } catch (err) {
        firstErr ??= err;
      } finally {
        await fh.close().catch(() => {});
      }
    });
    await Promise.allSettled([...this.closing]);
    for (const [first, h] of this.readHandles) {
      this.readHandles.delete(first);
      h.doomed = true;
      if (h.refs === 0) closeQuietly(h.fh);
    }
    this.closed = true;
    if (firstErr) throw firstErr;
  }

  // ---- open ----

  private async load(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    const state = await this.readState();
    const names = (await readdir(this.dir)).filter((n) => SEGMENT_RE.test(n)).sort();
    await unlink(join(this.dir, STATE_TMP)).catch(() => {});
    const segs: Segment[] = names.map((name) => {
      const first = Number(name.slice(0, 20));
      if (!Number.isSafeInteger(first) || first < 1) throw new Error(`journal: bad segment file name ${join(this.dir, name)}`);
      return { first, path: join(this.dir, name), size: 0, fh: null };
    });
    const releasedBelow = state?.firstSeq ?? 0;

    // Segments whose records all precede firstSeq were released; a crash kept them.
    let k = 0;
    while (k < segs.length - 1 && segs[k + 1]!.first <= releasedBelow) await unlink(segs[k++]!.path);
    const kept = segs.slice(k);

    let expected = -1;
    for (let i = 0; i < kept.length; i++) {
      const seg = kept[i]!;
      const isLast = i === kept.length - 1;
      if (expected !== -1 && seg.first !== expected) {
        throw new Error(`journal: segment ${seg.path} starts at seq ${seg.first} but the previous segment ends at ${expected - 1}`);
      }
      const fh = await openFile(seg.path, isLast ? "r+" : "r");
      try {
        expected = await this.scanSegment(seg, fh, isLast, releasedBelow);
      } catch (err) {
        await fh.close().catch(() => {});
        throw err;
      }
      if (isLast) seg.fh = fh;
      else await fh.close();
    }
    this.segments = kept; // from here on, open() closes the last segment's handle if load() fails
    const recLast = kept.length > 0 ? expected - 1 : 0;

    this.last = Math.max(state?.lastSeq ?? 0, recLast);
    this.first = state ? state.firstSeq : kept.length > 0 ? kept[0]!.first : 1;
    if (this.first > this.last + 1) this.last = this.first - 1;
    // Records found on disk may still be only in the page cache (after kill -9): not yet "durable".
    this.durable = Math.min(this.last, state?.lastSeq ?? 0);

    if (this.first <= this.last) {
      const idx = this.index;
      if (idx.count === 0 || idx.first > this.first) {
        throw new Error(`journal: ${this.dir} is missing entries ${this.first}..${idx.count === 0 ? this.last : idx.first - 1} (segment files deleted?)`);
      }
      if (idx.first + idx.count - 1 < this.last) {
        throw new Error(`journal: ${this.dir} is missing entries ${idx.first + idx.count}..${this.last} that ${STATE_FILE} says were written`);
      }
    } else {
      this.index.reset(this.first);
      this.retainedBytes = 0;
    }

    const lastSeg = kept[kept.length - 1];
    if (lastSeg) {
      const hasRecords = lastSeg.size > 0;
      const keep = hasRecords ? recLast >= this.first : lastSeg.first === this.last + 1;
      if (keep) {
        this.active = lastSeg;
      } else {
        await lastSeg.fh!.close();
        lastSeg.fh = null;
        await unlink(lastSeg.path);
        this.segments.pop();
      }
    }
    this.cacheFirst = this.last + 1;
    this.stateWritten = state ? { firstSeq: state.firstSeq, lastSeq: state.lastSeq } : { firstSeq: -1, lastSeq: -1 };
  }

  /** Validate one segment, index its retained records; returns the seq after its last record. */
  private async scanSegment(seg: Segment, fh: FileHandle, isLast: boolean, releasedBelow: number): Promise<number> {
    const size = (await fh.stat()).size;
    const reader = new ChunkReader(fh, 0, size);
    let next = seg.first;
    let valid = 0;
    for (;;) {
      const at = reader.pos;
      const rec = await readRecord(reader);
      if (rec === null) break; // clean end of file
      if (typeof rec === "string") {
        const reason = rec;
        if (!isLast) throw new Error(`journal: segment ${seg.path} is corrupt at offset ${at}: ${reason}`);
        const later = await findRecord(fh, at + 1, size, next);
        if (later >= 0) {
          throw new Error(`journal: segment ${seg.path} is corrupt at offset ${at}: ${reason} (valid records follow at offset ${later})`);
        }
        await fh.truncate(at);
        await fh.datasync();
        this.recovered = { file: seg.path, offset: at, droppedBytes: size - at, reason };
        break;
      }
      if (rec.seq !== next) throw new Error(`journal: segment ${seg.path} is corrupt at offset ${at}: record seq ${rec.seq}, expected ${next}`);
      const length = HEADER + rec.payload.length + rec.meta.length;
      if (rec.seq >= releasedBelow) {
        if (this.index.count === 0) this.index.reset(rec.seq);
        this.index.push(at, length);
        this.retainedBytes += length - HEADER;
      }
      next++;
      valid = at + length;
    }
    seg.size = valid;
    return next;
  }

  private async readState(): Promise<{ firstSeq: number; lastSeq: number } | null> {
    const path = join(this.dir, STATE_FILE);
    let text: string;
    try {
      text = await readFile(path, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw err;
    }
    let v: unknown;
    try {
      v = JSON.parse(text);
    } catch {
      throw new Error(`journal: ${path} is not valid JSON`);
    }
    const s = v as { firstSeq?: unknown; lastSeq?: unknown };
    if (!s || !Number.isSafeInteger(s.firstSeq) || !Number.isSafeInteger(s.lastSeq) || (s.firstSeq as number) < 1 || (s.lastSeq as number) < 0) {
      throw new Error(`journal: ${path} has no valid firstSeq/lastSeq`);
    }
    return { firstSeq: s.firstSeq as number, lastSeq: s.lastSeq as number };
  }

  // ---- appending ----

  private async drain(): Promise<void> {
    try {
      while (this.pHead < this.pending.length) await this.withLock(() => this.writeBatch());
      this.pending = [];
      this.pHead = 0;
    } finally {
      this.draining = false;
    }
  }

  /** Write the queued appends that fit one batch with one writev, then publish them. */
  private async writeBatch(): Promise<void> {
    if (this.broken) return this.failPending(this.broken);
    let seg: Segment;
    try {
      seg = await this.ensureSegment(this.last + 1);
    } catch (err) {
      return this.failPending(err);
    }
    const fh = seg.fh!;
    const items: Pending[] = [];
    let bytes = 0;
    while (this.pHead < this.pending.length && items.length < MAX_BATCH_RECORDS) {
      const it = this.pending[this.pHead]!;
      const len = HEADER + it.payload.length + it.meta.length;
      if (items.length > 0 && (seg.size + bytes >= this.segmentBytes || bytes + len > MAX_BATCH_BYTES)) break;
      this.pending[this.pHead++] = undefined;
      items.push(it);
      bytes += len;
    }
    if (this.pHead >= 1024 && this.pHead * 2 >= this.pending.length) {
      this.pending = this.pending.slice(this.pHead);
      this.pHead = 0;
    }

    const firstSeq = this.last + 1;
    const headers = Buffer.allocUnsafe(HEADER * items.length);
    const iov: Buffer[] = [];
    for (let i = 0; i < items.length; i++) {
      const it = items[i]!;
      const h = headers.subarray(i * HEADER, (i + 1) * HEADER);
      encodeHeader(h, firstSeq + i, it.payload, it.meta);
      iov.push(h);
      if (it.payload.length > 0) iov.push(it.payload);
      if (it.meta.length > 0) iov.push(it.meta);
    }
    const at = seg.size;
    try {
      await writeAllV(fh, iov, at);
    } catch (err) {
      for (const it of items) it.reject(err);
      try {
        await fh.truncate(at); // undo a partial write; later appends go on normally
      } catch (err2) {
        this.broken = new Error(`journal: write to ${seg.path} failed (${String(err)}) and could not be undone (${String(err2)})`);
        this.failPending(this.broken);
      }
      return;
    }
    seg.size += bytes;
    let off = at;
    for (let i = 0; i < items.length; i++) {
      const it = items[i]!;
      const seq = firstSeq + i;
      const len = HEADER + it.payload.length + it.meta.length;
      this.index.push(off, len);
      off += len;
      this.retainedBytes += len - HEADER;
      this.last = seq;
      this.cachePut(seq, it.payload, it.meta);
    }
    for (let i = 0; i < items.length; i++) items[i]!.resolve(firstSeq + i);
    for (let i = 0; i < items.length; i++) {
      try {
        this.events.emit("append", firstSeq + i);
      } catch (err) {
        process.nextTick(() => {
          throw err;
        });
      }
    }
  }

  private failPending(err: unknown): void {
    while (this.pHead < this.pending.length) {
      const it = this.pending[this.pHead]!;
      this.pending[this.pHead++] = undefined;
      it.reject(err);
    }
  }

  /** The segment to write seq into: the active one, or a new one after a roll. Called under the lock. */
  private async ensureSegment(seq: number): Promise<Segment> {
    const cur = this.active;
    if (cur && (cur.size < this.segmentBytes || cur.size === 0)) return cur;
    if (cur) {
      const fh = cur.fh!;
      cur.fh = null;
      this.active = null;
      const done: Promise<void> = fh
        .datasync()
        .catch((err: Error) => {
          this.bgError ??= new Error(`journal: fdatasync of ${cur.path} failed: ${err.message}`);
        })
        .finally(() => fh.close().catch(() => {}))
        .finally(() => this.closing.delete(done));
      this.closing.add(done);
    }
    const path = join(this.dir, segmentName(seq));
    const fh = await openFile(path, "wx+");
    this.dirDirty = true;
    const seg: Segment = { first: seq, path, size: 0, fh };
    this.segments.push(seg);
    this.active = seg;
    return seg;
  }

  private withLock<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lockTail.then(fn);
    this.lockTail = run.then(
      () => {},
      () => {},
    );
    return run;
  }

  // ---- cache ----

  private cached(seq: number): JournalEntry {
    const e = this.cache[this.cHead + (seq - this.cacheFirst)]!;
    return { seq, payload: e.payload, meta: e.meta };
  }

  private cachePut(seq: number, payload: Buffer, meta: Buffer): void {
    const cost = payload.length + meta.length + CACHE_ENTRY_COST;
    if (cost > this.memoryBytes) {
      while (this.cHead < this.cache.length) this.evictOldest();
      this.cacheFirst = seq + 1;
      return;
    }
    this.cache.push({ seq, payload: ownedCopy(payload), meta: ownedCopy(meta) });
    this.cacheCost += cost;
    this.cacheBytes += payload.length + meta.length;
    while (this.cacheCost > this.memoryBytes) this.evictOldest();
  }

  private evictOldest(): void {
    const e = this.cache[this.cHead]!;
    this.cache[this.cHead++] = undefined;
    this.cacheFirst++;
    this.cacheBytes -= e.payload.length + e.meta.length;
    this.cacheCost -= e.payload.length + e.meta.length + CACHE_ENTRY_COST;
    if (this.cHead === this.cache.length) {
      this.cache = [];
      this.cHead = 0;
    } else if (this.cHead >= 1024 && this.cHead * 2 >= this.cache.length) {
      this.cache = this.cache.slice(this.cHead);
      this.cHead = 0;
    }
  }

  // ---- segments, files ----

  private segmentIndexFor(seq: number): number {
    let lo = 0;
    let hi = this.segments.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.segments[mid]!.first <= seq) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  private segmentFor(seq: number): Segment {
    return this.segments[this.segmentIndexFor(seq)]!;
  }

  private async deleteReleasedSegments(): Promise<void> {
    while (this.segments.length > 1 && this.segments[1]!.first <= this.first) {
      const seg = this.segments.shift()!;
      this.dropReadHandle(seg.first);
      await unlinkIfExists(seg.path);
    }
    if (this.first > this.last && this.segments.length === 1 && this.active) {
      // Everything is released: drop the active segment too (the next append starts a new one).
      await this.withLock(async () => {
        const seg = this.active;
        if (!seg || this.first <= this.last || this.segments.length !== 1 || this.segments[0] !== seg) return;
        this.segments.pop();
        this.active = null;
        this.dropReadHandle(seg.first);
        const fh = seg.fh;
        seg.fh = null;
        await fh?.close();
        await unlinkIfExists(seg.path);
      });
    }
  }

  private acquire(seg: Segment): Promise<ReadHandle> {
    let h = this.readHandles.get(seg.first);
    if (!h) {
      const fresh: ReadHandle = { fh: openFile(seg.path, "r"), refs: 0, doomed: false, used: 0 };
      fresh.fh.catch(() => {
        if (this.readHandles.get(seg.first) === fresh) this.readHandles.delete(seg.first);
      });
      this.readHandles.set(seg.first, fresh);
      h = fresh;
    }
    h.refs++;
    h.used = ++this.useTick;
    if (this.readHandles.size > READ_HANDLES) this.trimReadHandles();
    const got = h;
    return got.fh.then(
      () => got,
      (err: unknown) => {
        this.unref(got);
        throw err;
      },
    );
  }

  private unref(h: ReadHandle): void {
    h.refs--;
    if (h.refs === 0 && h.doomed) closeQuietly(h.fh);
  }

  private trimReadHandles(): void {
    while (this.readHandles.size > READ_HANDLES) {
      let victim: number | undefined;
      let oldest = Infinity;
      for (const [first, h] of this.readHandles) {
        if (h.refs === 0 && h.used < oldest) {
          oldest = h.used;
          victim = first;
        }
      }
      if (victim === undefined) return;
      this.dropReadHandle(victim);
    }
  }

  private dropReadHandle(first: number): void {
    const h = this.readHandles.get(first);
    if (!h) return;
    this.readHandles.delete(first);
    h.doomed = true;
    if (h.refs === 0) closeQuietly(h.fh);
  }

  /** Write state.json atomically; concurrent callers coalesce into few writes. */
  private persistState(): Promise<void> {
    const run = this.stateChain.then(async () => {
      const firstSeq = this.first;
      const lastSeq = Math.max(firstSeq - 1, Math.min(this.durable, this.last));
      if (firstSeq === this.stateWritten.firstSeq && lastSeq === this.stateWritten.lastSeq) return;
      const tmp = join(this.dir, STATE_TMP);
      const fh = await openFile(tmp, "w");
      try {
        await fh.writeFile(JSON.stringify({ firstSeq, lastSeq }) + "\n");
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(tmp, join(this.dir, STATE_FILE));
      await this.syncDir();
      this.stateWritten = { firstSeq, lastSeq };
    });
    this.stateChain = run.catch(() => {});
    return run;
  }

  private async syncDir(): Promise<void> {
    const fh = await openFile(this.dir, "r");
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
  }

  private checkOpen(): void {
    if (this.closed) throw new Error("journal: closed");
  }

  private checkNotClosing(): void {
    if (this.closeRequested) throw new Error("journal: closed");
  }
}

// ---- helpers ----

/**
 * CRC-32 (IEEE, the one zlib computes) of b, continuing from `value`:
 * @node-rs/crc32's SIMD version, ~3× faster than node:zlib's here (0.12 vs
 * 0.33 CPU-s per GiB) and the same values, so records on disk are unchanged.
 * (An empty buffer leaves the value as it is; node:zlib returns 0 instead
 * when the buffer has no backing memory at all, which the journal never
 * passes: its empty meta is a view of a pooled buffer.)
 */
function crc32(b: Uint8Array, value = 0): number {
  return crc32Simd(b, value);
}

/** Seq -> (file offset, record length) of retained entries, in two typed arrays used as a sliding window. */
class SeqIndex {
  first = 1; // seq at slot `head`
  count = 0;
  private head = 0;
  private off = new Float64Array(1024);
  private len = new Uint32Array(1024);

  reset(first: number): void {
    this.first = first;
    this.count = 0;
    this.head = 0;
    if (this.off.length > 1024) this.resize(1024);
  }

  push(offset: number, length: number): void {
    if (this.head + this.count === this.off.length) this.resize(Math.max(1024, this.count * 2));
    const i = this.head + this.count;
    this.off[i] = offset;
    this.len[i] = length;
    this.count++;
  }

  /** Forget entries before seq. */
  dropTo(seq: number): void {
    const k = Math.min(this.count, seq - this.first);
    if (k <= 0) return;
    this.head += k;
    this.count -= k;
    this.first += k;
    if (this.count === 0) {
      this.head = 0;
      this.first = seq;
    }
    if (this.off.length > 4096 && this.count < this.off.length / 4) this.resize(Math.max(1024, this.count * 2));
  }

  offsetOf(seq: number): number {
    return this.off[this.head + seq - this.first] as number;
  }

  lengthOf(seq: number): number {
    return this.len[this.head + seq - this.first] as number;
  }

  private resize(cap: number): void {
    const off = new Float64Array(cap);
    const len = new Uint32Array(cap);
    off.set(this.off.subarray(this.head, this.head + this.count));
    len.set(this.len.subarray(this.head, this.head + this.count));
    this.off = off;
    this.len = len;
    this.head = 0;
  }
}

/** Buffered sequential reader over [start, end) of a file, handing out byte ranges. */
class ChunkReader {
  pos: number; // file offset of the next byte not yet handed out
  lastRecordAt = 0;
  private readonly fh: FileHandle;
  private readonly end: number;
  private buf: Buffer = EMPTY;
  private p = 0;

  constructor(fh: FileHandle, start: number, end: number) {
    this.fh = fh;
    this.pos = start;
    this.end = end;
  }

  get remaining(): number {
    return this.end - this.pos;
  }

  /** The next n bytes, or null if the file range ends first. */
  async take(n: number): Promise<Buffer | null> {
    const avail = this.buf.length - this.p;
    if (n <= avail) {
      const out = this.buf.subarray(this.p, this.p + n);
      this.p += n;
      this.pos += n;
      return out;
    }
    if (this.pos + n > this.end) return null;
    const fileAt = this.pos + avail;
    if (n >= READ_CHUNK / 2) {
      // Big record: read it straight into its own buffer.
      const out = Buffer.allocUnsafeSlow(n);
      this.buf.copy(out, 0, this.p);
      await readFully(this.fh, out, avail, n - avail, fileAt);
      this.buf = EMPTY;
      this.p = 0;
      this.pos += n;
      return out;
    }
    const size = Math.min(READ_CHUNK, this.end - this.pos);
    const nb = Buffer.allocUnsafeSlow(size);
    this.buf.copy(nb, 0, this.p);
    await readFully(this.fh, nb, avail, size - avail, fileAt);
    this.buf = nb;
    this.p = n;
    this.pos += n;
    return nb.subarray(0, n);
  }
}

interface DecodedRecord {
  seq: number;
  payload: Buffer;
  meta: Buffer;
}

/** The next record, a string saying why it is bad, or null at the clean end of the range (or when it is cut short). */
async function readRecord(r: ChunkReader): Promise<DecodedRecord | string | null> {
  r.lastRecordAt = r.pos;
  if (r.remaining === 0) return null;
  const h = await r.take(HEADER);
  if (!h) return "truncated header";
  if (h.readUInt32LE(0) !== MAGIC) return "bad magic";
  const plen = h.readUInt32LE(4);
  const mlen = h.readUInt32LE(8);
  const seq = readSeq(h);
  const want = h.readUInt32LE(20);
  const headCrc = crc32(h.subarray(4, 20));
  const body = await r.take(plen + mlen);
  if (!body) return `truncated record (seq ${seq})`;
  if (crc32(body, headCrc) !== want) return `checksum mismatch (seq ${seq})`;
  return { seq, payload: body.subarray(0, plen), meta: body.subarray(plen) };
}

/** Decode one whole record held in buf (as read by read()). */
function decodeRecord(buf: Buffer): DecodedRecord | string {
  if (buf.length < HEADER || buf.readUInt32LE(0) !== MAGIC) return "bad magic";
  const plen = buf.readUInt32LE(4);
  const mlen = buf.readUInt32LE(8);
  if (HEADER + plen + mlen !== buf.length) return "record length mismatch";
  const seq = readSeq(buf);
  if (crc32(buf.subarray(HEADER), crc32(buf.subarray(4, 20))) !== buf.readUInt32LE(20)) return `checksum mismatch (seq ${seq})`;
  return { seq, payload: buf.subarray(HEADER, HEADER + plen), meta: buf.subarray(HEADER + plen) };
}

function encodeHeader(h: Buffer, seq: number, payload: Buffer, meta: Buffer): void {
  h.writeUInt32LE(MAGIC, 0);
  h.writeUInt32LE(payload.length, 4);
  h.writeUInt32LE(meta.length, 8);
  h.writeUInt32LE(seq % 0x100000000, 12);
  h.writeUInt32LE(Math.floor(seq / 0x100000000), 16);
  let c = crc32(h.subarray(4, 20));
  c = crc32(payload, c);
  c = crc32(meta, c);
  h.writeUInt32LE(c, 20);
}

function readSeq(h: Buffer): number {
  return h.readUInt32LE(16) * 0x100000000 + h.readUInt32LE(12);
}

/** Offset of the first valid record with seq >= minSeq in [from, end), or -1. */
async function findRecord(fh: FileHandle, from: number, end: number, minSeq: number): Promise<number> {
  const win = Buffer.allocUnsafeSlow(READ_CHUNK);
  let pos = from;
  while (end - pos >= HEADER) {
    const n = Math.min(win.length, end - pos);
    await readFully(fh, win, 0, n, pos);
    const view = win.subarray(0, n);
    for (let i = view.indexOf(MAGIC_BYTES); i !== -1; i = view.indexOf(MAGIC_BYTES, i + 1)) {
      const rec = await readRecord(new ChunkReader(fh, pos + i, end));
      if (rec !== null && typeof rec !== "string" && rec.seq >= minSeq) return pos + i;
    }
    if (pos + n >= end) break;
    pos += n - (MAGIC_BYTES.length - 1);
  }
  return -1;
}

async function readFully(fh: FileHandle, buf: Buffer, offset: number, length: number, position: number): Promise<void> {
  while (length > 0) {
    const { bytesRead } = await fh.read(buf, offset, length, position);
    if (bytesRead === 0) throw new Error(`journal: unexpected end of file at offset ${position}`);
    offset += bytesRead;
    length -= bytesRead;
    position += bytesRead;
  }
}

async function writeAllV(fh: FileHandle, bufs: Buffer[], position: number): Promise<void> {
  let left = 0;
  for (const b of bufs) left += b.length;
  while (left > 0) {
    const { bytesWritten } = await fh.writev(bufs, position);
    if (bytesWritten === 0) throw new Error("journal: write made no progress");
    left -= bytesWritten;
    position += bytesWritten;
    if (left === 0) return;
    let n = bytesWritten;
    let i = 0;
    while (n >= bufs[i]!.length) n -= bufs[i++]!.length;
    bufs = bufs.slice(i);
    bufs[0] = bufs[0]!.subarray(n);
  }
}

function segmentName(seq: number): string {
  return `${String(seq).padStart(20, "0")}.seg`;
}

function asBuffer(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

/** b itself, or a private copy when b is a small view pinning a much larger allocation (e.g. Node's 8 KiB pool). */
function ownedCopy(b: Buffer): Buffer {
  if (b.buffer.byteLength <= b.length * 2 + 4096) return b;
  const c = Buffer.allocUnsafeSlow(b.length);
  b.copy(c);
  return c;
}

function closeQuietly(fh: Promise<FileHandle>): void {
  fh.then((f) => f.close()).catch(() => {});
}

async function unlinkIfExists(path: string): Promise<void> {
  try {
    await unlink(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
}
