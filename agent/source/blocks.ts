// Block hashing lives here and only here: a file is cut into fixed-size blocks
// and each block gets a 16-byte digest (SHA-256, truncated: the CPU's SHA
// extensions make it faster here than MD5 or a JS hash). Capture compares these
// digests with the ones recorded for what the target already has, so only
// changed blocks travel.
import { createHash } from "node:crypto";
import type { FileHandle } from "node:fs/promises";

export const DIGEST_BYTES = 16;
/** Bytes read per syscall while hashing. */
export const READ_BYTES = 4 * 1024 * 1024;

export function blockDigest(data: Uint8Array): Buffer {
  return createHash("sha256").update(data).digest().subarray(0, DIGEST_BYTES);
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

/**
 * Read `size` bytes of a file block by block, hashing each. Returns the
 * concatenated digests; `visit` sees every block (it may copy the data).
 * `signal` cancels between blocks.
 */
export async function hashBlocks(fh: FileHandle, size: number, blockSize: number, visit?: (b: BlockVisit) => void | Promise<void>, signal?: AbortSignal, scratch?: Buffer): Promise<Buffer> {
  const n = Math.ceil(size / blockSize);
  const digests = Buffer.allocUnsafe(n * DIGEST_BYTES);
  // Read several blocks per syscall: large reads are much cheaper than 64 KiB
  // ones. Callers that hash many files pass a scratch buffer to reuse.
  const per = Math.max(1, Math.floor(READ_BYTES / blockSize));
  const bufBlocks = Math.min(per, Math.max(1, n));
  // A small file needs no more than its own size (rounded up to whole blocks).
  const need = Math.min(per * blockSize, Math.max(blockSize, n * blockSize));
  const buf = scratch && scratch.length >= need ? scratch : Buffer.allocUnsafe(need);
  let index = 0;
  while (index < n) {
    if (signal?.aborted) throw new Error("cancelled");
    const want = Math.min(bufBlocks * blockSize, size - index * blockSize);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await fh.read(buf, got, want - got, index * blockSize + got);
      if (bytesRead === 0) break; // file shrank under us: hash what is there; a new event follows
      got += bytesRead;
    }
    if (got < want) buf.fill(0, got, want);
    for (let o = 0; o < want; o += blockSize, index++) {
      const data = buf.subarray(o, Math.min(o + blockSize, want));
      const digest = blockDigest(data);
      digest.copy(digests, index * DIGEST_BYTES);
      if (visit) await visit({ index, offset: index * blockSize, data, digest });
    }
  }
  return digests;
}

export function digestAt(digests: Buffer | undefined, i: number): Buffer | undefined {
  if (!digests || (i + 1) * DIGEST_BYTES > digests.length) return undefined;
  return digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
}
