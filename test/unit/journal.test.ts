// Tests of the source-side journal (agent/queue/journal.ts): round trips from
// memory and disk, reopen, release, torn-tail repair, corruption detection,
// concurrency, a model-based property test, a kill -9 crash test and a memory bound.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { appendFile, mkdtemp, open, readdir, rm, stat, truncate, unlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import fc from "fast-check";
import { Journal, type JournalEntry } from "../../agent/queue/journal.ts";

const JOURNAL_MODULE = fileURLToPath(new URL("../../agent/queue/journal.ts", import.meta.url));
const HEADER = 24;

async function tempDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "understudy-journal-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Deterministic content for an entry: seq in the first bytes, then a seq-dependent pattern. */
function pattern(seq: number, size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (seq * 31 + i * 7) & 0xff;
  if (size >= 8) b.writeDoubleLE(seq, 0);
  return b;
}

async function segFiles(dir: string): Promise<string[]> {
  return (await readdir(dir)).filter((n) => n.endsWith(".seg")).sort();
}

async function collect(it: AsyncIterable<JournalEntry>): Promise<JournalEntry[]> {
  const out: JournalEntry[] = [];
  for await (const e of it) out.push(e);
  return out;
}

test("append/read round trip from memory", async (t) => {
  const dir = await tempDir(t);
  const j = await Journal.open({ dir, memoryBytes: 1 << 20 });
  assert.equal(j.firstSeq, 1);
  assert.equal(j.lastSeq, 0);
  const seen: number[] = [];
  j.events.on("append", (seq: number) => seen.push(seq));
  const written: Buffer[] = [];
  for (let i = 1; i <= 10; i++) {
    const p = pattern(i, 100 * i);
    written.push(p);
    assert.equal(await j.append(p, Buffer.from(`meta-${i}`)), i);
  }
  assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.equal(j.firstSeq, 1);
  assert.equal(j.lastSeq, 10);
  for (let i = 1; i <= 10; i++) {
    const e = await j.read(i);
    assert.ok(e);
    assert.equal(e.seq, i);
    assert.deepEqual(e.payload, written[i - 1]);
    assert.equal(e.meta.toString(), `meta-${i}`);
  }
  assert.equal(await j.read(0), undefined);
  assert.equal(await j.read(11), undefined);
  const total = written.reduce((n, p, i) => n + p.length + `meta-${i + 1}`.length, 0);
  assert.deepEqual(j.bytes(), { memory: total, disk: 0 });
  // an entry without meta
  assert.equal(await j.append(Buffer.from("no meta")), 11);
  assert.equal((await j.read(11))?.meta.length, 0);
  await j.close();
  await assert.rejects(j.append(Buffer.from("x")), /closed/);
});

test("entries beyond memoryBytes spill to disk and are read back intact", async (t) => {
  const dir = await tempDir(t);
  const memoryBytes = 1000;
  const j = await Journal.open({ dir, memoryBytes, segmentBytes: 4096 });
  const written: Buffer[] = [];
  let total = 0;
  for (let i = 1; i <= 60; i++) {
    const p = pattern(i, 300);
    written.push(p);
    await j.append(p, Buffer.from([i]));
    total += 301;
    const b = j.bytes();
    assert.ok(b.memory <= memoryBytes, `memory ${b.memory} > ${memoryBytes}`);
    assert.equal(b.memory + b.disk, total);
  }
  assert.ok(j.bytes().disk > 0);
  assert.ok(j.bytes().memory > 0, "the newest entries stay cached");
  for (let i = 1; i <= 60; i++) {
    const e = await j.read(i);
    assert.ok(e, `entry ${i}`);
    assert.deepEqual(e.payload, written[i - 1]);
    assert.deepEqual(e.meta, Buffer.from([i]));
  }
  // The oldest entry is not the appended buffer (it came from disk), the newest is (from memory).
  assert.notEqual((await j.read(1))!.payload, written[0]);
  assert.equal((await j.read(60))!.payload, written[59]);
  // Reads from disk in parallel, from several segments.
  const many = await Promise.all(Array.from({ length: 60 }, (_, i) => j.read(i + 1)));
  many.forEach((e, i) => assert.deepEqual(e?.payload, written[i]));
  await j.close();
});

test("entries larger than memoryBytes are never cached; memoryBytes 0 disables the cache", async (t) => {
  for (const memoryBytes of [0, 500]) {
    const dir = await tempDir(t);
    const j = await Journal.open({ dir, memoryBytes });
    await j.append(pattern(1, 100));
    await j.append(pattern(2, 2000));
    assert.ok(j.bytes().memory <= memoryBytes);
    assert.equal(j.bytes().memory + j.bytes().disk, 2100);
    assert.deepEqual((await j.read(1))!.payload, pattern(1, 100));
    assert.deepEqual((await j.read(2))!.payload, pattern(2, 2000));
    await j.close();
  }
});

test("reopen after close returns the same entries and continues numbering", async (t) => {
  const dir = await tempDir(t);
  let j = await Journal.open({ dir, memoryBytes: 2000, segmentBytes: 1500 });
  for (let i = 1; i <= 30; i++) await j.append(pattern(i, 10 * i), Buffer.from(`m${i}`));
  await j.sync();
  await j.close();
  j = await Journal.open({ dir, memoryBytes: 2000, segmentBytes: 1500 });
  assert.equal(j.recovered, null);
  assert.equal(j.firstSeq, 1);
  assert.equal(j.lastSeq, 30);
  for (let i = 1; i <= 30; i++) {
    const e = await j.read(i);
    assert.deepEqual(e?.payload, pattern(i, 10 * i));
    assert.equal(e?.meta.toString(), `m${i}`);
  }
  assert.equal(await j.append(pattern(31, 5)), 31);
  const total = Array.from({ length: 31 }, (_, k) => (k < 30 ? 10 * (k + 1) + `m${k + 1}`.length : 5)).reduce((a, b) => a + b, 0);
  assert.equal(j.bytes().memory + j.bytes().disk, total);
  await j.close();
  j = await Journal.open({ dir, memoryBytes: 2000, segmentBytes: 1500 });
  assert.equal(j.lastSeq, 31);
  assert.deepEqual((await j.read(31))?.payload, pattern(31, 5));
  await j.close();
});

test("release deletes fully released segment files and survives reopen", async (t) => {
  const dir = await tempDir(t);
  const opts = { dir, memoryBytes: 500, segmentBytes: 1000 };
  let j = await Journal.open(opts);
  for (let i = 1; i <= 100; i++) await j.append(pattern(i, 100));
  const before = await segFiles(dir);
  assert.ok(before.length >= 10, `expected many segments, got ${before.length}`);
  await j.release(50);
  assert.equal(j.firstSeq, 51);
  assert.equal(j.lastSeq, 100);
  const after = await segFiles(dir);
  assert.ok(after.length < before.length);
  // Every remaining segment still holds an unreleased entry; the first one holds seq 51.
  const firsts = after.map((n) => Number(n.slice(0, 20)));
  assert.ok(firsts[0]! <= 51 && (firsts[1] ?? Infinity) > 51, `segments ${after.join(",")}`);
  assert.equal(await j.read(50), undefined);
  assert.deepEqual((await j.read(51))?.payload, pattern(51, 100));
  assert.equal(j.bytes().memory + j.bytes().disk, 50 * 100);
  // release is monotonic: going back is a no-op
  await j.release(10);
  assert.equal(j.firstSeq, 51);
  await j.close();

  j = await Journal.open(opts);
  assert.equal(j.firstSeq, 51);
  assert.equal(j.lastSeq, 100);
  assert.equal(await j.read(50), undefined);
  assert.deepEqual((await collect(j.entries(1))).map((e) => e.seq), Array.from({ length: 50 }, (_, i) => 51 + i));
  assert.equal(j.bytes().memory + j.bytes().disk, 50 * 100);
  await j.close();
});

test("released entries stay hidden after reopen even when their segment still exists", async (t) => {
  const dir = await tempDir(t);
  let j = await Journal.open({ dir, memoryBytes: 1 << 20 });
  for (let i = 1; i <= 10; i++) await j.append(pattern(i, 50));
  await j.release(3);
  await j.close();
  assert.deepEqual(await segFiles(dir), ["00000000000000000001.seg"]);
  j = await Journal.open({ dir, memoryBytes: 1 << 20 });
  assert.equal(j.firstSeq, 4);
  assert.equal(j.lastSeq, 10);
  assert.equal(await j.read(3), undefined);
  assert.deepEqual((await j.read(4))?.payload, pattern(4, 50));
  assert.deepEqual((await collect(j.entries(1))).map((e) => e.seq), [4, 5, 6, 7, 8, 9, 10]);
  assert.equal(j.bytes().disk, 7 * 50);
  await j.close();
});

test("lastSeq survives releasing everything; sequence numbers never restart", async (t) => {
  const dir = await tempDir(t);
  let j = await Journal.open({ dir, memoryBytes: 1 << 20, segmentBytes: 200 });
  for (let i = 1; i <= 12; i++) await j.append(pattern(i, 60));
  await j.release(1000); // clamped to lastSeq
  assert.equal(j.firstSeq, 13);
  assert.equal(j.lastSeq, 12);
  assert.deepEqual(j.bytes(), { memory: 0, disk: 0 });
  assert.deepEqual(await segFiles(dir), [], "all segment files deleted");
  assert.equal(await j.read(12), undefined);
  await j.close();

  j = await Journal.open({ dir, memoryBytes: 1 << 20, segmentBytes: 200 });
  assert.equal(j.firstSeq, 13);
  assert.equal(j.lastSeq, 12);
  assert.equal(await j.append(pattern(13, 10)), 13);
  assert.deepEqual(await segFiles(dir), ["00000000000000000013.seg"]);
  await j.release(13);
  await j.close();
  j = await Journal.open({ dir, memoryBytes: 1 << 20, segmentBytes: 200 });
  assert.equal(j.lastSeq, 13);
  assert.equal(await j.append(pattern(14, 10)), 14);
  await j.close();
});

test("a torn tail of the last segment is repaired on open and appends continue", async (t) => {
  const opts = (dir: string) => ({ dir, memoryBytes: 1 << 20, segmentBytes: 2000 });
  const setup = async (): Promise<{ dir: string; last: string }> => {
    const dir = await tempDir(t);
    const j = await Journal.open(opts(dir));
    for (let i = 1; i <= 30; i++) await j.append(pattern(i, 150), Buffer.from("mm"));
    await j.close();
    const segs = await segFiles(dir);
    assert.ok(segs.length >= 2);
    return { dir, last: join(dir, segs[segs.length - 1]!) };
  };
  const recLen = HEADER + 150 + 2;

  // 1. the last record cut short by a few bytes
  {
    const { dir, last } = await setup();
    await truncate(last, (await stat(last)).size - 3);
    const j = await Journal.open(opts(dir));
    assert.equal(j.lastSeq, 29);
    assert.ok(j.recovered);
    assert.equal(j.recovered.file, last);
    for (let i = 1; i <= 29; i++) assert.deepEqual((await j.read(i))?.payload, pattern(i, 150));
    assert.equal(await j.read(30), undefined);
    assert.equal(await j.append(pattern(1030, 40)), 30);
    await j.close();
    const j2 = await Journal.open(opts(dir));
    assert.equal(j2.recovered, null);
    assert.equal(j2.lastSeq, 30);
    assert.deepEqual((await j2.read(30))?.payload, pattern(1030, 40));
    await j2.close();
  }
  // 2. only part of the last record's header made it
  {
    const { dir, last } = await setup();
    await truncate(last, (await stat(last)).size - recLen + 10);
    const j = await Journal.open(opts(dir));
    assert.equal(j.lastSeq, 29);
    assert.equal(await j.append(pattern(30, 150)), 30);
    await j.close();
  }
  // 3. garbage after the last record
  {
    const { dir, last } = await setup();
    await appendFile(last, Buffer.from("this is not a journal record, just garbage bytes ".repeat(3)));
    const j = await Journal.open(opts(dir));
    assert.equal(j.lastSeq, 30);
    assert.ok(j.recovered);
    assert.deepEqual((await j.read(30))?.payload, pattern(30, 150));
    assert.equal(await j.append(pattern(31, 150)), 31);
    await j.close();
    const j2 = await Journal.open(opts(dir));
    assert.deepEqual((await collect(j2.entries(1))).map((e) => e.seq), Array.from({ length: 31 }, (_, i) => i + 1));
    await j2.close();
  }
  // 4. zeros after the last record (power loss with delayed allocation)
  {
    const { dir, last } = await setup();
    await appendFile(last, Buffer.alloc(4096));
    const j = await Journal.open(opts(dir));
    assert.equal(j.lastSeq, 30);
    await j.close();
  }
});

test("corruption in the middle of the journal makes open throw, naming file and offset", async (t) => {
  const recLen = HEADER + 100;
  const setup = async (): Promise<{ dir: string; segs: string[] }> => {
    const dir = await tempDir(t);
    const j = await Journal.open({ dir, memoryBytes: 0, segmentBytes: 5 * recLen });
    for (let i = 1; i <= 20; i++) await j.append(pattern(i, 100));
    await j.close();
    const segs = (await segFiles(dir)).map((n) => join(dir, n));
    assert.equal(segs.length, 4);
    return { dir, segs };
  };
  const flipByte = async (path: string, offset: number) => {
    const fh = await open(path, "r+");
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, offset);
    b[0] = b[0]! ^ 0x5a;
    await fh.write(b, 0, 1, offset);
    await fh.close();
  };
  const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

  // a payload byte of the 2nd record of the first (non-last) segment
  {
    const { dir, segs } = await setup();
    await flipByte(segs[0]!, recLen + HEADER + 50);
    await assert.rejects(Journal.open({ dir, memoryBytes: 0 }), new RegExp(`${escape(segs[0]!)}.*offset ${recLen}\\b.*checksum`));
  }
  // a header byte (payload length) of the 3rd record of a middle segment
  {
    const { dir, segs } = await setup();
    await flipByte(segs[1]!, 2 * recLen + 5);
    await assert.rejects(Journal.open({ dir, memoryBytes: 0 }), new RegExp(`${escape(segs[1]!)}.*offset ${2 * recLen}\\b`));
  }
  // a middle record of the last segment, with intact records after it: not a torn tail
  {
    const { dir, segs } = await setup();
    await flipByte(segs[3]!, recLen + HEADER + 1);
    await assert.rejects(Journal.open({ dir, memoryBytes: 0 }), new RegExp(`${escape(segs[3]!)}.*offset ${recLen}\\b.*valid records follow`));
  }
  // a whole segment missing: the sequence is not contiguous
  {
    const { dir, segs } = await setup();
    await unlink(segs[1]!);
    await assert.rejects(Journal.open({ dir, memoryBytes: 0 }), /starts at seq 11 but the previous segment ends at 5/);
  }
  // a non-last segment cut short
  {
    const { dir, segs } = await setup();
    await truncate(segs[0]!, 5 * recLen - 1);
    await assert.rejects(Journal.open({ dir, memoryBytes: 0 }), new RegExp(`${escape(segs[0]!)}.*offset ${4 * recLen}\\b.*truncated`));
  }
  // released entries whose segment files were deleted by hand are fine; unreleased ones are not
  {
    const { dir, segs } = await setup();
    await writeFile(join(dir, "state.json"), JSON.stringify({ firstSeq: 3, lastSeq: 2 }));
    await unlink(segs[0]!);
    await assert.rejects(Journal.open({ dir, memoryBytes: 0 }), /missing entries 3\.\.5/);
  }
});

test("entries(from) iterates in order across disk and memory, and follows appends", async (t) => {
  const dir = await tempDir(t);
  const j = await Journal.open({ dir, memoryBytes: 3000, segmentBytes: 2500 });
  for (let i = 1; i <= 40; i++) await j.append(pattern(i, 200 + i), Buffer.from(String(i)));
  const all = await collect(j.entries(1));
  assert.deepEqual(all.map((e) => e.seq), Array.from({ length: 40 }, (_, i) => i + 1));
  all.forEach((e) => {
    assert.deepEqual(e.payload, pattern(e.seq, 200 + e.seq));
    assert.equal(e.meta.toString(), String(e.seq));
  });
  assert.deepEqual((await collect(j.entries(35))).map((e) => e.seq), [35, 36, 37, 38, 39, 40]);
  assert.deepEqual(await collect(j.entries(41)), []);
  assert.equal((await collect(j.entries(-5))).length, 40);

  // entries appended during the iteration are included; breaking out early is fine
  const seen: number[] = [];
  for await (const e of j.entries(38)) {
    seen.push(e.seq);
    if (e.seq === 40) await j.append(pattern(41, 10));
  }
  assert.deepEqual(seen, [38, 39, 40, 41]);
  for await (const e of j.entries(1)) if (e.seq === 3) break;

  // releasing while iterating skips the released entries
  const seen2: number[] = [];
  for await (const e of j.entries(1)) {
    seen2.push(e.seq);
    if (e.seq === 2) await j.release(20);
  }
  assert.deepEqual(seen2, [1, 2, ...Array.from({ length: 21 }, (_, i) => 21 + i)]);
  await j.close();
});

test("concurrent appends get consecutive seqs in call order", async (t) => {
  const dir = await tempDir(t);
  const j = await Journal.open({ dir, memoryBytes: 10_000, segmentBytes: 3000 });
  const sizes = Array.from({ length: 500 }, (_, i) => (i * 37) % 400);
  const seqs = await Promise.all(sizes.map((n, i) => j.append(pattern(i + 1, n), Buffer.from([i & 0xff]))));
  assert.deepEqual(seqs, Array.from({ length: 500 }, (_, i) => i + 1));
  assert.equal(j.lastSeq, 500);
  for (let i = 0; i < 500; i++) {
    const e = await j.read(i + 1);
    assert.deepEqual(e?.payload, pattern(i + 1, sizes[i]!));
    assert.deepEqual(e?.meta, Buffer.from([i & 0xff]));
  }
  await j.close();
  const j2 = await Journal.open({ dir, memoryBytes: 10_000, segmentBytes: 3000 });
  assert.equal((await collect(j2.entries(1))).length, 500);
  await j2.close();
});

test("property: random appends/releases/reopens behave like a simple in-memory model", async (t) => {
  type Cmd =
    | { kind: "append"; size: number; meta: number }
    | { kind: "appendMany"; sizes: number[] }
    | { kind: "release"; ahead: number }
    | { kind: "reopen" }
    | { kind: "sync" };
  const cmd: fc.Arbitrary<Cmd> = fc.oneof(
    { weight: 6, arbitrary: fc.record({ kind: fc.constant("append" as const), size: fc.nat(400), meta: fc.nat(20) }) },
    { weight: 2, arbitrary: fc.record({ kind: fc.constant("appendMany" as const), sizes: fc.array(fc.nat(300), { minLength: 1, maxLength: 8 }) }) },
    { weight: 2, arbitrary: fc.record({ kind: fc.constant("release" as const), ahead: fc.integer({ min: -2, max: 12 }) }) },
    { weight: 1, arbitrary: fc.record({ kind: fc.constant("reopen" as const) }) },
    { weight: 1, arbitrary: fc.record({ kind: fc.constant("sync" as const) }) },
  );
  const base = await tempDir(t);
  let run = 0;

  await fc.assert(
    fc.asyncProperty(
      fc.constantFrom(0, 300, 2000, 1 << 20),
      fc.constantFrom(1, 256, 1500, 64 << 20),
      fc.array(cmd, { maxLength: 40 }),
      async (memoryBytes, segmentBytes, cmds) => {
        const dir = join(base, String(run++));
        const model = new Map<number, { payload: Buffer; meta: Buffer }>();
        let first = 1;
        let last = 0;
        let j = await Journal.open({ dir, memoryBytes, segmentBytes });
        const check = async () => {
          assert.equal(j.firstSeq, first);
          assert.equal(j.lastSeq, last);
          let total = 0;
          for (let s = first; s <= last; s++) {
            const m = model.get(s)!;
            total += m.payload.length + m.meta.length;
            const e = await j.read(s);
            assert.ok(e, `read(${s})`);
            assert.deepEqual(e.payload, m.payload);
            assert.deepEqual(e.meta, m.meta);
          }
          assert.equal(await j.read(first - 1), undefined);
          assert.equal(await j.read(last + 1), undefined);
          const b = j.bytes();
          assert.equal(b.memory + b.disk, total);
          assert.ok(b.memory <= memoryBytes);
          const it = await collect(j.entries(first - 3));
          assert.deepEqual(it.map((e) => e.seq), Array.from({ length: last - first + 1 }, (_, i) => first + i));
          it.forEach((e) => assert.deepEqual(e.payload, model.get(e.seq)!.payload));
        };
        try {
          for (const c of cmds) {
            if (c.kind === "append") {
              const seq = last + 1;
              const payload = pattern(seq, c.size);
              const meta = pattern(seq + 7, c.meta);
              assert.equal(await j.append(payload, meta), seq);
              model.set(seq, { payload, meta });
              last = seq;
            } else if (c.kind === "appendMany") {
              const ps = c.sizes.map((n, i) => pattern(last + 1 + i, n));
              const seqs = await Promise.all(ps.map((p) => j.append(p)));
              assert.deepEqual(seqs, ps.map((_, i) => last + 1 + i));
              ps.forEach((payload, i) => model.set(last + 1 + i, { payload, meta: Buffer.alloc(0) }));
              last += ps.length;
            } else if (c.kind === "release") {
              const upto = first - 1 + c.ahead;
              await j.release(upto);
              const newFirst = Math.min(Math.max(first, upto + 1), last + 1);
              for (let s = first; s < newFirst; s++) model.delete(s);
              first = newFirst;
              // no segment file lies entirely below firstSeq
              const segs = (await segFiles(dir)).map((n) => Number(n.slice(0, 20)));
              if (segs.length > 1) assert.ok(segs[1]! > first, `segments ${segs.join(",")} with firstSeq ${first}`);
              if (first > last) assert.ok(segs.length === 0 || segs[0] === last + 1);
            } else if (c.kind === "reopen") {
              await j.close();
              j = await Journal.open({ dir, memoryBytes, segmentBytes });
              assert.equal(j.recovered, null);
            } else {
              await j.sync();
            }
            assert.equal(j.firstSeq, first);
            assert.equal(j.lastSeq, last);
          }
          await check();
          await j.close();
          j = await Journal.open({ dir, memoryBytes, segmentBytes });
          await check();
        } finally {
          await j.close();
          await rm(dir, { recursive: true, force: true });
        }
      },
    ),
    { numRuns: 80 },
  );
});

// The child appends patterned entries (content derivable from the seq alone)
// as fast as it can, several in flight, with occasional release and sync.
const CHILD_SCRIPT = `
import { Journal } from ${JSON.stringify(JOURNAL_MODULE)};
const dir = process.argv[2];
function size(seq) { return seq % 97 === 0 ? 300000 + (seq % 7) * 10000 : (seq * 2654435761) % 5000; }
function pattern(seq, n) {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (seq * 31 + i * 7) & 0xff;
  if (n >= 8) b.writeDoubleLE(seq, 0);
  return b;
}
const j = await Journal.open({ dir, memoryBytes: 1 << 20, segmentBytes: 512 * 1024 });
let next = j.lastSeq + 1;
process.stdout.write("ready " + j.lastSeq + "\\n");
for (let round = 0; ; round++) {
  if (round === 1) process.stdout.write("appending\\n");
  const batch = [];
  for (let k = 0; k < 8; k++, next++) {
    const seq = next;
    batch.push(j.append(pattern(seq, size(seq)), Buffer.from("seq=" + seq)).then((got) => {
      if (got !== seq) { console.error("seq mismatch", got, seq); process.exit(3); }
    }));
  }
  await Promise.all(batch);
  if (round % 50 === 49) await j.release(j.lastSeq - 300);
  if (round % 70 === 69) await j.sync();
}
`;

function childSize(seq: number): number {
  return seq % 97 === 0 ? 300000 + (seq % 7) * 10000 : (seq * 2654435761) % 5000;
}

test("kill -9 while appending: every readable entry is intact and seqs are contiguous", async (t) => {
  const dir = await tempDir(t);
  const journalDir = join(dir, "journal");
  const script = join(dir, "child.mjs");
  await writeFile(script, CHILD_SCRIPT);
  let lastSeen = 0;
  for (let round = 0; round < 5; round++) {
    const child = spawn(process.execPath, [script, journalDir], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
    await new Promise<void>((resolve, reject) => {
      child.stdout.on("data", (d: Buffer) => {
        out += d.toString();
        if (out.includes("appending\n")) resolve();
      });
      void exited.then(({ code }) => reject(new Error(`child exited early with ${code}: ${err}`)));
    });
    assert.match(out, new RegExp(`^ready ${lastSeen}\\n`));
    await new Promise((r) => setTimeout(r, 100 + Math.random() * 400));
    child.kill("SIGKILL");
    const { signal } = await exited;
    assert.equal(signal, "SIGKILL", `child died on its own: ${err}`);

    const j = await Journal.open({ dir: journalDir, memoryBytes: 1 << 20, segmentBytes: 512 * 1024 });
    assert.ok(j.lastSeq > lastSeen, `round ${round}: the child appended nothing (lastSeq ${j.lastSeq})`);
    assert.ok(j.firstSeq <= j.lastSeq + 1);
    let expected = j.firstSeq;
    for await (const e of j.entries(1)) {
      assert.equal(e.seq, expected++);
      assert.equal(e.payload.length, childSize(e.seq), `size of ${e.seq}`);
      assert.ok(e.payload.equals(pattern(e.seq, childSize(e.seq))), `content of ${e.seq}`);
      assert.equal(e.meta.toString(), `seq=${e.seq}`);
    }
    assert.equal(expected, j.lastSeq + 1);
    const mid = Math.floor((j.firstSeq + j.lastSeq) / 2);
    if (mid >= j.firstSeq) assert.ok((await j.read(mid))?.payload.equals(pattern(mid, childSize(mid))));
    lastSeen = j.lastSeq;
    await j.close();
  }
});

/** A full GC, so that RSS reflects what is retained rather than garbage V8 has not collected yet. */
function collectGarbage(): void {
  setFlagsFromString("--expose-gc");
  (runInNewContext("gc") as () => void)();
}

test("200 MiB of 1 MiB payloads with memoryBytes = 8 MiB keeps RSS growth bounded", async (t) => {
  const dir = await tempDir(t);
  const memoryBytes = 8 << 20;
  const j = await Journal.open({ dir, memoryBytes });
  const mib = 1 << 20;
  await j.append(Buffer.alloc(mib, 1)); // warm up
  collectGarbage();
  const rssBefore = process.memoryUsage().rss;
  let maxRss = rssBefore;
  for (let i = 0; i < 200; i += 4) {
    await Promise.all(
      [0, 1, 2, 3].map((k) => {
        const p = Buffer.allocUnsafe(mib);
        p.fill((i + k) & 0xff);
        return j.append(p);
      }),
    );
    assert.ok(j.bytes().memory <= memoryBytes);
    if (i % 20 === 0) collectGarbage();
    maxRss = Math.max(maxRss, process.memoryUsage().rss);
  }
  assert.equal(j.lastSeq, 201);
  assert.equal(j.bytes().memory + j.bytes().disk, 201 * mib);
  const growth = maxRss - rssBefore;
  assert.ok(growth < 100 * mib, `RSS grew by ${(growth / mib).toFixed(1)} MiB`);
  t.diagnostic(`RSS growth ${(growth / mib).toFixed(1)} MiB`);
  // spilled entries are still there
  const e = await j.read(2);
  assert.equal(e?.payload.length, mib);
  assert.equal(e?.payload[mib - 1], 0);
  await j.close();
});
