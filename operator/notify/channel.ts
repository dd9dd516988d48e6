// What every channel (email, webhook, snmp) is: something that delivers one
// event within a deadline, or fails with a reason a person can act on.
import type { NotificationEvent } from "../api/v1alpha1/index.ts";

export interface Sender {
  /** Deliver one event (retries are the caller's); rejects with a DeliveryError. */
  send(e: NotificationEvent, timeoutMs: number): Promise<void>;
  /** Check what can be checked without sending (connect and authenticate). */
  verify?(timeoutMs: number): Promise<void>;
  close(): void;
}

/** A failed delivery or a bad channel configuration: reason is a condition reason (CamelCase). */
export class DeliveryError extends Error {
  readonly reason: string;
  constructor(reason: string, message: string) {
    super(message);
    this.reason = reason;
  }
}

/** Rejects with a DeliveryError(reason) when p takes longer than ms; `cancel` is called then. */
export async function within<T>(p: Promise<T>, ms: number, what: string, cancel?: () => void): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (t = setTimeout(() => (cancel?.(), reject(new DeliveryError("Timeout", `${what}: no answer within ${ms} ms`))), ms)))]);
  } finally {
    clearTimeout(t);
  }
}

export function stateWord(e: NotificationEvent): string {
  return e.state === "firing" ? "FIRING" : e.state === "resolved" ? "RESOLVED" : "INFO";
}

/** A plain-text rendering shared by email and chat. */
export function textOf(e: NotificationEvent): string {
  const lines = [`[${stateWord(e)}] ${e.summary}`, "", e.detail ?? "", "", `pair: ${e.namespace}/${e.pair}${e.subject ? ` (target ${e.subject})` : ""}`, `kind: ${e.kind}  severity: ${e.severity}`, `at: ${e.at}${e.since ? `  since: ${e.since}` : ""}`, `id: ${e.id}`];
  return lines.join("\n");
}
