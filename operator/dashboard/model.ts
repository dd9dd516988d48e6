// What the dashboard's server sends the page, and the page sends back: one
// shape for every data source (the operator's caches, or the demo's agents),
// so the same page shows both. Type-only: the UI bundle imports it too.
import type { ReplicationPairSpec, ReplicationPairStatus } from "../api/v1alpha1/index.ts";

/** One point of a pair's history: the worst lag and queue seen in its bucket. */
export interface HistoryPoint {
  /** unix ms, start of the bucket */
  t: number;
  lagSeconds: number;
  queuedBytes: number;
}

/** A failover or cutover the dashboard saw finish (status.failover keeps only the last). */
export interface FailoverRecord {
  target?: string;
  reason?: string;
  startedAt?: string;
  finishedAt?: string;
  recoverySeconds?: number;
}

export interface PairView {
  namespace: string;
  name: string;
  labels: Record<string, string>;
  generation?: number;
  spec: Pick<ReplicationPairSpec, "source" | "targets" | "replicationSet" | "activeSide" | "mode" | "compression" | "bandwidthLimit">;
  status: ReplicationPairStatus;
  /** The FailoverPolicy selecting it, if any. */
  policy?: string;
  failovers: FailoverRecord[];
}

export interface EventView {
  uid: string;
  namespace: string;
  /** kind/name of the object the event is about */
  kind: string;
  name: string;
  type: string;
  reason: string;
  message: string;
  count: number;
  /** ISO time of the last occurrence */
  last: string;
}

export type Action = "failover" | "cutover" | "failback" | "verify" | "mirror";
export const ACTIONS: readonly Action[] = ["failover", "cutover", "failback", "verify", "mirror"];

export interface ActionRequest {
  /** failover, cutover: the target to make active (failover: default the best known-good one) */
  target?: string;
  /** verify: repair what differs */
  repair?: boolean;
  /** mirror: full or checksum */
  mode?: "full" | "checksum";
}

export interface ActionReply {
  ok: boolean;
  message: string;
  /** verify/mirror: the request value written (status.lastHandled*Request tells when it was handled) */
  request?: string;
}

/** May the person using the page do this action on this pair, and if not, why not. */
export type Permissions = Record<Action, { allowed: boolean; why?: string }>;

export interface Snapshot {
  /** who the page acts as (from TokenReview; "demo" without Kubernetes) */
  user: string;
  /** "kubernetes" or "demo" */
  source: string;
  pairs: PairView[];
  /** by "namespace/name" */
  history: Record<string, HistoryPoint[]>;
  events: EventView[];
  /** namespaces the user may not read, when some were left out */
  hidden?: string;
  bucketMs: number;
}

/** Server → page messages on the live stream (text/event-stream; `event:` is the kind). */
export type LiveMessage =
  | { kind: "snapshot"; data: Snapshot }
  | { kind: "pair"; data: PairView }
  | { kind: "gone"; data: { namespace: string; name: string } }
  | { kind: "event"; data: EventView }
  /** one new history point per pair (by "namespace/name") */
  | { kind: "sample"; data: { t: number; points: Record<string, [number, number]> } };

export const pairKey = (p: { namespace: string; name: string }): string => `${p.namespace}/${p.name}`;
