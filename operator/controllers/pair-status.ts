// Pure: what a ReplicationPair's status should say, from what the operator saw
// of its agents. No I/O here, so every rule is table-tested (test/unit).
import { tidyGrpcMessage } from "../../agent/control-client.ts";
import type { StatusResponse, TargetStatus as AgentTargetStatus, VerifyReport, MirrorProgress } from "../../agent/wire.ts";
import { ConditionType, Reason, setCondition, type Condition, type ConditionStatus, type MirrorStatus, type ResolvedPair, type ReplicationPairStatus, type TargetStatus, type VerifyResult } from "../api/v1alpha1/index.ts";

export interface AgentView {
  status?: StatusResponse;
  error?: string;
}

export interface Observation {
  now: Date;
  setName: string;
  source: AgentView;
  /** The agent refused the desired set (bad path, bad filter …). */
  configError?: string;
  /** the reason for configError (default ConfigRejected: the source agent refused the set) */
  configReason?: string;
  /** By target address. */
  targets: Map<string, AgentView>;
}

export interface Transition {
  type: string;
  status: ConditionStatus;
  reason: string;
  message: string;
}

const HEALTHY = new Set(["replicating", "idle"]);

function iso(unixSeconds: number): string | undefined {
  return unixSeconds > 0 ? new Date(unixSeconds * 1000).toISOString().replace(/\.\d+Z$/, "Z") : undefined;
}

export function humanBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v}B` : `${v.toFixed(v < 10 ? 1 : 0)}${units[i]}`;
}

export function humanSeconds(s: number): string {
  if (s <= 0) return "0s";
  if (s < 1) return `${Math.round(s * 1000)}ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${Math.round(s % 60)}s`;
  return `${Math.floor(s / 3600)}h${Math.round((s % 3600) / 60)}m`;
}

function mirrorStatus(m: MirrorProgress | undefined, prev: MirrorStatus | undefined): MirrorStatus | undefined {
  // An agent that restarted knows nothing of mirrors before; keep what we recorded.
  if (!m || (m.startedAt === 0 && !m.active)) return prev;
  return {
    active: m.active,
    mode: m.mode,
    filesDone: m.filesDone,
    filesTotal: m.filesTotal,
    bytesDone: m.bytesDone,
    bytesTotal: m.bytesTotal,
    bytesSent: m.bytesSent,
    startedAt: iso(m.startedAt),
    finishedAt: iso(m.finishedAt),
    result: m.active ? "running" : m.result,
  };
}

function verifyResult(targetName: string, r: VerifyReport | undefined, running: boolean, prev: VerifyResult | undefined): VerifyResult | undefined {
  // Per target this is always the last *finished* verify (the gate relies on
  // it); one that is running shows as TargetStatus.verifying instead.
  void running;
  if (!r || r.finishedAt === 0) return prev;
  return {
    target: targetName,
    result: r.error ? "Error" : r.ok ? "Passed" : "Failed",
    startedAt: iso(r.startedAt),
    finishedAt: iso(r.finishedAt),
    filesCompared: r.filesCompared,
    bytesCompared: r.bytesCompared,
    differences: r.differences.length,
    repaired: r.repaired,
    sample: r.differences.slice(0, 10).map((d) => `${d.kind} ${d.path}${d.detail ? `: ${d.detail}` : ""}`),
    error: r.error || undefined,
  };
}

/**
 * A running verify keeps the last finished result for the Verified condition:
 * the one the agent still reports, else the one recorded before the run.
 */
/** A record from before verifying was kept apart (result Running) says nothing finished. */
function finished(v: VerifyResult | undefined): VerifyResult | undefined {
  return v?.result === "Running" ? undefined : v;
}

export function computeStatus(pair: ResolvedPair, obs: Observation): { status: ReplicationPairStatus; transitions: Transition[] } {
  const prev = pair.status ?? {};
  const gen = pair.metadata.generation ?? 0;
  const src = obs.source.status;
  const set = src?.sets.find((s) => s.name === obs.setName);
  const prevTargets = new Map((prev.targets ?? []).map((t) => [t.name, t]));

  const targets: TargetStatus[] = pair.spec.targets.map((spec) => {
    const address = spec.agent.address;
    const p = prevTargets.get(spec.name);
    const st: AgentTargetStatus | undefined = set?.targets.find((t) => t.address === address);
    const tview = obs.targets.get(address);
    const image = src && tview?.status?.images.find((i) => i.source === src.name && i.set === obs.setName);
    const errors = [st?.lastError ? tidyGrpcMessage(st.lastError) : undefined, tview?.error ? `operator cannot reach the target agent: ${tview.error}` : undefined, image?.lastError].filter(Boolean);
    return {
      name: spec.name,
      address,
      state: !src ? "unknown" : !st ? "configuring" : tview?.error && !HEALTHY.has(st.state) ? "unreachable" : st.state,
      connected: image?.connected ?? false,
      lastSentSeq: st?.lastSentSeq ?? p?.lastSentSeq,
      lastAckedSeq: st?.lastAckedSeq ?? p?.lastAckedSeq,
      appliedSeq: image?.appliedSeq ?? p?.appliedSeq,
      queuedBytes: st ? (st.queuedBytes?.memory ?? 0) + (st.queuedBytes?.disk ?? 0) : p?.queuedBytes,
      lagSeconds: st?.lagSeconds ?? p?.lagSeconds,
      lastError: errors.length ? errors.join("; ") : undefined,
      mirror: mirrorStatus(st?.mirror, p?.mirror),
      lastVerify: verifyResult(spec.name, st?.lastVerify, false, finished(p?.lastVerify)),
      verifying: st?.verifying || undefined,
    };
  });

  const conds: Condition[] = (prev.conditions ?? []).map((c) => ({ ...c }));
  const transitions: Transition[] = [];
  const set1 = (type: string, status: ConditionStatus, reason: string, message: string) => {
    if (setCondition(conds, { type, status, reason, message }, gen, obs.now)) transitions.push({ type, status, reason, message });
  };
  const bad = (pred: (t: TargetStatus) => boolean) => targets.filter(pred).map((t) => t.name);

  // Degraded: anything that keeps changes from reaching every target.
  const degraded: [string, string] | undefined = obs.source.error
    ? [Reason.SourceUnreachable, `operator cannot reach the source agent ${pair.spec.source.agent.address}: ${obs.source.error}`]
    : obs.configError
      ? (obs.configReason ? [obs.configReason, obs.configError] : [Reason.ConfigRejected, `source agent refused the replication set: ${obs.configError}`])
      : set?.pathError
        ? [Reason.SourcePathUnavailable, `${set.pathError} (on source agent ${src?.name ?? pair.spec.source.agent.address}): nothing is replicated from it until it can be read`]
      : set?.state === "failed"
        ? [Reason.SetFailed, `replication set failed on the source: ${set.lastError}`]
        : bad((t) => t.state === "refused").length
          ? [Reason.TargetRefused, `target(s) ${bad((t) => t.state === "refused").join(", ")} refused the source: ${targets.find((t) => t.state === "refused")?.lastError ?? ""}`]
          : bad((t) => t.state === "degraded" || t.state === "unreachable").length
            ? [Reason.TargetDegraded, `target(s) ${bad((t) => t.state === "degraded" || t.state === "unreachable").join(", ")} cannot take changes: ${targets.find((t) => t.state === "degraded" || t.state === "unreachable")?.lastError ?? ""}`]
            : undefined;
  const tUnreach = targets.filter((t) => obs.targets.get(t.address)?.error);
  const degradedFinal = degraded ?? (tUnreach.length ? [Reason.TargetUnreachable, `operator cannot reach target agent(s) ${tUnreach.map((t) => `${t.name} (${t.address})`).join(", ")}: ${obs.targets.get(tUnreach[0]!.address)?.error}`] as [string, string] : undefined);
  if (degradedFinal) set1(ConditionType.Degraded, "True", degradedFinal[0], degradedFinal[1]);
  else set1(ConditionType.Degraded, "False", Reason.AllHealthy, "source and every target are reachable and replicating");

  // Replicating: every target takes changes as they happen.
  if (!src) set1(ConditionType.Replicating, "Unknown", Reason.SourceUnreachable, "source agent not reachable");
  else if (!set) set1(ConditionType.Replicating, "False", obs.configError ? (obs.configReason ?? Reason.ConfigRejected) : Reason.Configuring, obs.configError ?? "replication set is being configured on the source agent");
  else if (set.pathError) set1(ConditionType.Replicating, "False", Reason.SourcePathUnavailable, set.pathError);
  else if (set.state === "starting" || set.state === "scanning") set1(ConditionType.Replicating, "False", Reason.Scanning, `source is scanning ${set.path}`);
  else {
    const notOk = targets.filter((t) => !HEALTHY.has(t.state ?? "") && t.state !== "mirroring");
    if (notOk.length === 0) set1(ConditionType.Replicating, "True", Reason.Replicating, `replicating ${set.path} to ${targets.map((t) => t.name).join(", ")}`);
    else {
      const t = notOk[0]!;
      const reason = t.state === "refused" ? Reason.TargetRefused : t.state === "degraded" || t.state === "unreachable" ? Reason.TargetDegraded : Reason.Connecting;
      set1(ConditionType.Replicating, "False", reason, `target ${t.name} (${t.address}) is ${t.state}${t.lastError ? `: ${t.lastError}` : ""}`);
    }
  }

  // Mirrored: every target has held a complete copy since its last mirror.
  const running = targets.filter((t) => t.mirror?.active);
  const failed = targets.filter((t) => !t.mirror?.active && t.mirror?.result && t.mirror.result !== "ok");
  const never = targets.filter((t) => !t.mirror);
  if (set?.pathError) set1(ConditionType.Mirrored, "False", Reason.SourcePathUnavailable, `no target holds a copy of ${set.path}: ${set.pathError}`);
  else if (running.length) {
    const m = running[0]!.mirror!;
    const pct = m.bytesTotal ? Math.floor(((m.bytesDone ?? 0) / m.bytesTotal) * 100) : 0;
    set1(ConditionType.Mirrored, "False", Reason.Mirroring, `${m.mode} mirror to ${running.map((t) => t.name).join(", ")}: ${pct}% (${m.filesDone}/${m.filesTotal} files, ${humanBytes(m.bytesDone ?? 0)}/${humanBytes(m.bytesTotal ?? 0)})`);
  } else if (failed.length) set1(ConditionType.Mirrored, "False", Reason.MirrorFailed, `mirror to ${failed[0]!.name} did not complete: ${failed[0]!.mirror!.result}`);
  else if (never.length) {
    // No mirror recorded, but a target that is replicating needed none (its copy was current).
    // ... unless the target is new to this pair (added by a spec change).
    const prevMirrored = conds.find((c) => c.type === ConditionType.Mirrored)?.status === "True" && never.every((t) => prevTargets.has(t.name));
    if (!prevMirrored) set1(ConditionType.Mirrored, "False", Reason.MirrorPending, `waiting for the first mirror to ${never.map((t) => t.name).join(", ")}`);
  } else set1(ConditionType.Mirrored, "True", Reason.MirrorComplete, `every target holds a complete copy (last mirror finished ${targets.map((t) => t.mirror?.finishedAt).filter(Boolean).sort().at(-1) ?? "earlier"})`);

  // Verified: the last finished verify of every target passed.
  const lastFinished = targets.map((t) => finished(t.lastVerify));
  const vFailed = targets.filter((_, i) => lastFinished[i]?.result === "Failed");
  const vError = targets.filter((_, i) => lastFinished[i]?.result === "Error");
  const vNone = targets.filter((_, i) => !lastFinished[i]);
  if (vFailed.length) {
    const v = lastFinished[targets.indexOf(vFailed[0]!)]!;
    set1(ConditionType.Verified, "False", Reason.DifferencesFound, `verify of ${vFailed.map((t) => t.name).join(", ")} found ${v.differences} difference(s)${v.repaired ? `, ${v.repaired} repaired` : ""}: ${(v.sample ?? []).slice(0, 3).join("; ")}`);
  } else if (vError.length) set1(ConditionType.Verified, "False", Reason.VerifyError, `verify of ${vError[0]!.name} failed: ${lastFinished[targets.indexOf(vError[0]!)]!.error}`);
  else if (vNone.length) set1(ConditionType.Verified, "Unknown", Reason.NeverVerified, `no verify of ${vNone.map((t) => t.name).join(", ")} yet (annotate with understudy.dev/verify=<any new value> to run one)`);
  else set1(ConditionType.Verified, "True", Reason.VerifyPassed, `last verify of every target found no difference`);

  // Ready: configured, mirrored, replicating, nothing degraded.
  const get = (t: string) => conds.find((c) => c.type === t)!;
  const blocking = [get(ConditionType.Degraded).status === "True" ? get(ConditionType.Degraded) : undefined, get(ConditionType.Replicating).status !== "True" ? get(ConditionType.Replicating) : undefined, get(ConditionType.Mirrored).status !== "True" ? get(ConditionType.Mirrored) : undefined].find(Boolean);
  if (blocking) set1(ConditionType.Ready, "False", blocking.reason, blocking.message);
  else set1(ConditionType.Ready, "True", Reason.Replicating, `every target holds a complete copy and takes changes as they happen`);

  const lag = Math.max(0, ...targets.map((t) => t.lagSeconds ?? 0));
  const queued = Math.max(0, ...targets.map((t) => t.queuedBytes ?? 0));
  const verifies = targets.map((t) => t.lastVerify).filter((v): v is VerifyResult => !!v);
  const newest = verifies.filter((v) => v.result !== "Running").sort((a, b) => (a.finishedAt ?? "").localeCompare(b.finishedAt ?? "")).at(-1) ?? finished(prev.lastVerify);
  const verifying = targets.filter((t) => t.verifying);
  // The pair's summary shows a running verify; per target, the finished one stays.
  const lastVerify = verifying.length ? { ...(newest ?? {}), target: verifying.map((t) => t.name).join(","), result: "Running" as const } : newest;
  const phase: ReplicationPairStatus["phase"] = pair.metadata.deletionTimestamp
    ? "Deleting"
    : degradedFinal
      ? "Degraded"
      : !set || set.state === "starting" || set.state === "scanning"
        ? "Configuring"
        : running.length
          ? "Mirroring"
          : get(ConditionType.Replicating).status === "True"
            ? "Replicating"
            : "Pending";
  const mirrorSummary = running.length
    ? `${Math.floor(((running[0]!.mirror!.bytesDone ?? 0) / Math.max(1, running[0]!.mirror!.bytesTotal ?? 0)) * 100)}% ${humanBytes(running[0]!.mirror!.bytesDone ?? 0)}/${humanBytes(running[0]!.mirror!.bytesTotal ?? 0)}`
    : set?.pathError
      ? "source path unavailable"
      : get(ConditionType.Mirrored).status === "True"
      ? "complete"
      : get(ConditionType.Mirrored).reason === Reason.MirrorFailed
        ? "failed"
        : "pending";

  const status: ReplicationPairStatus = {
    ...prev,
    observedGeneration: gen,
    phase,
    sourceAgent: src ? { name: src.name, version: src.agentVersion, setName: obs.setName } : prev.sourceAgent,
    lag: src ? humanSeconds(lag) : prev.lag,
    lagSeconds: src ? Math.round(lag * 1000) / 1000 : prev.lagSeconds,
    queued: src ? humanBytes(queued) : prev.queued,
    queuedBytes: src ? queued : prev.queuedBytes,
    lastSeq: set?.lastSeq ?? prev.lastSeq,
    files: set?.files ?? prev.files,
    bytes: set?.bytes ?? prev.bytes,
    mirror: mirrorSummary,
    lastVerify,
    targets,
    conditions: conds,
  };
  return { status: dropUndefined(status), transitions };
}

/** JSON without undefined members, so comparing old and new status is exact. */
export function dropUndefined<T>(v: T): T {
  return JSON.parse(JSON.stringify(v)) as T;
}
