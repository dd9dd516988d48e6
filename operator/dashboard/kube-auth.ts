// The person using the dashboard, as Kubernetes knows them: their bearer token
// is checked with a TokenReview, and what they may do with
// SubjectAccessReviews for the very verb and resource `kubectl understudy`
// needs (every action patches the ReplicationPair; reading lists pairs, and
// events apart). Answers are cached briefly per token (by its SHA-256, never
// the token itself) so a page of 500 pairs does not cost 500 reviews a second.
import { AuthenticationV1Api, AuthorizationV1Api, type KubeConfig } from "@kubernetes/client-node";
import { createHash } from "node:crypto";
import { GROUP, REPLICATION_PAIRS } from "../api/v1alpha1/index.ts";
import type { Action } from "./model.ts";
import { AuthError, type Authorizer, type Caller, type Decision } from "./source.ts";

const TTL_MS = 30_000;
const MAX_ENTRIES = 20_000;

interface Attr {
  verb: string;
  group: string;
  resource: string;
  namespace: string;
  name?: string;
}

export class KubeAuthorizer implements Authorizer {
  private readonly authn: AuthenticationV1Api;
  private readonly authz: AuthorizationV1Api;
  private readonly cache = new Map<string, { at: number; v: Promise<unknown> }>();
  private readonly now: () => number;

  constructor(kc: KubeConfig, o: { now?: () => number } = {}) {
    this.authn = kc.makeApiClient(AuthenticationV1Api);
    this.authz = kc.makeApiClient(AuthorizationV1Api);
    this.now = o.now ?? Date.now;
  }

  private cached<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const hit = this.cache.get(key);
    if (hit && this.now() - hit.at < TTL_MS) return hit.v as Promise<T>;
    if (this.cache.size > MAX_ENTRIES) this.cache.clear();
    const v = fn();
    this.cache.set(key, { at: this.now(), v });
    v.catch(() => this.cache.delete(key));
    return v;
  }

  async authenticate(authorization: string | undefined): Promise<Caller> {
    const m = /^Bearer\s+(\S+)$/i.exec(authorization ?? "");
    if (!m) throw new AuthError("sign in with a Kubernetes bearer token (Authorization: Bearer …): e.g. kubectl create token <serviceaccount>, or your OIDC id-token");
    const token = m[1]!;
    const id = createHash("sha256").update(token).digest("base64url");
    const who = await this.cached(`authn|${id}`, async () => {
      const r = await this.authn.createTokenReview({ body: { apiVersion: "authentication.k8s.io/v1", kind: "TokenReview", spec: { token } } });
      if (!r.status?.authenticated || !r.status.user?.username) return { error: r.status?.error ?? "token not accepted" };
      return { user: r.status.user.username, groups: r.status.user.groups ?? [], uid: r.status.user.uid, extra: r.status.user.extra };
    });
    if ("error" in who) throw new AuthError(`the API server does not accept this token: ${who.error}`);
    return { user: who.user, groups: who.groups, token, id, uid: who.uid, extra: who.extra };
  }

  private async review(caller: Caller, a: Attr): Promise<{ allowed: boolean; reason?: string }> {
    const c = caller;
    return this.cached(`authz|${c.id}|${a.verb}|${a.group}|${a.resource}|${a.namespace}|${a.name ?? ""}`, async () => {
      const r = await this.authz.createSubjectAccessReview({
        body: {
          apiVersion: "authorization.k8s.io/v1",
          kind: "SubjectAccessReview",
          spec: { user: caller.user, groups: caller.groups, uid: c.uid, extra: c.extra, resourceAttributes: { verb: a.verb, group: a.group, resource: a.resource, namespace: a.namespace, ...(a.name ? { name: a.name } : {}) } },
        },
      });
      return { allowed: !!r.status?.allowed && !r.status.denied, reason: r.status?.reason || r.status?.evaluationError || undefined };
    });
  }

  async canRead(caller: Caller, namespace: string): Promise<{ pairs: boolean; events: boolean }> {
    const [pairs, events] = await Promise.all([
      this.review(caller, { verb: "list", group: GROUP, resource: REPLICATION_PAIRS, namespace }),
      this.review(caller, { verb: "list", group: "", resource: "events", namespace }),
    ]);
    return { pairs: pairs.allowed, events: events.allowed };
  }

  async can(caller: Caller, namespace: string, name: string, action: Action): Promise<Decision> {
    const r = await this.review(caller, { verb: "patch", group: GROUP, resource: REPLICATION_PAIRS, namespace, name });
    if (r.allowed) return { allowed: true };
    return { allowed: false, why: `${caller.user} may not patch replicationpairs.${GROUP} "${name}" in namespace ${namespace} (what kubectl understudy ${action} needs)${r.reason ? `: ${r.reason}` : ""}` };
  }
}
