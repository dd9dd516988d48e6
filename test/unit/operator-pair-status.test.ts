// computeStatus, the pure rule book from what the operator saw of a pair's
// agents to the ReplicationPair's status: phase, conditions, per-target data,
// and which conditions flipped (those become Events).
import { test } from "node:test";
import assert from "node:assert/strict";
import { computeStatus, type AgentView, type Observation } from "../../operator/controllers/pair-status.ts";
import type { Difference, ImageStatus, MirrorProgress, SourceSetStatus, StatusResponse, TargetStatus, VerifyReport } from "../../agent/wire.ts";
import type { Condition, ResolvedPair, ReplicationPairStatus } from "../../operator/api/v1alpha1/index.ts";

const SRC = "10.0.0.1:7702";
const TGT = "10.0.0.2:7702";
const TGT2 = "10.0.0.3:7702";
const SET = "prod.www";
const T0 = 1_740_000_000; // unix seconds
const NOW = new Date((T0 + 3600) * 1000);

function pair(status?: ReplicationPairStatus, o: { generation?: number; twoTargets?: boolean } = {}): ResolvedPair {
  return {
    metadata: { namespace: "prod", name: "www", generation: o.generation ?? 1 },
    spec: {
      source: { agent: { address: SRC } },
      targets: [{ name: "dr", agent: { address: TGT } }, ...(o.twoTargets ? [{ name: "backup", agent: { address: TGT2 } }] : [])],
      replicationSet: { path: "/srv/www" },
    },
    status,
  };
}

function mirror(p: Partial<MirrorProgress> = {}): MirrorProgress {
  return { active: false, mode: "checksum", filesDone: 10, filesTotal: 10, bytesDone: 1000, bytesTotal: 1000, bytesSent: 400, rateBytesPerSecond: 0, etaSeconds: 0, startedAt: T0, finishedAt: T0 + 60, result: "ok", resumed: false, ...p };
}

function report(p: Partial<VerifyReport> = {}): VerifyReport {
  return { set: SET, target: TGT, startedAt: T0 + 100, finishedAt: T0 + 160, ok: true, filesCompared: 10, bytesCompared: 1000, differences: [], repaired: 0, error: "", inFlight: 0, ...p };
}

function target(p: Partial<TargetStatus> = {}): TargetStatus {
  return { address: TGT, state: "idle", lastSentSeq: 42, lastAckedSeq: 42, queuedBytes: { memory: 0, disk: 0 }, lagSeconds: 0, lastError: "", retries: 0, mirror: mirror(), lastVerify: undefined, verifying: false, ...p };
}

function source(targets: TargetStatus[] = [target()], p: Partial<SourceSetStatus> = {}): AgentView {
  const set: SourceSetStatus = { name: SET, path: "/srv/www", state: "running", lastSeq: 42, journalFirstSeq: 1, queuedBytes: { memory: 0, disk: 0 }, targets, files: 10, bytes: 1000, capturedDataBytes: 0, lastError: "", managed: true, specHash: "abc", pathError: "", ...p };
  const status: StatusResponse = { name: "web1", agentVersion: "0.1.0", protocolVersion: 1, sets: [set], images: [], uptimeSeconds: 100 };
  return { status };
}

function targetAgent(name: string, p: Partial<ImageStatus> = {}): AgentView {
  const image: ImageStatus = { source: "web1", set: SET, path: `/replicas/web1/${SET}`, appliedSeq: 42, durableSeq: 42, connected: true, lastError: "", epoch: 0, promoted: false, disconnectedAt: 0, mirroring: false, journalId: "j1", ...p };
  return { status: { name, agentVersion: "0.1.0", protocolVersion: 1, sets: [], images: [image], uptimeSeconds: 100 } };
}

function observe(src: AgentView, o: Partial<Observation> = {}): Observation {
  return { now: NOW, setName: SET, source: src, targets: new Map([[TGT, targetAgent("dr1")], [TGT2, targetAgent("bk1")]]), ...o };
}

function cond(s: ReplicationPairStatus, type: string): Condition {
  const c = s.conditions?.find((x) => x.type === type);
  assert.ok(c, `no ${type} condition in ${JSON.stringify(s.conditions)}`);
  return c;
}

/** [status, reason] of each condition, for compact assertions. */
function summary(s: ReplicationPairStatus): Record<string, [string, string]> {
  return Object.fromEntries((s.conditions ?? []).map((c) => [c.type, [c.status, c.reason]]));
}

/** The status of a pair that replicates happily and was mirrored (the usual "before"). */
function healthy(): ReplicationPairStatus {
  return computeStatus(pair(), observe(source())).status;
}

test("a healthy idle source and target, mirrored ok: Replicating, Ready, not Degraded", () => {
  const { status, transitions } = computeStatus(pair(), observe(source()));
  assert.equal(status.phase, "Replicating");
  assert.deepEqual(summary(status), {
    Degraded: ["False", "AllHealthy"],
    Replicating: ["True", "Replicating"],
    Mirrored: ["True", "MirrorComplete"],
    Verified: ["Unknown", "NeverVerified"],
    Ready: ["True", "Replicating"],
  });
  assert.equal(status.mirror, "complete");
  assert.deepEqual(status.sourceAgent, { name: "web1", version: "0.1.0", setName: SET });
  assert.equal(status.lastSeq, 42);
  const t = status.targets![0]!;
  assert.equal(t.name, "dr");
  assert.equal(t.state, "idle");
  assert.equal(t.connected, true);
  assert.equal(t.appliedSeq, 42);
  assert.equal(t.lastError, undefined);
  assert.deepEqual(t.mirror, { active: false, mode: "checksum", filesDone: 10, filesTotal: 10, bytesDone: 1000, bytesTotal: 1000, bytesSent: 400, startedAt: new Date(T0 * 1000).toISOString().replace(/\.\d+Z$/, "Z"), finishedAt: new Date((T0 + 60) * 1000).toISOString().replace(/\.\d+Z$/, "Z"), result: "ok" });
  // The first computation adds every condition: each is a transition.
  assert.deepEqual(transitions.map((t) => t.type).sort(), ["Degraded", "Mirrored", "Ready", "Replicating", "Verified"]);
  // Every condition time is the observation's, in whole seconds.
  for (const c of status.conditions!) assert.equal(c.lastTransitionTime, NOW.toISOString().replace(/\.\d+Z$/, "Z"));
});

test("the same observation again changes nothing and flips nothing; a later one keeps the transition times", () => {
  const first = healthy();
  const later = new Date(NOW.getTime() + 600_000);
  const { status, transitions } = computeStatus(pair(first), observe(source(), { now: later }));
  assert.deepEqual(transitions, []);
  assert.deepEqual(status, first);
});

test("source unreachable: Degraded SourceUnreachable, phase Degraded, per-target data kept from before", () => {
  const before = healthy();
  const { status, transitions } = computeStatus(pair(before), observe({ error: "connect ECONNREFUSED 10.0.0.1:7702" }));
  assert.equal(status.phase, "Degraded");
  const d = cond(status, "Degraded");
  assert.deepEqual([d.status, d.reason], ["True", "SourceUnreachable"]);
  assert.match(d.message, /10\.0\.0\.1:7702.*ECONNREFUSED/);
  assert.deepEqual(summary(status).Replicating, ["Unknown", "SourceUnreachable"]);
  assert.deepEqual(summary(status).Ready, ["False", "SourceUnreachable"]);
  assert.deepEqual(summary(status).Mirrored, ["True", "MirrorComplete"], "what the targets hold did not change because we cannot see the source");
  const [t, b] = [status.targets![0]!, before.targets![0]!];
  assert.equal(t.state, "unknown");
  assert.deepEqual([t.lastSentSeq, t.lastAckedSeq, t.appliedSeq, t.mirror], [b.lastSentSeq, b.lastAckedSeq, b.appliedSeq, b.mirror]);
  assert.equal(status.lastSeq, before.lastSeq);
  assert.deepEqual(status.sourceAgent, before.sourceAgent);
  // Only the conditions that flipped are transitions.
  assert.deepEqual(transitions.map((x) => x.type).sort(), ["Degraded", "Ready", "Replicating"]);
  // The time of Mirrored is still that of the first observation; Degraded's is now.
  assert.equal(cond(status, "Mirrored").lastTransitionTime, cond(before, "Mirrored").lastTransitionTime);
});

test("a target the source reports degraded: Degraded TargetDegraded naming the target, and gRPC noise is tidied", () => {
  const lastError = "No connection established. Last error: Error: connect ECONNREFUSED 10.0.0.2:7702. Resolution note: ";
  const { status, transitions } = computeStatus(pair(healthy()), observe(source([target({ state: "degraded", lastError })])));
  assert.equal(status.phase, "Degraded");
  const d = cond(status, "Degraded");
  assert.deepEqual([d.status, d.reason], ["True", "TargetDegraded"]);
  assert.match(d.message, /target\(s\) dr cannot take changes: connect ECONNREFUSED 10\.0\.0\.2:7702$/);
  assert.equal(status.targets![0]!.lastError, "connect ECONNREFUSED 10.0.0.2:7702");
  assert.deepEqual(summary(status).Replicating, ["False", "TargetDegraded"]);
  assert.deepEqual(summary(status).Ready, ["False", "TargetDegraded"]);
  const deg = transitions.find((t) => t.type === "Degraded");
  assert.deepEqual(deg && [deg.status, deg.reason], ["True", "TargetDegraded"]);
});

test("with two targets, the degraded one is named and the healthy one is not", () => {
  const { status } = computeStatus(pair(undefined, { twoTargets: true }), observe(source([target(), target({ address: TGT2, state: "degraded", lastError: "disk full" })])));
  const d = cond(status, "Degraded");
  assert.equal(d.reason, "TargetDegraded");
  assert.match(d.message, /target\(s\) backup cannot take changes: disk full/);
  assert.doesNotMatch(d.message, /\bdr\b/);
});

test("a target agent the operator cannot reach, while the source still replicates to it: Degraded TargetUnreachable", () => {
  const { status } = computeStatus(pair(healthy()), observe(source(), { targets: new Map([[TGT, { error: "deadline exceeded" }]]) }));
  assert.deepEqual(summary(status).Degraded, ["True", "TargetUnreachable"]);
  assert.match(cond(status, "Degraded").message, /dr \(10\.0\.0\.2:7702\): deadline exceeded/);
  assert.equal(status.targets![0]!.state, "idle", "the source still reaches it, so it is not 'unreachable'");
});

test("an active mirror: phase Mirroring, Mirrored False with the percentage", () => {
  const m = mirror({ active: true, mode: "full", filesDone: 3, filesTotal: 10, bytesDone: 256 * 1024, bytesTotal: 1024 * 1024, finishedAt: 0, result: "" });
  const { status } = computeStatus(pair(healthy()), observe(source([target({ state: "replicating", mirror: m })])));
  assert.equal(status.phase, "Mirroring");
  const c = cond(status, "Mirrored");
  assert.deepEqual([c.status, c.reason], ["False", "Mirroring"]);
  assert.match(c.message, /^full mirror to dr: 25% \(3\/10 files, 256KiB\/1\.0MiB\)$/);
  assert.equal(status.mirror, "25% 256KiB/1.0MiB");
  assert.deepEqual([status.targets![0]!.mirror?.active, status.targets![0]!.mirror?.result], [true, "running"]);
  assert.deepEqual(summary(status).Ready, ["False", "Mirroring"]);
  assert.deepEqual(summary(status).Degraded, ["False", "AllHealthy"], "a mirror is not a fault");
});

test("a mirror that was interrupted: Mirrored False MirrorFailed", () => {
  const { status } = computeStatus(pair(healthy()), observe(source([target({ mirror: mirror({ startedAt: T0 + 200, finishedAt: T0 + 260, result: "interrupted: connection reset" }) })])));
  const c = cond(status, "Mirrored");
  assert.deepEqual([c.status, c.reason], ["False", "MirrorFailed"]);
  assert.match(c.message, /mirror to dr did not complete: interrupted: connection reset/);
  assert.equal(status.mirror, "failed");
  assert.equal(status.targets![0]!.mirror?.result, "interrupted: connection reset");
  assert.deepEqual(summary(status).Ready, ["False", "MirrorFailed"]);
  assert.equal(status.phase, "Replicating", "changes still flow; the copy is just not known complete");
});

test("no mirror yet: Mirrored False MirrorPending, not Ready", () => {
  const { status } = computeStatus(pair(), observe(source([target({ mirror: undefined })])));
  assert.deepEqual(summary(status).Mirrored, ["False", "MirrorPending"]);
  assert.deepEqual(summary(status).Ready, ["False", "MirrorPending"]);
  assert.equal(status.mirror, "pending");
});

test("an agent that restarted (mirror startedAt 0) keeps the recorded Mirrored=True and per-target mirror", () => {
  const before = healthy();
  for (const m of [mirror({ active: false, startedAt: 0, finishedAt: 0, result: "", filesDone: 0, filesTotal: 0, bytesDone: 0, bytesTotal: 0, bytesSent: 0 }), undefined]) {
    const { status, transitions } = computeStatus(pair(before), observe(source([target({ mirror: m })])));
    assert.deepEqual(summary(status).Mirrored, ["True", "MirrorComplete"]);
    assert.deepEqual(status.targets![0]!.mirror, before.targets![0]!.mirror);
    assert.equal(status.phase, "Replicating");
    assert.deepEqual(transitions, []);
  }
});

test("Mirrored=True also survives a restart where no per-target mirror was recorded; without it, the first mirror is pending", () => {
  const before = healthy();
  for (const t of before.targets!) delete t.mirror;
  const restarted = target({ mirror: mirror({ startedAt: 0, finishedAt: 0, result: "" }) });
  const { status, transitions } = computeStatus(pair(before), observe(source([restarted])));
  assert.deepEqual(summary(status).Mirrored, ["True", "MirrorComplete"]);
  assert.deepEqual(transitions, []);
  const fresh = computeStatus(pair(), observe(source([restarted]))).status;
  assert.deepEqual(summary(fresh).Mirrored, ["False", "MirrorPending"]);
});

test("a verify that found differences: Verified False DifferencesFound, with a sample", () => {
  const differences: Difference[] = [
    { path: "index.html", kind: "content", detail: "block 3 differs" },
    { path: "img/logo.png", kind: "missing", detail: "" },
    ...Array.from({ length: 20 }, (_, i) => ({ path: `f${i}`, kind: "mode", detail: "0644 != 0600" })),
  ];
  const { status } = computeStatus(pair(healthy()), observe(source([target({ lastVerify: report({ ok: false, differences, repaired: 2 }) })])));
  const c = cond(status, "Verified");
  assert.deepEqual([c.status, c.reason], ["False", "DifferencesFound"]);
  assert.match(c.message, /verify of dr found 22 difference\(s\), 2 repaired: content index\.html: block 3 differs; missing img\/logo\.png; mode f0: 0644 != 0600$/);
  const v = status.targets![0]!.lastVerify!;
  assert.equal(v.result, "Failed");
  assert.equal(v.differences, 22);
  assert.equal(v.sample?.length, 10, "the sample is bounded");
  assert.equal(v.sample?.[0], "content index.html: block 3 differs");
  assert.deepEqual(status.lastVerify, v);
  // A failed verify does not stop replication or make the pair unready.
  assert.deepEqual(summary(status).Ready, ["True", "Replicating"]);
});

test("a verify that passed: Verified True; one that errored: Verified False VerifyError", () => {
  const ok = computeStatus(pair(healthy()), observe(source([target({ lastVerify: report() })]))).status;
  assert.deepEqual(summary(ok).Verified, ["True", "VerifyPassed"]);
  assert.equal(ok.lastVerify?.result, "Passed");
  assert.equal(ok.lastVerify?.target, "dr");
  const err = computeStatus(pair(ok), observe(source([target({ lastVerify: report({ ok: false, error: "target refused: not allowed" }) })]))).status;
  assert.deepEqual(summary(err).Verified, ["False", "VerifyError"]);
  assert.match(cond(err, "Verified").message, /verify of dr failed: target refused: not allowed/);
});

test("a running verify shows Running but keeps the last finished result's Verified condition, however many times it is observed", () => {
  const passed = computeStatus(pair(healthy()), observe(source([target({ lastVerify: report() })]))).status;
  const verifiedAt = cond(passed, "Verified").lastTransitionTime;
  // While the next verify runs the agent still reports the previous one as lastVerify.
  const running = observe(source([target({ lastVerify: report(), verifying: true })]));
  let s = passed;
  for (let i = 0; i < 3; i++) {
    const { status, transitions } = computeStatus(pair(s), { ...running, now: new Date(NOW.getTime() + (i + 1) * 60_000) });
    assert.deepEqual(summary(status).Verified, ["True", "VerifyPassed"], `observation ${i + 1} of the running verify`);
    assert.equal(cond(status, "Verified").lastTransitionTime, verifiedAt);
    assert.equal(status.lastVerify?.result, "Running");
    assert.equal(status.targets![0]!.lastVerify?.result, "Passed", "per target: the last finished verify");
    assert.equal(status.targets![0]!.verifying, true);
    assert.deepEqual(transitions, []);
    s = status;
  }
  // An agent that restarted before this verify has no earlier report: what was recorded stands.
  const noReport = computeStatus(pair(passed), observe(source([target({ lastVerify: undefined, verifying: true })]))).status;
  assert.deepEqual(summary(noReport).Verified, ["True", "VerifyPassed"]);
  assert.equal(noReport.lastVerify?.result, "Running");
  // It finishes with differences: now Verified flips.
  const { status, transitions } = computeStatus(pair(s), observe(source([target({ lastVerify: report({ startedAt: T0 + 500, finishedAt: T0 + 560, ok: false, differences: [{ path: "a", kind: "extra", detail: "" }] }) })])));
  assert.deepEqual(summary(status).Verified, ["False", "DifferencesFound"]);
  assert.equal(status.lastVerify?.result, "Failed");
  assert.deepEqual(transitions.map((t) => t.type), ["Verified"]);
});

test("observedGeneration follows metadata.generation, on the status and every condition", () => {
  const first = computeStatus(pair(undefined, { generation: 3 }), observe(source())).status;
  assert.equal(first.observedGeneration, 3);
  const next = computeStatus(pair(first, { generation: 7 }), observe(source())).status;
  assert.equal(next.observedGeneration, 7);
  for (const c of next.conditions!) assert.equal(c.observedGeneration, 7, c.type);
});

test("a set the source agent refused: Degraded ConfigRejected, Replicating False ConfigRejected", () => {
  const src = source();
  src.status!.sets = [];
  const { status } = computeStatus(pair(healthy()), observe(src, { configError: "agent 10.0.0.1:7702: path must be absolute" }));
  assert.equal(status.phase, "Degraded");
  assert.deepEqual(summary(status).Degraded, ["True", "ConfigRejected"]);
  assert.match(cond(status, "Degraded").message, /refused the replication set: agent 10\.0\.0\.1:7702: path must be absolute/);
  assert.deepEqual(summary(status).Replicating, ["False", "ConfigRejected"]);
  assert.equal(status.targets![0]!.state, "configuring");
});

test("a set being configured or scanning: phase Configuring, Replicating False", () => {
  const src = source();
  src.status!.sets = [];
  const configuring = computeStatus(pair(), observe(src)).status;
  assert.equal(configuring.phase, "Configuring");
  assert.deepEqual(summary(configuring).Replicating, ["False", "Configuring"]);
  assert.deepEqual(summary(configuring).Degraded, ["False", "AllHealthy"]);
  const scanning = computeStatus(pair(), observe(source([target()], { state: "scanning" }))).status;
  assert.equal(scanning.phase, "Configuring");
  assert.deepEqual(summary(scanning).Replicating, ["False", "Scanning"]);
});

test("a set that failed on the source, and a target that refused: their own Degraded reasons", () => {
  const failed = computeStatus(pair(), observe(source([target()], { state: "failed", lastError: "journal corrupt" }))).status;
  assert.deepEqual(summary(failed).Degraded, ["True", "SetFailed"]);
  assert.match(cond(failed, "Degraded").message, /journal corrupt/);
  const refused = computeStatus(pair(), observe(source([target({ state: "refused", lastError: "source web1 is not allowed" })]))).status;
  assert.deepEqual(summary(refused).Degraded, ["True", "TargetRefused"]);
  assert.match(cond(refused, "Degraded").message, /target\(s\) dr refused the source: source web1 is not allowed/);
});

test("a deleted pair is in phase Deleting whatever its agents say", () => {
  const p = pair(healthy());
  p.metadata.deletionTimestamp = NOW;
  assert.equal(computeStatus(p, observe({ error: "down" })).status.phase, "Deleting");
});

test("every reason fits the CRD's reason pattern and the status has no undefined members", () => {
  const reason = /^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$/;
  const observations: [ResolvedPair, Observation][] = [
    [pair(), observe(source())],
    [pair(), observe({ error: "x" })],
    [pair(), observe(source([target({ state: "connecting", mirror: undefined })]))],
    [pair(), observe(source([target({ state: "degraded" })]))],
    [pair(), observe(source([target({ lastVerify: report({ ok: false, differences: [{ path: "a", kind: "extra", detail: "" }] }) })]))],
  ];
  for (const [p, o] of observations) {
    const { status } = computeStatus(p, o);
    for (const c of status.conditions!) assert.match(c.reason, reason);
    assert.deepEqual(status, JSON.parse(JSON.stringify(status)));
  }
});

test("a source path that is missing: never Ready or Mirrored; the conditions name the path and the error", () => {
  const err = "source path /srv/www cannot be read: ENOENT: no such file or directory";
  // What the agent reports for a missing path: the set runs (an empty tree) and even its mirror "finished".
  const { status } = computeStatus(pair(), observe(source([target()], { pathError: err, files: 1, bytes: 0 })));
  assert.equal(status.phase, "Degraded");
  assert.deepEqual(summary(status), {
    Degraded: ["True", "SourcePathUnavailable"],
    Replicating: ["False", "SourcePathUnavailable"],
    Mirrored: ["False", "SourcePathUnavailable"],
    Verified: ["Unknown", "NeverVerified"],
    Ready: ["False", "SourcePathUnavailable"],
  });
  for (const t of ["Degraded", "Replicating", "Mirrored", "Ready"]) assert.match(cond(status, t).message, /\/srv\/www.*ENOENT: no such file or directory/, t);
  assert.equal(status.mirror, "source path unavailable");
  // A pair that was Ready loses it when its path goes away, and gets it back when the path returns.
  const was = healthy();
  const gone = computeStatus(pair(was), observe(source([target()], { pathError: err }))).status;
  assert.equal(cond(gone, "Ready").status, "False");
  assert.equal(cond(gone, "Mirrored").status, "False");
  const back = computeStatus(pair(gone), observe(source())).status;
  assert.equal(cond(back, "Ready").status, "True", JSON.stringify(back.conditions));
});

test("a status write deletes on the server what the new status leaves out (a merge patch sends null), nested too", async () => {
  const { mergePatch } = await import("../../operator/kube.ts");
  const before = { lag: "2s", lagSeconds: 2, health: { sourceDown: true, sourceDownSince: "2025-01-01T00:00:00Z", missedBeats: 3 }, targets: [{ name: "dr", address: "a", lastAckedSeq: 3 }], phase: "Replicating" };
  const after = { phase: "FailedOver", health: { sourceDown: false, missedBeats: 0 }, targets: [{ name: "dr", address: "a" }] };
  assert.deepEqual(mergePatch(before, after), { phase: "FailedOver", lag: null, lagSeconds: null, health: { sourceDown: false, missedBeats: 0, sourceDownSince: null }, targets: [{ name: "dr", address: "a" }] });
});
