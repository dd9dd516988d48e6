// FailoverFlow against fakes: failover (source down), planned cutover with
// quiesce and drain, the failed-over state (fencing the returning source and
// replicating back), and failback — what each step asks of the agents, of the
// identity, and what it writes into status.
import { test } from "node:test";
import assert from "node:assert/strict";
import { pino } from "pino";
import { FailoverFlow } from "../../operator/controllers/failover.ts";
import type { AgentDirectory } from "../../operator/agents.ts";
import type { EventRecorder, IdentityMover, PairWriter } from "../../operator/controllers/replicationpair.ts";
import type { ImageStatus, SetSpec, SourceSetStatus, StatusResponse, TargetStatus as WireTarget } from "../../agent/wire.ts";
import type { Condition, FailoverPolicy, ReplicationPair, ResolvedPair, ReplicationPairStatus, TargetStatus } from "../../operator/api/v1alpha1/index.ts";

const SRC = "10.0.0.1:7702";
const TGT = "10.0.0.2:7702";
const SET = "prod.www";
const NOW = new Date("2025-03-01T12:00:00Z");
const isoAgo = (ms: number) => new Date(NOW.getTime() - ms).toISOString();

type Call = { method: string; address: string; args: unknown[] };

/** An AgentDirectory whose agents are plain data; every call is logged (with identity moves) in one ordered list. */
class FakeAgents implements AgentDirectory {
  readonly calls: Call[];
  /** address → what Status answers (an Error: unreachable). A function is asked on each call. */
  readonly agents = new Map<string, StatusResponse | Error | (() => StatusResponse | Error)>();
  drainSeq = new Map<string, number>();
  /** Runs when a set is drained (e.g. to make the agent's next status show the acks). */
  onDrain?: (address: string) => void;
  commandResult: (address: string, command: string[]) => { exitCode: number; output: string } = () => ({ exitCode: 0, output: "" });
  promoted = { appliedSeq: 0, durableSeq: 0 };

  constructor(calls: Call[]) {
    this.calls = calls;
  }

  private log(method: string, address: string, ...args: unknown[]) {
    this.calls.push({ method, address, args });
  }

  async status(address: string, timeoutMs?: number): Promise<StatusResponse> {
    this.log("status", address, timeoutMs);
    let a = this.agents.get(address);
    if (typeof a === "function") a = a();
    if (!a) throw new Error(`no agent at ${address}`);
    if (a instanceof Error) throw a;
    return structuredClone(a);
  }
  async configureSet(address: string, spec: SetSpec) {
    this.log("configureSet", address, spec);
    return { result: "created", specHash: "h" };
  }
  async removeSet(address: string, name: string, purge: boolean) {
    this.log("removeSet", address, name, purge);
    return { existed: true };
  }
  async mirror(address: string, req: { set: string; target: string; mode: string }) {
    this.log("mirror", address, req);
    return { started: [] };
  }
  async startVerify(address: string, req: { set: string; target: string; repair: boolean }): Promise<never> {
    this.log("startVerify", address, req);
    throw new Error("not expected");
  }
  async promote(address: string, req: { source: string; set: string; epoch: number }) {
    this.log("promote", address, req);
    return { ...this.promoted, path: "/replicas/web1/prod.www", epoch: req.epoch };
  }
  async mapImage(address: string, req: { source: string; set: string; path: string; remove: boolean }) {
    this.log("mapImage", address, req);
    return { path: req.path };
  }
  async runCommand(address: string, command: string[], timeoutMs: number) {
    this.log("runCommand", address, command, timeoutMs);
    return this.commandResult(address, command);
  }
  async drain(address: string, set: string) {
    this.log("drain", address, set);
    this.onDrain?.(address);
    return { lastSeq: this.drainSeq.get(address) ?? 0 };
  }
  invalidate(address: string): void {
    this.log("invalidate", address);
  }
}

class FakeWriter implements PairWriter {
  readonly patches: ReplicationPairStatus[] = [];
  async addFinalizer(): Promise<string | undefined> {
    throw new Error("not expected");
  }
  async removeFinalizer(): Promise<void> {
    throw new Error("not expected");
  }
  async patchStatus(_pair: ReplicationPair, status: ReplicationPairStatus): Promise<void> {
    this.patches.push(structuredClone(status));
  }
  async setActiveSide(): Promise<void> {
    throw new Error("not expected");
  }
}

type Ev = { type: string; reason: string; message: string };

function harness() {
  const calls: Call[] = [];
  const agents = new FakeAgents(calls);
  const writer = new FakeWriter();
  const events: Ev[] = [];
  const recorder: EventRecorder = { event: (_o, type, reason, message) => void events.push({ type, reason, message }) };
  const identity: IdentityMover & { fail?: Error } = {
    async pointService(namespace, service, port, address) {
      calls.push({ method: "pointService", address, args: [namespace, service, port] });
      if (identity.fail) throw identity.fail;
    },
  };
  const flow = new FailoverFlow({ agents, writer, events: recorder, identity, log: pino({ level: "silent" }), now: () => NOW });
  const of = (method: string, address?: string) => calls.filter((c) => c.method === method && (address === undefined || c.address === address));
  /** The agent calls that change something, in order (reads left out). */
  const actions = () => calls.filter((c) => c.method !== "status" && c.method !== "invalidate").map((c) => `${c.method} ${c.address}`);
  return { calls, agents, writer, events, identity, flow, of, actions };
}

function wireTarget(p: Partial<WireTarget> = {}): WireTarget {
  return { address: TGT, state: "idle", lastSentSeq: 42, lastAckedSeq: 42, queuedBytes: { memory: 0, disk: 0 }, lagSeconds: 0, lastError: "", retries: 0, mirror: undefined, lastVerify: undefined, verifying: false, ...p };
}

function set(targets: WireTarget[], p: Partial<SourceSetStatus> = {}): SourceSetStatus {
  return { name: SET, path: "/srv/www", state: "running", lastSeq: 42, journalFirstSeq: 1, queuedBytes: { memory: 0, disk: 0 }, targets, files: 10, bytes: 1000, capturedDataBytes: 0, lastError: "", managed: true, specHash: "abc", pathError: "", ...p };
}

function image(p: Partial<ImageStatus> = {}): ImageStatus {
  return { source: "web1", set: SET, path: "/replicas/web1/prod.www", appliedSeq: 42, durableSeq: 42, connected: false, lastError: "", epoch: 4, promoted: false, disconnectedAt: 0, mirroring: false, journalId: "j1", ...p };
}

function agent(name: string, p: Partial<StatusResponse> = {}): StatusResponse {
  return { name, agentVersion: "0.1.0", protocolVersion: 1, sets: [], images: [], uptimeSeconds: 100, ...p };
}

function recorded(p: Partial<TargetStatus> = {}): TargetStatus {
  return { name: "dr", address: TGT, state: "idle", lastAckedSeq: 42, lagSeconds: 0, mirror: { active: false, result: "ok" }, lastVerify: { result: "Passed", finishedAt: isoAgo(3_600_000) }, ...p };
}

/** A pair replicating web1 → dr at epoch 4, now asked to make `want` active. */
function pair(want: string, status: ReplicationPairStatus = {}): ResolvedPair {
  return {
    metadata: { namespace: "prod", name: "www", generation: 3 },
    spec: { source: { agent: { address: SRC } }, targets: [{ name: "dr", agent: { address: TGT } }], replicationSet: { path: "/srv/www" }, activeSide: want },
    status: { phase: "Replicating", activeSide: "source", epoch: 4, sourceAgent: { name: "web1", setName: SET }, targets: [recorded()], ...status },
  };
}

function policy(spec: Partial<FailoverPolicy["spec"]> = {}): FailoverPolicy {
  return { metadata: { namespace: "prod", name: "geo" }, spec: { selector: {}, ...spec } };
}

function cond(s: ReplicationPairStatus, type: string): Condition {
  const c = s.conditions?.find((x) => x.type === type);
  assert.ok(c, `no ${type} condition in ${JSON.stringify(s.conditions)}`);
  return c;
}

function last(w: FakeWriter): ReplicationPairStatus {
  assert.ok(w.patches.length, "no status written");
  return w.patches.at(-1)!;
}

const ACTIONS = [
  { name: "fsck", command: ["fsck", "-y", "/srv/www"] },
  { name: "start", command: ["systemctl", "start", "www"], timeout: "5s" },
];

// (a) failover with the source down

test("takeOver, source down and target known good: promote at epoch+1, actions on the target in order, identity, status", async () => {
  const h = harness();
  h.agents.agents.set(SRC, new Error("should not be asked"));
  h.agents.agents.set(TGT, agent("dr1", { images: [image({ source: "other", durableSeq: 999 }), image()] }));
  h.agents.promoted = { appliedSeq: 42, durableSeq: 42 };
  const p = pair("dr", { health: { sourceDown: true, sourceDownSince: isoAgo(12_340), missedBeats: 3 } });
  const r = await h.flow.reconcile(p, policy({ actions: ACTIONS, serviceIdentity: { service: { name: "www", port: 443 } } }), "source", "dr");

  // A source the health checks found down is not asked again.
  assert.equal(h.of("status", SRC).length, 0);
  assert.deepEqual(h.actions(), [`promote ${TGT}`, `runCommand ${TGT}`, `runCommand ${TGT}`, `pointService 10.0.0.2`]);
  assert.deepEqual(h.of("promote")[0]!.args, [{ source: "web1", set: SET, epoch: 5 }]);
  assert.deepEqual(h.of("runCommand").map((c) => c.args), [[ACTIONS[0]!.command, 60_000], [ACTIONS[1]!.command, 5_000]]);
  assert.deepEqual(h.of("pointService")[0]!.args, ["prod", "www", 443]);

  assert.equal(h.writer.patches.length, 1);
  const s = last(h.writer);
  assert.equal(s.activeSide, "dr");
  assert.equal(s.epoch, 5);
  assert.equal(s.phase, "FailedOver");
  assert.equal(s.serviceAddress, "10.0.0.2");
  assert.equal(s.observedGeneration, 3);
  assert.equal(s.failover?.target, "dr");
  assert.equal(s.failover?.reason, "source down");
  assert.equal(s.failover?.recoverySeconds, 12.3);
  assert.equal(s.failover?.sourceDownSince, isoAgo(12_340));
  assert.equal(s.failover?.finishedAt, "2025-03-01T12:00:00Z");
  assert.equal(s.failover?.appliedSeq, 42);
  assert.deepEqual(s.failover?.actions, ["fsck: exit 0", "start: exit 0"]);
  assert.equal(cond(s, "FailedOver").status, "True");
  assert.equal(cond(s, "FailedOver").reason, "FailedOver");
  assert.equal(cond(s, "Ready").status, "False");
  assert.ok(r.requeueAfterMs !== undefined && r.requeueAfterMs > 0);
});

test("failover actions: a failed one stops the rest (onFailure Stop, the default); the failover stands; Continue goes on", async () => {
  for (const onFailure of [undefined, "Continue"] as const) {
    const h = harness();
    h.agents.agents.set(TGT, agent("dr1", { images: [image()] }));
    h.agents.promoted = { appliedSeq: 42, durableSeq: 42 };
    h.agents.commandResult = (_a, cmd) => (cmd[0] === "fsck" ? { exitCode: 4, output: "checking...\n/srv/www: UNEXPECTED INCONSISTENCY\n" } : { exitCode: 0, output: "" });
    const p = pair("dr", { health: { sourceDown: true, sourceDownSince: isoAgo(5_000), missedBeats: 3 } });
    await h.flow.reconcile(p, policy({ actions: [{ ...ACTIONS[0]!, ...(onFailure ? { onFailure } : {}) }, ACTIONS[1]!] }), "source", "dr");
    const s = last(h.writer);
    assert.equal(s.activeSide, "dr", "promoted: a failed action does not undo the failover");
    assert.equal(s.phase, "FailedOver");
    if (onFailure === "Continue") {
      assert.equal(h.of("runCommand").length, 2);
      assert.deepEqual(s.failover?.actions, ["fsck: exit 4 (/srv/www: UNEXPECTED INCONSISTENCY)", "start: exit 0"]);
    } else {
      assert.deepEqual(h.of("runCommand").map((c) => c.args[0]), [ACTIONS[0]!.command], "start is not run after fsck failed");
      assert.deepEqual(s.failover?.actions, ["fsck: exit 4 (/srv/www: UNEXPECTED INCONSISTENCY)", "start: skipped (fsck failed)"]);
      assert.deepEqual(h.events.filter((e) => e.type === "Warning").map((e) => e.reason), ["ActionFailed", "ActionsSkipped"]);
      assert.match(h.events.find((e) => e.reason === "ActionsSkipped")!.message, /start on dr not run: fsck failed \(exit 4\)/);
    }
  }
});

test("planned cutover: a failed quiesce step starts nothing (no drain, no promote, later steps skipped); QuiesceFailed; tried again later", async () => {
  const h = harness();
  h.agents.agents.set(SRC, agent("web1", { sets: [set([wireTarget()], { lastSeq: 42 })] }));
  h.agents.agents.set(TGT, agent("dr1", { images: [image({ connected: true })] }));
  h.agents.commandResult = (_a, cmd) => (cmd[1] === "stop" ? { exitCode: 1, output: "Job for www.service failed" } : { exitCode: 0, output: "" });
  const quiesce = [{ name: "stop", command: ["systemctl", "stop", "www"] }, { name: "sync", command: ["sync"] }];
  const r = await h.flow.reconcile(pair("dr"), policy({ quiesce }), "source", "dr");
  assert.deepEqual(h.actions(), [`runCommand ${SRC}`], "only the failed step ran");
  const s = last(h.writer);
  assert.equal(s.activeSide, "source");
  assert.notEqual(s.phase, "FailedOver");
  assert.equal(s.failover?.quiesced, undefined, "not recorded as quiesced: the next pass runs quiesce again");
  const c = cond(s, "FailedOver");
  assert.equal(c.status, "False");
  assert.equal(c.reason, "QuiesceFailed");
  assert.match(c.message, /cutover to dr not started: quiesce on the source: stop failed \(exit 1: Job for www.service failed\)/);
  assert.equal(r.requeueAfterMs, 30_000);
  // With Continue the cutover goes on to the drain.
  h.calls.length = 0;
  await h.flow.reconcile(pair("dr"), policy({ quiesce: [{ ...quiesce[0]!, onFailure: "Continue" }, quiesce[1]!] }), "source", "dr");
  assert.deepEqual(h.of("runCommand").map((x) => x.args[0]), [quiesce[0]!.command, quiesce[1]!.command]);
  assert.equal(last(h.writer).failover?.quiesced, true);
});

test("takeOver, source unreachable (not yet found down): asked once, then fails over; recovery counted from the start", async () => {
  const h = harness();
  h.agents.agents.set(SRC, new Error("connect ECONNREFUSED"));
  h.agents.agents.set(TGT, agent("dr1", { images: [image()] }));
  await h.flow.reconcile(pair("dr"), undefined, "source", "dr");
  assert.equal(h.of("status", SRC).length, 1);
  assert.deepEqual(h.actions(), [`promote ${TGT}`]);
  assert.deepEqual(h.of("promote")[0]!.args, [{ source: "web1", set: SET, epoch: 5 }]);
  // An unreachable source cannot have its set removed.
  assert.equal(h.of("removeSet").length, 0);
  const s = last(h.writer);
  assert.equal(s.activeSide, "dr");
  assert.equal(s.failover?.reason, "source down");
  assert.equal(s.failover?.recoverySeconds, 0);
  assert.equal(s.serviceAddress, undefined);
});

// (b) refused

test("takeOver when the target is not known good (sequence gap): no promote, FailedOver=False FailoverRefused naming the check", async () => {
  const h = harness();
  h.agents.agents.set(SRC, new Error("down"));
  h.agents.agents.set(TGT, agent("dr1", { images: [image({ appliedSeq: 40, durableSeq: 40 })] }));
  const r = await h.flow.reconcile(pair("dr", { health: { sourceDown: true, sourceDownSince: isoAgo(5000) } }), policy({ actions: ACTIONS, serviceIdentity: { service: { name: "www" } } }), "source", "dr");
  assert.deepEqual(h.actions(), [], "nothing may be promoted, run or moved");
  const s = last(h.writer);
  assert.equal(s.activeSide, "source");
  assert.equal(s.epoch, 4);
  const c = cond(s, "FailedOver");
  assert.equal(c.status, "False");
  assert.equal(c.reason, "FailoverRefused");
  assert.match(c.message, /dr is not known good/);
  assert.match(c.message, /sequence gap: 2 acknowledged/);
  assert.equal(cond(s, "Ready").status, "False");
  assert.ok(h.events.some((e) => e.type === "Warning" && e.reason === "FailoverRefused"));
  assert.ok(r.requeueAfterMs !== undefined && r.requeueAfterMs > 0);
});

test("takeOver when the target agent is unreachable: refused with its error", async () => {
  const h = harness();
  h.agents.agents.set(SRC, new Error("down"));
  h.agents.agents.set(TGT, new Error("deadline exceeded"));
  await h.flow.reconcile(pair("dr"), undefined, "source", "dr");
  assert.equal(h.of("promote").length, 0);
  assert.match(cond(last(h.writer), "FailedOver").message, /target agent unreachable \(deadline exceeded\)/);
});

// (c) planned cutover

test("planned cutover: quiesce on the source, then wait for the drain, then promote", async () => {
  const h = harness();
  let acked = 48;
  h.agents.agents.set(SRC, () => agent("web1", { sets: [set([wireTarget({ lastAckedSeq: acked, lagSeconds: 0.2 })], { lastSeq: 50 })] }));
  h.agents.agents.set(TGT, () => agent("dr1", { images: [image({ connected: true, appliedSeq: acked, durableSeq: acked })] }));
  h.agents.drainSeq.set(SRC, 50);
  h.agents.promoted = { appliedSeq: 50, durableSeq: 50 };
  const quiesce = [{ name: "stop", command: ["systemctl", "stop", "www"] }];
  const pol = policy({ quiesce, actions: [ACTIONS[1]!] });

  // 1. Quiesce on the source; nothing promoted yet.
  let p = pair("dr");
  await h.flow.reconcile(p, pol, "source", "dr");
  assert.deepEqual(h.actions(), [`runCommand ${SRC}`]);
  assert.deepEqual(h.of("runCommand")[0]!.args[0], quiesce[0]!.command);
  let s = last(h.writer);
  assert.equal(s.phase, "FailingOver");
  assert.equal(s.activeSide, "source");
  assert.equal(s.failover?.quiesced, true);
  assert.equal(s.failover?.reason, "cutover");
  assert.equal(s.failover?.target, "dr");
  assert.deepEqual(s.failover?.actions, ["stop: exit 0"]);
  assert.equal(cond(s, "FailedOver").reason, "Quiesced");

  // 2. The target is behind what the drain says was written: Draining, no promote, no second quiesce.
  h.calls.length = 0;
  p = pair("dr", s);
  await h.flow.reconcile(p, pol, "source", "dr");
  assert.deepEqual(h.actions(), [`drain ${SRC}`]);
  s = last(h.writer);
  assert.equal(s.phase, "FailingOver");
  assert.equal(s.failover?.quiesced, true);
  const c = cond(s, "FailedOver");
  assert.equal(c.status, "False");
  assert.equal(c.reason, "Draining");
  assert.match(c.message, /waiting for 2 change\(s\)/);

  // 3. Everything acknowledged: promote at epoch+1, the actions, the source's set removed.
  h.calls.length = 0;
  acked = 50;
  p = pair("dr", s);
  await h.flow.reconcile(p, pol, "source", "dr");
  assert.deepEqual(h.actions(), [`drain ${SRC}`, `promote ${TGT}`, `runCommand ${TGT}`, `removeSet ${SRC}`]);
  assert.deepEqual(h.of("promote")[0]!.args, [{ source: "web1", set: SET, epoch: 5 }]);
  assert.deepEqual(h.of("removeSet")[0]!.args, [SET, true]);
  s = last(h.writer);
  assert.equal(s.activeSide, "dr");
  assert.equal(s.epoch, 5);
  assert.equal(s.phase, "FailedOver");
  assert.equal(s.failover?.reason, "cutover");
  assert.equal(s.failover?.quiesced, true);
  assert.deepEqual(s.failover?.actions, ["stop: exit 0", "start: exit 0"]);
  assert.equal(cond(s, "FailedOver").reason, "CutOver");
});

test("planned cutover: the drain is waited for even when the acks lag just by one", async () => {
  const h = harness();
  h.agents.agents.set(SRC, agent("web1", { sets: [set([wireTarget({ lastAckedSeq: 49 })], { lastSeq: 50 })] }));
  h.agents.agents.set(TGT, agent("dr1", { images: [image({ appliedSeq: 49, durableSeq: 49 })] }));
  h.agents.drainSeq.set(SRC, 50);
  await h.flow.reconcile(pair("dr"), undefined, "source", "dr");
  assert.equal(h.of("promote").length, 0);
  assert.equal(cond(last(h.writer), "FailedOver").reason, "Draining");
});

// (d) identity

test("takeOver: a failed identity move does not stop the failover (no serviceAddress, a Warning)", async () => {
  const h = harness();
  h.identity.fail = new Error("endpointslices is forbidden");
  h.agents.agents.set(SRC, new Error("down"));
  h.agents.agents.set(TGT, agent("dr1", { images: [image()] }));
  const p = pair("dr", { serviceAddress: "10.0.0.1", health: { sourceDown: true, sourceDownSince: isoAgo(3000) } });
  await h.flow.reconcile(p, policy({ serviceIdentity: { service: { name: "www" } } }), "source", "dr");
  assert.equal(h.of("promote").length, 1);
  assert.equal(h.of("pointService").length, 1);
  const s = last(h.writer);
  assert.equal(s.activeSide, "dr");
  assert.equal(s.epoch, 5);
  assert.equal(s.phase, "FailedOver");
  assert.equal(s.serviceAddress, undefined, "the old address must not stay: the identity did not move");
  const w = h.events.find((e) => e.reason === "IdentityMoveFailed");
  assert.ok(w, JSON.stringify(h.events));
  assert.equal(w.type, "Warning");
  assert.match(w.message, /forbidden/);
});

// (e) failed over

function failedOverPair(want: string, status: ReplicationPairStatus = {}): ResolvedPair {
  return pair(want, { phase: "FailedOver", activeSide: "dr", epoch: 5, serviceAddress: "10.0.0.2", failover: { target: "dr", reason: "source down", finishedAt: isoAgo(60_000) }, ...status });
}

test("failed over, source back: the source's set is removed, the image mapped onto its path, the reverse set configured on the target", async () => {
  const h = harness();
  h.agents.agents.set(SRC, agent("web1", { sets: [set([wireTarget()])] }));
  h.agents.agents.set(TGT, agent("dr1", { images: [image({ path: "/replicas/web1/prod.www", promoted: true, epoch: 5 })] }));
  await h.flow.reconcile(failedOverPair("dr"), undefined, "dr", "dr");
  assert.deepEqual(h.actions(), [`removeSet ${SRC}`, `mapImage ${SRC}`, `configureSet ${TGT}`]);
  assert.deepEqual(h.of("removeSet")[0]!.args, [SET, true]);
  assert.deepEqual(h.of("mapImage")[0]!.args, [{ source: "dr1", set: SET, path: "/srv/www", remove: false }]);
  const spec = h.of("configureSet")[0]!.args[0] as SetSpec;
  assert.equal(spec.name, SET);
  assert.deepEqual(spec.targets, [SRC]);
  assert.equal(spec.path, "/replicas/web1/prod.www");
  assert.equal(spec.epoch, 5);
  assert.equal(spec.verifyIntervalMs, 0);
  assert.ok(h.events.some((e) => e.reason === "SourceFenced"));
  assert.ok(h.events.some((e) => e.reason === "ReverseStarted"));
  const s = last(h.writer);
  assert.equal(s.activeSide, "dr");
  assert.equal(s.phase, "FailedOver");
  assert.equal(s.reverse?.mirrored, false);
  assert.equal(cond(s, "Ready").reason, "ReverseMirroring");
});

test("failed over, reverse set running and mirrored: not configured again; Ready FailedOverProtected", async () => {
  const h = harness();
  h.agents.agents.set(SRC, agent("web1", { images: [image({ source: "dr1", path: "/srv/www" })] }));
  const rev = set([wireTarget({ address: SRC, state: "idle", lastAckedSeq: 70, mirror: { active: false, mode: "checksum", filesDone: 1, filesTotal: 1, bytesDone: 1, bytesTotal: 1, bytesSent: 1, rateBytesPerSecond: 0, etaSeconds: 0, startedAt: 1, finishedAt: 2, result: "ok", resumed: false } })], { path: "/replicas/web1/prod.www", lastSeq: 70 });
  h.agents.agents.set(TGT, agent("dr1", { sets: [rev], images: [image({ promoted: true, epoch: 5 })] }));
  await h.flow.reconcile(failedOverPair("dr"), undefined, "dr", "dr");
  assert.deepEqual(h.actions(), [`mapImage ${SRC}`]);
  const s = last(h.writer);
  assert.equal(s.reverse?.mirrored, true);
  assert.equal(s.reverse?.lastAckedSeq, 70);
  assert.equal(cond(s, "Ready").status, "True");
  assert.equal(cond(s, "Ready").reason, "FailedOverProtected");
});

test("failed over, source still unreachable: nothing is configured, Degraded SourceUnreachable", async () => {
  const h = harness();
  h.agents.agents.set(SRC, new Error("no route to host"));
  h.agents.agents.set(TGT, agent("dr1", { images: [image({ promoted: true, epoch: 5 })] }));
  await h.flow.reconcile(failedOverPair("dr"), undefined, "dr", "dr");
  assert.deepEqual(h.actions(), []);
  const s = last(h.writer);
  assert.equal(cond(s, "Degraded").reason, "SourceUnreachable");
  assert.equal(s.reverse?.mirrored, false);
});

// (f) failback

function reverseTarget(p: Partial<WireTarget> = {}): WireTarget {
  return wireTarget({ address: SRC, state: "idle", lastAckedSeq: 70, mirror: { active: false, mode: "checksum", filesDone: 1, filesTotal: 1, bytesDone: 1, bytesTotal: 1, bytesSent: 1, rateBytesPerSecond: 0, etaSeconds: 0, startedAt: 1, finishedAt: 2, result: "ok", resumed: false }, ...p });
}

test("failBack, reverse mirrored and drained: promote the source at epoch+1, remove the reverse set, unmap, identity back", async () => {
  const h = harness();
  h.agents.agents.set(SRC, agent("web1", { images: [image({ source: "dr1", path: "/srv/www" })] }));
  h.agents.agents.set(TGT, agent("dr1", { sets: [set([reverseTarget()], { lastSeq: 70 })], images: [image({ promoted: true, epoch: 5 })] }));
  h.agents.drainSeq.set(TGT, 70);
  const p = failedOverPair("source", { health: { sourceDown: true, sourceDownSince: isoAgo(600_000), missedBeats: 9 }, reverse: { state: "idle", mirrored: true } });
  await h.flow.reconcile(p, policy({ serviceIdentity: { service: { name: "www", port: 443 } } }), "dr", "source");
  assert.deepEqual(h.actions(), [`drain ${TGT}`, `promote ${SRC}`, `removeSet ${TGT}`, `mapImage ${SRC}`, `pointService 10.0.0.1`]);
  assert.deepEqual(h.of("promote")[0]!.args, [{ source: "dr1", set: SET, epoch: 6 }]);
  assert.deepEqual(h.of("removeSet")[0]!.args, [SET, true]);
  assert.deepEqual(h.of("mapImage")[0]!.args, [{ source: "dr1", set: SET, path: "", remove: true }]);
  const s = last(h.writer);
  assert.equal(s.activeSide, "source");
  assert.equal(s.epoch, 6);
  assert.equal(s.serviceAddress, "10.0.0.1");
  assert.equal(s.reverse, undefined);
  assert.equal(s.health?.sourceDown, false);
  assert.equal(s.health?.sourceDownSince, undefined);
  assert.equal(cond(s, "FailedOver").status, "False");
  assert.equal(cond(s, "FailedOver").reason, "FailedBack");
  assert.ok(h.events.some((e) => e.reason === "FailedBack"));
});

test("failBack, reverse mirrored but not drained: nothing promoted, Draining", async () => {
  const h = harness();
  h.agents.agents.set(SRC, agent("web1", { images: [image({ source: "dr1", path: "/srv/www" })] }));
  h.agents.agents.set(TGT, agent("dr1", { sets: [set([reverseTarget({ lastAckedSeq: 65, state: "replicating" })], { lastSeq: 70 })], images: [image({ promoted: true, epoch: 5 })] }));
  h.agents.drainSeq.set(TGT, 70);
  await h.flow.reconcile(failedOverPair("source"), undefined, "dr", "source");
  assert.deepEqual(h.actions(), [`drain ${TGT}`]);
  const s = last(h.writer);
  assert.equal(s.activeSide, "dr");
  assert.equal(s.epoch, 5);
  assert.equal(s.phase, "FailingBack");
  const c = cond(s, "FailedOver");
  assert.equal(c.reason, "Draining");
  assert.match(c.message, /waiting for 5 change\(s\)/);
});

test("failBack, reverse mirror still running: no drain, no promote; the failed-over state reports", async () => {
  const h = harness();
  h.agents.agents.set(SRC, agent("web1", { images: [image({ source: "dr1", path: "/srv/www" })] }));
  const running = reverseTarget({ state: "mirroring", mirror: { active: true, mode: "checksum", filesDone: 3, filesTotal: 10, bytesDone: 1, bytesTotal: 1, bytesSent: 1, rateBytesPerSecond: 0, etaSeconds: 0, startedAt: 1, finishedAt: 0, result: "", resumed: false } });
  h.agents.agents.set(TGT, agent("dr1", { sets: [set([running], { lastSeq: 70 })], images: [image({ promoted: true, epoch: 5 })] }));
  await h.flow.reconcile(failedOverPair("source"), undefined, "dr", "source");
  assert.equal(h.of("drain").length, 0);
  assert.equal(h.of("promote").length, 0);
  const s = last(h.writer);
  assert.equal(s.activeSide, "dr");
  assert.equal(s.phase, "FailingBack");
  assert.match(cond(s, "Ready").message, /3\/10 files/);
});

test("failBack while the status shows a mirror active: not mirrored yet, whatever the sender's state", async () => {
  const h = harness();
  h.agents.agents.set(SRC, agent("web1", { images: [image({ source: "dr1", path: "/srv/www" })] }));
  const t = reverseTarget({ state: "replicating", mirror: { active: true, mode: "checksum", filesDone: 0, filesTotal: 10, bytesDone: 0, bytesTotal: 1, bytesSent: 0, rateBytesPerSecond: 0, etaSeconds: 0, startedAt: 1, finishedAt: 0, result: "", resumed: false } });
  h.agents.agents.set(TGT, agent("dr1", { sets: [set([t], { lastSeq: 70 })], images: [image({ promoted: true, epoch: 5 })] }));
  h.agents.drainSeq.set(TGT, 70);
  await h.flow.reconcile(failedOverPair("source"), undefined, "dr", "source");
  assert.equal(h.of("promote").length, 0);
  assert.equal(last(h.writer).activeSide, "dr");
});

test("failBack with quiesce: the application on the target is stopped first, then drain and promote", async () => {
  const h = harness();
  h.agents.agents.set(SRC, agent("web1", { images: [image({ source: "dr1", path: "/srv/www" })] }));
  h.agents.agents.set(TGT, agent("dr1", { sets: [set([reverseTarget()], { lastSeq: 70 })], images: [image({ promoted: true, epoch: 5 })] }));
  h.agents.drainSeq.set(TGT, 70);
  const pol = policy({ quiesce: [{ name: "stop", command: ["systemctl", "stop", "www"] }] });
  await h.flow.reconcile(failedOverPair("source"), pol, "dr", "source");
  assert.deepEqual(h.actions(), [`runCommand ${TGT}`]);
  let s = last(h.writer);
  assert.equal(s.activeSide, "dr");
  assert.equal(s.failover?.quiesced, true);
  assert.equal(s.failover?.reason, "failback");
  assert.equal(cond(s, "FailedOver").reason, "Quiesced");
  h.calls.length = 0;
  await h.flow.reconcile(failedOverPair("source", s), pol, "dr", "source");
  assert.deepEqual(h.actions(), [`drain ${TGT}`, `promote ${SRC}`, `removeSet ${TGT}`, `mapImage ${SRC}`]);
  s = last(h.writer);
  assert.equal(s.activeSide, "source");
  assert.equal(s.epoch, 6);
  assert.equal(s.failover?.quiesced, false);
});

test("failBack with the source unreachable: nothing promoted", async () => {
  const h = harness();
  h.agents.agents.set(SRC, new Error("down"));
  h.agents.agents.set(TGT, agent("dr1", { sets: [set([reverseTarget()], { lastSeq: 70 })], images: [image({ promoted: true, epoch: 5 })] }));
  await h.flow.reconcile(failedOverPair("source"), undefined, "dr", "source");
  assert.deepEqual(h.actions(), []);
  assert.equal(last(h.writer).activeSide, "dr");
});

test("one target to another directly is refused (fail back first)", async () => {
  const h = harness();
  await h.flow.reconcile(failedOverPair("dr2"), undefined, "dr", "dr2");
  assert.deepEqual(h.actions(), []);
  assert.equal(cond(last(h.writer), "FailedOver").reason, "UnsupportedMove");
});

// (g) the status after a failover describes the new direction

/** What the status said just before the source died: forward replication with lag, acks and a verify. */
function frozenForward(): ReplicationPairStatus {
  return {
    lag: "2.5s", lagSeconds: 2.5, queued: "4.0KiB", queuedBytes: 4096, lastSeq: 352, mirror: "complete",
    lastVerify: { target: "dr", result: "Passed", finishedAt: isoAgo(3_600_000) },
    targets: [recorded({ lastSentSeq: 350, lastAckedSeq: 348, appliedSeq: 349, lagSeconds: 2.5, queuedBytes: 4096, connected: true })],
    knownGood: [{ target: "dr", ok: true, failed: [] }],
    health: { policy: "geo", sourceReachable: false, missedBeats: 3, sourceDown: true, sourceDownSince: isoAgo(4_200) },
    conditions: [
      { type: "Mirrored", status: "True", reason: "MirrorComplete", message: "every target holds a complete copy", lastTransitionTime: isoAgo(9e6) },
      { type: "Replicating", status: "True", reason: "Replicating", message: "replicating /srv/www to dr", lastTransitionTime: isoAgo(9e6) },
      { type: "Verified", status: "True", reason: "VerifyPassed", message: "last verify of every target found no difference", lastTransitionTime: isoAgo(9e6) },
    ],
  };
}

test("after a failover the status shows the new direction: no frozen lag/acks/verify, the message's numbers are the status's", async () => {
  const h = harness();
  h.agents.agents.set(TGT, agent("dr1", { images: [image({ appliedSeq: 352, durableSeq: 352 })] }));
  h.agents.promoted = { appliedSeq: 352, durableSeq: 352 };
  await h.flow.reconcile(pair("dr", frozenForward()), policy(), "source", "dr");
  const s = last(h.writer);
  assert.deepEqual(s.targets, [{ name: "dr", address: TGT, state: "serving", appliedSeq: 352 }]);
  for (const k of ["lag", "lagSeconds", "queued", "queuedBytes", "lastVerify", "knownGood", "mirror"] as const) assert.equal(s[k], undefined, `${k} is from before the failover`);
  const fo = cond(s, "FailedOver").message;
  assert.match(fo, /every change up to 352\b/);
  assert.equal(s.failover?.appliedSeq, 352);
  // recoverySeconds counts from the last time the source was seen (sourceDownSince), and the message says the same number
  assert.equal(s.failover?.recoverySeconds, 4.2);
  assert.match(fo, /recovered 4\.2s after the source was last seen/);
  assert.equal(cond(s, "Mirrored").status, "False");
  assert.equal(cond(s, "Replicating").status, "False");
  assert.equal(cond(s, "Verified").status, "Unknown");
  assert.equal(cond(s, "Verified").reason, "NotVerifiedSinceFailover");
});

test("failed over and the source is back: health says reachable (not DOWN), Degraded=False agrees, lag and queued are the reverse replication's", async () => {
  const h = harness();
  h.agents.agents.set(SRC, agent("web1", { images: [image({ source: "dr1", path: "/srv/www" })] }));
  const rev = set([reverseTarget({ state: "replicating", lastAckedSeq: 65, lagSeconds: 0.4, queuedBytes: { memory: 2048, disk: 0 } })], { path: "/replicas/web1/prod.www", lastSeq: 70 });
  h.agents.agents.set(TGT, agent("dr1", { sets: [rev], images: [image({ promoted: true, epoch: 5, appliedSeq: 352 })] }));
  const before = { ...frozenForward(), targets: [{ name: "dr", address: TGT, state: "serving", appliedSeq: 352 }] };
  await h.flow.reconcile(failedOverPair("dr", before), policy(), "dr", "dr");
  const s = last(h.writer);
  assert.deepEqual(s.health, { policy: "geo", sourceReachable: true, missedBeats: 0, sourceDown: false });
  assert.equal(cond(s, "Degraded").status, "False");
  assert.equal(s.lagSeconds, 0.4);
  assert.equal(s.lag, "400ms");
  assert.equal(s.queuedBytes, 2048);
  assert.equal(s.lastSeq, 70, "the reverse journal's sequence, not the stopped forward one's 352");
  assert.equal(s.reverse?.lastAckedSeq, 65);
  assert.equal(cond(s, "Replicating").status, "True");
  assert.equal(cond(s, "Replicating").reason, "ReverseReplicating");
  assert.equal(cond(s, "Mirrored").status, "True");
  assert.equal(cond(s, "Mirrored").reason, "ReverseMirrorComplete");
  assert.equal(cond(s, "Verified").status, "Unknown");
});

test("failed over and the source still away: health says DOWN, Degraded=True agrees, no lag or queue shown", async () => {
  const h = harness();
  h.agents.agents.set(SRC, new Error("no route to host"));
  h.agents.agents.set(TGT, agent("dr1", { images: [image({ promoted: true, epoch: 5, appliedSeq: 352 })] }));
  await h.flow.reconcile(failedOverPair("dr", frozenForward()), policy(), "dr", "dr");
  const s = last(h.writer);
  assert.equal(s.health?.sourceDown, true);
  assert.equal(s.health?.sourceReachable, false);
  assert.equal(cond(s, "Degraded").status, "True");
  assert.equal(s.lag, undefined);
  assert.equal(s.queued, undefined);
  assert.deepEqual(s.targets, [{ name: "dr", address: TGT, state: "serving", appliedSeq: 352 }]);
});
