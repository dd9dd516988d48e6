// The GeoCluster rule as a pure function: may this target take over? Checked
// on every reconcile (shown in status.knownGood) and again, on live data, at
// the moment of failover. A target is known good only if every check passes.
import { parseDuration } from "../../common/config.ts";
import type { ImageStatus } from "../../agent/wire.ts";
import type { FailoverPolicy, ResolvedPair, TargetStatus } from "../api/v1alpha1/index.ts";

export interface GateInput {
  /** What the pair's status last recorded for this target (while the source was alive). */
  recorded?: TargetStatus;
  /** The target agent's view of the replica now (undefined: agent unreachable). */
  image?: ImageStatus;
  /** Why the target agent could not be asked. */
  imageError?: string;
  policy?: FailoverPolicy;
  now: Date;
}

export interface GateResult {
  ok: boolean;
  failed: string[];
}

export function knownGood(i: GateInput): GateResult {
  const failed: string[] = [];
  const kg = i.policy?.spec.knownGood ?? {};
  const t = i.recorded;
  if (!i.image) failed.push(`target agent unreachable${i.imageError ? ` (${i.imageError})` : ""}`);
  else {
    if (i.image.mirroring) failed.push("a mirror into the replica is unfinished (not a consistent copy)");
    if (i.image.journalId === "") failed.push("the replica was never mirrored");
    // Data the target received but could not apply (its last apply failed): the copy lags what it was sent.
    if (i.image.lastError) failed.push(`unapplied data: the replica reports an error: ${i.image.lastError}`);
    // Everything the source was told is durable must be applied here: no gap.
    const acked = t?.lastAckedSeq ?? 0;
    if (i.image.durableSeq < acked) failed.push(`sequence gap: ${acked - i.image.durableSeq} acknowledged change(s) are not applied (applied ${i.image.durableSeq}, acknowledged ${acked})`);
    // Applied but not yet fsynced (a live replica, within its sync interval) is fine: promotion makes it durable first.
  }
  if (!t) failed.push("no replication status recorded for this target");
  else {
    if (t.mirror?.active || (t.mirror?.result && t.mirror.result !== "ok")) failed.push(`mirror not complete (${t.mirror?.active ? "running" : t.mirror?.result})`);
    const maxLag = parseDuration(kg.maxLag ?? "30s") / 1000;
    if ((t.lagSeconds ?? 0) > maxLag) failed.push(`lag ${t.lagSeconds}s is above ${kg.maxLag ?? "30s"}`);
    if (kg.requireVerify ?? true) {
      const v = t.lastVerify;
      const result = v?.result === "Running" ? undefined : v?.result;
      const maxAge = parseDuration(kg.maxVerifyAge ?? "24h");
      if (!v?.finishedAt || !result) failed.push("never verified (a passed verify is required: the operator starts one once the copy is complete and replicating)");
      else if (result !== "Passed") failed.push(`last verify ${result.toLowerCase()}${v.differences ? ` (${v.differences} difference(s))` : ""}${v.error ? `: ${v.error}` : ""}`);
      else if (i.now.getTime() - Date.parse(v.finishedAt) > maxAge) failed.push(`last verify is older than ${kg.maxVerifyAge ?? "24h"} (${v.finishedAt})`);
    }
  }
  return { ok: failed.length === 0, failed };
}

/** The best known-good target: the one holding the most changes. */
export function pickTarget(pair: ResolvedPair, gates: Map<string, { gate: GateResult; image?: ImageStatus }>): string | undefined {
  let best: { name: string; seq: number } | undefined;
  for (const t of pair.spec.targets) {
    const g = gates.get(t.name);
    if (!g?.gate.ok) continue;
    const seq = g.image?.durableSeq ?? 0;
    if (!best || seq > best.seq) best = { name: t.name, seq };
  }
  return best?.name;
}

/** Does a policy's label selector select these labels? (matchLabels and matchExpressions, as metav1.LabelSelector.) */
export function selects(policy: FailoverPolicy, labels: Record<string, string> = {}): boolean {
  const sel = policy.spec.selector;
  for (const [k, v] of Object.entries(sel.matchLabels ?? {})) if (labels[k] !== v) return false;
  for (const e of sel.matchExpressions ?? []) {
    const has = Object.hasOwn(labels, e.key);
    const v = labels[e.key];
    const ok = e.operator === "In" ? has && (e.values ?? []).includes(v!) : e.operator === "NotIn" ? !has || !(e.values ?? []).includes(v!) : e.operator === "Exists" ? has : !has;
    if (!ok) return false;
  }
  return true;
}
