// The ReplicationPair reconciler: from a pair (read from the informer's cache)
// and what its agents report, to the source agent running the pair's set and a
// status that tells the truth. One idempotent pass per key; it never sleeps,
// every agent call has a deadline, and it returns when to look again.
import { AgentCallError } from "../../agent/control-client.ts";
import { setSpecHash } from "../../agent/wire.ts";
import type { Logger } from "../../common/log.ts";
import type { AgentDirectory } from "../agents.ts";
import { MIRROR_ANNOTATION, MIRROR_MODE_ANNOTATION, PAIR_FINALIZER, Reason, VERIFY_ANNOTATION, VERIFY_REPAIR_ANNOTATION, type ReplicationPair, type ReplicationPairStatus } from "../api/v1alpha1/index.ts";
import { computeStatus, type AgentView } from "./pair-status.ts";
import { desiredSetSpec, setNameFor } from "./desired.ts";
import { FailoverFlow } from "./failover.ts";
import { knownGood, pickTarget } from "./known-good.ts";
import { parseDuration } from "../../common/config.ts";
import { setCondition, type Condition, type EndpointStatus, type FailoverPolicy, type ReplicationPair as Pair, type ResolvedPair } from "../api/v1alpha1/index.ts";
import { provisionedEndpoints, resolvePair, type EndpointProvisioner } from "./endpoints.ts";
import { conditionReason } from "../ec2/errors.ts";
import * as grpc from "@grpc/grpc-js";

/** Writes to the API server (the real one is operator/kube.ts; tests may fake it). */
export interface PairWriter {
  /** Returns the pair's new resourceVersion. */
  addFinalizer(pair: ReplicationPair): Promise<string | undefined>;
  removeFinalizer(pair: ReplicationPair): Promise<void>;
  /** Returns the pair's new resourceVersion (fakes may return nothing). */
  patchStatus(pair: ReplicationPair, status: ReplicationPairStatus): Promise<string | undefined | void>;
  /** Automatic failover declares its decision in spec.activeSide. */
  setActiveSide(pair: ReplicationPair, side: string): Promise<void>;
}

/** Moves the service identity to the active side (operator/kube.ts: an EndpointSlice). */
export interface IdentityMover {
  pointService(namespace: string, service: string, port: number | undefined, address: string): Promise<void>;
}

export interface EventRecorder {
  event(obj: ReplicationPair, type: "Normal" | "Warning", reason: string, message: string): void;
}

export interface Result {
  requeueAfterMs?: number;
}

export interface PairReconcilerOptions {
  get: (namespace: string, name: string) => ReplicationPair | undefined;
  writer: PairWriter;
  agents: AgentDirectory;
  events: EventRecorder;
  log: Logger;
  /** How often a healthy pair's status is refreshed. */
  statusIntervalMs: number;
  /** The FailoverPolicy selecting a pair, if any. */
  policyFor?: (pair: ReplicationPair) => FailoverPolicy | undefined;
  identity?: IdentityMover;
  /** ec2 and ssh endpoints (absent: pairs with such endpoints wait, saying why) */
  provisioners?: EndpointProvisioner[];
  now?: () => Date;
}

/** What provisioning found this pass. */
interface Provisioned {
  endpoints: EndpointStatus[];
  persist: boolean;
  requeueAfterMs?: number;
}

/** Consecutive failed checks of a pair's source, from the operator's side. */
interface Health {
  missed: number;
  firstMissAt?: number;
  /** The last check the source answered: the failure happened after it (its first evidence). */
  lastOkAt?: number;
}

const FAST_MS = 2000;
/** A verify the operator started for the failover gate is not started again sooner than this. */
const AUTO_VERIFY_RETRY_MS = 10 * 60_000;

const WARNING_REASONS = new Set<string>([Reason.SourceUnreachable, Reason.TargetUnreachable, Reason.TargetDegraded, Reason.TargetRefused, Reason.ConfigRejected, Reason.VersionMismatch, Reason.SetFailed, Reason.MirrorFailed, Reason.DifferencesFound, Reason.VerifyError]);

export class ReplicationPairReconciler {
  private readonly o: PairReconcilerOptions;
  private readonly flow: FailoverFlow;
  private readonly health = new Map<string, Health>();
  /** When the operator last started a verify for the gate, by "<pair key>|<target>". */
  private readonly autoVerified = new Map<string, number>();
  constructor(o: PairReconcilerOptions) {
    this.o = o;
    this.flow = new FailoverFlow({ agents: o.agents, writer: o.writer, events: o.events, identity: o.identity ?? { pointService: async () => undefined }, log: o.log, now: () => this.now() });
  }

  private now(): Date {
    return this.o.now?.() ?? new Date();
  }

  async reconcile(key: string): Promise<Result> {
    const t0 = Date.now();
    const [namespace, name] = key.split("/") as [string, string];
    const cached = this.o.get(namespace, name);
    if (!cached) {
      // deleted, and its finalizer already done: forget what was kept about it
      this.health.delete(key);
      this.forgetVerifies(key);
      return {};
    }
    const pair = structuredClone(cached); // never modify the informer's cache
    const log = this.o.log.child({ pair: key });
    const setName = setNameFor(pair);

    if (pair.metadata.deletionTimestamp) return this.finalize(pair, setName, log);
    if (!pair.metadata.finalizers?.includes(PAIR_FINALIZER)) {
      const rv = await this.o.writer.addFinalizer(pair);
      pair.metadata = { ...pair.metadata, resourceVersion: rv ?? pair.metadata.resourceVersion, finalizers: [...(pair.metadata.finalizers ?? []), PAIR_FINALIZER] };
    }
    const policy = this.o.policyFor?.(pair);
    const active = pair.status?.activeSide ?? "source";
    const want = pair.spec.activeSide ?? "source";

    // 0. Agents the operator puts in place itself (ec2 instances, SSH installs).
    const prov = await this.provision(pair, active, want);
    if (prov.persist) {
      await this.o.writer.patchStatus(pair, { ...pair.status, endpoints: prov.endpoints });
      // soon, not at once: the informer's copy should carry the write by then (else the write after it conflicts, and is retried)
      return { requeueAfterMs: 250 };
    }
    if (prov.endpoints.length && JSON.stringify(prov.endpoints) !== JSON.stringify(pair.status?.endpoints ?? [])) {
      // What provisioning found is written at once, so the steps below compare with what is stored.
      const status = { ...pair.status, endpoints: prov.endpoints };
      const rv = await this.o.writer.patchStatus(pair, status);
      pair.status = status;
      if (rv) pair.metadata = { ...pair.metadata, resourceVersion: rv };
    }
    const { pair: resolved, pending } = resolvePair(pair, prov.endpoints);
    const blocked = !resolved ? "the source" : resolved.spec.targets.length === 0 ? "every target" : want !== active && !resolved.spec.targets.some((t) => t.name === want) && want !== "source" ? want : undefined;
    const wantEndpoint = prov.endpoints.find((e) => e.name === want && want !== active);
    if (blocked || !resolved || (wantEndpoint && wantEndpoint.phase !== "Ready")) {
      // Nothing to replicate with yet, or the side to take over is not ready (an instance being resized).
      const why = blocked ? `waiting for ${blocked}: ${pending.join("; ")}` : `waiting for ${want} to be ready: ${wantEndpoint!.phase} (${wantEndpoint!.message ?? ""})`;
      const status = { ...pair.status, endpoints: prov.endpoints, activeSide: active };
      if (!pair.status?.phase || pair.status.phase === "Pending") status.phase = "Provisioning";
      const conds = (status.conditions = structuredClone(pair.status?.conditions ?? []) as Condition[]);
      this.provisionedCondition(pair, conds, prov.endpoints);
      setCondition(conds, { type: "Ready", status: "False", reason: Reason.Provisioning, message: why }, pair.metadata.generation ?? 0, this.now());
      if (JSON.stringify(status) !== JSON.stringify(pair.status ?? {})) await this.o.writer.patchStatus(pair, status);
      return { requeueAfterMs: Math.min(prov.requeueAfterMs ?? FAST_MS, this.o.statusIntervalMs) };
    }
    if (active !== "source" || want !== "source") {
      this.health.delete(key);
      // The direction changes: verifies made for the old one say nothing about the new (after failback the gate wants its own).
      this.forgetVerifies(key);
      const r = await this.flow.reconcile(resolved, policy, active, want);
      return { requeueAfterMs: Math.min(r.requeueAfterMs ?? this.o.statusIntervalMs, prov.requeueAfterMs ?? Infinity) };
    }
    return this.replicate(key, resolved, policy, prov, pending, t0, log);
  }

  /** Run each provisioned endpoint's provisioner one step (all in parallel); events as they come. */
  private async provision(pair: Pair, active: string, want: string): Promise<Provisioned> {
    const wanted = provisionedEndpoints(pair);
    if (wanted.length === 0) return { endpoints: [], persist: false };
    const prev = new Map((pair.status?.endpoints ?? []).map((e) => [e.name, e]));
    const results = await Promise.all(wanted.map(async ({ name, kind }) => {
      const p = this.o.provisioners?.find((x) => x.kind === kind);
      if (!p) {
        const flags = kind === "ssh" ? "--ca-dir and --agent-bundle" : "--ca-dir, --agent-bundle, --enroll-url and --enroll-listen";
        return { status: { name, kind, phase: "Failed", message: `this operator does not provision ${kind} endpoints: start it with ${flags}` } as EndpointStatus, requeueAfterMs: this.o.statusIntervalMs };
      }
      const r = await p.reconcile(pair, name, prev.get(name), want === name || active === name);
      for (const e of r.events ?? []) this.o.events.event(pair, e.type, e.reason, `${name}: ${e.message}`);
      return r;
    }));
    const requeue = results.map((r) => r.requeueAfterMs);
    return { endpoints: results.map((r) => r.status), persist: results.some((r) => "persist" in r && r.persist === true), requeueAfterMs: Math.min(...requeue) };
  }

  /** Condition Provisioned: every ec2/ssh endpoint has its agent, or which one does not and why. */
  private provisionedCondition(pair: Pair, conds: Condition[], endpoints: EndpointStatus[]): void {
    if (endpoints.length === 0) return;
    const notReady = endpoints.filter((e) => !e.agentAddress);
    const err = endpoints.find((e) => e.lastError || e.phase === "Failed");
    const c = notReady.length === 0 && !err
      ? { status: "True" as const, reason: Reason.Provisioned, message: endpoints.map((e) => `${e.name}: ${e.message ?? e.phase}`).join("; ") }
      : { status: "False" as const, reason: err?.lastError?.code ? conditionReason(err.lastError.code) : Reason.Provisioning, message: (err ? [err] : notReady).map((e) => `${e.name}: ${e.phase}${e.message ? ` (${e.message})` : ""}`).join("; ") };
    setCondition(conds, { type: "Provisioned", ...c }, pair.metadata.generation ?? 0, this.now());
  }

  /** Steady state, the source serving: its agent runs the set, status tells the truth, health is watched. */
  private async replicate(key: string, pair: ResolvedPair, policy: FailoverPolicy | undefined, prov: Provisioned, pending: string[], t0: number, log: Logger): Promise<Result> {
    const setName = setNameFor(pair);
    const source = pair.spec.source.agent.address;
    // 1. The source agent runs the desired set.
    const view: AgentView = {};
    let configError: string | undefined;
    let versionMismatch = false;
    let desired: ReturnType<typeof desiredSetSpec> | undefined;
    let hash = "";
    try {
      desired = desiredSetSpec(pair);
      hash = setSpecHash(desired);
    } catch (e) {
      configError = `spec cannot be turned into a replication set: ${(e as Error).message}`;
    }
    // Under a FailoverPolicy a check must not take longer than the health interval.
    const checkMs = policy ? Math.max(1000, parseDuration(policy.spec.healthCheck?.interval ?? "1s")) : undefined;
    try {
      view.status = await this.o.agents.status(source, checkMs);
    } catch (e) {
      view.error = (e as Error).message;
    }
    // 1. What the targets say about their replicas (and which version they run).
    const targets = new Map<string, AgentView>();
    await Promise.all(pair.spec.targets.map(async (t) => {
      try {
        targets.set(t.agent.address, { status: await this.o.agents.status(t.agent.address, checkMs) });
      } catch (e) {
        targets.set(t.agent.address, { error: (e as Error).message });
      }
    }));

    // Both sides run one version: an agent upgraded on one side only is not configured until the other matches.
    if (view.status && desired && !configError) {
      const versions = [[`source ${view.status.name}`, view.status.agentVersion] as const, ...pair.spec.targets.flatMap((t) => {
        const v = targets.get(t.agent.address)?.status;
        return v ? [[`target ${t.name} (${v.name})`, v.agentVersion] as const] : [];
      })];
      if (new Set(versions.map(([, v]) => v)).size > 1) {
        configError = `agent versions differ: ${versions.map(([who, v]) => `${who} runs ${v}`).join(", ")}; upgrade every side to the same version (the set is not reconfigured until they match)`;
        versionMismatch = true;
      }
    }
    if (view.status && desired && !configError) {
      try {
        const current = view.status.sets.find((s) => s.name === setName);
        if (current && !current.managed) throw new Error(`source agent ${source} has a set named ${setName} in its config file`);
        if (current?.specHash !== hash) {
          const r = await this.o.agents.configureSet(source, desired);
          if (r.result !== "unchanged") {
            log.info({ result: r.result, set: setName }, "configured the source agent");
            this.o.events.event(pair, "Normal", r.result === "created" ? "SetCreated" : "SetUpdated", `replication set ${setName} ${r.result} on source agent ${source} (${desired.path} → ${desired.targets.join(", ")})`);
          }
          if (current) {
            // A changed set restarted: its status is read again (a new one is simply "configuring" until the next look).
            this.o.agents.invalidate(source);
            view.status = await this.o.agents.status(source);
          }
        }
      } catch (e) {
        // Unreachable now: try again later. Anything else (bad path, not allowed …) is for a person to fix.
        if (e instanceof AgentCallError && (e.code === grpc.status.UNAVAILABLE || e.code === grpc.status.DEADLINE_EXCEEDED)) view.error = e.message;
        else configError = (e as Error).message;
      }
    }

    // 2. Requests made through annotations, each handled once.
    const handled: Partial<ReplicationPairStatus> = {};
    if (view.status && !configError) {
      const ann = pair.metadata.annotations ?? {};
      const mirrorReq = ann[MIRROR_ANNOTATION];
      if (mirrorReq && mirrorReq !== pair.status?.lastHandledMirrorRequest && view.status.sets.some((s) => s.name === setName)) {
        const mode = ann[MIRROR_MODE_ANNOTATION] ?? pair.spec.mirror?.mode ?? "checksum";
        try {
          await this.o.agents.mirror(source, { set: setName, target: "", mode });
          this.o.events.event(pair, "Normal", "MirrorStarted", `${mode} mirror to every target started (request ${mirrorReq})`);
        } catch (e) {
          this.o.events.event(pair, "Warning", "MirrorRefused", `mirror request ${mirrorReq}: ${(e as Error).message}`);
        }
        handled.lastHandledMirrorRequest = mirrorReq;
      }
      const verifyReq = ann[VERIFY_ANNOTATION];
      const set = view.status.sets.find((s) => s.name === setName);
      if (verifyReq && verifyReq !== pair.status?.lastHandledVerifyRequest && set && set.state === "replicating") {
        const repair = ann[VERIFY_REPAIR_ANNOTATION] === "true";
        const started: string[] = [];
        for (const t of pair.spec.targets) {
          try {
            await this.o.agents.startVerify(source, { set: setName, target: t.agent.address, repair });
            started.push(t.name);
          } catch (e) {
            this.o.events.event(pair, "Warning", "VerifyRefused", `verify of ${t.name}: ${(e as Error).message}`);
          }
        }
        if (started.length) this.o.events.event(pair, "Normal", "VerifyStarted", `verify${repair ? " with repair" : ""} of ${started.join(", ")} started (request ${verifyReq})`);
        handled.lastHandledVerifyRequest = verifyReq;
      }
      if (handled.lastHandledMirrorRequest || handled.lastHandledVerifyRequest) view.status = await this.o.agents.status(source).catch(() => view.status);
    }

    // 3. A policy whose gate needs a verify gets one without anyone asking: once a target
    //    holds a complete copy, and again before the last one ages out (or after a failback).
    if (view.status && !configError && policy && (policy.spec.knownGood?.requireVerify ?? true)) {
      if (await this.verifyForGate(key, pair, policy, view.status, log)) view.status = await this.o.agents.status(source).catch(() => view.status);
    }

    // 4. Status, and an Event for each condition that flipped.
    const { status, transitions } = computeStatus(pair, { now: this.now(), setName, source: view, configError, ...(versionMismatch ? { configReason: Reason.VersionMismatch } : {}), targets });
    Object.assign(status, handled);
    status.activeSide = "source";
    if (prov.endpoints.length) {
      status.endpoints = prov.endpoints;
      const conds = (status.conditions ?? []) as Condition[];
      this.provisionedCondition(pair, conds, prov.endpoints);
      if (pending.length) setCondition(conds, { type: "Ready", status: "False", reason: Reason.Provisioning, message: `replicating to ${pair.spec.targets.map((t) => t.name).join(", ")}; waiting for ${pending.join("; ")}` }, pair.metadata.generation ?? 0, this.now());
    }

    // 5. With a FailoverPolicy: is the source alive, which targets could take over, and should one now?
    let decision: string | undefined;
    if (policy) decision = this.watchHealth(key, pair, policy, status, view, targets);
    else this.health.delete(key);
    if (JSON.stringify(status) !== JSON.stringify(pair.status ?? {})) await this.o.writer.patchStatus(pair, status);
    const had = new Set((pair.status?.conditions ?? []).map((c) => c.type));
    for (const t of transitions) {
      const warn = WARNING_REASONS.has(t.reason);
      // A new pair's first conditions are news only when bad; Ready repeats the cause another event gives.
      if (!had.has(t.type) && !warn) continue;
      if (t.type === "Ready" && t.status === "False" && transitions.some((o) => o !== t && o.reason === t.reason)) continue;
      const reason = t.type === "Degraded" && t.status === "False" ? "Recovered" : t.reason;
      this.o.events.event(pair, warn ? "Warning" : "Normal", reason, `${t.type}=${t.status}: ${t.message}`);
    }

    if (decision) {
      log.warn({ target: decision }, "source down: failing over automatically");
      await this.o.writer.setActiveSide({ ...pair, metadata: { ...pair.metadata, resourceVersion: undefined } }, decision);
      return { requeueAfterMs: 0 };
    }
    const busy = status.phase !== "Replicating" || status.targets?.some((t) => t.mirror?.active || t.lastVerify?.result === "Running");
    const interval = policy ? parseDuration(policy.spec.healthCheck?.interval ?? "1s") : this.o.statusIntervalMs;
    // Health checks keep their rhythm: a check that waited out its deadline is followed by the next at once.
    const next = Math.min(interval, busy ? FAST_MS : this.o.statusIntervalMs);
    const provNext = prov.requeueAfterMs ?? Infinity;
    return { requeueAfterMs: Math.min(provNext, policy ? Math.max(50, next - (Date.now() - t0)) : next) };
  }

  private forgetVerifies(key: string): void {
    for (const k of this.autoVerified.keys()) if (k.startsWith(`${key}|`)) this.autoVerified.delete(k);
  }

  /**
   * Start a verify of each target whose last passed verify is missing or past
   * half of the policy's maxVerifyAge, when the target is caught up (mirror
   * done, replicating). At most one try per target every AUTO_VERIFY_RETRY_MS,
   * so a verify that fails is not repeated in a loop. Returns whether one started.
   */
  private async verifyForGate(key: string, pair: ResolvedPair, policy: FailoverPolicy, src: NonNullable<AgentView["status"]>, log: Logger): Promise<boolean> {
    const set = src.sets.find((s) => s.name === setNameFor(pair));
    if (!set || set.state !== "replicating" || set.pathError) return false;
    const now = this.now().getTime();
    const maxAge = parseDuration(policy.spec.knownGood?.maxVerifyAge ?? "24h");
    const started: string[] = [];
    for (const t of pair.spec.targets) {
      const st = set.targets.find((x) => x.address === t.agent.address);
      if (!st || st.verifying || st.mirror?.active || (st.mirror?.startedAt && st.mirror.result !== "ok") || (st.state !== "idle" && st.state !== "replicating")) continue;
      const agentVerify = st.lastVerify && st.lastVerify.finishedAt > 0 && !st.lastVerify.error && st.lastVerify.ok ? st.lastVerify.finishedAt * 1000 : undefined;
      const rec = pair.status?.targets?.find((x) => x.name === t.name)?.lastVerify;
      const recorded = rec?.result === "Passed" && rec.finishedAt ? Date.parse(rec.finishedAt) : undefined;
      const last = Math.max(agentVerify ?? 0, recorded ?? 0);
      if (last && now - last < maxAge / 2) continue;
      const k = `${key}|${t.name}`;
      const tried = this.autoVerified.get(k);
      if (tried !== undefined && now - tried < AUTO_VERIFY_RETRY_MS) continue;
      this.autoVerified.set(k, now);
      try {
        await this.o.agents.startVerify(pair.spec.source.agent.address, { set: set.name, target: t.agent.address, repair: false });
        started.push(t.name);
      } catch (e) {
        log.warn({ target: t.name, err: (e as Error).message }, "verify for the failover gate not started");
      }
    }
    if (started.length) this.o.events.event(pair, "Normal", "VerifyStarted", `verify of ${started.join(", ")} started by the operator: FailoverPolicy ${policy.metadata.name} needs a passed verify no older than ${policy.spec.knownGood?.maxVerifyAge ?? "24h"} before it fails over (knownGood.requireVerify)`);
    return started.length > 0;
  }

  /**
   * Health and the known-good gate, written into `status`. The source counts
   * as down only when the operator missed `missedBeats` checks in a row AND no
   * target hears from it either: one cut link (operator ↔ source, or source ↔
   * one target) is not a dead server. Returns the target to fail over to when
   * the policy is automatic and one is known good.
   */
  private watchHealth(key: string, pair: ResolvedPair, policy: FailoverPolicy, status: ReplicationPairStatus, source: AgentView, targets: Map<string, AgentView>): string | undefined {
    const now = this.now();
    const h = this.health.get(key) ?? { missed: 0 };
    if (source.error) {
      h.missed++;
      h.firstMissAt ??= now.getTime();
    } else {
      h.missed = 0;
      h.firstMissAt = undefined;
      h.lastOkAt = now.getTime();
    }
    this.health.set(key, h);
    const srcName = status.sourceAgent?.name ?? pair.status?.sourceAgent?.name;
    const setName = setNameFor(pair);
    const images = new Map(pair.spec.targets.map((t) => [t.name, targets.get(t.agent.address)?.status?.images.find((i) => i.source === srcName && i.set === setName)]));
    const targetsHearSource = [...images.values()].some((i) => i?.connected);
    const beats = policy.spec.healthCheck?.missedBeats ?? 3;
    const down = h.missed >= beats && !targetsHearSource;
    status.health = {
      policy: policy.metadata.name,
      sourceReachable: !source.error,
      missedBeats: h.missed,
      sourceDown: down,
      // Down since the last check it answered (an operator that restarted meanwhile knows only the first miss).
      sourceDownSince: h.firstMissAt && down ? new Date(Math.min(h.lastOkAt ?? h.firstMissAt, h.firstMissAt)).toISOString() : undefined,
    };
    const gates = new Map(pair.spec.targets.map((t) => {
      const v = targets.get(t.agent.address);
      return [t.name, { gate: knownGood({ recorded: status.targets?.find((x) => x.name === t.name), image: images.get(t.name), imageError: v?.error, policy, now }), image: images.get(t.name) }];
    }));
    status.knownGood = pair.spec.targets.map((t) => ({ target: t.name, ok: gates.get(t.name)!.gate.ok, failed: gates.get(t.name)!.gate.failed }));
    // In one line, what a person needs to know: could this pair fail over now, and if not, what is missing.
    const good = status.knownGood.filter((k) => k.ok).map((k) => k.target);
    const automatic = (policy.spec.approval ?? "manual") === "automatic";
    setCondition((status.conditions ??= []) as Condition[], good.length
      ? { type: "FailoverReady", status: "True", reason: "KnownGood", message: `failover possible to ${good.join(", ")}: ${automatic ? "automatic when the source is down" : "on approval (kubectl understudy failover)"} (FailoverPolicy ${policy.metadata.name})` }
      : { type: "FailoverReady", status: "False", reason: "NoKnownGoodTarget", message: `failover not possible yet (FailoverPolicy ${policy.metadata.name}): ${status.knownGood.map((k) => `${k.target}: ${(k.failed ?? []).join("; ")}`).join(" | ")}` }, pair.metadata.generation ?? 0, now);
    if (!down) {
      const conds = (status.conditions ?? []) as Condition[];
      if (conds.some((c) => c.type === "FailoverPending")) setCondition(conds, { type: "FailoverPending", status: "False", reason: "SourceUp", message: "the source is up" }, pair.metadata.generation ?? 0, now);
      return undefined;
    }
    const best = pickTarget(pair, gates);
    const why = `source ${pair.spec.source.agent.address} down: ${h.missed} missed checks from the operator and no target hears from it`;
    const conds = (status.conditions ?? []) as Condition[];
    if (!best) {
      const msg = `${why}; failover refused: no target is known good (${status.knownGood.map((k) => `${k.target}: ${k.failed?.join(", ")}`).join("; ")})`;
      if (setCondition(conds, { type: "FailedOver", status: "False", reason: "FailoverRefused", message: msg }, pair.metadata.generation ?? 0, now)) this.o.events.event(pair, "Warning", "FailoverRefused", msg);
      return undefined;
    }
    if ((policy.spec.approval ?? "manual") === "manual") {
      const msg = `${why}; ${best} is known good: approve with \`kubectl understudy failover ${pair.metadata.name} -n ${pair.metadata.namespace}\``;
      if (setCondition(conds, { type: "FailoverPending", status: "True", reason: "AwaitingApproval", message: msg }, pair.metadata.generation ?? 0, now)) this.o.events.event(pair, "Warning", "FailoverPending", msg);
      return undefined;
    }
    this.o.events.event(pair, "Warning", "SourceDown", `${why}; failing over to ${best}`);
    return best;
  }

  /** The pair is being deleted: stop replication on the source, undo what was provisioned, then let it go. */
  private async finalize(pair: Pair, setName: string, log: Logger): Promise<Result> {
    if (!pair.metadata.finalizers?.includes(PAIR_FINALIZER)) return {};
    const endpoints = pair.status?.endpoints ?? [];
    const { pair: resolved } = resolvePair(pair, endpoints);
    // phase Deleting is written only below, once replication has stopped: later passes skip that step
    if (resolved && pair.status?.phase !== "Deleting") {
      const r = await this.stopReplication(resolved, setName, log);
      if (r) return r;
    }
    // ec2 instances and SSH installs, after replication stopped (an instance terminated first would leave the source retrying)
    const wanted = provisionedEndpoints(pair);
    if (wanted.length) {
      const prev = new Map(endpoints.map((e) => [e.name, e]));
      const results = await Promise.all(wanted.map(async ({ name, kind }) => {
        const p = this.o.provisioners?.find((x) => x.kind === kind);
        if (!p) return { done: true, status: prev.get(name) ?? ({ name, kind } as EndpointStatus) };
        const r = await p.finalize(pair, name, prev.get(name));
        for (const e of r.events ?? []) this.o.events.event(pair, e.type, e.reason, `${name}: ${e.message}`);
        return r;
      }));
      if (results.some((r) => !r.done)) {
        const status = { ...pair.status, endpoints: results.map((r) => r.status), phase: "Deleting" as const };
        if (JSON.stringify(status) !== JSON.stringify(pair.status ?? {})) await this.o.writer.patchStatus(pair, status);
        return { requeueAfterMs: Math.min(...results.map((r) => ("requeueAfterMs" in r ? (r.requeueAfterMs ?? 10_000) : 10_000))) };
      }
    }
    await this.o.writer.removeFinalizer(pair);
    return {};
  }

  /** Stop replication on the source (and a reverse set on an active target); a Result means "not yet, again later". */
  private async stopReplication(pair: ResolvedPair, setName: string, log: Logger): Promise<Result | undefined> {
    const source = pair.spec.source.agent.address;
    try {
      // Failed over (or cut over) and not failed back: the active target replicates back to
      // the source; deleting the pair finalises the move, and the data stays on both sides.
      const active = pair.status?.activeSide ?? "source";
      const t = pair.spec.targets.find((x) => x.name === active);
      if (active !== "source" && t) {
        await this.o.agents.removeSet(t.agent.address, setName, true);
        const targetName = (await this.o.agents.status(t.agent.address)).name;
        await this.o.agents.mapImage(source, { source: targetName, set: setName, path: "", remove: true }).catch((e: Error) => log.warn({ err: e.message }, "could not unmap the reverse image on the source"));
      }
      if (active !== "source") {
        // The old source was fenced at failover; it may be gone for good, so it does not hold up the deletion.
        await this.o.agents.removeSet(source, setName, true).catch((e: Error) => log.warn({ err: e.message }, "old source not reachable; its set (if any) stays fenced"));
      } else {
        const r = await this.o.agents.removeSet(source, setName, true);
        log.info({ existed: r.existed }, "replication stopped on the source agent");
      }
    } catch (e) {
      const msg = `cannot stop replication on source agent ${source}: ${(e as Error).message}; retrying (to give up, remove the finalizer ${PAIR_FINALIZER} — the agent would then go on replicating until its set is removed)`;
      this.o.events.event(pair, "Warning", "CleanupPending", msg);
      log.warn({ err: (e as Error).message }, "finalizer waits for the source agent");
      return { requeueAfterMs: 10_000 };
    }
    this.o.events.event(pair, "Normal", "Deleted", `replication set ${setName} removed from source agent ${source}; the replicas on the targets are kept`);
    return undefined;
  }
}
