// The applier of one image in a worker thread of its own. Applying is
// system calls made one after another (applier.ts makes them synchronously);
// in a thread of its own they no longer hold up the target's event loop,
// which meanwhile receives and decodes the next batch, answers listings and
// sends acks: receiving and applying overlap, on two cores. Images are
// applied side by side, one thread each. The thread applies requests in the
// order they are made, as the Applier itself does; an error comes back as
// the same kind (PathError: a refused path) with its message and code.
import { Worker } from "node:worker_threads";
import { PathError } from "../fs/confine.ts";
import type { Op } from "../wire.ts";

export type ApplyRequest = { id: number; kind: "apply" | "applyConcurrently" | "sync" | "close"; ops?: Op[] };
export type ApplyReply = { id: number; error?: { message: string; code?: string; refused: boolean } };

/**
 * The write data of ops, copied into one fresh buffer that is then handed
 * over to the thread (moved, not copied again). The data of decoded ops are
 * views into the received message, and cloning a view would copy all of the
 * buffer under it.
 */
function packed(ops: Op[]): { ops: Op[]; transfer: ArrayBuffer[] } {
  let total = 0;
  for (const op of ops) if (op.kind?.$case === "write") total += op.kind.value.data.byteLength;
  const all = Buffer.allocUnsafeSlow(total); // (its own ArrayBuffer, not the shared pool's: it is moved away)
  let at = 0;
  const out = ops.map((op): Op => {
    const k = op.kind;
    if (k && k.$case !== "write" && "attr" in k.value && k.value.attr?.xattrs.length) {
      // Xattr values are views too: each gets a buffer of its own (small).
      const xattrs = k.value.attr.xattrs.map((x) => {
        const value = Buffer.allocUnsafeSlow(x.value.byteLength);
        value.set(x.value);
        return { ...x, value };
      });
      return { ...op, kind: { ...k, value: { ...k.value, attr: { ...k.value.attr, xattrs } } } } as Op;
    }
    if (op.kind?.$case !== "write") return op;
    const d = op.kind.value.data;
    all.set(d, at);
    const data = all.subarray(at, at + d.byteLength);
    at += d.byteLength;
    return { ...op, kind: { $case: "write", value: { ...op.kind.value, data } } };
  });
  return { ops: out, transfer: total ? [all.buffer as ArrayBuffer] : [] };
}

export class ApplierThread {
  private readonly worker: Worker;
  private next = 1;
  private readonly waiting = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  private dead?: Error;

  constructor(imageRoot: string, opts: { canChown?: boolean } = {}) {
    this.worker = new Worker(new URL("./apply-worker.ts", import.meta.url), { workerData: { imageRoot, canChown: opts.canChown } });
    this.worker.unref(); // (the agent's server keeps the process alive; a pending request refs nothing)
    this.worker.on("message", (r: ApplyReply) => {
      const w = this.waiting.get(r.id);
      if (!w) return;
      this.waiting.delete(r.id);
      if (!r.error) return w.resolve();
      const e = r.error.refused ? new PathError(r.error.message) : Object.assign(new Error(r.error.message), r.error.code ? { code: r.error.code } : {});
      w.reject(e);
    });
    this.worker.on("error", (e) => this.fail(e));
    this.worker.on("exit", (code) => this.fail(new Error(`the applier thread of ${imageRoot} exited (code ${code})`)));
  }

  private fail(e: Error): void {
    this.dead ??= e;
    for (const w of this.waiting.values()) w.reject(e);
    this.waiting.clear();
  }

  private call(kind: ApplyRequest["kind"], ops?: Op[]): Promise<void> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.next++;
    const p = ops ? packed(ops) : { ops: undefined, transfer: [] };
    return new Promise<void>((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.worker.postMessage({ id, kind, ops: p.ops } satisfies ApplyRequest, p.transfer);
    });
  }

  apply(ops: Op[]): Promise<void> {
    return this.call("apply", ops);
  }

  applyConcurrently(ops: Op[]): Promise<void> {
    return this.call("applyConcurrently", ops);
  }

  /** Make durable everything applied so far. */
  sync(): Promise<void> {
    return this.call("sync");
  }

  async close(): Promise<void> {
    try {
      if (!this.dead) await this.call("close");
    } finally {
      this.dead ??= new Error("applier closed");
      await this.worker.terminate();
    }
  }
}
