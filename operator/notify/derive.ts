// What a NotificationPolicy sends, as pure functions of a pair's status and
// the policy's remembered state (kept in the policy's status, so it survives
// restarts and leader changes).
//
// Two sorts of event:
// - problems (a level: "the pair is degraded", "failover in progress"): sent
//   once when first seen (some only after the grace period), never again while
//   they last, and once more as "resolved" when they clear;
// - one-shots (a thing that happened: a failover completed, a mirror finished):
//   sent once per occurrence, keyed by the time it happened.
// Everything is derived from the status as it is now, not from a stream of
// changes, so a status update the informer skipped loses nothing.
import { createHash } from "node:crypto";
import { getCondition, timestamp, type AlertState, type EventMark, type NotificationEvent, type ReplicationPair } from "../api/v1alpha1/index.ts";
import { humanBytes, humanSeconds } from "../controllers/pair-status.ts";

export const KINDS = ["FailoverStarted", "FailoverCompleted", "FailoverRefused", "FailoverPending", "CutoverCompleted", "FailbackStarted", "FailbackCompleted", "PairDegraded", "NotKnownGood", "VerifyDifferences", "MirrorCompleted", "MirrorFailed", "VersionMismatch", "LagHigh", "QueueHigh"] as const;
export type Kind = (typeof KINDS)[number];
export type Severity = "critical" | "warning" | "info";

export interface Problem {
  kind: Kind;
  /** The target concerned, when the problem is about one. */
  subject?: string;
  severity: Severity;
  summary: string;
  detail: string;
  /** Sent only once it has lasted the grace period. */
  grace?: boolean;
  /** Kept if already known, but not raised anew (it is covered by a bigger problem, e.g. a failover). */
  holdOnly?: boolean;
  /** Raised only once this mark (kind|subject) was recorded: "no longer known good" needs a target that was. */
  needsMark?: string;
  data?: Record<string, string>;
}

export interface OneShot {
  kind: Kind;
  subject?: string;
  /** Orders occurrences of one kind (an RFC 3339 time or a zero-padded number): a larger key is a new occurrence. */
  key: string;
  /** When it happened. */
  at: string;
  severity: Severity;
  summary: string;
  detail: string;
  data?: Record<string, string>;
}

export interface Thresholds {
  lagSeconds: number;
  queuedBytes: number;
  graceMs: number;
}

const DEGRADED_NOT_VERSION = (reason: string | undefined) => reason !== "VersionMismatch";

/** The pair's agents by name and address: what per-server recipients match. */
export function serversOf(pair: ReplicationPair): string[] {
  const out = new Set<string>();
  const add = (addr?: string) => {
    if (!addr) return;
    out.add(addr);
    const host = /^(?:\[([^\]]+)\]|([^:]+)):\d+$/.exec(addr);
    if (host) out.add((host[1] ?? host[2])!);
  };
  add(pair.spec.source.agent?.address);
  if (pair.status?.sourceAgent?.name) out.add(pair.status.sourceAgent.name);
  for (const t of pair.spec.targets) {
    out.add(t.name);
    add(t.agent?.address);
  }
  for (const e of pair.status?.endpoints ?? []) {
    add(e.agentAddress);
    if (e.agentName) out.add(e.agentName);
  }
  return [...out];
}

/** Problems and one-shot events the pair's status shows now. */
export function observe(pair: ReplicationPair, t: Thresholds): { problems: Problem[]; oneShots: OneShot[]; seen: { kind: string; subject: string }[] } {
  const st = pair.status ?? {};
  const id = `${pair.metadata.namespace}/${pair.metadata.name}`;
  const specActive = pair.spec.activeSide ?? "source";
  const active = st.activeSide ?? "source";
  const fo = st.failover;
  const cond = (type: string) => getCondition(st.conditions, type);
  const srcAddr = pair.spec.source.agent?.address ?? "source";
  const problems: Problem[] = [];
  const oneShots: OneShot[] = [];
  /** States worth remembering (a target that has been known good). */
  const seen: { kind: string; subject: string }[] = [];

  // A failover (not a planned cutover): decided (spec names a target that does not serve yet) with the source
  // down, under way, or done while the old source has not come back.
  const moving = specActive !== "source" && specActive !== active;
  const sourceBack = !!st.reverse?.state && st.reverse.state !== "source unreachable";
  const downMove = moving && (!!st.health?.sourceDown || (!!fo && !fo.finishedAt && fo.reason === "source down"));
  const servingAfterDown = active !== "source" && fo?.reason === "source down" && !sourceBack && st.phase !== "FailingBack";
  const inPlay = moving || active !== "source";
  if (downMove || servingAfterDown) {
    const to = downMove ? specActive : (fo?.target ?? active);
    problems.push({
      kind: "FailoverStarted",
      severity: "critical",
      summary: `failover of ${id} started: source ${srcAddr} is down, ${to} takes over`,
      detail: `the source ${srcAddr} stopped answering${st.health?.sourceDownSince ? ` (down since ${st.health.sourceDownSince})` : ""}; ${to} was found known good and is made the active side. A "resolved" follows when the old source is back and being brought up to date.`,
      data: { target: to, source: srcAddr },
    });
  }
  const refused = cond("FailedOver");
  if (refused?.status === "False" && refused.reason === "FailoverRefused") {
    problems.push({ kind: "FailoverRefused", severity: "critical", summary: `failover of ${id} refused`, detail: refused.message, data: { failing: refused.message } });
  }
  const pending = cond("FailoverPending");
  if (pending?.status === "True") problems.push({ kind: "FailoverPending", severity: "critical", summary: `failover of ${id} awaits approval`, detail: pending.message });

  const degraded = cond("Degraded");
  if (degraded?.status === "True" && DEGRADED_NOT_VERSION(degraded.reason)) {
    // While a failover is in play, or the failover machinery is counting missed beats of the source,
    // the failover's own messages cover it.
    const covered = inPlay || (degraded.reason === "SourceUnreachable" && !!st.health?.policy && ((st.health.missedBeats ?? 0) > 0 || !!st.health.sourceDown));
    problems.push({ kind: "PairDegraded", severity: "warning", summary: `${id} is degraded: ${degraded.reason}`, detail: degraded.message, grace: true, holdOnly: covered, data: { reason: degraded.reason } });
  }
  if (degraded?.status === "True" && degraded.reason === "VersionMismatch") {
    problems.push({ kind: "VersionMismatch", severity: "warning", summary: `${id}: agent versions do not match`, detail: degraded.message });
  }

  for (const kg of st.knownGood ?? []) {
    if (kg.ok) seen.push({ kind: "KnownGood", subject: kg.target });
    const failed = (kg.failed ?? []).filter((f) => !/^never verified/.test(f));
    if (kg.ok || failed.length === 0) continue;
    problems.push({ kind: "NotKnownGood", subject: kg.target, severity: "warning", summary: `${id}: target ${kg.target} is no longer known good`, detail: `failing checks: ${failed.join("; ")}`, holdOnly: inPlay, needsMark: `KnownGood|${kg.target}`, data: { failing: failed.join("; ") } });
  }

  for (const tg of st.targets ?? []) {
    const v = tg.lastVerify;
    if (v?.result === "Failed") {
      problems.push({ kind: "VerifyDifferences", subject: tg.name, severity: "warning", summary: `${id}: verify of ${tg.name} found ${v.differences ?? "some"} difference(s)`, detail: `${v.differences ?? 0} difference(s)${v.repaired ? `, ${v.repaired} repaired` : ""}${v.sample?.length ? `: ${v.sample.slice(0, 5).join("; ")}` : ""}`, data: { differences: String(v.differences ?? 0), repaired: String(v.repaired ?? 0) } });
    }
    const m = tg.mirror;
    if (m && !m.active && m.result && m.result !== "ok") problems.push({ kind: "MirrorFailed", subject: tg.name, severity: "warning", summary: `${id}: mirror to ${tg.name} failed`, detail: m.result });
    if (m && !m.active && m.result === "ok" && m.finishedAt) {
      const took = m.startedAt ? (Date.parse(m.finishedAt) - Date.parse(m.startedAt)) / 1000 : undefined;
      oneShots.push({ kind: "MirrorCompleted", subject: tg.name, key: m.finishedAt, at: m.finishedAt, severity: "info", summary: `${id}: ${m.mode ?? ""} mirror to ${tg.name} done`.replace("  ", " "), detail: `${m.filesTotal ?? 0} files, ${humanBytes(m.bytesTotal ?? 0)} compared, ${humanBytes(m.bytesSent ?? 0)} sent${took !== undefined ? ` in ${humanSeconds(took)}` : ""}`, data: { files: String(m.filesTotal ?? 0), bytes: String(m.bytesTotal ?? 0) } });
    }
    // Lag and queue mean something only while the source replicates forward.
    if (!inPlay && (tg.lagSeconds ?? 0) > t.lagSeconds) {
      problems.push({ kind: "LagHigh", subject: tg.name, severity: "warning", summary: `${id}: lag to ${tg.name} is ${humanSeconds(tg.lagSeconds ?? 0)} (threshold ${humanSeconds(t.lagSeconds)})`, detail: `the copy on ${tg.name} is ${humanSeconds(tg.lagSeconds ?? 0)} behind the source`, grace: true, data: { lagSeconds: String(tg.lagSeconds) } });
    }
    if (!inPlay && (tg.queuedBytes ?? 0) > t.queuedBytes) {
      problems.push({ kind: "QueueHigh", subject: tg.name, severity: "warning", summary: `${id}: ${humanBytes(tg.queuedBytes ?? 0)} queued for ${tg.name} (threshold ${humanBytes(t.queuedBytes)})`, detail: `changes wait on the source for ${tg.name}: ${humanBytes(tg.queuedBytes ?? 0)}`, grace: true, data: { queuedBytes: String(tg.queuedBytes) } });
    }
  }

  if (fo?.finishedAt && fo.target) {
    const rec = fo.recoverySeconds !== undefined ? `${fo.recoverySeconds}s` : "unknown";
    if (fo.reason === "source down") {
      oneShots.push({ kind: "FailoverCompleted", key: fo.finishedAt, at: fo.finishedAt, severity: "critical", summary: `failover of ${id} completed: ${fo.target} serves (recovery time ${rec})`, detail: `${fo.target} serves at epoch ${st.epoch ?? "?"} with every change up to ${fo.appliedSeq ?? "?"}; recovery time (source found down to target serving) ${rec}${fo.actions?.length ? `; actions run: ${fo.actions.join(", ")}` : ""}`, data: { target: fo.target, recoverySeconds: String(fo.recoverySeconds ?? "") } });
    } else if (fo.reason === "cutover") {
      oneShots.push({ kind: "CutoverCompleted", key: fo.finishedAt, at: fo.finishedAt, severity: "info", summary: `cutover of ${id} completed: ${fo.target} serves`, detail: `planned move to ${fo.target} at epoch ${st.epoch ?? "?"} (took ${rec}); nothing was lost: every change was acknowledged before the switch`, data: { target: fo.target, recoverySeconds: String(fo.recoverySeconds ?? "") } });
    }
  }
  if (st.phase === "FailingBack") {
    oneShots.push({ kind: "FailbackStarted", key: String(st.epoch ?? 0).padStart(12, "0"), at: "", severity: "info", summary: `failback of ${id} started: the source will serve again`, detail: cond("FailedOver")?.message ?? "" });
  }
  const fb = cond("FailedOver");
  if (fb?.status === "False" && fb.reason === "FailedBack") {
    oneShots.push({ kind: "FailbackCompleted", key: fb.lastTransitionTime, at: fb.lastTransitionTime, severity: "info", summary: `failback of ${id} completed: the source serves again`, detail: fb.message });
  }
  return { problems, oneShots, seen };
}

export interface StepInput {
  policyUid: string;
  namespace: string;
  pair: string;
  /** Event kinds the policy sends (empty: all). */
  kinds: readonly string[];
  problems: Problem[];
  oneShots: OneShot[];
  /** States to remember as marks (key "seen"), e.g. that a target has been known good. */
  seen?: { kind: string; subject: string }[];
  /** This pair's remembered alerts and marks. */
  alerts: AlertState[];
  marks: EventMark[];
  graceMs: number;
  /** One-shots that happened before this (the policy's creation) are remembered, not sent. */
  notBefore: string;
  servers: string[];
  now: Date;
}

export interface StepOutput {
  alerts: AlertState[];
  marks: EventMark[];
  events: NotificationEvent[];
}

const keyOf = (x: { kind: string; subject?: string }) => `${x.kind}|${x.subject ?? ""}`;

export function eventId(...parts: string[]): string {
  return createHash("sha256").update(parts.join("\0")).digest("hex").slice(0, 20);
}

/** One pair, one evaluation: the new remembered state and the events to send (firing, then one-shots, then resolved). */
export function step(i: StepInput): StepOutput {
  const now = timestamp(i.now);
  const on = (k: string) => i.kinds.length === 0 || i.kinds.includes(k);
  const prev = new Map(i.alerts.map((a) => [keyOf(a), a]));
  const alerts: AlertState[] = [];
  const firing: NotificationEvent[] = [];
  const resolved: NotificationEvent[] = [];
  const info: NotificationEvent[] = [];
  const ev = (o: { kind: string; subject?: string; severity: Severity; summary: string; detail: string; data?: Record<string, string> }, state: NotificationEvent["state"], since: string | undefined, idPart: string): NotificationEvent => ({
    id: eventId(i.policyUid, i.namespace, i.pair, o.kind, o.subject ?? "", state, idPart),
    kind: o.kind,
    state,
    severity: state === "resolved" ? "info" : o.severity,
    namespace: i.namespace,
    pair: i.pair,
    ...(o.subject ? { subject: o.subject } : {}),
    summary: o.summary,
    detail: o.detail,
    at: now,
    ...(since ? { since } : {}),
    servers: i.servers,
    ...(o.data ? { data: o.data } : {}),
  });

  const marks = new Map(i.marks.map((m) => [keyOf(m), m]));
  for (const x of i.seen ?? []) marks.set(keyOf(x), { pair: i.pair, kind: x.kind, subject: x.subject, key: "seen" });
  const seen = new Set<string>();
  for (const p of i.problems) {
    if (!on(p.kind)) continue;
    const k = keyOf(p);
    if (seen.has(k)) continue;
    seen.add(k);
    const old = prev.get(k);
    if (!old && (p.holdOnly || (p.needsMark && !marks.has(p.needsMark)))) continue;
    const a: AlertState = old ? { ...old, summary: old.firedAt ? old.summary : p.summary } : { pair: i.pair, kind: p.kind, ...(p.subject ? { subject: p.subject } : {}), since: now, summary: p.summary };
    const due = !p.grace || i.now.getTime() - Date.parse(a.since) >= i.graceMs;
    if (!a.firedAt && due && !p.holdOnly) {
      a.firedAt = now;
      firing.push(ev(p, "firing", a.since, a.since));
    }
    alerts.push(a);
  }
  for (const [k, a] of prev) {
    if (seen.has(k)) continue;
    if (a.firedAt) {
      const lasted = humanSeconds((i.now.getTime() - Date.parse(a.since)) / 1000);
      resolved.push(ev({ kind: a.kind, subject: a.subject, severity: "info", summary: `resolved: ${a.summary ?? a.kind}`, detail: `${resolvedText(a.kind as Kind, a.subject)} (lasted ${lasted})` }, "resolved", a.since, a.since));
    }
  }

  for (const o of i.oneShots) {
    if (!on(o.kind)) continue;
    const k = keyOf(o);
    const m = marks.get(k);
    if (m && m.key >= o.key) continue;
    marks.set(k, { pair: i.pair, kind: o.kind, ...(o.subject ? { subject: o.subject } : {}), key: o.key });
    if (!m && o.at && o.at < i.notBefore) continue; // happened before the policy existed
    info.push(ev(o, "info", undefined, o.key));
  }
  return { alerts, marks: [...marks.values()], events: [...firing, ...info, ...resolved] };
}

function resolvedText(kind: Kind, subject?: string): string {
  switch (kind) {
    case "FailoverStarted":
      return "the old source is reachable again and is being brought up to date from the new primary (or the source serves again)";
    case "FailoverRefused":
      return "the failover is no longer refused (it happened, or the source came back)";
    case "FailoverPending":
      return "no failover awaits approval any more";
    case "PairDegraded":
      return "the pair recovered: source and every target are reachable and replicating";
    case "VersionMismatch":
      return "the agents run the same version again";
    case "NotKnownGood":
      return `${subject} is known good again`;
    case "VerifyDifferences":
      return `a later verify of ${subject} found no difference`;
    case "MirrorFailed":
      return `the mirror to ${subject} is no longer failed`;
    case "LagHigh":
      return `lag to ${subject} is under the threshold again`;
    case "QueueHigh":
      return `the queue for ${subject} is under the threshold again`;
    default:
      return "cleared";
  }
}

/** Resolve the alerts of a pair that is gone (deleted, or no longer selected). */
export function forget(i: { policyUid: string; namespace: string; pair: string; alerts: AlertState[]; now: Date }): NotificationEvent[] {
  return i.alerts.filter((a) => a.firedAt).map((a) => ({
    id: eventId(i.policyUid, i.namespace, i.pair, a.kind, a.subject ?? "", "resolved", a.since),
    kind: a.kind,
    state: "resolved" as const,
    severity: "info" as const,
    namespace: i.namespace,
    pair: i.pair,
    ...(a.subject ? { subject: a.subject } : {}),
    summary: `resolved: ${a.summary ?? a.kind}`,
    detail: "the pair was deleted or is no longer selected by this policy",
    at: timestamp(i.now),
    since: a.since,
  }));
}

/** Recipients of an email for this event: `to`, plus every entry naming its pair or one of its servers. */
export function recipientsFor(ch: { to?: string[]; recipients?: { to: string[]; pairs?: string[]; servers?: string[] }[] }, e: NotificationEvent): string[] {
  const out = new Set(ch.to ?? []);
  for (const r of ch.recipients ?? []) {
    if (r.pairs?.includes(e.pair) || r.pairs?.includes(`${e.namespace}/${e.pair}`) || r.servers?.some((s) => e.servers?.includes(s))) for (const a of r.to) out.add(a);
  }
  return [...out];
}
