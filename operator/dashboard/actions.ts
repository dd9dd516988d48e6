// What each dashboard action changes on a ReplicationPair: exactly what the
// `kubectl understudy` command of the same name patches (operator/plugin.ts),
// so the operator cannot tell them apart. Pure: the caller makes the patch.
import { MIRROR_ANNOTATION, MIRROR_MODE_ANNOTATION, VERIFY_ANNOTATION, VERIFY_REPAIR_ANNOTATION, type ReplicationPair } from "../api/v1alpha1/index.ts";
import type { Action, ActionRequest } from "./model.ts";

export class ActionError extends Error {
  readonly code = 409;
}

/** The merge patch for the action, and what to tell the person; throws ActionError when it cannot be asked for. */
export function actionPatch(pair: ReplicationPair, action: Action, req: ActionRequest, now: Date): { body: object; message: string; request?: string } {
  const id = `${pair.metadata.namespace}/${pair.metadata.name}`;
  const targets = pair.spec.targets.map((t) => t.name);
  const need = (to: string | undefined) => {
    if (!to) throw new ActionError(`${action} needs a target (targets: ${targets.join(", ")})`);
    if (!targets.includes(to)) throw new ActionError(`${id} has no target ${to} (targets: ${targets.join(", ")})`);
    return to;
  };
  switch (action) {
    case "failover": {
      // As the plugin: default to a known-good target, and refuse up front when there is none.
      const to = req.target ?? pair.status?.knownGood?.find((k) => k.ok)?.target;
      if (!to) throw new ActionError(`no target of ${pair.metadata.name} is known good: ${(pair.status?.knownGood ?? []).map((k) => `${k.target}: ${(k.failed ?? []).join("; ")}`).join(" | ") || "no gate status yet (is a FailoverPolicy selecting this pair?)"}`);
      return { body: { spec: { activeSide: need(to) } }, message: `failover of ${id} to ${to} requested` };
    }
    case "cutover": {
      const to = need(req.target);
      return { body: { spec: { activeSide: to } }, message: `cutover of ${id} to ${to} requested` };
    }
    case "failback":
      if ((pair.status?.activeSide ?? "source") === "source" && (pair.spec.activeSide ?? "source") === "source") throw new ActionError(`${id} is served by its source already: nothing to fail back`);
      return { body: { spec: { activeSide: "source" } }, message: `failback of ${id} requested` };
    case "verify": {
      const token = String(now.getTime());
      return { body: { metadata: { annotations: { [VERIFY_ANNOTATION]: token, [VERIFY_REPAIR_ANNOTATION]: req.repair ? "true" : "false" } } }, message: `verify${req.repair ? " with repair" : ""} of ${id} requested (${token})`, request: token };
    }
    case "mirror": {
      const token = String(now.getTime());
      // Always written: a mode left from an earlier request must not apply to this one.
      const mode = req.mode ?? pair.spec.mirror?.mode ?? "checksum";
      return { body: { metadata: { annotations: { [MIRROR_ANNOTATION]: token, [MIRROR_MODE_ANNOTATION]: mode } } }, message: `${mode} mirror of ${id} requested (${token})`, request: token };
    }
  }
}
