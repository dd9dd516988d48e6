// Fuzzing the wire decoder (agent/wire.ts) the target runs on everything a
// source sends: whatever the bytes, decoding ends in ops or a PacketError
// (never another exception, a hang or an allocation the header talks it
// into), and what the encoder makes decodes back to the same ops.
import { test } from "node:test";
import assert from "node:assert/strict";
import { zstdCompressSync } from "node:zlib";
import fc from "fast-check";
import { MAX_MESSAGE_BYTES, OpBatch, PacketError, SourceMessage, decodePacket, decodePacketBytes, encodePacket, encodePacketBytes, encodePacketPayload, type Op } from "../../agent/wire.ts";
import { hostilePath, params } from "./fuzz.ts";

const u32 = fc.nat({ max: 0xffffffff });
const attr = fc.record({
  mode: u32,
  uid: u32,
  gid: u32,
  mtimeSec: fc.integer({ min: -(2 ** 40), max: 2 ** 40 }),
  mtimeNsec: u32,
  xattrs: fc.array(fc.record({ name: fc.string({ maxLength: 20 }), value: fc.uint8Array({ maxLength: 40 }).map((b) => Buffer.from(b)) }), { maxLength: 3 }),
  hasXattrs: fc.boolean(),
});
const safeU64 = fc.oneof(fc.nat({ max: 2 ** 20 }), fc.constantFrom(0, 2 ** 32, 2 ** 53 - 1));

export const anyOp: fc.Arbitrary<Op> = fc.record({
  path: hostilePath,
  kind: fc.oneof(
    fc.record({ $case: fc.constant("mkdir" as const), value: fc.record({ attr: fc.option(attr, { nil: undefined }) }) }),
    fc.record({ $case: fc.constant("create" as const), value: fc.record({ attr: fc.option(attr, { nil: undefined }) }) }),
    fc.record({ $case: fc.constant("write" as const), value: fc.record({ offset: safeU64, data: fc.uint8Array({ maxLength: 300 }).map((b) => Buffer.from(b)) }) }),
    fc.record({ $case: fc.constant("truncate" as const), value: fc.record({ size: safeU64 }) }),
    fc.record({ $case: fc.constant("symlink" as const), value: fc.record({ target: hostilePath, attr: fc.option(attr, { nil: undefined }) }) }),
    fc.record({ $case: fc.constant("link" as const), value: fc.record({ existing: hostilePath }) }),
    fc.record({ $case: fc.constant("remove" as const), value: fc.record({ directory: fc.boolean() }) }),
    fc.record({ $case: fc.constant("rename" as const), value: fc.record({ to: hostilePath }) }),
    fc.record({ $case: fc.constant("attr" as const), value: fc.record({ attr: fc.option(attr, { nil: undefined }) }) }),
    fc.record({ $case: fc.constant("mknod" as const), value: fc.record({ type: fc.constantFrom("p", "c", "b", "s", "f", "", "x"), major: u32, minor: u32, attr: fc.option(attr, { nil: undefined }) }) }),
  ),
}) as fc.Arbitrary<Op>;

/** decodePacket either returns ops with a kind each, or throws a PacketError: nothing else. */
function decodesOrRefuses(p: Parameters<typeof decodePacket>[0]): Op[] | PacketError {
  try {
    const ops = decodePacket(p);
    for (const op of ops) assert.ok(op.kind, "every decoded op has a kind");
    return ops;
  } catch (e) {
    if (e instanceof PacketError) {
      assert.match(e.message, new RegExp(`^packet ${p.seq}: `), "the error names the packet");
      return e;
    }
    throw new Error(`decodePacket threw ${(e as Error)?.constructor?.name}, not a PacketError: ${(e as Error)?.message}`, { cause: e });
  }
}

test("fuzz: any packet header and body decode to ops or a PacketError", () => {
  fc.assert(
    fc.property(
      fc.nat({ max: 2 ** 40 }),
      fc.integer({ min: -1, max: 5 }),
      fc.oneof(fc.uint8Array({ maxLength: 2000 }), fc.array(anyOp, { maxLength: 4 }).map((ops) => OpBatch.encode({ ops }).finish())),
      fc.oneof(fc.nat({ max: 5000 }), fc.constantFrom(0, MAX_MESSAGE_BYTES * 4, MAX_MESSAGE_BYTES * 4 + 1, 2 ** 53 - 1)),
      fc.boolean(),
      (seq, compression, raw, rawSize, zstd) => {
        const body = zstd ? zstdCompressSync(raw) : Buffer.from(raw);
        decodesOrRefuses({ seq, compression: compression as 0, body, rawSize });
      },
    ),
    params(300),
  );
});

test("fuzz: valid packets with bytes flipped, cut or appended decode to ops or a PacketError", () => {
  fc.assert(
    fc.property(fc.array(anyOp, { minLength: 1, maxLength: 4 }), fc.constantFrom("none", "fast"), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 4 }), fc.nat(), fc.uint8Array({ maxLength: 8 }), (ops, level, flips, cut, extra) => {
      const p = encodePacket(3, ops, level);
      const body = Buffer.from(p.body);
      for (const [at, x] of flips) if (body.length) body[at % body.length]! ^= x;
      const cutBody = body.subarray(0, body.length ? cut % (body.length + 1) : 0);
      decodesOrRefuses({ ...p, body: Buffer.concat([cutBody, extra]) });
      decodesOrRefuses({ ...p, body });
    }),
    params(300),
  );
});

test("fuzz: what the encoder makes decodes back to the same ops (both encoders agree)", () => {
  fc.assert(
    fc.property(fc.nat({ max: 2 ** 40 }), fc.array(anyOp, { maxLength: 6 }), fc.constantFrom("none", "fast", "balanced"), (seq, ops, level) => {
      const p = encodePacket(seq, ops, level);
      const back = decodePacket(decodePacketBytes(encodePacketBytes(p)));
      assert.deepEqual(OpBatch.encode({ ops: back }).finish(), OpBatch.encode({ ops }).finish());
      const payload = encodePacketPayload(seq, ops, level);
      const q = decodePacketBytes(payload);
      assert.equal(q.seq, seq);
      assert.deepEqual(OpBatch.encode({ ops: decodePacket(q) }).finish(), OpBatch.encode({ ops }).finish());
    }),
    params(200),
  );
});

test("fuzz: any bytes as a stream message decode or throw an Error (what gRPC turns into a failed stream)", () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 600 }), (b) => {
      try {
        const m = SourceMessage.decode(b);
        if (m.msg?.$case === "packet") decodesOrRefuses(m.msg.value);
      } catch (e) {
        assert.ok(e instanceof Error, `decode threw a non-Error: ${String(e)}`);
      }
    }),
    params(300),
  );
});
