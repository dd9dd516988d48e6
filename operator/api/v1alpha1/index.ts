// The understudy.dev/v1alpha1 API as the operator uses it: the generated CR
// types (gen/, from crds/), names, condition types and reasons, and the one
// setCondition helper.
import type { Condition } from "./gen/replicationpair.ts";

import type { AgentEndpoint, ReplicationPair, ReplicationPairSpec, SourceEndpoint, TargetEndpoint } from "./gen/replicationpair.ts";

export type { ReplicationPair, ReplicationPairSpec, ReplicationPairStatus, TargetStatus, VerifyResult, MirrorStatus, Condition, EndpointStatus, Ec2Endpoint, SshEndpoint, TargetEndpoint, AgentEndpoint } from "./gen/replicationpair.ts";

/**
 * A pair whose every endpoint has an agent address: given in the spec (kind
 * agent), or found by the operator (ec2 and ssh endpoints, once their agent is
 * enrolled or installed). Controllers past provisioning work on this.
 */
export type ResolvedPair = Omit<ReplicationPair, "spec"> & {
  spec: Omit<ReplicationPairSpec, "source" | "targets"> & {
    source: SourceEndpoint & { agent: AgentEndpoint };
    targets: (TargetEndpoint & { agent: AgentEndpoint })[];
  };
};
export type { FailoverPolicy, FailoverPolicySpec, FailoverPolicyStatus } from "./gen/failoverpolicy.ts";
export type { NotificationPolicy, NotificationPolicySpec, NotificationPolicyStatus, NotificationChannel, EmailChannel, WebhookChannel, SnmpChannel, ChannelStatus, AlertState, EventMark, Delivery, NotificationEvent } from "./gen/notificationpolicy.ts";

export const GROUP = "understudy.dev";
export const VERSION = "v1alpha1";
export const API_VERSION = `${GROUP}/${VERSION}`;
export const REPLICATION_PAIRS = "replicationpairs";
export const FAILOVER_POLICIES = "failoverpolicies";
export const NOTIFICATION_POLICIES = "notificationpolicies";

/** Removed once the source agent no longer replicates the pair's set. */
export const PAIR_FINALIZER = "understudy.dev/replication";

/**
 * Requests, declaratively: set the annotation to any new value (e.g. a
 * timestamp) and the operator acts once, recording the value it handled in
 * status.lastHandled*Request. `kubectl annotate rp/x understudy.dev/verify=$(date +%s) --overwrite`.
 */
export const VERIFY_ANNOTATION = "understudy.dev/verify";
/** With the verify annotation: "true" repairs what the verify finds. */
export const VERIFY_REPAIR_ANNOTATION = "understudy.dev/verify-repair";
export const MIRROR_ANNOTATION = "understudy.dev/mirror";
/** full | checksum (default: the pair's spec.mirror.mode). */
export const MIRROR_MODE_ANNOTATION = "understudy.dev/mirror-mode";

export const ConditionType = {
  Ready: "Ready",
  Mirrored: "Mirrored",
  Replicating: "Replicating",
  Verified: "Verified",
  Degraded: "Degraded",
  /** ec2 and ssh endpoints: the operator's agents are in place */
  Provisioned: "Provisioned",
} as const;

export const Reason = {
  Replicating: "Replicating",
  Configuring: "Configuring",
  Scanning: "Scanning",
  ConfigRejected: "ConfigRejected",
  SourceUnreachable: "SourceUnreachable",
  TargetUnreachable: "TargetUnreachable",
  TargetDegraded: "TargetDegraded",
  TargetRefused: "TargetRefused",
  Connecting: "Connecting",
  SetFailed: "SetFailed",
  Mirroring: "Mirroring",
  MirrorComplete: "MirrorComplete",
  MirrorFailed: "MirrorFailed",
  MirrorPending: "MirrorPending",
  VerifyPassed: "VerifyPassed",
  DifferencesFound: "DifferencesFound",
  VerifyError: "VerifyError",
  NeverVerified: "NeverVerified",
  AllHealthy: "AllHealthy",
  Deleting: "Deleting",
  Provisioning: "Provisioning",
  /** the agents of a pair run different understudy versions */
  VersionMismatch: "VersionMismatch",
  Provisioned: "Provisioned",
  /** the source's replication set path is missing or unreadable on the source host */
  SourcePathUnavailable: "SourcePathUnavailable",
} as const;

/** A time as Kubernetes writes metav1.Time: RFC 3339 in UTC, whole seconds. */
export function timestamp(d: Date): string {
  return d.toISOString().replace(/\.\d+Z$/, "Z");
}

export type ConditionStatus = "True" | "False" | "Unknown";

/**
 * Set (or add) a condition in place. lastTransitionTime changes only when the
 * status flips, so it tells how long the condition has held. Returns true when
 * the status flipped (the caller may record an Event).
 */
export function setCondition(conds: Condition[], c: { type: string; status: ConditionStatus; reason: string; message: string }, generation: number, now: Date): boolean {
  const cur = conds.find((x) => x.type === c.type);
  const next: Condition = { type: c.type, status: c.status, reason: c.reason, message: c.message.slice(0, 32_000), observedGeneration: generation, lastTransitionTime: timestamp(now) };
  if (!cur) {
    conds.push(next);
    return true;
  }
  const flipped = cur.status !== c.status;
  Object.assign(cur, next, flipped ? {} : { lastTransitionTime: cur.lastTransitionTime });
  return flipped;
}

export function getCondition(conds: Condition[] | undefined, type: string): Condition | undefined {
  return conds?.find((c) => c.type === type);
}
