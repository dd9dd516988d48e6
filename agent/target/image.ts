// One replica image on a target: <root>/<source>/<set>, its applier, and the
// sequence numbers applied (after every packet, no fsync: survives kill -9)
// and durable (after fsync of the data: what is acknowledged).
import { constants } from "node:fs";
import { mkdir, open, readFile, rename, writeFile, type FileHandle } from "node:fs/promises";
import path from "node:path";
import { ApplierThread } from "./apply-thread.ts";

export class Image {
  readonly source: string;
  readonly set: string;
  readonly dir: string;
  /** Applies in a worker thread of its own (apply-thread.ts). */
  readonly applier: ApplierThread;
  appliedSeq = 0;
  durableSeq = 0;
  connected = false;
  /** When the source's last stream ended (ms since epoch; 0 = connected or never). */
  disconnectedAt = 0;
  lastError = "";
  /**
   * Journal the seqs belong to; an interrupted mirror's id and progress; the
   * fencing epoch, and whether this copy was promoted to primary at it.
   */
  meta: { journalId: string; mirrorId: string; mirrorDoneThrough: string; epoch: number; promoted: boolean } = { journalId: "", mirrorId: "", mirrorDoneThrough: "", epoch: 0, promoted: false };
  private metaPath = "";
  private readonly state: FileHandle;
  private turn: Promise<unknown> = Promise.resolve();
  private readonly buf = Buffer.alloc(16);

  private constructor(source: string, set: string, dir: string, state: FileHandle) {
    this.source = source;
    this.set = set;
    this.dir = dir;
    this.applier = new ApplierThread(dir);
    this.state = state;
  }

  /** `dir`: where the image lives (normally <root>/<source>/<set>). */
  static async open(dir: string, stateDir: string, source: string, set: string): Promise<Image> {
    await mkdir(dir, { recursive: true, mode: 0o755 });
    await mkdir(path.join(stateDir, source), { recursive: true, mode: 0o700 });
    const fh = await open(path.join(stateDir, source, `${set}.seq`), constants.O_RDWR | constants.O_CREAT, 0o600);
    const img = new Image(source, set, dir, fh);
    const { bytesRead } = await fh.read(img.buf, 0, 16, 0);
    if (bytesRead === 16) {
      img.appliedSeq = Number(img.buf.readBigUInt64LE(0));
      img.durableSeq = Number(img.buf.readBigUInt64LE(8));
      img.appliedSeq = Math.max(img.appliedSeq, img.durableSeq);
    }
    img.metaPath = path.join(stateDir, source, `${set}.json`);
    try {
      img.meta = { ...img.meta, ...(JSON.parse(await readFile(img.metaPath, "utf8")) as Partial<Image["meta"]>) };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    return img;
  }

  private async writeState(): Promise<void> {
    this.buf.writeBigUInt64LE(BigInt(this.appliedSeq), 0);
    this.buf.writeBigUInt64LE(BigInt(this.durableSeq), 8);
    await this.state.write(this.buf, 0, 16, 0);
  }

  /**
   * Run fn with the image to itself. Packets of one image are applied one at a
   * time even across streams: a stream being replaced may still be applying
   * when its successor starts.
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.turn.then(fn, fn);
    this.turn = run.catch(() => undefined);
    return run;
  }

  async saveMeta(m: Partial<Image["meta"]>): Promise<void> {
    this.meta = { ...this.meta, ...m };
    const tmp = `${this.metaPath}.tmp`;
    await writeFile(tmp, JSON.stringify(this.meta), { mode: 0o600 });
    await rename(tmp, this.metaPath);
  }

  /** A mirror finished: the image equals the source at `seq` of journal `journalId`. */
  async jumpTo(seq: number, journalId: string): Promise<void> {
    await this.applier.sync();
    this.appliedSeq = seq;
    this.durableSeq = seq;
    await this.writeState();
    await this.state.datasync();
    await this.saveMeta({ journalId, mirrorId: "", mirrorDoneThrough: "" });
  }

  /** Record that packet seq is fully applied (not yet durable). */
  async markApplied(seq: number): Promise<void> {
    this.appliedSeq = seq;
    await this.writeState();
  }

  /** fsync what was applied; returns the new durable seq. */
  async makeDurable(): Promise<number> {
    if (this.durableSeq >= this.appliedSeq) return this.durableSeq;
    const upto = this.appliedSeq;
    await this.applier.sync();
    this.durableSeq = upto;
    await this.writeState();
    await this.state.datasync();
    return upto;
  }

  async close(): Promise<void> {
    await this.makeDurable().catch(() => undefined);
    await this.applier.close();
    await this.state.close();
  }
}
