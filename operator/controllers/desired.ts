// Pure functions from a ReplicationPair to what its agents should run: the
// replication set the source agent is configured with. Sizes and durations are
// parsed by the agent config's own parsers, so both accept the same syntax.
import { createHash } from "node:crypto";
import { parseDuration, parseSize } from "../../common/config.ts";
import type { SetSpec } from "../../agent/wire.ts";
import type { ReplicationPair, ResolvedPair } from "../api/v1alpha1/index.ts";

/**
 * The set's name on the source agent (and the replica's directory on the
 * targets): `<namespace>.<name>`, shortened with a hash when longer than an
 * agent set name may be.
 */
export function setNameFor(pair: Pick<ReplicationPair, "metadata">): string {
  const full = `${pair.metadata.namespace ?? "default"}.${pair.metadata.name}`;
  if (full.length <= 63) return full;
  return `${full.slice(0, 54).replace(/[._-]+$/, "")}-${createHash("sha256").update(full).digest("hex").slice(0, 8)}`;
}

export function desiredSetSpec(pair: ResolvedPair): SetSpec {
  const s = pair.spec;
  return {
    name: setNameFor(pair),
    path: s.replicationSet.path,
    include: s.replicationSet.include ?? ["**"],
    exclude: s.replicationSet.exclude ?? [],
    targets: s.targets.map((t) => t.agent.address),
    mode: s.mode ?? "continuous",
    intervalMs: s.mode === "scheduled" && s.interval ? parseDuration(s.interval) : 0,
    compression: s.compression ?? "fast",
    bandwidthLimit: parseSize(s.bandwidthLimit ?? "0"),
    blockSize: s.mirror?.blockSize ?? 65536,
    queueMemory: parseSize(s.queueMemory ?? "32MiB"),
    verifyIntervalMs: parseDuration(s.verify?.interval ?? "0s"),
    verifyRepair: s.verify?.repair ?? false,
    epoch: pair.status?.epoch ?? 0,
    wholeServer: s.replicationSet.wholeServer ?? false,
  };
}
