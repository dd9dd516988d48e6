// An enroll endpoint: a host the operator cannot reach (no SSH from the
// cluster, a DMZ, an air gap with a one-way door). The operator records a
// nonce in status, derives the single-use token from it, and puts the token
// with what the host needs (enrollment URL, CA) into a Secret of the pair's
// namespace; `kubectl understudy enroll-command` turns that into the command a
// person runs on the host. Once the agent has enrolled (the ledger records
// it), the Secret goes: its token is spent. An expired, unused token is
// replaced by a new one.
import { createHash, randomBytes } from "node:crypto";
import { joinHostPort, parseDuration } from "../../common/config.ts";
import type { Logger } from "../../common/log.ts";
import { timestamp, type EndpointStatus, type ReplicationPair } from "../api/v1alpha1/index.ts";
import { subjectOf, type EndpointProvisioner, type FinalizeResult, type ProvisionEvent, type ProvisionResult } from "../controllers/endpoints.ts";
import type { EnrollmentLedger } from "../ec2/provisioner.ts";

/** Keys of the Secret that carries a pending enrollment. */
export const ENROLL_SECRET_KEYS = ["token", "url", "caPem", "agentPort", "targetRoot", "expiresAt"] as const;
export type EnrollSecretData = Record<(typeof ENROLL_SECRET_KEYS)[number], string>;

/** The Secret holding the token for endpoint `endpoint` of pair `pair`. */
export function enrollSecretName(pair: string, endpoint: string): string {
  const full = `understudy-enroll-${pair}-${endpoint}`;
  return full.length <= 253 ? full : `${full.slice(0, 236)}-${createHash("sha256").update(full).digest("hex").slice(0, 16)}`;
}

/** Where the operator keeps enrollment Secrets (operator/enroll/kube-store.ts). */
export interface EnrollSecrets {
  /** create or update the Secret, owned by the pair */
  put(pair: ReplicationPair, name: string, data: EnrollSecretData): Promise<void>;
  remove(namespace: string, name: string): Promise<void>;
}

export interface EnrollProvisionerOptions {
  url: string;
  caPem: string;
  issueToken(claims: { sub: string; nonce: string; exp: number }): string;
  ledger: EnrollmentLedger;
  secrets: EnrollSecrets;
  log: Logger;
  now?: () => Date;
}



export class EnrollProvisioner implements EndpointProvisioner {
  readonly kind = "enroll" as const;
  private readonly o: EnrollProvisionerOptions;
  constructor(o: EnrollProvisionerOptions) {
    this.o = o;
  }

  private spec(pair: ReplicationPair, name: string) {
    const s = name === "source" ? pair.spec.source.enroll : pair.spec.targets.find((t) => t.name === name)?.enroll;
    if (!s) throw new Error(`${name} is not an enroll endpoint`);
    return s;
  }

  async reconcile(pair: ReplicationPair, name: string, prev: EndpointStatus | undefined, _serves: boolean): Promise<ProvisionResult> {
    const s = this.spec(pair, name);
    const now = this.o.now?.() ?? new Date();
    const st: EndpointStatus = { ...(prev ?? {}), name, kind: "enroll" };
    const ns = pair.metadata.namespace ?? "default";
    const secret = enrollSecretName(pair.metadata.name ?? "", name);
    const events: ProvisionEvent[] = [];
    const port = s.agentPort ?? 7702;
    if (st.agentAddress) {
      st.phase = "Ready";
      st.message = `agent ${st.agentName} enrolled from ${st.enrollment?.enrolledFrom}`;
      return { status: st, requeueAfterMs: 300_000 };
    }
    const expires = Date.parse(st.enrollment?.expiresAt ?? "");
    if (!st.enrollment?.nonce || !(expires > now.getTime())) {
      // first token, or the last one expired unused: a new nonce (the old token dies with it)
      if (st.enrollment?.nonce) events.push({ type: "Warning", reason: "EnrollmentTokenExpired", message: `the token for ${name} expired unused at ${st.enrollment.expiresAt}; a new one is in Secret ${secret}` });
      st.enrollment = { nonce: randomBytes(16).toString("hex"), expiresAt: timestamp(new Date(now.getTime() + parseDuration(s.tokenTTL ?? "24h"))) };
      st.phase = "Pending";
      return { status: st, requeueAfterMs: 250, persist: true, events };
    }
    const sub = subjectOf(pair, name);
    try {
      const rec = await this.o.ledger.lookup(ns, sub, st.enrollment.nonce);
      if (rec) {
        st.agentName = rec.agentName;
        st.agentAddress = joinHostPort(rec.peer, port);
        st.enrollment = { ...st.enrollment, enrolledAt: rec.enrolledAt, enrolledFrom: rec.peer };
        st.phase = "Ready";
        st.message = `agent ${rec.agentName} enrolled from ${rec.peer}`;
        delete st.lastError;
        await this.o.secrets.remove(ns, secret);
        events.push({ type: "Normal", reason: "AgentEnrolled", message: `agent ${rec.agentName} enrolled from ${rec.peer}; Secret ${secret} (its spent token) removed` });
        return { status: st, requeueAfterMs: 0, events };
      }
      const token = this.o.issueToken({ sub, nonce: st.enrollment.nonce, exp: expires });
      await this.o.secrets.put(pair, secret, { token, url: this.o.url, caPem: this.o.caPem, agentPort: String(port), targetRoot: s.targetRoot ?? "/var/lib/understudy/replicas", expiresAt: st.enrollment.expiresAt ?? "" });
      st.phase = "Enrolling";
      st.message = `waiting for the host to enroll: run what \`kubectl understudy enroll-command ${pair.metadata.name} --endpoint ${name} -n ${ns}\` prints on it (token in Secret ${secret}, good until ${st.enrollment.expiresAt})`;
      delete st.lastError;
      return { status: st, requeueAfterMs: 3000, events };
    } catch (e) {
      const msg = (e as Error).message;
      st.lastError = { code: "EnrollmentSecret", message: msg, at: timestamp(now), attempt: (prev?.lastError?.attempt ?? 0) + 1 };
      st.message = `cannot write Secret ${secret}: ${msg}`;
      this.o.log.warn({ endpoint: `${ns}/${pair.metadata.name}/${name}`, err: msg }, "enroll endpoint: Secret not written");
      return { status: st, requeueAfterMs: 10_000, events };
    }
  }

  async finalize(pair: ReplicationPair, name: string, prev: EndpointStatus | undefined): Promise<FinalizeResult> {
    // the Secret is owned by the pair (garbage collected with it); the enrolled agent is the host's
    return { done: true, status: { ...(prev ?? {}), name, kind: "enroll" } };
  }
}
