// The worker thread of an ApplierThread (apply-thread.ts): one Applier,
// requests applied strictly in the order they came.
import { parentPort, workerData } from "node:worker_threads";
import { Applier, PathError } from "./applier.ts";
import type { ApplyReply, ApplyRequest } from "./apply-thread.ts";

const { imageRoot, canChown } = workerData as { imageRoot: string; canChown?: boolean };
const applier = new Applier(imageRoot, { canChown });
const port = parentPort!;
let turn: Promise<void> = Promise.resolve();

async function run(m: ApplyRequest): Promise<void> {
  switch (m.kind) {
    case "apply":
      return applier.apply(m.ops ?? []);
    case "applyConcurrently":
      return applier.applyConcurrently(m.ops ?? []);
    case "sync":
      return applier.sync();
    case "close":
      return applier.close();
  }
}

port.on("message", (m: ApplyRequest) => {
  turn = turn.then(async () => {
    let reply: ApplyReply;
    try {
      await run(m);
      reply = { id: m.id };
    } catch (e) {
      const err = e as Error & { code?: unknown };
      reply = { id: m.id, error: { message: err.message ?? String(e), code: typeof err.code === "string" ? err.code : undefined, refused: e instanceof PathError } };
    }
    port.postMessage(reply);
  });
});
