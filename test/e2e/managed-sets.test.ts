// Operator-managed replication sets over the Control service, with real agent
// processes: ConfigureSet creates a set on an agent whose config file has none
// and the replica ends identical; a changed spec restarts the set without a
// new mirror and applies the new filter to the replica; a managed set survives
// kill -9; RemoveSet with purge stops it and deletes its state; bad specs get
// errors naming the problem; under mTLS only the operator (or the agent
// itself) may change an agent; a background verify reports through Status.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { access, mkdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { status as GrpcStatus } from "@grpc/grpc-js";
import YAML from "yaml";
import { AgentProc, Pair, freePort, snapshotTree, compareTrees, tmpDir, waitFor } from "./harness.ts";
import { AgentCallError, AgentConnection } from "../../agent/control-client.ts";
import { SetSpec, setSpecHash, type SourceSetStatus, type StatusResponse } from "../../agent/wire.ts";
import { createCA, issueCert } from "../../common/tls.ts";

/** A SetSpec with protobuf defaults for everything not given. */
function spec(o: Partial<SetSpec> & Pick<SetSpec, "name" | "path" | "targets">): SetSpec {
  return { ...SetSpec.decode(new Uint8Array()), ...o };
}

function setOf(st: StatusResponse, name: string): SourceSetStatus | undefined {
  return st.sets.find((s) => s.name === name);
}

/** Mirrors the source agent started, over all its runs (its log is appended to across restarts). */
async function mirrorsStarted(p: AgentProc): Promise<number> {
  return ((await p.log()).match(/"msg":"mirror starting"/g) ?? []).length;
}

/** A pair whose source agent has no sets in its config file; `conn` talks to the source's Control service. */
async function managedPair(t: { after(fn: () => Promise<void> | void): void }): Promise<{ pair: Pair; conn: AgentConnection }> {
  const pair = await Pair.create({ sets: [] });
  const conn = new AgentConnection(pair.source.address, { insecure: true });
  t.after(async () => {
    conn.close();
    await pair.cleanup();
  });
  return { pair, conn };
}

async function rejectsWith(p: Promise<unknown>, code: GrpcStatus, message: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof AgentCallError, `an AgentCallError, not ${String(e)}`);
    assert.equal(e.code, code, `gRPC code ${GrpcStatus[code]} expected, got ${GrpcStatus[e.code]}: ${e.message}`);
    assert.match(e.message, message);
    return true;
  });
}

async function exists(p: string): Promise<boolean> {
  return access(p).then(() => true, () => false);
}

/** The set once its initial scan is done and every target has caught up. */
async function settled(conn: AgentConnection, name: string): Promise<SourceSetStatus> {
  return waitFor(`set ${name} to be replicating and caught up`, async () => {
    const s = setOf(await conn.status(), name);
    return s && s.state === "replicating" && s.targets.every((x) => x.state === "idle" && x.lastAckedSeq >= s.lastSeq) ? s : undefined;
  });
}

test("ConfigureSet creates a set on an agent with none in its config; the replica ends identical; the same spec again is unchanged", async (t) => {
  const { pair, conn } = await managedPair(t);
  await mkdir(path.join(pair.src, "sub"));
  await writeFile(path.join(pair.src, "a.txt"), "hello\n");
  await writeFile(path.join(pair.src, "sub", "big.bin"), randomBytes(1_500_000));
  await pair.start();
  assert.deepEqual((await conn.status()).sets, [], "no sets before ConfigureSet");

  const s = spec({ name: "data", path: pair.src, targets: [pair.target.address] });
  const r = await conn.configureSet(s);
  assert.equal(r.result, "created");
  assert.equal(r.specHash, setSpecHash(s));
  await pair.waitEqual();
  await writeFile(path.join(pair.src, "sub", "after.txt"), "written after the mirror\n");
  await pair.waitEqual();

  const st = setOf(await conn.status(), "data");
  assert.ok(st, "the set shows in status");
  assert.equal(st.managed, true);
  assert.equal(st.specHash, setSpecHash(s));
  assert.equal(st.path, pair.src);
  assert.deepEqual(st.targets.map((x) => x.address), [pair.target.address]);
  const saved = JSON.parse(await readFile(path.join(pair.dir, "state-src", "managed-sets.json"), "utf8")) as { sets: SetSpec[] };
  assert.deepEqual(saved.sets.map((x) => x.name), ["data"], "the set is persisted in the data directory");

  const before = await mirrorsStarted(pair.source);
  const again = await conn.configureSet(s);
  assert.deepEqual(again, { result: "unchanged", specHash: setSpecHash(s) });
  // An unchanged spec must not restart the set: a restart resets the set's
  // counters (capturedDataBytes counts what was captured since the set started).
  const st2 = setOf(await conn.status(), "data")!;
  assert.ok(st2.capturedDataBytes > 0 && st2.capturedDataBytes === st.capturedDataBytes, `the set was not restarted (captured ${st.capturedDataBytes} → ${st2.capturedDataBytes})`);
  assert.equal(await mirrorsStarted(pair.source), before);
});

test("a changed spec restarts the set without a new mirror; the new filter applies to the replica", async (t) => {
  const { pair, conn } = await managedPair(t);
  await mkdir(path.join(pair.src, "logs"));
  await writeFile(path.join(pair.src, "keep.txt"), "kept\n");
  await writeFile(path.join(pair.src, "logs", "app.log"), "log line\n".repeat(1000));
  await writeFile(path.join(pair.src, "scratch.tmp"), "temporary\n");
  await writeFile(path.join(pair.src, "big.bin"), randomBytes(4 * 1024 * 1024));
  await pair.start();

  const s1 = spec({ name: "data", path: pair.src, targets: [pair.target.address], exclude: ["**/*.tmp"], compression: "none" });
  assert.equal((await conn.configureSet(s1)).result, "created");
  await pair.waitEqualExcept(["scratch.tmp"]);
  await settled(conn, "data");
  assert.equal(await mirrorsStarted(pair.source), 1, "one initial mirror");

  // Now *.log files are excluded and *.tmp files are not.
  const s2 = { ...s1, exclude: ["**/*.log"], compression: "max" };
  const r = await conn.configureSet(s2);
  assert.equal(r.result, "updated");
  assert.equal(r.specHash, setSpecHash(s2));
  assert.notEqual(r.specHash, setSpecHash(s1));
  await waitFor("the status to show the new spec", async () => setOf(await conn.status(), "data")?.specHash === setSpecHash(s2));

  // A file excluded before and included now reaches the replica; one excluded
  // now is removed from it (the replica mirrors the set as now defined).
  await pair.waitEqualExcept(["logs/app.log"]);
  await writeFile(path.join(pair.src, "new.txt"), "written after the change\n");
  await writeFile(path.join(pair.src, "logs", "new.log"), "excluded\n");
  await pair.waitEqualExcept(["logs/app.log", "logs/new.log"]);
  const st = await settled(conn, "data");
  assert.equal(st.managed, true);
  assert.equal(await mirrorsStarted(pair.source), 1, "no second mirror after the change");
  const m = st.targets[0]!.mirror!;
  assert.equal(m.startedAt, 0, `the restarted set did not mirror: ${JSON.stringify(m)}`);
  assert.ok(st.capturedDataBytes < 1024 * 1024, `the restart did not send the tree again (${st.capturedDataBytes} bytes captured)`);
});

test("kill -9: the managed set comes back from the data directory and keeps replicating, without a new mirror", async (t) => {
  const { pair, conn } = await managedPair(t);
  await writeFile(path.join(pair.src, "a.bin"), randomBytes(2 * 1024 * 1024));
  await pair.start();
  const s = spec({ name: "data", path: pair.src, targets: [pair.target.address] });
  await conn.configureSet(s);
  await pair.waitEqual();
  await settled(conn, "data");
  const mirrors = await mirrorsStarted(pair.source);
  assert.equal(mirrors, 1);

  await pair.source.kill9();
  await writeFile(path.join(pair.src, "while-down.txt"), "written while the source agent was down\n");
  await pair.source.start();
  const st = await waitFor("the managed set to be back", async () => setOf(await conn.status(), "data"));
  assert.equal(st.managed, true);
  assert.equal(st.specHash, setSpecHash(s));
  await writeFile(path.join(pair.src, "after-restart.txt"), "written after the restart\n");
  await pair.waitEqual();
  const st2 = await settled(conn, "data");
  assert.equal(await mirrorsStarted(pair.source), mirrors, "no new mirror after the restart");
  assert.equal(st2.targets[0]!.mirror!.startedAt, 0);
  assert.ok(st2.capturedDataBytes < 64 * 1024, `only the new files were sent (${st2.capturedDataBytes} bytes captured)`);
  assert.equal((await conn.configureSet(s)).result, "unchanged", "the restored set runs the spec it was given");
});

test("RemoveSet with purge stops the set and deletes its state; removing again is a no-op", async (t) => {
  const { pair, conn } = await managedPair(t);
  await writeFile(path.join(pair.src, "a.txt"), "a\n");
  await pair.start();
  await conn.configureSet(spec({ name: "data", path: pair.src, targets: [pair.target.address] }));
  await pair.waitEqual();
  const stateDir = path.join(pair.dir, "state-src", "sets", "data");
  assert.ok((await stat(stateDir)).isDirectory(), "the set keeps its state under <dataDir>/sets/<name>");

  assert.deepEqual(await conn.removeSet("data", true), { existed: true });
  assert.equal(setOf(await conn.status(), "data"), undefined, "the set is gone from status");
  assert.equal(await exists(stateDir), false, "its state directory is deleted");
  const saved = JSON.parse(await readFile(path.join(pair.dir, "state-src", "managed-sets.json"), "utf8")) as { sets: SetSpec[] };
  assert.deepEqual(saved.sets, []);

  await writeFile(path.join(pair.src, "after-remove.txt"), "must not be replicated\n");
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(await exists(path.join(pair.image(), "after-remove.txt")), false, "writes after RemoveSet do not reach the target");
  assert.equal(await exists(path.join(pair.image(), "a.txt")), true, "the target's image is left alone");
  assert.equal(await exists(stateDir), false, "nothing re-created the state directory");

  assert.deepEqual(await conn.removeSet("data", true), { existed: false }, "a retried remove is a no-op");
  // And it stays removed across a restart.
  await pair.source.stop();
  await pair.source.start();
  assert.deepEqual((await conn.status()).sets, []);
  assert.equal(await exists(stateDir), false);
});

test("bad specs are refused with errors naming the problem, and change nothing", async (t) => {
  const { pair, conn } = await managedPair(t);
  // The source has one set of its own in its config file.
  const cfgPath = path.join(pair.dir, "source.yaml");
  const cfg = YAML.parse(await readFile(cfgPath, "utf8")) as { source: { sets: unknown[] } };
  cfg.source.sets = [{ name: "fixed", path: "src", targets: [pair.target.address] }];
  await writeFile(cfgPath, YAML.stringify(cfg));
  await pair.start();
  const ok = { name: "data", path: pair.src, targets: [pair.target.address] };

  await rejectsWith(conn.configureSet(spec({ ...ok, path: "relative/dir" })), GrpcStatus.INVALID_ARGUMENT, /path must be absolute.*relative\/dir/);
  await rejectsWith(conn.configureSet(spec({ ...ok, targets: ["no-port-here"] })), GrpcStatus.INVALID_ARGUMENT, /targets\[0\]: expected host:port/);
  await rejectsWith(conn.configureSet(spec({ ...ok, targets: [] })), GrpcStatus.INVALID_ARGUMENT, /at least one target/);
  await rejectsWith(conn.configureSet(spec({ ...ok, targets: ["10.1.2.3:7702"] })), GrpcStatus.INVALID_ARGUMENT, /10\.1\.2\.3:7702 is not on loopback/);
  await rejectsWith(conn.configureSet(spec({ ...ok, name: "Not A Name" })), GrpcStatus.INVALID_ARGUMENT, /name: expected a lowercase name/);
  await rejectsWith(conn.configureSet(spec({ ...ok, compression: "ultra" })), GrpcStatus.INVALID_ARGUMENT, /compression/);
  await rejectsWith(conn.configureSet(spec({ ...ok, mode: "scheduled" })), GrpcStatus.INVALID_ARGUMENT, /scheduled mode needs `interval`/);
  await rejectsWith(conn.configureSet(spec({ ...ok, name: "fixed" })), GrpcStatus.INVALID_ARGUMENT, /set fixed is defined in the agent's config file/);
  await rejectsWith(conn.removeSet("fixed", true), GrpcStatus.FAILED_PRECONDITION, /set fixed is defined in the agent's config file/);
  // RemoveSet's name becomes a path under <dataDir>/sets: names that are not set names never get there.
  for (const bad of ["", "..", "../sets", "fixed/../.."]) await rejectsWith(conn.removeSet(bad, true), GrpcStatus.INVALID_ARGUMENT, /not a set name/);
  // A background verify reports through status only: a target the set does not have fails the call.
  await rejectsWith(conn.startVerify({ set: "fixed", target: "127.0.0.1:1", repair: false }), GrpcStatus.NOT_FOUND, /set fixed has no target 127\.0\.0\.1:1/);

  const st = await conn.status();
  assert.deepEqual(st.sets.map((s) => [s.name, s.managed]), [["fixed", false]], "nothing was created; the config-file set is untouched");
  assert.equal(await exists(path.join(pair.dir, "state-src", "managed-sets.json")), false);
  assert.ok((await stat(path.join(pair.dir, "state-src", "sets", "fixed"))).isDirectory(), "a refused remove with purge leaves the config-file set's state alone");
  // The agent still takes a good spec after all that.
  assert.equal((await conn.configureSet(spec(ok))).result, "created");
});

test("mTLS: the operator's certificate may change an agent; another agent's may only read its status", async (t) => {
  const dir = await tmpDir();
  const procs: AgentProc[] = [];
  const conns: AgentConnection[] = [];
  t.after(async () => {
    for (const c of conns) c.close();
    await Promise.all(procs.map((p) => p.stop()));
    if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
  });
  const caDir = path.join(dir, "ca");
  const certs = path.join(dir, "certs");
  await createCA(caDir);
  const tls: Record<string, { ca: string; cert: string; key: string }> = {};
  for (const n of ["src-agent", "dst-agent", "understudy-operator", "other-agent"]) {
    const c = await issueCert({ caDir, name: n, hosts: ["127.0.0.1"], outDir: certs });
    tls[n] = { ca: c.caPath, cert: c.certPath, key: c.keyPath };
  }
  const [sp, tp] = [await freePort(), await freePort()];
  const src = path.join(dir, "src");
  await mkdir(src);
  await writeFile(path.join(src, "secret.txt"), "over mTLS\n");
  await writeFile(path.join(dir, "dst.yaml"), YAML.stringify({ name: "dst-agent", listen: `127.0.0.1:${tp}`, dataDir: "state-dst", tls: tls["dst-agent"], target: { root: "dst" } }));
  await writeFile(path.join(dir, "src.yaml"), YAML.stringify({ name: "src-agent", listen: `127.0.0.1:${sp}`, dataDir: "state-src", tls: tls["src-agent"], source: { sets: [] } }));
  for (const [n, port] of [["dst-agent", tp], ["src-agent", sp]] as const) {
    const p = new AgentProc(n, path.join(dir, `${n === "dst-agent" ? "dst" : "src"}.yaml`), port, path.join(dir, `${n}.log`));
    procs.push(p);
    await p.start(tls[n]);
  }
  const as = (cn: string) => {
    const c = new AgentConnection(`127.0.0.1:${sp}`, tls[cn]!);
    conns.push(c);
    return c;
  };
  const operator = as("understudy-operator");
  const other = as("other-agent");
  const target = as("dst-agent");
  const s = spec({ name: "www", path: src, targets: [`127.0.0.1:${tp}`] });

  for (const [who, c] of [["other-agent", other], ["dst-agent", target]] as const) {
    await rejectsWith(c.configureSet(s), GrpcStatus.PERMISSION_DENIED, new RegExp(`client ${who} may not change agent src-agent.*understudy-operator`));
    await rejectsWith(c.removeSet("www", true), GrpcStatus.PERMISSION_DENIED, /may not change/);
    await rejectsWith(c.startVerify({ set: "www", target: "", repair: false }), GrpcStatus.PERMISSION_DENIED, /may not change/);
    assert.equal((await c.status()).name, "src-agent", `${who} may read the status`);
  }
  assert.deepEqual((await other.status()).sets, [], "the refused calls changed nothing");

  assert.equal((await operator.configureSet(s)).result, "created");
  let diff: string[] = [];
  await waitFor("replica over mTLS", async () => {
    diff = compareTrees(await snapshotTree(src), await snapshotTree(path.join(dir, "dst", "src-agent", "www")));
    return diff.length === 0;
  }).catch((e) => assert.fail(`${(e as Error).message}: ${diff.join("; ")}`));
  const st = setOf(await other.status(), "www");
  assert.equal(st?.managed, true);
  await rejectsWith(other.removeSet("www", false), GrpcStatus.PERMISSION_DENIED, /may not change/);
  // The agent's own certificate (the CLI on its host) may change it too.
  assert.deepEqual(await as("src-agent").removeSet("www", false), { existed: true });
});

test("Verify with background=true returns at once; status shows it running, then its result", async (t) => {
  const { pair, conn } = await managedPair(t);
  for (let i = 0; i < 20; i++) await writeFile(path.join(pair.src, `f${i}.bin`), randomBytes(10_000));
  await pair.start();
  // A bandwidth limit keeps the target behind a large write for seconds: a
  // verify then finds the file in flight and waits for the target to catch up.
  const limit = 256 * 1024;
  await conn.configureSet(spec({ name: "data", path: pair.src, targets: [pair.target.address], bandwidthLimit: limit, compression: "none" }));
  await pair.waitEqual();
  await settled(conn, "data");
  assert.equal(setOf(await conn.status(), "data")!.targets[0]!.lastVerify, undefined, "no verify yet");

  await writeFile(path.join(pair.src, "big.bin"), randomBytes(6 * limit));
  await waitFor("the write to be journaled", async () => {
    const s = setOf(await conn.status(), "data")!;
    return s.lastSeq > s.targets[0]!.lastAckedSeq;
  });
  const t0 = Date.now();
  const r = await conn.startVerify({ set: "data", target: "", repair: false });
  const returnedAt = Date.now();
  assert.equal(r.finishedAt, 0, "the returned report is not a result");
  assert.equal(r.set, "data");
  const running = setOf(await conn.status(), "data")!.targets[0]!;
  assert.equal(running.verifying, true, `status shows the verify running: ${JSON.stringify(running.lastVerify)}`);
  assert.equal(running.lastVerify, undefined);

  const done = await waitFor("the verify result in status", async () => {
    const x = setOf(await conn.status(), "data")!.targets[0]!;
    return !x.verifying && x.lastVerify ? x.lastVerify : undefined;
  }, 60_000);
  assert.equal(done.error, "");
  assert.equal(done.ok, true, `the file in flight is not a difference once the target caught up: ${JSON.stringify(done)}`);
  assert.deepEqual(done.differences, []);
  assert.ok(done.filesCompared >= 21, `it compared every file (${done.filesCompared})`);
  assert.ok(done.finishedAt - done.startedAt >= 2, `the verify itself took a while (${(done.finishedAt - done.startedAt).toFixed(1)} s), so the call above did not wait for it`);
  // (a condition, not a time limit: on a busy machine the call itself may take a while)
  assert.ok(returnedAt < done.finishedAt * 1000, `the call returned (${returnedAt - t0} ms after it was made) before the verify finished`);
  await pair.waitEqual();

  await rejectsWith(conn.startVerify({ set: "nope", target: "", repair: false }), GrpcStatus.NOT_FOUND, /no replication set "nope"/);
});

test("a set removed or changed while it is still starting stops for good", async (t) => {
  const { pair, conn } = await managedPair(t);
  // Enough data that the set's initial scan takes a while.
  for (let d = 0; d < 4; d++) {
    await mkdir(path.join(pair.src, `d${d}`));
    for (let i = 0; i < 50; i++) await writeFile(path.join(pair.src, `d${d}`, `f${i}.bin`), randomBytes(256 * 1024));
  }
  await pair.start();
  const s1 = spec({ name: "data", path: pair.src, targets: [pair.target.address] });
  assert.equal((await conn.configureSet(s1)).result, "created");
  const s2 = { ...s1, exclude: ["d3"] };
  assert.equal((await conn.configureSet(s2)).result, "updated");
  await pair.waitEqualExcept([...Array(50).keys()].map((i) => `d3/f${i}.bin`).concat("d3"));
  assert.deepEqual(await conn.removeSet("data", true), { existed: true });
  assert.equal((await conn.configureSet(s1)).result, "created");
  assert.deepEqual(await conn.removeSet("data", true), { existed: true });

  await writeFile(path.join(pair.src, "after-remove.txt"), "must not be replicated\n");
  await new Promise((r) => setTimeout(r, 2000));
  assert.deepEqual((await conn.status()).sets, []);
  assert.equal(await exists(path.join(pair.image(), "after-remove.txt")), false, "no set is left running after RemoveSet");
  assert.equal(await exists(path.join(pair.dir, "state-src", "sets", "data")), false, "nothing re-created the purged state");
  const log = await pair.source.log();
  assert.doesNotMatch(log, /"level":50/, "no errors in the source's log");
});

test("a set whose path is missing or not a directory says so in its status, with the path and the error; fixed, the error goes", async (t) => {
  const { pair, conn } = await managedPair(t);
  await pair.start();
  const missing = path.join(pair.src, "not-there");
  await conn.configureSet(spec({ name: "gone", path: missing, targets: [pair.target.address] }));
  const s = await waitFor("a path error", async () => setOf(await conn.status(), "gone")?.pathError || undefined);
  assert.equal(s, `source path ${missing} cannot be read: ENOENT: no such file or directory`);
  const file = path.join(pair.src, "a-file");
  await writeFile(file, "x\n");
  await conn.configureSet(spec({ name: "file", path: file, targets: [pair.target.address] }));
  assert.equal(await waitFor("a path error", async () => setOf(await conn.status(), "file")?.pathError || undefined), `source path ${file} is not a directory`);
  // The path appears: the error is gone at once (checked at every status).
  await mkdir(missing);
  await writeFile(path.join(missing, "late.txt"), "late\n");
  await waitFor("no path error", async () => setOf(await conn.status(), "gone")?.pathError === "");
  assert.equal(setOf(await conn.status(), "file")?.pathError, `source path ${file} is not a directory`);
});
