// The wire adapter: packets round-trip, compression is chosen sensibly, the
// hand-framed encodings equal what protobuf itself produces, and garbage gets
// a clear PacketError.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { Packet, SourceMessage, decodePacket, decodePacketBytes, encodePacket, encodePacketBytes, framePacket, PacketError } from "../../agent/wire.ts";

test("hand-framed Packet bytes equal protobuf's encoding and decode back", () => {
  fc.assert(
    fc.property(fc.nat({ max: 2 ** 40 }), fc.constantFrom(0, 1), fc.uint8Array({ maxLength: 3000 }), fc.nat({ max: 2 ** 31 }), (seq, compression, body, rawSize) => {
      const p = { seq, compression: compression as 0 | 1, body: Buffer.from(body), rawSize };
      const mine = encodePacketBytes(p);
      assert.deepEqual(mine, Buffer.from(Packet.encode(p).finish()));
      const back = decodePacketBytes(mine);
      assert.equal(back.seq, seq);
      assert.deepEqual(Buffer.from(back.body), Buffer.from(body));
      // framed as SourceMessage field 2, it decodes as a packet message
      const m = SourceMessage.decode(framePacket(mine));
      assert.equal(m.msg?.$case, "packet");
    }),
  );
});

test("op batches round-trip through every compression level", () => {
  const ops = [
    { path: "a/b.txt", kind: { $case: "write" as const, value: { offset: 7, data: Buffer.alloc(100_000, 3) } } },
    { path: "a", kind: { $case: "attr" as const, value: { attr: { mode: 0o755, uid: 1, gid: 2, mtimeSec: 1_700_000_000, mtimeNsec: 999_999_999, xattrs: [{ name: "user.k", value: Buffer.from("v") }], hasXattrs: true } } } },
    { path: "x", kind: { $case: "rename" as const, value: { to: "y" } } },
  ];
  for (const level of ["none", "fast", "balanced", "max"] as const) {
    const p = encodePacket(9, ops, level);
    if (level === "none") assert.equal(p.compression, 0);
    else assert.ok(p.body.length < 1000, `${level} compresses a repetitive batch (${p.body.length} bytes)`);
    assert.deepEqual(decodePacket(decodePacketBytes(encodePacketBytes(p))), ops);
  }
});

test("garbage bodies give a PacketError that says what is wrong", () => {
  assert.throws(() => decodePacket({ seq: 1, compression: 0, body: Buffer.from([0xff, 0xff, 0xff]), rawSize: 3 }), (e: unknown) => e instanceof PacketError && /not a valid op batch/.test((e as Error).message));
  assert.throws(() => decodePacket({ seq: 2, compression: 1, body: Buffer.from("not zstd"), rawSize: 10 }), (e: unknown) => e instanceof PacketError && /does not decompress/.test((e as Error).message));
  assert.throws(() => decodePacket({ seq: 3, compression: 7 as 0, body: Buffer.alloc(1), rawSize: 1 }), /unknown compression/);
  assert.throws(() => decodePacket({ seq: 4, compression: 0, body: Buffer.alloc(4), rawSize: 5 }), /header says 5/);
});
