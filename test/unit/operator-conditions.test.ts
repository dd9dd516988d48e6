// setCondition: lastTransitionTime tells how long a condition has held, so it
// moves only when the status flips; everything else follows the latest call.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { getCondition, setCondition, type Condition, type ConditionStatus } from "../../operator/api/v1alpha1/index.ts";

const t0 = new Date("2025-03-01T10:00:00.123Z");
const t1 = new Date("2025-03-01T11:30:00.456Z");
const t2 = new Date("2025-03-02T08:00:00.000Z");

test("a new condition is added with the time, in metav1 form (whole seconds), and counts as a flip", () => {
  const conds: Condition[] = [];
  assert.equal(setCondition(conds, { type: "Ready", status: "False", reason: "Configuring", message: "wait" }, 1, t0), true);
  assert.deepEqual(conds, [{ type: "Ready", status: "False", reason: "Configuring", message: "wait", observedGeneration: 1, lastTransitionTime: "2025-03-01T10:00:00Z" }]);
  assert.deepEqual(getCondition(conds, "Ready"), conds[0]);
  assert.equal(getCondition(conds, "Degraded"), undefined);
  assert.equal(getCondition(undefined, "Ready"), undefined);
});

test("without a flip, reason, message and observedGeneration update but lastTransitionTime stays", () => {
  const conds: Condition[] = [];
  setCondition(conds, { type: "Ready", status: "False", reason: "Configuring", message: "wait" }, 1, t0);
  assert.equal(setCondition(conds, { type: "Ready", status: "False", reason: "Scanning", message: "scanning /srv" }, 2, t1), false);
  assert.deepEqual(conds, [{ type: "Ready", status: "False", reason: "Scanning", message: "scanning /srv", observedGeneration: 2, lastTransitionTime: "2025-03-01T10:00:00Z" }]);
});

test("a flip moves lastTransitionTime and returns true; other conditions are untouched", () => {
  const conds: Condition[] = [];
  setCondition(conds, { type: "Ready", status: "False", reason: "Configuring", message: "wait" }, 1, t0);
  setCondition(conds, { type: "Degraded", status: "False", reason: "AllHealthy", message: "ok" }, 1, t0);
  assert.equal(setCondition(conds, { type: "Ready", status: "True", reason: "Replicating", message: "go" }, 3, t1), true);
  assert.deepEqual(getCondition(conds, "Ready"), { type: "Ready", status: "True", reason: "Replicating", message: "go", observedGeneration: 3, lastTransitionTime: "2025-03-01T11:30:00Z" });
  assert.deepEqual(getCondition(conds, "Degraded"), { type: "Degraded", status: "False", reason: "AllHealthy", message: "ok", observedGeneration: 1, lastTransitionTime: "2025-03-01T10:00:00Z" });
  assert.equal(conds.length, 2, "an existing condition is updated in place, not duplicated");
  assert.equal(setCondition(conds, { type: "Ready", status: "Unknown", reason: "SourceUnreachable", message: "?" }, 3, t2), true, "True → Unknown is a flip too");
  assert.equal(getCondition(conds, "Ready")!.lastTransitionTime, "2025-03-02T08:00:00Z");
});

test("a very long message is cut to fit the API's limit", () => {
  const conds: Condition[] = [];
  setCondition(conds, { type: "Ready", status: "False", reason: "X", message: "m".repeat(100_000) }, 1, t0);
  assert.ok(conds[0]!.message.length <= 32_768);
});

test("property: over any sequence of updates, lastTransitionTime is the time of the last flip and the result says whether it flipped", () => {
  const status = fc.constantFrom<ConditionStatus>("True", "False", "Unknown");
  const update = fc.record({ status, reason: fc.constantFrom("A", "B"), message: fc.string({ maxLength: 8 }), generation: fc.nat({ max: 9 }) });
  fc.assert(
    fc.property(fc.array(update, { minLength: 1, maxLength: 30 }), (updates) => {
      const conds: Condition[] = [];
      let lastFlipAt = "";
      let prev: ConditionStatus | undefined;
      for (const [i, u] of updates.entries()) {
        const now = new Date(Date.UTC(2025, 0, 1, 0, 0, i));
        const flipped = setCondition(conds, { type: "Mirrored", status: u.status, reason: u.reason, message: u.message }, u.generation, now);
        assert.equal(flipped, u.status !== prev);
        if (flipped) lastFlipAt = now.toISOString().replace(/\.\d+Z$/, "Z");
        prev = u.status;
        assert.deepEqual(conds, [{ type: "Mirrored", status: u.status, reason: u.reason, message: u.message, observedGeneration: u.generation, lastTransitionTime: lastFlipAt }]);
      }
    }),
  );
});
