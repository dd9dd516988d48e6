// One sender per (set, target): connects, says Hello, resumes after what the
// target has applied, streams journal entries in order within a window, and
// keeps them until the target acknowledges them durable. Any failure ends the
// stream; the sender reconnects with backoff and resends from the target's
// Welcome, so a lost packet is only ever resent, never skipped.
import { CHANGE_DIGEST } from "./blocks.ts";
import * as grpc from "@grpc/grpc-js";
import { EventEmitter, once } from "node:events";
import type { Logger } from "../../common/log.ts";
import { dialOptions } from "../../common/tls.ts";
import { Backoff, sleep } from "../../common/retry.ts";
import type { Journal } from "../queue/journal.ts";
import { randomUUID } from "node:crypto";
import { AGENT_VERSION, MAX_MESSAGE_BYTES, encodeMirrorOps, markFramable, PROTOCOL_VERSION, Nack_Reason, PacketStreamClient, versionMismatch, type MirrorProgress, type Op, type ReplicationStreamClient, type TargetMessage, type Welcome } from "../wire.ts";
import { Mirror, type MirrorMode, type MirrorSource, type MirrorTarget } from "../mirror/mirror.ts";

const WINDOW_PACKETS = 512;
const WINDOW_BYTES = 64 * 1024 * 1024;
const WELCOME_TIMEOUT_MS = 10_000;
/** Failures in a row before the target counts as degraded (not just reconnecting). */
const DEGRADED_AFTER = 3;

export type SenderState = "connecting" | "replicating" | "idle" | "mirroring" | "degraded" | "refused" | "stopped";

/** A mirror in progress, persisted by the source so a restart can resume it. */
export interface MirrorState {
  mirrorId: string;
  pStart: number;
  mode: MirrorMode;
}

export interface MirrorHost {
  source: MirrorSource;
  blockSize: number;
  load(): Promise<MirrorState | undefined>;
  save(s: MirrorState | undefined): Promise<void>;
}

interface MirrorRequest {
  mode: MirrorMode;
  reason: string;
  /** repair: only these directories (the target first catches up to the start) */
  dirs?: string[];
  done?: (err?: Error) => void;
}

/** Failures a mirror cannot cure: the target must get space, rights or a working disk first. */
const RESOURCE_ERROR = /ENOSPC|EDQUOT|EIO|EROFS|EACCES|EPERM|EMFILE|ENFILE|ENOMEM/;

/** Failures of the same seq in a row before the target is resynchronised by a checksum mirror. */
const RESYNC_AFTER_REFUSALS = 3;

export function emptyProgress(): MirrorProgress {
  return { active: false, mode: "", filesDone: 0, filesTotal: 0, bytesDone: 0, bytesTotal: 0, bytesSent: 0, rateBytesPerSecond: 0, etaSeconds: 0, startedAt: 0, finishedAt: 0, result: "", resumed: false };
}

export interface SenderOptions {
  address: string;
  source: string;
  set: string;
  credentials: grpc.ChannelCredentials;
  journal: Journal;
  log: Logger;
  /** bytes per second, 0 = unlimited */
  bandwidth: number;
  /** scheduled mode: ship what accumulated every this many ms */
  intervalMs?: number;
  /** called with each new acknowledged seq */
  onAck: (seq: number) => void;
  /** seq the target acknowledged before a restart */
  initialAcked: number;
  journalId: string;
  /** fencing epoch, sent in Hello */
  epoch: number;
  mirror: MirrorHost;
}

/**
 * Token bucket for the bandwidth limit, with one second of burst. A packet may
 * leave when the bucket holds a second's worth (or the packet, if smaller) and
 * can drive it into debt; capture keeps packets to a fraction of a second's
 * worth when a limit is set (see packetDataLimit), so the average holds.
 */
class Throttle {
  private tokens: number;
  private last = Date.now();
  private readonly rate: number;
  constructor(rate: number) {
    this.rate = rate;
    this.tokens = rate;
  }
  async take(n: number, signal: AbortSignal): Promise<void> {
    if (this.rate <= 0) return;
    for (;;) {
      const now = Date.now();
      this.tokens = Math.min(this.rate, this.tokens + ((now - this.last) / 1000) * this.rate);
      this.last = now;
      const need = Math.min(n, this.rate);
      if (this.tokens >= need || signal.aborted) {
        this.tokens -= n;
        return;
      }
      await sleep(Math.ceil(((need - this.tokens) / this.rate) * 1000), signal);
    }
  }
}

interface StreamCtx {
  call: ReturnType<ReplicationStreamClient["replicate"]>;
  client: ReplicationStreamClient;
  welcome: Welcome;
  mirrorAcks: { inflight: number; acked: number; done: boolean };
  failed: () => Error | undefined;
  waitWake: (ms?: number) => Promise<void>;
}

const MIRROR_WINDOW = 4;

export class Sender {
  state: SenderState = "connecting";
  lastSentSeq = 0;
  lastAckedSeq: number;
  lastError = "";
  retries = 0;
  mirror: MirrorProgress = emptyProgress();
  private pending?: MirrorRequest;
  private mirrorState?: MirrorState;
  private refusals = { seq: 0, count: 0 };
  private readonly o: SenderOptions;
  private readonly log: Logger;
  private readonly abort = new AbortController();
  private readonly wake = new EventEmitter();
  private readonly throttle: Throttle;
  private sendUpTo = Number.MAX_SAFE_INTEGER;
  private running?: Promise<void>;
  private ticker?: NodeJS.Timeout;

  constructor(o: SenderOptions) {
    this.o = o;
    this.log = o.log.child({ target: o.address });
    this.lastAckedSeq = o.initialAcked;
    this.throttle = new Throttle(o.bandwidth);
    this.wake.setMaxListeners(0);
  }

  /** Lowest journal seq this target may still need (nothing from it on may be released). */
  holdFrom(): number {
    if (this.mirrorState) return Math.min(this.mirrorState.pStart + 1, this.lastAckedSeq + 1);
    return this.lastAckedSeq + 1;
  }

  /** Ask for a mirror (all of the set, or only `dirs` for a repair); resolves when it is done. */
  requestMirror(mode: MirrorMode, reason: string, dirs?: string[]): Promise<void> {
    return new Promise((resolve, reject) => {
      const prev = this.pending;
      this.pending = { mode, reason, dirs, done: (e) => (e ? reject(e) : resolve()) };
      prev?.done?.(new Error("superseded by another mirror request"));
      this.wake.emit("wake");
    });
  }

  async start(): Promise<void> {
    this.mirrorState = await this.o.mirror.load();
    const onAppend = () => this.wake.emit("wake");
    this.o.journal.events.on("append", onAppend);
    this.abort.signal.addEventListener("abort", () => this.o.journal.events.off("append", onAppend));
    if (this.o.intervalMs) {
      this.sendUpTo = 0;
      this.ticker = setInterval(() => this.flushNow(), this.o.intervalMs);
    }
    this.running = this.loop();
  }

  /** Scheduled mode: ship everything journaled so far, now. */
  flushNow(): void {
    this.sendUpTo = this.o.journal.lastSeq;
    this.wake.emit("wake");
  }

  async stop(): Promise<void> {
    this.abort.abort();
    this.pending?.done?.(new Error("agent stopping"));
    if (this.ticker) clearInterval(this.ticker);
    this.wake.emit("wake");
    await this.running;
    this.state = "stopped";
  }

  private async loop(): Promise<void> {
    const backoff = new Backoff({ initialMs: 250, maxMs: 15_000 });
    while (!this.abort.signal.aborted) {
      try {
        await this.session(backoff);
      } catch (e) {
        if (this.abort.signal.aborted) break;
        this.lastError = (e as Error).message;
        this.retries++;
        if (this.mirror.active) {
          this.mirror.active = false;
          this.mirror.result = `interrupted: ${this.lastError}`;
        }
        if (this.state !== "refused") this.state = backoff.failures + 1 >= DEGRADED_AFTER ? "degraded" : "connecting";
        this.log.warn({ err: this.lastError, state: this.state, retries: this.retries }, "replication stream ended");
      }
      await sleep(backoff.next(), this.abort.signal);
    }
  }

  /**
   * Mirror the set (or, for a repair, some directories) to the target over this
   * stream; returns the journal position the image now stands at.
   */
  private async runMirror(ctx: StreamCtx, req: MirrorRequest, repairFrom = 0): Promise<number> {
    const { call, client, welcome: w } = ctx;
    const src = this.o.mirror.source;
    const resumable = !req.dirs && this.mirrorState && w.mirrorId === this.mirrorState.mirrorId && this.mirrorState.pStart + 1 >= this.o.journal.firstSeq;
    let state: MirrorState;
    if (resumable) state = this.mirrorState!;
    else {
      const pStart = req.dirs ? repairFrom : await src.serial(async () => (await src.flushCapture(), src.lastSeq()));
      state = { mirrorId: randomUUID(), pStart, mode: req.mode };
      if (!req.dirs) {
        this.mirrorState = state;
        await this.o.mirror.save(state);
      }
    }
    this.state = "mirroring";
    this.mirror = { ...emptyProgress(), active: true, mode: state.mode, startedAt: Date.now() / 1000 };
    this.log.info({ mode: state.mode, reason: req.reason, resumeAfter: resumable ? w.mirrorDoneThrough : undefined, dirs: req.dirs?.length }, "mirror starting");
    const deadline = () => ({ deadline: Date.now() + 120_000 });
    const unary = <Q, R>(fn: (q: Q, md: grpc.Metadata, o: Partial<grpc.CallOptions>, cb: (e: grpc.ServiceError | null, r?: R) => void) => unknown, q: Q) =>
      new Promise<R>((resolve, reject) => fn.call(client, q, new grpc.Metadata(), deadline(), (e, r) => (e ? reject(new Error(e.details || e.message)) : resolve(r!))));
    let batch = 0;
    const check = () => {
      const f = ctx.failed();
      if (f) throw f;
      if (this.abort.signal.aborted) throw new Error("stopping");
    };
    // Batches of this mirror the target has applied (it acknowledges each, in order, once applied).
    const ackedBefore = ctx.mirrorAcks.acked;
    const applied = () => ctx.mirrorAcks.acked - ackedBefore;
    // Listings and digests show the target as it is: the mirror asks for them
    // only once the batches that could change them are applied (waitApplied).
    const target: MirrorTarget = {
      manifest: (dir, digestMaxBlocks) => unary(client.manifest, { source: this.o.source, set: this.o.set, dir, blockSize: this.o.mirror.blockSize, digestMaxBlocks, digestAlgo: CHANGE_DIGEST }),
      digests: (p) => unary(client.digests, { source: this.o.source, set: this.o.set, path: p, blockSize: this.o.mirror.blockSize, digestAlgo: CHANGE_DIGEST }),
      applied,
      waitApplied: async (n) => {
        while (applied() < n) {
          check();
          await ctx.waitWake(1000);
        }
      },
      send: async (ops: Op[], doneThrough: string) => {
        check();
        let bytes = 0;
        for (const op of ops) if (op.kind?.$case === "write") bytes += op.kind.value.data.length;
        await this.throttle.take(bytes, this.abort.signal);
        ctx.mirrorAcks.inflight++;
        const ok = call.write(encodeMirrorOps(state.mirrorId, ops, doneThrough, ++batch));
        if (!ok) {
          const ac = new AbortController();
          await Promise.race([once(call, "drain", { signal: ac.signal }).catch(() => undefined), ctx.waitWake()]);
          ac.abort();
        }
        while (ctx.mirrorAcks.inflight >= MIRROR_WINDOW) {
          check();
          await ctx.waitWake(1000);
        }
      },
      done: async (seq) => {
        check();
        ctx.mirrorAcks.done = false;
        call.write({ msg: { $case: "mirrorDone", value: { mirrorId: state.mirrorId, appliedSeq: seq, journalId: this.o.journalId } } });
        while (!ctx.mirrorAcks.done) {
          check();
          await ctx.waitWake(1000);
        }
      },
    };
    const m = new Mirror(src, target, { mode: state.mode, pStart: state.pStart, resumeAfter: resumable ? w.mirrorDoneThrough : undefined, onlyDirs: req.dirs, progress: this.mirror, signal: this.abort.signal });
    try {
      const end = await m.run();
      this.mirror.active = false;
      this.mirror.result = "ok";
      this.lastAckedSeq = Math.max(this.lastAckedSeq, end);
      this.o.onAck(end);
      this.mirrorState = undefined;
      await this.o.mirror.save(undefined);
      this.refusals = { seq: 0, count: 0 };
      if (this.pending === req) this.pending = undefined;
      req.done?.();
      this.state = "replicating";
      this.log.info({ end, filesDone: this.mirror.filesDone, bytesSent: this.mirror.bytesSent, seconds: this.mirror.finishedAt - this.mirror.startedAt }, "mirror complete");
      return end;
    } catch (e) {
      this.mirror.active = false;
      this.mirror.result = `interrupted: ${(e as Error).message}`;
      throw e;
    }
  }

  private async session(backoff: Backoff): Promise<void> {
    const client = new PacketStreamClient(this.o.address, this.o.credentials, {
      ...dialOptions(this.o.address),
      "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
      "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
      "grpc.keepalive_time_ms": 5_000,
      "grpc.keepalive_timeout_ms": 5_000,
      "grpc.keepalive_permit_without_calls": 1,
      "grpc.initial_reconnect_backoff_ms": 200,
    });
    const call = client.replicate();
    const { journal } = this.o;
    let failure: Error | undefined;
    let welcome: TargetMessage["msg"] & { $case: "welcome" } | undefined;
    let cursor = 0;
    const mirrorAcks = { inflight: 0, acked: 0, done: false };
    const inflight: [number, number][] = [];
    let inflightBytes = 0;
    const fail = (e: Error) => {
      failure ??= e;
      this.wake.emit("wake");
    };
    call.on("data", (m: TargetMessage) => {
      const msg = m.msg;
      if (!msg) return;
      if (msg.$case === "welcome") {
        welcome = msg;
      } else if (msg.$case === "mirrorAck") {
        if (msg.value.done) mirrorAcks.done = true;
        else {
          mirrorAcks.inflight--;
          mirrorAcks.acked++;
        }
      } else if (msg.$case === "ack") {
        const seq = msg.value.seq;
        while (inflight.length && inflight[0]![0] <= seq) inflightBytes -= inflight.shift()![1];
        if (seq > this.lastAckedSeq) {
          this.lastAckedSeq = seq;
          this.o.onAck(seq);
        }
        backoff.reset();
      } else if (msg.$case === "nack") {
        const n = msg.value;
        if (n.reason === Nack_Reason.REASON_GAP) {
          this.log.warn({ expected: n.expectedSeq, sent: this.lastSentSeq }, "target reports a gap; resending");
          cursor = n.expectedSeq;
          inflight.length = 0;
          inflightBytes = 0;
        } else {
          // The same packet failing again and again (refused, or failing for a reason a
          // resync can cure: the image is not what the journal expects) → checksum mirror.
          const curable = n.reason === Nack_Reason.REASON_REJECTED || !RESOURCE_ERROR.test(n.message);
          if (curable && n.expectedSeq > 0) {
            this.refusals = this.refusals.seq === n.expectedSeq ? { seq: n.expectedSeq, count: this.refusals.count + 1 } : { seq: n.expectedSeq, count: 1 };
            if (this.refusals.count >= RESYNC_AFTER_REFUSALS && !this.pending) {
              this.log.error({ seq: n.expectedSeq, err: n.message }, "packet failed repeatedly; resynchronising with a checksum mirror");
              this.pending = { mode: "checksum", reason: `packet ${n.expectedSeq} failed ${this.refusals.count} times: ${n.message}` };
            }
          }
          fail(new Error(n.expectedSeq > 0 ? `target ${n.reason === Nack_Reason.REASON_REJECTED ? "refused" : "could not apply"} packet ${n.expectedSeq}: ${n.message}` : n.message));
        }
      }
      this.wake.emit("wake");
    });
    call.on("error", (e: grpc.ServiceError) => fail(new Error(e.details || e.message)));
    call.on("end", () => fail(new Error("target closed the stream")));
    const waitWake = async (ms?: number) => {
      const ac = new AbortController();
      const p = once(this.wake, "wake", { signal: ac.signal }).catch(() => undefined);
      await (ms ? Promise.race([p, sleep(ms)]) : p);
      ac.abort();
    };
    try {
      call.write({ msg: { $case: "hello", value: { protocolVersion: PROTOCOL_VERSION, agentVersion: AGENT_VERSION, source: this.o.source, set: this.o.set, journalFirstSeq: journal.firstSeq, journalId: this.o.journalId, epoch: this.o.epoch } } });
      const deadline = Date.now() + WELCOME_TIMEOUT_MS;
      while (!welcome && !failure && !this.abort.signal.aborted && Date.now() < deadline) await waitWake(deadline - Date.now());
      if (failure) {
        if (/protocol version mismatch|fenced:/.test(failure.message)) this.state = "refused";
        throw failure;
      }
      if (this.abort.signal.aborted) return;
      if (!welcome) throw new Error(`no Welcome from target within ${WELCOME_TIMEOUT_MS / 1000}s`);
      const w = welcome.value;
      if (w.protocolVersion !== PROTOCOL_VERSION) {
        this.state = "refused";
        throw new Error(versionMismatch(PROTOCOL_VERSION, w.protocolVersion, `target ${w.target} (agent ${w.agentVersion})`));
      }
      cursor = w.appliedSeq + 1;
      const ctx: StreamCtx = { call, client, welcome: w, mirrorAcks, failed: () => failure, waitWake };
      const why = w.journalId !== this.o.journalId ? (w.journalId ? "the image was built from another journal" : "new image") : cursor < journal.firstSeq ? `the journal no longer holds entries from ${cursor}` : w.appliedSeq > journal.lastSeq ? "the image is ahead of the journal" : undefined;
      if (this.pending && !this.pending.dirs) {
        cursor = (await this.runMirror(ctx, this.pending)) + 1;
      } else if (why || this.mirrorState) {
        cursor = (await this.runMirror(ctx, { mode: this.mirrorState?.mode ?? "checksum", reason: why ?? "resuming an interrupted mirror" })) + 1;
      }
      this.log.info({ resumeAt: cursor, journalLast: journal.lastSeq, targetName: w.target }, "replicating");
      this.state = "replicating";
      this.lastError = "";
      let repairFrom = 0;
      while (!failure && !this.abort.signal.aborted) {
        if (this.pending) {
          // A mirror asked for while streaming: a whole one stops sending now; a
          // repair first lets the target catch up to where it starts.
          const req = this.pending;
          if (!repairFrom) repairFrom = req.dirs ? await this.o.mirror.source.serial(async () => (await this.o.mirror.source.flushCapture(), journal.lastSeq)) : Math.max(this.lastSentSeq, cursor - 1);
          if (cursor > repairFrom && this.lastAckedSeq >= repairFrom) {
            cursor = (await this.runMirror(ctx, req, repairFrom)) + 1;
            repairFrom = 0;
            continue;
          }
        }
        const upTo = repairFrom ? Math.min(journal.lastSeq, repairFrom) : Math.min(journal.lastSeq, this.sendUpTo);
        if (cursor <= upTo && inflight.length < WINDOW_PACKETS && inflightBytes < WINDOW_BYTES) {
          const e = await journal.read(cursor);
          if (!e) {
            this.pending ??= { mode: "checksum", reason: `journal entry ${cursor} is gone` };
            throw new Error(`journal entry ${cursor} is gone (journal starts at ${journal.firstSeq}); resynchronising with a mirror`);
          }
          await this.throttle.take(e.payload.length, this.abort.signal);
          // Read from disk: the packet is framed in the record header's place instead of copied.
          if (e.headroom) markFramable(e.payload, e.headroom);
          const ok = call.write(e.payload);
          inflight.push([cursor, e.payload.length]);
          inflightBytes += e.payload.length;
          this.lastSentSeq = cursor++;
          if (!ok) {
            // Wait for the stream to drain (or for a failure/stop), without leaving listeners behind.
            const ac = new AbortController();
            await Promise.race([once(call, "drain", { signal: ac.signal }).catch(() => undefined), waitWake()]);
            ac.abort();
          }
          continue;
        }
        this.state = cursor > journal.lastSeq && this.lastAckedSeq >= journal.lastSeq && !this.pending ? "idle" : "replicating";
        await waitWake(1000);
      }
      if (failure) throw failure;
    } finally {
      call.removeAllListeners("data");
      call.on("error", () => undefined);
      call.cancel();
      client.close();
    }
  }
}
