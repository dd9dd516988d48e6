// What a NotificationPolicy sends (operator/notify/derive.ts): events derived
// from a pair's status, each problem sent once while it lasts and once as
// "resolved", one-shots once per occurrence, grace periods, recipients.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { observe, recipientsFor, serversOf, step, type OneShot, type Problem, type Thresholds } from "../../operator/notify/derive.ts";
import { policyConditions } from "../../operator/controllers/notifications.ts";
import { DeliveryError } from "../../operator/notify/channel.ts";
import { slackBody, parseWebhookUrl, redactUrl } from "../../operator/notify/webhook.ts";
import { checkSnmpConfig, pairRow } from "../../operator/notify/snmp.ts";
import { smtpError } from "../../operator/notify/email.ts";
import type { AlertState, EventMark, NotificationEvent, ReplicationPair, ReplicationPairStatus } from "../../operator/api/v1alpha1/index.ts";

const T0 = Date.parse("2026-12-08T01:00:00Z");
const at = (s: number) => new Date(T0 + s * 1000);
const TH: Thresholds = { lagSeconds: 30, queuedBytes: 1 << 30, graceMs: 60_000 };

function pair(status: ReplicationPairStatus, activeSide = "source"): ReplicationPair {
  return {
    metadata: { namespace: "shop", name: "db", uid: "u1" },
    spec: { source: { agent: { address: "10.0.0.5:7702" } }, targets: [{ name: "a", agent: { address: "10.0.0.6:7702" } }, { name: "b", agent: { address: "10.0.0.7:7702" } }], replicationSet: { path: "/srv" }, activeSide },
    status,
  } as ReplicationPair;
}
const cond = (type: string, status: string, reason: string, message = reason, lastTransitionTime = "2026-12-08T01:00:00Z") => ({ type, status: status as "True", reason, message, lastTransitionTime });

/** Runs the policy over a sequence of pair states, carrying its remembered state like the controller does. */
function run(states: { p: ReplicationPair; t: number }[], o: { kinds?: string[]; notBefore?: string; th?: Thresholds } = {}): NotificationEvent[] {
  let alerts: AlertState[] = [];
  let marks: EventMark[] = [];
  const out: NotificationEvent[] = [];
  for (const s of states) {
    const { problems, oneShots, seen } = observe(s.p, o.th ?? TH);
    const r = step({ policyUid: "pol", namespace: "shop", pair: "db", kinds: o.kinds ?? [], problems, oneShots, seen, alerts, marks, graceMs: (o.th ?? TH).graceMs, notBefore: o.notBefore ?? "2026-01-01T00:00:00Z", servers: serversOf(s.p), now: at(s.t) });
    // The remembered state goes through JSON, as it does through the policy's status.
    alerts = JSON.parse(JSON.stringify(r.alerts));
    marks = JSON.parse(JSON.stringify(r.marks));
    out.push(...r.events);
  }
  return out;
}
const names = (evs: NotificationEvent[]) => evs.map((e) => `${e.kind}/${e.state}`);

const healthy: ReplicationPairStatus = { phase: "Replicating", activeSide: "source", conditions: [cond("Degraded", "False", "AllHealthy"), cond("Ready", "True", "Replicating")], health: { policy: "ha", missedBeats: 0, sourceDown: false, sourceReachable: true }, knownGood: [{ target: "a", ok: true, failed: [] }, { target: "b", ok: true, failed: [] }] };

test("kill -9 of the source: one failover started, one completed (with recovery time), and one resolved when the old source returns", () => {
  const missing = { ...healthy, phase: "Degraded" as const, conditions: [cond("Degraded", "True", "SourceUnreachable", "operator cannot reach the source agent")], health: { policy: "ha", missedBeats: 2, sourceDown: false } };
  const down = { ...missing, health: { policy: "ha", missedBeats: 3, sourceDown: true, sourceDownSince: "2026-12-08T01:00:01Z" } };
  const done = { ...down, phase: "FailedOver" as const, activeSide: "a", epoch: 1, failover: { target: "a", reason: "source down", sourceDownSince: "2026-12-08T01:00:01Z", startedAt: "2026-12-08T01:00:04Z", finishedAt: "2026-12-08T01:00:05Z", recoverySeconds: 4.2, appliedSeq: 99 }, conditions: [cond("Degraded", "True", "SourceUnreachable", "a serves without a copy"), cond("FailedOver", "True", "FailedOver")], reverse: { state: "source unreachable", mirrored: false } };
  const back = { ...done, conditions: [cond("Degraded", "False", "Recovered"), cond("FailedOver", "True", "FailedOver")], reverse: { state: "mirroring", mirrored: false } };
  const protectedAgain = { ...back, reverse: { state: "replicating", mirrored: true } };
  const evs = run([
    { p: pair(healthy), t: 0 },
    { p: pair(missing), t: 1 },
    { p: pair(down), t: 3 },
    { p: pair(down, "a"), t: 4 }, // the decision: spec.activeSide=a
    { p: pair(done, "a"), t: 5 },
    { p: pair(done, "a"), t: 30 },
    { p: pair(done, "a"), t: 300 }, // long outage: nothing more (no storm, Degraded is covered by the failover)
    { p: pair(back, "a"), t: 400 },
    { p: pair(protectedAgain, "a"), t: 410 },
  ]);
  assert.deepEqual(names(evs), ["FailoverStarted/firing", "FailoverCompleted/info", "FailoverStarted/resolved"]);
  assert.match(evs[1]!.summary, /recovery time 4.2s/);
  assert.equal(evs[1]!.data?.recoverySeconds, "4.2");
  assert.equal(evs[0]!.severity, "critical");
  assert.equal(evs[2]!.since, "2026-12-08T01:00:04Z");
  const again = run([{ p: pair(down, "a"), t: 4 }, { p: pair(back, "a"), t: 400 }]).find((e) => e.state === "resolved");
  assert.equal(again?.id, evs[2]!.id, "the resolved event's id depends on the problem, not on when it is computed");
});

test("the failover is seen only once it has finished (informer skipped states): started comes before completed", () => {
  const done = { ...healthy, phase: "FailedOver" as const, activeSide: "a", failover: { target: "a", reason: "source down", finishedAt: "2026-12-08T01:00:05Z", recoverySeconds: 3 }, reverse: { state: "source unreachable" } };
  assert.deepEqual(names(run([{ p: pair(healthy), t: 0 }, { p: pair(done, "a"), t: 6 }])), ["FailoverStarted/firing", "FailoverCompleted/info"]);
});

test("a cutover and a failback are announced once each; a cutover is no failover", () => {
  const cutting = { ...healthy, phase: "FailingOver" as const, failover: { target: "a", reason: "cutover", startedAt: "2026-12-08T01:00:01Z" } };
  const cut = { ...healthy, phase: "FailedOver" as const, activeSide: "a", epoch: 1, failover: { target: "a", reason: "cutover", startedAt: "2026-12-08T01:00:01Z", finishedAt: "2026-12-08T01:00:02Z", recoverySeconds: 1 }, reverse: { state: "replicating", mirrored: true } };
  const failingBack = { ...cut, phase: "FailingBack" as const };
  const back = { ...healthy, epoch: 2, failover: cut.failover, conditions: [...healthy.conditions!, cond("FailedOver", "False", "FailedBack", "the source serves again", "2026-12-08T01:10:00Z")] };
  const evs = run([{ p: pair(healthy), t: 0 }, { p: pair(cutting, "a"), t: 1 }, { p: pair(cut, "a"), t: 2 }, { p: pair(cut, "a"), t: 100 }, { p: pair(failingBack), t: 590 }, { p: pair(failingBack), t: 595 }, { p: pair(back), t: 600 }, { p: pair(back), t: 900 }]);
  assert.deepEqual(names(evs), ["CutoverCompleted/info", "FailbackStarted/info", "FailbackCompleted/info"]);
});

test("failover refused names the failing check; pending approval; both resolve", () => {
  const refused = { ...healthy, conditions: [cond("FailedOver", "False", "FailoverRefused", "failover refused: no target is known good (a: last verify failed (3 difference(s)))")] };
  const pending = { ...healthy, conditions: [cond("FailoverPending", "True", "AwaitingApproval", "approve with kubectl understudy failover db")] };
  const evs = run([{ p: pair(refused), t: 0 }, { p: pair(refused), t: 10 }, { p: pair(healthy), t: 20 }, { p: pair(pending), t: 30 }, { p: pair(healthy), t: 40 }]);
  assert.deepEqual(names(evs), ["FailoverRefused/firing", "FailoverRefused/resolved", "FailoverPending/firing", "FailoverPending/resolved"]);
  assert.match(evs[0]!.detail!, /last verify failed/);
});

test("degraded is sent only after the grace period, once, and resolved once; a blip shorter than the grace period sends nothing", () => {
  const deg = { ...healthy, health: undefined, conditions: [cond("Degraded", "True", "TargetDegraded", "target(s) b cannot take changes")] };
  assert.deepEqual(names(run([{ p: pair(deg), t: 0 }, { p: pair(deg), t: 30 }, { p: pair(healthy), t: 50 }])), []);
  const evs = run([{ p: pair(deg), t: 0 }, { p: pair(deg), t: 59 }, { p: pair(deg), t: 61 }, { p: pair(deg), t: 500 }, { p: pair(healthy), t: 600 }]);
  assert.deepEqual(names(evs), ["PairDegraded/firing", "PairDegraded/resolved"]);
  assert.equal(evs[0]!.since, at(0).toISOString().replace(/\.\d+Z$/, "Z"), "since is when it was first seen, not when the grace period ended");
  assert.match(evs[1]!.detail!, /lasted 10m/);
});

test("version mismatch, known good lost and regained, verify differences, mirror failed and done", () => {
  const vm = { ...healthy, conditions: [cond("Degraded", "True", "VersionMismatch", "source agent 0.1.0, target a 0.2.0")] };
  const notKg = { ...healthy, knownGood: [{ target: "a", ok: true, failed: [] }, { target: "b", ok: false, failed: ["last verify failed (1 difference(s))"] }] };
  const neverVerified = { ...healthy, knownGood: [{ target: "a", ok: false, failed: ["never verified (a passed verify is required)"] }] };
  const diff = { ...healthy, targets: [{ name: "b", address: "x", lastVerify: { target: "b", result: "Failed" as const, finishedAt: "2026-12-08T01:00:00Z", differences: 1, sample: ["row-3.dat: content"] } }] };
  const passed = { ...healthy, targets: [{ name: "b", address: "x", lastVerify: { target: "b", result: "Passed" as const, finishedAt: "2026-12-08T01:05:00Z", differences: 0 } }] };
  const mirrorFail = { ...healthy, targets: [{ name: "a", address: "x", mirror: { active: false, result: "target refused" } }] };
  const mirrorDone = { ...healthy, targets: [{ name: "a", address: "x", mirror: { active: false, result: "ok", mode: "checksum", startedAt: "2026-12-08T01:00:00Z", finishedAt: "2026-12-08T01:02:00Z", filesTotal: 10, bytesTotal: 1000, bytesSent: 10 } }] };
  const evs = run([vm, healthy, notKg, notKg, healthy, neverVerified, diff, diff, passed, mirrorFail, mirrorDone, mirrorDone].map((s, i) => ({ p: pair(s), t: i * 10 })));
  assert.deepEqual(names(evs), ["VersionMismatch/firing", "VersionMismatch/resolved", "NotKnownGood/firing", "NotKnownGood/resolved", "VerifyDifferences/firing", "VerifyDifferences/resolved", "MirrorFailed/firing", "MirrorCompleted/info", "MirrorFailed/resolved"]);
  assert.equal(evs[2]!.subject, "b");
  assert.match(evs[4]!.detail!, /row-3.dat/);
});

test("a target that was never known good (a new pair, mirroring) is not announced as \"no longer known good\"", () => {
  const mirroring = { ...healthy, knownGood: [{ target: "a", ok: false, failed: ["a mirror into the replica is unfinished (not a consistent copy)"] }] };
  const good = { ...healthy, knownGood: [{ target: "a", ok: true, failed: [] }] };
  assert.deepEqual(names(run([{ p: pair(mirroring), t: 0 }, { p: pair(mirroring), t: 10 }, { p: pair(good), t: 20 }, { p: pair(mirroring), t: 30 }, { p: pair(good), t: 40 }])), ["NotKnownGood/firing", "NotKnownGood/resolved"]);
});

test("lag and queue over the threshold for longer than the grace period; not while failed over", () => {
  const th: Thresholds = { lagSeconds: 5, queuedBytes: 1000, graceMs: 20_000 };
  const lag = { ...healthy, targets: [{ name: "a", address: "x", lagSeconds: 9, queuedBytes: 5000 }] };
  const ok = { ...healthy, targets: [{ name: "a", address: "x", lagSeconds: 0.1, queuedBytes: 0 }] };
  assert.deepEqual(names(run([{ p: pair(lag), t: 0 }, { p: pair(lag), t: 19 }, { p: pair(lag), t: 21 }, { p: pair(lag), t: 60 }, { p: pair(ok), t: 61 }], { th })), ["LagHigh/firing", "QueueHigh/firing", "LagHigh/resolved", "QueueHigh/resolved"]);
  const over = { ...lag, activeSide: "a", failover: { target: "a", reason: "cutover", finishedAt: "2026-12-08T01:00:00Z" } };
  assert.deepEqual(names(run([{ p: pair(over, "a"), t: 0 }, { p: pair(over, "a"), t: 100 }], { th, kinds: ["LagHigh", "QueueHigh"] })), []);
});

test("spec.events filters kinds; one-shots from before the policy existed are remembered, not sent", () => {
  const deg = { ...healthy, health: undefined, conditions: [cond("Degraded", "True", "TargetDegraded")] };
  assert.deepEqual(names(run([{ p: pair(deg), t: 0 }, { p: pair(deg), t: 100 }], { kinds: ["FailoverStarted"] })), []);
  const mirrorDone = { ...healthy, targets: [{ name: "a", address: "x", mirror: { active: false, result: "ok", finishedAt: "2026-12-08T00:00:00Z" } }] };
  const again = { ...healthy, targets: [{ name: "a", address: "x", mirror: { active: false, result: "ok", finishedAt: "2026-12-08T02:00:00Z" } }] };
  assert.deepEqual(names(run([{ p: pair(mirrorDone), t: 0 }, { p: pair(mirrorDone), t: 5 }, { p: pair(again), t: 10 }], { notBefore: "2026-12-08T01:00:00Z" })), ["MirrorCompleted/info"]);
});

test("property: whatever the sequence of states, each problem fires at most once per episode, resolved follows firing, and nothing repeats", () => {
  const states: ReplicationPairStatus[] = [
    healthy,
    { ...healthy, health: undefined, conditions: [cond("Degraded", "True", "TargetDegraded")] },
    { ...healthy, conditions: [cond("Degraded", "True", "VersionMismatch")] },
    { ...healthy, conditions: [cond("FailedOver", "False", "FailoverRefused", "no target is known good")] },
    { ...healthy, knownGood: [{ target: "a", ok: false, failed: ["lag 40s is above 30s"] }] },
    { ...healthy, targets: [{ name: "a", address: "x", lagSeconds: 100 }] },
  ];
  fc.assert(fc.property(fc.array(fc.record({ s: fc.integer({ min: 0, max: states.length - 1 }), dt: fc.integer({ min: 1, max: 120 }) }), { maxLength: 40 }), (seq) => {
    let t = 0;
    const evs = run(seq.map((x) => ({ p: pair(states[x.s]!), t: (t += x.dt) })));
    const open = new Map<string, boolean>();
    const ids = new Set<string>();
    for (const e of evs) {
      assert.ok(!ids.has(e.id), `event ${e.kind}/${e.state} sent twice`);
      ids.add(e.id);
      const k = `${e.kind}|${e.subject ?? ""}`;
      if (e.state === "firing") {
        assert.ok(!open.get(k), `${k} fired while already firing`);
        open.set(k, true);
      } else if (e.state === "resolved") {
        assert.ok(open.get(k), `${k} resolved without firing`);
        open.set(k, false);
      }
    }
  }), { numRuns: 300 });
});

test("step is the only memory: a restart (state through JSON) sends nothing again", () => {
  const deg = { ...healthy, health: undefined, conditions: [cond("Degraded", "True", "TargetDegraded")] };
  const { problems, oneShots } = observe(pair(deg), TH);
  const first = step({ policyUid: "p", namespace: "shop", pair: "db", kinds: [], problems, oneShots, alerts: [], marks: [], graceMs: 0, notBefore: "", servers: [], now: at(0) });
  assert.equal(first.events.length, 1);
  const again = step({ policyUid: "p", namespace: "shop", pair: "db", kinds: [], problems: problems as Problem[], oneShots: oneShots as OneShot[], alerts: JSON.parse(JSON.stringify(first.alerts)), marks: JSON.parse(JSON.stringify(first.marks)), graceMs: 0, notBefore: "", servers: [], now: at(1000) });
  assert.deepEqual(again.events, []);
});

test("recipients per pair and per server", () => {
  const p = pair(healthy);
  const e = { pair: "db", namespace: "shop", servers: serversOf(p) } as NotificationEvent;
  assert.ok(serversOf(p).includes("10.0.0.6") && serversOf(p).includes("a"));
  const ch = { to: ["ops@x.org"], recipients: [{ to: ["dba@x.org"], pairs: ["db"] }, { to: ["web@x.org"], pairs: ["web"] }, { to: ["dc2@x.org"], servers: ["10.0.0.7"] }, { to: ["dc9@x.org"], servers: ["10.9.9.9"] }] };
  assert.deepEqual(recipientsFor(ch, e).sort(), ["dba@x.org", "dc2@x.org", "ops@x.org"]);
});

test("conditions name the channel and the cause; Ready follows them", () => {
  const now = at(0);
  const c = policyConditions(undefined, [
    { name: "mail", type: "email", status: { name: "mail", consecutiveFailures: 2, lastError: "SMTP server h:587 refused the login", lastErrorReason: "SMTPAuthFailed", pending: 3 } },
    { name: "hook", type: "webhook", configError: new DeliveryError("InvalidWebhookURL", "not a URL: \"ht!tp:/x\"") },
    { name: "trap", type: "snmp", status: { name: "trap", consecutiveFailures: 0 } },
  ], 3, now);
  const get = (t: string) => c.find((x) => x.type === t)!;
  assert.equal(get("ConfigValid").status, "False");
  assert.equal(get("ConfigValid").reason, "InvalidWebhookURL");
  assert.match(get("ConfigValid").message, /channel hook \(webhook\): not a URL/);
  assert.equal(get("Delivering").reason, "SMTPAuthFailed");
  assert.match(get("Delivering").message, /channel mail \(email\): SMTP server h:587 refused the login \(2 failed attempt/);
  assert.equal(get("Ready").status, "False");
  assert.equal(get("Ready").observedGeneration, 3);
  const ok = policyConditions(c, [{ name: "trap", type: "snmp" }], 4, now);
  assert.equal(ok.find((x) => x.type === "Ready")!.status, "True");
});

test("channel input checks: webhook URL, SNMP v3 key length, SMTP error reasons; secrets never shown", () => {
  assert.throws(() => parseWebhookUrl("hooks.slack.com/services/T0/B0/SECRET"), (e: DeliveryError) => e.reason === "InvalidWebhookURL" && !e.message.includes("SECRET"));
  assert.throws(() => parseWebhookUrl("ftp://x/y"), /scheme must be http or https/);
  assert.equal(redactUrl("https://hooks.slack.com/services/T0/B0/SECRET"), "https://hooks.slack.com/…");
  assert.throws(() => checkSnmpConfig({ host: "h", port: 162, version: "v3", notification: "inform", v3: { user: "u", level: "authPriv", authProtocol: "sha", privProtocol: "aes", authKey: "short", privKey: "longenough", engineID: "8000000001" } }), /authKey must be at least 8/);
  assert.equal(smtpError(Object.assign(new Error("Invalid login: 535 5.7.8 bad"), { code: "EAUTH", response: "535 5.7.8 bad" }), "h:587").reason, "SMTPAuthFailed");
  assert.equal(smtpError(Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:1"), { code: "ESOCKET" }), "h:1").reason, "SMTPUnreachable");
  const sb = slackBody({ id: "1", kind: "FailoverStarted", state: "firing", severity: "critical", namespace: "shop", pair: "db", summary: "failover of shop/db started", at: "t" }) as { text: string; blocks: unknown[] };
  assert.match(sb.text, /FIRING.*failover of shop\/db started/);
  assert.equal(sb.blocks.length, 2);
});

test("SNMP table row of a pair", () => {
  const r = pairRow(pair({ phase: "Replicating", lagSeconds: 0.25, queuedBytes: 2 ** 40, lastVerify: { target: "a", result: "Passed", finishedAt: "2026-12-08T01:00:00Z", differences: 0 } }));
  assert.deepEqual(r, { name: "shop/db", phase: "Replicating", activeSide: "source", lagMillis: 250, queuedBytes: 0xffffffff, lastVerify: "Passed a 2026-12-08T01:00:00Z 0" });
});
