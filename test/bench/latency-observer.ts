// The replica side of the latency benchmark, in a worker thread so that the
// writer's pacing and the observer's reads do not wait on each other. It
// watches the replica directory (inotify via fs.watch, plus a 20 ms poll as a
// safety net) and, each time a file may have changed, re-reads it and notes
// the first time every record (or header value) is seen. Times come from the
// same monotonic clock as the writer's (util.ts nowMs), so they compare.
import { readdirSync, readFileSync, watch, type FSWatcher } from "node:fs";
import path from "node:path";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { FILES, RECORD, decodeRecord, fileName, isWholeNewFile, newFileSeq, type Observations } from "./latency-workload.ts";
import { nowMs } from "./util.ts";

const POLL_MS = 20;
const ROLE = "latency-observer";

/** Listing the new-files directory as a safety net is costlier than re-reading 16 files: less often. */
const NEW_FILES_POLL_MS = 100;

type Request = { type: "progress" } | { type: "finish" };
export type Progress = { appends: number; headers: number[]; newFiles: number };
type Reply = { type: "ready" } | ({ type: "progress" } & Progress) | ({ type: "result" } & Observations) | { type: "error"; message: string };
type Mode = "records" | "new-files";

/** Handle on an observer thread watching `dir`. */
export class Observer {
  private readonly worker: Worker;
  private readonly replies: ((r: Reply) => void)[] = [];
  private failure?: Error;

  private constructor(worker: Worker) {
    this.worker = worker;
    worker.on("message", (r: Reply) => {
      if (r.type === "error") this.failure = new Error(`observer: ${r.message}`);
      this.replies.shift()?.(r);
    });
    worker.on("error", (e) => {
      this.failure = e;
      for (const f of this.replies.splice(0)) f({ type: "error", message: e.message });
    });
  }

  /** mode "records": the 16 record files in dir; "new-files": new files appearing in dir (latency-workload's new-file workload). */
  static async start(dir: string, mode: Mode = "records"): Promise<Observer> {
    const o = new Observer(new Worker(new URL(import.meta.url), { workerData: { role: ROLE, dir, mode } }));
    await o.next();
    return o;
  }

  private next(): Promise<Reply> {
    return new Promise((resolve, reject) => {
      if (this.failure) return reject(this.failure);
      this.replies.push((r) => (r.type === "error" ? reject(new Error(`observer: ${r.message}`)) : resolve(r)));
    });
  }

  async progress(): Promise<Progress> {
    const p = this.next();
    this.worker.postMessage({ type: "progress" } satisfies Request);
    const r = await p;
    if (r.type !== "progress") throw new Error(`observer answered ${r.type}`);
    return r;
  }

  /** Stop watching and return everything seen. */
  async finish(): Promise<Observations> {
    const p = this.next();
    this.worker.postMessage({ type: "finish" } satisfies Request);
    const r = await p;
    await this.worker.terminate();
    if (r.type !== "result") throw new Error(`observer answered ${r.type}`);
    return { appendSeen: r.appendSeen, headerSeen: r.headerSeen, newFileSeen: r.newFileSeen };
  }

  async kill(): Promise<void> {
    await this.worker.terminate();
  }
}

/** The worker's body for new files: note when each file is first seen whole. */
function observeNewFiles(dir: string): void {
  const port = parentPort!;
  const seen = new Map<number, number>();
  const check = (name: string) => {
    const seq = newFileSeq(name);
    if (seq === undefined || seen.has(seq)) return;
    let buf: Buffer;
    try {
      buf = readFileSync(path.join(dir, name));
    } catch {
      return; // not there yet
    }
    if (isWholeNewFile(buf, seq)) seen.set(seq, nowMs());
  };
  const scanAll = () => {
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      return;
    }
    for (const n of names) check(n);
  };
  let watcher: FSWatcher;
  try {
    watcher = watch(dir, (_event, name) => {
      if (name == null) scanAll();
      else check(name.toString());
    });
  } catch (e) {
    port.postMessage({ type: "error", message: `cannot watch ${dir}: ${(e as Error).message}` } satisfies Reply);
    return;
  }
  const poll = setInterval(scanAll, NEW_FILES_POLL_MS);
  scanAll();
  port.on("message", (m: Request) => {
    if (m.type === "progress") {
      port.postMessage({ type: "progress", appends: 0, headers: [], newFiles: seen.size } satisfies Reply);
    } else if (m.type === "finish") {
      scanAll();
      clearInterval(poll);
      watcher.close();
      port.postMessage({ type: "result", appendSeen: [], headerSeen: [], newFileSeen: [...seen] } satisfies Reply);
    }
  });
  port.postMessage({ type: "ready" } satisfies Reply);
}

/** The worker's body: watch, read, record. */
function observe(dir: string): void {
  const port = parentPort!;
  const appendSeen = new Map<number, number>();
  const headerSeen: [number, number, number][] = [];
  const lastHeader = new Array<number>(FILES).fill(-1);
  const parsedUpTo = new Array<number>(FILES).fill(RECORD);
  const byName = new Map<string, number>();
  for (let f = 0; f < FILES; f++) byName.set(fileName(f), f);

  const scan = (f: number) => {
    let buf: Buffer;
    try {
      buf = readFileSync(path.join(dir, fileName(f)));
    } catch {
      return; // not there yet, or being replaced
    }
    const at = nowMs();
    const h = decodeRecord(buf, 0);
    if (h?.kind === "H" && h.seq > lastHeader[f]!) {
      lastHeader[f] = h.seq;
      headerSeen.push([f, h.seq, at]);
    }
    let off = parsedUpTo[f]!;
    for (let r = decodeRecord(buf, off); r?.kind === "A"; r = decodeRecord(buf, off)) {
      if (!appendSeen.has(r.seq)) appendSeen.set(r.seq, at);
      off += RECORD;
    }
    parsedUpTo[f] = off;
  };
  const scanAll = () => {
    for (let f = 0; f < FILES; f++) scan(f);
  };

  let watcher: FSWatcher;
  try {
    watcher = watch(dir, (_event, name) => {
      const f = name == null ? undefined : byName.get(name.toString());
      if (f === undefined) scanAll();
      else scan(f);
    });
  } catch (e) {
    port.postMessage({ type: "error", message: `cannot watch ${dir}: ${(e as Error).message}` } satisfies Reply);
    return;
  }
  const poll = setInterval(scanAll, POLL_MS);
  scanAll();
  port.on("message", (m: Request) => {
    if (m.type === "progress") {
      port.postMessage({ type: "progress", appends: appendSeen.size, headers: [...lastHeader], newFiles: 0 } satisfies Reply);
    } else if (m.type === "finish") {
      scanAll();
      clearInterval(poll);
      watcher.close();
      port.postMessage({ type: "result", appendSeen: [...appendSeen], headerSeen, newFileSeen: [] } satisfies Reply);
    }
  });
  port.postMessage({ type: "ready" } satisfies Reply);
}

if (!isMainThread && (workerData as { role?: string } | null)?.role === ROLE) {
  const w = workerData as { dir: string; mode?: Mode };
  if (w.mode === "new-files") observeNewFiles(w.dir);
  else observe(w.dir);
}
