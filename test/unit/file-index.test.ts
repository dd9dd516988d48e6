// FileIndex.totalBytes is kept as a running sum; it must always equal the sum
// over the file entries, whatever sets, deletes and moves happened.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { FileIndex, type IndexDelta, type IndexEntry } from "../../agent/source/file-index.ts";

const entry = (t: "f" | "d" | "l", size: number, ino: number): IndexEntry => ({ t, mode: 0o644, uid: 0, gid: 0, size, mtimeSec: 1, mtimeNsec: 0, ctimeMs: 1, ino, nlink: 1 });

test("totalBytes equals the sum of the file entries' sizes after any deltas", () => {
  const name = fc.constantFrom("a", "b", "a/x", "a/y", "b/x", "a/x/z");
  const delta: fc.Arbitrary<IndexDelta> = fc.oneof(
    fc.record({ set: name, t: fc.constantFrom("f" as const, "d" as const, "l" as const), size: fc.nat({ max: 1 << 30 }), ino: fc.nat({ max: 5 }) }).map((r) => ({ set: r.set, e: entry(r.t, r.size, r.ino) })),
    name.map((del) => ({ del })),
    fc.tuple(name, name).filter(([p, q]) => p !== q && !q.startsWith(p + "/")).map(([p, q]) => ({ mv: [p, q] as [string, string] })),
  );
  fc.assert(
    fc.property(fc.array(delta, { maxLength: 40 }), (ds) => {
      const idx = new FileIndex();
      for (const d of ds) {
        idx.apply(d);
        let sum = 0;
        for (const p of idx.paths()) {
          const e = idx.get(p)!;
          if (e.t === "f") sum += e.size;
        }
        assert.equal(idx.totalBytes(), sum);
      }
    }),
  );
});
