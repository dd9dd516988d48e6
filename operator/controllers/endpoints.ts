// Endpoints the operator puts in place itself: ec2 targets (launched and
// enrolled, operator/ec2/provisioner.ts), ssh hosts (installed over SSH,
// operator/ssh/provisioner.ts) and hosts that enroll themselves with a token
// the operator hands out (operator/enroll/provisioner.ts). Provisioning runs before everything else in a
// pair's reconcile and ends in an agent address per endpoint; resolvePair then
// gives the rest of the reconciler a pair in which every side is an agent.
import type { EndpointStatus, ReplicationPair, ResolvedPair } from "../api/v1alpha1/index.ts";

export interface ProvisionEvent {
  type: "Normal" | "Warning";
  reason: string;
  message: string;
}

export interface ProvisionResult {
  /** the endpoint's new status (replaces the old entry) */
  status: EndpointStatus;
  /** when to look again; 0 = at once (after `persist`) */
  requeueAfterMs: number;
  /**
   * Write status before anything else happens: what it records must survive an
   * operator restart before the next step (e.g. an enrollment nonce before the
   * instance that carries its token is launched).
   */
  persist?: boolean;
  events?: ProvisionEvent[];
}

export interface FinalizeResult {
  done: boolean;
  status: EndpointStatus;
  requeueAfterMs?: number;
  events?: ProvisionEvent[];
}

/** One kind of endpoint (ec2, ssh). Both calls are idempotent and never sleep. */
export interface EndpointProvisioner {
  readonly kind: EndpointKind;
  /**
   * Move the endpoint `name` (source, or a target's name) one step towards its
   * desired state. `serves`: the side is active or is to become active (an ec2
   * target then runs its failover instance type).
   */
  reconcile(pair: ReplicationPair, name: string, prev: EndpointStatus | undefined, serves: boolean): Promise<ProvisionResult>;
  /** The pair is being deleted: undo what was created for the endpoint. */
  finalize(pair: ReplicationPair, name: string, prev: EndpointStatus | undefined): Promise<FinalizeResult>;
}

/** The provisioned endpoints of a pair: [name, kind]. */
/** "<namespace>/<pair>/<endpoint>": the enrollment subject (and an ec2 instance's target tag). */
export function subjectOf(pair: ReplicationPair, endpoint: string): string {
  return `${pair.metadata.namespace ?? "default"}/${pair.metadata.name ?? ""}/${endpoint}`;
}

export type EndpointKind = "ec2" | "ssh" | "enroll";

export function provisionedEndpoints(pair: ReplicationPair): { name: string; kind: EndpointKind }[] {
  const out: { name: string; kind: EndpointKind }[] = [];
  if (pair.spec.source.ssh) out.push({ name: "source", kind: "ssh" });
  else if (pair.spec.source.enroll) out.push({ name: "source", kind: "enroll" });
  for (const t of pair.spec.targets) {
    if (t.ec2) out.push({ name: t.name, kind: "ec2" });
    else if (t.ssh) out.push({ name: t.name, kind: "ssh" });
    else if (t.enroll) out.push({ name: t.name, kind: "enroll" });
  }
  return out;
}

export interface Resolution {
  /** undefined while the source has no agent yet */
  pair?: ResolvedPair;
  /** endpoints without an agent address yet: "dr: Enrolling (waiting for …)" */
  pending: string[];
}

function describe(e: EndpointStatus | undefined, name: string): string {
  if (!e) return `${name}: Pending`;
  return `${name}: ${e.phase ?? "Pending"}${e.message ? ` (${e.message})` : ""}`;
}

/**
 * The pair with every endpoint as an agent: given ones as they are, provisioned
 * ones at the address their agent was enrolled or installed at. Targets that
 * have no agent yet are left out (the others replicate meanwhile).
 */
export function resolvePair(pair: ReplicationPair, endpoints: readonly EndpointStatus[]): Resolution {
  const byName = new Map(endpoints.map((e) => [e.name, e]));
  const pending: string[] = [];
  const address = (name: string, given: { address: string } | undefined) => {
    if (given) return given;
    const e = byName.get(name);
    if (e?.agentAddress) return { address: e.agentAddress };
    pending.push(describe(e, name));
    return undefined;
  };
  const source = address("source", pair.spec.source.agent);
  const targets = pair.spec.targets.flatMap((t) => {
    const agent = address(t.name, t.agent);
    return agent ? [{ ...t, agent }] : [];
  });
  if (!source) return { pending };
  return { pair: { ...pair, spec: { ...pair.spec, source: { ...pair.spec.source, agent: source }, targets } }, pending };
}
