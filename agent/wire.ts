// The one adapter between the generated protobuf code (proto/gen) and the
// agent: only this module imports proto/gen. It fixes the protocol version and
// turns op batches into packet bodies (encode + compress) and back.
import { makeGenericClientConstructor as grpcMakeClient, type CallOptions, type ChannelCredentials, type Client, type ClientDuplexStream, type ClientOptions } from "@grpc/grpc-js";
import { zstdCompressSync, zstdDecompressSync, constants as zc } from "node:zlib";
import {
  Compression,
  DigestAlgo,
  OpBatch,
  Packet,
  ReplicationClient,
  ReplicationService as GeneratedReplicationService,
  SourceMessage,
  TargetMessage,
  Nack_Reason,
  Op,
  type Attr,
  type Xattr,
  type ReplicationServer,
  type ManifestEntry as ManifestEntryMsg,
  type ManifestResponse,
  type DigestsResponse,
  type SummaryResponse,
  type Welcome,
} from "../proto/gen/understudy/v1/replication.ts";
import { ControlClient, ControlService, SetSpec, type ControlServer, type StatusResponse, type SourceSetStatus, type TargetStatus, type ImageStatus, type MirrorProgress, type VerifyReport, type Difference } from "../proto/gen/understudy/v1/control.ts";
import { createHash } from "node:crypto";
import type { CompressionLevel } from "../common/config.ts";
import pkg from "../package.json" with { type: "json" };

/**
 * Bumped when a peer of the previous version would misread the stream.
 * 2: special files (Mknod), extended attributes (Attr.xattrs), device numbers in listings.
 */
export const PROTOCOL_VERSION = 2;
export const AGENT_VERSION: string = pkg.version;

/** Largest gRPC message either side accepts (a packet holds at most ~4 MiB of data). */
export const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

export { ReplicationClient, ControlClient, ControlService, SourceMessage, TargetMessage, Nack_Reason, OpBatch, Packet, SetSpec, DigestAlgo };
export type { Attr, Op, Xattr, ReplicationServer, ControlServer, StatusResponse, SourceSetStatus, TargetStatus, ImageStatus, ManifestEntryMsg, ManifestResponse, DigestsResponse, SummaryResponse, Welcome, MirrorProgress, VerifyReport, Difference };
export type OpKind = NonNullable<Op["kind"]>["$case"];

/**
 * Identity of a managed set's spec: the operator compares it with what the
 * agent reports and calls ConfigureSet only when they differ. Hashing the
 * protobuf encoding makes both sides agree without a second canonical form.
 */
export function setSpecHash(spec: SetSpec): string {
  return createHash("sha256").update(SetSpec.encode(spec).finish()).digest("hex").slice(0, 16);
}

const ZSTD_LEVEL: Record<CompressionLevel, number> = { none: 0, fast: 1, balanced: 3, max: 19 };

/** Encode (and compress) a batch into a packet. Incompressible bodies are sent raw. */
export function encodePacket(seq: number, ops: Op[], level: CompressionLevel): Packet {
  const raw = asBuffer(OpBatch.encode({ ops }).finish());
  if (level !== "none" && raw.length > 256) {
    const z = zstdCompressSync(raw, { params: { [zc.ZSTD_c_compressionLevel]: ZSTD_LEVEL[level] } });
    if (z.length < raw.length * 0.95) return { seq, compression: Compression.COMPRESSION_ZSTD, body: z, rawSize: raw.length };
  }
  return { seq, compression: Compression.COMPRESSION_NONE, body: raw, rawSize: raw.length };
}

/**
 * A packet as the journal stores it: encodePacketBytes(encodePacket(seq, ops,
 * level)), byte for byte, built with exact sizes so that the data of Write ops
 * (megabytes per packet) is copied once, into the one buffer that is the
 * result when the body goes uncompressed. Protobuf's growing writer copied it
 * several times (doubling, the length prefixes' shifts, the final slice) and
 * encodePacketBytes once more. Large bodies that a sample shows to be
 * incompressible skip the compression attempt (see worthCompressing).
 */
export function encodePacketPayload(seq: number, ops: Op[], level: CompressionLevel): Buffer {
  const enc = sizeOps(ops);
  const rawSize = enc.bytes;
  // The uncompressed packet: seq, body, rawSize (compression NONE is the default: not written).
  const head = (seq !== 0 ? 1 + varintSize(seq) : 0) + (rawSize ? 1 + varintSize(rawSize) : 0);
  const out = withFrameHeadroom(head + rawSize + (rawSize ? 1 + varintSize(rawSize) : 0));
  let pos = 0;
  if (seq !== 0) pos = putVarint(out, putVarint(out, pos, 0x08), seq);
  if (rawSize) pos = putVarint(out, putVarint(out, pos, 0x1a), rawSize);
  pos = putOps(out, pos, 0x0a, ops, enc);
  if (rawSize) pos = putVarint(out, putVarint(out, pos, 0x20), rawSize);
  if (pos !== out.length) throw new Error(`encodePacketPayload: wrote ${pos} bytes of ${out.length}`);
  const raw = out.subarray(head, head + rawSize);
  if (level !== "none" && rawSize > 256 && worthCompressing(raw, level)) {
    const z = zstdCompressSync(raw, { params: { [zc.ZSTD_c_compressionLevel]: ZSTD_LEVEL[level] } });
    if (z.length < rawSize * 0.95) return encodePacketBytes({ seq, compression: Compression.COMPRESSION_ZSTD, body: z, rawSize });
  }
  return out;
}

/** Ops measured for encoding: each op's encoded size, the encoding of those that are not Writes, and the total as a repeated field (one-byte tag). */
interface SizedOps {
  sizes: number[];
  parts: (Buffer | undefined)[];
  bytes: number;
}

function sizeOps(ops: Op[]): SizedOps {
  const parts: (Buffer | undefined)[] = [];
  const sizes: number[] = [];
  let bytes = 0;
  for (const op of ops) {
    let n: number;
    if (op.kind?.$case === "write") {
      n = writeOpSize(op.path, op.kind.value.offset, op.kind.value.data.length);
      parts.push(undefined);
    } else {
      const b = asBuffer(Op.encode(op).finish());
      n = b.length;
      parts.push(b);
    }
    sizes.push(n);
    bytes += 1 + varintSize(n) + n;
  }
  return { sizes, parts, bytes };
}

/** Write ops as a repeated field with the given (one-byte) tag; returns the position after them. */
function putOps(out: Buffer, pos: number, tag: number, ops: Op[], enc: SizedOps): number {
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i]!;
    pos = putVarint(out, putVarint(out, pos, tag), enc.sizes[i]!);
    const b = enc.parts[i];
    if (b) pos += b.copy(out, pos);
    else if (op.kind?.$case === "write") pos = putWriteOp(out, pos, op.path, op.kind.value.offset, op.kind.value.data);
  }
  return pos;
}

/** A SourceMessage already encoded (PacketStreamClient sends its bytes as they are). */
export class EncodedSourceMessage {
  readonly bytes: Buffer;
  constructor(bytes: Buffer) {
    this.bytes = bytes;
  }
}

/**
 * SourceMessage { mirrorOps: { mirrorId, ops, doneThrough, batch } }, byte
 * for byte what SourceMessage.encode makes of it, in one pass with exact sizes
 * (the data of Write ops is copied once; see encodePacketPayload).
 */
export function encodeMirrorOps(mirrorId: string, ops: Op[], doneThrough: string, batch: number): EncodedSourceMessage {
  const enc = sizeOps(ops);
  const str = (s: string) => {
    const n = Buffer.byteLength(s, "utf8");
    return n ? 1 + varintSize(n) + n : 0;
  };
  const body = str(mirrorId) + enc.bytes + str(doneThrough) + (batch !== 0 ? 1 + varintSize(batch) : 0);
  const out = Buffer.allocUnsafe(1 + varintSize(body) + body);
  let pos = putVarint(out, putVarint(out, 0, 0x1a), body);
  const putStr = (tag: number, s: string) => {
    const n = Buffer.byteLength(s, "utf8");
    if (!n) return;
    pos = putVarint(out, putVarint(out, pos, tag), n);
    pos += out.write(s, pos, "utf8");
  };
  putStr(0x0a, mirrorId);
  pos = putOps(out, pos, 0x12, ops, enc);
  putStr(0x1a, doneThrough);
  if (batch !== 0) pos = putVarint(out, putVarint(out, pos, 0x20), batch);
  if (pos !== out.length) throw new Error(`encodeMirrorOps: wrote ${pos} bytes of ${out.length}`);
  return new EncodedSourceMessage(out);
}

/** Bodies at least this large are sampled before the whole is compressed. */
const SAMPLE_ABOVE = 256 * 1024;
const SAMPLES = 8;
const SAMPLE_BYTES = 8 * 1024;

/**
 * Whether compressing a body may pay off. A small body: always try. A large
 * one: compress SAMPLES slices of it spread over the whole (mixed batches,
 * such as many small files, are sampled in many places); when together they
 * do not shrink below 90%, the whole would not go below the 95% that makes a
 * compressed packet worth it (random or already compressed data: zstd's
 * attempt cost about as much as encoding, journaling and sending the packet).
 */
function worthCompressing(raw: Buffer, level: CompressionLevel): boolean {
  if (raw.length < SAMPLE_ABOVE) return true;
  const step = Math.floor((raw.length - SAMPLE_BYTES) / (SAMPLES - 1));
  const sample = Buffer.allocUnsafe(SAMPLES * SAMPLE_BYTES);
  for (let i = 0; i < SAMPLES; i++) raw.copy(sample, i * SAMPLE_BYTES, i * step, i * step + SAMPLE_BYTES);
  const z = zstdCompressSync(sample, { params: { [zc.ZSTD_c_compressionLevel]: Math.min(ZSTD_LEVEL[level], 3) } });
  return z.length < sample.length * 0.9;
}

/** Size of an Op { path, write: { offset, data } } of `dataLength` bytes, encoded. */
function writeOpSize(path: string, offset: number, dataLength: number): number {
  const w = writeBodySize(offset, dataLength);
  const p = Buffer.byteLength(path, "utf8");
  return (path !== "" ? 1 + varintSize(p) + p : 0) + 1 + varintSize(w) + w;
}

function writeBodySize(offset: number, dataLength: number): number {
  return (offset !== 0 ? 1 + varintSize(offset) : 0) + (dataLength !== 0 ? 1 + varintSize(dataLength) + dataLength : 0);
}

/** Write an Op { path, write: { offset, data } } at pos (as Op.encode does); returns the position after it. */
function putWriteOp(out: Buffer, pos: number, path: string, offset: number, data: Uint8Array): number {
  if (path !== "") {
    pos = putVarint(out, putVarint(out, pos, 0x0a), Buffer.byteLength(path, "utf8"));
    pos += out.write(path, pos, "utf8");
  }
  pos = putVarint(out, putVarint(out, pos, 98), writeBodySize(offset, data.length));
  if (offset !== 0) pos = putVarint(out, putVarint(out, pos, 0x08), offset);
  if (data.length !== 0) {
    pos = putVarint(out, putVarint(out, pos, 0x12), data.length);
    out.set(data, pos);
    pos += data.length;
  }
  return pos;
}

function varintSize(n: number): number {
  let s = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    s++;
  }
  return s;
}

function putVarint(out: Buffer, pos: number, n: number): number {
  while (n >= 0x80) {
    out[pos++] = (n % 0x80) | 0x80;
    n = Math.floor(n / 0x80);
  }
  out[pos++] = n;
  return pos;
}

export class PacketError extends Error {}

/** Decompress and decode a packet body; throws PacketError with a clear message on garbage. */
export function decodePacket(p: Packet): Op[] {
  let raw: Buffer;
  if (p.compression === Compression.COMPRESSION_NONE) raw = Buffer.from(p.body.buffer, p.body.byteOffset, p.body.byteLength);
  else if (p.compression === Compression.COMPRESSION_ZSTD) {
    if (p.rawSize > MAX_MESSAGE_BYTES * 4) throw new PacketError(`packet ${p.seq}: raw size ${p.rawSize} exceeds the limit`);
    try {
      raw = zstdDecompressSync(p.body, { maxOutputLength: Math.max(1, p.rawSize) });
    } catch (e) {
      throw new PacketError(`packet ${p.seq}: body does not decompress: ${(e as Error).message}`);
    }
  } else throw new PacketError(`packet ${p.seq}: unknown compression ${p.compression}`);
  if (raw.length !== p.rawSize) throw new PacketError(`packet ${p.seq}: body is ${raw.length} bytes, header says ${p.rawSize}`);
  let ops: Op[];
  try {
    ops = readOpBatchView(raw) ?? OpBatch.decode(raw).ops;
  } catch (e) {
    throw new PacketError(`packet ${p.seq}: body is not a valid op batch: ${(e as Error).message}`);
  }
  for (const [i, op] of ops.entries()) if (!op.kind) throw new PacketError(`packet ${p.seq}: op ${i} (${JSON.stringify(op.path)}) has no kind`);
  return ops;
}

/** A Buffer view of bytes, without copying them. */
function asBuffer(u: Uint8Array): Buffer {
  return Buffer.isBuffer(u) ? u : Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

function varint(n: number, out: number[]): void {
  while (n >= 0x80) {
    out.push((n % 0x80) | 0x80);
    n = Math.floor(n / 0x80);
  }
  out.push(n);
}

/**
 * Packet encoded as protobuf, by hand so the (megabytes of) body are copied
 * once; equal to Packet.encode(p) (checked by the wire tests).
 */
export function encodePacketBytes(p: Packet): Buffer {
  const head: number[] = [];
  if (p.seq !== 0) {
    head.push(0x08);
    varint(p.seq, head);
  }
  if (p.compression !== 0) {
    head.push(0x10);
    varint(p.compression, head);
  }
  if (p.body.length) {
    head.push(0x1a);
    varint(p.body.length, head);
  }
  const tail: number[] = [];
  if (p.rawSize !== 0) {
    tail.push(0x20);
    varint(p.rawSize, tail);
  }
  return Buffer.concat([Buffer.from(head), p.body, Buffer.from(tail)]);
}

export function decodePacketBytes(b: Uint8Array): Packet {
  return Packet.decode(b);
}

/** Bytes a batch of ops carries as file data (for stats and packet sizing). */
export function dataBytes(ops: Op[]): number {
  let n = 0;
  for (const op of ops) if (op.kind?.$case === "write") n += op.kind.value.data.length;
  return n;
}

export function versionMismatch(local: number, remote: number, who: string): string {
  return `protocol version mismatch: this agent speaks v${local}, ${who} speaks v${remote}; upgrade both agents to the same understudy version`;
}

/**
 * Client for the Replication service whose request serializer also takes an
 * already-encoded Packet (the journal stores packets encoded): it is framed as
 * SourceMessage field 2 without decoding and re-encoding megabytes of data;
 * and an EncodedSourceMessage (mirror batches), sent as it is.
 */
export const PacketStreamClient = grpcMakeClient(
  {
    ...GeneratedReplicationService,
    replicate: {
      ...GeneratedReplicationService.replicate,
      requestSerialize: (v: SourceMessage | Buffer | EncodedSourceMessage): Buffer => (v instanceof EncodedSourceMessage ? v.bytes : Buffer.isBuffer(v) ? framePacket(v) : Buffer.from(SourceMessage.encode(v).finish())),
    },
  },
  "understudy.v1.Replication",
) as unknown as new (address: string, credentials: ChannelCredentials, options?: Partial<ClientOptions>) => Client & {
  replicate(options?: Partial<CallOptions>): ClientDuplexStream<SourceMessage | Buffer | EncodedSourceMessage, TargetMessage>;
  manifest: ReplicationClient["manifest"];
  digests: ReplicationClient["digests"];
};

export type ReplicationStreamClient = InstanceType<typeof PacketStreamClient>;

/**
 * Bytes kept free in front of packets encodePacketPayload builds, so that
 * framePacket can put the SourceMessage header there instead of copying the
 * packet (megabytes) into a new buffer: a field tag and a length varint (at
 * most 5 bytes for a packet below 4 GiB).
 */
const FRAME_HEADROOM = 8;
/** Packets with FRAME_HEADROOM bytes in front of them that belong to them alone (nobody else ever reads or writes those bytes). */
const framable = new WeakSet<Buffer>();

/**
 * Say that the `bytes` bytes before `packet` (in its ArrayBuffer) belong to
 * it alone, so framePacket may put its header there (journal entries read
 * from disk: the record header precedes the packet).
 */
export function markFramable(packet: Buffer, bytes: number): void {
  if (bytes >= FRAME_HEADROOM && packet.byteOffset >= bytes) framable.add(packet);
}

function withFrameHeadroom(size: number): Buffer {
  const out = Buffer.allocUnsafe(FRAME_HEADROOM + size).subarray(FRAME_HEADROOM);
  framable.add(out);
  return out;
}

/**
 * SourceMessage { packet } of an encoded Packet. A packet built by
 * encodePacketPayload is framed in place (the header goes into its headroom:
 * every caller writes the same bytes there, they depend on the length only);
 * any other is copied behind the header.
 */
export function framePacket(packetBytes: Buffer): Buffer {
  const n = packetBytes.length;
  const hl = 1 + varintSize(n);
  if (framable.has(packetBytes) && hl <= FRAME_HEADROOM) {
    const framed = Buffer.from(packetBytes.buffer, packetBytes.byteOffset - hl, hl + n);
    putVarint(framed, 1, n);
    framed[0] = 0x12;
    return framed;
  }
  const out = Buffer.allocUnsafe(hl + n);
  out[0] = 0x12;
  putVarint(out, 1, n);
  packetBytes.copy(out, hl);
  return out;
}

// ---- decoding without copies (target side) ----
//
// The generated decoders copy every bytes field (Buffer.from(reader.bytes())):
// a packet's body once, then each Write's data again. The two shapes that
// carry file data in bulk, SourceMessage { packet } and Write ops, are
// decoded here by hand into views of the received message; anything else, or
// anything these readers do not understand (unknown fields, numbers beyond
// 2^53, malformed input), goes to the generated decoder, which decides as
// before (including how it fails).

/** A cursor over protobuf bytes; `bad` is set (and reading stops making sense) on anything unexpected. */
class Cursor {
  pos: number;
  bad = false;
  readonly b: Buffer;
  readonly end: number;
  constructor(b: Buffer, pos = 0, end = b.length) {
    this.b = b;
    this.pos = pos;
    this.end = end;
  }
  /** A varint up to 2^53 - 1; sets bad beyond that or when cut short. */
  varint(): number {
    let n = 0;
    let mul = 1;
    for (let i = 0; i < 8; i++) {
      if (this.pos >= this.end) break;
      const c = this.b[this.pos++]!;
      n += (c & 0x7f) * mul;
      if (c < 0x80) {
        if (n > Number.MAX_SAFE_INTEGER) break;
        return n;
      }
      mul *= 128;
    }
    this.bad = true;
    return 0;
  }
  /** The bytes of a length-delimited field, as a view. */
  bytes(): Buffer {
    const n = this.varint();
    if (this.bad || n > this.end - this.pos) {
      this.bad = true;
      return EMPTY;
    }
    const v = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }
}

const EMPTY = Buffer.alloc(0);
const utf8 = new TextDecoder();

/** Packet from bytes, its body a view; undefined when the fast reader does not fully understand it. */
function readPacketView(b: Buffer): Packet | undefined {
  const c = new Cursor(b);
  const p: Packet = { seq: 0, compression: 0, body: EMPTY, rawSize: 0 };
  while (c.pos < c.end && !c.bad) {
    const tag = c.varint();
    if (tag === 0x08) p.seq = c.varint();
    else if (tag === 0x10) p.compression = c.varint() as Compression;
    else if (tag === 0x1a) p.body = c.bytes();
    else if (tag === 0x20) p.rawSize = c.varint();
    else return undefined;
  }
  if (c.bad || p.compression > 0x7fffffff || p.rawSize > 0xffffffff) return undefined;
  return p;
}

/** SourceMessage decoder for the server: packets without copying their body, everything else as generated. */
function decodeSourceMessage(b: Buffer): SourceMessage {
  if (b.length > 0 && b[0] === 0x12) {
    const c = new Cursor(b, 1);
    const body = c.bytes();
    if (!c.bad && c.pos === b.length) {
      const p = readPacketView(body);
      if (p) return { msg: { $case: "packet", value: p } };
    }
  }
  return SourceMessage.decode(b);
}

/** An Op that is a Write (path + write only), with its data as a view; undefined for anything else. */
function readWriteOpView(b: Buffer): Op | undefined {
  const c = new Cursor(b);
  let path = "";
  let write: { offset: number; data: Buffer } | undefined;
  while (c.pos < c.end && !c.bad) {
    const tag = c.varint();
    if (tag === 0x0a) path = utf8.decode(c.bytes());
    else if (tag === 98) {
      const w = new Cursor(c.bytes());
      if (c.bad) return undefined;
      write = { offset: 0, data: EMPTY };
      while (w.pos < w.end && !w.bad) {
        const t = w.varint();
        if (t === 0x08) write.offset = w.varint();
        else if (t === 0x12) write.data = w.bytes();
        else return undefined;
      }
      if (w.bad) return undefined;
    } else return undefined;
  }
  if (c.bad || !write) return undefined;
  return { path, kind: { $case: "write", value: write } };
}

/** OpBatch with Write data as views of raw; undefined when the fast reader does not fully understand it. */
function readOpBatchView(raw: Buffer): Op[] | undefined {
  const c = new Cursor(raw);
  const ops: Op[] = [];
  while (c.pos < c.end) {
    if (c.varint() !== 0x0a) return undefined;
    const ob = c.bytes();
    if (c.bad) return undefined;
    // Not a Write: the generated decoder (these ops are small).
    ops.push(readWriteOpView(ob) ?? Op.decode(ob));
  }
  return ops;
}

/**
 * The Replication service as the server registers it: its requests are
 * decoded with decodeSourceMessage (packet bodies are not copied).
 */
export const ReplicationService: typeof GeneratedReplicationService = {
  ...GeneratedReplicationService,
  replicate: { ...GeneratedReplicationService.replicate, requestDeserialize: decodeSourceMessage },
};
