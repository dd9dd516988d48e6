// Failover, cutover and failback of a ReplicationPair: the moves between
// status.activeSide (what serves now) and spec.activeSide (what should).
// Every step is idempotent and re-derived from what the agents report, so a
// reconcile cut short (operator killed) simply carries on next time:
//   failover/cutover  source → T: known-good gate on live data, (cutover: drain
//                     the source), promote T's replica at epoch+1 (its source
//                     is fenced from then on), actions, identity, record.
//   failed over       T serves; when the old source is reachable its set is
//                     removed and T replicates back into its original path
//                     (checksum mirror: only what changed during the outage).
//   failback          T → source: drain the reverse set, promote the source's
//                     copy at epoch+1, identity back, forward replication
//                     resumes (its checksum mirror finds nothing to send).
import { parseDuration, splitHostPort } from "../../common/config.ts";
import type { Logger } from "../../common/log.ts";
import type { ImageStatus, StatusResponse } from "../../agent/wire.ts";
import type { AgentDirectory } from "../agents.ts";
import { ConditionType, setCondition, timestamp, type Condition, type FailoverPolicy, type ResolvedPair, type ReplicationPairStatus } from "../api/v1alpha1/index.ts";
import { knownGood } from "./known-good.ts";
import { desiredSetSpec, setNameFor } from "./desired.ts";
import { dropUndefined, humanBytes, humanSeconds } from "./pair-status.ts";
import type { EventRecorder, IdentityMover, PairWriter, Result } from "./replicationpair.ts";

export interface FailoverOptions {
  agents: AgentDirectory;
  writer: PairWriter;
  events: EventRecorder;
  identity: IdentityMover;
  log: Logger;
  now: () => Date;
}

/** Reasons a person should look at (everything else in a move is progress). */
const WARNINGS = new Set(["FailoverRefused", "UnsupportedMove", "SourceUnreachable", "TargetUnreachable"]);


/** The host part of an agent address: where the service lives when that side is active. */
export function hostOf(address: string): string {
  return splitHostPort(address)?.host ?? address;
}

export class FailoverFlow {
  private readonly o: FailoverOptions;
  constructor(o: FailoverOptions) {
    this.o = o;
  }

  async reconcile(pair: ResolvedPair, policy: FailoverPolicy | undefined, active: string, want: string): Promise<Result> {
    if (active === "source" && want !== "source") return this.takeOver(pair, policy, want);
    if (active !== "source" && want === active) return this.failedOver(pair, policy, active);
    if (active !== "source" && want === "source") return this.failBack(pair, policy, active);
    return this.refuse(pair, "UnsupportedMove", `${active} serves now; fail back to source before making ${want} active`, 30_000);
  }

  private target(pair: ResolvedPair, name: string) {
    const t = pair.spec.targets.find((x) => x.name === name);
    if (!t) throw new Error(`no target named ${name}`);
    return t;
  }

  /** Short deadline: a failover must not wait on an agent that may be gone. */
  private async agentStatus(address: string, timeoutMs = 2000): Promise<{ status?: StatusResponse; error?: string }> {
    try {
      return { status: await this.o.agents.status(address, timeoutMs) };
    } catch (e) {
      return { error: (e as Error).message };
    }
  }

  private async write(pair: ResolvedPair, status: ReplicationPairStatus): Promise<void> {
    const s = dropUndefined({ ...status, observedGeneration: pair.metadata.generation });
    if (JSON.stringify(s) !== JSON.stringify(pair.status ?? {})) await this.o.writer.patchStatus(pair, s);
  }

  private cond(status: ReplicationPairStatus, pair: ResolvedPair, type: string, st: "True" | "False" | "Unknown", reason: string, message: string): void {
    status.conditions = (status.conditions ?? []).map((c) => ({ ...c }));
    if (setCondition(status.conditions as Condition[], { type, status: st, reason, message }, pair.metadata.generation ?? 0, this.o.now())) {
      this.o.events.event(pair, WARNINGS.has(reason) || (type === ConditionType.Degraded && st === "True") ? "Warning" : "Normal", reason, `${type}=${st}: ${message}`);
    }
  }

  private async refuse(pair: ResolvedPair, reason: string, message: string, retryMs = 2000): Promise<Result> {
    const status: ReplicationPairStatus = { ...(pair.status ?? {}) };
    this.cond(status, pair, "FailedOver", "False", reason, message);
    this.cond(status, pair, ConditionType.Ready, "False", reason, message);
    await this.write(pair, status);
    return { requeueAfterMs: retryMs };
  }

  /** Make target `name` the active side (failover when the source is down, cutover when it is alive). */
  private async takeOver(pair: ResolvedPair, policy: FailoverPolicy | undefined, name: string): Promise<Result> {
    const now = this.o.now();
    const setName = setNameFor(pair);
    const t = this.target(pair, name);
    // A source the health checks found down is not asked again (it may be a black hole).
    const src = pair.status?.health?.sourceDown ? { error: "source down (health checks)" } : await this.agentStatus(pair.spec.source.agent.address);
    let tv = await this.agentStatus(t.agent.address);
    const imageOf = (v: typeof tv) => (src.status ? v.status?.images.find((i) => i.source === src.status!.name && i.set === setName) : v.status?.images.find((i) => i.set === setName && i.source === pair.status?.sourceAgent?.name));
    let image = imageOf(tv);
    const recorded = pair.status?.targets?.find((x) => x.name === name);
    const set = src.status?.sets.find((s) => s.name === setName);
    let live = set?.targets.find((x) => x.address === t.agent.address);
    // With the source alive this is a planned cutover: the target must first hold every write made so far.
    if (src.status && set && live) {
      const fo = pair.status?.failover;
      if (policy?.spec.quiesce?.length && !(fo?.quiesced && fo.reason === "cutover" && fo.target === name && !fo.finishedAt)) {
        // Stop the application on the source first: nothing it writes afterwards could reach the target.
        const { done, failed } = await this.runActions(pair, policy.spec.quiesce, pair.spec.source.agent.address, "source");
        // The application may still be writing: a cutover now could leave its last writes behind. The source keeps serving.
        if (failed) return this.refuse(pair, "QuiesceFailed", `cutover to ${name} not started: quiesce on the source: ${failed}; replication from the source goes on (steps before it may have run). Fix it, or set that step's onFailure: Continue; the cutover is tried again in 30s`, 30_000);
        const status: ReplicationPairStatus = { ...(pair.status ?? {}), phase: "FailingOver", failover: { target: name, reason: "cutover", startedAt: timestamp(now), quiesced: true, actions: done } };
        this.cond(status, pair, "FailedOver", "False", "Quiesced", `cutover to ${name}: the source's application was stopped (${done.join(", ")}); final sync next`);
        await this.write(pair, status);
        return { requeueAfterMs: 100 };
      }
      const { lastSeq } = await this.o.agents.drain(pair.spec.source.agent.address, setName);
      const drained = (await this.agentStatus(pair.spec.source.agent.address)).status?.sets.find((s) => s.name === setName)?.targets.find((x) => x.address === t.agent.address);
      const acked = drained?.lastAckedSeq ?? 0;
      if (acked >= lastSeq) {
        // The gate compares what the source saw acknowledged with what the target applied:
        // both as of now, after the drain (a target status from before it would show a false gap).
        this.o.agents.invalidate(t.agent.address);
        tv = await this.agentStatus(t.agent.address);
        image = imageOf(tv);
        live = drained;
      }
      if (acked < lastSeq) {
        const status: ReplicationPairStatus = { ...(pair.status ?? {}), phase: "FailingOver", failover: fo && !fo.finishedAt && fo.target === name ? { ...fo, reason: "cutover" } : { target: name, reason: "cutover", startedAt: timestamp(now) } };
        this.cond(status, pair, "FailedOver", "False", "Draining", `cutover to ${name}: waiting for ${lastSeq - acked} change(s) to be acknowledged`);
        await this.write(pair, status);
        return { requeueAfterMs: 250 };
      }
    }
    const gate = knownGood({ recorded: recorded && live ? { ...recorded, lastAckedSeq: Math.max(recorded.lastAckedSeq ?? 0, live.lastAckedSeq), lagSeconds: live.lagSeconds } : recorded, image, imageError: tv.error, policy, now });
    if (!gate.ok) return this.refuse(pair, "FailoverRefused", `${name} is not known good: ${gate.failed.join("; ")}`);

    const epoch = (pair.status?.epoch ?? 0) + 1;
    const promoted = await this.o.agents.promote(t.agent.address, { source: image!.source, set: setName, epoch });
    // Promoted already: a failed action cannot undo the failover, it only stops the actions after it.
    const { done: actions } = await this.runActions(pair, policy?.spec.actions ?? [], t.agent.address, name);
    const serviceAddress = await this.moveIdentity(pair, policy, t.agent.address, name);
    // The old source is fenced by the epoch already; stop its set too when it is there to ask.
    if (src.status) await this.o.agents.removeSet(pair.spec.source.agent.address, setName, true).catch(() => undefined);
    const downSince = pair.status?.health?.sourceDownSince;
    const prevFo = pair.status?.failover;
    const startedAt = prevFo?.startedAt && prevFo.target === name && !prevFo.finishedAt ? prevFo.startedAt : timestamp(now);
    // Recovery counts from the failure's first evidence: the last time the source was seen up.
    const from = downSince ? Date.parse(downSince) : Date.parse(startedAt);
    const finished = this.o.now();
    const recoverySeconds = Math.round((finished.getTime() - from) / 100) / 10;
    const status: ReplicationPairStatus = {
      ...(pair.status ?? {}),
      phase: "FailedOver",
      activeSide: name,
      serviceAddress,
      epoch,
      failover: { target: name, reason: src.status ? "cutover" : "source down", sourceDownSince: downSince, startedAt, finishedAt: timestamp(finished), recoverySeconds, appliedSeq: promoted.durableSeq, actions: [...(prevFo?.target === name && !prevFo.finishedAt ? (prevFo.actions ?? []) : []), ...actions], quiesced: prevFo?.quiesced && !prevFo.finishedAt ? true : undefined },
    };
    newDirection(status, pair, name, { appliedSeq: promoted.durableSeq, sourceUp: !!src.status });
    this.cond(status, pair, "FailedOver", "True", src.status ? "CutOver" : "FailedOver", `${name} serves at epoch ${epoch} with every change up to ${promoted.durableSeq}; the source is fenced; ${src.status ? "cut over" : `recovered ${recoverySeconds}s after the source was last seen (${downSince ?? startedAt})`}`);
    this.cond(status, pair, ConditionType.Ready, "False", "FailedOver", `${name} serves; no copy until the source returns and is brought up to date`);
    this.directionConditions(status, pair, name, { sourceUp: !!src.status });
    this.o.log.warn({ pair: `${pair.metadata.namespace}/${pair.metadata.name}`, target: name, epoch, appliedSeq: promoted.durableSeq }, "failed over");
    await this.write(pair, status);
    return { requeueAfterMs: 1000 };
  }

  /** T serves: keep the old source fenced and, once reachable, brought up to date from T. */
  private async failedOver(pair: ResolvedPair, policy: FailoverPolicy | undefined, name: string, failingBack = false): Promise<Result> {
    const setName = setNameFor(pair);
    const t = this.target(pair, name);
    const srcAddr = pair.spec.source.agent.address;
    const src = await this.agentStatus(srcAddr);
    const tv = await this.agentStatus(t.agent.address);
    const status: ReplicationPairStatus = { ...(pair.status ?? {}), phase: failingBack ? "FailingBack" : "FailedOver" };
    if (!failingBack && policy?.spec.serviceIdentity && status.serviceAddress !== hostOf(t.agent.address)) status.serviceAddress = await this.moveIdentity(pair, policy, t.agent.address, name);
    if (failingBack) this.cond(status, pair, "FailedOver", "True", "FailbackWaiting", `failback waits until the source is reachable and brought up to date from ${name}`);
    if (!tv.status) {
      this.cond(status, pair, ConditionType.Degraded, "True", "TargetUnreachable", `the active side ${name} (${t.agent.address}) is unreachable: ${tv.error}`);
      await this.write(pair, status);
      return { requeueAfterMs: 2000 };
    }
    const srcName = pair.status?.sourceAgent?.name;
    const image = tv.status.images.find((i) => i.set === setName && (!srcName || i.source === srcName));
    // The old source's health as it is now (the checks that found it down stopped at the failover).
    if (status.health) status.health = { policy: status.health.policy, sourceReachable: !!src.status, missedBeats: src.status ? 0 : status.health.missedBeats, sourceDown: !src.status, sourceDownSince: src.status ? undefined : status.health.sourceDownSince };
    if (!src.status) {
      status.reverse = { state: "source unreachable", mirrored: false };
      newDirection(status, pair, name, { appliedSeq: image?.appliedSeq, sourceUp: false });
      this.cond(status, pair, ConditionType.Degraded, "True", "SourceUnreachable", `${name} serves without a copy: the original source ${srcAddr} is unreachable (${src.error})`);
      this.cond(status, pair, ConditionType.Ready, "False", "FailedOver", `${name} serves; no copy until the source returns`);
      this.directionConditions(status, pair, name, { sourceUp: false });
      await this.write(pair, status);
      return { requeueAfterMs: 2000 };
    }
    // The old source is back: its forward set (restarted from its own state) must not run.
    if (src.status.sets.some((s) => s.name === setName)) {
      await this.o.agents.removeSet(srcAddr, setName, true);
      this.o.events.event(pair, "Normal", "SourceFenced", `the returning source ${srcAddr} no longer replicates ${setName}; it will receive ${name}'s changes instead`);
    }
    // Reverse replication: T's replica → the source's original path.
    const back = reverseSpec(pair, image, srcAddr, status.epoch ?? 0);
    await this.o.agents.mapImage(srcAddr, { source: tv.status.name, set: setName, path: pair.spec.replicationSet.path, remove: false });
    const cur = tv.status.sets.find((s) => s.name === setName);
    if (!cur) {
      await this.o.agents.configureSet(t.agent.address, back);
      // The new reverse set mirrors by itself with checksums; the policy may ask for a full copy instead.
      const full = policy?.spec.failback?.mirrorMode === "full" && (await this.o.agents.mirror(t.agent.address, { set: setName, target: srcAddr, mode: "full" }).then(() => true, (e: Error) => (this.o.log.warn({ err: e.message }, "full reverse mirror not started; the checksum mirror runs"), false)));
      this.o.events.event(pair, "Normal", "ReverseStarted", `${name} replicates back to ${srcAddr} (${full ? "full mirror first" : "checksum mirror first: only what changed while it was away travels"})`);
    }
    const rt = cur?.targets.find((x) => x.address === srcAddr);
    const mirrored = !!rt && !rt.mirror?.active && (rt.mirror?.result === "ok" || (rt.mirror?.startedAt === 0 && (rt.state === "idle" || rt.state === "replicating")));
    status.reverse = { state: rt?.state ?? "configuring", mirrored, lagSeconds: rt?.lagSeconds, lastAckedSeq: rt?.lastAckedSeq, lastSeq: cur?.lastSeq, lastError: rt?.lastError || undefined };
    newDirection(status, pair, name, { appliedSeq: image?.appliedSeq, sourceUp: true, queuedBytes: rt ? (rt.queuedBytes?.memory ?? 0) + (rt.queuedBytes?.disk ?? 0) : undefined, mirror: rt?.mirror?.active ? `${Math.floor(((rt.mirror.bytesDone ?? 0) / Math.max(1, rt.mirror.bytesTotal ?? 0)) * 100)}% ${humanBytes(rt.mirror.bytesDone ?? 0)}/${humanBytes(rt.mirror.bytesTotal ?? 0)}` : mirrored ? "complete" : "pending" });
    this.cond(status, pair, ConditionType.Degraded, "False", "Recovered", `${name} serves and the original source is reachable`);
    this.directionConditions(status, pair, name, { sourceUp: true, reverseState: rt?.state, reverseError: rt?.lastError || undefined, mirrored, mirrorActive: !!rt?.mirror?.active });
    if (mirrored) this.cond(status, pair, ConditionType.Ready, "True", "FailedOverProtected", `${name} serves and replicates back to the original source; set spec.activeSide=source to fail back`);
    else this.cond(status, pair, ConditionType.Ready, "False", "ReverseMirroring", `${name} serves; bringing the original source up to date (${rt?.mirror?.active ? `${rt.mirror.filesDone}/${rt.mirror.filesTotal} files` : rt?.state ?? "starting"})`);
    await this.write(pair, status);
    return { requeueAfterMs: mirrored ? 5000 : 1000 };
  }

  /** source becomes active again: final sync from T, promote the source's copy, identity back. */
  private async failBack(pair: ResolvedPair, policy: FailoverPolicy | undefined, name: string): Promise<Result> {
    const setName = setNameFor(pair);
    const t = this.target(pair, name);
    const srcAddr = pair.spec.source.agent.address;
    const src = await this.agentStatus(srcAddr);
    const tv = await this.agentStatus(t.agent.address);
    if (!src.status || !tv.status) {
      await this.failedOver(pair, policy, name, true);
      return { requeueAfterMs: 2000 };
    }
    const rev = tv.status.sets.find((s) => s.name === setName);
    const rt = rev?.targets.find((x) => x.address === srcAddr);
    const mirrored = !!rt && !rt.mirror?.active && (rt.mirror?.result === "ok" || rt.state === "idle" || rt.state === "replicating");
    const status: ReplicationPairStatus = { ...(pair.status ?? {}), phase: "FailingBack" };
    if (!rev || !rt || !mirrored) {
      // Not brought up to date yet: the failed-over state does that; it reports, and we look again soon.
      await this.failedOver(pair, policy, name, true);
      return { requeueAfterMs: 1000 };
    }
    if (policy?.spec.quiesce?.length && !(pair.status?.failover?.quiesced && pair.status.failover.reason === "failback")) {
      const { done, failed } = await this.runActions(pair, policy.spec.quiesce, t.agent.address, name);
      if (failed) {
        this.cond(status, pair, "FailedOver", "True", "QuiesceFailed", `failback to the source not started: quiesce on ${name}: ${failed}; ${name} stays the active side (steps before it may have run). Fix it, or set that step's onFailure: Continue; the failback is tried again in 30s`);
        await this.write(pair, status);
        return { requeueAfterMs: 30_000 };
      }
      status.failover = { ...(pair.status?.failover ?? {}), reason: "failback", quiesced: true, actions: done };
      this.cond(status, pair, "FailedOver", "True", "Quiesced", `failback: the application on ${name} was stopped (${done.join(", ")}); final sync next`);
      await this.write(pair, status);
      return { requeueAfterMs: 100 };
    }
    const { lastSeq } = await this.o.agents.drain(t.agent.address, setName);
    const acked = (await this.agentStatus(t.agent.address)).status?.sets.find((s) => s.name === setName)?.targets.find((x) => x.address === srcAddr)?.lastAckedSeq ?? 0;
    if (acked < lastSeq) {
      this.cond(status, pair, "FailedOver", "True", "Draining", `failback: waiting for ${lastSeq - acked} change(s) from ${name} to reach the source`);
      await this.write(pair, status);
      return { requeueAfterMs: 250 };
    }
    const epoch = (pair.status?.epoch ?? 0) + 1;
    await this.o.agents.promote(srcAddr, { source: tv.status.name, set: setName, epoch });
    await this.o.agents.removeSet(t.agent.address, setName, true);
    await this.o.agents.mapImage(srcAddr, { source: tv.status.name, set: setName, path: "", remove: true });
    const serviceAddress = await this.moveIdentity(pair, policy, srcAddr, "source");
    const next: ReplicationPairStatus = { ...status, failover: { ...(status.failover ?? {}), quiesced: false }, phase: "Configuring", activeSide: "source", serviceAddress, epoch, reverse: undefined, health: { ...(status.health ?? {}), sourceDown: false, missedBeats: 0, sourceDownSince: undefined } };
    this.cond(next, pair, "FailedOver", "False", "FailedBack", `the source serves again at epoch ${epoch}; replication to ${name} resumes`);
    // What held for the reverse direction does not for the forward one: it restarts with a mirror, and needs a verify of its own.
    this.cond(next, pair, ConditionType.Mirrored, "False", "MirrorPending", `replication from the source to ${pair.spec.targets.map((t) => t.name).join(", ")} restarts with a checksum mirror`);
    this.cond(next, pair, ConditionType.Verified, "Unknown", "NeverVerified", "no verify since the failback yet");
    await this.write(pair, next);
    return { requeueAfterMs: 500 };
  }

  /**
   * Replicating, Mirrored and Verified while a target serves: they describe
   * the new direction (the active target → the original source), not the
   * forward replication that stopped at the failover.
   */
  private directionConditions(status: ReplicationPairStatus, pair: ResolvedPair, name: string, r: { sourceUp: boolean; reverseState?: string; reverseError?: string; mirrored?: boolean; mirrorActive?: boolean }): void {
    const src = pair.spec.source.agent.address;
    if (!r.sourceUp) {
      this.cond(status, pair, ConditionType.Replicating, "False", "OriginalSourceAway", `${name} serves; nothing replicates until the original source ${src} returns (then ${name} replicates back to it)`);
      this.cond(status, pair, ConditionType.Mirrored, "False", "OriginalSourceAway", `no copy of ${name}'s data exists elsewhere until the original source ${src} returns`);
    } else {
      const st = r.reverseState ?? "configuring";
      if (st === "idle" || st === "replicating" || (st === "mirroring" && !r.reverseError)) this.cond(status, pair, ConditionType.Replicating, "True", "ReverseReplicating", `${name} replicates back to the original source ${src}`);
      else this.cond(status, pair, ConditionType.Replicating, "False", st === "configuring" ? "Configuring" : "ReverseDegraded", `replication ${name} → ${src} is ${st}${r.reverseError ? `: ${r.reverseError}` : ""}`);
      if (r.mirrored) this.cond(status, pair, ConditionType.Mirrored, "True", "ReverseMirrorComplete", `the original source ${src} holds a complete copy of ${name}'s data`);
      else this.cond(status, pair, ConditionType.Mirrored, "False", "ReverseMirroring", `bringing the original source ${src} up to date from ${name}${r.mirrorActive ? " (mirror running)" : ""}`);
    }
    this.cond(status, pair, ConditionType.Verified, "Unknown", "NotVerifiedSinceFailover", `no verify since ${name} took over; verifies from before describe the old direction (after failback the operator verifies the new one)`);
  }

  /** Run a policy's action list on an agent; one line per action for status. */
  /**
   * Run actions in order on `address`. An action that fails (non-zero exit,
   * timeout, agent unreachable) with onFailure Stop (the default) ends the
   * list: the ones after it are skipped, as a shell script with `set -e`
   * would (an image check that fails must not be followed by starting the
   * VMs on it). `failed` names the action that stopped the list.
   */
  private async runActions(pair: ResolvedPair, list: { name: string; command: string[]; timeout?: string; onFailure?: "Stop" | "Continue" }[], address: string, side: string): Promise<{ done: string[]; failed?: string }> {
    const done: string[] = [];
    for (const [i, a] of list.entries()) {
      const r = await this.o.agents.runCommand(address, a.command, parseDuration(a.timeout ?? "60s")).catch((e: Error) => ({ exitCode: -1, output: e.message }));
      const last = r.output.trim().split("\n").slice(-1)[0] ?? "";
      done.push(`${a.name}: exit ${r.exitCode}${r.exitCode ? ` (${last})` : ""}`);
      this.o.events.event(pair, r.exitCode === 0 ? "Normal" : "Warning", r.exitCode === 0 ? "ActionDone" : "ActionFailed", `${a.name} on ${side}: exit ${r.exitCode}${r.output ? `: ${r.output.slice(-300)}` : ""}`);
      if (r.exitCode !== 0 && (a.onFailure ?? "Stop") === "Stop") {
        const skipped = list.slice(i + 1).map((x) => x.name);
        for (const n of skipped) done.push(`${n}: skipped (${a.name} failed)`);
        if (skipped.length) this.o.events.event(pair, "Warning", "ActionsSkipped", `${skipped.join(", ")} on ${side} not run: ${a.name} failed (exit ${r.exitCode}) and its onFailure is Stop`);
        return { done, failed: `${a.name} failed (exit ${r.exitCode}${last ? `: ${last}` : ""})` };
      }
    }
    return { done };
  }

  /**
   * Point the service identity at `address`'s host. Never fails the move it is
   * part of (the new side serves either way): a failure is an event, and
   * status.serviceAddress stays unset so the next reconcile tries again.
   */
  private async moveIdentity(pair: ResolvedPair, policy: FailoverPolicy | undefined, address: string, side: string): Promise<string | undefined> {
    const id = policy?.spec.serviceIdentity;
    const host = hostOf(address);
    try {
      if (id?.service) {
        await this.o.identity.pointService(pair.metadata.namespace!, id.service.name, id.service.port, host);
        this.o.events.event(pair, "Normal", "IdentityMoved", `Service ${id.service.name} now points at ${side} (${host})`);
        return host;
      }
      if (id?.hook) {
        const r = await this.o.agents.runCommand(address, id.hook.command, 60_000);
        this.o.events.event(pair, r.exitCode === 0 ? "Normal" : "Warning", r.exitCode === 0 ? "IdentityMoved" : "IdentityHookFailed", `identity hook on ${side}: exit ${r.exitCode}${r.output ? `: ${r.output.slice(-300)}` : ""}`);
        return r.exitCode === 0 ? host : undefined;
      }
    } catch (e) {
      this.o.events.event(pair, "Warning", "IdentityMoveFailed", `could not point the service identity at ${side} (${host}): ${(e as Error).message}; retrying`);
    }
    return undefined;
  }
}

/** The set T runs to replicate its (promoted) replica back into the source's original path. */
export function reverseSpec(pair: ResolvedPair, image: ImageStatus | undefined, sourceAddress: string, epoch: number) {
  const fwd = desiredSetSpec(pair);
  return { ...fwd, path: image?.path ?? "", targets: [sourceAddress], epoch, verifyIntervalMs: 0 };
}

/**
 * The status fields that describe replication, rewritten for the new
 * direction once `active` serves: it holds what it was promoted with, the
 * other targets wait for a failback, and lag/queued are those of the reverse
 * replication (none while the original source is away). Nothing from before
 * the failover is left to look current (acked/applied/lag/verify of the
 * stopped forward replication).
 */
export function newDirection(status: ReplicationPairStatus, pair: ResolvedPair, active: string, r: { appliedSeq?: number; sourceUp: boolean; queuedBytes?: number; mirror?: string }): void {
  const prev = new Map((status.targets ?? []).map((t) => [t.name, t]));
  status.targets = pair.spec.targets.map((t) =>
    t.name === active
      ? { name: t.name, address: t.agent.address, state: "serving", appliedSeq: r.appliedSeq ?? prev.get(t.name)?.appliedSeq }
      : { name: t.name, address: t.agent.address, state: "waiting", lastError: `not replicated while ${active} serves; fail back to resume` },
  );
  const rev = status.reverse;
  const lag = r.sourceUp ? rev?.lagSeconds : undefined;
  status.lag = lag !== undefined ? humanSeconds(lag) : undefined;
  status.lagSeconds = lag;
  status.queued = r.sourceUp && r.queuedBytes !== undefined ? humanBytes(r.queuedBytes) : undefined;
  status.queuedBytes = r.sourceUp ? r.queuedBytes : undefined;
  status.mirror = r.sourceUp ? r.mirror : undefined;
  status.lastSeq = rev?.lastSeq;
  status.lastVerify = undefined;
  // The gate's verdicts were about the stopped direction; failback brings its own.
  status.knownGood = undefined;
}
