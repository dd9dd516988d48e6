// A hostile source against a real target agent process: path traversal,
// symlink escapes, mixed and garbage packets, wrong versions and names, stolen
// identities under mTLS, and sequence games. After every attack nothing
// outside the attacked image may have changed (a canary directory sits next
// to the target root), a refused packet leaves nothing of itself in the
// image, and the target keeps serving well-behaved sources.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { X509Certificate, randomBytes } from "node:crypto";
import { closeSync, openSync } from "node:fs";
import { lstat, mkdir, readFile, readlink, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { zstdCompressSync } from "node:zlib";
import * as grpc from "@grpc/grpc-js";
import YAML from "yaml";
import { fetchStatus } from "../../agent/control-client.ts";
import { DigestAlgo, MAX_MESSAGE_BYTES, Nack_Reason, OpBatch, PROTOCOL_VERSION, ReplicationClient, SourceMessage, type DigestsResponse, type ImageStatus, type ManifestResponse, type Op } from "../../agent/wire.ts";
import { createCA, issueCert } from "../../common/tls.ts";
import { CLI, Pair, compareTrees, freePort, snapshotTree, tmpDir, waitFor, type NodeInfo } from "./harness.ts";
import { HostileSession, op, type MsgOf } from "./hostile-client.ts";

const SET = "set";

/** Snapshot of everything below root except the excluded relative paths (and what is below them). */
async function treeExcept(root: string, excluded: string[]): Promise<Map<string, NodeInfo>> {
  const m = await snapshotTree(root);
  for (const k of [...m.keys()]) if (excluded.some((e) => k === e || k.startsWith(`${e}/`))) m.delete(k);
  return m;
}

/**
 * Watches a test directory holding a target root (`rootRel`), the target's
 * state and log, and a canary directory next to them.
 */
class Guard {
  readonly dir: string;
  readonly rootRel: string;
  private readonly fixed: string[];

  constructor(dir: string, rootRel: string, fixedExcludes: string[]) {
    this.dir = dir;
    this.rootRel = rootRel;
    this.fixed = fixedExcludes;
  }

  image(source: string, set = SET): string {
    return path.join(this.dir, this.rootRel, source, set);
  }

  /**
   * Take snapshots now (call it after the Welcome: the image directory exists
   * then); `check()` asserts that nothing outside `images` changed and, for
   * the images in `frozen`, that nothing inside them changed either.
   */
  async watch(images: [string, string][], frozen: [string, string][] = images): Promise<{ check(what: string): Promise<void> }> {
    const excl = [...this.fixed, ...images.map(([s, set]) => `${this.rootRel}/${s}/${set}`)];
    const before = await treeExcept(this.dir, excl);
    const imgs = await Promise.all(frozen.map(async ([s, set]) => [this.image(s, set), await snapshotTree(this.image(s, set))] as const));
    return {
      check: async (what: string) => {
        const after = await treeExcept(this.dir, excl);
        assert.deepEqual(compareTrees(before, after).map((d) => d.replace("missing on target", "deleted").replace("extra on target", "created")), [], `${what}: something outside the image changed`);
        for (const [p, snap] of imgs) {
          const now = await snapshotTree(p);
          assert.deepEqual(compareTrees(snap, now).map((d) => d.replace("missing on target", "deleted").replace("extra on target", "created")), [], `${what}: the refused packet changed the image ${p}`);
        }
      },
    };
  }
}

async function exists(p: string): Promise<boolean> {
  return lstat(p).then(
    () => true,
    () => false,
  );
}

function assertRejected(n: MsgOf<"nack">, seq: number, problem: RegExp, what: string): void {
  assert.equal(n.reason, Nack_Reason.REASON_REJECTED, `${what}: reason REJECTED (got ${n.reason}: ${n.message})`);
  assert.equal(n.expectedSeq, seq, `${what}: the Nack names packet ${seq}`);
  assert.match(n.message, new RegExp(`packet ${seq} refused`), `${what}: message says the packet was refused`);
  assert.match(n.message, problem, `${what}: message names the problem`);
}

/** Ops encoded as an OpBatch body, for hand-made packets. */
function batchBytes(ops: Op[]): Buffer {
  return Buffer.from(OpBatch.encode({ ops }).finish());
}

test("a hostile source cannot get out of its image on a real target agent", { timeout: 300_000 }, async (t) => {
  const pair = await Pair.create();
  t.after(async () => {
    HostileSession.closeAll();
    await pair.cleanup();
  });
  // The canary: next to the target root, reachable from an image as ../../../outside.
  const outside = path.join(pair.dir, "outside");
  await mkdir(path.join(outside, "sub"), { recursive: true });
  await writeFile(path.join(outside, "secret"), "the secret\n", { mode: 0o640 });
  await pair.target.start();
  const addr = pair.target.address;
  const guard = new Guard(pair.dir, "dst", ["target.log", "state-dst"]);
  const alive = () => assert.equal(pair.target.proc!.exitCode, null, "the target agent is still running");
  const imageStatus = async (source: string): Promise<ImageStatus | undefined> => (await pair.target.status()).images.find((i) => i.source === source && i.set === SET);

  /** Open a stream for source/set, wait for the Welcome, and start watching the tree. */
  const connect = async (source: string, opts: { raw?: boolean; imageMayChange?: boolean } = {}) => {
    const s = new HostileSession(addr, opts);
    s.hello(source, SET);
    const welcome = await s.next("welcome");
    const w = await guard.watch([[source, SET]], opts.imageMayChange ? [] : [[source, SET]]);
    return { s, welcome, ...w };
  };

  /** One packet on a fresh stream; it must be refused with `problem`, leaving everything as it was. */
  const mustRefuse = async (source: string, ops: Op[], problem: RegExp, what: string) => {
    const { s, welcome, check } = await connect(source);
    const seq = welcome.appliedSeq + 1;
    s.packet(seq, ops);
    assertRejected(await s.next("nack"), seq, problem, what);
    const end = await s.ended();
    assert.equal(end.code, grpc.status.OK, `${what}: the target ends the stream after refusing (${end.details})`);
    s.close();
    await check(what);
    alive();
  };

  await t.test("a. path traversal and malformed paths are refused, nothing is written", async () => {
    const dotdot = /contains '\.\.'/;
    const cases: [string, Op[], RegExp][] = [
      ["create ../outside/x", [op.create("../outside/x")], dotdot],
      ["create ../../../outside/x (the canary)", [op.create("../../../outside/x"), op.write("../../../outside/x", "pwned")], dotdot],
      ["write a/../../outside/x", [op.write("a/../../outside/x", "pwned")], dotdot],
      ["mkdir a/../../../../outside/newdir", [op.mkdir("a/../../../../outside/newdir")], dotdot],
      ["write /etc/passwd-style absolute", [op.write("/etc/passwd", "root::0:0::/root:/bin/sh\n")], /is absolute/],
      ["create absolute path of the canary", [op.create(path.join(outside, "x"))], /is absolute/],
      ["create a//b", [op.create("a//b")], /empty component/],
      ["create trailing slash x/", [op.create("x/")], /empty component/],
      ["mkdir ./a", [op.mkdir("./a")], /contains '\.'/],
      ["create a/./b", [op.create("a/./b")], /contains '\.'/],
      ["create a\\u0000b", [op.create("a\u0000b")], /NUL byte/],
      ["create empty path", [op.create("")], /empty path/],
      ["create a 256-byte component", [op.create("x".repeat(256))], /longer than 255/],
      ["remove ../../../outside/secret", [op.remove("../../../outside/secret")], dotdot],
      ["symlink at ../../../outside/lnk", [op.symlink("../../../outside/lnk", "/etc/passwd")], dotdot],
      ["symlink with a NUL in its target", [op.symlink("lnk", "a\u0000b")], /invalid target/],
      ["rename ok -> ../../outside/y", [op.create("ok"), op.write("ok", "data"), op.rename("ok", "../../outside/y")], dotdot],
      ["rename ok -> ../../../outside/y (the canary)", [op.create("ok"), op.write("ok", "data"), op.rename("ok", "../../../outside/y")], dotdot],
      ["rename ../../../outside/secret -> stolen", [op.rename("../../../outside/secret", "stolen")], dotdot],
      ["hard link ok -> existing ../../outside/secret", [op.link("ok", "../../outside/secret")], dotdot],
      ["hard link ok -> existing ../../../outside/secret (the canary)", [op.link("ok", "../../../outside/secret")], dotdot],
      ["hard link ok -> existing absolute canary", [op.link("ok", path.join(outside, "secret"))], /is absolute/],
    ];
    for (const [what, ops, problem] of cases) await mustRefuse("h-a", ops, problem, what);
    const st = await imageStatus("h-a");
    assert.equal(st?.appliedSeq, 0, "no refused packet counts as applied");
    assert.match(st?.lastError ?? "", /refused/, "the image status shows the refusal");
  });

  await t.test("b. a replicated symlink is never followed", async () => {
    const img = guard.image("h-b");
    // 1. Symlinks may point anywhere (they are data): accepted as they are.
    {
      const { s } = await connect("h-b");
      s.packet(1, [op.symlink("evil", outside), op.symlink("evilfile", path.join(outside, "secret")), op.mkdir("real")]);
      await s.acked(1);
      assert.equal(await readlink(path.join(img, "evil")), outside);
      assert.equal(await readlink(path.join(img, "evilfile")), path.join(outside, "secret"));
      s.close();
    }
    // 2. Paths through the symlinked directory are refused (also after ops that pass).
    await mustRefuse("h-b", [op.create("evil/pwned"), op.write("evil/pwned", "pwned")], /goes through symlink "evil"/, "create evil/pwned");
    await mustRefuse("h-b", [op.write("evil/secret", "pwned")], /goes through symlink "evil"/, "write evil/secret");
    await mustRefuse("h-b", [op.mkdir("real/x"), op.mkdir("evil/sub/deeper")], /goes through symlink "evil"/, "mkdir evil/sub/deeper");
    await mustRefuse("h-b", [op.remove("evil/secret")], /goes through symlink "evil"/, "remove evil/secret");
    await mustRefuse("h-b", [op.rename("evil/secret", "stolen")], /goes through symlink "evil"/, "rename evil/secret out");
    await mustRefuse("h-b", [op.rename("real", "evil/real")], /goes through symlink "evil"/, "rename into evil/");
    await mustRefuse("h-b", [op.link("evil/hard", "real")], /goes through symlink "evil"/, "hard link evil/hard");
    await mustRefuse("h-b", [op.link("stolen", "evil/secret")], /goes through symlink "evil"/, "hard link to evil/secret");
    // 3. Writing to the symlink itself does not write through it.
    await mustRefuse("h-b", [op.write("evilfile", "pwned")], /symlink on the target; refusing to write through it/, "write to symlink evilfile");
    await mustRefuse("h-b", [op.truncate("evilfile", 0)], /symlink on the target; refusing to write through it/, "truncate symlink evilfile");
    // 4. Ops that replace or touch the symlink itself work on the link, inside the image.
    const { s, check } = await connect("h-b", { imageMayChange: true });
    s.packet(2, [op.attr("evilfile", 0o777), op.attr("evil", 0o777)]);
    await s.acked(2);
    assert.ok((await lstat(path.join(img, "evilfile"))).isSymbolicLink(), "attr leaves the symlink a symlink");
    s.packet(3, [op.create("evilfile"), op.write("evilfile", "inside")]);
    await s.acked(3);
    const st = await lstat(path.join(img, "evilfile"));
    assert.ok(st.isFile(), "create replaced the symlink with a regular file in the image");
    assert.equal(await readFile(path.join(img, "evilfile"), "utf8"), "inside");
    s.packet(4, [op.mkdir("evil")]);
    await s.acked(4);
    s.packet(5, [op.create("evil/inside"), op.write("evil/inside", "in")]);
    await s.acked(5);
    assert.ok((await lstat(path.join(img, "evil"))).isDirectory(), "mkdir replaced the symlink with a directory in the image");
    assert.equal(await readFile(path.join(img, "evil/inside"), "utf8"), "in");
    s.close();
    await check("ops on the symlinks themselves");
    assert.equal(await readFile(path.join(outside, "secret"), "utf8"), "the secret\n");
    assert.equal((await lstat(path.join(outside, "secret"))).mode & 0o777, 0o640);
    alive();
  });

  await t.test("b2. a hard link cannot turn a checked directory into a symlink out of the image", async () => {
    // `d` is checked (and remembered as a real directory) while d/x is created;
    // then d is replaced by a hard link to the symlink `s` -> outside; d/pwned must not land outside.
    const { s, check } = await connect("h-b2", { imageMayChange: true });
    s.packet(1, [op.symlink("s", outside), op.mkdir("d"), op.create("d/x")]);
    await s.acked(1);
    s.packet(2, [op.link("d", "s")]);
    s.packet(3, [op.create("d/pwned"), op.write("d/pwned", "pwned")]);
    const o = await s.outcome(3);
    s.close();
    const leaked = await exists(path.join(outside, "pwned"));
    assert.equal(leaked, false, `a file was created OUTSIDE the image through the hard-linked symlink d (outcome of packet 3: ${JSON.stringify(o)})`);
    await check("hard link over a checked directory");
    alive();
  });

  await t.test("c. a packet with one good and one hostile op is refused whole (preflight)", async () => {
    await mustRefuse("h-c", [op.create("fine.txt"), op.write("fine.txt", "fine"), op.mkdir("dir"), op.create("../../../outside/x")], /contains '\.\.'/, "good ops then traversal");
    await mustRefuse("h-c", [op.create("fine.txt"), op.write("fine.txt", "fine"), op.rename("fine.txt", "/tmp/x")], /is absolute/, "good ops then absolute rename");
    await mustRefuse("h-c", [op.symlink("fine-link", "x"), op.write("a\u0000", "x")], /NUL/, "symlink then NUL path");
    assert.equal(await exists(path.join(guard.image("h-c"), "fine.txt")), false);
  });

  await t.test("c2. a packet whose later op goes through a symlink made by an earlier op is refused whole", async () => {
    // Preflight cannot see that `s` will be a symlink; the apply-time check refuses s/x, but is s left behind?
    await mustRefuse("h-c2", [op.create("fine.txt"), op.symlink("s", outside), op.create("s/x")], /goes through symlink "s"/, "symlink then a path through it");
  });

  await t.test("d. garbage is refused with a clear error and the target keeps serving", async () => {
    // Not protobuf at all (an over-long varint, then random bytes), as the first message and after a Hello.
    const garbage = () => Buffer.concat([Buffer.alloc(11, 0xff), randomBytes(200)]);
    {
      const w = await guard.watch([]);
      const s = new HostileSession(addr, { raw: true });
      s.write(garbage());
      const end = await s.ended();
      assert.notEqual(end.code, grpc.status.OK, "garbage as the first message fails the stream");
      assert.match(end.details, /deserializ/i, "the error says the message could not be decoded");
      assert.equal(s.messages.length, 0, "no Welcome for garbage");
      s.close();
      await w.check("garbage first message");
      alive();
    }
    {
      const { s, check } = await connect("h-d", { raw: true });
      s.write(garbage());
      const end = await s.ended();
      assert.notEqual(end.code, grpc.status.OK, "garbage after the Hello fails the stream");
      assert.match(end.details, /deserializ/i);
      s.close();
      await check("garbage after Hello");
      alive();
    }
    // Well-framed packets with bodies that are garbage.
    const body = Buffer.concat([Buffer.alloc(11, 0xff), randomBytes(500)]);
    const bomb = zstdCompressSync(Buffer.alloc(64 * 1024 * 1024));
    const cases: [string, { compression: number; body: Buffer; rawSize: number }, RegExp][] = [
      ["uncompressed garbage", { compression: 0, body, rawSize: body.length }, /not a valid op batch/],
      ["zstd garbage", { compression: 1, body, rawSize: 4096 }, /does not decompress/],
      ["zstd bomb (64 MiB of zeros claiming 1000 bytes)", { compression: 1, body: bomb, rawSize: 1000 }, /does not decompress/],
      ["zstd with an absurd raw size", { compression: 1, body: bomb, rawSize: MAX_MESSAGE_BYTES * 4 + 1 }, /exceeds the limit/],
      ["unknown compression", { compression: 9, body, rawSize: body.length }, /unknown compression 9/],
      ["raw size that lies", { compression: 0, body, rawSize: body.length + 1 }, /header says/],
      ["an op without a kind", { compression: 0, body: batchBytes([{ path: "x", kind: undefined }]), rawSize: batchBytes([{ path: "x", kind: undefined }]).length }, /has no kind/],
    ];
    for (const [what, p, problem] of cases) {
      const { s, welcome, check } = await connect("h-d");
      const seq = welcome.appliedSeq + 1;
      s.rawPacket({ seq, compression: p.compression as 0, body: p.body, rawSize: p.rawSize });
      assertRejected(await s.next("nack"), seq, problem, what);
      await s.ended();
      s.close();
      await check(what);
      alive();
    }
    // A well-behaved source is still served.
    const good = new HostileSession(addr);
    good.hello("h-d-good", SET);
    assert.equal((await good.next("welcome")).appliedSeq, 0);
    good.packet(1, [op.create("hello.txt"), op.write("hello.txt", "still here")]);
    await good.acked(1);
    good.close();
    assert.equal(await readFile(path.join(guard.image("h-d-good"), "hello.txt"), "utf8"), "still here");
    assert.equal((await imageStatus("h-d-good"))?.appliedSeq, 1);
    alive();
  });

  await t.test("d2. a SetAttr without attributes is refused as malformed (or ignored), not an apply failure", async () => {
    const { s } = await connect("h-d2", { imageMayChange: true });
    s.packet(1, [op.create("f")]);
    await s.acked(1);
    s.packet(2, [{ path: "f", kind: { $case: "attr", value: { attr: undefined } } }]);
    const o = await s.outcome(2);
    s.close();
    // Either refused as malformed or ignored; not an "apply failed, retry later" the source would retry forever.
    if ("nack" in o) assert.equal(o.nack.reason, Nack_Reason.REASON_REJECTED, `a malformed op is REJECTED (a permanent refusal), got reason ${o.nack.reason}: ${o.nack.message}`);
    else assert.ok("acked" in o, `packet 2: ${JSON.stringify(o)}`);
    alive();
  });

  await t.test("e. a wrong protocol version is refused naming both versions", async () => {
    for (const theirs of [PROTOCOL_VERSION + 6, 0]) {
      const w = await guard.watch([]);
      const s = new HostileSession(addr);
      s.hello("h-e", SET, { protocolVersion: theirs });
      s.packet(1, [op.create("x")]);
      const end = await s.ended();
      s.close();
      assert.equal(end.code, grpc.status.FAILED_PRECONDITION, `v${theirs}: ${end.details}`);
      assert.match(end.details, new RegExp(`\\bv${PROTOCOL_VERSION}\\b`), `names the target's version: ${end.details}`);
      assert.match(end.details, new RegExp(`\\bv${theirs}\\b`), `names the claimed version: ${end.details}`);
      assert.equal(s.messages.length, 0, "no Welcome");
      await w.check(`protocol v${theirs}`);
      assert.equal(await exists(path.join(pair.dstRoot, "h-e")), false, "no image is opened for a refused peer");
    }
    alive();
  });

  await t.test("f. the first message must be a Hello with valid names", async () => {
    const w = await guard.watch([]);
    for (const [what, send] of [
      ["a packet first", (s: HostileSession) => s.packet(1, [op.create("x")])],
      ["an empty message first", (s: HostileSession) => s.write({ msg: undefined })],
    ] as const) {
      const s = new HostileSession(addr);
      send(s);
      const end = await s.ended();
      s.close();
      assert.equal(end.code, grpc.status.INVALID_ARGUMENT, `${what}: ${end.details}`);
      assert.match(end.details, /first message .*must be Hello/, what);
    }
    for (const [source, set] of [["../x", SET], ["ok", "../x"], ["ok", "../../../outside"], ["", SET], ["ok", ""], ["a/b", SET], ["Alice", SET], [".", SET], ["ok", "x\u0000"], ["-x", SET], ["x".repeat(64), SET]]) {
      const s = new HostileSession(addr);
      s.hello(source!, set!);
      s.packet(1, [op.create("x")]);
      const end = await s.ended();
      s.close();
      assert.equal(end.code, grpc.status.INVALID_ARGUMENT, `Hello ${JSON.stringify(source)}/${JSON.stringify(set)}: ${end.details}`);
      assert.match(end.details, /invalid source or set name/);
      assert.equal(s.messages.length, 0, "no Welcome");
    }
    await w.check("bad Hellos");
    {
      const s = new HostileSession(addr);
      s.hello("h-f", SET);
      await s.next("welcome");
      s.hello("h-f", "other");
      const end = await s.ended();
      s.close();
      assert.equal(end.code, grpc.status.INVALID_ARGUMENT);
      assert.match(end.details, /unexpected hello/);
    }
    alive();
  });

  await t.test("f2. a stream closed before any Hello is answered, not left hanging", async () => {
    const s = new HostileSession(addr);
    s.finish();
    const end = await s.ended(5_000).catch(() => undefined);
    s.close();
    assert.ok(end, "the target ends a stream whose client half-closed without sending a Hello (it stays open until the client gives up)");
  });

  await t.test("h. sequence gaps are nacked, duplicates are not applied twice", async () => {
    const img = guard.image("h-h");
    const { s, welcome } = await connect("h-h", { imageMayChange: true });
    assert.equal(welcome.appliedSeq, 0);
    s.packet(5, [op.create("gap.txt"), op.write("gap.txt", "from the future")]);
    const n = await s.next("nack");
    assert.equal(n.reason, Nack_Reason.REASON_GAP, n.message);
    assert.equal(n.expectedSeq, 1);
    assert.equal(await exists(path.join(img, "gap.txt")), false, "a packet after a gap is not applied");
    assert.equal((await imageStatus("h-h"))?.appliedSeq, 0);
    // Packet 1 makes a new file (a new inode); packet 2 overwrites its content.
    s.packet(1, [op.create("f"), op.write("f", "one")]);
    await s.acked(1);
    s.packet(2, [op.write("f", "two")]);
    await s.acked(2);
    const ino = (await lstat(path.join(img, "f"))).ino;
    assert.equal(await readFile(path.join(img, "f"), "utf8"), "two");
    assert.equal((await imageStatus("h-h"))?.appliedSeq, 2);
    // Resending packet 1: applying it again would replace f by a new empty-then-"one" file.
    const acks = s.ackCount;
    s.packet(1, [op.create("f"), op.write("f", "one")]);
    await waitFor("an Ack for the duplicate", () => s.ackCount > acks || (s.end ? Promise.reject(new Error(s.describe())) : false), 30_000, 20);
    const last = s.messages.filter((m) => m.msg?.$case === "ack").at(-1)!.msg as { value: { seq: number } };
    assert.equal(last.value.seq, 2, "the duplicate is answered with what is durable");
    assert.ok(!s.messages.some((m) => m.msg?.$case === "nack" && m.msg.value.reason !== Nack_Reason.REASON_GAP), s.describe());
    assert.equal(await readFile(path.join(img, "f"), "utf8"), "two", "the duplicate was not applied");
    assert.equal((await lstat(path.join(img, "f"))).ino, ino, "f was not recreated");
    assert.equal((await imageStatus("h-h"))?.appliedSeq, 2, "appliedSeq did not move");
    assert.equal(s.end, undefined, "the stream goes on");
    s.close();
    // A new stream is welcomed at the applied seq.
    const s2 = new HostileSession(addr);
    s2.hello("h-h", SET);
    assert.equal((await s2.next("welcome")).appliedSeq, 2);
    s2.close();
    alive();
  });

  const reader = new ReplicationClient(addr, grpc.credentials.createInsecure());
  t.after(() => reader.close());
  const unary = <R>(fn: (cb: (e: grpc.ServiceError | null, r?: R) => void) => unknown) => new Promise<R>((res, rej) => fn((e, r) => (e ? rej(e) : res(r!))));

  await t.test("i. read-side traversal: listings and digests of paths outside the image are refused, nothing leaks", async () => {
    // An image with a symlink out of it, to list through.
    const { s } = await connect("h-i", { imageMayChange: true });
    s.packet(1, [op.symlink("evil", outside), op.create("ok"), op.write("ok", "fine")]);
    await s.acked(1);
    s.close();
    const w = await guard.watch([]);
    const leaks = (x: unknown) => /secret/.test(JSON.stringify(x));
    for (const dir of ["..", "../..", "../../../outside", outside, "evil", "evil/sub", "a/../..", "\u0000"]) {
      const r = await unary<ManifestResponse>((cb) => reader.manifest({ source: "h-i", set: SET, dir, blockSize: 0, digestMaxBlocks: 64, digestAlgo: DigestAlgo.DIGEST_ALGO_SHA256_128 }, cb)).then(
        (v) => v,
        (e: grpc.ServiceError) => e,
      );
      if (r instanceof Error) assert.match(r.details, /\.\.|absolute|symlink|NUL|invalid|refus/i, `listing ${JSON.stringify(dir)} is refused with a clear error: ${r.details}`);
      else assert.ok(!r.exists || (r.entries.length === 0 && !leaks(r)), `listing ${JSON.stringify(dir)} showed something outside the image: ${JSON.stringify(r)}`);
    }
    for (const p of ["../../../outside/secret", path.join(outside, "secret"), "evil/secret", "a/../../../../outside/secret"]) {
      const r = await unary<DigestsResponse>((cb) => reader.digests({ source: "h-i", set: SET, path: p, blockSize: 0, digestAlgo: DigestAlgo.DIGEST_ALGO_SHA256_128 }, cb)).then(
        (v) => v,
        (e: grpc.ServiceError) => e,
      );
      if (r instanceof Error) assert.match(r.details, /\.\.|absolute|symlink|invalid|refus/i, `digests of ${JSON.stringify(p)} refused with a clear error: ${r.details}`);
      else assert.equal(r.exists, false, `digests of ${JSON.stringify(p)} read a file outside the image: ${JSON.stringify(r)}`);
    }
    // Another image's name that escapes the target root.
    for (const [source, set] of [["..", SET], ["h-i", "../../outside"], ["../outside", "x"]]) {
      const r = await unary<ManifestResponse>((cb) => reader.manifest({ source: source!, set: set!, dir: "", blockSize: 0, digestMaxBlocks: 0, digestAlgo: DigestAlgo.DIGEST_ALGO_SHA256_128 }, cb)).then(
        (v) => v,
        (e: grpc.ServiceError) => e,
      );
      if (r instanceof Error) assert.match(r.details, /invalid|name|not found|no image/i, `${source}/${set}: ${r.details}`);
      else assert.ok(!r.exists || !leaks(r), `${source}/${set} listed outside the target root: ${JSON.stringify(r)}`);
    }
    await w.check("read-side traversal");
    alive();
  });

  await t.test("j. an oversized message is refused by size; the target keeps serving", async () => {
    const { s, welcome, check } = await connect("h-j");
    s.packet(welcome.appliedSeq + 1, [op.create("big"), op.write("big", "x".repeat(MAX_MESSAGE_BYTES + 1024))]);
    const end = await s.ended(30_000);
    s.close();
    assert.equal(end.code, grpc.status.RESOURCE_EXHAUSTED, `a message over ${MAX_MESSAGE_BYTES} bytes: ${grpc.status[end.code]} ${end.details}`);
    assert.match(end.details, /larger than max|exceeds|too large/i);
    await check("oversized message");
    alive();
  });

  await t.test("k. truncated messages (a stream message or a packet body cut short) are refused", async () => {
    {
      const { s, check } = await connect("h-k", { raw: true });
      const whole = Buffer.from(SourceMessage.encode({ msg: { $case: "packet", value: { seq: 1, compression: 0, body: batchBytes([op.create("cut"), op.write("cut", "x".repeat(500))]), rawSize: 0 } } }).finish());
      s.write(whole.subarray(0, whole.length - 200));
      const end = await s.ended();
      s.close();
      assert.notEqual(end.code, grpc.status.OK, "a message cut short fails the stream");
      assert.match(end.details, /deserializ/i);
      await check("truncated stream message");
      alive();
    }
    {
      const body = batchBytes([op.create("cut"), op.write("cut", "x".repeat(500))]);
      const cut = body.subarray(0, body.length - 100);
      const { s, welcome, check } = await connect("h-k");
      const seq = welcome.appliedSeq + 1;
      s.rawPacket({ seq, compression: 0, body: cut, rawSize: cut.length });
      assertRejected(await s.next("nack"), seq, /not a valid op batch/, "truncated body");
      s.close();
      await check("truncated packet body");
      alive();
    }
  });

  await t.test("l. lying offsets and sizes: huge writes and truncates are refused, not a crash or a disk filled", async () => {
    for (const [what, ops] of [
      ["write at offset 2^53-1", [op.create("f"), op.write("f", "x", 2 ** 53 - 1)]],
      ["truncate to 2^62 bytes", [op.create("f"), op.truncate("f", 2 ** 62)]],
      ["write at offset 2^63 (wraps as uint64)", [op.create("f"), { path: "f", kind: { $case: "write", value: { offset: 2 ** 63, data: Buffer.from("x") } } } as Op]],
    ] as const) {
      const { s, welcome, check } = await connect("h-l", { imageMayChange: true });
      const seq = welcome.appliedSeq + 1;
      s.packet(seq, [...ops]);
      const o = await s.outcome(seq, 30_000);
      s.close();
      assert.ok("nack" in o || "end" in o, `${what}: refused (got ${JSON.stringify(o)})`);
      if ("nack" in o) assert.match(o.nack.message, /EFBIG|EINVAL|too large|larger than|offset|size|range/i, `${what}: the error says why: ${o.nack.message}`);
      await check(what);
      const st = await lstat(path.join(guard.image("h-l"), "f")).catch(() => undefined);
      assert.ok(!st || st.size < 2 ** 45, `${what}: no giant file left in the image (${st?.size})`);
      alive();
    }
  });

  await t.test("m. sequence games: seq 0, a huge seq and reordered packets", async () => {
    const img = guard.image("h-m");
    const { s, welcome } = await connect("h-m", { imageMayChange: true });
    assert.equal(welcome.appliedSeq, 0);
    s.packet(0, [op.create("zero")]); // (a seq below the first one: answered or ignored, never applied)
    // 2 before 1: 2 is a gap (not applied), then 1 and 2 in order are.
    s.packet(2, [op.write("f", "second")]);
    const gap = await s.next("nack");
    assert.equal(gap.reason, Nack_Reason.REASON_GAP);
    assert.equal(gap.expectedSeq, 1);
    s.packet(1, [op.create("f"), op.write("f", "first")]);
    await s.acked(1);
    s.packet(2, [op.write("f", "second")]);
    await s.acked(2);
    s.close();
    // A sequence number from far in the future: a gap, not applied.
    const f = new HostileSession(addr);
    f.hello("h-m", SET);
    await f.next("welcome");
    f.packet(2 ** 53 - 1, [op.create("far")]);
    const far = await f.next("nack");
    assert.equal(far.reason, Nack_Reason.REASON_GAP, far.message);
    assert.equal(far.expectedSeq, 3);
    f.close();
    assert.equal(await readFile(path.join(img, "f"), "utf8"), "second");
    assert.equal(await exists(path.join(img, "far")), false);
    assert.equal(await exists(path.join(img, "zero")), false, "packet 0 was not applied");
    assert.equal((await imageStatus("h-m"))?.appliedSeq, 2);
    alive();
  });

  await t.test("o. out-of-range attribute values (mode, owner, times) do not bring the target down", async () => {
    // A Create whose mode did not fit in an int32 aborted the agent process (a native assertion in open()).
    const big = { mode: 0xffffffff, uid: 0xffffffff, gid: 0xfffffffe, mtimeSec: 2 ** 40, mtimeNsec: 0xffffffff, xattrs: [], hasXattrs: false };
    for (const [what, ops] of [
      ["create with mode 0xffffffff", [{ path: "m1", kind: { $case: "create", value: { attr: { ...big, uid: 0, gid: 0, mtimeSec: 0, mtimeNsec: 0 } } } }]],
      ["create with mode 0x80000000", [{ path: "m2", kind: { $case: "create", value: { attr: { ...big, mode: 0x80000000, uid: 0, gid: 0, mtimeSec: 0, mtimeNsec: 0 } } } }]],
      ["mkdir with every field at its maximum", [{ path: "m3", kind: { $case: "mkdir", value: { attr: big } } }]],
      ["attr with every field at its maximum", [op.create("m4"), { path: "m4", kind: { $case: "attr", value: { attr: big } } }]],
      ["mknod with a huge mode", [{ path: "m5", kind: { $case: "mknod", value: { type: "p", major: 0, minor: 0, attr: big } } }]],
    ] as [string, Op[]][]) {
      const { s, welcome, check } = await connect("h-o", { imageMayChange: true });
      const seq = welcome.appliedSeq + 1;
      s.packet(seq, ops);
      const o = await s.outcome(seq, 30_000);
      s.close();
      assert.ok(!("end" in o) || o.end.code === grpc.status.OK, `${what}: answered, not a dead stream (${JSON.stringify(o)})`);
      alive();
      await check(what);
    }
    const st = await lstat(path.join(guard.image("h-o"), "m1")).catch(() => undefined);
    if (st) assert.equal(st.mode & 0o170000, 0o100000, "m1 is a regular file");
  });

  await t.test("n. a stale epoch is fenced: a source older than the image's epoch cannot write it", async () => {
    const s = new HostileSession(addr);
    s.hello("h-n", SET, { epoch: 5 });
    await s.next("welcome");
    s.packet(1, [op.create("at-5")]);
    await s.acked(1);
    s.close();
    const w = await guard.watch([["h-n", SET]]);
    const old = new HostileSession(addr);
    old.hello("h-n", SET, { epoch: 3 });
    old.packet(2, [op.create("from-epoch-3")]);
    const end = await old.ended();
    old.close();
    assert.notEqual(end.code, grpc.status.OK, "the stale source's stream is refused");
    assert.match(end.details, /fenced.*epoch 5.*epoch 3 is older/, end.details);
    assert.equal(old.messages.length, 0, "no Welcome for a fenced source");
    await w.check("stale epoch");
    alive();
  });
});

test("with mTLS, only a source with a valid certificate for its own name gets in", { timeout: 60_000 }, async (t) => {
  const dir = await tmpDir("understudy-hostile-tls-");
  const agent: { proc?: ChildProcess } = {};
  t.after(async () => {
    HostileSession.closeAll();
    const proc = agent.proc;
    if (proc && proc.exitCode === null) {
      const exited = new Promise((r) => proc.once("exit", r));
      proc.kill("SIGTERM");
      const k = setTimeout(() => proc.kill("SIGKILL"), 5_000);
      await exited;
      clearTimeout(k);
    }
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });
  const caDir = path.join(dir, "ca");
  await createCA(caDir);
  const certs = path.join(dir, "certs");
  const tgt = await issueCert({ caDir, name: "tls-target", hosts: ["127.0.0.1"], outDir: certs });
  const alice = await issueCert({ caDir, name: "alice", hosts: ["127.0.0.1"], outDir: certs });
  const mallory = await issueCert({ caDir, name: "mallory", hosts: ["127.0.0.1"], outDir: certs });
  await createCA(path.join(dir, "other-ca"), { commonName: "another CA" });
  const rogue = await issueCert({ caDir: path.join(dir, "other-ca"), name: "alice", hosts: ["127.0.0.1"], outDir: path.join(dir, "rogue") });
  // Alice's own name, our CA, valid for one second: expired by the time it is used.
  const expired = await issueCert({ caDir, name: "alice", hosts: ["127.0.0.1"], outDir: path.join(dir, "expired"), days: 1 / 86400 });
  const outside = path.join(dir, "outside");
  await mkdir(outside);
  await writeFile(path.join(outside, "secret"), "the secret\n");

  const port = await freePort();
  const address = `127.0.0.1:${port}`;
  const cfg = { name: "tls-target", listen: address, dataDir: "state", tls: { ca: tgt.caPath, cert: tgt.certPath, key: tgt.keyPath }, target: { root: "dst" } };
  await writeFile(path.join(dir, "agent.yaml"), YAML.stringify(cfg));
  const logPath = path.join(dir, "agent.log");
  const fd = openSync(logPath, "a");
  const p = spawn(process.execPath, [CLI, "agent", "--config", path.join(dir, "agent.yaml")], { stdio: ["ignore", fd, fd] });
  agent.proc = p;
  closeSync(fd); // the agent has its own copy
  const aliceTls = { ca: alice.caPath, cert: alice.certPath, key: alice.keyPath };
  await waitFor("the TLS target agent to answer", async () => {
    if (p.exitCode !== null) throw new Error(`agent exited with ${p.exitCode}:\n${await readFile(logPath, "utf8")}`);
    return (await fetchStatus(address, aliceTls, 1000).catch(() => undefined)) ?? false;
  }, 60_000);
  const alive = () => assert.equal(p.exitCode, null, "the TLS target agent is still running");

  const ca = await readFile(alice.caPath);
  const creds = {
    none: grpc.credentials.createInsecure(),
    noClientCert: grpc.credentials.createSsl(ca),
    otherCa: grpc.credentials.createSsl(ca, await readFile(rogue.keyPath), await readFile(rogue.certPath)),
    mallory: grpc.credentials.createSsl(ca, await readFile(mallory.keyPath), await readFile(mallory.certPath)),
    alice: grpc.credentials.createSsl(ca, await readFile(alice.keyPath), await readFile(alice.certPath)),
    expired: grpc.credentials.createSsl(ca, await readFile(expired.keyPath), await readFile(expired.certPath)),
  };
  const expiredAt = new Date(new X509Certificate(await readFile(expired.certPath)).validTo).getTime();
  const guard = new Guard(dir, "dst", ["agent.log", "state"]);
  const w = await guard.watch([]);
  const aliceImage = path.join(dir, "dst", "alice");

  /** Hello as alice (with a packet right behind it), over the given credentials. */
  const tryAsAlice = async (c: grpc.ChannelCredentials) => {
    const s = new HostileSession(address, { credentials: c });
    s.hello("alice", SET);
    s.packet(1, [op.create("pwned.txt"), op.write("pwned.txt", "pwned")]);
    const end = await s.ended(15_000);
    const msgs = s.messages.length;
    s.close();
    return { end, msgs };
  };

  await t.test("g. plaintext, no client certificate, another CA's certificate and an expired certificate are refused", async () => {
    await waitFor("alice's short-lived certificate to expire", () => Date.now() > expiredAt + 1000, 30_000, 100);
    for (const [what, c] of [["plaintext", creds.none], ["TLS without a client certificate", creds.noClientCert], ["a client certificate from another CA", creds.otherCa], ["alice's expired certificate (our CA, her name)", creds.expired]] as const) {
      const { end, msgs } = await tryAsAlice(c);
      // Refused by the TLS handshake itself, before the identity check of the service.
      assert.equal(end.code, grpc.status.UNAVAILABLE, `${what}: refused at the connection (${grpc.status[end.code]}: ${end.details})`);
      assert.equal(msgs, 0, `${what}: no Welcome`);
      assert.equal(await exists(aliceImage), false, `${what}: nothing written for alice`);
      alive();
    }
  });

  await t.test("g. a valid certificate for mallory cannot write alice's image", async () => {
    const { end, msgs } = await tryAsAlice(creds.mallory);
    assert.equal(end.code, grpc.status.PERMISSION_DENIED, end.details);
    assert.match(end.details, /"alice"/);
    assert.match(end.details, /"mallory"/);
    assert.equal(msgs, 0, "no Welcome");
    assert.equal(await exists(aliceImage), false, "nothing written into (or created for) alice's image");
    alive();
  });

  await t.test("g. nothing outside the target root (nor in it) changed", async () => {
    await w.check("TLS refusals");
  });

  await t.test("g. control: mallory and alice with their own names are welcomed and applied", async () => {
    // The refusals above are about identity, not broken certificates.
    const m = new HostileSession(address, { credentials: creds.mallory });
    m.hello("mallory", SET);
    await m.next("welcome");
    m.close();
    const s = new HostileSession(address, { credentials: creds.alice });
    s.hello("alice", SET);
    assert.equal((await s.next("welcome")).appliedSeq, 0);
    s.packet(1, [op.create("hello.txt"), op.write("hello.txt", "from alice")]);
    await s.acked(1);
    s.close();
    assert.equal(await readFile(path.join(aliceImage, SET, "hello.txt"), "utf8"), "from alice");
    assert.equal(await readFile(path.join(outside, "secret"), "utf8"), "the secret\n");
    alive();
  });

  await t.test("secrets: no private key (the agent's own, the sources', the CA's) appears in the agent's log", async () => {
    const log = await readFile(logPath, "utf8");
    assert.match(log, /refused|denied|PERMISSION_DENIED|mallory/i, "the log recorded the refusals above (it is the right log)");
    for (const [who, keyPath] of [["the target agent", tgt.keyPath], ["alice", alice.keyPath], ["mallory", mallory.keyPath], ["the CA", path.join(caDir, "ca.key")], ["the expired certificate", expired.keyPath]] as const) {
      const pem = await readFile(keyPath, "utf8").catch(() => "");
      if (who !== "the CA") assert.ok(pem, `${who}'s key was read`);
      for (const line of pem.split("\n").filter((l) => l.length >= 40 && !l.startsWith("-----"))) assert.ok(!log.includes(line), `${who}'s private key appears in the agent's log`);
    }
  });
});
