// The engine end to end with real agent processes on loopback: an existing
// tree is copied, then a random workload of every operation kind is
// replicated; the target must equal the source byte for byte.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, writeFile, symlink, link, chmod, utimes } from "node:fs/promises";
import path from "node:path";
import { Pair, waitFor } from "./harness.ts";
import { Workload } from "./workload.ts";

test("existing tree, then a random workload of every operation kind, replicates exactly", async (t) => {
  const pair = await Pair.create({ setOptions: { exclude: ["**/*.skip"] } });
  t.after(() => pair.cleanup());
  // Pre-existing content: the initial scan must copy it.
  await mkdir(path.join(pair.src, "a/b"), { recursive: true });
  await writeFile(path.join(pair.src, "a/b/file.txt"), "hello\n");
  await writeFile(path.join(pair.src, "sparse.bin"), "");
  await writeFile(path.join(pair.src, "a/excluded.skip"), "never replicated");
  await symlink("b/file.txt", path.join(pair.src, "a/link"));
  await link(path.join(pair.src, "a/b/file.txt"), path.join(pair.src, "a/hard"));
  await chmod(path.join(pair.src, "a/b"), 0o750);
  await utimes(path.join(pair.src, "a/b/file.txt"), 1_500_000_000.123456, 1_500_000_000.123456);
  await pair.start();
  await pair.waitEqualExcept(["a/excluded.skip"]);

  const w = new Workload(pair.src, 12345);
  await w.run(400, 5);
  await pair.waitEqualExcept(["a/excluded.skip"]);
  const kinds = Object.keys(w.stats).filter((k) => !k.endsWith("-skipped"));
  for (const k of ["create", "write", "append", "truncate", "delete", "rename-file", "rename-dir", "mkdir", "chmod", "utimes", "symlink", "hardlink", "rewrite"]) assert.ok(kinds.includes(k), `workload exercised ${k} (got ${kinds.join(",")})`);
  // Everything journaled ends up acknowledged, and the status says so.
  const s = await waitFor("all packets acknowledged", async () => {
    const st = await pair.source.status();
    const set = st.sets[0]!;
    return set.targets[0]!.lastAckedSeq === set.lastSeq && set.targets[0]!.state === "idle" ? st : undefined;
  });
  assert.equal(s.sets[0]!.targets[0]!.lagSeconds, 0);
  assert.ok(s.sets[0]!.lastSeq > 100, "the workload was shipped as many packets");
});
