// One sender per (set, target): connects, says Hello, resumes after what the
// target has applied, streams journal entries in order within a window, and
// keeps them until the target acknowledges them durable. Any failure ends the
// stream; the sender reconnects with backoff and resends from the target's
// Welcome, so a lost packet is only ever resent, never skipped.
import * as grpc from "@grpc/grpc-js";
import { EventEmitter, once } from "node:events";
import type { Logger } from "../../common/log.ts";
import { Backoff, sleep } from "../../common/retry.ts";
import type { Journal } from "../queue/journal.ts";
import { AGENT_VERSION, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Nack_Reason, PacketStreamClient, versionMismatch, type TargetMessage } from "../wire.ts";

const WINDOW_PACKETS = 512;
const WINDOW_BYTES = 64 * 1024 * 1024;
const WELCOME_TIMEOUT_MS = 10_000;
/** Failures in a row before the target counts as degraded (not just reconnecting). */
const DEGRADED_AFTER = 3;

export type SenderState = "connecting" | "replicating" | "idle" | "degraded" | "refused" | "needs-mirror" | "stopped";

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
}

/** Token bucket for the bandwidth limit (one second of burst). */
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
      if (this.tokens >= Math.min(n, this.rate) || signal.aborted) {
        this.tokens -= n;
        return;
      }
      await sleep(Math.ceil(((Math.min(n, this.rate) - this.tokens) / this.rate) * 1000), signal);
    }
  }
}

export class Sender {
  state: SenderState = "connecting";
  lastSentSeq = 0;
  lastAckedSeq: number;
  lastError = "";
  retries = 0;
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

  start(): void {
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
        if (this.state !== "refused" && this.state !== "needs-mirror") this.state = backoff.failures + 1 >= DEGRADED_AFTER ? "degraded" : "connecting";
        this.log.warn({ err: this.lastError, state: this.state, retries: this.retries }, "replication stream ended");
      }
      await sleep(backoff.next(), this.abort.signal);
    }
  }

  private async session(backoff: Backoff): Promise<void> {
    const client = new PacketStreamClient(this.o.address, this.o.credentials, {
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
        } else fail(new Error(`target ${n.reason === Nack_Reason.REASON_REJECTED ? "refused" : "could not apply"} packet ${n.expectedSeq}: ${n.message}`));
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
      call.write({ msg: { $case: "hello", value: { protocolVersion: PROTOCOL_VERSION, agentVersion: AGENT_VERSION, source: this.o.source, set: this.o.set, journalFirstSeq: journal.firstSeq } } });
      const deadline = Date.now() + WELCOME_TIMEOUT_MS;
      while (!welcome && !failure && !this.abort.signal.aborted && Date.now() < deadline) await waitWake(deadline - Date.now());
      if (failure) {
        if (/protocol version mismatch/.test(failure.message)) this.state = "refused";
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
      if (cursor < journal.firstSeq) {
        this.state = "needs-mirror";
        throw new Error(`target has applied up to ${w.appliedSeq} but the journal starts at ${journal.firstSeq}: the target needs a mirror`);
      }
      this.log.info({ resumeAt: cursor, journalLast: journal.lastSeq, targetName: w.target }, "replicating");
      this.state = "replicating";
      this.lastError = "";
      while (!failure && !this.abort.signal.aborted) {
        const upTo = Math.min(journal.lastSeq, this.sendUpTo);
        if (cursor <= upTo && inflight.length < WINDOW_PACKETS && inflightBytes < WINDOW_BYTES) {
          const e = await journal.read(cursor);
          if (!e) {
            this.state = "needs-mirror";
            throw new Error(`journal entry ${cursor} is gone (journal starts at ${journal.firstSeq}): the target needs a mirror`);
          }
          await this.throttle.take(e.payload.length, this.abort.signal);
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
        this.state = cursor > journal.lastSeq && this.lastAckedSeq >= journal.lastSeq ? "idle" : "replicating";
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
