// An ec2 target, from spec to an enrolled agent: one small step per call,
// never waiting on AWS (a stop or start that takes minutes is looked at again
// later). What must survive an operator restart is in the pair's status
// (enrollment nonce before launch, instance id after) and at AWS (the
// instance's target tag and the RunInstances client token), so a restart at
// any moment adopts the instance it launched instead of launching a second.
//
//   Pending ─ nonce persisted ─▶ Uploading ─▶ Launching ─▶ Booting/Enrolling ─▶ Ready
//                                                              ▲      │ type ≠ desired
//                                                              └ Resizing (stop, modify, start)
import { CreateTagsCommand, DeleteTagsCommand, ModifyInstanceAttributeCommand, StartInstancesCommand, StopInstancesCommand } from "@aws-sdk/client-ec2";
import { createHash, randomBytes } from "node:crypto";
import { joinHostPort } from "../../common/config.ts";
import type { Logger } from "../../common/log.ts";
import { timestamp, type Ec2Endpoint, type EndpointStatus, type ReplicationPair } from "../api/v1alpha1/index.ts";
import { subjectOf, type EndpointProvisioner, type FinalizeResult, type ProvisionEvent, type ProvisionResult } from "../controllers/endpoints.ts";
import { deleteObject, ensureBucket, presignGet, putBundle } from "./bundle-store.ts";
import { awsClients, type AwsClients, type AwsConfig } from "./clients.ts";
import { awsError, backoffMs, Ec2Error } from "./errors.ts";
import { clientToken, describe, findByTarget, launch, MANAGED_BY_TAG, TARGET_TAG, terminate, type InstanceInfo } from "./instances.ts";
import { renderUserData } from "./user-data.ts";

/** What an enrollment left behind (operator/enroll/kube-store.ts keeps it). */
export interface EnrollmentRecord {
  agentName: string;
  /** the address the agent enrolled from: where it is reached */
  peer: string;
  enrolledAt: string;
}

export interface EnrollmentLedger {
  lookup(namespace: string, subject: string, nonce: string): Promise<EnrollmentRecord | undefined>;
}

export interface Ec2ProvisionerOptions {
  /** the agent bundle (npm run bundle) uploaded for instances to fetch */
  bundle: { path: string; version: string };
  enrollment: {
    /** https URL of the operator's enrollment endpoint, as instances reach it */
    url: string;
    /** the CA instances verify the endpoint with (and their agents' peers with) */
    caPem: string;
    issueToken(claims: { sub: string; nonce: string; exp: number }): string;
  };
  ledger: EnrollmentLedger;
  /** a Secret's data (decoded), or undefined when there is none */
  readSecret(namespace: string, name: string): Promise<Record<string, string> | undefined>;
  log: Logger;
  now?: () => Date;
  /** how long an instance has to enroll (default 24 h; also the presigned URL's life) */
  tokenTtlMs?: number;
  /** AWS clients for a config (default: cached awsClients) */
  clients?: (cfg: AwsConfig) => AwsClients;
}

const POLL_MS = 5000;
const BOOT_POLL_MS = 3000;
/** replaces TARGET_TAG on an instance kept at deletion (onDelete Retain): <namespace>/<pair>/<target> it served */
export const RETAINED_FROM_TAG = "understudy.dev/retained-from";

export class Ec2Provisioner implements EndpointProvisioner {
  readonly kind = "ec2" as const;
  private readonly o: Ec2ProvisionerOptions;
  private readonly cache = new Map<string, AwsClients>();

  constructor(o: Ec2ProvisionerOptions) {
    this.o = o;
  }

  private now(): Date {
    return this.o.now?.() ?? new Date();
  }

  private spec(pair: ReplicationPair, name: string): Ec2Endpoint {
    const t = pair.spec.targets.find((x) => x.name === name);
    if (!t?.ec2) throw new Error(`target ${name} is not an ec2 endpoint`);
    return t.ec2;
  }

  /** AWS clients for the endpoint, credentials from its Secret (or the default chain). */
  private async aws(pair: ReplicationPair, spec: Ec2Endpoint): Promise<AwsClients> {
    const ns = pair.metadata.namespace ?? "default";
    let credentials: AwsConfig["credentials"];
    if (spec.credentialsSecret) {
      const data = await this.o.readSecret(ns, spec.credentialsSecret);
      if (!data) throw new Ec2Error("CredentialsSecretNotFound", `Secret ${ns}/${spec.credentialsSecret} (spec ec2.credentialsSecret) does not exist`, false);
      const { AWS_ACCESS_KEY_ID: id, AWS_SECRET_ACCESS_KEY: secret, AWS_SESSION_TOKEN: session } = data;
      if (!id || !secret) throw new Ec2Error("CredentialsSecretInvalid", `Secret ${ns}/${spec.credentialsSecret} needs keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY`, false);
      credentials = { accessKeyId: id, secretAccessKey: secret, ...(session ? { sessionToken: session } : {}) };
    }
    const cfg: AwsConfig = { region: spec.region, ...(spec.endpoint ? { endpoint: spec.endpoint } : {}), ...(credentials ? { credentials } : {}) };
    // keyed by a hash: the map must not keep a readable copy of the secret key as a string key
    const key = createHash("sha256").update(JSON.stringify(cfg)).digest("hex");
    let c = this.cache.get(key);
    if (!c) this.cache.set(key, (c = (this.o.clients ?? awsClients)(cfg)));
    return c;
  }

  private bundleKey(pair: ReplicationPair, name: string): string {
    return `understudy/${subjectOf(pair, name)}/understudy-agent-${this.o.bundle.version}-linux-x64.tar.gz`;
  }

  async reconcile(pair: ReplicationPair, name: string, prev: EndpointStatus | undefined, serves: boolean): Promise<ProvisionResult> {
    const spec = this.spec(pair, name);
    const st: EndpointStatus = { ...(prev ?? {}), name, kind: "ec2", launchAttempt: prev?.launchAttempt ?? 1 };
    const events: ProvisionEvent[] = [];
    const now = this.now();
    const sub = subjectOf(pair, name);
    const wantType = serves ? spec.failoverInstanceType : (spec.stagingInstanceType ?? "t3.small");

    // 0. The enrollment nonce is recorded before the instance that will carry its token exists.
    if (!st.enrollment?.nonce) {
      st.enrollment = { nonce: randomBytes(16).toString("hex"), expiresAt: timestamp(new Date(now.getTime() + (this.o.tokenTtlMs ?? 24 * 3600_000))) };
      st.phase = "Pending";
      st.message = "enrollment prepared; uploading the agent bundle next";
      return { status: st, requeueAfterMs: 0, persist: true };
    }
    try {
      const aws = await this.aws(pair, spec);
      // 1. The instance: the one recorded, else the one tagged for this target, else a new one.
      let inst: InstanceInfo | undefined = st.instanceId ? await describe(aws.ec2, st.instanceId) : undefined;
      if (st.instanceId && (!inst || inst.state === "terminated" || inst.state === "shutting-down")) {
        // Gone behind the operator's back: a new launch, with a new token (the old one dies with its nonce).
        events.push({ type: "Warning", reason: "InstanceGone", message: `instance ${st.instanceId} is ${inst?.state ?? "gone"}; launching a replacement (attempt ${(st.launchAttempt ?? 1) + 1})` });
        const next: EndpointStatus = { name, kind: "ec2", launchAttempt: (st.launchAttempt ?? 1) + 1, phase: "Pending", message: `replacing instance ${st.instanceId}` };
        return { status: next, requeueAfterMs: 0, persist: true, events };
      }
      if (!inst) {
        const exp = Date.parse(st.enrollment.expiresAt ?? "");
        if (!(exp > now.getTime() + 60_000)) {
          // never launched and the token would be (nearly) dead at boot: a fresh nonce first
          return { status: { name, kind: "ec2", launchAttempt: st.launchAttempt ?? 1, phase: "Pending" }, requeueAfterMs: 0, persist: true };
        }
        st.phase = "Uploading";
        const bucket = spec.bucket;
        const key = this.bundleKey(pair, name);
        const made = await ensureBucket(aws.s3, bucket);
        const put = await putBundle(aws.s3, bucket, key, this.o.bundle.path);
        st.bundle = { bucket, key, sha256: put.sha256 };
        if (put.uploaded) events.push({ type: "Normal", reason: "BundleUploaded", message: `agent bundle ${this.o.bundle.version} uploaded to s3://${bucket}/${key}${made.created ? " (bucket created)" : ""}` });
        const ttl = Math.max(60, Math.min(7 * 24 * 3600, Math.floor((exp - now.getTime()) / 1000)));
        const bundleUrl = await presignGet(aws.s3, bucket, key, ttl);
        const token = this.o.enrollment.issueToken({ sub, nonce: st.enrollment.nonce, exp });
        const userData = renderUserData({ target: sub, bundleUrl, bundleSha256: put.sha256, enrollUrl: this.o.enrollment.url, caPem: this.o.enrollment.caPem, token, agentPort: spec.agentPort ?? 7702, targetRoot: spec.targetRoot ?? "/var/lib/understudy/replicas" });
        st.phase = "Launching";
        const r = await launch(aws.ec2, {
          target: sub,
          clientToken: clientToken(pair.metadata.uid ?? sub, name, String(st.launchAttempt ?? 1)),
          region: spec.region,
          ami: spec.ami,
          instanceType: wantType,
          ...(spec.subnetId ? { subnetId: spec.subnetId } : {}),
          ...(spec.securityGroupIds?.length ? { securityGroupIds: spec.securityGroupIds } : {}),
          ...(spec.keyName ? { keyName: spec.keyName } : {}),
          ...(spec.iamInstanceProfile ? { iamInstanceProfile: spec.iamInstanceProfile } : {}),
          ...(spec.rootVolumeGiB ? { rootVolumeGiB: spec.rootVolumeGiB } : {}),
          ...(spec.dataVolumeGiB ? { dataVolumeGiB: spec.dataVolumeGiB } : {}),
          tags: Object.fromEntries(Object.entries(spec.tags ?? {}).filter((kv): kv is [string, string] => typeof kv[1] === "string")),
          userData,
        });
        inst = r.instance;
        for (const d of r.duplicates) events.push({ type: "Warning", reason: "DuplicateInstance", message: `instance ${d} also carries the tag of ${sub}; the operator uses ${inst.id} and leaves ${d} alone` });
        events.push(r.created ? { type: "Normal", reason: "InstanceLaunched", message: `launched ${inst.id} (${inst.type}, ${spec.ami}) in ${spec.region}` } : { type: "Normal", reason: "InstanceAdopted", message: `found ${inst.id}, launched earlier for ${sub}` });
      }
      st.instanceId = inst.id;
      st.instanceState = inst.state;
      st.instanceType = inst.type;
      if (inst.privateIp) st.privateIp = inst.privateIp;
      if (inst.publicIp) st.publicIp = inst.publicIp;
      delete st.lastError;

      // 2. Enrollment: the agent on the instance calls in with its token.
      if (!st.agentAddress) {
        const rec = await this.o.ledger.lookup(pair.metadata.namespace ?? "default", sub, st.enrollment.nonce);
        if (!rec) {
          const exp = Date.parse(st.enrollment.expiresAt ?? "");
          if (exp <= now.getTime()) {
            st.phase = "Failed";
            st.message = `instance ${inst.id} did not enroll before its token expired at ${st.enrollment.expiresAt}; see /var/log/understudy-bootstrap.log on it. Terminate it and the operator launches a new one.`;
            return { status: st, requeueAfterMs: 60_000, events };
          }
          st.phase = inst.state === "pending" ? "Booting" : "Enrolling";
          st.message = inst.state === "pending" ? `instance ${inst.id} is booting` : `instance ${inst.id} is ${inst.state}; waiting for its agent to enroll`;
          return { status: st, requeueAfterMs: BOOT_POLL_MS, events };
        }
        st.agentName = rec.agentName;
        st.agentAddress = joinHostPort(rec.peer, spec.agentPort ?? 7702);
        st.enrollment = { ...st.enrollment, enrolledAt: rec.enrolledAt, enrolledFrom: rec.peer };
        events.push({ type: "Normal", reason: "AgentEnrolled", message: `agent ${rec.agentName} on ${inst.id} enrolled from ${rec.peer}` });
      }

      // 3. The instance type the side needs: staging while replicating, failover once it serves.
      if (inst.type !== wantType || inst.state !== "running") {
        st.phase = "Resizing";
        if (inst.type !== wantType && (inst.state === "running" || inst.state === "pending")) {
          await aws.ec2.send(new StopInstancesCommand({ InstanceIds: [inst.id] }));
          events.push({ type: "Normal", reason: "InstanceStopping", message: `stopping ${inst.id} to change its type ${inst.type} → ${wantType}` });
          st.message = `stopping ${inst.id} (${inst.type} → ${wantType})`;
        } else if (inst.type !== wantType && inst.state === "stopped") {
          await aws.ec2.send(new ModifyInstanceAttributeCommand({ InstanceId: inst.id, InstanceType: { Value: wantType } }));
          events.push({ type: "Normal", reason: "InstanceResized", message: `${inst.id} is now ${wantType} (was ${inst.type})` });
          st.instanceType = wantType;
          st.message = `${inst.id} resized to ${wantType}; starting it`;
        } else if (inst.type === wantType && inst.state === "stopped") {
          await aws.ec2.send(new StartInstancesCommand({ InstanceIds: [inst.id] }));
          events.push({ type: "Normal", reason: "InstanceStarting", message: `starting ${inst.id} (${wantType})` });
          st.message = `starting ${inst.id} (${wantType})`;
        } else {
          st.message = `${inst.id} is ${inst.state}`;
        }
        return { status: st, requeueAfterMs: POLL_MS, events };
      }
      st.phase = "Ready";
      st.message = `agent ${st.agentName} on ${inst.id} (${inst.type})`;
      return { status: st, requeueAfterMs: 60_000, events };
    } catch (e) {
      return this.failed(st, e, events);
    }
  }

  /** An AWS (or own) error: recorded with its code, retried with backoff when it may pass by itself. */
  private failed(st: EndpointStatus, e: unknown, events: ProvisionEvent[]): ProvisionResult {
    const info = awsError(e);
    const attempt = st.lastError?.code === info.code ? (st.lastError.attempt ?? 1) + 1 : 1;
    const first = attempt === 1;
    st.lastError = { code: info.code, message: info.message, at: first ? timestamp(this.now()) : (st.lastError?.at ?? timestamp(this.now())), attempt };
    st.message = `${info.message}${info.retryable ? ` (retrying, attempt ${attempt})` : ""}`;
    if (!info.retryable) st.phase = "Failed";
    if (first) events.push({ type: "Warning", reason: info.reason, message: info.message });
    this.o.log.warn({ endpoint: st.name, code: info.code, attempt }, "ec2 endpoint: AWS call failed");
    // not retryable: a person must change something (spec, IAM, Secret); look again in a while anyway
    return { status: st, requeueAfterMs: info.retryable ? backoffMs(attempt, info) : 60_000, events };
  }

  async finalize(pair: ReplicationPair, name: string, prev: EndpointStatus | undefined): Promise<FinalizeResult> {
    const spec = this.spec(pair, name);
    const st: EndpointStatus = { ...(prev ?? {}), name, kind: "ec2", phase: "Terminating" };
    const events: ProvisionEvent[] = [];
    try {
      const aws = await this.aws(pair, spec);
      const sub = subjectOf(pair, name);
      // the recorded instance, and any other tagged for this target (a launch whose id was never recorded)
      const tagged = await findByTarget(aws.ec2, sub);
      const ids = new Set([...(st.instanceId ? [st.instanceId] : []), ...tagged.map((i) => i.id)]);
      if ((spec.onDelete ?? "Terminate") === "Terminate") {
        for (const id of ids) {
          const r = await terminate(aws.ec2, id);
          if (r.previousState && r.previousState !== "terminated") events.push({ type: "Normal", reason: "InstanceTerminated", message: `terminated ${id} (was ${r.previousState})` });
        }
      } else {
        // Retain: every live one is kept and named. It gives up the target tag, or a pair made later under
        // the same name would adopt it (and wait for an enrollment that never comes) and terminate it when deleted.
        for (const id of ids) {
          const inst = tagged.find((i) => i.id === id) ?? (await describe(aws.ec2, id));
          if (!inst || inst.state === "terminated" || inst.state === "shutting-down") continue;
          if (inst.tags[TARGET_TAG] === sub) {
            await aws.ec2.send(new CreateTagsCommand({ Resources: [id], Tags: [{ Key: RETAINED_FROM_TAG, Value: sub }] }));
            await aws.ec2.send(new DeleteTagsCommand({ Resources: [id], Tags: [{ Key: TARGET_TAG }, { Key: MANAGED_BY_TAG }] }));
          }
          events.push({ type: "Normal", reason: "InstanceRetained", message: `instance ${id} kept (spec ec2.onDelete Retain) with what is on it; no longer managed (tagged ${RETAINED_FROM_TAG}=${sub}): terminate it yourself when done` });
        }
      }
      // also on Retain: the user data fetched it once, at first boot; an instance that has not yet
      // could not enroll any more (the pair is gone), and nothing would remove the object later
      await deleteObject(aws.s3, st.bundle?.bucket ?? spec.bucket, st.bundle?.key ?? this.bundleKey(pair, name));
      return { done: true, status: st, events };
    } catch (e) {
      const r = this.failed(st, e, events);
      return { done: false, status: r.status, requeueAfterMs: Math.min(r.requeueAfterMs, 30_000), ...(r.events ? { events: r.events } : {}) };
    }
  }
}
