// hashBlocks with read-ahead and the fingerprint cache (for files read again
// and again; one-off reads skip it) must hand out exactly
// the digests a plain block-by-block SHA-256 gives, on every read of a file
// that changes between reads (in place, grown, shrunk, partial last block),
// and must skip hashing only runs that did not change.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomFillSync } from "node:crypto";
import { mkdtemp, open, rm, truncate } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { xxhash128 } from "hash-wasm";
import { blockDigest, blockDigestIncremental, clearDigestCache, DigestAlgo, DIGEST_BYTES, digestsOf, hashBlocks, hashStats, LARGE_FILE } from "../../agent/source/blocks.ts";

const BS = 64 * 1024;

async function reference(file: string, bs: number): Promise<Buffer> {
  const fh = await open(file, "r");
  try {
    const size = (await fh.stat()).size;
    const out: Buffer[] = [];
    const buf = Buffer.alloc(bs);
    for (let off = 0; off < size; off += bs) {
      const n = Math.min(bs, size - off);
      const { bytesRead } = await fh.read(buf, 0, n, off);
      assert.equal(bytesRead, n);
      out.push(blockDigestIncremental(buf.subarray(0, n)));
    }
    return Buffer.concat(out);
  } finally {
    await fh.close();
  }
}

async function hashed(file: string, bs: number): Promise<{ digests: Buffer; visited: Buffer; digested: number }> {
  const fh = await open(file, "r");
  try {
    const size = (await fh.stat()).size;
    const before = hashStats.bytesDigested;
    const seen: Buffer[] = [];
    let next = 0;
    const digests = await hashBlocks(fh, size, bs, (b) => {
      assert.equal(b.index, next++);
      assert.equal(b.offset, b.index * bs);
      assert.equal(b.data.length, Math.min(bs, size - b.offset));
      seen.push(Buffer.from(b.digest));
    }, undefined, undefined, DigestAlgo.DIGEST_ALGO_SHA256_128);
    return { digests, visited: Buffer.concat(seen), digested: hashStats.bytesDigested - before };
  } finally {
    await fh.close();
  }
}

async function overwrite(file: string, offset: number, n: number): Promise<void> {
  const fh = await open(file, "r+");
  try {
    await fh.write(randomFillSync(Buffer.alloc(n)), 0, n, offset);
  } finally {
    await fh.close();
  }
}

test("hashBlocks: same digests as block-by-block SHA-256 across in-place changes, growth and shrinking; unchanged runs are not hashed again", async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "understudy-blocks-"));
  try {
    clearDigestCache();
    const file = path.join(dir, "img");
    const size = LARGE_FILE + 3 * 1024 * 1024 + 12345; // several reads, a partial last block and run
    const fh = await open(file, "w");
    await fh.write(randomFillSync(Buffer.alloc(size)), 0, size, 0);
    await fh.close();

    const check = async (what: string) => {
      const r = await hashed(file, BS);
      const want = await reference(file, BS);
      assert.ok(r.digests.equals(want), `${what}: digests differ from the reference`);
      assert.ok(r.visited.equals(want), `${what}: visited digests differ from the reference`);
      return r;
    };
    const first = await check("first read");
    assert.equal(first.digested, size, "the first read hashes everything");
    const again = await check("unchanged");
    assert.equal(again.digested, 0, "an unchanged file is not hashed again");

    // One byte in one block, a write across a run boundary, and the last partial block.
    await overwrite(file, 5 * BS + 17, 1);
    await overwrite(file, 4 * 256 * 1024 - 100, 200);
    await overwrite(file, size - 10, 10);
    const changed = await check("in-place changes");
    assert.ok(changed.digested > 0 && changed.digested <= 4 * 256 * 1024, `only the changed runs are hashed again (hashed ${changed.digested})`);

    // A write that puts back what was there before a change still compares right.
    await truncate(file, size + 70_000); // grows: a new partial block, the old last one becomes full
    await check("grown");
    await truncate(file, size - 3 * BS - 1); // shrinks inside a run
    const shrunk = await check("shrunk");
    assert.ok(shrunk.digested <= 256 * 1024, `shrinking rehashes at most the cut run (hashed ${shrunk.digested})`);

    // Another block size: its own digests, nothing taken from the 64 KiB entry.
    const other = await hashed(file, 16 * 1024);
    assert.ok(other.digests.equals(await reference(file, 16 * 1024)));
    assert.equal(other.digests.length % DIGEST_BYTES, 0);

    // A small file (no fingerprints) and an empty one.
    const small = path.join(dir, "small");
    const sh = await open(small, "w");
    await sh.write(randomFillSync(Buffer.alloc(3 * BS + 5)));
    await sh.close();
    assert.ok((await hashed(small, BS)).digests.equals(await reference(small, BS)));
    await truncate(small, 0);
    assert.equal((await hashed(small, BS)).digests.length, 0);
  } finally {
    clearDigestCache();
    await rm(dir, { recursive: true, force: true });
  }
});

test("hashBlocks: a cancelled read leaves no read running and nothing cached", async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "understudy-blocks-"));
  try {
    clearDigestCache();
    const file = path.join(dir, "img");
    const size = LARGE_FILE + BS;
    const fh = await open(file, "w");
    await fh.write(randomFillSync(Buffer.alloc(size)));
    await fh.close();
    const ac = new AbortController();
    const rh = await open(file, "r");
    try {
      await assert.rejects(hashBlocks(rh, size, BS, (b) => {
        if (b.index === 70) ac.abort();
      }, ac.signal, undefined, DigestAlgo.DIGEST_ALGO_SHA256_128), /cancelled/);
    } finally {
      await rh.close();
    }
    const r = await hashed(file, BS);
    assert.equal(r.digested, size, "nothing was cached from the cancelled read");
    assert.ok(r.digests.equals(await reference(file, BS)));
  } finally {
    clearDigestCache();
    await rm(dir, { recursive: true, force: true });
  }
});

test("digest cache: when full, files in use are kept rather than pushed out in turn", async () => {
  // A fresh process with room for two 16 MiB files' fingerprints and digests (~5 KiB each).
  const dir = await mkdtemp(path.join(os.tmpdir(), "understudy-blocks-"));
  try {
    const blocks = new URL("../../agent/source/blocks.ts", import.meta.url).pathname;
    const script = `
      import { open } from "node:fs/promises";
      import { randomFillSync } from "node:crypto";
      import { hashBlocks, hashStats, LARGE_FILE } from ${JSON.stringify(blocks)};
      const files = ["a", "b", "c"].map((n) => ${JSON.stringify(dir)} + "/" + n);
      for (const f of files) { const fh = await open(f, "w"); await fh.write(randomFillSync(Buffer.alloc(LARGE_FILE))); await fh.close(); }
      const digested = async (f) => { const fh = await open(f, "r"); const d0 = hashStats.bytesDigested; await hashBlocks(fh, LARGE_FILE, 65536, undefined, undefined, undefined, 0 /* SHA-256: the cached kind */); await fh.close(); return hashStats.bytesDigested - d0; };
      const out = [];
      for (const f of [...files, ...files]) out.push(await digested(f));
      console.log(JSON.stringify(out));
    `;
    const { execFileSync } = await import("node:child_process");
    const out = execFileSync(process.execPath, ["--input-type=module", "-e", script], { env: { ...process.env, UNDERSTUDY_DIGEST_CACHE_MB: "0.011" }, encoding: "utf8" });
    const [a1, b1, c1, a2, b2, c2] = JSON.parse(out.trim()) as number[];
    assert.deepEqual([a1, b1, c1], [LARGE_FILE, LARGE_FILE, LARGE_FILE], "first reads hash everything");
    assert.deepEqual([a2, b2], [0, 0], "the two files that fit stay cached");
    assert.equal(c2, LARGE_FILE, "the third was not let in (it would have pushed out one in use)");
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("change detection's XXH3-128 digests: hashBlocks, digestsOf and a one-shot XXH3-128 agree, block by block; SHA-256 stays SHA-256", async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "understudy-xxh-"));
  try {
    const file = path.join(dir, "f");
    const size = 3 * BS + 1234;
    const data = randomFillSync(Buffer.alloc(size));
    const fh = await open(file, "w+");
    await fh.write(data, 0, size, 0);
    const viaFile = await hashBlocks(fh, size, BS);
    await fh.close();
    const want: Buffer[] = [];
    for (let off = 0; off < size; off += BS) want.push(Buffer.from(await xxhash128(data.subarray(off, Math.min(size, off + BS))), "hex"));
    assert.deepEqual(viaFile, Buffer.concat(want));
    assert.deepEqual(digestsOf(data, size, BS), viaFile);
    assert.equal(viaFile.length, 4 * DIGEST_BYTES);
    assert.deepEqual(blockDigest(data.subarray(0, BS), DigestAlgo.DIGEST_ALGO_SHA256_128), blockDigestIncremental(data.subarray(0, BS)));
    assert.notDeepEqual(blockDigest(data.subarray(0, BS), DigestAlgo.DIGEST_ALGO_SHA256_128), blockDigest(data.subarray(0, BS), DigestAlgo.DIGEST_ALGO_XXH3_128));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
