// The GeoCluster failover gate (knownGood), the choice among known-good
// targets (pickTarget), and FailoverPolicy label selection (selects).
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { knownGood, pickTarget, selects, type GateInput, type GateResult } from "../../operator/controllers/known-good.ts";
import type { ImageStatus } from "../../agent/wire.ts";
import type { FailoverPolicy, ResolvedPair, TargetStatus } from "../../operator/api/v1alpha1/index.ts";

const NOW = new Date("2025-03-01T12:00:00Z");
const HOUR = 3_600_000;
const isoAgo = (ms: number) => new Date(NOW.getTime() - ms).toISOString();

function image(p: Partial<ImageStatus> = {}): ImageStatus {
  return { source: "web1", set: "prod.www", path: "/replicas/web1/prod.www", appliedSeq: 42, durableSeq: 42, connected: false, lastError: "", epoch: 0, promoted: false, disconnectedAt: 0, mirroring: false, journalId: "j1", ...p };
}

function recorded(p: Partial<TargetStatus> = {}): TargetStatus {
  return {
    name: "dr",
    address: "10.0.0.2:7702",
    state: "idle",
    lastAckedSeq: 42,
    lagSeconds: 0,
    mirror: { active: false, mode: "checksum", result: "ok" },
    lastVerify: { target: "dr", result: "Passed", startedAt: isoAgo(HOUR + 60_000), finishedAt: isoAgo(HOUR), differences: 0 },
    ...p,
  };
}

function policy(knownGood?: FailoverPolicy["spec"]["knownGood"], selector: FailoverPolicy["spec"]["selector"] = {}): FailoverPolicy {
  return { metadata: { namespace: "prod", name: "geo" }, spec: { selector, ...(knownGood ? { knownGood } : {}) } };
}

function gate(p: Partial<GateInput> = {}): GateResult {
  return knownGood({ recorded: recorded(), image: image(), policy: policy({ maxLag: "10s", requireVerify: true, maxVerifyAge: "2h" }), now: NOW, ...p });
}

/** Exactly one check failed, and its message matches. */
function failsOnly(r: GateResult, re: RegExp): string {
  assert.equal(r.ok, false, "expected the gate to refuse");
  assert.equal(r.failed.length, 1, `expected one failed check, got ${JSON.stringify(r.failed)}`);
  assert.match(r.failed[0]!, re);
  return r.failed[0]!;
}

test("every check passing: known good, whether or not the replica is connected to its source", () => {
  assert.deepEqual(gate(), { ok: true, failed: [] });
  assert.deepEqual(gate({ image: image({ connected: true }) }), { ok: true, failed: [] });
  // Holding more than was acknowledged is fine; so is a lag right at the limit.
  assert.deepEqual(gate({ image: image({ appliedSeq: 50, durableSeq: 50 }), recorded: recorded({ lagSeconds: 10 }) }), { ok: true, failed: [] });
  // A verify just inside maxVerifyAge passes.
  assert.deepEqual(gate({ recorded: recorded({ lastVerify: { result: "Passed", finishedAt: isoAgo(2 * HOUR) } }) }), { ok: true, failed: [] });
});

test("target agent unreachable: one failure, with why", () => {
  const m = failsOnly(gate({ image: undefined, imageError: "connect ECONNREFUSED 10.0.0.2:7702" }), /target agent unreachable/);
  assert.match(m, /ECONNREFUSED 10\.0\.0\.2:7702/);
  assert.equal(failsOnly(gate({ image: undefined }), /target agent unreachable/), "target agent unreachable");
});

test("a mirror into the replica still running: not a consistent copy", () => {
  failsOnly(gate({ image: image({ mirroring: true }) }), /mirror into the replica is unfinished/);
});

test("a replica never mirrored (no journal id): refused", () => {
  failsOnly(gate({ image: image({ journalId: "" }) }), /never mirrored/);
});

test("unapplied data (the replica could not apply what it received): refused, with the error", () => {
  failsOnly(gate({ image: image({ lastError: "packet 43 could not be applied: disk full" }) }), /unapplied data: the replica reports an error: packet 43 could not be applied: disk full/);
});

test("sequence gap: the replica holds less than the source was told is durable", () => {
  const m = failsOnly(gate({ image: image({ appliedSeq: 37, durableSeq: 37 }), recorded: recorded({ lastAckedSeq: 42 }) }), /sequence gap/);
  assert.match(m, /\b5 acknowledged change\(s\)/);
  assert.match(m, /applied 37, acknowledged 42/);
  // One short is still a gap.
  assert.match(failsOnly(gate({ image: image({ appliedSeq: 41, durableSeq: 41 }) }), /sequence gap/), /\b1 acknowledged/);
});

test("applied but not yet durable (a live replica within its sync interval) is not refused: promotion fsyncs first", () => {
  assert.deepEqual(gate({ image: image({ appliedSeq: 45, durableSeq: 42 }) }), { ok: true, failed: [] });
});

test("no recorded status for the target: refused", () => {
  failsOnly(gate({ recorded: undefined }), /no replication status recorded/);
});

test("the recorded mirror is running or did not end ok: refused", () => {
  failsOnly(gate({ recorded: recorded({ mirror: { active: true, mode: "checksum", result: "" } }) }), /mirror not complete \(running\)/);
  failsOnly(gate({ recorded: recorded({ mirror: { active: false, mode: "checksum", result: "interrupted: reset" } }) }), /mirror not complete \(interrupted: reset\)/);
});

test("lag above maxLag: refused, naming the lag and the limit", () => {
  failsOnly(gate({ recorded: recorded({ lagSeconds: 11 }) }), /lag 11s is above 10s/);
});

test("never verified: refused while a verify is required", () => {
  failsOnly(gate({ recorded: recorded({ lastVerify: undefined }) }), /never verified/);
  // A verify still running is no verdict.
  failsOnly(gate({ recorded: recorded({ lastVerify: { result: "Running", startedAt: isoAgo(1000), finishedAt: isoAgo(500) } }) }), /never verified/);
  failsOnly(gate({ recorded: recorded({ lastVerify: { result: "Passed" } }) }), /never verified/);
});

test("last verify failed (with the number of differences) or errored: refused", () => {
  const m = failsOnly(gate({ recorded: recorded({ lastVerify: { result: "Failed", finishedAt: isoAgo(HOUR), differences: 3 } }) }), /last verify failed/);
  assert.match(m, /\(3 difference\(s\)\)/);
  const e = failsOnly(gate({ recorded: recorded({ lastVerify: { result: "Error", finishedAt: isoAgo(HOUR), error: "target went away" } }) }), /last verify error/);
  assert.match(e, /target went away/);
});

test("a passed verify older than maxVerifyAge: refused", () => {
  const m = failsOnly(gate({ recorded: recorded({ lastVerify: { result: "Passed", finishedAt: isoAgo(2 * HOUR + 1000) } }) }), /last verify is older than 2h/);
  assert.match(m, new RegExp(isoAgo(2 * HOUR + 1000).replace(/[.]/g, "\\.")));
});

test("requireVerify=false: no verify checks at all", () => {
  const p = policy({ maxLag: "10s", requireVerify: false, maxVerifyAge: "2h" });
  for (const lastVerify of [undefined, { result: "Failed" as const, finishedAt: isoAgo(HOUR), differences: 2 }, { result: "Error" as const, finishedAt: isoAgo(HOUR) }, { result: "Passed" as const, finishedAt: isoAgo(100 * HOUR) }]) {
    assert.deepEqual(gate({ policy: p, recorded: recorded({ lastVerify }) }), { ok: true, failed: [] }, JSON.stringify(lastVerify));
  }
  // … but the other checks still apply.
  failsOnly(gate({ policy: p, recorded: recorded({ lastVerify: undefined, lagSeconds: 11 }) }), /lag 11s/);
});

test("defaults without a policy or without knownGood: maxLag 30s, verify required, no older than 24h", () => {
  for (const p of [undefined, policy(undefined), policy({})]) {
    const base = { policy: p };
    assert.deepEqual(gate({ ...base, recorded: recorded({ lagSeconds: 30, lastVerify: { result: "Passed", finishedAt: isoAgo(24 * HOUR) } }) }), { ok: true, failed: [] });
    failsOnly(gate({ ...base, recorded: recorded({ lagSeconds: 31 }) }), /lag 31s is above 30s/);
    failsOnly(gate({ ...base, recorded: recorded({ lastVerify: undefined }) }), /never verified/);
    failsOnly(gate({ ...base, recorded: recorded({ lastVerify: { result: "Passed", finishedAt: isoAgo(24 * HOUR + 1000) } }) }), /older than 24h/);
  }
});

test("several failing checks are all reported", () => {
  const r = gate({ image: image({ mirroring: true, durableSeq: 40, appliedSeq: 40 }), recorded: recorded({ lagSeconds: 99, lastVerify: undefined }) });
  assert.equal(r.ok, false);
  assert.equal(r.failed.length, 4, JSON.stringify(r.failed));
});

// pickTarget

function pair(names: string[]): ResolvedPair {
  return {
    metadata: { namespace: "prod", name: "www" },
    spec: { source: { agent: { address: "10.0.0.1:7702" } }, targets: names.map((n, i) => ({ name: n, agent: { address: `10.0.1.${i}:7702` } })), replicationSet: { path: "/srv/www" } },
  };
}

const OK: GateResult = { ok: true, failed: [] };
const BAD: GateResult = { ok: false, failed: ["no"] };

test("pickTarget: the known-good target holding the most changes", () => {
  const p = pair(["a", "b", "c"]);
  const gates = new Map([
    ["a", { gate: OK, image: image({ durableSeq: 10 }) }],
    ["b", { gate: OK, image: image({ durableSeq: 30 }) }],
    ["c", { gate: BAD, image: image({ durableSeq: 99 }) }],
  ]);
  assert.equal(pickTarget(p, gates), "b");
  gates.set("b", { gate: BAD, image: image({ durableSeq: 30 }) });
  assert.equal(pickTarget(p, gates), "a");
});

test("pickTarget: undefined when no target is known good (or none has a gate)", () => {
  const p = pair(["a", "b"]);
  assert.equal(pickTarget(p, new Map([["a", { gate: BAD, image: image() }], ["b", { gate: BAD, image: image() }]])), undefined);
  assert.equal(pickTarget(p, new Map()), undefined);
  // A gate for a name the pair does not have is not a target.
  assert.equal(pickTarget(p, new Map([["zz", { gate: OK, image: image() }]])), undefined);
});

test("pickTarget: property — the result is ok and no ok target holds more", () => {
  fc.assert(
    fc.property(fc.array(fc.record({ ok: fc.boolean(), seq: fc.nat(100), hasImage: fc.boolean() }), { minLength: 1, maxLength: 6 }), (ts) => {
      const names = ts.map((_, i) => `t${i}`);
      const gates = new Map(ts.map((t, i) => [names[i]!, { gate: t.ok ? OK : BAD, image: t.hasImage ? image({ durableSeq: t.seq }) : undefined }]));
      const got = pickTarget(pair(names), gates);
      const seqOf = (i: number) => (ts[i]!.hasImage ? ts[i]!.seq : 0);
      const oks = ts.map((t, i) => i).filter((i) => ts[i]!.ok);
      if (!oks.length) return got === undefined;
      const best = Math.max(...oks.map(seqOf));
      // Ties go to the first in spec order.
      return got === names[oks.find((i) => seqOf(i) === best)!];
    }),
  );
});

// selects

test("selects: matchLabels must all match", () => {
  const p = policy(undefined, { matchLabels: { app: "www", tier: "web" } });
  assert.equal(selects(p, { app: "www", tier: "web", extra: "x" }), true);
  assert.equal(selects(p, { app: "www" }), false);
  assert.equal(selects(p, { app: "www", tier: "db" }), false);
  assert.equal(selects(p, undefined), false);
  // The empty selector selects everything.
  assert.equal(selects(policy(undefined, {}), {}), true);
  assert.equal(selects(policy(undefined, { matchLabels: {}, matchExpressions: [] }), { a: "b" }), true);
});

test("selects: In, NotIn, Exists, DoesNotExist", () => {
  const expr = (operator: "In" | "NotIn" | "Exists" | "DoesNotExist", values?: string[]) => policy(undefined, { matchExpressions: [{ key: "env", operator, ...(values ? { values } : {}) }] });
  assert.equal(selects(expr("In", ["prod", "stage"]), { env: "prod" }), true);
  assert.equal(selects(expr("In", ["prod", "stage"]), { env: "dev" }), false);
  assert.equal(selects(expr("In", ["prod"]), {}), false);
  assert.equal(selects(expr("NotIn", ["prod"]), { env: "dev" }), true);
  assert.equal(selects(expr("NotIn", ["prod"]), { env: "prod" }), false);
  assert.equal(selects(expr("NotIn", ["prod"]), {}), true); // absent key: NotIn holds
  assert.equal(selects(expr("Exists"), { env: "" }), true);
  assert.equal(selects(expr("Exists"), { other: "x" }), false);
  assert.equal(selects(expr("DoesNotExist"), {}), true);
  assert.equal(selects(expr("DoesNotExist"), { env: "prod" }), false);
  // An inherited property is not a label.
  assert.equal(selects(policy(undefined, { matchExpressions: [{ key: "toString", operator: "Exists" }] }), {}), false);
  assert.equal(selects(policy(undefined, { matchExpressions: [{ key: "toString", operator: "In", values: ["x"] }] }), {}), false);
});

test("selects: matchLabels and matchExpressions are ANDed", () => {
  const p = policy(undefined, { matchLabels: { app: "www" }, matchExpressions: [{ key: "env", operator: "In", values: ["prod"] }] });
  assert.equal(selects(p, { app: "www", env: "prod" }), true);
  assert.equal(selects(p, { app: "www", env: "dev" }), false);
  assert.equal(selects(p, { app: "db", env: "prod" }), false);
});

/** metav1.LabelSelector, written out plainly. */
function reference(sel: FailoverPolicy["spec"]["selector"], labels: Map<string, string>): boolean {
  for (const [k, v] of Object.entries(sel.matchLabels ?? {})) {
    if (!labels.has(k) || labels.get(k) !== v) return false;
  }
  for (const e of sel.matchExpressions ?? []) {
    const values = e.values ?? [];
    switch (e.operator) {
      case "In":
        if (!labels.has(e.key) || !values.includes(labels.get(e.key)!)) return false;
        break;
      case "NotIn":
        if (labels.has(e.key) && values.includes(labels.get(e.key)!)) return false;
        break;
      case "Exists":
        if (!labels.has(e.key)) return false;
        break;
      case "DoesNotExist":
        if (labels.has(e.key)) return false;
        break;
    }
  }
  return true;
}

test("selects: property — agrees with a plain metav1.LabelSelector implementation", () => {
  const key = fc.constantFrom("app", "env", "tier", "zone", "constructor");
  const value = fc.constantFrom("", "a", "b", "c");
  const labels = fc.uniqueArray(fc.tuple(key, value), { selector: ([k]) => k, maxLength: 5 });
  const expression = fc.record({ key, operator: fc.constantFrom("In" as const, "NotIn" as const, "Exists" as const, "DoesNotExist" as const), values: fc.array(value, { maxLength: 3 }) });
  const selector = fc.record({ matchLabels: fc.uniqueArray(fc.tuple(key, value), { selector: ([k]) => k, maxLength: 3 }), matchExpressions: fc.array(expression, { maxLength: 3 }) }, { requiredKeys: [] });
  fc.assert(
    fc.property(selector, labels, (s, ls) => {
      const sel = { ...(s.matchLabels ? { matchLabels: Object.fromEntries(s.matchLabels) } : {}), ...(s.matchExpressions ? { matchExpressions: s.matchExpressions } : {}) };
      return selects(policy(undefined, sel), Object.fromEntries(ls)) === reference(sel, new Map(ls));
    }),
    { numRuns: 2000 },
  );
});
