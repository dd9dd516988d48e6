// A hostile replication source for the security tests: a raw gRPC client of
// the Replication service that can send anything — well-formed Hellos and
// packets, packets with arbitrary (unchecked) paths, raw bytes that are not
// protobuf at all — and records every TargetMessage and the final status.
import * as grpc from "@grpc/grpc-js";
import { AGENT_VERSION, Nack_Reason, PROTOCOL_VERSION, PacketStreamClient, ReplicationService, SourceMessage, TargetMessage, encodePacket, encodePacketBytes, framePacket, type Op, type Packet } from "../../agent/wire.ts";

type Duplex = grpc.ClientDuplexStream<SourceMessage | Buffer, TargetMessage>;
type Ctor = new (address: string, credentials: grpc.ChannelCredentials, options?: Partial<grpc.ClientOptions>) => grpc.Client & { replicate(options?: Partial<grpc.CallOptions>): Duplex };

/** Like PacketStreamClient, but a Buffer is sent as-is: the whole SourceMessage, possibly garbage. */
const RawStreamClient = grpc.makeGenericClientConstructor(
  {
    replicate: {
      ...ReplicationService.replicate,
      requestSerialize: (v: SourceMessage | Buffer): Buffer => (Buffer.isBuffer(v) ? v : Buffer.from(SourceMessage.encode(v).finish())),
    },
  },
  "understudy.v1.Replication",
) as unknown as Ctor;

export type Kind = "welcome" | "ack" | "nack";
export type MsgOf<K extends Kind> = Extract<NonNullable<TargetMessage["msg"]>, { $case: K }>["value"];

export interface End {
  code: grpc.status;
  details: string;
}

export interface OpenOptions {
  credentials?: grpc.ChannelCredentials;
  /** Buffers written are whole SourceMessages (raw bytes), not pre-encoded Packets. */
  raw?: boolean;
}

type HelloMsg = Extract<NonNullable<SourceMessage["msg"]>, { $case: "hello" }>["value"];

/** A Hello with every field at its default (whatever fields the protocol has grown). */
function helloDefaults(): HelloMsg {
  const m = SourceMessage.decode(Buffer.from([0x0a, 0x00])).msg; // field 1 (hello), empty
  if (m?.$case !== "hello") throw new Error("cannot build an empty Hello");
  return m.value;
}

const open = new Set<HostileSession>();

/** One Replicate call. */
export class HostileSession {
  readonly messages: TargetMessage[] = [];
  end?: End;
  private cursor = 0;
  private readonly raw: boolean;
  private readonly client: grpc.Client;
  private readonly call: Duplex;
  private wake: () => void = () => {};

  constructor(address: string, o: OpenOptions = {}) {
    this.raw = o.raw ?? false;
    const Client = (this.raw ? RawStreamClient : PacketStreamClient) as Ctor;
    const client = new Client(address, o.credentials ?? grpc.credentials.createInsecure(), { "grpc.initial_reconnect_backoff_ms": 100 });
    this.client = client;
    this.call = client.replicate({ deadline: Date.now() + 30_000 });
    this.call.on("data", (m: TargetMessage) => {
      this.messages.push(m);
      this.wake();
    });
    const done = (e: End) => {
      this.end ??= { code: e.code, details: e.details ?? "" };
      this.wake();
    };
    this.call.on("error", (e: grpc.ServiceError) => done(e));
    this.call.on("status", (s: grpc.StatusObject) => done(s));
    open.add(this);
  }

  /** Write a SourceMessage, or a Buffer (pre-encoded Packet; with `raw`, arbitrary bytes). */
  write(m: SourceMessage | Buffer): void {
    if (this.end) return;
    try {
      this.call.write(m);
    } catch {
      /* the call is already gone; the outcome is in `end` */
    }
  }

  hello(source: string, set: string, over: Partial<HelloMsg> = {}): void {
    this.write({ msg: { $case: "hello", value: { ...helloDefaults(), protocolVersion: PROTOCOL_VERSION, agentVersion: AGENT_VERSION, journalFirstSeq: 1, ...over, source, set } } });
  }

  /** Send ops as packet `seq`, uncompressed, exactly as given (no path checks on this side). */
  packet(seq: number, ops: Op[]): void {
    this.rawPacket(encodePacket(seq, ops, "none"));
  }

  rawPacket(p: Packet): void {
    const bytes = encodePacketBytes(p);
    this.write(this.raw ? framePacket(bytes) : bytes);
  }

  /** Half-close: the target sees the end of the request stream. */
  finish(): void {
    try {
      this.call.end();
    } catch {
      /* already closed */
    }
  }

  private async waitUntil<T>(what: string, probe: () => T | undefined, timeoutMs: number): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const v = probe();
      if (v !== undefined) return v;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; got ${this.describe()}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.min(left, 200));
        this.wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
  }

  /**
   * The next message of kind `kind`. Acks in between are skipped (the target
   * acknowledges on its own timer); any other kind in between fails.
   */
  async next<K extends Kind>(kind: K, timeoutMs = 30_000): Promise<MsgOf<K>> {
    return this.waitUntil(kind, () => {
      while (this.cursor < this.messages.length) {
        const m = this.messages[this.cursor++]!.msg;
        if (m?.$case === kind) return m.value as MsgOf<K>;
        if (m?.$case === "ack") continue;
        throw new Error(`expected ${kind}, got ${JSON.stringify(m)}; all: ${this.describe()}`);
      }
      if (this.end) throw new Error(`stream ended before a ${kind}: ${this.describe()}`);
      return undefined;
    }, timeoutMs);
  }

  /** Wait until an Ack covering `seq` arrived (fails on a refusal; gap Nacks are tolerated). */
  async acked(seq: number, timeoutMs = 30_000): Promise<void> {
    await this.waitUntil(`ack of ${seq}`, () => {
      if (this.messages.some((m) => m.msg?.$case === "ack" && m.msg.value.seq >= seq)) return true;
      const bad = this.messages.find((m) => m.msg?.$case === "nack" && m.msg.value.reason !== Nack_Reason.REASON_GAP);
      if (bad || this.end) throw new Error(`no ack of ${seq}: ${this.describe()}`);
      return undefined;
    }, timeoutMs);
  }

  /** Whatever settles packet `seq` first: an Ack covering it, a Nack, or the end of the stream. */
  async outcome(seq: number, timeoutMs = 30_000): Promise<{ acked: true } | { nack: MsgOf<"nack"> } | { end: End }> {
    return this.waitUntil(`the outcome of packet ${seq}`, () => {
      for (const m of this.messages) {
        if (m.msg?.$case === "ack" && m.msg.value.seq >= seq) return { acked: true as const };
        if (m.msg?.$case === "nack") return { nack: m.msg.value };
      }
      return this.end ? { end: this.end } : undefined;
    }, timeoutMs);
  }

  /** Number of Acks received so far. */
  get ackCount(): number {
    return this.messages.filter((m) => m.msg?.$case === "ack").length;
  }

  /** The final status of the call. */
  async ended(timeoutMs = 30_000): Promise<End> {
    return this.waitUntil("the end of the stream", () => this.end, timeoutMs);
  }

  describe(): string {
    const ms = this.messages.map((m) => JSON.stringify(m.msg, (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v)));
    return `[${ms.join(", ")}]${this.end ? ` end ${grpc.status[this.end.code]}: ${this.end.details}` : " (open)"}`;
  }

  close(): void {
    open.delete(this);
    try {
      this.call.cancel();
    } catch {
      /* ignore */
    }
    this.client.close();
  }

  static closeAll(): void {
    for (const s of [...open]) s.close();
  }
}

/** Op constructors (no validation: the point is to send what a real source never would). */
export const op = {
  mkdir: (p: string): Op => ({ path: p, kind: { $case: "mkdir", value: { attr: undefined } } }),
  create: (p: string): Op => ({ path: p, kind: { $case: "create", value: { attr: undefined } } }),
  write: (p: string, data: string | Buffer, offset = 0): Op => ({ path: p, kind: { $case: "write", value: { offset, data: Buffer.from(data) } } }),
  truncate: (p: string, size: number): Op => ({ path: p, kind: { $case: "truncate", value: { size } } }),
  symlink: (p: string, target: string): Op => ({ path: p, kind: { $case: "symlink", value: { target, attr: undefined } } }),
  link: (p: string, existing: string): Op => ({ path: p, kind: { $case: "link", value: { existing } } }),
  remove: (p: string, directory = false): Op => ({ path: p, kind: { $case: "remove", value: { directory } } }),
  rename: (p: string, to: string): Op => ({ path: p, kind: { $case: "rename", value: { to } } }),
  attr: (p: string, mode: number, mtimeSec = 1_000_000_000): Op => ({ path: p, kind: { $case: "attr", value: { attr: { mode, uid: 0, gid: 0, mtimeSec, mtimeNsec: 0, xattrs: [], hasXattrs: false } } } }),
};
