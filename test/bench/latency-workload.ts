// The small-writes workload of the latency benchmark and how its writes are
// recognised on the replica. A writer cycles over a few small files; each
// write is one 64-byte pwrite carrying a sequence number: most writes append
// a record, every fourth overwrites the file's header record in place. The
// writer notes when each write was made (monotonic clock) and the observer
// (latency-observer.ts) notes when its bytes, or a newer header, first show
// on the replica; latency is the difference.
import { closeSync, openSync, writeSync } from "node:fs";
import path from "node:path";
import { nowMs, sleep } from "./util.ts";

export const RECORD = 64;
export const FILES = 16;
const SEQ_DIGITS = 10;

export function fileName(i: number): string {
  return `rec-${String(i).padStart(2, "0")}.log`;
}

/** One record: kind ("H" header or "A" append), seq, padding, newline. */
export function encodeRecord(kind: "H" | "A", seq: number): Buffer {
  const head = `${kind}${String(seq).padStart(SEQ_DIGITS, "0")}|`;
  return Buffer.from(head.padEnd(RECORD - 1, kind === "H" ? "h" : "a") + "\n", "latin1");
}

/** The record at buf[off..off+64], or undefined if it is not (yet) a complete record. */
export function decodeRecord(buf: Buffer, off: number): { kind: "H" | "A"; seq: number } | undefined {
  if (off + RECORD > buf.length || buf[off + RECORD - 1] !== 0x0a || buf[off + 1 + SEQ_DIGITS] !== 0x7c) return undefined;
  const kind = String.fromCharCode(buf[off]!);
  if (kind !== "H" && kind !== "A") return undefined;
  const digits = buf.toString("latin1", off + 1, off + 1 + SEQ_DIGITS);
  if (!/^\d+$/.test(digits)) return undefined;
  return { kind, seq: Number(digits) };
}

export interface WriteLog {
  /** write time (nowMs) per seq; seqs start at 1 */
  at: Float64Array;
  /** file index per seq */
  file: Uint8Array;
  /** true when seq overwrote the header */
  header: Uint8Array;
  count: number;
  /** wall time the writer took, ms */
  elapsedMs: number;
}

/** Create the files (a header with seq 0 each) before the replicator starts. */
export function prepareFiles(dir: string): void {
  for (let f = 0; f < FILES; f++) {
    const fd = openSync(path.join(dir, fileName(f)), "w");
    writeSync(fd, encodeRecord("H", 0), 0, RECORD, 0);
    closeSync(fd);
  }
}

/** Which seq does what: every 4th write to each file overwrites its header, the others append. */
export function isHeaderWrite(seq: number): boolean {
  return Math.floor(seq / FILES) % 4 === 3;
}

/**
 * Make `rate` writes per second for `durationMs`, spread over FILES files,
 * each a single synchronous pwrite whose start time is logged.
 */
export async function runWriter(dir: string, rate: number, durationMs: number): Promise<WriteLog> {
  const n = Math.round((rate * durationMs) / 1000);
  const log: WriteLog = { at: new Float64Array(n + 1), file: new Uint8Array(n + 1), header: new Uint8Array(n + 1), count: n, elapsedMs: 0 };
  const fds: number[] = [];
  const appendAt: number[] = [];
  for (let f = 0; f < FILES; f++) {
    fds.push(openSync(path.join(dir, fileName(f)), "r+"));
    appendAt.push(RECORD);
  }
  try {
    const t0 = nowMs();
    let seq = 1;
    while (seq <= n) {
      const due = Math.min(n, Math.floor(((nowMs() - t0) * rate) / 1000) + 1);
      for (; seq <= due; seq++) {
        const f = seq % FILES;
        const header = isHeaderWrite(seq);
        const rec = encodeRecord(header ? "H" : "A", seq);
        const pos = header ? 0 : appendAt[f]!;
        log.at[seq] = nowMs();
        writeSync(fds[f]!, rec, 0, RECORD, pos);
        log.file[seq] = f;
        log.header[seq] = header ? 1 : 0;
        if (!header) appendAt[f]! += RECORD;
      }
      await sleep(1);
    }
    log.elapsedMs = nowMs() - t0;
  } finally {
    for (const fd of fds) closeSync(fd);
  }
  return log;
}

/** What the observer saw: first time per appended seq, and each new header value per file. */
export interface Observations {
  appendSeen: [seq: number, atMs: number][];
  headerSeen: [file: number, seq: number, atMs: number][];
  /** new-file workload: when each new file was first seen whole */
  newFileSeen: [seq: number, atMs: number][];
}

/**
 * Per-write latency: for an append, when its record first showed; for a
 * header overwrite, when the file's header first showed this seq or a newer
 * one (a later overwrite of the same bytes also carries this write's effect).
 */
export function latencies(log: WriteLog, obs: Observations, writerDoneAt: number): { ms: number[]; missing: number; seenWhileWriting: number } {
  const appendSeen = new Map(obs.appendSeen);
  const headers: [number, number][][] = Array.from({ length: FILES }, () => []);
  for (const [f, seq, at] of obs.headerSeen) headers[f]!.push([seq, at]);
  for (const h of headers) h.sort((a, b) => a[0] - b[0]);
  const ms: number[] = [];
  let missing = 0;
  let seenWhileWriting = 0;
  for (let seq = 1; seq <= log.count; seq++) {
    let seenAt: number | undefined;
    if (log.header[seq]) seenAt = headers[log.file[seq]!]!.find(([s]) => s >= seq)?.[1];
    else seenAt = appendSeen.get(seq);
    if (seenAt === undefined) missing++;
    else {
      ms.push(seenAt - log.at[seq]!);
      if (seenAt <= writerDoneAt) seenWhileWriting++;
    }
  }
  return { ms, missing, seenWhileWriting };
}

/** Seqs the replica must show for the run to be complete: all appends and each file's last header. */
export function expectedFinalState(log: WriteLog): { appends: number; lastHeader: number[] } {
  const lastHeader = new Array<number>(FILES).fill(0);
  let appends = 0;
  for (let seq = 1; seq <= log.count; seq++) {
    if (log.header[seq]) lastHeader[log.file[seq]!] = seq;
    else appends++;
  }
  return { appends, lastHeader };
}

// ---- new small files ----
//
// The second workload: new files at a steady rate, each created, written
// (NEW_FILE_BYTES) and closed by one synchronous open/write/close. A file
// counts as replicated when the replica has it whole.

export const NEW_DIR = "new";
export const NEW_FILE_BYTES = 1024;
const NEW_NAME = /^n-(\d{10})\.dat$/;

export function newFileName(seq: number): string {
  return `n-${String(seq).padStart(SEQ_DIGITS, "0")}.dat`;
}

/** The seq a replica file name stands for, or undefined. */
export function newFileSeq(name: string): number | undefined {
  const m = NEW_NAME.exec(name);
  return m ? Number(m[1]) : undefined;
}

/** A new file's content: its seq's record, repeated. */
export function newFileContent(seq: number): Buffer {
  const rec = encodeRecord("A", seq);
  return Buffer.concat(Array.from({ length: NEW_FILE_BYTES / RECORD }, () => rec));
}

/** True when buf is the whole content of new file seq. */
export function isWholeNewFile(buf: Buffer, seq: number): boolean {
  if (buf.length !== NEW_FILE_BYTES) return false;
  const last = decodeRecord(buf, NEW_FILE_BYTES - RECORD);
  return last?.seq === seq && decodeRecord(buf, 0)?.seq === seq;
}

export interface NewFileLog {
  /** create time (nowMs) per seq; seqs start at 1 */
  at: Float64Array;
  count: number;
  elapsedMs: number;
}

/** Create `rate` new files per second in dir for `durationMs`, each opened, written whole and closed. */
export async function runNewFileWriter(dir: string, rate: number, durationMs: number): Promise<NewFileLog> {
  const n = Math.round((rate * durationMs) / 1000);
  const log: NewFileLog = { at: new Float64Array(n + 1), count: n, elapsedMs: 0 };
  const t0 = nowMs();
  let seq = 1;
  while (seq <= n) {
    const due = Math.min(n, Math.floor(((nowMs() - t0) * rate) / 1000) + 1);
    for (; seq <= due; seq++) {
      const content = newFileContent(seq);
      log.at[seq] = nowMs();
      const fd = openSync(path.join(dir, newFileName(seq)), "wx");
      try {
        writeSync(fd, content, 0, content.length, 0);
      } finally {
        closeSync(fd);
      }
    }
    await sleep(1);
  }
  log.elapsedMs = nowMs() - t0;
  return log;
}
