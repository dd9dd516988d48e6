// Block hashing lives here and only here: a file is cut into fixed-size blocks
// and each block gets a 16-byte digest. Two kinds (DigestAlgo, on the wire):
// - XXH3-128 for change detection (capture's index, mirror's comparison with
//   the target): ~2.5x faster than SHA-256 here (hash-wasm's WebAssembly build,
//   measured 0.31 vs 0.75 CPU-s per GiB in 64 KiB blocks; @node-rs/xxhash's
//   native one measured no faster than SHA-256, its binding copying the input).
//   Not cryptographic, and it need not be for change detection: the digests
//   compared are of this source's own bytes and of a replica it wrote over an
//   authenticated (mTLS) link, as with rsync's xxh128. Someone able to write
//   to a replica and aiming a collision could at worst have a checksum mirror
//   leave a tampered block alone; verify, which uses SHA-256, still finds it.
// - SHA-256, truncated to 16 bytes, for verify: its result is taken as proof
//   that a replica holds the source's bytes, whoever may have touched the
//   replica's disk, so a digest someone could aim a collision at will not do.
//
// Large files (VM disk images) are re-read whole whenever they change: without
// an intercepting driver nothing says which blocks a writer touched. What can
// be made cheap is everything after the read. For files of LARGE_FILE or
// more that are looked at again and again (capture's; a one-off read, as a
// mirror's, a listing's or a verify's, skips this: the fingerprints cost
// about what XXH3-128 digests do, measured 1.1-1.5 CPU-s per GiB for a first
// look with them, 0.6-0.8 without) each run of FP_BYTES is also given a
// fingerprint, a GMAC (AES-GCM's
// authenticator, AES-NI + carry-less multiply: ~4-8× faster than SHA-256 here)
// under a key drawn at random when the process starts and never shown to
// anyone; the fingerprints and digests of the last read of each file are kept
// in memory (DIGEST_CACHE_BYTES, least recently used first out). On the next
// read of the same file, a run whose fingerprint is unchanged takes its block
// digests from that cache instead of hashing them again. The data is still
// read and looked at in full every time (a changed byte changes the
// fingerprint), and the digests handed out are the same digests as
// before; for a different content to keep its fingerprint a GHASH collision
// under an unknown key is needed (probability below 2^-100 per run), which
// data chosen by a guest cannot aim at because the fingerprints never leave
// this process.
import { createCipheriv, createHash, hash, randomBytes } from "node:crypto";
import { readSync } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import { createXXHash128 } from "hash-wasm";
import { DigestAlgo } from "../wire.ts";

export { DigestAlgo };
export const DIGEST_BYTES = 16;
/** The digest of change detection (capture, mirror); verify uses SHA256_128. */
export const CHANGE_DIGEST: DigestAlgo = DigestAlgo.DIGEST_ALGO_XXH3_128;
/** One XXH3-128 state per thread (used synchronously: init, update, digest). */
const xxh128 = await createXXHash128();
/** Bytes read per syscall while hashing. */
export const READ_BYTES = 4 * 1024 * 1024;
/** Files at least this large get fingerprints and a place in the digest cache. */
export const LARGE_FILE = 16 * 1024 * 1024;
/** Bytes covered by one fingerprint (a whole number of blocks; at least one block). */
const FP_BYTES = 256 * 1024;
const FP_LEN = 16;
/**
 * Memory for fingerprints and digests of recently read large files (17 bytes
 * per 64 KiB block: 128 MiB covers ~480 GiB of images; capture's index holds
 * the same digest buffers, so for the files it watches most of it is not
 * extra). UNDERSTUDY_DIGEST_CACHE_MB sets it; 0 turns the cache off.
 */
const DIGEST_CACHE_BYTES = (() => {
  const v = process.env.UNDERSTUDY_DIGEST_CACHE_MB?.trim();
  const mb = v ? Number(v) : NaN;
  return (Number.isFinite(mb) && mb >= 0 ? mb : 128) * 1024 * 1024;
})();
/** A full cache makes room only by dropping files not read for this long: more images than fit must not push each other out in turn (then no read would find its file). */
const CACHE_IDLE_MS = 10 * 60 * 1000;

// One key per process: fingerprints are only ever compared with fingerprints
// made by this process. A fixed nonce makes the tag a function of the data
// alone (GHASH of the data under the secret H, masked by a secret constant);
// nothing is encrypted with it.
const FP_KEY = randomBytes(16);
const FP_NONCE = randomBytes(12);

export function blockDigest(data: Uint8Array, algo: DigestAlgo = DigestAlgo.DIGEST_ALGO_SHA256_128): Buffer {
  if (algo === DigestAlgo.DIGEST_ALGO_XXH3_128) {
    xxh128.init();
    xxh128.update(data);
    const d = xxh128.digest("binary");
    return Buffer.from(d.buffer, d.byteOffset, d.byteLength);
  }
  return hash("sha256", data, "buffer").subarray(0, DIGEST_BYTES);
}

/** Block digests of data already in memory (buf[0, len) from file offset 0). */
export function digestsOf(buf: Uint8Array, len: number, blockSize: number, algo: DigestAlgo = CHANGE_DIGEST): Buffer {
  const n = Math.ceil(len / blockSize);
  const out = Buffer.allocUnsafe(n * DIGEST_BYTES);
  for (let i = 0; i < n; i++) blockDigest(buf.subarray(i * blockSize, Math.min(len, (i + 1) * blockSize)), algo).copy(out, i * DIGEST_BYTES);
  hashStats.bytesDigested += len;
  return out;
}

/** The old, incremental way; kept for the equivalence test. */
export function blockDigestIncremental(data: Uint8Array): Buffer {
  return createHash("sha256").update(data).digest().subarray(0, DIGEST_BYTES);
}

/** Keyed fingerprint of a run of blocks (GMAC); meaningful only within this process. */
export function fingerprint(data: Uint8Array): Buffer {
  const c = createCipheriv("aes-128-gcm", FP_KEY, FP_NONCE);
  c.setAAD(data);
  c.final();
  return c.getAuthTag();
}

export function isZero(b: Uint8Array): boolean {
  // Compare 8 bytes at a time where aligned; zero blocks are skipped (left as holes).
  const n = b.byteLength;
  let i = 0;
  if (b.byteOffset % 8 === 0) {
    const w = new BigUint64Array(b.buffer, b.byteOffset, n >>> 3);
    for (; i < w.length; i++) if (w[i] !== 0n) return false;
    i <<= 3;
  }
  for (; i < n; i++) if (b[i] !== 0) return false;
  return true;
}

export interface BlockVisit {
  index: number;
  offset: number;
  data: Buffer; // valid only until the callback returns
  digest: Buffer;
}

interface CacheEntry {
  algo: DigestAlgo;
  blockSize: number;
  /** blocks per fingerprint */
  fpBlocks: number;
  size: number;
  fps: Buffer;
  /** shared with whoever got them from hashBlocks: read-only */
  digests: Buffer;
  /** when it was last read or stored (Date.now()) */
  used: number;
}

/** Fingerprints and digests of the last complete read of each large file, by device and inode; least recently used first. */
const cache = new Map<string, CacheEntry>();
let cacheBytes = 0;

function cacheDrop(key: string): void {
  const e = cache.get(key);
  if (!e) return;
  cache.delete(key);
  cacheBytes -= e.fps.length + e.digests.length;
}

function cachePut(key: string, e: CacheEntry): void {
  cacheDrop(key);
  const cost = e.fps.length + e.digests.length;
  if (cost > DIGEST_CACHE_BYTES) return;
  while (cacheBytes + cost > DIGEST_CACHE_BYTES) {
    const oldest = cache.entries().next().value;
    if (!oldest || e.used - oldest[1].used < CACHE_IDLE_MS) return; // full of files in use: this one goes without
    cacheDrop(oldest[0]);
  }
  cache.set(key, e);
  cacheBytes += cost;
}

function cacheGet(key: string): CacheEntry | undefined {
  const e = cache.get(key);
  if (!e) return undefined;
  // Most recently used last.
  cache.delete(key);
  cache.set(key, e);
  e.used = Date.now();
  return e;
}

export interface HashStats {
  /** bytes read */
  bytesRead: number;
  /** bytes whose block digests were computed (the rest came from the cache) */
  bytesDigested: number;
}

/** What hashBlocks did in this process, for tests and benchmarks. */
export const hashStats: HashStats = { bytesRead: 0, bytesDigested: 0 };

/** Forget every cached fingerprint (tests). */
export function clearDigestCache(): void {
  cache.clear();
  cacheBytes = 0;
}

/**
 * Read `size` bytes of a file block by block, hashing each. Returns the
 * concatenated digests; `visit` sees every block (it may copy the data).
 * `signal` cancels between blocks. The next read is in flight while a buffer
 * is being hashed and visited. `algo`: which digest; `reread`: false for a
 * one-off read of the file (no fingerprints, nothing cached).
 */
export async function hashBlocks(fh: FileHandle, size: number, blockSize: number, visit?: (b: BlockVisit) => void | Promise<void>, signal?: AbortSignal, scratch?: Buffer, algo: DigestAlgo = CHANGE_DIGEST, reread = true, scratch2?: Buffer): Promise<Buffer> {
  const n = Math.ceil(size / blockSize);
  const digests = Buffer.allocUnsafe(n * DIGEST_BYTES);
  // Read several blocks per syscall: large reads are much cheaper than 64 KiB
  // ones. Callers that hash many files pass a scratch buffer to reuse.
  const per = Math.max(1, Math.floor(READ_BYTES / blockSize));
  const bufBlocks = Math.min(per, Math.max(1, n));
  // A small file needs no more than its own size (rounded up to whole blocks).
  const need = Math.min(per * blockSize, Math.max(blockSize, n * blockSize));
  const chunks = Math.ceil(n / bufBlocks);
  const bufs = [scratch && scratch.length >= need ? scratch : Buffer.allocUnsafe(need)];
  if (chunks > 1) bufs.push(scratch2 && scratch2 !== bufs[0] && scratch2.length >= need ? scratch2 : Buffer.allocUnsafe(need));

  // Fingerprints: only for large files, in runs that never straddle a read.
  let fpBlocks = Math.max(1, Math.floor(FP_BYTES / blockSize));
  if (bufBlocks % fpBlocks !== 0) fpBlocks = 1;
  let key: string | undefined;
  let old: CacheEntry | undefined;
  let fps: Buffer | undefined;
  if (size >= LARGE_FILE && DIGEST_CACHE_BYTES > 0 && reread) {
    const st = await fh.stat();
    key = `${st.dev}:${st.ino}:${algo}`;
    old = cacheGet(key);
    if (old && (old.blockSize !== blockSize || old.fpBlocks !== fpBlocks)) old = undefined;
    fps = Buffer.allocUnsafe(Math.ceil(n / fpBlocks) * FP_LEN);
  }

  const readChunk = async (c: number, buf: Buffer): Promise<number> => {
    const start = c * bufBlocks * blockSize;
    const want = Math.min(bufBlocks * blockSize, size - start);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await fh.read(buf, got, want - got, start + got);
      if (bytesRead === 0) break; // file shrank under us: hash what is there; a new event follows
      got += bytesRead;
    }
    hashStats.bytesRead += got;
    if (got < want) buf.fill(0, got, want);
    return want;
  };

  // A read-ahead that fails while the previous buffer is being visited must not
  // count as an unhandled rejection: it is handled when its turn comes.
  const start = (c: number): Promise<number> => {
    const p = readChunk(c, bufs[c % bufs.length]!);
    p.catch(() => undefined);
    return p;
  };
  let next: Promise<number> | undefined = start(0);
  try {
    for (let c = 0; c < chunks; c++) {
      const buf = bufs[c % bufs.length]!;
      const want = await next!;
      next = c + 1 < chunks ? start(c + 1) : undefined;
      let index = c * bufBlocks;
      for (let o = 0; o < want; ) {
        if (signal?.aborted) throw new Error("cancelled");
        // One run of fpBlocks blocks (or one block when there are no fingerprints).
        const runEnd = Math.min(want, o + (fps ? fpBlocks : 1) * blockSize);
        let reuse = false;
        if (fps) {
          const g = index / fpBlocks;
          const fp = fingerprint(buf.subarray(o, runEnd));
          fp.copy(fps, g * FP_LEN);
          // Same fingerprint over the same byte range as last time: same bytes, same digests.
          const lastBlock = index + Math.ceil((runEnd - o) / blockSize);
          // (the run held the same number of bytes then: the old size may have cut it elsewhere)
          reuse = old !== undefined && (g + 1) * FP_LEN <= old.fps.length && lastBlock * DIGEST_BYTES <= old.digests.length && Math.min(old.size - index * blockSize, fpBlocks * blockSize) === runEnd - o && fp.equals(old.fps.subarray(g * FP_LEN, (g + 1) * FP_LEN));
          if (reuse) old!.digests.copy(digests, index * DIGEST_BYTES, index * DIGEST_BYTES, lastBlock * DIGEST_BYTES);
        }
        for (; o < runEnd; o += blockSize, index++) {
          const data = buf.subarray(o, Math.min(o + blockSize, runEnd));
          let digest: Buffer;
          if (reuse) digest = digests.subarray(index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES);
          else {
            digest = blockDigest(data, algo);
            digest.copy(digests, index * DIGEST_BYTES);
            hashStats.bytesDigested += data.length;
          }
          if (visit) await visit({ index, offset: index * blockSize, data, digest });
        }
      }
    }
  } catch (e) {
    if (key) cacheDrop(key);
    throw e;
  } finally {
    // Never leave a read running into a buffer the caller may reuse.
    await next?.catch(() => undefined);
  }
  if (key && fps) cachePut(key, { algo, blockSize, fpBlocks, size, fps, digests, used: Date.now() });
  return digests;
}

/** Files up to this size may be hashed with synchronous reads (hashFileSync): a few milliseconds of the event loop at most. */
export const SYNC_HASH_MAX = 8 * 1024 * 1024;

/**
 * Block digests of an open file read with synchronous calls, for the many
 * small files of a directory listing or a verify (no fingerprint cache: that
 * is for large files re-read by capture; callers keep to SYNC_HASH_MAX).
 * `scratch` is reused between calls when large enough. A file that shrank
 * meanwhile is hashed as if zeros followed (as in hashBlocks).
 */
export function hashFileSync(fd: number, size: number, blockSize: number, algo: DigestAlgo, scratch?: Buffer): Buffer {
  const n = Math.ceil(size / blockSize);
  const out = Buffer.allocUnsafe(n * DIGEST_BYTES);
  const per = Math.max(1, Math.floor(READ_BYTES / blockSize)) * blockSize;
  const want = Math.min(per, Math.max(blockSize, n * blockSize));
  const buf = scratch && scratch.length >= want ? scratch : Buffer.allocUnsafe(want);
  for (let start = 0, index = 0; start < size; ) {
    const len = Math.min(per, size - start);
    let got = 0;
    while (got < len) {
      const r = readSync(fd, buf, got, len - got, start + got);
      if (r === 0) break;
      got += r;
    }
    hashStats.bytesRead += got;
    if (got < len) buf.fill(0, got, len);
    for (let o = 0; o < len; o += blockSize, index++) blockDigest(buf.subarray(o, Math.min(len, o + blockSize)), algo).copy(out, index * DIGEST_BYTES);
    hashStats.bytesDigested += len;
    start += len;
  }
  return out;
}

export function digestAt(digests: Buffer | undefined, i: number): Buffer | undefined {
  if (!digests || (i + 1) * DIGEST_BYTES > digests.length) return undefined;
  return digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
}
