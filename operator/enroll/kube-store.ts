// The operator's EnrollmentStore, kept in Kubernetes. A pending enrollment is
// the nonce in the pair's status.endpoints[] (written before the instance that
// carries the token is launched); consuming it CREATES a ConfigMap whose name
// is derived from subject and nonce. The API server creates a name once, so a
// second use of a token fails with AlreadyExists whichever operator replica
// serves it, and whatever restarts happen in between: no lock, no lost update.
// The ConfigMap holds no secret (the token is never stored) and is owned by
// the pair, so it goes with it.
import type { CoreV1Api, V1ConfigMap, V1Secret } from "@kubernetes/client-node";
import { createHash } from "node:crypto";
import { isIP } from "node:net";
import type { Logger } from "../../common/log.ts";
import type { San } from "../../common/tls.ts";
import { API_VERSION, type ReplicationPair } from "../api/v1alpha1/index.ts";
import type { EnrollmentLedger, EnrollmentRecord } from "../ec2/provisioner.ts";
import type { EnrollSecretData, EnrollSecrets } from "./provisioner.ts";
import { EnrollmentRefused, type EnrollmentClaims, type EnrollmentInfo, type EnrollmentStore, type Grant } from "./server.ts";

export const ENROLLMENT_LABEL = "understudy.dev/enrollment";

/** The ConfigMap that records the use of (subject, nonce). */
export function enrollmentRecordName(subject: string, nonce: string): string {
  return `understudy-enroll-${createHash("sha256").update(`${subject}\0${nonce}`).digest("hex").slice(0, 32)}`;
}

function statusCode(e: unknown): number | undefined {
  const c = (e as { code?: unknown; statusCode?: unknown }).code ?? (e as { statusCode?: unknown }).statusCode;
  return typeof c === "number" ? c : undefined;
}

export interface KubeEnrollmentStoreOptions {
  core: CoreV1Api;
  /** the pair from the informer cache */
  getPair(namespace: string, name: string): ReplicationPair | undefined;
  /** CNs that may change enrolled agents (the operator's client certificate CN) */
  admins: string[];
  log: Logger;
}

/** An agent name from what a host says it is called (informational), made unique per enrollment subject. */
function hostAgentName(hostname: string, subject: string): string {
  const h = hostname.toLowerCase().replace(/[^a-z0-9.-]+/g, "-").replace(/^[^a-z0-9]+|[^a-z0-9]+$/g, "").slice(0, 48) || "host";
  return `${h}-${createHash("sha256").update(subject).digest("hex").slice(0, 6)}`;
}

export class KubeEnrollmentStore implements EnrollmentStore, EnrollmentLedger, EnrollSecrets {
  private readonly o: KubeEnrollmentStoreOptions;
  constructor(o: KubeEnrollmentStoreOptions) {
    this.o = o;
  }

  async consume(claims: EnrollmentClaims, info: EnrollmentInfo): Promise<Grant> {
    const parts = claims.sub.split("/");
    if (parts.length !== 3) throw new EnrollmentRefused("unknown", `this token's subject ${JSON.stringify(claims.sub)} is not a pair target`);
    const [namespace, name, target] = parts as [string, string, string];
    const pair = this.o.getPair(namespace, name);
    const ec2 = pair?.spec.targets.find((x) => x.name === target)?.ec2;
    const self = target === "source" ? pair?.spec.source.enroll : pair?.spec.targets.find((x) => x.name === target)?.enroll;
    if (!pair || (!ec2 && !self) || pair.metadata.deletionTimestamp) throw new EnrollmentRefused("unknown", `no enrollment is pending for ${claims.sub}: the pair or its endpoint is gone`);
    const ep = pair.status?.endpoints?.find((e) => e.name === target);
    if (ep?.enrollment?.nonce !== claims.nonce) throw new EnrollmentRefused("superseded", `this token is not the current one for ${claims.sub} (the instance was replaced or the token renewed)`);
    const grant: Grant = ec2
      ? {
          agentName: `ec2-${(ep.instanceId ?? createHash("sha256").update(claims.sub).digest("hex").slice(0, 12)).toLowerCase()}`.replace(/[^a-z0-9.-]/g, "-").slice(0, 63),
          sans: [ep.privateIp, ep.publicIp].filter((ip): ip is string => !!ip && isIP(ip) !== 0).map((value): San => ({ type: "ip", value })),
          admins: this.o.admins,
        }
      : { agentName: hostAgentName(info.hostname, claims.sub), sans: [], admins: this.o.admins };
    const at = new Date().toISOString();
    const cm: V1ConfigMap = {
      metadata: {
        name: enrollmentRecordName(claims.sub, claims.nonce),
        namespace,
        labels: { [ENROLLMENT_LABEL]: "used", "app.kubernetes.io/managed-by": "understudy-operator" },
        annotations: { "understudy.dev/subject": claims.sub },
        ownerReferences: [{ apiVersion: API_VERSION, kind: "ReplicationPair", name, uid: pair.metadata.uid ?? "", controller: false }],
      },
      data: { subject: claims.sub, nonce: claims.nonce, agentName: grant.agentName, peer: info.peerAddress, enrolledAt: at, agentVersion: info.agentVersion, hostname: info.hostname, publicKeySha256: info.publicKeySha256 },
    };
    try {
      await this.o.core.createNamespacedConfigMap({ namespace, body: cm });
    } catch (e) {
      if (statusCode(e) !== 409) throw e;
      const used = await this.read(namespace, cm.metadata!.name!);
      // the same key again: a client retrying after a lost response gets the same grant
      if (used?.publicKeySha256 === info.publicKeySha256) return { ...grant, agentName: used.agentName ?? grant.agentName };
      throw new EnrollmentRefused("used", `enrollment token already used at ${used?.enrolledAt ?? "?"} by ${used?.peer ?? "?"} (${used?.hostname || "?"}); a token works once${ec2 ? ": terminate the instance and the operator launches a new one with a new token" : ""}`);
    }
    this.o.log.info({ subject: claims.sub, agent: grant.agentName, peer: info.peerAddress }, "enrollment recorded");
    return grant;
  }

  private async read(namespace: string, name: string): Promise<Record<string, string> | undefined> {
    try {
      return (await this.o.core.readNamespacedConfigMap({ namespace, name })).data ?? {};
    } catch (e) {
      if (statusCode(e) === 404) return undefined;
      throw e;
    }
  }

  async lookup(namespace: string, subject: string, nonce: string): Promise<EnrollmentRecord | undefined> {
    const d = await this.read(namespace, enrollmentRecordName(subject, nonce));
    if (!d?.agentName || !d.peer) return undefined;
    return { agentName: d.agentName, peer: d.peer, enrolledAt: d.enrolledAt ?? "" };
  }

  async put(pair: ReplicationPair, name: string, data: EnrollSecretData): Promise<void> {
    const namespace = pair.metadata.namespace ?? "default";
    const body: V1Secret = {
      metadata: {
        name,
        namespace,
        labels: { [ENROLLMENT_LABEL]: "pending", "app.kubernetes.io/managed-by": "understudy-operator" },
        ownerReferences: [{ apiVersion: API_VERSION, kind: "ReplicationPair", name: pair.metadata.name ?? "", uid: pair.metadata.uid ?? "", controller: false }],
      },
      type: "Opaque",
      stringData: data,
    };
    try {
      const cur = await this.o.core.readNamespacedSecret({ namespace, name });
      const same = Object.entries(data).every(([k, v]) => Buffer.from(cur.data?.[k] ?? "", "base64").toString("utf8") === v);
      if (!same) await this.o.core.replaceNamespacedSecret({ namespace, name, body: { ...body, metadata: { ...body.metadata, resourceVersion: cur.metadata?.resourceVersion } } });
    } catch (e) {
      if (statusCode(e) !== 404) throw e;
      await this.o.core.createNamespacedSecret({ namespace, body });
    }
  }

  async remove(namespace: string, name: string): Promise<void> {
    try {
      await this.o.core.deleteNamespacedSecret({ namespace, name });
    } catch (e) {
      if (statusCode(e) !== 404) throw e;
    }
  }
}
