// The command line as a user meets it: bad configs are refused naming the
// field, `status` prints human and JSON forms, `certs` makes a working PKI,
// and an mTLS pair replicates with certificates made by that command.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, writeFile, rm } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { cli, Pair, tmpDir, freePort, waitFor, AgentProc, compareTrees, snapshotTree } from "./harness.ts";

test("a bad config is refused at start with the field named", async (t) => {
  const dir = await tmpDir();
  t.after(() => rm(dir, { recursive: true, force: true }));
  await writeFile(path.join(dir, "a.yaml"), YAML.stringify({ name: "a", listen: "127.0.0.1:1", dataDir: "s", tls: { insecure: true }, source: { sets: [{ name: "x", path: "/tmp", targets: ["oops"] }] } }));
  const r = await cli(["agent", "--config", path.join(dir, "a.yaml")]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /source\.sets\[0\]\.targets\[0\]: expected host:port/);
  const r2 = await cli(["agent", "--config", path.join(dir, "missing.yaml")]);
  assert.equal(r2.code, 2);
  assert.match(r2.stderr, /cannot read config/);
});

test("status: human and --json forms; an unreachable agent is a clear error", async (t) => {
  const pair = await Pair.create();
  t.after(() => pair.cleanup());
  await writeFile(path.join(pair.src, "f"), "x");
  await pair.start();
  await pair.waitEqual();
  const j = await cli(["status", "--agent", pair.source.address, "--json"]);
  assert.equal(j.code, 0);
  const s = JSON.parse(j.stdout);
  const tgt = s.sets[0].targets[0];
  for (const k of ["state", "lastSentSeq", "lastAckedSeq", "queuedBytes", "lagSeconds"]) assert.ok(k in tgt, `--json has ${k}`);
  assert.deepEqual(Object.keys(tgt.queuedBytes).sort(), ["disk", "memory"]);
  const h = await cli(["status", "--agent", pair.source.address]);
  assert.match(h.stdout, /set data .* files 1/);
  assert.match(h.stdout, new RegExp(`→ ${pair.target.address.replace(/\./g, "\\.")}`));
  const port = await freePort();
  const bad = await cli(["status", "--agent", `127.0.0.1:${port}`]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /agent 127\.0\.0\.1:\d+: .*(ECONNREFUSED|No connection|UNAVAILABLE)/i);
});

test("certs init/issue make the PKI for an mTLS pair that replicates", async (t) => {
  const dir = await tmpDir();
  const procs: AgentProc[] = [];
  t.after(async () => {
    await Promise.all(procs.map((p) => p.stop()));
    await rm(dir, { recursive: true, force: true });
  });
  const pki = path.join(dir, "pki");
  assert.equal((await cli(["certs", "init", "--dir", pki])).code, 0);
  const again = await cli(["certs", "init", "--dir", pki]);
  assert.equal(again.code, 2, "refuses to overwrite a CA");
  for (const n of ["web1", "dr1"]) assert.equal((await cli(["certs", "issue", "--dir", pki, "--name", n])).code, 0);
  const tls = (n: string) => ({ ca: path.join(pki, "ca.crt"), cert: path.join(pki, `${n}.crt`), key: path.join(pki, `${n}.key`) });
  const [sp, tp] = [await freePort(), await freePort()];
  await mkdir(path.join(dir, "src"));
  await writeFile(path.join(dir, "src", "secret.txt"), "over mTLS\n");
  await writeFile(path.join(dir, "dr1.yaml"), YAML.stringify({ name: "dr1", listen: `127.0.0.1:${tp}`, dataDir: "s-dr1", tls: tls("dr1"), target: { root: "dst" } }));
  await writeFile(path.join(dir, "web1.yaml"), YAML.stringify({ name: "web1", listen: `127.0.0.1:${sp}`, dataDir: "s-web1", tls: tls("web1"), source: { sets: [{ name: "www", path: "src", targets: [`127.0.0.1:${tp}`] }] } }));
  for (const n of ["dr1", "web1"]) {
    const p = new AgentProc(n, path.join(dir, `${n}.yaml`), n === "dr1" ? tp : sp, path.join(dir, `${n}.log`));
    procs.push(p);
    await p.start(tls(n));
  }
  let diff: string[] = [];
  await waitFor("replica over mTLS", async () => {
    diff = compareTrees(await snapshotTree(path.join(dir, "src")), await snapshotTree(path.join(dir, "dst", "web1", "www")));
    return diff.length === 0;
  }).catch((e) => assert.fail(`${(e as Error).message}: ${diff.join("; ")}`));
  const st = await cli(["status", "--agent", `127.0.0.1:${sp}`, "--config", path.join(dir, "web1.yaml"), "--json"]);
  assert.equal(JSON.parse(st.stdout).sets[0].targets[0].state, "idle");
  const plain = await cli(["status", "--agent", `127.0.0.1:${sp}`]);
  assert.equal(plain.code, 2, "a plaintext client is refused by an mTLS agent");
});
