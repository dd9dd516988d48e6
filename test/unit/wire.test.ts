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

test("encodePacketPayload equals encodePacketBytes(encodePacket(...)) byte for byte", async () => {
  const { encodePacketPayload } = await import("../../agent/wire.ts");
  const attr = { mode: 0o644, uid: 1000, gid: 1000, mtimeSec: 1_700_000_000, mtimeNsec: 123_456_789, xattrs: [], hasXattrs: false };
  const opArb = fc.oneof(
    fc.record({ path: fc.string({ maxLength: 40, unit: "binary" }), off: fc.oneof(fc.constant(0), fc.nat({ max: 2 ** 40 }), fc.maxSafeNat()), data: fc.uint8Array({ maxLength: 600 }) }).map(({ path, off, data }) => ({ path, kind: { $case: "write" as const, value: { offset: off, data: Buffer.from(data) } } })),
    fc.string({ maxLength: 20 }).map((path) => ({ path, kind: { $case: "create" as const, value: { attr } } })),
    fc.record({ path: fc.string({ maxLength: 20 }), size: fc.nat() }).map(({ path, size }) => ({ path, kind: { $case: "truncate" as const, value: { size } } })),
    fc.record({ path: fc.string({ maxLength: 20 }), to: fc.string({ maxLength: 20 }) }).map(({ path, to }) => ({ path, kind: { $case: "rename" as const, value: { to } } })),
  );
  fc.assert(
    fc.property(fc.nat({ max: 2 ** 40 }), fc.array(opArb, { maxLength: 12 }), fc.constantFrom("none", "fast"), (seq, ops, level) => {
      const want = encodePacketBytes(encodePacket(seq, ops, level as "none" | "fast"));
      assert.deepEqual(encodePacketPayload(seq, ops, level as "none" | "fast"), want);
    }),
  );
  // Large bodies: random data goes raw without the full attempt, repetitive data still compresses.
  const rnd = (await import("node:crypto")).randomBytes(1024 * 1024);
  const big = [{ path: "f", kind: { $case: "write" as const, value: { offset: 1 << 20, data: rnd } } }];
  assert.deepEqual(encodePacketPayload(5, big, "fast"), encodePacketBytes(encodePacket(5, big, "fast")));
  const rep = [{ path: "g", kind: { $case: "write" as const, value: { offset: 0, data: Buffer.alloc(1024 * 1024, 7) } } }];
  const z = encodePacketPayload(6, rep, "fast");
  assert.deepEqual(z, encodePacketBytes(encodePacket(6, rep, "fast")));
  assert.ok(z.length < 10_000);
  assert.deepEqual(decodePacket(decodePacketBytes(z)), rep);
});

test("encodeMirrorOps equals SourceMessage.encode of the same mirror batch byte for byte", async () => {
  const { encodeMirrorOps } = await import("../../agent/wire.ts");
  const attr = { mode: 0o644, uid: 1000, gid: 1000, mtimeSec: 1_700_000_000, mtimeNsec: 123_456_789, xattrs: [{ name: "user.k", value: Buffer.from("v") }], hasXattrs: true };
  const opArb = fc.oneof(
    fc.record({ path: fc.string({ maxLength: 40, unit: "binary" }), off: fc.oneof(fc.constant(0), fc.nat({ max: 2 ** 40 }), fc.maxSafeNat()), data: fc.uint8Array({ maxLength: 600 }) }).map(({ path, off, data }) => ({ path, kind: { $case: "write" as const, value: { offset: off, data: Buffer.from(data) } } })),
    fc.string({ maxLength: 20 }).map((path) => ({ path, kind: { $case: "create" as const, value: { attr: undefined } } })),
    fc.string({ maxLength: 20 }).map((path) => ({ path, kind: { $case: "attr" as const, value: { attr } } })),
    fc.record({ path: fc.string({ maxLength: 20 }), size: fc.nat() }).map(({ path, size }) => ({ path, kind: { $case: "truncate" as const, value: { size } } })),
  );
  fc.assert(
    fc.property(fc.string({ maxLength: 40 }), fc.array(opArb, { maxLength: 12 }), fc.string({ maxLength: 30, unit: "binary" }), fc.oneof(fc.constant(0), fc.maxSafeNat()), (mirrorId, ops, doneThrough, batch) => {
      const msg = { msg: { $case: "mirrorOps" as const, value: { mirrorId, ops, doneThrough, batch } } };
      const mine = encodeMirrorOps(mirrorId, ops, doneThrough, batch).bytes;
      assert.deepEqual(mine, Buffer.from(SourceMessage.encode(msg).finish()));
      assert.deepEqual(SourceMessage.decode(mine), msg);
    }),
  );
  // A large Write (multi-byte lengths at every level).
  const big = [{ path: "f", kind: { $case: "write" as const, value: { offset: 3, data: Buffer.alloc(3 * 1024 * 1024, 9) } } }];
  const want = SourceMessage.encode({ msg: { $case: "mirrorOps", value: { mirrorId: "m", ops: big, doneThrough: "d", batch: 300 } } }).finish();
  assert.deepEqual(encodeMirrorOps("m", big, "d", 300).bytes, Buffer.from(want));
});

test("the server's packet decoder (views, no copies) agrees with the generated one, also on garbage", async () => {
  const { ReplicationService, encodePacketPayload, OpBatch } = await import("../../agent/wire.ts");
  const decode = ReplicationService.replicate.requestDeserialize;
  const attr = { mode: 0o644, uid: 1000, gid: 1000, mtimeSec: 1_700_000_000, mtimeNsec: 123_456_789, xattrs: [], hasXattrs: false };
  const opArb = fc.oneof(
    fc.record({ path: fc.string({ maxLength: 40, unit: "binary" }), off: fc.oneof(fc.constant(0), fc.nat({ max: 2 ** 40 }), fc.maxSafeNat()), data: fc.uint8Array({ maxLength: 600 }) }).map(({ path, off, data }) => ({ path, kind: { $case: "write" as const, value: { offset: off, data: Buffer.from(data) } } })),
    fc.string({ maxLength: 20 }).map((path) => ({ path, kind: { $case: "create" as const, value: { attr } } })),
    fc.record({ path: fc.string({ maxLength: 20 }), size: fc.nat() }).map(({ path, size }) => ({ path, kind: { $case: "truncate" as const, value: { size } } })),
  );
  fc.assert(
    fc.property(fc.nat({ max: 2 ** 40 }), fc.array(opArb, { maxLength: 12 }), fc.constantFrom("none", "fast"), (seq, ops, level) => {
      const framed = framePacket(encodePacketPayload(seq, ops, level as "none" | "fast"));
      const want = SourceMessage.decode(framed);
      const got = decode(framed);
      assert.deepEqual(got, want);
      assert.equal(got.msg?.$case, "packet");
      if (got.msg?.$case === "packet" && want.msg?.$case === "packet") {
        assert.deepEqual(decodePacket(got.msg.value), decodePacket(want.msg.value));
        assert.deepEqual(decodePacket(got.msg.value), ops);
        if (got.msg.value.compression === 0) assert.deepEqual(decodePacket(got.msg.value), OpBatch.decode(got.msg.value.body).ops);
      }
    }),
  );
  // Arbitrary bytes: the same message, or both throw.
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 64 }), fc.boolean(), (bytes, asPacket) => {
      const b = asPacket ? Buffer.concat([Buffer.from([0x12, bytes.length]), Buffer.from(bytes)]) : Buffer.from(bytes);
      let want: unknown;
      let wantErr = false;
      try {
        want = SourceMessage.decode(b);
      } catch {
        wantErr = true;
      }
      if (wantErr) assert.throws(() => decode(b));
      else assert.deepEqual(decode(b), want);
      const p = { seq: 1, compression: 0 as const, body: Buffer.from(bytes), rawSize: bytes.length };
      let ops: unknown;
      let opsErr = false;
      try {
        ops = OpBatch.decode(p.body).ops;
      } catch {
        opsErr = true;
      }
      try {
        const mine = decodePacket(p);
        assert.ok(!opsErr, "the fast reader accepted what the generated decoder refuses");
        assert.deepEqual(mine, ops);
      } catch (e) {
        if (!(e instanceof PacketError)) throw e;
        assert.ok(opsErr || /has no kind/.test(e.message), e.message);
      }
    }),
    { numRuns: 2000 },
  );
});

test("a packet framed in place is the same message as one framed by copying", async () => {
  const { encodePacketPayload } = await import("../../agent/wire.ts");
  const ops = [{ path: "f", kind: { $case: "write" as const, value: { offset: 3, data: Buffer.alloc(300_000, 9) } } }];
  const payload = encodePacketPayload(7, ops, "none");
  const inPlace = framePacket(payload);
  const copied = framePacket(Buffer.from(payload));
  assert.deepEqual(inPlace, copied);
  assert.equal(inPlace.buffer, payload.buffer, "framed in the packet's own headroom");
  assert.deepEqual(framePacket(payload), inPlace, "framing twice (two targets) gives the same bytes");
});
