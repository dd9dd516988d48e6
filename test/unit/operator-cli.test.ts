// The operator's command line: where its Lease lives, and which files
// --agent-tls-dir needs (with a message naming what is missing).
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { agentTlsFiles, leaderElectionNamespace } from "../../operator/main.ts";

test("the Lease's namespace: the flag, else POD_NAMESPACE, else the pod's own namespace file, else none (never a silent default)", async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "understudy-cli-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const saFile = path.join(dir, "namespace");
  assert.equal(leaderElectionNamespace("flagged", { POD_NAMESPACE: "pod" }, saFile), "flagged");
  assert.equal(leaderElectionNamespace(undefined, { POD_NAMESPACE: "pod" }, saFile), "pod");
  assert.equal(leaderElectionNamespace(undefined, {}, saFile), undefined);
  await writeFile(saFile, "understudy-system\n");
  assert.equal(leaderElectionNamespace(undefined, {}, saFile), "understudy-system");
});

test("--agent-tls-dir: a Secret's layout or what certs issue writes; otherwise a message naming the files", async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "understudy-cli-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  assert.match(agentTlsFiles(path.join(dir, "nope")) as string, /does not exist; it must hold ca\.crt, tls\.crt and tls\.key .* or ca\.crt, understudy-operator\.crt and understudy-operator\.key/);
  assert.match(agentTlsFiles(dir) as string, /holds no client certificate; it must hold ca\.crt, tls\.crt and tls\.key/);
  await writeFile(path.join(dir, "understudy-operator.crt"), "");
  assert.match(agentTlsFiles(dir) as string, /has no ca\.crt and no understudy-operator\.key/);
  await writeFile(path.join(dir, "understudy-operator.key"), "");
  await writeFile(path.join(dir, "ca.crt"), "");
  assert.deepEqual(agentTlsFiles(dir), { ca: path.join(dir, "ca.crt"), cert: path.join(dir, "understudy-operator.crt"), key: path.join(dir, "understudy-operator.key") });
  // A Secret's names win when both are there.
  await writeFile(path.join(dir, "tls.crt"), "");
  assert.match(agentTlsFiles(dir) as string, /has no tls\.key/);
  await writeFile(path.join(dir, "tls.key"), "");
  assert.deepEqual(agentTlsFiles(dir), { ca: path.join(dir, "ca.crt"), cert: path.join(dir, "tls.crt"), key: path.join(dir, "tls.key") });
});
