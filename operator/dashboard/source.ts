// What the dashboard server needs from where its data comes from: the
// operator's Kubernetes caches (kube-source.ts) or, in `understudy demo`, the
// demo's agents directly (demo-source.ts). The server keeps history, streams
// and authorisation checks; a source only knows pairs, events and actions.
import type { Action, ActionReply, ActionRequest, EventView, PairView } from "./model.ts";

export interface Change {
  pair?: PairView;
  gone?: { namespace: string; name: string };
  event?: EventView;
}

/** Who is using the page, as the authoriser established it. */
export interface Caller {
  user: string;
  groups: string[];
  /** their bearer token: actions are made with it (Kubernetes audits them as that person) */
  token?: string;
  /** SHA-256 of the token: the key of cached answers (never the token itself) */
  id?: string;
  uid?: string;
  extra?: Record<string, string[]>;
}

export interface DashboardSource {
  readonly kind: "kubernetes" | "demo";
  pairs(): PairView[];
  pair(namespace: string, name: string): PairView | undefined;
  /** Newest first. */
  events(): EventView[];
  onChange(fn: (c: Change) => void): void;
  act(caller: Caller, namespace: string, name: string, action: Action, req: ActionRequest): Promise<ActionReply>;
  close(): Promise<void>;
}

export class AuthError extends Error {
  readonly status: number;
  constructor(message: string, status = 401) {
    super(message);
    this.status = status;
  }
}

export interface Decision {
  allowed: boolean;
  why?: string;
}

export interface Authorizer {
  /** From the request's Authorization header; throws AuthError when it is missing or not valid. */
  authenticate(authorization: string | undefined): Promise<Caller>;
  /** May the caller list pairs (and, apart, events) in this namespace? */
  canRead(caller: Caller, namespace: string): Promise<{ pairs: boolean; events: boolean }>;
  /** May the caller do this action on this pair (the check `kubectl understudy <action>` would pass)? */
  can(caller: Caller, namespace: string, name: string, action: Action): Promise<Decision>;
}
